"""RecRanker-style prompt hints (`data.hints`): a few numbers from classical models, shown on each
candidate line, e.g. `(A) title: X genres: Y mean rating: 4.1 (52 ratings) popularity rank: 17`.

  item_mean        the item-mean baseline's shrunk mean rating, with the item's rating count
  popularity_rank  1 = the item with the most interactions (ties share the better rank)
  mf_score         the MF baseline's predicted rating for this user: item factors and biases from
                   the fit, the user's factors and bias solved from the row's shown history (ridge,
                   the fit's L2), so training, evaluation and Serve compute it the same way

Fitted once, by the baselines' own `fit` (one implementation of each), on `hint_interactions`:
fit_interactions.parquet minus every sample's candidate window. Held-out users' windows are not
in fit_interactions anyway; removing the training rows' windows as well means no row, of any
split, is shown a hint that saw its own target ratings (an item's mean would otherwise include
this user's rating of it, and MF would have fitted it). The fitted values are saved as
hints.parquet (item -> values; MF's global mean and L2 in its metadata) and copied into the ranker
checkpoint, so Serve computes the same hints for known items; an item absent from the fit shows
"none". History lines carry the user's own ratings and stay as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alro_ray.config import HINTS
from alro_ray.errors import ConfigError, DataError

# The per-candidate values a hint line is made of (also what a Serve request may pass).
VALUE_KEYS = ("mean_rating", "ratings", "popularity_rank", "mf_score")
FILE = "hints.parquet"


def check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in HINTS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"data.hints must be distinct names from {list(HINTS)}, got {names}")
    return names


def hint_interactions(fit: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """`fit` (user, item, rating, timestamp) without any (user, item) shown as a candidate in
    `windows` (columns user, candidate_ids: one row per sample, every split)."""
    shown = windows[["user", "candidate_ids"]].explode("candidate_ids").dropna()
    keys = pd.MultiIndex.from_arrays([shown["user"].astype(str), shown["candidate_ids"].astype(str)])
    mine = pd.MultiIndex.from_arrays([fit["user"].astype(str), fit["item"].astype(str)])
    return fit[~mine.isin(keys)].reset_index(drop=True)


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def render_hint(values: dict | None, names: Sequence[str]) -> str:
    """The hint text of one candidate; a missing value (an item the fit never saw) shows "none"."""
    v = values or {}
    parts = []
    for name in names:
        if name == "item_mean":
            mean, n = v.get("mean_rating"), v.get("ratings")
            text = "none" if mean is None else _fmt(mean)
            if mean is not None and n is not None:
                text += f" ({int(n)} rating{'' if int(n) == 1 else 's'})"
            parts.append(f"mean rating: {text}")
        elif name == "popularity_rank":
            r = v.get("popularity_rank")
            parts.append(f"popularity rank: {'none' if r is None else int(r)}")
        elif name == "mf_score":
            s = v.get("mf_score")
            parts.append(f"predicted rating: {'none' if s is None else _fmt(s)}")
    return " ".join(parts)


@dataclass
class HintModel:
    """Fitted hint values per item id (strings), and MF's globals for the per-user score."""

    names: list[str]
    items: list[str]
    mean_rating: np.ndarray  # [n] shrunk mean
    ratings: np.ndarray  # [n] interactions in the fit
    popularity_rank: np.ndarray  # [n]
    mf_bias: np.ndarray  # [n]; zeros without mf_score
    mf_factors: np.ndarray  # [n, d]; d = 0 without mf_score
    mf_mu: float = 0.0
    mf_reg: float = 0.0

    def __post_init__(self):
        self.index = {k: i for i, k in enumerate(self.items)}

    # -- values ---------------------------------------------------------------------------------

    def _user(self, history_items: Sequence, history_ratings: Sequence) -> tuple[np.ndarray, float]:
        """MF user factors and bias from the shown history: ridge on r - mu - b_i = b_u + q_i . p
        with the fit's L2 per rating (the fit's loss summed over the n ratings); zero if none known."""
        d = self.mf_factors.shape[1]
        known = [(self.index[str(i)], float(r)) for i, r in zip(history_items, history_ratings)
                 if str(i) in self.index and r is not None]
        if not known:
            return np.zeros(d), 0.0
        idx = np.array([k for k, _ in known])
        x = np.hstack([self.mf_factors[idx], np.ones((len(idx), 1))])
        y = np.array([r for _, r in known]) - self.mf_mu - self.mf_bias[idx]
        w = np.linalg.solve(x.T @ x + self.mf_reg * len(idx) * np.eye(d + 1), x.T @ y)
        return w[:d], float(w[d])

    def values(self, candidate_ids: Sequence, history_items: Sequence = (),
               history_ratings: Sequence = ()) -> list[dict | None]:
        """Per candidate: {mean_rating, ratings, popularity_rank, mf_score} or None (unknown item)."""
        p, bu = self._user(history_items, history_ratings) if "mf_score" in self.names else (None, 0.0)
        out: list[dict | None] = []
        for c in candidate_ids:
            i = self.index.get(str(c))
            if i is None:
                out.append(None)
                continue
            v = {"mean_rating": float(self.mean_rating[i]), "ratings": int(self.ratings[i]),
                 "popularity_rank": int(self.popularity_rank[i])}
            if p is not None:
                v["mf_score"] = float(self.mf_mu + bu + self.mf_bias[i] + self.mf_factors[i] @ p)
            out.append(v)
        return out

    def notes(self, row: dict) -> list[str]:
        """Hint text per candidate of a prepared row, in prompt order (what `SampleRenderer` shows)."""
        vals = self.values(row["candidate_ids"], row["history_items"], row["history_ratings"])
        return [render_hint(v, self.names) for v in vals]

    # -- disk -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        table = pa.table({
            "item": self.items, "mean_rating": self.mean_rating, "ratings": self.ratings,
            "popularity_rank": self.popularity_rank, "mf_bias": self.mf_bias,
            "mf_factors": pa.array([row.tolist() for row in self.mf_factors], type=pa.list_(pa.float64())),
        })
        meta = {"names": self.names, "mf_mu": self.mf_mu, "mf_reg": self.mf_reg,
                "mf_dim": int(self.mf_factors.shape[1])}
        pq.write_table(table.replace_schema_metadata({"alro_hints": json.dumps(meta)}), path)

    @classmethod
    def load(cls, path: str | Path) -> "HintModel":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} is missing: the data was prepared with hints, re-run `alro prepare`")
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"alro_hints", b"{}"))
        if "names" not in meta:
            raise DataError(f"{path} is not a hints file written by `alro prepare`")
        t = table.to_pydict()
        factors = np.array(t["mf_factors"], dtype=np.float64).reshape(len(t["item"]), meta["mf_dim"])
        return cls(meta["names"], [str(i) for i in t["item"]], np.array(t["mean_rating"], dtype=np.float64),
                   np.array(t["ratings"], dtype=np.int64), np.array(t["popularity_rank"], dtype=np.int64),
                   np.array(t["mf_bias"], dtype=np.float64), factors, float(meta["mf_mu"]), float(meta["mf_reg"]))


