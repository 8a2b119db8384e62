"""RecRanker-style prompt hints (`data.hints`): a few numbers from classical models, shown on each
candidate line, e.g. `(A) title: X genres: Y mean rating: 4.1 (52 ratings) popularity rank: 17`.

  item_mean        the item-mean baseline's shrunk mean rating, with the item's rating count
  popularity_rank  1 = the item with the most interactions (ties share the better rank)
  mf_score         the MF baseline's predicted rating for this user: item factors and biases from
                   the fit, the user's factors and bias solved from the user's rated items (ridge,
                   the fit's L2)
  mf_rank          the candidate's place in its own list by that predicted rating (1 = highest):
                   one small integer at the line's end, which a head reads more easily than a
                   decimal (docs/method.md)
  knn_score        the item-knn baseline's score: the candidate's mean cosine similarity to the
                   user's 5 latest rated items (classical/neighbours.py)
  knn_rank         the candidate's place in its own list by that score (1 = most similar)
  retriever_score  the top-N protocol's retriever score of the candidate (data/retrieval.py), from
                   the prepared row (`retriever_scores`), as the retriever that chose the list gave it
  retriever_rank   the candidate's place in the retriever's own order (1 = its best)

Cross-fitted, like a stacked ensemble, by the baselines' own `fit` (one implementation of each):
  - held-out rows (valid, test) and Serve: the fit on all of fit_interactions.parquet, which never
    holds a held-out candidate window; saved as hints.parquet and copied into the ranker;
  - training rows: the training users dealt into `data.hint_folds` folds; a row is shown the fit
    without its own fold's candidate windows (`hint_interactions`), saved as
    hints_train-<fold>.parquet, so no training row is shown a hint that saw its own targets (an
    item's mean would include this user's rating of it, MF would have fitted it) and the model
    does not learn to trust the hints more than held-out rows allow. One fold leaves every
    training window out of the one fit; more folds leave out less, so the training rows' hints
    come nearer the held-out rows' in strength (docs/method.md).
In prepared rows MF's user part comes from every rating the row's fit holds for the user (for a
held-out user: all ratings before the window), as the `mf` baseline's does; Serve solves it from
the request's rated history items that have ids. The rendered notes are stored with each row
(`candidate_notes`), so evaluation re-renders what training saw. An item absent from the fit
shows "none". History lines carry the user's own ratings and stay as they are.
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

from alro_ray.classical.neighbours import ItemKNNBaseline
from alro_ray.classical.simple import ItemMeanBaseline, PopularityBaseline
from alro_ray.config import HINTS, RETRIEVER_HINTS
from alro_ray.errors import ConfigError, DataError

# The per-candidate values a hint line is made of (also what a Serve request may pass).
VALUE_KEYS = ("mean_rating", "ratings", "popularity_rank", "mf_score", "knn_score", "retriever_score")
FILE = "hints.parquet"  # the held-out fit (evaluation, Serve, the ranker checkpoint)
TRAIN_FILE = "hints_train-{}.parquet"  # the fits training rows were shown, one per fold
MF_HINTS = ("mf_score", "mf_rank")


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


# hint -> (its label on the candidate line, how its value is written); item_mean has two values
SHOWN = {"popularity_rank": ("popularity rank", int), "mf_score": ("predicted rating", _fmt),
         "mf_rank": ("MF rank", int), "knn_score": ("similarity to recent", lambda x: f"{x:.2f}"),
         "knn_rank": ("similarity rank", int), "retriever_score": ("retriever score", lambda x: f"{x:.3g}"),
         "retriever_rank": ("retriever rank", int)}


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
        elif name in SHOWN:
            label, shown = SHOWN[name]
            x = v.get(name)
            parts.append(f"{label}: {'none' if x is None else shown(x)}")
    return " ".join(parts)


def render_hints(values: Sequence[dict | None], names: Sequence[str]) -> list[str]:
    """The hint text of each candidate of one list; mf_rank (retriever_rank) places the candidates
    that have an mf_score (retriever_score) by it (1 = highest, ties by list order), the others
    show "none"."""
    values = [dict(v) if v else {} for v in values]
    for rank, score in (("mf_rank", "mf_score"), ("knn_rank", "knn_score"), ("retriever_rank", "retriever_score")):
        if rank in names:
            scored = [j for j, v in enumerate(values) if v.get(score) is not None]
            for place, j in enumerate(sorted(scored, key=lambda j: -values[j][score]), start=1):
                values[j][rank] = place
    return [render_hint(v, names) for v in values]


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
    knn: ItemKNNBaseline | None = None  # with knn_score / knn_rank

    def __post_init__(self):
        self.index = {k: i for i, k in enumerate(self.items)}

    # -- values ---------------------------------------------------------------------------------

    def _user(self, history_items: Sequence, history_ratings: Sequence) -> tuple[np.ndarray, float]:
        """MF user factors and bias from rated items: ridge on r - mu - b_i = b_u + q_i . p
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
               history_ratings: Sequence = (), recent: Sequence | None = None) -> list[dict | None]:
        """Per candidate: {mean_rating, ratings, popularity_rank, mf_score, knn_score} or None
        (unknown item). MF's user part from the rated history; knn_score from `recent` (the
        items in time order, the latest last; default: the history)."""
        uses_mf = any(n in MF_HINTS for n in self.names)
        p, bu = self._user(history_items, history_ratings) if uses_mf else (None, 0.0)
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
        if self.knn is not None:
            similar = self.knn.similarity(candidate_ids, history_items if recent is None else recent)
            out = [None if v is None else {**v, "knn_score": float(s)} for v, s in zip(out, similar)]
        return out

    def notes(self, row: dict, rated: tuple[Sequence, Sequence] | None = None) -> list[str]:
        """Hint text per candidate of a row, in its candidate order; MF's user part from `rated`
        (items, ratings), else from the row's shown history."""
        items, ratings = rated or (row["history_items"], row["history_ratings"])
        values = self.values(row["candidate_ids"], items, ratings, recent=row["history_items"])
        retrieved = row.get("retriever_scores")
        if retrieved is not None and len(retrieved) and set(self.names) & set(RETRIEVER_HINTS):
            values = [{**(v or {}), "retriever_score": float(s)} for v, s in zip(values, retrieved)]
        return render_hints(values, self.names)

    # -- disk -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        table = pa.table({
            "item": self.items, "mean_rating": self.mean_rating, "ratings": self.ratings,
            "popularity_rank": self.popularity_rank, "mf_bias": self.mf_bias,
            "mf_factors": pa.array([row.tolist() for row in self.mf_factors], type=pa.list_(pa.float64())),
        })
        meta = {"names": self.names, "mf_mu": self.mf_mu, "mf_reg": self.mf_reg,
                "mf_dim": int(self.mf_factors.shape[1])}
        if self.knn is not None:  # each item's users in the fit (user indices): the neighbours' data
            users, items = self.knn.pairs()
            order = np.argsort(items, kind="stable")
            bounds = np.searchsorted(items[order], np.arange(len(self.items) + 1))
            table = table.append_column("knn_users", pa.array(
                [users[order[a:b]].tolist() for a, b in zip(bounds[:-1], bounds[1:])], type=pa.list_(pa.int64())))
            meta["knn_recent"] = self.knn.recent
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
        knn = None
        if "knn_users" in t:
            users = [np.asarray(u, dtype=np.int64) for u in t["knn_users"]]
            items = np.repeat(np.arange(len(users)), [len(u) for u in users])
            knn = ItemKNNBaseline(recent=meta["knn_recent"]).from_users(
                np.concatenate(users) if users else np.zeros(0, np.int64), items, [str(i) for i in t["item"]])
        return cls(meta["names"], [str(i) for i in t["item"]], np.array(t["mean_rating"], dtype=np.float64),
                   np.array(t["ratings"], dtype=np.int64), np.array(t["popularity_rank"], dtype=np.int64),
                   np.array(t["mf_bias"], dtype=np.float64), factors, float(meta["mf_mu"]), float(meta["mf_reg"]), knn)


