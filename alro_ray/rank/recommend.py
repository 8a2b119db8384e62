"""Top-N recommendation with a ranker trained on the top-N protocol: retrieve the retriever's C best
items the user has not rated, render them as in training (the last H rated items as history, the
hints the ranker was trained with, the retriever's scores among them), rerank, keep the best k.

The checkpoint's `retriever/` (rank/ranker.py `save_ranker`) holds the fitted retriever, the
ratings it was fitted on (a known user's history, in time order) and the catalogue's shown text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from alro_ray.classical.retrievers import Retriever, load_retriever
from alro_ray.data.prompts import Item
from alro_ray.data.retrieval import HISTORY_FILE, RETRIEVER_DIR
from alro_ray.errors import AlroError


class UnknownUser(AlroError):
    """A user id the checkpoint's retriever has no ratings of."""


@dataclass
class Recommendation:
    items: list[str]  # the k best, best first
    scores: list[float]  # the ranker's score of each (higher = better)
    retrieved: list[str]  # the C candidates the retriever gave, its best first


class Catalogue:
    """The retriever, the shown text of every item and each known user's rated history."""

    def __init__(self, checkpoint: str | Path):
        where = Path(checkpoint) / RETRIEVER_DIR
        if not where.is_dir():
            raise AlroError(f"{checkpoint} was not trained on the top-N protocol (data.protocol topn): it has no "
                            f"{RETRIEVER_DIR}/ to recommend from")
        self.retriever: Retriever = load_retriever(where)
        items = pd.read_parquet(where / "items.parquet")
        self.items = {str(i): Item(t, a) for i, t, a in zip(items["item"], items["title"], items["attributes"])}
        rated = pd.read_parquet(where / HISTORY_FILE).sort_values(["user", "timestamp", "item"], kind="stable")
        self.histories = {str(u): (g["item"].astype(str).tolist(), g["rating"].astype(float).tolist())
                          for u, g in rated.groupby("user", sort=False)}

    def history_of(self, user: str) -> tuple[list[str], list[float]]:
        if str(user) not in self.histories:
            raise UnknownUser(f"user {user!r} is not known to this ranker's retriever")
        return self.histories[str(user)]

    def item(self, item_id: str) -> Item:
        return self.items.get(str(item_id), Item(str(item_id), ""))


def retrieve(catalogue: Catalogue, history_items: Sequence[str], c: int) -> tuple[list[str], list[float]]:
    """The retriever's c best items outside the history (its best first) and their scores."""
    if not len(history_items):
        raise AlroError("a recommendation needs a rated history (at least one item)")
    ids, scores = catalogue.retriever.top_n([list(map(str, history_items))], c)
    if len(ids[0]) < c:
        raise AlroError(f"only {len(ids[0])} unrated items are left to retrieve; the ranker ranks {c}")
    return ids[0], scores[0]


def recommend(ranker, catalogue: Catalogue, history_items: Sequence[str], history_ratings: Sequence[float | None],
              k: int, mode: str = "score") -> Recommendation:
    """The k best of the retriever's C candidates for a rated history (time order, latest last):
    shown as in training, the last H rated items as history and the retriever's score of each
    candidate among its hints (Serve's POST /recommend builds the same prompt)."""
    candidates, retrieved_scores = retrieve(catalogue, history_items, ranker.candidates)
    shown = list(zip(map(str, history_items), history_ratings))[-ranker.info.history:]
    notes = ranker.hint_notes(candidates, [{"retriever_score": s} for s in retrieved_scores],
                              [i for i, _ in shown], [r for _, r in shown])
    prompt = ranker.prompt_ids([(catalogue.item(i), r) for i, r in shown], [catalogue.item(i) for i in candidates],
                               notes)
    orders, list_scores = ranker.rank([prompt], mode)
    order, ranked_scores = orders[0][:k], list_scores[0]
    return Recommendation([candidates[j] for j in order], [float(ranked_scores[j]) for j in order], candidates)
