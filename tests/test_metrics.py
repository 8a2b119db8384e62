"""NDCG, position bias and TPQ against values worked out by hand."""

import math

import numpy as np
import pytest

from alro_ray.rank.metrics import (
    item_ranks,
    list_metrics,
    list_stability,
    mean_metrics,
    mean_stability,
    dcg_at_k,
    kendall_tau,
    mean_ndcg,
    ndcg_at_k,
    position_bias,
    spearman,
    time_per_query,
)

L2, L3, L4, L5, L6, L7 = (math.log2(n) for n in range(2, 8))  # discounts of ranks 1..6

# Textbook list: ratings [3, 2, 3, 0, 1, 2] in ranked order -> gains 2^r - 1 = [7, 3, 7, 0, 1, 3].
# Ideal order [3, 3, 2, 2, 1, 0] -> gains [7, 7, 3, 3, 1, 0].
TEXTBOOK = [3, 2, 3, 0, 1, 2]


def test_dcg_textbook():
    # 7/1 + 3/log2(3) + 7/2 + 0 + 1/log2(6) + 3/log2(7) = 7 + 1.89279 + 3.5 + 0.38685 + 1.06862
    assert dcg_at_k(TEXTBOOK, 6) == pytest.approx(13.84826, abs=1e-5)
    assert dcg_at_k(TEXTBOOK, 6) == pytest.approx(7 / L2 + 3 / L3 + 7 / L4 + 0 / L5 + 1 / L6 + 3 / L7)
    # first three ranks only: 7 + 1.89279 + 3.5
    assert dcg_at_k(TEXTBOOK, 3) == pytest.approx(12.39279, abs=1e-5)


def test_ndcg_textbook_k3_and_k6():
    # IDCG@3 = 7 + 7/log2(3) + 3/2 = 12.91650 -> 12.39279 / 12.91650
    assert ndcg_at_k(TEXTBOOK, 3) == pytest.approx(0.95945, abs=1e-5)
    # IDCG@6 = 7 + 4.41650 + 1.5 + 3/log2(5) + 1/log2(6) = 14.59538 -> 13.84826 / 14.59538
    assert ndcg_at_k(TEXTBOOK, 6) == pytest.approx(0.94881, abs=1e-5)
    ideal6 = 7 + 7 / L3 + 3 / L4 + 3 / L5 + 1 / L6
    assert ndcg_at_k(TEXTBOOK, 6) == pytest.approx((7 + 3 / L3 + 7 / L4 + 1 / L6 + 3 / L7) / ideal6)


def test_ndcg_ties_in_ratings():
    # [2, 1, 2]: gains [3, 1, 3]; ideal [2, 2, 1]: gains [3, 3, 1]
    # DCG = 3 + 1/log2(3) + 3/2 = 5.13093, IDCG = 3 + 3/log2(3) + 1/2 = 5.39279
    assert ndcg_at_k([2, 1, 2], 3) == pytest.approx(0.95144, abs=1e-5)
    # Swapping the two tied 2s changes nothing: still ideal.
    assert ndcg_at_k([2, 2, 1], 3) == pytest.approx(1.0)
    # At k=1 any list with a 2 on top is ideal.
    assert ndcg_at_k([2, 1, 2], 1) == pytest.approx(1.0)
    assert ndcg_at_k([1, 2, 2], 1) == pytest.approx(1 / 3)  # gain 1 vs ideal gain 3


@pytest.mark.parametrize("order", [[4, 4, 4, 4], [1, 1], [5]])
def test_all_equal_nonzero_is_one(order):
    for k in (1, 2, 3, 10):
        assert ndcg_at_k(order, k) == pytest.approx(1.0)


def test_all_zero_or_empty_is_undefined():
    assert ndcg_at_k([0, 0, 0], 3) is None
    assert ndcg_at_k([], 3) is None
    # a list with its only relevant item beyond k is defined (and 0), since the ideal puts it first
    assert ndcg_at_k([0, 0, 0, 1], 3) == 0.0


def test_k_larger_than_list():
    # [0, 1]: DCG = 1/log2(3) = 0.63093; ideal [1, 0]: IDCG = 1
    assert ndcg_at_k([0, 1], 10) == pytest.approx(0.63093, abs=1e-5)
    assert ndcg_at_k(TEXTBOOK, 25) == ndcg_at_k(TEXTBOOK, 6)
    assert dcg_at_k(TEXTBOOK, 100) == dcg_at_k(TEXTBOOK, 6)


def test_mean_ndcg_skips_and_counts_undefined():
    lists = [TEXTBOOK, [0, 0, 0], [0, 1], [2, 2, 1]]
    out = mean_ndcg(lists, ks=(3, 10))
    assert out["lists"] == 3
    assert out["lists_undefined"] == 1
    # @3: (0.95945 + 0.63093 + 1) / 3; @10 uses the whole lists: (0.94881 + 0.63093 + 1) / 3
    assert out["ndcg@3"] == pytest.approx((0.95945 + 0.63093 + 1.0) / 3, abs=1e-5)
    assert out["ndcg@10"] == pytest.approx((0.94881 + 0.63093 + 1.0) / 3, abs=1e-5)
    assert set(out) == {"ndcg@3", "ndcg@10", "lists", "lists_undefined"}