def fit_hints(interactions: pd.DataFrame, names: Sequence[str], seed: int = 0) -> HintModel:
    """Fit the hints on `interactions` (see `hint_interactions`) with the baselines' own fits."""
    # Lazy: rank.baselines loads torch (its learned models); readers of a fitted HintModel need neither.
    from alro_ray.rank.baselines.learned import MFBaseline
    from alro_ray.rank.baselines.simple import ItemMeanBaseline, PopularityBaseline

    names = check_names(names)
    if interactions.empty:
        raise DataError("no interactions left to fit data.hints on")
    means = ItemMeanBaseline(seed).fit(interactions).means
    counts = PopularityBaseline(seed).fit(interactions).counts
    items = sorted(counts)
    n = np.array([counts[i] for i in items], dtype=np.int64)
    # Competition ranking: 1 + the number of items with strictly more interactions.
    rank = 1 + np.searchsorted(np.sort(-n), -n, side="left")
    bias, factors, mu, reg = np.zeros(len(items)), np.zeros((len(items), 0)), 0.0, 0.0
    if "mf_score" in names:
        mf = MFBaseline(seed).fit(interactions)
        at = mf.items.encode(items)  # every item of the fit has an MF row
        bias = mf.bi.weight.detach()[at, 0].double().numpy()
        factors = mf.Q.weight.detach()[at].double().numpy()
        mu, reg = mf.mu, mf.reg
    return HintModel(names, items, np.array([means[i] for i in items]), n, rank.astype(np.int64),
                     bias, factors, float(mu), float(reg))
