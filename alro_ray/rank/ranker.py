"""A trained ranker on disk, and loading it back to rank.

  DIR/adapter/      PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
  DIR/tokenizer/    the tokenizer the data was prepared with
  DIR/config.yaml   the full training config (model, loss, data settings)
  DIR/ranker.json   `RankerInfo` (model/ranker_info.py): base model, C, H, identifier ids,
                    domain wording, data dir, the score head's settings and the hint names
  DIR/head.safetensors  the score head's weights (only with a head; model/score_head.py)
  DIR/hints.parquet the prompt hints fitted at prepare time (only with data.hints; data/hints.py)
  DIR/history.json  per-epoch training metrics (optional; for plots)

A checkpoint alone is enough to rank: nothing else from the training run is read.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alro_ray.config import Config, from_dict, read_yaml, save_config
from alro_ray.compat import check_ranker_tokenizer
from alro_ray.errors import AlroError
from alro_ray.files import write_json
from alro_ray.data import hints as prompt_hints
from alro_ray.data.prompts import Item, render_prefix, render_suffix
from alro_ray.data.dataset import PreparedStats
from alro_ray.data.tokenize import RankTokenizer
from alro_ray.model.ranker_info import RankerInfo, read_ranker_info, write_ranker_info


def save_ranker(out_dir: str | Path, model, tokenizer, cfg: Config, stats: PreparedStats, data_dir: str | None,
                history: list[dict] | None = None) -> Path:
    """Write a ranker checkpoint. `model` is the PEFT model (only the adapter is saved, and the
    score head registered on it, if any)."""
    from alro_ray.model.score_head import head_of, save_head  # imports torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    save_config(cfg, out / "config.yaml")
    info = RankerInfo(cfg.model.name, stats.candidates, stats.history, stats.identifier_ids,
                      stats.domain_plural, stats.attribute_name, stats.tokenizer,
                      str(Path(data_dir).resolve()) if data_dir else None)
    head = head_of(model)
    if head is not None:
        info.head = save_head(head, out)
    if stats.hints:  # the fitted hints travel with the ranker: Serve shows them for known items
        if not data_dir:
            raise AlroError("the data has prompt hints (data.hints): save_ranker needs its data_dir")
        shutil.copyfile(Path(data_dir) / prompt_hints.FILE, out / prompt_hints.FILE)
        info.hints = list(stats.hints)
    if stats.protocol == "topn":  # Serve's /recommend retrieves from the catalogue, then reranks
        # here: the retrievers' module (scipy) is not for a process that only loads rankers
        from alro_ray.data.retrieval import RETRIEVER_DIR

        if not data_dir:
            raise AlroError("the data is top-N (data.protocol topn): save_ranker needs its data_dir")
        shutil.copytree(Path(data_dir) / RETRIEVER_DIR, out / RETRIEVER_DIR, dirs_exist_ok=True)
        shutil.copyfile(Path(data_dir) / "items.parquet", out / RETRIEVER_DIR / "items.parquet")
        info.protocol = "topn"
    write_ranker_info(info, out)
    if history is not None:
        write_json(out / "history.json", history)
    return out


# Serve's fusion: the classical model -> its hint value key, and the data.hints entry that fits it.
FUSION_HINTS = {"mf": "mf_score", "item-mean": "mean_rating"}
FUSION_FITS = {"mf": prompt_hints.MF_HINTS, "item-mean": ("item_mean",)}  # hints that fit the model


@dataclass
class Ranker:
    """A loaded ranker: renders prompts exactly as in training and ranks them."""

    model: object
    tokenizer: object
    rank_tokenizer: RankTokenizer
    info: RankerInfo
    config: Config
    scorer: object = None  # model/score_head.CandidateScorer when the ranker has a score head
    hints: object = None  # data/hints.HintModel when the ranker was trained with prompt hints

    @property
    def candidates(self) -> int:
        return self.info.candidates

    def prompt_ids(self, history: Sequence[tuple[Item, float | None]], candidates: Sequence[Item],
                   notes: Sequence[str] | None = None) -> list[int]:
        """notes: each candidate's hint text (`hint_notes`), for a ranker trained with data.hints."""
        prefix = render_prefix(history, self.info.domain_plural, self.info.attribute_name)
        ids, _ = self.rank_tokenizer.prompt_ids(prefix, render_suffix(candidates, self.info.attribute_name, notes))
        return ids

    def hint_notes(self, candidate_ids: Sequence, given: Sequence[dict | None] | None = None,
                   history_ids: Sequence = (), history_ratings: Sequence = ()) -> list[str] | None:
        """Hint text per candidate (None: the ranker has no hints). given[j]: values a request passed
        for candidate j (data/hints.VALUE_KEYS), each over the saved fit's value by id; the others
        from the fit ("none" for an unknown item); MF's user part from the history items that have ids."""
        if self.hints is None:
            return None
        fitted = self.hints.values(candidate_ids, history_ids, history_ratings)
        given = given or [None] * len(fitted)
        return prompt_hints.render_hints([{**(f or {}), **(g or {})} for g, f in zip(given, fitted)],
                                         self.hints.names)

    def classical_scores(self, classical: str, candidate_ids: Sequence, given: Sequence[dict | None] | None = None,
                         history_ids: Sequence = (), history_ratings: Sequence = ()) -> list[float | None]:
        """Per candidate, the classical score Serve fuses with (rank/fusion.py): `mf` = MF's predicted
        rating (hint mf_score), `item-mean` = the item's shrunk mean rating (hint mean_rating); the
        request's own hint value first, else the saved fit's by id, else None (unknown)."""
        key = FUSION_HINTS[classical]
        given = given or [None] * len(candidate_ids)
        fits = self.hints is not None and set(FUSION_FITS[classical]) & set(self.hints.names)
        fitted = self.hints.values(candidate_ids, history_ids, history_ratings) if fits else [None] * len(given)
        return [(g or {}).get(key) if (g or {}).get(key) is not None else (f or {}).get(key)
                for g, f in zip(given, fitted)]

    def rank(self, prompts: Sequence[Sequence[int]], mode: str, c: int | None = None
             ) -> tuple[list[list[int]], list[list[float]]]:
        """Rank prompts that each show `c` candidates (default: the trained C)."""
        from alro_ray.rank.ranking import rank_batch  # imports torch: Serve's ingress imports this module

        c = c or self.candidates
        return rank_batch(self.model, prompts, self.rank_tokenizer.identifier_ids[:c], mode,
                          self.tokenizer.pad_token_id, scorer=self.scorer)


