"""Hybrid ranking (RecRanker): fuse the LLM's per-candidate scores with a classical model's.

  score  each list's scores z-normalised (mean 0, std 1; a constant list gives zeros), then
         w * llm + (1 - w) * classical
  borda  Borda points, C - 1 - rank (rank 0 = best; tied scores share their mean rank)
  rrf    reciprocal rank, 1 / (60 + rank + 1) (Cormack et al. 2009's k = 60)

w (the LLM's weight) is picked on the validation split from a grid (0, 0.1, ..., 1) as the one
with the highest mean NDCG@10; on a tie the first in grid order wins. A tie between two fused
scores is broken by the classical model's score, then by prompt position, so every order is
deterministic. LLM scores per candidate: one-pass's first-slot log-probabilities, generate's minus
rank, the score head's scores; modes that only give an order (free, bootstrap@p) use minus rank.

`fuse_predictions` applies this to the evaluation job's predictions (`alro evaluate --fuse mf`).
With `--save-fusion` the chosen weights go into the ranker checkpoint as fusion.json
(`save_fusion_defaults`), per mode and classical model; Serve uses them when a request's `fusion`
names no weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from alro_ray.data.dataset import read_split
from alro_ray.errors import AlroError
from alro_ray.rank.metrics import mean_ndcg

METHODS = ("score", "borda", "rrf")
DEFAULTS_FILE = "fusion.json"
DEFAULTS_FORMAT = "alro-fusion-v1"
SERVE_CLASSICAL = ("mf", "item-mean")  # the classical models a Serve request can fuse with
GRID = tuple(i / 10 for i in range(11))
RRF_K = 60


def _scores(values) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise AlroError(f"fusion needs one finite score per candidate, got {values!r}")
    return s


def normalise(scores, method: str) -> np.ndarray:
    """One list's scores on the scale `method` adds (higher = better)."""
    s = _scores(scores)
    if method == "score":
        sd = s.std()
        return (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    rank = rankdata(-s, method="average") - 1  # 0 = best; ties share the mean rank
    if method == "borda":
        return len(s) - 1 - rank
    if method == "rrf":
        return 1.0 / (RRF_K + rank + 1)
    raise AlroError(f"unknown fusion method {method!r}; choose from {', '.join(METHODS)}")


def fuse(llm, classical, weight: float, method: str) -> np.ndarray:
    """w * llm + (1 - w) * classical, each normalised by `method`."""
    a, b = _scores(llm), _scores(classical)
    if a.shape != b.shape:
        raise AlroError(f"fusion: {len(a)} LLM scores but {len(b)} classical scores")
    return weight * normalise(a, method) + (1 - weight) * normalise(b, method)


def fused_order(llm, classical, weight: float, method: str) -> list[int]:
    """Prompt positions best first by the fused score; ties: classical score, then position."""
    fused, cls = fuse(llm, classical, weight, method), _scores(classical)
    return np.lexsort((np.arange(len(cls)), -cls, -fused)).tolist()


def mean_ndcg_of(orders: Sequence[Sequence[int]], relevance: Sequence[Sequence[float]], k: int = 10) -> float:
    """Mean NDCG@k of orders (prompt positions) given each list's relevance by prompt position."""
    ranked = [[float(rel[j]) for j in o] for o, rel in zip(orders, relevance)]
    return float(mean_ndcg(ranked, ks=(k,))[f"ndcg@{k}"] or 0.0)  # None: every list all-zero


def choose_weight(llm: Sequence, classical: Sequence, relevance: Sequence, method: str,
                  grid: Sequence[float] = GRID, k: int = 10) -> tuple[float, dict[float, float]]:
    """The grid weight with the highest mean NDCG@k over the lists (first on ties), and the curve."""
    if not len(llm) or len(llm) != len(classical) or len(llm) != len(relevance):
        raise AlroError(f"choosing a fusion weight needs the same non-zero number of LLM, classical and "
                        f"relevance lists, got {len(llm)}, {len(classical)}, {len(relevance)}")
    curve = {float(w): mean_ndcg_of([fused_order(a, b, w, method) for a, b in zip(llm, classical)], relevance, k)
             for w in grid}
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
    from alro_ray.rank.baselines import make_baseline

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
                                     [rows["valid"][u]["candidate_ratings"] for u in v["user"]], method, grid)
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


# ---------------------------------------------------------------------------------------------
# Saved weights: Serve's defaults.


def save_fusion_defaults(ranker_dir: str | Path, info: dict, evaluation: str) -> Path:
    """Write the weights `fuse_predictions` chose (`info`), for the classical models Serve can fuse
    with, into `ranker_dir`/fusion.json under "<mode>/<classical>"; entries of earlier runs for
    other modes or models stay. `evaluation` (the evaluation's output directory) is recorded."""
    chosen = {f"{i['mode']}/{i['baseline']}": {"weight": float(i["weight"]), "method": i["method"],
                                                 "valid_lists": int(i["valid_lists"]),
                                                 "valid_ndcg@10": float(i["valid_ndcg@10"]), "evaluation": evaluation}
              for i in info.values() if i["baseline"] in SERVE_CLASSICAL}
    if not chosen:
        raise AlroError(f"--save-fusion: Serve fuses with {', '.join(SERVE_CLASSICAL)} only; "
                        f"none of them was fused ({sorted({i['baseline'] for i in info.values()})})")
    path = Path(ranker_dir) / DEFAULTS_FILE
    weights = {**read_fusion_defaults(ranker_dir), **chosen}
    path.write_text(json.dumps({"format": DEFAULTS_FORMAT, "weights": weights}, indent=2))
    return path


def read_fusion_defaults(ranker_dir: str | Path) -> dict[str, dict]:
    """"<mode>/<classical>" -> {weight, method, ...} from `ranker_dir`/fusion.json ({} without one)."""
    path = Path(ranker_dir) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        weights = record["weights"] if record.get("format") == DEFAULTS_FORMAT else None
        if not isinstance(weights, dict):
            raise ValueError(f"not an {DEFAULTS_FORMAT} file")
        for key, w in weights.items():
            mode, _, classical = key.rpartition("/")
            if not mode or classical not in SERVE_CLASSICAL:
                raise ValueError(f"key {key!r} is not <mode>/<{'|'.join(SERVE_CLASSICAL)}>")
            if not 0 <= float(w["weight"]) <= 1 or w["method"] not in METHODS:
                raise ValueError(f"{key}: weight must be in [0, 1] and method one of {METHODS}, got {w}")
    except (ValueError, KeyError, TypeError) as e:
        raise AlroError(f"{path}: {e}; rewrite it with `alro evaluate --fuse mf --save-fusion`") from None
    return weights
