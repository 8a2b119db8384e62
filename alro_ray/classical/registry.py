"""The baselines by name, and their scores as orders of prompt positions."""


from __future__ import annotations

import numpy as np

from alro_ray.classical.common import Baseline
from alro_ray.classical.learned import GRU4RecBaseline, MFBaseline, SASRecBaseline
from alro_ray.classical.neighbours import ItemKNNBaseline
from alro_ray.classical.simple import (
    ItemMeanBaseline,
    PopularityBaseline,
    RandomBaseline,
    RetrieverOrderBaseline,
)

BASELINES: dict[str, type] = {
    "random": RandomBaseline,
    "popularity": PopularityBaseline,
    "item-mean": ItemMeanBaseline,
    "mf": MFBaseline,
    "gru4rec": GRU4RecBaseline,
    "sasrec": SASRecBaseline,
    "item-knn": ItemKNNBaseline,
    "retriever": RetrieverOrderBaseline,  # top-N protocol only
}


def check_names(names) -> None:
    """Refuse an unknown baseline name before anything is fitted."""
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def make_baseline(name: str, seed: int = 0, **kw) -> Baseline:
    """A fresh, unfitted baseline; kw go to its constructor (e.g. k for item-mean, epochs)."""
    check_names([name])
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
