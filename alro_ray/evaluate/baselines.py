"""The classical baselines (alro_ray/classical/) fitted and run on a prepared split: the rows of
the ranking table beside the LLM's.

Every baseline is fitted on `fit_interactions.parquet` (columns user, item, rating, timestamp),
which `alro prepare` writes without any valid/test candidate window, and then orders each
prepared row's candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from alro_ray.classical.registry import BASELINES, baseline_orders, check_names, make_baseline
from alro_ray.data.dataset import read_split
from alro_ray.rank.evaluation import summary, targets_of

ROW_COLUMNS = ["user", "window", "history_items", "history_ratings", "candidate_ids", "candidate_ratings",
               "target_ratings", "retriever_scores"]


@dataclass
class BaselineRun:
    """One baseline fitted and run on a split's rows."""

    rows: list[dict]  # the rows ranked (ROW_COLUMNS)
    orders: list[list[int]]  # per row, candidate prompt positions best first
    fit_seconds: float
    tpq_seconds: float  # scoring + sorting per row


def run_baselines(data_dir, names: Sequence[str] = tuple(BASELINES), split: str = "test", seed: int = 0,
                  options: dict[str, dict] | None = None, users: set | None = None) -> dict[str, BaselineRun]:
    """Fit each baseline on DIR/fit_interactions.parquet and order DIR/<split>'s lists (only
    `users`' rows when given: the lists a ranker was scored on). options: {name: {constructor
    options}}. On split "train" the fitted baselines have seen the candidates' ratings: only
    valid/test numbers are fair."""
    check_names(names)  # fail before any fitting
    import torch._dynamo  # noqa: F401  torch imports its compiler lazily at the first optimizer
    # step (seconds): done here, so that cost is not charged to the first learned model's fit time.

    fit = pd.read_parquet(Path(data_dir) / "fit_interactions.parquet")
    frame = read_split(data_dir, split)
    rows = frame[[c for c in ROW_COLUMNS if c in frame.columns]].to_dict("records")
    if users is not None:
        rows = [r for r in rows if r["user"] in users]
    out: dict[str, BaselineRun] = {}
    for name in names:
        t0 = time.perf_counter()
        model = make_baseline(name, seed=seed, **(options or {}).get(name, {})).fit(fit)
        t1 = time.perf_counter()
        orders = baseline_orders(model, rows)
        out[name] = BaselineRun(rows, orders, t1 - t0, (time.perf_counter() - t1) / max(len(rows), 1))
    return out


def evaluate_baselines(data_dir, names: Sequence[str] = tuple(BASELINES), split: str = "test",
                       seed: int = 0, options: dict[str, dict] | None = None, users: set | None = None,
                       protocol: str = "rated") -> dict[str, dict]:
    """`run_baselines`, scored: {name: {"ndcg@k": ... (and the top-N protocol's metrics),
    "fit_seconds", "tpq_seconds", "lists" (rows with defined metrics)}}."""
    out: dict[str, dict] = {}
    for name, run in run_baselines(data_dir, names, split, seed, options, users).items():
        rel = [[float(r["candidate_ratings"][j]) for j in o] for r, o in zip(run.rows, run.orders)]
        m = summary(rel, [targets_of(r) for r in run.rows], protocol)
        out[name] = {**m, "fit_seconds": run.fit_seconds, "tpq_seconds": run.tpq_seconds}
    return out
