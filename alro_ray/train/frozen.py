"""The score head on a frozen language model, fitted on cached hidden states (`model.freeze_lm`).

With the LM frozen its hidden states at the candidate and history lines are the same in every
epoch, so with `train.cache_frozen_states` each worker runs the LM once over its share of the
train split (shares.py, in (user, window) order: the same every run, so a seeded run repeats) and
of the valid split, and every epoch then steps the head on those states: the losses, gradients
and validation orders of recomputing them every step, for one forward per prompt in all instead
of one per prompt per epoch (a head needs tens of epochs; docs/method.md, "A frozen LM"). With
the permuted pass (loss.beta > 0) the candidate states of each stored permutation's prompt are
read once too (one more forward per permutation; the history lines are the shared prefix's), and
epoch e's consistency term reads permutation e mod K, as the LoRA path's collate does. The states
are read as mode `score` reads them when ranking (`CandidateScorer.states` on one left-padded
forward), by a forward that stops at the head's layer.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from alro_ray.compat import NEEDS_PERMUTATIONS
from alro_ray.config import Config
from alro_ray.model.hidden import hidden_states_at
from alro_ray.model.padding import left_pad
from alro_ray.model.score_head import HistoryLines, ScoreHead, scorer_of
from alro_ray.rank.evaluation import prompt_ids
from alro_ray.train.losses import LossTerms, alro_loss, map_scores_to_items, score_consistency_loss, score_rank_loss

log = logging.getLogger("alro_ray")
READ_BATCH = 8  # prompts per forward when reading states (in the stored states' key: padding moves float sums)


def uses_cached_states(cfg: Config) -> bool:
    """Whether training takes this path: only the head trains and nothing else needs the LM."""
    return cfg.model.freeze_lm and cfg.train.cache_frozen_states


def permuted_rows(rows: Sequence[dict], k: int) -> list[dict]:
    """The rows as their k-th stored permutation shows them: what `CachedStates.extract` reads
    (the prompt and the number of candidates) from the permuted prompt."""
    if any(len(r["perm_orders"]) <= k for r in rows):
        raise ValueError(NEEDS_PERMUTATIONS)
    return [dict(r, input_ids=r["perm_input_ids"][k], slot_positions=r["perm_slot_positions"][k]) for r in rows]


@dataclass
class StatesBatch:
    """A micro-batch of cached states: what `losses` needs, and what the training loop reports."""

    candidates: torch.Tensor  # [B, C, H]
    history: torch.Tensor | None  # [B, L, H]
    lines: HistoryLines | None
    ratings: torch.Tensor  # [B, C]
    gold: torch.Tensor  # [B, C] long
    users: list[str]
    perm_candidates: torch.Tensor | None = None  # [B, C, H] by permuted prompt position (loss.beta > 0)
    perm_order: torch.Tensor | None = None  # [B, C]: the original index shown at permuted position j

    @property
    def size(self) -> int:
        return len(self.users)

    @property
    def tokens(self) -> int:
        return 0  # the LM reads no tokens in these steps (tokens_per_s is the LM's throughput)


class CachedStates:
    """The head's inputs for a list of prepared rows, read once from the frozen model."""

    def __init__(self, rows: Sequence[dict], candidates: list[torch.Tensor], history: list[torch.Tensor] | None,
                 lines: list[tuple[torch.Tensor, torch.Tensor]] | None):
        self.rows = rows
        self.candidates = candidates  # per row [C, H]
        self.history = history  # per row [L, H], or None: the head reads no history
        self.lines = lines  # per row (ratings [L], mask [L])
        self.permuted: list[list[torch.Tensor]] = []  # [k][row] candidate states of permutation k's prompt

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    @torch.no_grad()
    def extract(cls, model, scorer, rows: Sequence[dict], pad_id: int, batch_size: int = READ_BATCH,
                progress: Callable[[int, int], None] | None = None) -> "CachedStates":
        """One forward per `batch_size` prompts (the prompt only: positions before the response
        see nothing of it); states kept as float32 on the CPU."""
        c = len(rows[0]["candidate_ratings"]) if rows else 0
        device = next(model.parameters()).device
        candidates: list[torch.Tensor] = []
        history, lines = ([], []) if scorer.head.reads_history else (None, None)
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), batch_size):
            prompts = [prompt_ids(r) for r in rows[start:start + batch_size]]
            ids, mask = left_pad(prompts, pad_id, device)
            states = {scorer.layer: hidden_states_at(model, scorer.layer, ids, mask)}
            cand, hist, hist_lines = scorer.states(states, prompts, c)
            candidates += list(cand.float().cpu().unbind(0))
            if history is not None:
                for b in range(len(prompts)):
                    keep = hist_lines.mask[b]
                    history.append(hist[b][keep.to(hist.device)].float().cpu())
                    lines.append((hist_lines.ratings[b][keep], keep[keep]))
            if progress is not None:
                progress(min(start + batch_size, len(rows)), len(rows))
        model.train(was_training)
        return cls(rows, candidates, history, lines)

    def batch(self, index: Sequence[int], perm_index: int | None = None) -> StatesBatch:
        """Rows `index`; with `perm_index` also their candidates' states in the permutation
        perm_index mod K (the stored permutations read by `read_permuted`)."""
        rows = [self.rows[i] for i in index]
        history = lines = None
        if self.history is not None:
            history = pad_sequence([self.history[i] for i in index], batch_first=True)
            lines = HistoryLines(positions=torch.zeros(history.shape[:2], dtype=torch.long),
                                 ratings=pad_sequence([self.lines[i][0] for i in index], batch_first=True,
                                                      padding_value=float("nan")),
                                 mask=pad_sequence([self.lines[i][1] for i in index], batch_first=True))
        return StatesBatch(
            candidates=torch.stack([self.candidates[i] for i in index]), history=history, lines=lines,
            ratings=torch.tensor(np.array([r["candidate_ratings"] for r in rows], dtype=np.float32)),
            gold=torch.tensor(np.array([r["gold_order"] for r in rows], dtype=np.int64)),
            users=[str(r.get("user", "")) for r in rows],
            **({} if perm_index is None else self._permuted(index, perm_index)))

    def _permuted(self, index: Sequence[int], perm_index: int) -> dict:
        if not self.permuted:
            raise ValueError("loss.beta > 0 on cached states needs the permuted prompts' states (read_permuted)")
        k = perm_index % len(self.permuted)
        return {"perm_candidates": torch.stack([self.permuted[k][i] for i in index]),
                "perm_order": torch.tensor(np.array([self.rows[i]["perm_orders"][k] for i in index], dtype=np.int64))}

    def micro_batches(self, micro_batch: int, seed: int, steps: int, perm_index: int | None = None
                      ) -> Iterator[StatesBatch]:
        """`steps` micro-batches of a seeded shuffle (at most one pass over the rows)."""
        order = np.random.default_rng(seed).permutation(len(self))
        for s in range(0, min(len(self), steps * micro_batch), micro_batch):
            yield self.batch(order[s:s + micro_batch].tolist(), perm_index)

    def scores(self, head: ScoreHead, batch_size: int = 256) -> torch.Tensor:
        """[N, C] head scores of every row (validation)."""
        with torch.no_grad():
            parts = [self._scores(head, self.batch(range(s, min(s + batch_size, len(self)))))
                     for s in range(0, len(self), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)

    @staticmethod
    def _scores(head: ScoreHead, batch: StatesBatch) -> torch.Tensor:
        device = next(head.parameters()).device
        history = None if batch.history is None else batch.history.to(device)
        return head(batch.candidates.to(device), history, batch.lines)


def losses(head: ScoreHead, batch: StatesBatch, cfg) -> LossTerms:
    """alpha * score_loss(head scores) + beta * score consistency: the score objective without its
    SFT (the LM is frozen; loss.* in `cfg`). The permuted prompt's scores read the same history
    lines (its shared prefix) and are mapped back to item order, as in objective.score_losses."""
    scores = CachedStates._scores(head, batch)
    rank = score_rank_loss(cfg.score_loss, scores, batch.ratings.to(scores.device), batch.gold.to(scores.device),
                           cfg.sigma)
    perm = None
    if cfg.beta > 0:
        if batch.perm_candidates is None:
            raise ValueError("loss.beta > 0 needs a batch with the permuted prompts' states (perm_index)")
        device = scores.device
        history = None if batch.history is None else batch.history.to(device)
        permuted = map_scores_to_items(head(batch.perm_candidates.to(device), history, batch.lines),
                                       batch.perm_order.to(device))
        perm = score_consistency_loss(scores, permuted, detach_reference=cfg.detach_reference)
    return alro_loss(None, rank, perm, cfg.alpha, cfg.beta, sft_weight=0.0)


def weights_digest(model, scorer, pad_id: int, batch_size: int):
    """The part of `states_key` that does not depend on the prompts (a blake2b object to copy):
    hashing 135M weights takes about a second, so a caller that reads many batches hashes them once."""
    import transformers

    digest = hashlib.blake2b(digest_size=20)
    p0 = next(model.parameters())
    head = scorer.head.cfg
    digest.update(json.dumps([head.layer, head.position, scorer.head.reads_history, pad_id, batch_size, str(p0.dtype),
                              p0.device.type, torch.__version__, transformers.__version__]).encode())
    for name, param in model.named_parameters():
        if "score_head" in name or "lora_A" in name:
            continue
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest


def states_key(model, scorer, rows: Sequence[dict], pad_id: int, batch_size: int, weights=None) -> str:
    """A hash of everything `CachedStates.extract` reads: the model's weights (the score head's
    aside; LoRA's B is in, and at its zero init it makes the adapter a no-op whatever A is, so runs
    that differ only in train.seed share states), the layer and the lines the head reads, the
    prompts in order, the padding and batch size (left padding moves float sums a little), the
    dtype and device, and the torch and transformers versions. `weights`: `weights_digest` of the
    same model, scorer, pad_id and batch_size, computed once by the caller."""
    digest = (weights or weights_digest(model, scorer, pad_id, batch_size)).copy()
    for row in rows:
        digest.update(np.asarray(prompt_ids(row), dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def _load_stored(path: Path, key: str, rows: Sequence[dict]) -> CachedStates | None:
    """The states saved under `path` if they are whole and for `key`, else None (and a warning for
    a file that is there but unreadable or not what its name says)."""
    if not path.is_file():
        return None
    c = len(rows[0]["candidate_ratings"]) if rows else 0
    try:
        saved = torch.load(path, weights_only=True)
        ok = (saved["key"] == key and len(saved["candidates"]) == len(rows)
              and all(t.shape[0] == c for t in saved["candidates"])
              and (saved["history"] is None or len(saved["history"]) == len(saved["lines"]) == len(rows)))
        why = "its content does not match its key"
    except Exception as e:  # a torn or foreign file: read the states again
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        log.warning("the stored frozen states %s are unusable (%s): reading them again", path, why)
        return None
    try:  # the file's time is its last use: `alro cache --clear-states --older-than` keeps what is used
        os.utime(path)
    except OSError:  # a read-only cache
        pass
    return CachedStates(rows, saved["candidates"], saved["history"], saved["lines"])


def _store(path: Path, key: str, states: CachedStates) -> None:
    """Write atomically: a reader (another worker, a concurrent Tune trial) sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "candidates": states.candidates, "history": states.history, "lines": states.lines}, tmp)
    os.replace(tmp, path)


def read_states(model, rank_tok, rows: Sequence[dict], pad_id: int, rank: int, say: Callable[[str], None],
                split: str, store: Path | None = None, every_s: float = 30.0, scorer=None,
                weights=None) -> CachedStates:
    """`CachedStates.extract` with the head registered on `model` (or `scorer`, a loaded ranker's);
    rank 0 says how far it got. With `store` (train.reuse_frozen_states: a directory under the
    model cache), states read before from the same weights, layer and prompts (`states_key`;
    `weights`: its `weights_digest`) are loaded from there instead, and states read now are saved
    there. A process that finds another one reading the same states (a concurrent Tune trial)
    waits for its file instead of reading them a second time."""
    scorer = scorer or scorer_of(model, rank_tok)
    if store is None:
        return _extract(model, scorer, rows, pad_id, rank, say, split, every_s)
    key = states_key(model, scorer, rows, pad_id, READ_BATCH, weights)
    path = Path(store) / f"{key}.pt"
    seen = _mtime(path)
    states = _load_stored(path, key, rows)
    if states is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if rank == 0:
                    say(f"waiting for another process reading the same {split} states into {path}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _mtime(path) != seen:  # written while we waited
                states = _load_stored(path, key, rows)
            if states is None:
                states = _extract(model, scorer, rows, pad_id, rank, say, split, every_s)
                _store(path, key, states)
                return states
    if rank == 0:
        say(f"read the {split} states of {len(rows)} prompts back from {path} (rank 0)")
    return states


def read_permuted(model, rank_tok, states: CachedStates, epochs: int, pad_id: int, rank: int,
                  say: Callable[[str], None], split: str, store: Path | None = None) -> None:
    """Add to `states` the candidate states of the rows' stored permutations that `epochs` epochs
    use (epoch e reads permutation e mod K): one `read_states` per permutation, stored and read
    back under their own prompts' key."""
    stored = min((len(r["perm_orders"]) for r in states.rows), default=0)
    permutations = max(1, min(stored, epochs))  # none stored: permuted_rows says what to set
    for k in range(permutations):
        read = read_states(model, rank_tok, permuted_rows(states.rows, k), pad_id, rank, say,
                           f"{split} permutation {k + 1}/{permutations}", store)
        states.permuted.append(read.candidates)


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _extract(model, scorer, rows: Sequence[dict], pad_id: int, rank: int, say: Callable[[str], None], split: str,
             every_s: float) -> CachedStates:
    t0, last = time.time(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.time()
        if rank == 0 and (done == total or now - last[0] >= every_s):
            last[0] = now
            say(f"caching the {split} states: {done}/{total} prompts read by the frozen model on rank 0 "
                f"({now - t0:.0f} s)")
    return CachedStates.extract(model, scorer, rows, pad_id, READ_BATCH, progress=progress)
