"""Hyper-parameter search over the ALRO loss weights: Ray Tune + Optuna (TPE) + ASHA.

`run_tune` prepares the data once (OUTPUT/data), then runs a Tune study in which every trial is
a full Ray Train run (`training.run_training`) of the config with the trial's α, β, γ (and
whatever else `tune.search_space` names, see `config.TUNABLE`). Ray Train V2 has no
`Tuner(trainer)`: the trial is a function that builds and fits the `TorchTrainer` itself, with
Tune's `TuneReportCallback` on the Train run so that every epoch's validation NDCG reaches the
ASHA scheduler and the Optuna searcher. The trial function asks Tune for no CPU; the Train
workers ask for `train.num_workers` x `train.cpus_per_worker` (and GPUs), so `tune.max_concurrent`
trials share the cluster (on a local Ray, no more than fit at once). A trial that ends, however it
ends, gives its Train placement group back, and one whose workers cannot get their resources within
`tune.resource_timeout_s` fails (see `tune/resources.py`).

The first trial evaluates the paper's values (α=0.1, β=0.01, γ=2). A study interrupted (Ctrl-C,
a lost driver, `--stop-after-trials`) resumes when the same command runs again: Tune restores the
experiment in OUTPUT/tune/<tune.name>, finished and failed trials are kept as they are, trials
that were running start again and their Train runs resume from their last epoch checkpoint.

Output directory layout (OUTPUT = --output-dir, default train.output_dir/tune.name):
  OUTPUT/data/                    the prepared data every trial reads (data.prepared)
  OUTPUT/study.yaml               the config the study was started with (resumes must match)
  OUTPUT/tune/<name>/             the Tune experiment (state, per-trial results)
  OUTPUT/trials/<trial_id>/       each trial's Train run: config.yaml, ray/, final/, history.json,
                                  starts.log, placement_groups
  OUTPUT/trials.md, trials.json   the trial table
  OUTPUT/best.yaml                the best trial's full config (`alro train --config` accepts it)
  OUTPUT/tune.png                 NDCG@10 over trials and Optuna's parameter importances
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import yaml

from alro_ray import tracking
from alro_ray.cluster import ensure_ray
from alro_ray.compat import check_training
from alro_ray.config import Config, ConfigError, from_dict, save_config, to_dict
from alro_ray.data.dataset import read_stats
from alro_ray.errors import AlroError
from alro_ray.train.trainer import resolve_data, run_training
from alro_ray.tune.interrupt import ACTIVE, InterruptAfter
from alro_ray.tune.report import TuneOutcome, report_study
from alro_ray.tune.resources import (START_TIMEOUT_ENV, ReleaseTrainResources, TrainResourceGuard, concurrent_trials,
                                     release_all, trial_resources)
from alro_ray.tune.space import absolute_paths, check_tune_config, first_point, search_space, trial_config

log = logging.getLogger("alro_ray")

# Settings a resumed study may differ in: Tune keeps the original ones (see `_check_study`) ...
_RESUME_FREE = ("num_samples", "max_concurrent")
# ... and ours, which the resumed session uses.
_RESUME_OURS = ("resource_timeout_s",)
EXIT_INTERRUPTED = 130
TRIAL_MEMORY = 256 * 1024**2  # bytes reserved for a trial's driver process (a Ray logical resource)


def _train_trial(config: dict, base: dict, output_dir: str, tracking_parent: str | None = None) -> None:
    """One Tune trial (runs in a Tune actor): a full Train run whose epoch reports go to Tune
    (and, with tracking on, to an MLflow run nested under the study's `tracking_parent`)."""
    # Ray Tune's own: only inside a trial.
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(from_dict(Config, base), config)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(output_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    # One line per start: a resumed study must not start a finished trial again (tests read it).
    with open(trial_dir / "starts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}\n")
    save_config(cfg, trial_dir / "config.yaml")
    # This process is the trial's alone; Ray Train passes the variable on to its controller.
    os.environ[START_TIMEOUT_ENV] = f"{cfg.tune.resource_timeout_s:g}"
    guard = TrainResourceGuard(trial_dir, trial_resources(cfg), cfg.tune.resource_timeout_s)
    try:
        # Same directory and run name on a restart: the Train run resumes from its last epoch checkpoint.
        run_training(cfg, trial_dir, callbacks=[TuneReportCallback(), guard], tracking_parent=tracking_parent)
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, AlroError):  # e.g. ResourceTimeoutError: say just that
            raise e.controller_failure from None
        raise


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# The study.


def _study_key(cfg: Config) -> dict:
    d = to_dict(cfg)
    for key in (*_RESUME_FREE, *_RESUME_OURS):
        d["tune"].pop(key)
    d.pop("tracking")  # where runs are logged does not change the study
    return d


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _check_study(cfg: Config, out: Path, exp_dir: Path) -> dict | None:
    """The config a study in OUTPUT was started with; refuses a different one (a resumed Tune
    experiment keeps its search space, searcher and sample count: mixing configs would mislead)."""
    path = out / "study.yaml"
    if not path.is_file():
        if exp_dir.exists() and any(exp_dir.iterdir()):
            raise ConfigError(f"{exp_dir} holds a Tune experiment but {path} is missing: "
                              "use a new --output-dir or tune.name")
        return None
    saved = yaml.safe_load(path.read_text())
    old = from_dict(Config, saved)
    changed = _diff(_study_key(old), _study_key(cfg))
    if changed:
        raise ConfigError(f"{out} holds study {old.tune.name!r} started with a different config "
                          f"({', '.join(changed)}); rerun with the same config to resume it, or use "
                          "a new --output-dir (or tune.name) for a new study")
    for key in _RESUME_FREE:
        if getattr(old.tune, key) != getattr(cfg.tune, key):
            log.warning("resuming study %r: Ray Tune keeps its original tune.%s=%s (asked: %s)",
                        old.tune.name, key, getattr(old.tune, key), getattr(cfg.tune, key))
    return saved


def run_tune(cfg: Config, output_dir: str | Path | None = None, *,
             stop_after_trials: int | None = None) -> TuneOutcome:
    """Run (or resume) the study that `cfg.tune` describes; write the trial table, best.yaml and
    the plot into the output directory. `stop_after_trials`: end this session, resumably, once
    that many trials have ended (the study resumes when run again)."""
    # Ray Tune and Optuna: only when a study runs.
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    check_tune_config(cfg)
    if stop_after_trials is not None and stop_after_trials < 1:
        raise ConfigError(f"stop_after_trials must be >= 1, got {stop_after_trials}")
    cfg = absolute_paths(from_dict(Config, to_dict(cfg)))
    out = Path(output_dir or Path(cfg.train.output_dir) / cfg.tune.name).resolve()
    exp_dir = out / "tune" / cfg.tune.name
    saved = _check_study(cfg, out, exp_dir)

    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    max_concurrent = concurrent_trials(cfg)
    # Prepared once, before any trial; every trial reads it (data.prepared).
    data_dir = resolve_data(cfg, out)
    stats = read_stats(data_dir)
    if not stats.rows["valid"]:
        raise AlroError(f"{data_dir} has no validation rows: the study has nothing to select on")
    space_cfg = cfg.tune.search_space
    check_training(cfg, stats, beta_searched="beta" in space_cfg)
    if saved is None:
        save_config(cfg, out / "study.yaml")
    base = copy.deepcopy(cfg)
    base.data.prepared = str(data_dir)
    # MLflow (if tracking.mlflow is set): a parent run for the study, each trial's Train run nested under it.
    # Each trial logs its own run (run_training), not Ray's MLflowLoggerCallback: that one would log Tune's
    # raw metric names (`valid_ndcg@10` is not a legal MLflow name) and not the full config or final ranker.
    study_run = tracking.start_run(cfg.tracking, f"study {cfg.tune.name}", run_dir=out,
                                   params=tracking.config_params(cfg), tags={"alro.command": "tune"})

    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, base=to_dict(base), output_dir=str(out),
                             tracking_parent=study_run.run_id if study_run else None),
        # The trial only drives its TorchTrainer: no CPU, so that the Train workers get them all
        # (Tune refuses an empty request; a token of memory stands in).
        {"CPU": 0, "memory": TRIAL_MEMORY},
    )
    ACTIVE.clear()
    session_callbacks = [InterruptAfter(stop_after_trials)] if stop_after_trials else []
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming the study in %s", exp_dir)
        # Failed trials stay failed; unfinished ones continue (their Train runs from checkpoints).
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # The restored RunConfig is the pickled original (Tune has no public way to change it):
        # add this session's callbacks to it (a study begun before ReleaseTrainResources lacks it).
        local = getattr(tuner, "_local_tuner", None)
        if local is None:
            raise AlroError("a study cannot be resumed over Ray Client: run the driver on the cluster")
        callbacks = list(local._run_config.callbacks or [])
        if not any(isinstance(c, ReleaseTrainResources) for c in callbacks):
            callbacks.append(ReleaseTrainResources(out))
        local._run_config.callbacks = callbacks + session_callbacks
    else:
        point = first_point(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode="max",
                # TPE, seeded (seed= is used because no sampler is passed).
                search_alg=OptunaSearch(points_to_evaluate=[point] if point else None, seed=cfg.tune.seed),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                        grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                        reduction_factor=cfg.tune.reduction_factor,
                                        # A trial that reaches the last epoch ends by itself, after
                                        # run_training has written its final ranker.
                                        stop_last_trials=False),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.tune.name,
                storage_path=str(out / "tune"),
                # A crashed trial is marked failed and the study goes on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[ReleaseTrainResources(out), *session_callbacks],
                verbose=1,
            ),
        )
    try:
        tuner.fit()
    finally:
        # Tune has stopped or killed every trial of this session: whatever they still hold is a leftover.
        release_all(out)
    outcome = report_study(cfg, out, data_dir, exp_dir)
    tracking.log_study(study_run, outcome)
    return outcome
