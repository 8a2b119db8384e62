"""From a raw rating to the relevance level a sample uses: optional grading, then the scale check.

Relevance feeds gains 2^r - 1 (lambda loss, NDCG), so it must be non-negative and not huge:
`data.rating_scale` [low, high] declares the levels a dataset may hold, and an interaction
outside it is a bad row (an error naming file and line, or skipped and counted). Signals that
are not ratings (play or purchase counts) are first graded into levels 0..N-1
(`data.grading`):

  bins       edges b1 < ... < bk: level = how many edges the value exceeds
             (v <= b1 -> 0, b1 < v <= b2 -> 1, ..., v > bk -> k)
  quantiles  N levels: the edges are the 1/N, ..., (N-1)/N quantiles of every value read,
             with the same rule (a value equal to an edge takes the lower level)

See docs/method.md for worked examples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alro_ray.config import GradingConfig
from alro_ray.data.rows import BadRow

OUT_OF_SCALE = "rating outside data.rating_scale"


def grade(values: np.ndarray | float, edges: Sequence[float]) -> np.ndarray:
    """Levels 0..len(edges): how many of the ascending `edges` each value exceeds."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")


def quantile_edges(values: np.ndarray, levels: int) -> list[float]:
    """The N-1 inner quantiles of `values` (none when there are no values)."""
    if len(values) == 0:
        return []
    return [float(q) for q in np.quantile(values, [k / levels for k in range(1, levels)])]


class RatingRule:
    """`data.rating_scale` and `data.grading` applied to the interactions of one source."""

    def __init__(self, scale: Sequence[float] = (0.0, 10.0), grading: GradingConfig | None = None):
        self.low, self.high = (float(x) for x in scale)
        self.grading = grading or GradingConfig()

    def level(self, raw: float) -> float:
        """One raw rating's level; a BadRow when it is off the scale. Quantile grading needs
        every value first: the raw value passes here and `finish` grades it."""
        g = self.grading
        if g.method == "quantiles":
            return raw
        level = float(grade(raw, g.bins)) if g.method == "bins" else raw
        if not self.low <= level <= self.high:
            shown = f"rating {raw:g}" + (f" (level {level:g})" if level != raw else "")
            raise BadRow(OUT_OF_SCALE, message=f"{shown} outside data.rating_scale "
                                               f"[{self.low:g}, {self.high:g}]")
        return level

    def levels(self, raw: np.ndarray) -> np.ndarray | None:
        """`level` of many raw ratings at once (the same values); None when any is off the scale,
        for the caller to find and report it row by row."""
        g = self.grading
        if g.method == "quantiles":
            return raw
        levels = grade(raw, g.bins).astype(np.float64) if g.method == "bins" else raw
        return levels if bool(np.all((self.low <= levels) & (levels <= self.high))) else None

    def finish(self, ratings: np.ndarray) -> tuple[np.ndarray, dict]:
        """The levels of all kept ratings (each already through `level`), and what stats report."""
        g = self.grading
        if g.method == "none":
            return ratings, {"method": "none"}
        if g.method == "bins":
            return ratings, {"method": "bins", "edges": list(g.bins), "levels": len(g.bins) + 1}
        edges = quantile_edges(ratings, g.levels)
        levels = grade(ratings, edges).astype(np.float64)
        return levels, {"method": "quantiles", "edges": edges, "levels": g.levels}