def test_mean_ndcg_default_ks_and_no_usable_list():
    out = mean_ndcg([[0, 0], [0]])
    assert out == {"ndcg@3": None, "ndcg@10": None, "ndcg@25": None, "lists": 0, "lists_undefined": 2}


def test_top_n_metrics_by_hand():
    """A top-N list of 4 candidates ranked [miss, rating 4, miss, rating 5] from a held-out set
    {5, 4, 3}: the rating-3 item was never retrieved, so the ideal (31 + 15/log2 3 + 7/2 = 43.96395)
    holds a gain the list cannot reach; DCG = 15/log2 3 + 31/log2 5 = 22.81492."""
    m = list_metrics([0, 4, 0, 5], [5, 4, 3], "topn")
    assert set(m) == {"ndcg@5", "ndcg@10", "ndcg@20", "recall@10", "hr@10", "mrr", "ndcg_within@10"}
    assert m["ndcg@10"] == pytest.approx(22.81492 / 43.96395, abs=1e-6) == m["ndcg@5"] == m["ndcg@20"]
    assert m["recall@10"] == pytest.approx(2 / 3) and m["hr@10"] == 1.0 and m["mrr"] == 0.5
    # within the candidates the ideal is [5, 4, 0, 0]: 31 + 15/log2 3 = 40.46395
    assert m["ndcg_within@10"] == pytest.approx(22.81492 / 40.46395, abs=1e-6)
    # Nothing retrieved: every metric 0 (not undefined: the user had held-out items), within undefined.
    assert list_metrics([0, 0, 0], [3], "topn") == {"ndcg@5": 0.0, "ndcg@10": 0.0, "ndcg@20": 0.0, "recall@10": 0.0,
                                                     "hr@10": 0.0, "mrr": 0.0, "ndcg_within@10": None}
    mean = mean_metrics([[0, 4, 0, 5], [0, 0, 0], [0, 0]], [[5, 4, 3], [3], [0]], "topn")
    assert mean["ndcg@10"] == pytest.approx(22.81492 / 43.96395 / 2, abs=1e-6)
    assert mean["ndcg_within@10"] == pytest.approx(22.81492 / 40.46395, abs=1e-6)  # the one list with a hit
    assert (mean["lists"], mean["lists_undefined"]) == (2, 1)  # no held-out gain at all: undefined
    # Rated: the targets are the list itself, so this is NDCG against the list's own ideal.
    assert mean_metrics([[3, 5]], [[5, 3]])["ndcg@10"] == pytest.approx(ndcg_at_k([3, 5], 10))
    assert ndcg_at_k([0, 4, 0, 5], 10, targets=[5, 4, 3]) == pytest.approx(m["ndcg@10"])


def test_invalid_inputs():
    with pytest.raises(ValueError):
        ndcg_at_k([1, 2], 0)
    with pytest.raises(ValueError):
        dcg_at_k([1, -1], 2)
    with pytest.raises(ValueError):
        ndcg_at_k([[1, 2]], 2)


def test_position_bias_perfect_primacy_and_recency():
    c = 5
    primacy = np.tile(np.arange(1, c + 1), (4, 1))  # position p always ranked p + 1
    out = position_bias(primacy)
    assert out["mean_rank_by_position"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["spearman"] == pytest.approx(1.0)
    assert out["kendall_tau"] == pytest.approx(1.0)
    recency = primacy[:, ::-1]  # the last shown is ranked first
    out = position_bias(recency)
    assert out["spearman"] == pytest.approx(-1.0)
    assert out["kendall_tau"] == pytest.approx(-1.0)


def test_position_bias_none():
    # Latin square: every position gets every rank once -> constant mean rank 2.5 -> 0.0
    ranks = np.array([[1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2], [4, 1, 2, 3]])
    out = position_bias(ranks)
    assert out["mean_rank_by_position"] == [2.5] * 4
    assert out["spearman"] == 0.0
    assert out["kendall_tau"] == 0.0


def test_position_bias_ties():
    # mean ranks [1.5, 1.5, 3.5, 3.5]; average ranks of y = [1.5, 1.5, 3.5, 3.5]
    # Spearman: dx = [-1.5, -.5, .5, 1.5], dy = [-1, -1, 1, 1]: 4 / sqrt(5 * 4) = 0.894427
    # Kendall tau-b: 6 pairs, 2 tied in y, the other 4 concordant: 4 / sqrt(6 * 4) = 0.816497
    ranks = np.array([[1, 2, 3, 4], [2, 1, 4, 3]])
    out = position_bias(ranks)
    assert out["mean_rank_by_position"] == [1.5, 1.5, 3.5, 3.5]
    assert out["spearman"] == pytest.approx(0.894427, abs=1e-6)
    assert out["kendall_tau"] == pytest.approx(0.816497, abs=1e-6)


def test_correlations_non_monotone():
    # y = [2, 1, 3]: Spearman dx = [-1, 0, 1], dy = [0, -1, 1] -> 1 / 2;
    # Kendall: pair (1,2) discordant, (1,3) and (2,3) concordant -> (2 - 1) / 3
    assert spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5)
    assert kendall_tau([1, 2, 3], [2, 1, 3]) == pytest.approx(1 / 3)


