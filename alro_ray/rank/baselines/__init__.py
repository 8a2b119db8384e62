"""Classical baselines for the ranking table (spec §6): random, popularity, item mean rating,
biased matrix factorization, GRU4Rec and SASRec.

Every baseline is fitted on `fit_interactions.parquet` (columns user, item, rating, timestamp),
which `alro prepare` writes without any valid/test candidate window, and then scores one prepared
row's candidates (higher = better). `baseline_orders` turns scores into orders of prompt positions, best
first; ties keep prompt-position order (a stable sort), so every order is deterministic.

The three learned models are small torch (CPU) re-implementations, not RecBole: RecBole 1.2.1 (its
latest release) stops in `Config()` under numpy 2 (`np.float_`), its pinned ray 2.6.3 needs the
removed `pkg_resources`, and under pandas 3 its in-place `fillna` calls silently do nothing. They
are seeded inside a forked torch RNG, so fitting one leaves the caller's random state alone.

GRU4Rec and SASRec are next-item models: they predict *which* item a user will interact with, not
how highly she will rate it, so on graded NDCG over a window the user did watch they need not beat
the item-mean order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from alro_ray.data.dataset import read_split
from alro_ray.rank.baselines.common import Baseline
from alro_ray.rank.baselines.learned import GRU4RecBaseline, MFBaseline, SASRecBaseline
from alro_ray.rank.baselines.simple import ItemMeanBaseline, PopularityBaseline, RandomBaseline
from alro_ray.rank.metrics import KS, mean_ndcg

BASELINES: dict[str, type] = {
    "random": RandomBaseline,
    "popularity": PopularityBaseline,
    "item-mean": ItemMeanBaseline,
    "mf": MFBaseline,
    "gru4rec": GRU4RecBaseline,
    "sasrec": SASRecBaseline,
}


def make_baseline(name: str, seed: int = 0, **kw) -> Baseline:
    """A fresh, unfitted baseline; kw go to its constructor (e.g. k for item-mean, epochs)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](seed=seed, **kw)


def _rows(rows) -> list:
    return rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)


def order_from_scores(scores) -> list[int]:
    """Prompt positions by score, highest first; equal scores keep prompt order."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("baseline scores must be finite")
    return np.argsort(-s, kind="stable").tolist()


def baseline_orders(baseline: Baseline, rows) -> list[list[int]]:
    """Orders (candidate prompt positions, best first) of prepared rows (DataFrame or dicts)."""
    return [order_from_scores(baseline.score(r)) for r in _rows(rows)]


ROW_COLUMNS = ["user", "window", "history_items", "history_ratings", "candidate_ids", "candidate_ratings"]


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
    for name in names:  # fail before any fitting
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
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
                       seed: int = 0, ks: Sequence[int] = KS,
                       options: dict[str, dict] | None = None, users: set | None = None) -> dict[str, dict]:
    """`run_baselines`, scored: {name: {"ndcg@k": ..., "fit_seconds", "tpq_seconds", "lists" (rows
    with a defined NDCG)}}."""
    out: dict[str, dict] = {}
    for name, run in run_baselines(data_dir, names, split, seed, options, users).items():
        rel = [[float(r["candidate_ratings"][j]) for j in o] for r, o in zip(run.rows, run.orders)]
        m = mean_ndcg(rel, ks=tuple(ks))
        out[name] = {**{f"ndcg@{k}": m[f"ndcg@{k}"] for k in ks},
                     "fit_seconds": run.fit_seconds, "tpq_seconds": run.tpq_seconds, "lists": m["lists"]}
    return out
