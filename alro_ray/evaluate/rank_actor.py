"""The ranker actor of `alro evaluate` (evaluate/batch_eval.py): one loaded ranker per Ray Data
actor, ranking each batch of prepared rows in every requested mode.

A module of its own so that an actor's new process imports what ranking needs and nothing of
the driver's side (baselines, fusion, reports, plots): those imports were seconds of every
evaluation's fixed cost (docs/benchmarks.md, peers).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from alro_ray.data.dataset import load_renderer, read_split
from alro_ray.data.samples import stable_hash
from alro_ray.errors import AlroError, NonFiniteError
from alro_ray.evaluate.stability import reorders_for
from alro_ray.evaluate.stored_states import StoredScores, store_for
from alro_ray.rank.evaluation import prompt_ids, targets_of, with_users
from alro_ray.rank.metrics import item_ranks
from alro_ray.rank.modes import parse_mode
from alro_ray.rank.ranker import load_ranker
from alro_ray.rank.ranking import bootstrap_orders, free_batch

log = logging.getLogger("alro_ray")


class RankActor:
    """One loaded ranker; ranks each batch in every requested mode."""

    def __init__(self, checkpoint: str, data_dir: str, modes: list[str], seed: int, use_gpu: bool,
                 few_shot: int = 0, reorders: int = 0, split: str = "test", reuse_states: bool = False):
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.ranker = load_ranker(checkpoint, device=device,
                                  dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        self.renderer = load_renderer(data_dir)
        self.modes = modes
        self.seed = seed
        self.demos = few_shot_prefix(self.ranker, data_dir, few_shot, seed)
        self.reorders, self.split = reorders, split  # the scored split's lists are reordered, not valid's
        store = store_for(self.ranker) if reuse_states and "score" in modes else None
        if reuse_states and "score" in modes and store is None:
            log.warning("%s: --reuse-states applies to frozen-LM score heads; ranking with the LM", checkpoint)
        self.stored = StoredScores(self.ranker, store) if store is not None else None

    def _rank(self, mode: str, rows: list[dict], shown: list[list[int]] | None = None
              ) -> tuple[list[list[int]], list[bool], list | None]:
        """Orders, repair flags, and per-candidate scores where the mode has them (else None), by the
        rows' own candidate positions. shown[i]: row i's candidates re-rendered in that order
        (shown[i][j] = the candidate at prompt position j; orders only, no scores); None: the
        prompts as prepared."""
        r = self.ranker
        c = r.candidates
        kind, p = parse_mode(mode)
        pad = r.tokenizer.pad_token_id

        def render(i: int, perm) -> list[int]:
            """Row i's prompt showing at position j the candidate at position perm[j] of its shown order."""
            own = perm if shown is None else [shown[i][j] for j in perm]
            ids, _ = r.rank_tokenizer.prompt_ids(self.renderer.prefix(rows[i]), self.renderer.suffix(rows[i], own))
            return self.demos + ids
        repaired, scores = [False] * len(rows), None
        if kind == "bootstrap":
            # Seeded by user, so a row gets the same copies whatever batch it lands in.
            seeds = [self.seed + stable_hash(str(row["user"])) for row in rows]
            orders = bootstrap_orders(r.model, render, seeds, c, p, pad, r.rank_tokenizer.identifier_ids)
        else:
            prompts = [self.demos + prompt_ids(row) if shown is None else render(i, range(len(shown[i])))
                       for i, row in enumerate(rows)]
            if kind == "free":
                orders, repaired = free_batch(r.model, prompts, c, pad, r.tokenizer.eos_token_id, r.tokenizer)
            elif kind == "score" and self.stored is not None:
                orders, scores = self.stored.rank(prompts, c)
            else:
                orders, scores = r.rank(prompts, kind)
        if shown is None:
            return orders, repaired, scores
        return [[order[j] for j in o] for order, o in zip(shown, orders)], repaired, None  # shown -> own positions

    def _reordered(self, mode: str, rows: list[dict]) -> list[list[list[int]] | None]:
        """Per row of the scored split, its orders under its p reorders (by its own candidate
        positions); None for the other rows and without --reorders."""
        keep = [i for i, row in enumerate(rows) if self.reorders and row["split"] == self.split]
        out: list[list[list[int]] | None] = [None] * len(rows)
        if not keep:
            return out
        picked = [rows[i] for i in keep]
        shown = [reorders_for(str(row["user"]), len(row["candidate_ids"]), self.reorders, self.seed)
                 for row in picked]
        by_reorder = [self._rank(mode, picked, [s[r] for s in shown])[0] for r in range(self.reorders)]
        for k, i in enumerate(keep):
            out[i] = [orders[k] for orders in by_reorder]
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        out = []
        for mode in self.modes:
            t0 = time.perf_counter()
            try:
                orders, repaired, scores = self._rank(mode, rows)
                per_query = (time.perf_counter() - t0) / max(1, len(rows))  # the original order's cost only
                again = self._reordered(mode, rows)
            except NonFiniteError as e:  # stops the job: no metric may come from these scores
                raise with_users(e, rows) from None
            for k, (row, order, fixed) in enumerate(zip(rows, orders, repaired)):
                ids, ratings = list(row["candidate_ids"]), list(row["candidate_ratings"])
                rank_of_position = np.asarray(item_ranks(order))
                reordered = {} if not self.reorders else {  # evaluate/stability.py; None: not reordered
                    "reorder_ranks": again[k] and [item_ranks(o) for o in again[k]],
                    "reorder_ratings": again[k] and [[float(ratings[j]) for j in o] for o in again[k]]}
                out.append({
                    "user": row["user"], "split": row["split"], "mode": mode,
                    # per prompt position, higher = better (fusion reads them); order-only modes: -rank
                    "scores": [float(x) for x in (scores[k] if scores is not None else -rank_of_position)],
                    "predicted_ids": [ids[j] for j in order],
                    "predicted_ratings": [float(ratings[j]) for j in order],
                    "target_ratings": targets_of(row),  # what the list is scored against
                    "rank_of_position": rank_of_position.tolist(),
                    "repaired": bool(fixed), "seconds": per_query, **reordered,
                })
        return pd.DataFrame(out)


def few_shot_prefix(ranker, data_dir: str, k: int, seed: int) -> list[int]:
    """Token ids of k seeded training samples (prompt and gold response), blank-line separated,
    to put before every query for few-shot ranking; [] for k = 0."""
    if k <= 0:
        return []

    train = read_split(data_dir, "train")
    if len(train) < k:
        raise AlroError(f"{data_dir} has {len(train)} training rows, fewer than few_shot={k}")
    picks = np.random.default_rng(seed).choice(len(train), size=k, replace=False)
    gap = ranker.tokenizer.encode("\n\n", add_special_tokens=False)
    ids: list[int] = []
    for i in picks:
        ids += [int(x) for x in train.iloc[int(i)]["input_ids"][:-1]] + gap  # without its eos
    return ids
