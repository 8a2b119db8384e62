"""Evaluation metrics (spec §5): NDCG@k, position bias, time per query; stability across candidate
orders (Kendall tau, NDCG spread); and the top-N protocol's.

NDCG is written out (its gain and discount are the spec's); the rank correlations are scipy's.

Every list is scored against its targets (the prepared row's `target_ratings`): under
`data.protocol rated` those are the candidates themselves, so NDCG is normalised by the ideal
order of the same list (the spec). Under `topn` they are the window's whole held-out set, so the
ideal DCG counts held-out items the retriever missed (end-to-end NDCG: a retrieval miss costs),
and a list without a retrieved positive scores 0, not "undefined". topn also reports recall@10
(retrieved-and-ranked-in-the-top-10 positives / positives), HR@10 (any positive in the top 10),
MRR (1 / rank of the first positive, 0 without one) and NDCG@10 within the candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from alro_ray.errors import NonFiniteError

KS: tuple[int, ...] = (3, 10, 25)  # the NDCG cut-offs of the rated protocol's tables
TOPN_KS: tuple[int, ...] = (5, 10, 20)  # ... and of the top-N protocol's (end-to-end)
TOPN_AT = 10  # recall, HR and within-candidates NDCG cut-off
# Every metric a table may show, in the order it shows them.
METRIC_ORDER = ("ndcg@3", "ndcg@5", "ndcg@10", "ndcg@20", "ndcg@25", f"recall@{TOPN_AT}", f"hr@{TOPN_AT}", "mrr",
                f"ndcg_within@{TOPN_AT}")


def _relevance_array(relevance: Sequence[float]) -> np.ndarray:
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.ndim != 1:
        raise ValueError(f"relevance must be a 1-D sequence, got shape {rel.shape}")
    _check_finite(rel, "relevance")
    # Negative ratings give negative gains, so NDCG could leave [0, 1]: reject them.
    if np.any(rel < 0):
        raise ValueError("relevance must be non-negative")
    return rel


def _check_finite(values: np.ndarray, what: str) -> None:
    # A NaN must never become a metric: sorts and comparisons would quietly turn it into one.
    if not np.all(np.isfinite(values)):
        raise NonFiniteError(f"{what} must be finite, got NaN or inf")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _dcg(rel: np.ndarray, k: int) -> float:
    top = rel[:k]  # k beyond the list simply takes the whole list
    ranks = np.arange(1, top.size + 1, dtype=np.float64)
    return float(np.sum((np.exp2(top) - 1.0) / np.log2(1.0 + ranks)))


def dcg_at_k(relevance_in_ranked_order: Sequence[float], k: int) -> float:
    """DCG@k: sum over the first k ranks n (1-based) of (2^r - 1) / log2(1 + n)."""
    _check_k(k)
    return _dcg(_relevance_array(relevance_in_ranked_order), k)


def ndcg_at_k(relevance_in_ranked_order: Sequence[float], k: int,
              targets: Sequence[float] | None = None) -> float | None:
    """NDCG@k against the ideal (descending) order of `targets` (default: the same list), both
    truncated at k.

    Returns None when the ideal DCG@k is 0 (every target gain is 0, or there are none):
    NDCG is undefined there, and callers skip such lists and count them.
    """
    _check_k(k)
    rel = _relevance_array(relevance_in_ranked_order)
    best = rel if targets is None else _relevance_array(targets)
    ideal = _dcg(np.sort(best)[::-1], k)
    if ideal <= 0.0:
        return None
    return _dcg(rel, k) / ideal


def list_metrics(ranked: Sequence[float], targets: Sequence[float], protocol: str = "rated") -> dict | None:
    """One list's metrics (module docstring) against its targets; None where undefined (no
    target with a positive gain)."""
    rel, best = _relevance_array(ranked), _relevance_array(targets)
    if not np.any(best > 0):
        return None
    ks = TOPN_KS if protocol == "topn" else KS
    out = {f"ndcg@{k}": ndcg_at_k(rel, k, best) for k in ks}
    if protocol == "topn":
        hits = np.flatnonzero(rel > 0)
        out[f"recall@{TOPN_AT}"] = float(np.sum(rel[:TOPN_AT] > 0) / np.sum(best > 0))
        out[f"hr@{TOPN_AT}"] = float(np.any(rel[:TOPN_AT] > 0))
        out["mrr"] = float(1.0 / (hits[0] + 1)) if hits.size else 0.0
        out[f"ndcg_within@{TOPN_AT}"] = ndcg_at_k(rel, TOPN_AT)  # None without a retrieved positive
    return out


def mean_metrics(ranked_lists: Iterable[Sequence[float]], target_lists: Iterable[Sequence[float]],
                 protocol: str = "rated") -> dict:
    """Each metric of `list_metrics` averaged over the lists where it is defined, with "lists"
    (defined) and "lists_undefined" (no positive target: skipped); ndcg_within@10 averages the
    lists with a retrieved positive only."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    used = undefined = 0
    for ranked, targets in zip(ranked_lists, target_lists):
        m = list_metrics(ranked, targets, protocol)
        if m is None:
            undefined += 1
            continue
        used += 1
        for key, value in m.items():
            if value is not None:
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    names = [k for k in METRIC_ORDER if k.startswith("ndcg@") and int(k[5:]) in (TOPN_KS if protocol == "topn" else KS)]
    if protocol == "topn":
        names += [f"recall@{TOPN_AT}", f"hr@{TOPN_AT}", "mrr", f"ndcg_within@{TOPN_AT}"]
    out: dict = {k: (sums[k] / counts[k] if counts.get(k) else None) for k in names}
    out["lists"] = used
    out["lists_undefined"] = undefined
    return out


