"""The one compatibility check: prepared data, a model's tokenizer, the loss and a ranker checkpoint
must agree before any worker, trial or actor starts. Train, tune, evaluate and Serve call it.

What must agree, and why:
- identifier ids: the letters " A".." Z" as token ids. Data prepared with one tokenizer and a model
  (or a saved ranker) with another would train or rank on the wrong tokens without any error.
- C: a ranker trained on C candidates has identifier ids (and a score head) for exactly C.
- permutations: beta > 0 (or a study that searches beta) needs permuted prompts in the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from alro_ray.config import Config
from alro_ray.data.dataset import PreparedStats
from alro_ray.data.tokenize import identifier_token_ids
from alro_ray.errors import AlroError
from alro_ray.model.loading import load_tokenizer
from alro_ray.model.ranker_info import RankerInfo

NEEDS_PERMUTATIONS = "loss.beta > 0 needs permuted prompts: prepare the data with data.permutations >= 1"


def check_training(cfg: Config, stats: PreparedStats, beta_searched: bool = False) -> None:
    """Data (its stats.json) that this model and loss can train on; `beta_searched`: a study that
    may draw beta > 0."""
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.cache_dir)
    if identifier_token_ids(tok, stats.candidates) != stats.identifier_ids:
        raise AlroError(
            f"the data was prepared with tokenizer {stats.tokenizer!r}, whose identifier ids differ "
            f"from model {cfg.model.name!r}'s tokenizer; prepare it again with --tokenizer {cfg.model.name}")
    if (cfg.loss.beta > 0 or beta_searched) and stats.permutations < 1:
        raise AlroError(NEEDS_PERMUTATIONS + (" (the study searches loss.beta)" if beta_searched else ""))
    if stats.rows["train"] < cfg.train.num_workers:
        raise AlroError(f"{stats.rows['train']} training rows for {cfg.train.num_workers} workers")
    if cfg.train.keep == "best" and not stats.rows.get("valid"):
        raise AlroError("train.keep: best picks the epoch by validation, and the data has no valid rows")


def check_ranker_tokenizer(where: str | Path, identifier_ids: Sequence[int], info: RankerInfo) -> None:
    """A ranker's saved tokenizer (its identifier ids) against its ranker.json."""
    if list(identifier_ids) != list(info.identifier_ids):
        raise AlroError(f"{where}: the saved tokenizer's identifier ids differ from ranker.json")


def check_ranker_on_data(info: RankerInfo, stats: PreparedStats, data: str | Path) -> None:
    """A ranker (its ranker.json) against prepared data it is to rank (its stats.json)."""
    if stats.candidates != info.candidates:
        raise AlroError(f"{data} has C={stats.candidates} candidates per list, the ranker was trained "
                        f"with C={info.candidates}")
    if stats.identifier_ids != info.identifier_ids:
        raise AlroError(f"{data} was prepared with tokenizer {stats.tokenizer!r}, whose identifier tokens "
                        f"differ from the ranker's ({info.tokenizer!r})")