def fit_hints(interactions: pd.DataFrame, names: Sequence[str], seed: int = 0) -> HintModel:
    """Fit the hints on `interactions` with the baselines' own fits."""
    from alro_ray.classical.learned import MFBaseline  # imports torch: readers of a fitted HintModel need none

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
    if any(n in MF_HINTS for n in names):
        mf = MFBaseline(seed).fit(interactions)
        at = mf.items.encode(items)  # every item of the fit has an MF row
        bias = mf.bi.weight.detach()[at, 0].double().numpy()
        factors = mf.Q.weight.detach()[at].double().numpy()
        mu, reg = mf.mu, mf.reg
    knn = None
    if {"knn_score", "knn_rank"} & set(names):  # on the hint model's own catalogue, so the users file lines up
        users = interactions["user"].astype(str)
        knn = ItemKNNBaseline(seed).from_users(users.map({u: i for i, u in enumerate(sorted(users.unique()))}).to_numpy(),
                                               interactions["item"].astype(str).map({i: j for j, i in enumerate(items)})
                                               .to_numpy(), items)
    return HintModel(names, items, np.array([means[i] for i in items]), n, rank.astype(np.int64),
                     bias, factors, float(mu), float(reg), knn)


def train_folds(users: Sequence, folds: int, seed: int = 0) -> dict[str, int]:
    """Training user -> fold 0..folds-1: the sorted users in a seeded shuffle, dealt in turn (fold
    sizes differ by at most one)."""
    users = sorted({str(u) for u in users})
    order = np.random.default_rng(seed).permutation(len(users))
    return {users[i]: n % folds for n, i in enumerate(order)}