def mean_ndcg(
    ranked_relevance_lists: Iterable[Sequence[float]], ks: Sequence[int] = KS
) -> dict:
    """Mean NDCG@k over lists, skipping lists whose NDCG is undefined.

    Returns {"ndcg@<k>": mean or None if no list is usable, "lists": n_used,
    "lists_undefined": n_skipped}. With non-negative ratings a list is undefined for
    every k or for none (its ideal top gain is 0 exactly when all gains are 0), so one
    count serves all ks.
    """
    ks = tuple(ks)
    for k in ks:
        _check_k(k)
    sums = {k: 0.0 for k in ks}
    used = undefined = 0
    for relevance in ranked_relevance_lists:
        rel = _relevance_array(relevance)
        if not np.any(rel > 0):
            undefined += 1
            continue
        used += 1
        for k in ks:
            value = ndcg_at_k(rel, k)
            assert value is not None  # guaranteed by the any(rel > 0) check above
            sums[k] += value
    out: dict = {f"ndcg@{k}": (sums[k] / used if used else None) for k in ks}
    out["lists"] = used
    out["lists_undefined"] = undefined
    return out


def _correlation(test, x: Sequence[float], y: Sequence[float], name: str) -> float:
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size != ya.size:
        raise ValueError("x and y must have the same length")
    _check_finite(xa, f"{name}: x")
    _check_finite(ya, f"{name}: y")
    # scipy says NaN (and warns) when a side is constant; here that is "no association": 0.0.
    if xa.size < 2 or np.all(xa == xa[0]) or np.all(ya == ya[0]):
        return 0.0
    return float(test(xa, ya).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties). 0.0 if either side is constant."""
    from scipy import stats  # here, not at the top: scipy.stats is a second of every ranker actor's start

    return _correlation(stats.spearmanr, x, y, "spearman")


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (corrects for ties on either side). 0.0 if either side is constant."""
    from scipy import stats

    return _correlation(stats.kendalltau, x, y, "kendall_tau")


def position_bias(predicted_ranks_by_position: np.ndarray) -> dict:
    """Position bias (paper Figure 3).

    Input [N, C]: row q, column p = predicted rank (1 = top) of the candidate shown at
    prompt position p (0-based) for query q.

    Returns {"mean_rank_by_position": C floats, "spearman": rho, "kendall_tau": tau},
    the correlations being between the 1-based position (1..C) and the mean rank there.
    Sign convention: 0 = no bias; positive = earlier prompt positions get better (smaller)
    ranks, i.e. primacy bias (+1: mean rank rises strictly with position); negative =
    later positions are favoured (recency bias). A constant mean rank gives 0.0.
    """
    ranks = np.asarray(predicted_ranks_by_position, dtype=np.float64)
    if ranks.ndim != 2 or ranks.shape[0] == 0 or ranks.shape[1] == 0:
        raise ValueError(f"expected a non-empty [N, C] array, got shape {ranks.shape}")
    _check_finite(ranks, "position_bias: predicted ranks")
    mean_rank = ranks.mean(axis=0)
    positions = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
    return {
        "mean_rank_by_position": [float(v) for v in mean_rank],
        "spearman": spearman(positions, mean_rank),
        "kendall_tau": kendall_tau(positions, mean_rank),
    }


