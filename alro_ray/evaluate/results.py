"""A comparison's results on one test set: every method's ranking of the same lists.

What `alro compare` writes (and docs/results/<dataset>/ keeps):

  compare.json         {method: {"ndcg@3": .., "ndcg@10": .., "ndcg@25": ..}} (data.protocol rated);
                       {method: {"ndcg@5", "ndcg@10", "ndcg@20" (end-to-end), "recall@10", "hr@10",
                       "mrr", "ndcg_within@10"}} (topn; rank/metrics.py)
  predictions.parquet  one row per method and test user: method, user, ranking (candidate item
                       ids, best first), ratings (their ratings in that order), targets (the
                       ratings the list is scored against: its held-out set)
  details.json         per method: lists, seconds per query, training samples and wall time,
                       fusion weight, an LLM row's first-shown rank and (--reorders) stability
                       across candidate orders; and the paired bootstrap intervals
  compare.md           the same as a table, with the intervals

Method names: classical `random`, `popularity`, `item-mean`, `mf`, `gru4rec`, `sasrec` (and under
topn `retriever`, the candidates in the retriever's own order); a ranker
`llm-<variant>`; a ranker fused with a classical model `fused-<variant>-<baseline>`; the same
recipe trained with another train.seed (`alro compare --seeds`) `...<variant>-seed<s>...`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from alro_ray.errors import AlroError
from alro_ray.files import write_json
from alro_ray.rank.evaluation import targets_of
from alro_ray.rank.metrics import METRIC_ORDER, mean_metrics, ndcg_at_k, paired_bootstrap
from alro_ray.evaluate.report import LISTS, TPQ, bias_columns, column, ndcg_table, reorders_of, stability_note
from alro_ray.evaluate.stability import KEYS as STABILITY_KEYS

LLM, FUSED = "llm-", "fused-"
# What each protocol's best rows are held against: rated, item-mean and MF (issue 11); topn, the
# retriever's own order and the best classical row (the top-N issue's targets).
REFERENCES = {"rated": ((LLM, "item-mean"), (FUSED, "mf")), "topn": ((LLM, "retriever"), (FUSED, None))}
SEED_ROW = re.compile(r"-seed\d+(?=-|$)")  # what `--seeds` adds to the rows of the later seeds


@dataclass
class MethodResult:
    """One method's rankings of the test lists, and what it cost."""

    rankings: dict[str, list[str]]  # user -> candidate item ids, best first
    ratings: dict[str, list[float]]  # user -> the candidates' ratings in that order
    info: dict = field(default_factory=dict)  # tpq_seconds, train_samples, train_seconds, fusion, ...
    targets: dict[str, list[float]] = field(default_factory=dict)  # user -> held-out set; absent: the list

    def target(self, user: str) -> list[float]:
        return self.targets.get(user, self.ratings[user])

    def ndcg(self, users: Sequence[str], k: int = 10) -> list[float | None]:
        return [ndcg_at_k(self.ratings[u], k, self.target(u)) for u in users]


def baseline_results(data_dir: str | Path, names: Sequence[str], split: str = "test", seed: int = 0,
                     users: set | None = None) -> dict[str, MethodResult]:
    """Each classical baseline's rankings of DIR/<split> (`baselines.run_baselines`)."""
    from alro_ray.evaluate.baselines import run_baselines  # imports torch: only where baselines are fitted

    out = {}
    for name, run in run_baselines(data_dir, names, split, seed, users=users).items():
        pairs = list(zip(run.rows, run.orders))
        out[name] = MethodResult({r["user"]: [r["candidate_ids"][j] for j in o] for r, o in pairs},
                                 {r["user"]: [float(r["candidate_ratings"][j]) for j in o] for r, o in pairs},
                                 {"fit_seconds": run.fit_seconds, "tpq_seconds": run.tpq_seconds},
                                 {r["user"]: targets_of(r) for r, _ in pairs})
    return out


def ranker_results(predictions: pd.DataFrame, variant: str, modes: dict[str, dict], fusion: dict[str, dict],
                   train: dict | None = None) -> dict[str, MethodResult]:
    """The rows of one ranker's evaluation (batch_eval's predictions.parquet and metrics): mode m
    becomes `llm-<variant>-<m>` (just `llm-<variant>` when the variant names its mode), a fused
    mode `fused-<m>-<baseline>` becomes `fused-<variant>-<m>-<baseline>`."""
    out = {}
    for mode, part in predictions.groupby("mode", sort=False):
        fused = mode.startswith(FUSED)
        llm_mode = fusion[mode]["mode"] if fused else mode
        name = variant if variant.endswith(llm_mode) else f"{variant}-{llm_mode}"
        name = f"{FUSED}{name}-{fusion[mode]['baseline']}" if fused else f"{LLM}{name}"
        info = {"tpq_seconds": modes[llm_mode]["tpq_seconds"], **(train or {}),
                **{k: v for k, v in modes.get(mode, {}).items() if k in STABILITY_KEYS}}  # a fused mode: no reorders
        if fused:
            info["fusion"] = {k: fusion[mode][k] for k in ("method", "weight", "valid_ndcg@10", "valid_lists")}
        out[name] = MethodResult(dict(zip(part["user"], map(list, part["predicted_ids"]))),
                                 dict(zip(part["user"], (list(map(float, r)) for r in part["predicted_ratings"]))),
                                 info, _targets(part, "target_ratings"))
    return out


