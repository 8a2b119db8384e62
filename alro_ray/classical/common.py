"""What every baseline shares: the protocol, and reading candidates and fit interactions."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import pandas as pd


class Baseline(Protocol):
    name: str

    def fit(self, interactions: pd.DataFrame) -> "Baseline": ...

    def score(self, row: dict) -> np.ndarray: ...


def candidate_ids(row) -> list[str]:
    return [str(x) for x in row["candidate_ids"]]


def lookup(table: dict, keys: Sequence[str], default: float) -> np.ndarray:
    return np.array([table.get(k, default) for k in keys], dtype=np.float64)


def sorted_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Ids as strings (prepared rows hold strings), each user's interactions in time order
    (ties: item id, as `prepare` orders them)."""
    df = interactions[["user", "item", "rating", "timestamp"]].copy()
    df["user"] = df["user"].astype(str)
    df["item"] = df["item"].astype(str)
    return df.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