def item_ranks(order: Sequence[int]) -> list[int]:
    """The predicted rank (1 = top) of each candidate, by its index, in an order listing the
    candidate indices best first: [2, 0, 1] -> [2, 3, 1]."""
    idx = np.asarray(order, dtype=np.int64)
    if idx.ndim != 1 or sorted(idx.tolist()) != list(range(idx.size)):
        raise ValueError(f"not an order of 0..{idx.size - 1}: {list(order)}")
    ranks = np.empty(idx.size, dtype=np.int64)
    ranks[idx] = np.arange(1, idx.size + 1)
    return ranks.tolist()


def list_stability(ranks: Sequence[Sequence[float]], ranked_relevance: Sequence[Sequence[float]],
                   targets: Sequence[float], k: int = 10) -> tuple[float, float | None]:
    """One list ranked under several candidate orders (the original and its reorders), each mapped
    back to the list's own candidates: ranks[o][j] = the rank order o gave candidate j,
    ranked_relevance[o] = the candidates' ratings in order o's ranking.

    Returns (the mean Kendall tau over all pairs of orders' rankings, max - min of their NDCG@k
    against `targets`; None where NDCG@k is undefined). A ranker that reads the items alone gives
    (1, 0); one that reads positions alone ranks each order's own candidates by where they were
    shown, so its tau is that of random permutations (about 0)."""
    if len(ranks) < 2 or len(ranks) != len(ranked_relevance):
        raise ValueError(f"list_stability needs >= 2 orders with a ranking and ratings each, got "
                         f"{len(ranks)} and {len(ranked_relevance)}")
    taus = [kendall_tau(ranks[a], ranks[b]) for a in range(len(ranks)) for b in range(a + 1, len(ranks))]
    ndcgs = [ndcg_at_k(rel, k, targets) for rel in ranked_relevance]
    spread = None if None in ndcgs else max(ndcgs) - min(ndcgs)
    return float(np.mean(taus)), spread


def mean_stability(lists: Iterable[tuple[Sequence[Sequence[float]], Sequence[Sequence[float]], Sequence[float]]],
                   k: int = 10) -> dict:
    """`list_stability` over lists of (ranks, ranked_relevance, targets): {"stability_tau": mean over
    the lists, "ndcg@k_spread": mean over the lists where NDCG@k is defined (None if none), "reorders":
    orders per list - 1}."""
    taus, spreads, orders = [], [], set()
    for ranks, relevance, targets in lists:
        tau, spread = list_stability(ranks, relevance, targets, k)
        taus.append(tau)
        orders.add(len(ranks))
        if spread is not None:
            spreads.append(spread)
    if not taus:
        raise ValueError("mean_stability needs at least one list")
    if len(orders) != 1:
        raise ValueError(f"every list must be ranked under the same number of orders, got {sorted(orders)}")
    return {"stability_tau": float(np.mean(taus)), f"ndcg@{k}_spread": float(np.mean(spreads)) if spreads else None,
            "reorders": orders.pop() - 1}


def time_per_query(total_seconds: float, n_queries: int) -> float:
    """TPQ: wall-clock seconds per ranked query."""
    if n_queries <= 0:
        raise ValueError(f"n_queries must be positive, got {n_queries}")
    _check_finite(np.asarray(total_seconds, dtype=np.float64), "total_seconds")
    if total_seconds < 0:
        raise ValueError(f"total_seconds must be non-negative, got {total_seconds}")
    return float(total_seconds) / n_queries


def paired_bootstrap(a_per_user: Sequence[float], b_per_user: Sequence[float], n: int = 10000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over users and its percentile bootstrap interval: users drawn with
    replacement n times, the same users for both rows (paired). a[i], b[i]: one user's metric
    under two rankers on the same list. Returns (mean_diff, lo, hi)."""
    a, b = np.asarray(a_per_user, dtype=np.float64), np.asarray(b_per_user, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty per-user lists, got "
                         f"{a.shape} and {b.shape}")
    _check_finite(a, "a_per_user")
    _check_finite(b, "b_per_user")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    d = a - b
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)
