"""Per-user samples (spec §1): windows, user split, candidate shuffle, gold ranking, permutations.

Pure functions on plain Python/numpy values; the Ray Data pipeline (`prepare.py`) calls them per
user group. Every random draw is seeded by (seed, user, window, ...) through a stable hash, so a
sample does not depend on which worker builds it or in what order.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

SPLITS = ("train", "valid", "test")


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def rng_for(seed: int, user: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, stable_hash(user), *parts])


def assign_splits(users: Sequence[str], shares: Sequence[float], seed: int) -> dict[str, str]:
    """Seeded shuffle of the users, then the first 80% train, the next 10% valid, the rest test."""
    ordered = sorted(users)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(len(ordered) * shares[0])
    n_valid = int(len(ordered) * shares[1])
    out = {}
    for rank, idx in enumerate(perm):
        out[ordered[idx]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return out


def window_bounds(n: int, history: int, candidates: int, windows: int) -> list[tuple[int, int, int]]:
    """(history_start, candidates_start, end) of each window, most recent first.

    Window w's candidates are the C interactions ending C*w before the last one, so candidate
    windows never overlap; its history is the H interactions just before them (which may be an
    earlier window's candidates: the same user's own past, so nothing leaks across users).
    """
    bounds = []
    for w in range(windows):
        end = n - w * candidates
        start_c = end - candidates
        start_h = start_c - history
        if start_h < 0:
            break
        bounds.append((start_h, start_c, end))
    return bounds


def gold_order(ratings: Sequence[float], timestamps: Sequence[int], items: Sequence[str]) -> list[int]:
    """Indices into the candidate list, best first: rating descending, then earlier time, then item id."""
    return sorted(range(len(ratings)), key=lambda i: (-ratings[i], timestamps[i], items[i]))


def draw_permutation(rng: np.random.Generator, c: int) -> list[int]:
    """A random candidate order that differs from the original one (when c > 1).

    perm[j] = index (in the original prompt order) of the candidate shown at position j.
    """
    while True:
        perm = rng.permutation(c).tolist()
        if c == 1 or perm != list(range(c)):
            return perm


def user_samples(
    user: str,
    items: Sequence[str],
    ratings: Sequence[float],
    timestamps: Sequence[int],
    *,
    split: str,
    history: int,
    candidates: int,
    windows: int,
    permutations: int,
    seed: int,
) -> list[dict]:
    """All samples of one user; `items/ratings/timestamps` must be sorted by (timestamp, item).

    Only training users get more than one window and get permutations: a valid/test user is
    scored on its most recent window only.
    """
    if split != "train":
        windows, permutations = 1, 0
    rows = []
    for w, (sh, sc, end) in enumerate(window_bounds(len(items), history, candidates, windows)):
        shuffle = rng_for(seed, user, w).permutation(candidates).tolist()
        cand_items = [items[sc + j] for j in shuffle]
        cand_ratings = [float(ratings[sc + j]) for j in shuffle]
        cand_times = [int(timestamps[sc + j]) for j in shuffle]
        perm_rng = rng_for(seed, user, w, 1)
        rows.append(
            {
                "user": user,
                "split": split,
                "window": w,
                "history_items": list(items[sh:sc]),
                "history_ratings": [float(r) for r in ratings[sh:sc]],
                "candidate_ids": cand_items,
                "candidate_ratings": cand_ratings,
                "candidate_timestamps": cand_times,
                "gold_order": gold_order(cand_ratings, cand_times, cand_items),
                "perm_orders": [draw_permutation(perm_rng, candidates) for _ in range(permutations)],
                "target_items": cand_items, "target_ratings": cand_ratings, "retriever_scores": [],
            }
        )
    return rows


def permuted_gold(gold: Sequence[int], perm: Sequence[int]) -> list[int]:
    """The gold order expressed in permuted-prompt positions: the same items, in the same order."""
    position_of = {orig: j for j, orig in enumerate(perm)}
    return [position_of[i] for i in gold]
