"""ALRO fine-tuning on Ray Train: LoRA under DeepSpeed ZeRO, one process per worker; this is the
driver side, which imports no torch (the workers' side: worker.py, epoch.py).

`run_training` locks the output directory (one run at a time: files.run_lock), checks everything
it can before a worker starts, prepares the data if the config names a dataset, then runs a
`TorchTrainer` whose workers execute `worker.train_loop`.
Each epoch every worker reports its losses, the validation NDCG and its part of a checkpoint
(worker.py, checkpoints.py). A rerun with the same output directory and run name resumes from the last
complete checkpoint, if its settings are this run's (checkpoints.plan_resume), and `FailureConfig`
restarts a crashed worker group from it. final/ and history.json are replaced all or nothing. NaN/inf losses and
gradients skip their update on every worker; too many stop the run (guard.py). With a frozen LM
(`model.freeze_lm`) the workers read its states once and fit the score head on them (frozen.py).

Output directory layout:
  DIR/data/                       prepared data (when the config names a dataset)
  DIR/shares/train_R.parquet      worker R's share of the train split (shares.py)
  DIR/ray/<run_name>/epoch_NNN/   Ray Train checkpoints (DeepSpeed state + ranker/)
  DIR/final/                      the final ranker (see rank/ranker.py)
  DIR/history.json                per-epoch metrics
  DIR/nonfinite_error.txt         why the last run stopped on NaN/inf (see guard.py)
  DIR/.alro-run.lock              held while a run writes here (files.run_lock)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train

from alro_ray.cluster import ensure_ray, quiet_ray_data
from alro_ray.compat import check_training
from alro_ray.config import Config, to_dict
from alro_ray.data.dataset import read_stats
from alro_ray.data.prepare import prepare
from alro_ray.errors import AlroError, DataError, NonFiniteError
from alro_ray.files import replace_dir, run_lock, write_json
from alro_ray.model.loading import prepare_model_cache
from alro_ray.train import guard
from alro_ray.train.checkpoints import plan_resume, set_aside_final
from alro_ray.train.shares import ordered_ingest, share_datasets
from alro_ray.train.train_tracking import TrainTracking

log = logging.getLogger("alro_ray")

KEEP_METRIC = "valid_ndcg@10"  # what train.keep: best picks the final ranker's epoch by


@dataclass
class TrainOutcome:
    output_dir: Path
    final_dir: Path
    history: list[dict]
    data_dir: Path


def prepared_with(cfg: Config, data_dir: Path) -> bool:
    """Whether data_dir holds what cfg.data would prepare: the same data settings, wherever either
    points `prepared` (DataError: data_dir holds no readable prepared data)."""
    return {**read_stats(data_dir).config["data"], "prepared": None} == {**to_dict(cfg.data), "prepared": None}


def resolve_data(cfg: Config, out: Path) -> Path:
    """The prepared data directory: the configured one, or DIR/data prepared now (once)."""
    if cfg.data.prepared:
        data_dir = Path(cfg.data.prepared).resolve()
        read_stats(data_dir)
        return data_dir
    data_dir = out / "data"
    try:
        if prepared_with(cfg, data_dir):
            log.info("using the data prepared earlier in %s", data_dir)
            return data_dir
    except DataError:
        pass
    prepare(cfg, data_dir)
    return data_dir


def check_writable(out: Path) -> None:
    """Write a small file into the output directory now, rather than fail after training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".alro-write-probe"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as e:
        raise AlroError(f"cannot write to the output directory {out}: {e.strerror or e}. Choose a writable "
                        f"directory with free space (--output-dir, or train.output_dir and train.run_name)") from None


def run_training(cfg: Config, output_dir: str | Path | None = None,
                 callbacks: list | None = None, tracking_parent: str | None = None) -> TrainOutcome:
    """`callbacks`: extra Ray Train `RunConfig` callbacks (tune/study.py passes Tune's
    `TuneReportCallback` so every epoch's metrics reach the Tune scheduler). `tracking_parent`:
    the MLflow run to nest this run's under (a study's, a comparison's; see tracking.py)."""
    out = Path(output_dir or Path(cfg.train.output_dir) / cfg.train.run_name).resolve()
    check_writable(out)
    with run_lock(out, f"alro train (run {cfg.train.run_name})"):  # a second run into `out` is refused
        return _train(cfg, out, callbacks, tracking_parent)


