"""How far classical models alone get on a prepared data set's test lists: the bar a `fused-` row
has to clear with the language model's own signal.

Fits on `fit_interactions.parquet` (as the baseline rows do): MF with several seeds, the seeds'
mean, an item-kNN (item-item on baseline residuals, shrunk similarities), and each of them
z-fused with the seed-0 `mf` row at the weight the valid lists choose (`rank/fusion.py`, as
`alro compare --fuse` chooses it). Prints NDCG@10 on valid and test and, for each test row, the
paired bootstrap difference to the `mf` row (docs/method.md, "The classical ceiling").

  python scripts/classical_ceiling.py runs/compare-ml100k/data [--seeds 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from alro_ray.data.dataset import read_split
from alro_ray.classical.registry import make_baseline, order_from_scores
from alro_ray.classical.common import sorted_interactions
from alro_ray.rank.evaluation import ranked_relevance
from alro_ray.evaluate.fusion_fit import choose_weight
from alro_ray.rank.fusion import fused_order
from alro_ray.rank.metrics import ndcg_at_k, paired_bootstrap


class ItemKNN:
    """r(u, i) = mu + b_i + sum_j s_ij (r_uj - b_uj) / sum_j |s_ij| over the k items j the user
    rated most similar to i; s_ij the residuals' cosine shrunk by n_ij / (n_ij + shrink)."""

    def __init__(self, k: int = 20, shrink: float = 100.0):
        self.k, self.shrink = k, shrink

    def fit(self, interactions: pd.DataFrame) -> "ItemKNN":
        df = sorted_interactions(interactions)
        self.mu = df.rating.mean()
        self.bi = df.groupby("item").rating.apply(lambda x: (x - self.mu).sum() / (len(x) + 25))
        res = df.rating - self.mu - df.item.map(self.bi)
        bu = res.groupby(df.user).apply(lambda x: x.sum() / (len(x) + 10))
        self.users = {u: n for n, u in enumerate(df.user.unique())}
        self.items = {i: n for n, i in enumerate(df.item.unique())}
        u, i = df.user.map(self.users).to_numpy(), df.item.map(self.items).to_numpy()
        self.R = np.zeros((len(self.users), len(self.items)))
        self.R[u, i] = res - df.user.map(bu)
        self.rated = np.zeros(self.R.shape, dtype=bool)
        self.rated[u, i] = True
        m = self.rated.astype(np.float64)
        norm = np.sqrt((self.R ** 2).T @ m * (m.T @ self.R ** 2)) + 1e-9
        n = m.T @ m
        self.S = (self.R.T @ self.R) / norm * n / (n + self.shrink)
        np.fill_diagonal(self.S, 0.0)
        return self

    def score(self, row) -> np.ndarray:
        u = self.users.get(str(row["user"]))
        seen = np.flatnonzero(self.rated[u]) if u is not None else None
        out = []
        for c in map(str, row["candidate_ids"]):
            j, base = self.items.get(c), self.mu + self.bi.get(c, 0.0)
            if u is None or j is None:
                out.append(base)
                continue
            top = seen[np.argsort(-self.S[j, seen], kind="stable")[: self.k]]
            w = self.S[j, top]
            out.append(base + w @ self.R[u, top] / (np.abs(w).sum() + 1e-9))
        return np.asarray(out)


def per_list(orders, rows) -> np.ndarray:
    return np.array([ndcg_at_k(rel, 10) for rel in ranked_relevance(rows, orders)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a prepared data directory (alro prepare --out)")
    p.add_argument("--seeds", type=int, default=5, help="MF seeds (seed 0 is the `mf` row)")
    a = p.parse_args()
    fit = pd.read_parquet(f"{a.data}/fit_interactions.parquet")
    rows = {s: read_split(a.data, s).to_dict("records") for s in ("valid", "test")}
    scores: dict[str, dict[str, list]] = {}

    def add(name, model):
        model.fit(fit)
        scores[name] = {s: [model.score(r) for r in rs] for s, rs in rows.items()}

    add("item-mean", make_baseline("item-mean"))
    for seed in range(a.seeds):
        add(f"mf seed {seed}", make_baseline("mf", seed=seed))
    scores["mf, mean of seeds"] = {s: [np.mean(x, axis=0) for x in zip(*(scores[f"mf seed {k}"][s]
                                                                         for k in range(a.seeds)))]
                                   for s in rows}
    for k in (20, 50):
        add(f"item-kNN k={k}", ItemKNN(k=k))

    mf = scores["mf seed 0"]
    ref = per_list([order_from_scores(x) for x in mf["test"]], rows["test"])

    def report(name: str, orders: dict[str, list]) -> None:
        v, t = (per_list(orders[s], rows[s]) for s in ("valid", "test"))
        d, lo, hi = paired_bootstrap(t, ref)
        print(f"{name:42s} {v.mean():7.4f} {t.mean():7.4f}  {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")

    print(f"{'ranked by':42s} {'valid':>7s} {'test':>7s}  test - mf [95%]")
    for name, sc in scores.items():
        report(name, {s: [order_from_scores(x) for x in sc[s]] for s in rows})
    print("z-fused with the mf row, the weight chosen on valid:")
    relevance = [r["candidate_ratings"] for r in rows["valid"]]
    for name, sc in scores.items():
        if name.startswith("mf seed"):
            continue
        w, _ = choose_weight(sc["valid"], mf["valid"], relevance, "score")
        report(f"mf + {name} (w {w:.1f})",
               {s: [fused_order(o, m, w, "score") for o, m in zip(sc[s], mf[s])] for s in rows})
    print(f"lists: valid {len(rows['valid'])}, test {len(rows['test'])}")


if __name__ == "__main__":
    main()
