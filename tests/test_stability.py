"""Stability across candidate orders (evaluate/stability.py): the seeded reorders, a mode's
columns from its prediction rows, and planted rankers that read only positions or only items."""

import numpy as np
import pandas as pd
import pytest

from alro_ray.evaluate.stability import reorders_for, stability_of
from alro_ray.rank.metrics import item_ranks, mean_stability, position_bias

C, P = 5, 4


def test_reorders_are_seeded_per_user_and_distinct():
    a = reorders_for("u1", C, P, seed=0)
    assert a == reorders_for("u1", C, P, seed=0)  # whatever batch the row lands in
    assert len(a) == P and all(sorted(s) == list(range(C)) for s in a)
    assert len({tuple(s) for s in a} | {tuple(range(C))}) == P + 1  # none repeats, none is the original
    assert a != reorders_for("u2", C, P, seed=0) and a != reorders_for("u1", C, P, seed=1)
    assert reorders_for("u1", C, 2, seed=0) == a[:2]  # reorder r depends on (seed, user, r) only


def planted(rank_shown, users: int = 60):
    """Lists of C candidates (ratings 0..C-1 shuffled per list), ranked under the
    original order and P reorders by `rank_shown(shown, ratings) -> order of shown positions`; the
    rankings mapped back to the candidates as the evaluation job does. Returns (stability lists,
    [N*(P+1), C] ranks of each shown position)."""
    rng = np.random.default_rng(7)
    lists, shown_ranks = [], []
    for u in range(users):
        ratings = rng.permutation(C).astype(float)  # 0..4, one of each
        ranks, relevance = [], []
        for shown in [list(range(C)), *reorders_for(f"user{u}", C, P, seed=0)]:
            order = [shown[j] for j in rank_shown(shown, ratings)]  # shown positions -> candidates
            ranks.append(item_ranks(order))
            relevance.append([ratings[j] for j in order])
            shown_ranks.append([ranks[-1][shown[j]] for j in range(C)])
        lists.append((ranks, relevance, list(ratings)))
    return lists, np.array(shown_ranks)


def test_a_ranker_that_reads_only_positions_is_unstable_and_biased():
    # Always ranks the prompt's first line first: its ranking follows whatever order is shown.
    lists, shown = planted(lambda shown, ratings: list(range(C)))
    out = mean_stability(lists)
    assert out["stability_tau"] < 0.3  # random permutations' tau, about 0
    assert out["ndcg@10_spread"] > 0.2
    assert position_bias(shown)["mean_rank_by_position"][0] == 1.0  # the first shown is always ranked first


def test_a_ranker_that_reads_only_items_is_stable_and_unbiased():
    # Ranks by the candidates' ratings, wherever they are shown.
    lists, shown = planted(lambda shown, ratings: sorted(range(C), key=lambda j: -ratings[shown[j]]))
    out = mean_stability(lists)
    assert out["stability_tau"] == pytest.approx(1.0) and out["ndcg@10_spread"] == 0.0
    assert abs(position_bias(shown)["mean_rank_by_position"][0] - (C + 1) / 2) < 0.4  # no first-position effect


def test_stability_of_a_modes_rows():
    # One list: original ranks [1, 2, 3] and 2 reorders (the hand-worked case of test_metrics.py).
    row = {"mode": "generate", "rank_of_position": [1, 2, 3], "predicted_ratings": [3.0, 1.0, 0.0],
           "target_ratings": [3.0, 1.0, 0.0], "reorder_ranks": [[1, 3, 2], [2, 3, 1]],
           "reorder_ratings": [[3.0, 0.0, 1.0], [0.0, 3.0, 1.0]]}
    out = stability_of(pd.DataFrame([row]))
    assert out["stability_tau"] == pytest.approx(1 / 9) and out["reorders"] == 2
    assert out["ndcg@10_spread"] == pytest.approx(0.35572, abs=1e-5)
    # a fused mode's rows carry no reorders of their own; a run without --reorders has no columns
    fused = pd.concat([pd.DataFrame([row]), pd.DataFrame([{"mode": "fused-generate-mf"}])], ignore_index=True)
    assert stability_of(fused[fused["mode"] == "fused-generate-mf"]) == {}
    assert stability_of(pd.DataFrame([{k: v for k, v in row.items() if not k.startswith("reorder")}])) == {}