def test_position_bias_single_position_and_bad_shape():
    out = position_bias(np.array([[1], [1]]))
    assert out == {"mean_rank_by_position": [1.0], "spearman": 0.0, "kendall_tau": 0.0}
    with pytest.raises(ValueError):
        position_bias(np.array([1, 2, 3]))


def test_item_ranks():
    assert item_ranks([2, 0, 1]) == [2, 3, 1]  # candidate 2 first, 0 second, 1 third
    assert item_ranks([0]) == [1]
    with pytest.raises(ValueError, match="not an order"):
        item_ranks([0, 0, 1])


# One list of 3 candidates with ratings [3, 1, 0] (by candidate), ranked under 3 orders:
# ranks [1, 2, 3] (candidates 0, 1, 2 best first), [1, 3, 2] (0, 2, 1), [2, 3, 1] (2, 0, 1).
STABILITY_RANKS = [[1, 2, 3], [1, 3, 2], [2, 3, 1]]
STABILITY_RATINGS = [[3, 1, 0], [3, 0, 1], [0, 3, 1]]  # the ratings in each order's ranking


def test_list_stability_by_hand():
    # Kendall tau over the 3 pairs of candidates (0,1), (0,2), (1,2), concordant or discordant:
    #   [1,2,3] vs [1,3,2]: C, C, D -> 1/3;  [1,2,3] vs [2,3,1]: C, D, D -> -1/3;
    #   [1,3,2] vs [2,3,1]: C, D, C -> 1/3;  mean over all 3 pairs of orders 1/9 (the original
    #   against the reorders alone would give 0)
    # NDCG@10 (gains 7, 1, 0; ideal 7 + 1/log2(3) = 7.63093): 1; (7 + 0 + 1/2) / 7.63093 = 0.98283;
    #   (0 + 7/log2(3) + 1/2) / 7.63093 = 0.64428;  spread 1 - 0.64428 = 0.35572
    tau, spread = list_stability(STABILITY_RANKS, STABILITY_RATINGS, [3, 1, 0])
    assert tau == pytest.approx(1 / 9)
    assert spread == pytest.approx(1 - (7 / L3 + 1 / 2) / (7 + 1 / L3))
    assert spread == pytest.approx(0.35572, abs=1e-5)
    # the same ranking under every order: tau 1, spread 0
    assert list_stability([[2, 1, 3]] * 3, [[1, 3, 0]] * 3, [3, 1, 0]) == (pytest.approx(1.0), 0.0)
    # no positive target: NDCG undefined, so no spread; tau still measured
    assert list_stability(STABILITY_RANKS, [[0, 0, 0]] * 3, [0, 0, 0]) == (pytest.approx(1 / 9), None)
    with pytest.raises(ValueError, match=">= 2 orders"):
        list_stability([[1, 2, 3]], [[3, 1, 0]], [3, 1, 0])


def test_mean_stability_by_hand():
    lists = [(STABILITY_RANKS, STABILITY_RATINGS, [3, 1, 0]),  # tau 1/9, spread 0.35572
             ([[2, 1, 3]] * 3, [[0, 0, 0]] * 3, [0, 0, 0])]  # tau 1, spread undefined (skipped)
    out = mean_stability(lists)
    assert out["stability_tau"] == pytest.approx((1 / 9 + 1) / 2)
    assert out["ndcg@10_spread"] == pytest.approx(0.35572, abs=1e-5)
    assert out["reorders"] == 2
    assert mean_stability(lists[1:])["ndcg@10_spread"] is None
    with pytest.raises(ValueError, match="same number of orders"):
        mean_stability([lists[0], (STABILITY_RANKS[:2], STABILITY_RATINGS[:2], [3, 1, 0])])


def test_time_per_query():
    assert time_per_query(12.0, 4) == 3.0
    with pytest.raises(ValueError):
        time_per_query(1.0, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_never_become_a_metric(bad):
    from alro_ray.errors import NonFiniteError

    for call in (lambda: ndcg_at_k([3, bad, 1], 3), lambda: dcg_at_k([bad], 1),
                 lambda: mean_ndcg([[3, 2, 1], [1, bad, 0]]), lambda: spearman([1, 2, 3], [1, bad, 2]),
                 lambda: kendall_tau([bad, 2, 3], [1, 2, 3]), lambda: time_per_query(bad, 3),
                 lambda: position_bias(np.array([[1, 2, 3], [bad, 1, 2]]))):
        with pytest.raises(NonFiniteError, match="finite"):
            call()
