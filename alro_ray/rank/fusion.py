"""Hybrid ranking (RecRanker): fuse the LLM's per-candidate scores with a classical model's.

  score  each list's scores z-normalised (mean 0, std 1; a constant list gives zeros), then
         w * llm + (1 - w) * classical
  borda  Borda points, C - 1 - rank (rank 0 = best; tied scores share their mean rank)
  rrf    reciprocal rank, 1 / (60 + rank + 1) (Cormack et al. 2009's k = 60)

w is the LLM's weight. A tie between two fused scores is broken by the classical model's score,
then by prompt position, so every order is deterministic. LLM scores per candidate: one-pass's first-slot log-probabilities, generate's minus
rank, the score head's scores; modes that only give an order (free, bootstrap@p) use minus rank.

`evaluate/fusion_fit.py` chooses the weight on the validation split and applies it to the
evaluation job's predictions (`alro evaluate --fuse mf`). With `--save-fusion` the chosen weights go
into the ranker checkpoint as fusion.json (`save_fusion_defaults`), per mode and classical model;
Serve uses them when a request's `fusion` names no weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from alro_ray.errors import AlroError
from alro_ray.files import locked, write_json

METHODS = ("score", "borda", "rrf")
DEFAULTS_FILE = "fusion.json"
DEFAULTS_FORMAT = "alro-fusion-v1"
SERVE_CLASSICAL = ("mf", "item-mean")  # the classical models a Serve request can fuse with
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
    # Locked: two --save-fusion runs into one ranker each keep the other's entries. Atomic: Serve
    # (which reads it at start) sees the old file or the new one.
    with locked(path.with_name(f".{DEFAULTS_FILE}.lock")):
        weights = {**read_fusion_defaults(ranker_dir), **chosen}
        write_json(path, {"format": DEFAULTS_FORMAT, "weights": weights})
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
