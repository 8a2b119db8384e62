"""ALRO's claims, measured on a finished `alro compare --seeds ... --reorders p` (`alro claims`;
docs/method.md, "ALRO's claims, measured").

A ladder names four of the comparison's recipes: `alro` (both terms), `sft` (neither), `wo_sll`
and `wo_psl`; a reference left out leaves out its claims (a ladder whose rows are still training). Every claim is the mean over seeds of each list's metric under one recipe minus
the same under the reference, with a paired bootstrap interval over lists (rank/metrics.py):

  alro-vs-sft       ALRO - SFT                         NDCG@10
  sll               ALRO - w/o SLL                     NDCG@10
  psl               ALRO - w/o PSL                     NDCG@10
  psl-vs-bootstrap  ALRO's one pass - w/o PSL's        NDCG@10, and the time per query
                    bootstrap@k (Borda over the original order and its first k - 1 reorders)
  stability         ALRO - w/o PSL                     Kendall tau across the reorders

Each ranker's rows are read from its evaluation (OUT/eval/<row>/predictions.parquet), which holds
the orders under the reorders (evaluate/stability.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from alro_ray.errors import AlroError
from alro_ray.evaluate.compare import seed_row, slug
from alro_ray.files import write_json
from alro_ray.rank.decoding import borda
from alro_ray.rank.metrics import list_stability, ndcg_at_k, paired_bootstrap


@dataclass
class Ladder:
    """Which compare variants play ALRO's ladder, and on what path. A reference left out (None)
    leaves out the claims that need it (CLAIMS_OF): the claims of a ladder not yet fully run."""

    path: str  # e.g. "score head, ML-100K rated"
    alro: str
    sft: str | None
    wo_sll: str | None
    wo_psl: str | None
    seeds: Sequence[int] = (0, 1, 2)
    mode: str = "score"
    bootstrap: int = 5  # k of the w/o-PSL model's bootstrap@k (needs --reorders >= k - 1)


# the claims each reference row is needed for
CLAIMS_OF = {"sft": ("alro-vs-sft",), "wo_sll": ("sll",), "wo_psl": ("psl", "psl-vs-bootstrap", "stability")}


def read_rows(out: Path, variant: str, ladder: Ladder) -> list[pd.DataFrame]:
    """One frame per seed: the variant's test rows in the ladder's mode, indexed by user. A seed's
    rows are `<variant>-seed<s>` (compare.seed_row), or the plain `<variant>` for the one seed
    without its own: the compare config's train.seed, unknown here."""
    frames, plain = [], [s for s in ladder.seeds if not (out / "eval" / slug(seed_row(variant, s, None))).is_dir()]
    if len(plain) > 1:
        raise AlroError(f"{out / 'eval'}: no evaluation of variant {variant!r} seeds {', '.join(map(str, plain))} "
                        f"(rows {variant}-seed<s>; the plain row {variant} is one seed's at most, the compare "
                        f"config's train.seed): run alro compare with --variant {variant}=... --seeds "
                        f"{','.join(map(str, plain))} into {out}")
    own = plain[0] if plain else None
    for seed in ladder.seeds:
        path = out / "eval" / slug(seed_row(variant, seed, own)) / "predictions.parquet"
        if not path.is_file():
            raise AlroError(f"{path}: no evaluation of variant {variant!r} seed {seed}: run alro compare with "
                            f"--variant {variant}=... --seeds {','.join(map(str, ladder.seeds))} into {out}")
        frame = pd.read_parquet(path)
        frame = frame[(frame["mode"] == ladder.mode) & (frame["split"] == "test")]
        if frame.empty:
            raise AlroError(f"{path}: no test rows in mode {ladder.mode!r}")
        frames.append(frame.set_index(frame["user"].astype(str)))
    return frames


def _orders(row) -> list[list[int]]:
    """The list's own candidate positions best first: the original order, then each reorder's."""
    again = row["reorder_ranks"] if row["reorder_ranks"] is not None else []
    ranks = [list(row["rank_of_position"]), *map(list, again)]
    return [sorted(range(len(r)), key=lambda j: r[j]) for r in ranks]


def one_pass_ndcg(row) -> float | None:
    return ndcg_at_k(list(row["predicted_ratings"]), 10, list(row["target_ratings"]))


def bootstrap_ndcg(k: int) -> Callable:
    """NDCG@10 of bootstrap@k: Borda over the original order and the list's first k - 1 reorders."""
    def metric(row) -> float | None:
        orders = _orders(row)
        if len(orders) < k:
            raise AlroError(f"bootstrap@{k} needs {k - 1} reorders per list; the evaluation has {len(orders) - 1}: "
                            f"run alro compare with --reorders {k - 1} or more")
        ratings = _ratings_by_position(row)
        return ndcg_at_k([ratings[j] for j in borda(orders[:k], len(ratings))], 10, list(row["target_ratings"]))
    return metric


def _ratings_by_position(row) -> list[float]:
    ranked = list(row["predicted_ratings"])
    return [ranked[r - 1] for r in row["rank_of_position"]]


def stability_tau(row) -> float:
    if row["reorder_ranks"] is None:
        raise AlroError("the stability claim needs the lists ranked under reorders: run alro compare with --reorders")
    ranks = [list(row["rank_of_position"]), *map(list, row["reorder_ranks"])]
    ratings = [list(row["predicted_ratings"]), *map(list, row["reorder_ratings"])]
    return list_stability(ranks, ratings, list(row["target_ratings"]))[0]


def seed_mean(frames: list[pd.DataFrame], metric: Callable, users: Sequence[str]) -> list[float | None]:
    """Per user, the mean over seeds of `metric` of that user's row (None where any seed's is)."""
    out = []
    for u in users:
        values = [metric(f.loc[u]) for f in frames]
        out.append(None if any(v is None for v in values) else float(np.mean(values)))
    return out


