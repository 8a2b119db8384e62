"""Retrievers: score every item of the catalogue for a user's rated history, for the top-N protocol
(`data.protocol: topn`), where they choose the C candidates the ranker reorders.

  ease        EASE (Steck 2019): an item-item model in closed form, B = I - P / diag(P) with
              P = (X'X + λI)^-1 over the binary user x item matrix X; score = x_u B
  als         implicit's AlternatingLeastSquares (Hu et al. 2008) on the same binary matrix; a
              user's factors are solved from her history (`recalculate_user`), so users outside
              the fit and histories cut at any point are scored the same way
  popularity  the number of users who rated the item: the floor

Every retriever scores histories it is given (`scores`), never a user id: a window's candidates
come from the ratings before it only. `top_n` removes the history's own items and breaks ties
by item order, so candidates are deterministic. `save`/`load_retriever` keep a fitted retriever
as a directory (a ranker checkpoint carries it for Serve's /recommend).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

RETRIEVERS = ("ease", "als", "popularity")
FORMAT = "alro-retriever-v1"


@dataclass
class RetrieverSpec:
    """One retriever and its settings (a point of `data.retrieval.grid`)."""

    name: str  # one of RETRIEVERS
    reg: float = 200.0  # ease: λ; als: L2 regularisation
    factors: int = 64  # als
    iterations: int = 15  # als
    seed: int = 0

    def label(self) -> str:
        if self.name == "ease":
            return f"ease(λ={self.reg:g})"
        if self.name == "als":
            return f"als(factors={self.factors}, reg={self.reg:g})"
        return self.name


class Retriever:
    """A fitted retriever over a fixed catalogue `items` (ids as strings, in a fixed order)."""

    def __init__(self, spec: RetrieverSpec, items: Sequence[str]):
        self.spec, self.items = spec, [str(i) for i in items]
        self.index = {item: j for j, item in enumerate(self.items)}
        self.weights: dict[str, np.ndarray] = {}  # what `scores` reads: ease B, als item factors, counts

    # -- fitting --------------------------------------------------------------------------------

    def matrix(self, histories: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Binary rows x catalogue matrix of the histories (unknown items are left out)."""
        cols = [[self.index[str(i)] for i in h if str(i) in self.index] for h in histories]
        indptr = np.cumsum([0] + [len(c) for c in cols])
        indices = np.fromiter((j for c in cols for j in c), dtype=np.int64, count=int(indptr[-1]))
        x = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                          shape=(len(cols), len(self.items)))
        x.sum_duplicates()
        x.data[:] = 1.0
        return x

    def interaction_matrix(self, interactions: pd.DataFrame) -> sp.csr_matrix:
        """The binary users x catalogue matrix of (user, item) pairs, a row per user in sorted
        order: what `matrix` gives for each user's items, built from the columns at once (no
        Python list per user, so a log of millions of ratings costs arrays, not objects)."""
        rows, users = pd.factorize(interactions["user"].astype(str), sort=True)
        cols = pd.Index(self.items).get_indexer(interactions["item"].astype(str))
        known = cols >= 0
        x = sp.csr_matrix((np.ones(int(known.sum()), dtype=np.float32), (rows[known], cols[known])),
                          shape=(len(users), len(self.items)))
        x.sum_duplicates()
        x.data[:] = 1.0
        return x

    def fit(self, interactions: pd.DataFrame) -> "Retriever":
        """Fit on (user, item) pairs (columns user, item; ratings are not used: what a user chose
        to rate is the signal retrieval needs)."""
        x = self.interaction_matrix(interactions)
        kind = self.spec.name
        if kind == "popularity":
            self.weights["counts"] = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        elif kind == "ease":
            self.weights["b"] = _ease(x, self.spec.reg)
        elif kind == "als":
            self.weights["item_factors"] = _fit_als(x, self.spec)
        else:
            raise ValueError(f"unknown retriever {kind!r}; choose from {', '.join(RETRIEVERS)}")
        return self

    # -- scoring --------------------------------------------------------------------------------

    def scores(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """[len(histories), catalogue] scores, higher = better (history items not yet removed)."""
        x = self.matrix(histories)
        kind = self.spec.name
        if kind == "popularity":
            return np.tile(self.weights["counts"], (x.shape[0], 1))
        if kind == "ease":
            return np.asarray(x @ self.weights["b"], dtype=np.float64)
        y = self.weights["item_factors"]
        return _als_user_factors(x, y, self.spec) @ y.T.astype(np.float64)

    def top_n(self, histories: Sequence[Sequence[str]], n: int) -> tuple[list[list[str]], list[list[float]]]:
        """Per history: the n best items it does not hold (ids, best first) and their scores; equal
        scores keep catalogue order."""
        s = self.scores(histories)
        s[self.matrix(histories).nonzero()] = -np.inf
        ids, scores = [], []
        for row in s:
            # every item at least as good as the n-th best (a tie at the edge keeps them all), then
            # sorted by score with ties by catalogue order, cut to n, history items (-inf) dropped
            cols = np.flatnonzero(row >= np.partition(row, len(row) - n)[len(row) - n]) if n < len(row) \
                else np.arange(len(row))
            order = cols[np.lexsort((cols, -row[cols]))][:n]
            order = order[np.isfinite(row[order])]
            ids.append([self.items[j] for j in order])
            scores.append([float(row[j]) for j in order])
        return ids, scores

    # -- disk -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "weights.npz", **self.weights)
        (out / "retriever.json").write_text(json.dumps({"format": FORMAT, "spec": asdict(self.spec),
                                                         "items": self.items}))
        return out


def load_retriever(path: str | Path) -> Retriever:
    """A retriever saved by `Retriever.save`."""
    path = Path(path)
    try:
        record = json.loads((path / "retriever.json").read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
        r = Retriever(RetrieverSpec(**record["spec"]), record["items"])
        with np.load(path / "weights.npz") as w:
            r.weights = {k: w[k] for k in w.files}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} holds no saved retriever: {e}") from None
    return r


def recall_at_n(retrieved: Sequence[Sequence[str]], targets: Sequence[Sequence[str]]) -> float:
    """Mean over lists of |retrieved ∩ targets| / |targets| (lists without targets are skipped)."""
    values = [len(set(map(str, r)) & set(map(str, t))) / len(set(t)) for r, t in zip(retrieved, targets) if len(t)]
    return float(np.mean(values)) if values else 0.0


# ---------------------------------------------------------------------------------------------
# EASE in bounded memory: the item x item Gram matrix is dense (n² float64), so nothing else of
# that size is kept beside it but the inverse (numpy's inv copies its input: 3 n² float64 at the
# peak, 2.4 GB at 10,000 items), and X'X is made a block of item rows at a time (one sparse
# product of the whole log is mostly dense on a skewed catalogue: 60% at 100,000 users).

GRAM_ROWS = 500  # item rows of X'X per sparse product


def _gram(x: sp.csr_matrix) -> np.ndarray:
    """X'X as a dense float64 matrix (exact: the entries are co-occurrence counts)."""
    n = x.shape[1]
    xt = x.T.tocsr()
    gram = np.empty((n, n), dtype=np.float64)
    for start in range(0, n, GRAM_ROWS):
        gram[start:start + GRAM_ROWS] = (xt[start:start + GRAM_ROWS] @ x).toarray()
    return gram


def _ease(x: sp.csr_matrix, reg: float) -> np.ndarray:
    """B = I - P / diag(P), P = (X'X + λI)^-1, diagonal 0, as float32."""
    gram = _gram(x)
    gram[np.diag_indices_from(gram)] += reg
    p = np.linalg.inv(gram)
    del gram
    p /= -np.diag(p)  # -P_ij / P_jj, in place
    np.fill_diagonal(p, 0.0)
    return p.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ALS through implicit (a C++/Cython library; one thread per process is what it asks for).


def _als_model(spec: RetrieverSpec):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit warns that BLAS threads slow it down
    from implicit.cpu.als import AlternatingLeastSquares  # compiled; only where ALS is used

    return AlternatingLeastSquares(factors=spec.factors, regularization=spec.reg, iterations=spec.iterations,
                                   random_state=spec.seed, num_threads=1)


def _fit_als(x: sp.csr_matrix, spec: RetrieverSpec) -> np.ndarray:
    model = _als_model(spec)
    model.fit(x, show_progress=False)
    return np.asarray(model.item_factors, dtype=np.float32)


def _als_user_factors(x: sp.csr_matrix, item_factors: np.ndarray, spec: RetrieverSpec) -> np.ndarray:
    model = _als_model(spec)
    model.item_factors = np.array(item_factors)  # implicit writes to it; the object store's copy is read-only
    model.user_factors = np.zeros((1, item_factors.shape[1]), dtype=np.float32)
    model._YtY = None  # implicit caches Y'Y on the first use; a fresh model has none
    return np.asarray(model.recalculate_user(np.arange(x.shape[0]), x), dtype=np.float64)
