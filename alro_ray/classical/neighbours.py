"""Item-based nearest neighbours of what a user rated last: each candidate's mean cosine
similarity (over the users who rated them, binary) to the user's `recent` latest history items.
On ML-100K's top-N lists this alone reorders the retriever's candidates better than the
retriever (docs/method.md): what a user rated last carries the signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from alro_ray.classical.common import candidate_ids


class ItemKNNBaseline:
    name = "item-knn"

    def __init__(self, seed: int = 0, recent: int = 5):
        self.recent = int(recent)
        self.index: dict[str, int] = {}
        self.x = sp.csc_matrix((0, 0))  # users x items, binary
        self.norm = np.zeros(0)

    def fit(self, interactions: pd.DataFrame) -> "ItemKNNBaseline":
        users = interactions["user"].astype(str)
        items = interactions["item"].astype(str)
        self.index = {item: j for j, item in enumerate(sorted(items.unique()))}
        rows = users.map({u: i for i, u in enumerate(sorted(users.unique()))}).to_numpy()
        return self.from_users(rows, items.map(self.index).to_numpy(), list(self.index))

    def from_users(self, users: np.ndarray, items: np.ndarray, catalogue: list[str]) -> "ItemKNNBaseline":
        """The fit from (user index, item index) pairs (also how a saved hint fit is read back)."""
        self.index = {item: j for j, item in enumerate(catalogue)}
        n_users = int(users.max()) + 1 if len(users) else 0
        x = sp.csc_matrix((np.ones(len(users)), (users, items)), shape=(n_users, len(catalogue)))
        x.data[:] = 1.0  # a repeated (user, item) counts once
        self.x = x
        self.norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        return self

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(user index, item index) of the fit: what `from_users` reads back."""
        coo = self.x.tocoo()
        return coo.row, coo.col

    def similarity(self, candidates, history) -> np.ndarray:
        """Per candidate, its mean cosine to the last `recent` history items known to the fit (0 for
        an unknown candidate or no known history)."""
        recent = [self.index[h] for h in map(str, list(history)[-self.recent:]) if h in self.index]
        out = np.zeros(len(candidates))
        known = [(k, self.index[c]) for k, c in enumerate(map(str, candidates)) if c in self.index]
        if not recent or not known:
            return out
        cols = [j for _, j in known]
        overlap = (self.x[:, cols].T @ self.x[:, recent]).toarray()
        denom = np.outer(self.norm[cols], self.norm[recent])
        cos = np.divide(overlap, denom, out=np.zeros_like(overlap), where=denom > 0)
        out[[k for k, _ in known]] = cos.mean(axis=1)
        return out

    def score(self, row) -> np.ndarray:
        return self.similarity(candidate_ids(row), row["history_items"])