def load_ranker(path: str | Path, device: str = "cpu", dtype=None) -> Ranker:
    # torch, peft: only where a ranker is loaded (the CLI and Serve's ingress import this module)
    import torch
    from peft import PeftModel

    from alro_ray.model.loading import load_base_model  # imports torch, as above

    read_ranker_info(path)  # first: a directory that is no ranker checkpoint is refused by name
    cfg = from_dict(Config, read_yaml(Path(path) / "config.yaml"))
    base = load_base_model(cfg.model, dtype or torch.float32)
    model = PeftModel.from_pretrained(base, Path(path) / "adapter").to(device).eval()
    return build_ranker(model, path, device, dtype)


def build_ranker(model, path: str | Path, device: str = "cpu", dtype=None, label: str | None = None) -> Ranker:
    """The Ranker of checkpoint `path` on `model`, a PEFT model that already holds its adapter
    (`load_ranker`; Serve puts several adapters on one base model): the checkpoint's tokenizer,
    the tokenizer check, its score head and hints. `label` names it in errors (default: the path)."""
    from transformers import AutoTokenizer  # heavy: only where a ranker is loaded, as above

    from alro_ray.model.score_head import load_scorer  # imports torch, as above

    path = Path(path)
    info = read_ranker_info(path)
    cfg = from_dict(Config, read_yaml(path / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rank_tok = RankTokenizer(tokenizer, info.candidates)
    check_ranker_tokenizer(label or path, rank_tok.identifier_ids, info)
    scorer = load_scorer(path, info, rank_tok, device, dtype)
    return Ranker(model, tokenizer, rank_tok, info, cfg, scorer, load_hints(path, info))


def load_hints(path: str | Path, info: RankerInfo):
    """The checkpoint's fitted prompt hints (data/hints.HintModel), or None without data.hints."""
    return prompt_hints.HintModel.load(Path(path) / prompt_hints.FILE) if info.hints else None
