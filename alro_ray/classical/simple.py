"""Non-learned orders: random, popularity, item mean rating."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from alro_ray.classical.common import candidate_ids, lookup


class RandomBaseline:
    """Uniform random scores, drawn from a generator seeded by (seed, user, window): a row's order
    does not depend on which other rows are scored or in what order."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def fit(self, interactions: pd.DataFrame) -> "RandomBaseline":
        return self

    def score(self, row) -> np.ndarray:
        # crc32, not hash(): Python's str hash is salted per process.
        key = zlib.crc32(str(row["user"]).encode())
        rng = np.random.default_rng([self.seed, key, int(row.get("window", 0) or 0)])
        return rng.random(len(row["candidate_ids"]))


class PopularityBaseline:
    """Number of interactions with the item in the fit data (unseen items: 0)."""

    name = "popularity"

    def __init__(self, seed: int = 0):
        self.counts: dict[str, float] = {}

    def fit(self, interactions: pd.DataFrame) -> "PopularityBaseline":
        counts = interactions["item"].astype(str).value_counts()
        self.counts = {k: float(v) for k, v in counts.items()}
        return self

    def score(self, row) -> np.ndarray:
        return lookup(self.counts, candidate_ids(row), 0.0)


class ItemMeanBaseline:
    """Mean rating shrunk towards the global mean, (sum + k * mu) / (n + k), so an item with one
    5-star rating does not outrank one with hundreds of 4.8s. Unseen items get mu."""

    name = "item-mean"

    def __init__(self, seed: int = 0, k: float = 5.0):
        self.k = float(k)
        self.mu = 0.0
        self.means: dict[str, float] = {}

    def fit(self, interactions: pd.DataFrame) -> "ItemMeanBaseline":
        r = interactions["rating"].astype(float)
        self.mu = float(r.mean())
        g = r.groupby(interactions["item"].astype(str)).agg(["sum", "count"])
        shrunk = (g["sum"] + self.k * self.mu) / (g["count"] + self.k)
        self.means = {k: float(v) for k, v in shrunk.items()}
        return self

    def score(self, row) -> np.ndarray:
        return lookup(self.means, candidate_ids(row), self.mu)


class RetrieverOrderBaseline:
    """The top-N protocol's candidates in the retriever's own order (its score of each candidate,
    stored with the prepared row): the order a reranker has to beat."""

    name = "retriever"

    def __init__(self, seed: int = 0):
        pass

    def fit(self, interactions: pd.DataFrame) -> "RetrieverOrderBaseline":
        return self

    def score(self, row) -> np.ndarray:
        scores = row.get("retriever_scores")
        if scores is None or len(scores) != len(row["candidate_ids"]):
            raise ValueError("the retriever baseline needs the top-N protocol's lists (data.protocol topn): "
                             "these rows carry no retriever scores")
        return np.asarray(scores, dtype=np.float64)
