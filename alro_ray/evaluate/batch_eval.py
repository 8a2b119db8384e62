"""Batch evaluation job (`alro evaluate`): score a whole split with a trained ranker on Ray Data.

  read split -> map_batches(RankActor, ActorPoolStrategy; evaluate/rank_actor.py): one ranker per
  actor, every mode on each batch -> predictions.parquet (user, mode, predicted order, ratings in
  that order, repair flag, seconds per query, predicted rank of each prompt position; with
  --reorders p the rankings under p reorders of the candidates, evaluate/stability.py) -> metrics
  per mode, baselines on the same candidate lists -> metrics.json, report.md, plots.

Everything that can be wrong with the inputs is checked before an actor starts.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alro_ray.cluster import ensure_ray, quiet_ray_data
from alro_ray.compat import check_ranker_on_data
from alro_ray.data.dataset import read_split_table, read_stats
from alro_ray.errors import AlroError, NonFiniteError
from alro_ray.evaluate.baselines import evaluate_baselines
from alro_ray.evaluate.fusion_fit import fuse_predictions
from alro_ray.evaluate.rank_actor import RankActor
from alro_ray.evaluate.report import write_report
from alro_ray.evaluate.stability import COLUMNS as REORDER_COLUMNS, stability_of
from alro_ray.files import write_json
from alro_ray.model.ranker_info import read_ranker_info
from alro_ray.rank.evaluation import summary
from alro_ray.rank.fusion import save_fusion_defaults
from alro_ray.rank.metrics import position_bias
from alro_ray.rank.modes import parse_mode

log = logging.getLogger("alro_ray")

DEFAULT_MODES = ("generate", "one-pass", "bootstrap@3", "bootstrap@5")


def parse_modes(text: str | Sequence[str]) -> list[str]:
    modes = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not modes:
        raise AlroError("no ranking mode given")
    for m in modes:
        try:
            parse_mode(m)
        except ValueError as e:
            raise AlroError(str(e)) from e
    return modes


def check_inputs(checkpoint: str | Path, data_dir: str | Path | None) -> tuple[dict, Path, dict]:
    """The checkpoint's info, the data directory and its stats; errors before any actor starts."""

    info = read_ranker_info(checkpoint)
    data = Path(data_dir or info.data_dir or "")
    if not data_dir and not info.data_dir:
        raise AlroError(f"{checkpoint}: ranker.json names no data directory; pass --data")
    stats = read_stats(data)
    check_ranker_on_data(info, stats, data)
    return info, data, stats


def nonfinite_message(error: BaseException) -> str | None:
    """The message of the NonFiniteError an actor raised, or None if that is not what failed.
    Ray Data hands the driver a UserCodeException that keeps only the remote traceback as text
    (not the exception object), so the message is read off its last line naming the class."""
    name = f"{NonFiniteError.__module__}.{NonFiniteError.__qualname__}"
    found = re.findall(rf"^{re.escape(name)}: (.+)$", str(error), flags=re.MULTILINE)
    return found[-1] if found else None


def summarize(predictions: pd.DataFrame, protocol: str = "rated") -> dict[str, dict]:
    """Per mode: NDCG@k (and the top-N protocol's metrics), time per query, repair rate, position bias
    and the first-shown candidate's mean rank; with --reorders, stability across candidate orders."""
    out = {}
    for mode, part in predictions.groupby("mode", sort=False):
        metrics = summary([list(r) for r in part["predicted_ratings"]], [list(t) for t in part["target_ratings"]],
                          protocol)
        bias = position_bias(np.array([list(r) for r in part["rank_of_position"]]))
        out[mode] = {**metrics, "tpq_seconds": float(part["seconds"].mean()),
                     "repair_rate": float(part["repaired"].mean()), "position_bias": bias,
                     "first_shown_mean_rank": bias["mean_rank_by_position"][0], **stability_of(part)}
    return out