def paired(a: list[float | None], b: list[float | None]) -> tuple[float, list[float], int]:
    keep = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
    diff, lo, hi = paired_bootstrap([a[i] for i in keep], [b[i] for i in keep])
    return diff, [lo, hi], len(keep)


def _tpq(rows: dict[str, list[pd.DataFrame]]) -> float:
    """The one pass's seconds per query: the slowest ranker's mean. Every row of a ladder runs the
    same LM over the same prompts; with --reuse-states only the first ranker ran it and the others
    read its states back, so the slowest is the LM's forward."""
    return max(float(f["seconds"].mean()) for frames in rows.values() for f in frames)


def measure_claims(out: str | Path, ladder: Ladder) -> list[dict]:
    """The claims' records (module docstring) from the compare output `out`."""
    out = Path(out)
    rows = {name: read_rows(out, getattr(ladder, name), ladder) for name in ("alro", *CLAIMS_OF)
            if getattr(ladder, name) is not None}
    if len(rows) == 1:
        raise AlroError("no claim to measure: name at least one reference row (--sft, --wo-sll or --wo-psl)")
    users = sorted(set.intersection(*(set(f.index) for frames in rows.values() for f in frames)))
    if not users:
        raise AlroError(f"{out}: the ladder's rows share no test list")
    ndcg = {name: seed_mean(frames, one_pass_ndcg, users) for name, frames in rows.items()}
    base = {"path": ladder.path, "seeds": list(ladder.seeds), "metric": "ndcg@10"}

    def record(claim: str, a: list, b: list, reference: str, **extra) -> dict:
        diff, ci, n = paired(a, b)
        return {"claim": claim, **base, "row": ladder.alro, "reference": reference, "diff_ndcg@10": diff, "ci95": ci,
                "lists": n, **extra}

    records = []
    if "sft" in rows:
        records.append(record("alro-vs-sft", ndcg["alro"], ndcg["sft"], ladder.sft))
    if "wo_sll" in rows:
        records.append(record("sll", ndcg["alro"], ndcg["wo_sll"], ladder.wo_sll))
    if "wo_psl" in rows:
        records += _psl_records(rows, ndcg, users, ladder, record)
    return records


def _psl_records(rows: dict, ndcg: dict, users: Sequence[str], ladder: Ladder, record: Callable) -> list[dict]:
    """The claims against the w/o-PSL row: NDCG, its bootstrap@k, and τ across the reorders."""
    k = ladder.bootstrap
    boot = seed_mean(rows["wo_psl"], bootstrap_ndcg(k), users)
    tpq_one = _tpq(rows)
    tpq_boot = k * tpq_one  # k orders of the same prompt, each one forward of the one pass's length
    taus = {name: seed_mean(rows[name], stability_tau, users) for name in ("alro", "wo_psl")}
    tau_diff, tau_ci, _ = paired(taus["alro"], taus["wo_psl"])
    tau_with, tau_without = float(np.mean(taus["alro"])), float(np.mean(taus["wo_psl"]))
    return [
        record("psl", ndcg["alro"], ndcg["wo_psl"], ladder.wo_psl),
        record("psl-vs-bootstrap", ndcg["alro"], boot, f"{ladder.wo_psl} bootstrap@{k}",
               tpq_seconds={"one_pass": tpq_one, f"bootstrap@{k}": tpq_boot}, tpq_ratio=tpq_one / tpq_boot,
               tpq_note=f"the one pass: the slowest ranker's measured seconds per query (the LM's forward; "
                        f"with --reuse-states the others read its states); bootstrap@{k}: {k} forwards of "
                        f"the same prompt length, so {k} x that"),
        record("stability", ndcg["alro"], ndcg["wo_psl"], ladder.wo_psl,
               tau={"with_psl": tau_with, "without_psl": tau_without}, tau_diff=tau_diff, tau_diff_ci95=tau_ci,
               instability_ratio=(1 - tau_with) / max(1 - tau_without, 1e-12)),
    ]


def claims_table(records: Sequence[dict]) -> str:
    """The claims as a markdown table."""
    lines = ["| claim | path | row | reference | diff NDCG@10 | 95% interval | lists | seeds | more |",
             "| --- | --- | --- | --- | ---: | --- | ---: | --- | --- |"]
    for r in records:
        more = ""
        if "tau" in r:
            more = (f"τ {r['tau']['with_psl']:.4f} with PSL, {r['tau']['without_psl']:.4f} without "
                    f"(diff {r['tau_diff']:+.4f} [{r['tau_diff_ci95'][0]:+.4f}, {r['tau_diff_ci95'][1]:+.4f}]); "
                    f"1 - τ ratio {r['instability_ratio']:.2f}")
        elif "tpq_ratio" in r:
            more = f"TPQ ratio {r['tpq_ratio']:.2f}"
        lines.append(f"| {r['claim']} | {r['path']} | {r['row']} | {r['reference']} | {r['diff_ndcg@10']:+.4f} | "
                     f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['lists']} | "
                     f"{','.join(map(str, r['seeds']))} | {more} |")
    return "\n".join(lines) + "\n"


def write_claims(records: Sequence[dict], path: str | Path) -> None:
    """claims.json (the records) and claims.md (their table) beside it. One file holds every path's
    claims: records of other paths already in it stay, those of the paths written are replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {r["path"] for r in records}
    if path.is_file():
        records = [r for r in json.loads(path.read_text()) if r.get("path") not in written] + list(records)
    write_json(path, list(records))
    path.with_suffix(".md").write_text(claims_table(records))
