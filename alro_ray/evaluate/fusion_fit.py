"""Choosing a fusion weight (rank/fusion.py) on the validation split, and fusing the evaluation
job's predictions with a classical model's scores (`alro evaluate --fuse mf`).

w (the LLM's weight) is picked on the validation split from a grid (0, 0.1, ..., 1) as the one
with the highest mean NDCG@10; on a tie the first in grid order wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from alro_ray.classical.registry import make_baseline
from alro_ray.data.dataset import read_split
from alro_ray.errors import AlroError
from alro_ray.rank.fusion import METHODS, fuse, fused_order
from alro_ray.rank.evaluation import targets_of
from alro_ray.rank.metrics import mean_metrics

GRID = tuple(i / 10 for i in range(11))


def mean_ndcg_of(orders: Sequence[Sequence[int]], relevance: Sequence[Sequence[float]],
                 targets: Sequence[Sequence[float]] | None = None) -> float:
    """Mean NDCG@10 of orders (prompt positions) given each list's relevance by prompt position,
    against each list's targets (default: the list itself; the top-N protocol's held-out sets)."""
    ranked = [[float(rel[j]) for j in o] for o, rel in zip(orders, relevance)]
    return float(mean_metrics(ranked, targets if targets is not None else ranked)["ndcg@10"] or 0.0)  # None: all-zero


def choose_weight(llm: Sequence, classical: Sequence, relevance: Sequence, method: str,
                  grid: Sequence[float] = GRID, targets: Sequence | None = None) -> tuple[float, dict[float, float]]:
    """The grid weight with the highest mean NDCG@10 over the lists (first on ties), and the curve."""
    if not len(llm) or len(llm) != len(classical) or len(llm) != len(relevance):
        raise AlroError(f"choosing a fusion weight needs the same non-zero number of LLM, classical and "
                        f"relevance lists, got {len(llm)}, {len(classical)}, {len(relevance)}")
    curve = {float(w): mean_ndcg_of([fused_order(a, b, w, method) for a, b in zip(llm, classical)], relevance,
                                    targets) for w in grid}
    best = max(curve.values())
    return next(w for w, v in curve.items() if v == best), curve


# ---------------------------------------------------------------------------------------------
# On the evaluation job's predictions.


def fuse_predictions(data_dir: str | Path, valid: pd.DataFrame, test: pd.DataFrame, baselines: Sequence[str],
                     method: str = "score", split: str = "test", seed: int = 0,
                     grid: Sequence[float] = GRID) -> tuple[pd.DataFrame, dict]:
    """Rows `fused-<mode>-<baseline>` for every LLM mode in `test` and baseline: the weight chosen
    on `valid` (the same modes ranked on the valid split), applied to `test`. Predictions need
    columns user, mode, scores (per prompt position), seconds. Returns (predictions, fusion info)."""
    if method not in METHODS:
        raise AlroError(f"unknown fusion method {method!r}; choose from {', '.join(METHODS)}")
    fit = pd.read_parquet(Path(data_dir) / "fit_interactions.parquet")
    rows = {s: {r["user"]: r for r in read_split(data_dir, s).to_dict("records")} for s in ("valid", split)}
    out, info = [], {}
    for name in baselines:
        model = make_baseline(name, seed=seed).fit(fit)
        cls = {s: {u: model.score(r) for u, r in rows[s].items()} for s in rows}
        for mode in test["mode"].unique():
            v = valid[valid["mode"] == mode]
            if v.empty:
                raise AlroError(f"fusing {mode!r}: no valid-split predictions to choose the weight on")
            w, curve = choose_weight([list(x) for x in v["scores"]], [cls["valid"][u] for u in v["user"]],
                                     [rows["valid"][u]["candidate_ratings"] for u in v["user"]], method, grid,
                                     [targets_of(rows["valid"][u]) for u in v["user"]])
            fused = f"fused-{mode}-{name}"
            info[fused] = {"mode": mode, "baseline": name, "method": method, "weight": w,
                           "valid_ndcg@10": curve[w], "valid_curve": curve, "valid_lists": len(v)}
            for p in test[test["mode"] == mode].to_dict("records"):
                row = rows[split][p["user"]]
                order = fused_order(list(p["scores"]), cls[split][p["user"]], w, method)
                ids, ratings = list(row["candidate_ids"]), list(row["candidate_ratings"])
                rank_of_position = np.empty(len(order), dtype=np.int32)
                rank_of_position[order] = np.arange(1, len(order) + 1)
                out.append({**p, "mode": fused, "predicted_ids": [ids[j] for j in order],
                            "predicted_ratings": [float(ratings[j]) for j in order],
                            "rank_of_position": rank_of_position.tolist(), "repaired": False,
                            "scores": fuse(list(p["scores"]), cls[split][p["user"]], w, method).tolist()})
    return pd.DataFrame(out, columns=test.columns), info
