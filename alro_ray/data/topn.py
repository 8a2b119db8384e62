"""The top-N protocol (`data.protocol: topn`): retrieve candidates from the whole catalogue, then
rerank them. Pure functions on frames and plain values; `data/retrieval.py` runs them in Ray Data.

Per user, ratings sorted by (timestamp, item id):

  ... training ... | valid: `holdout` ratings | test: the last `holdout` ratings

A user with at least H + 2·holdout ratings gets a valid and a test list; every user gets up to
`data.windows_per_user` training windows, non-overlapping, ending where her valid window starts
(or at her last rating). A window at position p: its history is the H ratings before p, its
positives the `holdout` ratings from p on, its candidates the retriever's top C among the items
she had not rated before p; a candidate's relevance is its rating if it is a positive, else 0.

No window's candidates come from a retriever that saw that window's positives (`fit_frames`):
  test lists   a fit on every rating outside the test windows;
  valid lists  a fit outside the valid and test windows;
  train lists  a fit outside the valid and test windows and the training windows of the user's
               fold (training users dealt into `data.retrieval.folds` folds, as data.hint_folds).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from alro_ray.data.samples import draw_permutation, rng_for, stable_hash

TRAIN, VALID, TEST = "train", "valid", "test"


def fold_of(user: str, folds: int, seed: int) -> int:
    """The retrieval fold of a user's training windows: a stable hash, not the order users come in."""
    return stable_hash(f"{seed}:{user}") % folds


def mark_roles(df: pd.DataFrame, history: int, holdout: int, windows: int) -> pd.DataFrame:
    """`df` (user, item, rating, timestamp) sorted per user by (timestamp, item), with columns
    pos (0-based place in the user's sequence), role (train / valid / test: which window the
    rating is a positive of, train for the rest) and window (the training window the rating is a
    positive of, 0 = the most recent; -1 for none)."""
    df = df.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    pos = df.groupby("user").cumcount().to_numpy()
    n = df.groupby("user")["item"].transform("size").to_numpy()
    eligible = n >= history + 2 * holdout
    role = np.where(eligible & (pos >= n - holdout), TEST,
                    np.where(eligible & (pos >= n - 2 * holdout), VALID, TRAIN))
    end = np.where(eligible, n - 2 * holdout, n)  # where the user's training windows end
    back = end - 1 - pos  # 0 for the last training rating
    w = back // holdout
    # window w's positives [end - (w+1)·holdout, end - w·holdout) need H ratings before them
    fits = (role == TRAIN) & (w < windows) & (end - (w + 1) * holdout >= history)
    return df.assign(pos=pos, role=role, window=np.where(fits, w, -1))


def fit_masks(marked: pd.DataFrame, folds: int, seed: int) -> dict[str, np.ndarray]:
    """Which rows of `marked` each retriever fit may see (module docstring), as boolean arrays:
    "test", "valid" and "train-<k>" for each fold k. A user's fold is hashed once, not per rating."""
    train = marked["role"].eq(TRAIN).to_numpy()
    codes, users = pd.factorize(marked["user"].astype(str))
    fold = np.array([fold_of(u, folds, seed) for u in users], dtype=np.int64)[codes]
    in_window = train & (marked["window"].to_numpy() >= 0)
    out = {TEST: ~marked["role"].eq(TEST).to_numpy(), VALID: train}
    for k in range(folds):
        out[f"{TRAIN}-{k}"] = train & ~(in_window & (fold == k))
    return out


def fit_frame(marked: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The interactions of one fit (`fit_masks`)."""
    return marked.loc[mask, ["user", "item", "rating", "timestamp"]].reset_index(drop=True)


def fit_frames(marked: pd.DataFrame, folds: int, seed: int) -> dict[str, pd.DataFrame]:
    """The interactions each retriever fit may see: `fit_frame` of each of `fit_masks`."""
    return {name: fit_frame(marked, mask) for name, mask in fit_masks(marked, folds, seed).items()}


def fit_name(split: str, user: str, folds: int, seed: int) -> str:
    """Which fit a window's candidates come from."""
    return f"{TRAIN}-{fold_of(user, folds, seed)}" if split == TRAIN else split


def user_windows(group: pd.DataFrame, history: int, folds: int, seed: int) -> list[dict]:
    """One user's windows from her `mark_roles` rows (sorted by pos): what retrieval needs
    (`seen`: every item rated before the window) and what the sample keeps."""
    items = group["item"].astype(str).tolist()
    ratings = group["rating"].astype(float).tolist()
    times = group["timestamp"].astype(int).tolist()
    user = str(group["user"].iloc[0])
    keys = list(zip(group["role"], group["window"]))
    out = []
    for split, window in dict.fromkeys(k for k in keys if k[0] != TRAIN or k[1] >= 0):
        idx = [i for i, k in enumerate(keys) if k == (split, window)]
        p = idx[0]
        out.append({
            "user": user, "split": split, "window": int(window) if split == TRAIN else 0,
            "fit": fit_name(split, user, folds, seed),
            "seen": items[:p],
            "history_items": items[p - history:p], "history_ratings": ratings[p - history:p],
            "target_items": [items[i] for i in idx], "target_ratings": [ratings[i] for i in idx],
            "target_timestamps": [times[i] for i in idx],
        })
    return out


def topn_sample(window: dict, candidates: Sequence[str], scores: Sequence[float], *, permutations: int,
                seed: int) -> dict:
    """A prepared sample (data/dataset.py SAMPLE_SCHEMA) from a window and its retrieved candidates
    (best first): the candidates in a seeded shuffle, relevance = rating for a positive, else 0;
    the gold order by relevance, then earlier time (positives), then the retriever's order."""
    user, w = window["user"], int(window["window"])
    c = len(candidates)
    shuffle = rng_for(seed, user, w, stable_hash(window["split"])).permutation(c).tolist()
    rating = dict(zip(window["target_items"], window["target_ratings"]))
    when = dict(zip(window["target_items"], window["target_timestamps"]))
    ids = [str(candidates[j]) for j in shuffle]
    rel = [float(rating.get(i, 0.0)) for i in ids]
    times = [int(when.get(i, 0)) for i in ids]
    retrieved_rank = {i: r for r, i in enumerate(map(str, candidates))}
    gold = sorted(range(c), key=lambda j: (-rel[j], times[j] if rel[j] > 0 else 0, retrieved_rank[ids[j]]))
    perm_rng = rng_for(seed, user, w, stable_hash(window["split"]), 1)
    return {
        "user": user, "split": window["split"], "window": w,
        "history_items": list(window["history_items"]), "history_ratings": list(window["history_ratings"]),
        "candidate_ids": ids, "candidate_ratings": rel, "candidate_timestamps": times,
        "gold_order": gold,
        "perm_orders": [draw_permutation(perm_rng, c) for _ in range(permutations if window["split"] == TRAIN else 0)],
        "target_items": list(window["target_items"]),
        "target_ratings": [float(r) for r in window["target_ratings"]],
        "retriever_scores": [float(scores[j]) for j in shuffle],
    }