@dataclass
class EvalSettings:
    """How `run_evaluation` ranks a split (the options of `alro evaluate`)."""

    modes: Sequence[str] = DEFAULT_MODES  # generate, one-pass, free, score, bootstrap@p
    baselines: Sequence[str] = ("random", "popularity", "item-mean")  # scored on the same lists
    split: str = "test"
    actors: int = 1  # ranker actors, one model each
    # CPUs each actor reserves, hence its torch threads (Ray sets OMP_NUM_THREADS to them): with
    # the default 1, one actor ranks on one core of a machine's many.
    cpus_per_actor: int = 1
    batch_size: int = 8
    limit: int | None = None  # only the first N rows
    seed: int = 0  # bootstrap orders, random baselines
    use_gpu: bool = False  # one GPU per actor
    few_shot: int = 0  # k training samples before every prompt
    fuse: Sequence[str] = ()  # baselines to fuse each mode with (weight chosen on valid)
    fusion: str = "score"  # rank/fusion.py METHODS
    save_fusion: bool = False  # the chosen weights into the checkpoint's fusion.json (Serve's defaults)
    reorders: int = 0  # p: every list ranked again under p seeded reorders of its candidates (stability)
    # mode score of a frozen-LM ranker on states stored by an earlier ranker on the same LM and
    # prompts (evaluate/stored_states.py): an ablation's rows and seeds pay the LM's forward once
    reuse_states: bool = False


def run_evaluation(checkpoint: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
                   settings: EvalSettings | None = None) -> dict:
    """Rank `settings.split` in every mode; with `fuse` (baseline names) also the valid split, and
    add rows fused-<mode>-<baseline> (evaluate/fusion_fit.py: weight chosen on valid). With
    `save_fusion` the chosen weights also go into the checkpoint's fusion.json (Serve's defaults)."""
    s = settings or EvalSettings()
    modes = parse_modes(s.modes)
    info, data, stats = check_inputs(checkpoint, data_dir)
    if "score" in modes and not info.head:
        raise AlroError(f"{checkpoint} has no score head, so it cannot rank in mode 'score': train one with "
                        f"model.head.kind linear or mlp and loss.objective score, or drop that mode")
    if not stats.rows.get(s.split):
        raise AlroError(f"{data} has no {s.split} rows")
    if s.save_fusion and not s.fuse:
        raise AlroError("--save-fusion saves the weights --fuse chooses: give --fuse mf (or item-mean) too")
    if s.reorders < 0:
        raise AlroError(f"--reorders {s.reorders}: expected a number of reorders >= 0 (0: off)")
    if s.actors < 1 or s.cpus_per_actor < 1:
        raise AlroError(f"--actors {s.actors}, --cpus-per-actor {s.cpus_per_actor}: expected at least 1 of each")
    if s.fuse and (s.split == "valid" or not stats.rows.get("valid")):
        raise AlroError(f"--fuse chooses its weight on the valid split: {data} has no valid rows, or "
                        f"the split scored is valid itself")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = rank_split(checkpoint, data, modes, s)
    fusion_info = {}
    if s.fuse:  # the fusion weight is chosen on the valid split, ranked in the same modes
        valid = predictions[predictions["split"] == "valid"]
        predictions = predictions[predictions["split"] == s.split]
        fused, fusion_info = fuse_predictions(data, valid, predictions, s.fuse, s.fusion, s.split, s.seed)
        fused = fused.drop(columns=list(REORDER_COLUMNS), errors="ignore")  # its mode's reorders, not its own
        predictions = pd.concat([predictions, fused], ignore_index=True)
        write_frame(valid, out / "valid_predictions.parquet")
    write_frame(predictions, out / "predictions.parquet")

    metrics = {"checkpoint": str(checkpoint), "data": str(data), "split": s.split, "few_shot": s.few_shot,
               "protocol": stats.protocol, "modes": summarize(predictions, stats.protocol),
               "baselines": evaluate_baselines(data, s.baselines, s.split, s.seed, users=set(predictions["user"]),
                                               protocol=stats.protocol)}
    if fusion_info:
        metrics["fusion"] = fusion_info
    if s.save_fusion:
        path = save_fusion_defaults(checkpoint, fusion_info, str(out.resolve()))
        metrics["fusion_saved"] = str(path)
        log.info("fusion weights saved in %s (Serve's default when a request names no weight)", path)
    write_json(out / "metrics.json", metrics)
    write_report(metrics, out, history_path=Path(checkpoint) / "history.json")
    return metrics