def common_users(results: dict[str, MethodResult]) -> list[str]:
    """The users every method ranked; refuses methods that ranked different lists."""
    sets = {name: set(r.rankings) for name, r in results.items()}
    first = next(iter(sets.values()))
    odd = [n for n, s in sets.items() if s != first]
    if odd:
        raise AlroError(f"methods {odd} ranked other users than {next(iter(sets))}: every row must be on the same lists")
    return sorted(first)


def _targets(part: pd.DataFrame, column: str) -> dict[str, list[float]]:
    """user -> targets from a predictions frame; {} for files written before the top-N protocol."""
    return dict(zip(part["user"], (list(map(float, t)) for t in part[column]))) if column in part else {}


def metrics(results: dict[str, MethodResult], users: Sequence[str], protocol: str = "rated") -> dict[str, dict]:
    return {name: {**mean_metrics([r.ratings[u] for u in users], [r.target(u) for u in users], protocol), **r.info}
            for name, r in results.items()}


def references(protocol: str, table: dict[str, dict], classical: Sequence[str]) -> list[tuple[str, str]]:
    """(prefix, reference row) pairs of the protocol; topn's fused rows are held against the best
    classical row by NDCG@10 (the retriever included)."""
    out = []
    for prefix, ref in REFERENCES[protocol]:
        if ref is None:
            present = [n for n in classical if n in table and table[n].get("ndcg@10") is not None]
            ref = max(present, key=lambda n: table[n]["ndcg@10"], default=None)
        if ref is not None:
            out.append((prefix, ref))
    return out


def intervals(results: dict[str, MethodResult], users: Sequence[str], table: dict[str, dict],
              refs: Sequence[tuple[str, str]]) -> list[dict]:
    """For each (prefix, reference): the best row with that prefix by test NDCG@10 minus the
    reference, mean over users with a 95% paired bootstrap interval. The best is picked on the test
    lists themselves, so its interval is a little optimistic; every other row is listed too."""
    out = []
    for prefix, ref in refs:
        if ref not in results:
            continue
        b = results[ref].ndcg(users)
        for name in sorted((n for n in results if n.startswith(prefix)), key=lambda n: -table[n]["ndcg@10"]):
            a = results[name].ndcg(users)
            keep = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None]
            diff, lo, hi = paired_bootstrap([a[i] for i in keep], [b[i] for i in keep])
            out.append({"method": name, "reference": ref, "ndcg@10_diff": diff, "ci95": [lo, hi],
                        "lists": len(keep), "best": not any(o["reference"] == ref for o in out)})
    return out


def seed_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """The rows of one recipe trained with several train.seeds (`alro compare --seeds`: the config's
    own seed's row `llm-x-score`, the others' `llm-x-seed1-score`, ...), by the row without a seed
    (which may be absent: seeds trained apart from the config's own)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(SEED_ROW.sub("", name, count=1), []).append(name)
    return {base: rows for base, rows in groups.items() if len(rows) > 1}


def seed_means(results: dict[str, MethodResult], users: Sequence[str], table: dict[str, dict],
               refs: Sequence[tuple[str, str]]) -> list[dict]:
    """For each recipe with several seeds: its seeds' NDCG@10 (spread, mean) and the mean over its
    seeds of each list's NDCG@10 minus the reference's, with a 95% paired bootstrap interval: the
    recipe's level, where the best row (`intervals`) is its luckiest seed."""
    out = []
    for base, names in seed_groups(list(results)).items():
        ref = next((r for prefix, r in refs if base.startswith(prefix)), None)
        if ref not in results:
            continue
        per_seed, b = [results[n].ndcg(users) for n in names], results[ref].ndcg(users)
        keep = [i for i in range(len(users)) if b[i] is not None and all(p[i] is not None for p in per_seed)]
        diff, lo, hi = paired_bootstrap([sum(p[i] for p in per_seed) / len(names) for i in keep], [b[i] for i in keep])
        scores = [table[n]["ndcg@10"] for n in names]
        out.append({"recipe": base, "seeds": names, "ndcg@10": scores, "ndcg@10_mean": sum(scores) / len(scores),
                    "reference": ref, "ndcg@10_diff": diff, "ci95": [lo, hi], "lists": len(keep)})
    return out


