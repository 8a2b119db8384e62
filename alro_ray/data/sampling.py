"""RecRanker's adaptive user sampling for the top-N protocol's training lists (`data.user_sampling`).

  all         every user's training lists
  uniform     `sampled_users` users drawn uniformly: the reference for the two below at the same
              budget (the same number of users)
  importance  users drawn one at a time with probability proportional to their activity (ratings
              in the training fit); a drawn user's weight is multiplied by `data.sampling_penalty`,
              so repeats become unlikely and the draw spreads; draws go on until `sampled_users`
              distinct users are in
  cluster     users embedded by a truncated SVD of their (row-normalised) binary interactions,
              k-means into `data.sampling_clusters` clusters, then the same number from each
              cluster (a small cluster gives all it has, the rest is shared out), uniformly inside

Seeded, and a function of the users and their interactions only, so a prepare repeats.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import svds

EMBED_DIM = 16


def sample_users(interactions: pd.DataFrame, method: str, n: int, seed: int, penalty: float = 0.1,
                 clusters: int = 10) -> tuple[list[str], dict]:
    """The users whose training lists are kept, and what the draw did (for stats.json)."""
    users = sorted(interactions["user"].astype(str).unique())
    if method == "all" or n >= len(users):
        return users, {"method": method, "users": len(users), "of": len(users)}
    activity = interactions["user"].astype(str).value_counts().reindex(users).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    info: dict = {}
    if method == "uniform":
        picked = rng.choice(len(users), size=n, replace=False).tolist()
    elif method == "importance":
        picked, draws = _importance(activity, n, penalty, rng)
        info = {"draws": draws}
    elif method == "cluster":
        labels = _clusters(interactions, users, clusters, seed)
        picked = _across(labels, n, rng)
        info = {"cluster_sizes": np.bincount(labels, minlength=clusters).tolist(),
                "picked_per_cluster": np.bincount(labels[picked], minlength=clusters).tolist()}
    else:
        raise ValueError(f"unknown user sampling {method!r}")
    chosen = sorted(users[i] for i in picked)
    return chosen, {"method": method, "users": len(chosen), "of": len(users),
                    "mean_activity": float(activity[picked].mean()), "mean_activity_all": float(activity.mean()),
                    **info}


def _importance(activity: np.ndarray, n: int, penalty: float, rng: np.random.Generator) -> tuple[list[int], int]:
    weight = activity.copy()
    picked: dict[int, None] = {}
    draws = 0
    while len(picked) < n:
        i = int(rng.choice(len(weight), p=weight / weight.sum()))
        draws += 1
        picked[i] = None
        weight[i] *= penalty
    return list(picked), draws


def _clusters(interactions: pd.DataFrame, users: list[str], k: int, seed: int) -> np.ndarray:
    row = {u: i for i, u in enumerate(users)}
    items = {it: j for j, it in enumerate(sorted(interactions["item"].astype(str).unique()))}
    x = sp.csr_matrix((np.ones(len(interactions)), (interactions["user"].astype(str).map(row).to_numpy(),
                                                     interactions["item"].astype(str).map(items).to_numpy())),
                      shape=(len(users), len(items)))
    x.data[:] = 1.0
    x = sp.diags(1.0 / np.sqrt(np.maximum(x.sum(axis=1).A.ravel(), 1.0))) @ x
    dim = max(1, min(EMBED_DIM, min(x.shape) - 1))
    u, s, _ = svds(x, k=dim, random_state=seed)
    _, labels = kmeans2(u * s, min(k, len(users)), seed=seed, minit="++")
    return labels


def _across(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """n users, as evenly over the clusters as their sizes allow, uniformly inside each."""
    members = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(labels.max() + 1)]
    quota = [0] * len(members)
    left = n
    while left > 0:
        open_ = [c for c, m in enumerate(members) if quota[c] < len(m)]
        share = max(1, left // len(open_))
        for c in open_:
            take = min(share, len(members[c]) - quota[c], left)
            quota[c] += take
            left -= take
            if left == 0:
                break
    return [i for c, m in enumerate(members) for i in m[:quota[c]]]