def rank_split(checkpoint: str | Path, data: Path, modes: list[str], s: EvalSettings) -> pd.DataFrame:
    """Every row of the split (and of valid, to fuse) ranked in every mode by a pool of
    `RankActor`s: one prediction row per (user, mode)."""
    import ray  # Ray loads when an evaluation runs, not when the CLI imports this module

    ensure_ray()
    cpus = ray.cluster_resources().get("CPU", 0)
    if s.actors * s.cpus_per_actor > cpus:  # the pool would wait forever for its CPUs
        raise AlroError(f"--actors {s.actors} x --cpus-per-actor {s.cpus_per_actor} reserve "
                        f"{s.actors * s.cpus_per_actor} CPUs; the Ray cluster has {cpus:g}")
    quiet_ray_data(progress=True)
    table = read_split_table(data, s.split)
    if s.limit:  # the first N lists in the split's file order, the same N for every ranker
        table = table.slice(0, s.limit)
    if s.fuse:
        valid = read_split_table(data, "valid")
        table = pa.concat_tables([table, valid.slice(0, s.limit) if s.limit else valid], promote_options="default")
    # Read here and handed to Ray Data as blocks: the lists are small (rows of token ids) and every
    # one is ranked, so read tasks and a repartition would only add seconds before the first actor
    # starts (a third of a 32-list job's fixed cost); and the actors start with the blocks already
    # in the object store, as an actor pool that holds every CPU (--actors = the cluster's CPUs)
    # leaves Ray Data no budget for read tasks. A few blocks per actor: the actors share blocks,
    # not rows (one block per split kept one of 2 actors idle half the time).
    size = max(1, -(-len(table) // (4 * s.actors)))
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, len(table), size)])
    # predictions in the split's order whichever actor finishes first: the same file, and the
    # same float sums in the metrics, every run
    ds.context.execution_options.preserve_order = True
    t0 = time.time()
    ranked = ds.map_batches(
        RankActor,
        fn_constructor_kwargs=dict(checkpoint=str(Path(checkpoint).resolve()), data_dir=str(data),
                                   modes=list(modes), seed=s.seed, use_gpu=s.use_gpu, few_shot=s.few_shot,
                                   reorders=s.reorders, split=s.split, reuse_states=s.reuse_states),
        compute=ray.data.ActorPoolStrategy(size=s.actors),
        num_cpus=s.cpus_per_actor,
        num_gpus=1 if s.use_gpu else 0,
        batch_size=s.batch_size,
        batch_format="pandas",
    )
    # Through Arrow, without Ray's pandas metadata, so plain pandas/pyarrow read the file back;
    # promoted: a block of valid rows only (--fuse) has null reorder columns.
    try:
        blocks = ray.get(ranked.to_arrow_refs())
        table = pa.concat_tables(blocks, promote_options="default").replace_schema_metadata(None)
    except Exception as e:
        message = nonfinite_message(e)
        if message is None:
            raise
        raise NonFiniteError(f"{checkpoint}: evaluation stopped, no metrics written: {message}") from None
    predictions = table.to_pandas()
    log.info("ranked %d queries x %d modes in %.1f s", predictions["user"].nunique(), len(modes), time.time() - t0)
    return predictions


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """A predictions frame as Parquet without pandas metadata, so plain pyarrow reads it back."""
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None), path)