def write_results(out: Path, results: dict[str, MethodResult], header: str, protocol: str = "rated",
                  classical: Sequence[str] = ()) -> dict[str, dict]:
    """compare.json, predictions.parquet, details.json and compare.md in `out`; returns the table.
    `classical`: the baseline rows (topn holds the best of them against the best fused row)."""
    users = common_users(results)
    table = metrics(results, users, protocol)
    refs = references(protocol, table, classical)
    gaps = intervals(results, users, table, refs)
    recipes = seed_means(results, users, table, refs)
    write_json(out / "compare.json", {n: {k: m[k] for k in METRIC_ORDER if k in m} for n, m in table.items()})
    write_json(out / "details.json", {"users": len(users), "methods": table, "intervals": gaps,
                                      "seed_means": recipes}, default=float)
    frame = pd.DataFrame([{"method": n, "user": u, "ranking": r.rankings[u], "ratings": r.ratings[u],
                           "targets": r.target(u)} for n, r in results.items() for u in users])
    frame.to_parquet(out / "predictions.parquet", index=False)
    cols = [LISTS, TPQ, column("training samples", "train_samples", "d"),
            column("training wall (s)", "train_seconds", ".0f"), column("fusion weight", "fusion_weight", ".1f"),
            *bias_columns(table.values())]
    shown = {n: {**m, "fusion_weight": m.get("fusion", {}).get("weight")} for n, m in table.items()}
    note = ("First-shown rank: the mean predicted rank of the candidate shown first in the prompt ((C + 1) / 2: "
            "no first-position effect)." + stability_note(table.values()))
    if reorders_of(table.values()):
        note += (" Measured on the llm- rows only: a classical row reads no prompt (its scores are per item, "
                 "random's per list position, ties broken by position), a fused row's LLM scores come from the "
                 "original order; their cells are '-'.")
    lines = [header, "", ndcg_table(shown, cols), "", note, "",
             "Paired bootstrap over users (10000 resamples), NDCG@10 difference and 95% interval:", ""]
    lines += [f"- {'**best** ' if g['best'] else ''}{g['method']} - {g['reference']}: {g['ndcg@10_diff']:+.4f} "
              f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}] ({g['lists']} lists)" for g in gaps]
    if recipes:
        lines += ["", "Recipes trained with several seeds (`--seeds`): the mean over the seeds of each list's NDCG@10 "
                  "against the reference, 95% paired interval:", ""]
        lines += [f"- {r['recipe']} over {len(r['seeds'])} seeds (NDCG@10 {min(r['ndcg@10']):.4f} to "
                  f"{max(r['ndcg@10']):.4f}, mean {r['ndcg@10_mean']:.4f}) - {r['reference']}: {r['ndcg@10_diff']:+.4f} "
                  f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] ({r['lists']} lists)" for r in recipes]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return table


def read_results(directory: str | Path) -> dict[str, MethodResult]:
    """The rows of an earlier `write_results` directory (predictions.parquet + details.json), to
    merge into another table on the same lists."""
    directory = Path(directory)
    try:
        frame = read_predictions(directory / "predictions.parquet")
        methods = json.loads((directory / "details.json").read_text())["methods"]
    except (OSError, ValueError, KeyError) as e:
        raise AlroError(f"{directory} holds no `alro compare` results (predictions.parquet, details.json): {e}") from None
    out = {}
    for name, part in frame.groupby("method", sort=False):
        # details.json's metrics (ndcg@k, recall, lists, ...) are recomputed where merged
        info = {k: v for k, v in methods.get(name, {}).items() if k not in METRIC_ORDER and not k.startswith("lists")}
        out[name] = MethodResult(dict(zip(part["user"], map(list, part["ranking"]))),
                                 dict(zip(part["user"], (list(map(float, r)) for r in part["ratings"]))), info,
                                 _targets(part, "targets"))
    return out


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A results predictions.parquet, checked: one row per (method, user)."""
    frame = pd.read_parquet(path)
    if frame.duplicated(["method", "user"]).any():
        raise AlroError(f"{path}: a (method, user) pair appears twice")
    return frame


def ndcg_from_predictions(frame: pd.DataFrame, k: int = 10) -> dict[str, float]:
    """Mean NDCG@k per method, recomputed from the ratings and targets columns (a reader's check)."""
    out = {}
    for m, part in frame.groupby("method", sort=False):
        targets = part["targets"] if "targets" in part else part["ratings"]
        values = [ndcg_at_k(list(r), k, list(t)) for r, t in zip(part["ratings"], targets)]
        values = [v for v in values if v is not None]
        out[m] = sum(values) / len(values) if values else None
    return out