def cross_fit(fit: pd.DataFrame, train_windows: pd.DataFrame, names: Sequence[str], folds: int = 1,
              seed: int = 0) -> "RowHints":
    """The hints every prepared row is shown (module docstring): the held-out fit on all of `fit`;
    per fold of training users, a fit on `fit` without that fold's `train_windows` (columns user,
    candidate_ids)."""
    fold_of = train_folds(train_windows["user"], folds, seed)
    fold = train_windows["user"].astype(str).map(fold_of)
    fits = [hint_interactions(fit, train_windows[fold == k]) for k in range(folds)]
    return RowHints(fit_hints(fit, names, seed), fit, [fit_hints(f, names, seed) for f in fits], fits, fold_of)


class RowHints:
    """What `alro prepare` shows each row: the held-out fit to valid and test rows, its own fold's
    fit to a training row; MF's user part from every rating of the user in that fit."""

    def __init__(self, held_out: HintModel, held_out_fit: pd.DataFrame, train: Sequence[HintModel],
                 train_fits: Sequence[pd.DataFrame], fold_of: dict[str, int]):
        self.held_out, self.train, self.fold_of = held_out, list(train), fold_of
        self.held_out_rated = _rated_by_user(held_out_fit)
        self.train_rated = [_rated_by_user(f) for f in train_fits]
        self.fit_sizes = [len(f) for f in train_fits]

    def notes(self, row: dict) -> list[str]:
        user = str(row["user"])
        if row["split"] != "train":
            return self.held_out.notes(row, self.held_out_rated.get(user))
        k = self.fold_of[user]  # every training user has a fold: a KeyError here is a bug
        return self.train[k].notes(row, self.train_rated[k].get(user))

    def save(self, out: Path) -> None:
        self.held_out.save(out / FILE)
        for k, model in enumerate(self.train):
            model.save(out / TRAIN_FILE.format(k))


def _rated_by_user(fit: pd.DataFrame) -> dict[str, tuple[list, list]]:
    return {str(u): (g["item"].astype(str).tolist(), g["rating"].astype(float).tolist())
            for u, g in fit.groupby("user", sort=False)}