def _train(cfg: Config, out: Path, callbacks: list | None, tracking_parent: str | None) -> TrainOutcome:
    (out / guard.FAILURE_FILE).unlink(missing_ok=True)  # a stop of an earlier run
    # Before the data is prepared again: a changed data.* would overwrite what the checkpoint learnt on.
    resume = plan_resume(out / "ray" / cfg.train.run_name, cfg)
    prepare_model_cache(cfg.model)  # once here, not in every worker
    ensure_ray()
    data_dir = resolve_data(cfg, out)
    stats = read_stats(data_dir)
    check_training(cfg, stats)
    tracked = TrainTracking.start(cfg, out, tracking_parent)  # an MLflow run, if tracking.mlflow is set

    t = cfg.train
    quiet_ray_data(progress=False)
    # Read before the workers start, in tasks that reserve no CPU: Train workers (and, under Tune,
    # other trials' workers) may hold every CPU, and a 1-CPU read task would then wait forever.
    # Each worker reads its own fixed share of train (shares.py) and all of valid.
    datasets = share_datasets(data_dir, t.num_workers, out / "shares") if stats.rows["train"] else {}
    if stats.rows["valid"]:
        datasets["valid"] = ray.data.read_parquet(str(data_dir / "valid"), num_cpus=0).materialize()
    from ray.train.torch import TorchTrainer  # imports torch: not on the path of the driver's checks

    from alro_ray.train.worker import LoopConfig, train_loop  # the workers' side imports torch

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=LoopConfig(to_dict(cfg), stats, str(data_dir), str(out),
                                     *((resume.epoch, resume.overrides) if resume else ())),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"GPU": t.gpus_per_worker, "CPU": t.cpus_per_worker} if t.use_gpu
            else {"CPU": t.cpus_per_worker},
        ),
        # Nothing is split by Ray: every worker iterates its own train share and all of valid
        # (scoring its own share of it), in the files' order (the seeded local shuffle aside).
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ordered_ingest()),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            # Ray keeps the latest checkpoint (resume) besides the 2 best by the score, if one is set.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, **(
                {"checkpoint_score_attribute": KEEP_METRIC, "checkpoint_score_order": "max"}
                if t.keep == "best" else {})),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # MLflow's epoch logger first: Tune may stop the trial as soon as its callback hears of the epoch.
            callbacks=[*tracked.callbacks(), *(callbacks or [])],
        ),
    )
    try:
        result = trainer.fit()
        error = result.error
    except ray.train.TrainingFailedError as e:
        error = e
    if error is not None:
        tracked.failed()
    if error is not None and guard.read_failure(out):
        raise NonFiniteError(guard.read_failure(out) + set_aside_final(out)) from None
    if error is not None:
        raise worker_error(error) or error
    if result.checkpoint is None:
        raise AlroError(f"training finished without a checkpoint ({result.error})")
    final = out / "final"
    kept = kept_checkpoint(result) if t.keep == "best" else result.checkpoint
    writing = final
    try:
        with kept.as_directory() as ckpt:
            state = json.loads((Path(ckpt) / "state.json").read_text())
            replace_dir(Path(ckpt) / "ranker", final)  # the previous final/ stays until this one is whole
        epoch, history = state["epoch"] + 1, state["history"]
        if kept.path != result.checkpoint.path:  # the whole run's history is in the latest checkpoint
            with result.checkpoint.as_directory() as ckpt:
                history = json.loads((Path(ckpt) / "state.json").read_text())["history"]
        writing = out / "history.json"
        write_json(writing, history)
    except OSError as e:
        raise AlroError(f"writing {writing} failed: {e}. It is as it was, and the run's checkpoints are complete: "
                        f"free space and rerun to write it") from None
    log.info("final ranker in %s (epoch %d of %d, train.keep: %s)", final, epoch, len(history), t.keep)
    tracked.finished(out)
    return TrainOutcome(out, final, history, data_dir)


def worker_error(error: BaseException) -> AlroError | None:
    """The first project error a Train worker raised (a failed checkpoint write), to show as it
    is rather than inside Ray's TrainingFailedError."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        seen = failure
        while seen is not None:
            if isinstance(seen, AlroError):
                return seen
            seen = seen.__cause__
    return None


def kept_checkpoint(result):
    """train.keep: best: of the checkpoints Ray kept (the 2 best by KEEP_METRIC and the latest),
    the one with the best KEEP_METRIC; ties: the earliest epoch."""
    scored = [(m[KEEP_METRIC], -m["epoch"], c) for c, m in result.best_checkpoints if KEEP_METRIC in m]
    if not scored:
        raise AlroError(f"train.keep: best, but no epoch reported {KEEP_METRIC}")
    return max(scored, key=lambda x: x[:2])[2]
