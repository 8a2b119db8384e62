"""What the ingress sends the ranker deployment, and what comes back (pickled by Ray between them).

The ingress has checked the request against the schema and the limits; the ranker renders it with
the adapter's training template and ranks it. A request the ranker cannot answer comes back as a
`RankFailure` with its HTTP status, so one bad request never fails the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alro_ray.data.prompts import Item

CatalogId = str | int


@dataclass(frozen=True)
class Fusion:
    """A request's fusion with a classical model (rank/fusion.py), its weight and method filled in."""

    classical: str  # "mf" or "item-mean"
    weight: float  # the ranker's weight w in w * ranker + (1 - w) * classical
    method: str  # "score", "borda" or "rrf"
    weight_from: str | None = None  # "adapter": the adapter's saved weight (fusion.json), not the request's

    def echo(self) -> dict:
        """The answer's `fusion` field."""
        out = {"classical": self.classical, "weight": self.weight, "method": self.method}
        return out | ({"weight_from": self.weight_from} if self.weight_from else {})


@dataclass(frozen=True)
class RankJob:
    """One request, as the ranker needs it: item texts as the client sent them (the ranker cuts
    them as training did, unless `texts_as_trained`), catalog ids only for hints and fusion."""

    adapter: str
    mode: str
    history: list[tuple[Item, float | None]]  # oldest first, with the user's rating (None: not shown)
    candidates: list[Item]  # in prompt order: letters A, B, ...
    candidate_ids: list[CatalogId]  # the saved hint fit's values are looked up by these
    candidate_hints: list[dict | None] = field(default_factory=list)  # the request's own hint values
    history_ids: list[CatalogId | None] = field(default_factory=list)  # MF's user part: rated items with ids
    fusion: Fusion | None = None
    # True: the item texts are the prepared catalogue's (a top-N adapter's), already cut as training
    # cut them; shown as they are (cutting again would drop a space the cut left at the end)
    texts_as_trained: bool = False

    @property
    def history_ratings(self) -> list[float | None]:
        return [rating for _, rating in self.history]


@dataclass(frozen=True)
class RankOutcome:
    """A ranked request: candidates by prompt position, best first, and a score per position."""

    order: list[int]
    scores: list[float]  # fused scores when `fusion` is set
    batch_size: int  # requests in the server-side batch this one ran in
    fusion: Fusion | None = None


@dataclass(frozen=True)
class RankFailure:
    """A request the ranker refused or could not rank: the HTTP status and the reason."""

    status: int
    error: str
