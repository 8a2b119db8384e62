"""Stability across candidate orders (`alro evaluate --reorders p`, docs/method.md).

Every list of the scored split is ranked again, in the same mode, under p seeded reorders of its
candidates (the prompt re-rendered, identifiers reassigned: A is whatever is shown first), and
each ranking is mapped back to the list's own candidates. A prediction row keeps them beside its
original ranking:

  reorder_ranks    [p][C] the rank (1 = top) reorder r gave candidate j (j: its position as
                   prepared), as rank_of_position is for the original order
  reorder_ratings  [p][C] the candidates' ratings in reorder r's ranking, as predicted_ratings

and `stability_of` turns a mode's rows into its columns (rank/metrics.py `mean_stability`).
"""

from __future__ import annotations

import pandas as pd

from alro_ray.data.samples import stable_hash
from alro_ray.rank.decoding import permutations_for_bootstrap
from alro_ray.rank.metrics import mean_stability

COLUMNS = ("reorder_ranks", "reorder_ratings")
# A mode's metrics that a compare row carries: position bias at a glance, and the stability columns.
KEYS = ("first_shown_mean_rank", "stability_tau", "ndcg@10_spread", "reorders")


def reorders_for(user: str, c: int, p: int, seed: int) -> list[list[int]]:
    """A list's p reorders (shown[j] = the candidate shown at prompt position j), distinct from each
    other and from the original where C! allows. Seeded by (seed, user), so reorder r of a list is
    the same whatever batch it lands in, on a stream apart from bootstrap's copies (seed + user
    hash): bootstrap@k ranked under reorder r shows its copies in still other orders."""
    return permutations_for_bootstrap(c, p + 1, stable_hash(f"reorders/{seed}/{user}"))[1:]


def stability_of(part: pd.DataFrame) -> dict:
    """One mode's prediction rows -> {"stability_tau", "ndcg@10_spread", "reorders"}; {} where its
    rows were not reordered (no --reorders; a fused mode, whose scores come from the original order)."""
    if COLUMNS[0] not in part or part[COLUMNS[0]].isna().any():
        return {}
    return mean_stability(
        ([list(row["rank_of_position"]), *map(list, row["reorder_ranks"])],
         [list(row["predicted_ratings"]), *map(list, row["reorder_ratings"])],
         list(row["target_ratings"]))
        for row in part.to_dict("records"))
