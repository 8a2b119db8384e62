"""Hyper-parameter search over the ALRO loss weights: Ray Tune + Optuna (TPE) + ASHA.

`run_tune` prepares the data once (OUTPUT/data), then runs a Tune study in which every trial is
a full Ray Train run (`training.run_training`) of the config with the trial's α, β, γ (and
whatever else `tune.search_space` names, see `config.TUNABLE`). Ray Train V2 has no
`Tuner(trainer)`: the trial is a function that builds and fits the `TorchTrainer` itself, with
Tune's `TuneReportCallback` on the Train run so that every epoch's validation NDCG reaches the
ASHA scheduler and the Optuna searcher. The trial function asks Tune for no CPU; the Train
workers ask for `train.num_workers` x `train.cpus_per_worker` (and GPUs), so `tune.max_concurrent`
trials share the cluster.

The first trial evaluates the paper's values (α=0.1, β=0.01, γ=2). A study interrupted (Ctrl-C,
a lost driver, `--stop-after-trials`) resumes when the same command runs again: Tune restores the
experiment in OUTPUT/tune/<tune.name>, finished and failed trials are kept as they are, trials
that were running start again and their Train runs resume from their last epoch checkpoint.

Output directory layout (OUTPUT = --output-dir, default train.output_dir/tune.name):
  OUTPUT/data/                    the prepared data every trial reads (data.prepared)
  OUTPUT/study.yaml               the config the study was started with (resumes must match)
  OUTPUT/tune/<name>/             the Tune experiment (state, per-trial results)
  OUTPUT/trials/<trial_id>/       each trial's Train run: config.yaml, ray/, final/, history.json
  OUTPUT/trials.md, trials.json   the trial table
  OUTPUT/best.yaml                the best trial's full config (`alro train --config` accepts it)
  OUTPUT/tune.png                 NDCG@10 over trials and Optuna's parameter importances
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alro_ray.config import TUNABLE, Config, ConfigError, from_dict, save_config, to_dict
from alro_ray.errors import AlroError

log = logging.getLogger("alro_ray")

# The paper's loss weights (§5.3): the first point every study evaluates.
PAPER_POINT = {"alpha": 0.1, "beta": 0.01, "gamma": 2.0}
NDCG_KEYS = ("valid_ndcg@3", "valid_ndcg@10", "valid_ndcg@25")
# Settings a resumed study may differ in (Tune keeps the original ones: see `_check_study`).
_RESUME_FREE = ("num_samples", "max_concurrent")
EXIT_INTERRUPTED = 130
TRIAL_MEMORY = 256 * 1024**2  # bytes reserved for a trial's driver process (a Ray logical resource)


@dataclass
class TuneOutcome:
    output_dir: Path
    data_dir: Path
    experiment_dir: Path
    trials: list[dict]  # one record per trial, in the order Tune created them (see `collect_trials`)
    table: str  # the markdown table, as written to trials.md
    complete: bool  # False: the study stopped before its last trial ended; rerun to resume
    best: dict | None = None  # the best trial's record
    best_yaml: Path | None = None
    best_checkpoint: Path | None = None  # the best trial's ranker directory (checkpoint.py format)
    plot: Path | None = None
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""


# ---------------------------------------------------------------------------------------------
# Search space and trial configs.


def check_tune_config(cfg: Config) -> None:
    """What `Config.validate` cannot know: the metric must be one the Train run reports."""
    cfg.validate()
    if cfg.tune.metric not in NDCG_KEYS:
        raise ConfigError(f"tune.metric must be one of {list(NDCG_KEYS)} (maximised), got {cfg.tune.metric!r}")
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one of " + ", ".join(TUNABLE))


def search_space(cfg: Config) -> dict:
    from ray import tune

    return {name: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
            for name, r in cfg.tune.search_space.items()}


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def first_point(cfg: Config) -> dict | None:
    """The paper's α, β, γ (and the config's own value of any other tuned parameter), or None
    when the search space leaves one of them out of range."""
    point = {name: PAPER_POINT.get(name, _get(cfg, TUNABLE[name])) for name in cfg.tune.search_space}
    outside = [f"{n}={v} not in [{r.low}, {r.high}]" for n, r in cfg.tune.search_space.items()
               for v in [point[n]] if not r.low <= v <= r.high]
    if outside:
        log.warning("the paper's point is outside the search space (%s): not evaluated first", "; ".join(outside))
        return None
    return point


def trial_config(base: Config, params: dict) -> Config:
    """`base` with the trial's parameters set (names from `config.TUNABLE`), validated."""
    cfg = from_dict(Config, copy.deepcopy(to_dict(base)))
    for name, value in params.items():
        if name not in TUNABLE:
            raise ConfigError(f"{name}: not a tunable parameter (tunable: {', '.join(TUNABLE)})")
        section, key = TUNABLE[name].split(".")
        setattr(getattr(cfg, section), key, float(value))
    return cfg.validate()


def _absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: relative paths that exist here are
    made absolute so trials find them (on a cluster they must be on storage every node sees)."""
    for key in ("model.name", "model.tokenizer", "model.cache_dir", "data.data_dir", "data.prepared"):
        value = _get(cfg, key)
        if value and Path(value).exists():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, str(Path(value).resolve()))
    return cfg


def _train_trial(config: dict, base: dict, output_dir: str) -> None:
    """One Tune trial (runs in a Tune actor): a full Train run whose epoch reports go to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from alro_ray.train.trainer import run_training

    cfg = trial_config(from_dict(Config, base), config)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(output_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    # One line per start: a resumed study must not start a finished trial again (tests read it).
    with open(trial_dir / "starts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}\n")
    save_config(cfg, trial_dir / "config.yaml")
    # Same directory and run name on a restart: the Train run resumes from its last epoch checkpoint.
    run_training(cfg, trial_dir, callbacks=[TuneReportCallback()])


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# Interrupting a study on purpose (resumable, like Ctrl-C).

# ---------------------------------------------------------------------------------------------
# The study.


def _study_key(cfg: Config) -> dict:
    d = to_dict(cfg)
    for key in _RESUME_FREE:
        d["tune"].pop(key)
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


def _check_resources(cfg: Config) -> None:
    import ray

    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = t.num_workers * t.gpus_per_worker
    have = ray.cluster_resources()
    for res, per_trial in need.items():
        if have.get(res, 0) < per_trial:
            message = (f"one trial needs {per_trial:g} {res} (train.num_workers x per-worker), "
                       f"the cluster has {have.get(res, 0):g}")
            if not os.environ.get("RAY_ADDRESS"):
                raise AlroError(message)  # a local Ray we started: it would wait forever
            log.warning("%s: the trials wait until the autoscaler adds nodes", message)
        if have.get(res, 0) < per_trial * cfg.tune.max_concurrent:
            log.warning("%d concurrent trials need %g %s, the cluster has %g: trials will wait for "
                        "each other (or the autoscaler)", cfg.tune.max_concurrent,
                        per_trial * cfg.tune.max_concurrent, res, have.get(res, 0))


def run_tune(cfg: Config, output_dir: str | Path | None = None, *,
             stop_after_trials: int | None = None) -> TuneOutcome:
    """Run (or resume) the study that `cfg.tune` describes; write the trial table, best.yaml and
    the plot into the output directory. `stop_after_trials`: end this session, resumably, once
    that many trials have ended (the study resumes when run again)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from alro_ray.cluster import ensure_ray
    from alro_ray.data.prepare import read_stats
    from alro_ray.train.trainer import check_data_fits, resolve_data

    check_tune_config(cfg)
    if stop_after_trials is not None and stop_after_trials < 1:
        raise ConfigError(f"stop_after_trials must be >= 1, got {stop_after_trials}")
    cfg = _absolute_paths(from_dict(Config, to_dict(cfg)))
    out = Path(output_dir or Path(cfg.train.output_dir) / cfg.tune.name).resolve()
    exp_dir = out / "tune" / cfg.tune.name
    saved = _check_study(cfg, out, exp_dir)

    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    _check_resources(cfg)
    # Prepared once, before any trial; every trial reads it (data.prepared).
    data_dir = resolve_data(cfg, out)
    stats = read_stats(data_dir)
    if not stats["rows"]["valid"]:
        raise AlroError(f"{data_dir} has no validation rows: the study has nothing to select on")
    space_cfg = cfg.tune.search_space
    if stats["config"]["data"]["permutations"] < 1 and ("beta" in space_cfg or cfg.loss.beta > 0):
        raise AlroError("β > 0 needs permuted prompts: prepare the data with data.permutations >= 1")
    check_data_fits(cfg, stats)
    if saved is None:
        save_config(cfg, out / "study.yaml")
    base = copy.deepcopy(cfg)
    base.data.prepared = str(data_dir)

    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, base=to_dict(base), output_dir=str(out)),
        # The trial only drives its TorchTrainer: no CPU, so that the Train workers get them all
        # (Tune refuses an empty request; a token of memory stands in).
        {"CPU": 0, "memory": TRIAL_MEMORY},
    )
    from alro_ray.train.tune_interrupt import ACTIVE, InterruptAfter

    ACTIVE.clear()
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming the study in %s", exp_dir)
        # Failed trials stay failed; unfinished ones continue (their Train runs from checkpoints).
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        if stop_after_trials:
            # The restored RunConfig is the pickled original (Tune has no public way to change
            # it): add this session's interrupt to its callbacks.
            local = getattr(tuner, "_local_tuner", None)
            if local is None:
                raise AlroError("stop_after_trials cannot be added to a resumed study over Ray Client")
            local._run_config.callbacks = [*(local._run_config.callbacks or []), InterruptAfter(stop_after_trials)]
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
                max_concurrent_trials=cfg.tune.max_concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.tune.name,
                storage_path=str(out / "tune"),
                # A crashed trial is marked failed and the study goes on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[InterruptAfter(stop_after_trials)] if stop_after_trials else None,
                verbose=1,
            ),
        )
    tuner.fit()
    return report_study(cfg, out, data_dir, exp_dir)


# ---------------------------------------------------------------------------------------------
# Reporting.


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect_trials(exp_dir: Path, out: Path, cfg: Config) -> list[dict]:
    """One record per trial of the Tune experiment, in creation order: number, trial_id, status
    (completed, stopped early by ASHA, failed, unfinished), params, the last reported NDCGs,
    epochs run, the ranker checkpoint and the error (first line) of a failed trial."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp_dir))
    records = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        epochs = int(last.get("epoch") or 0)
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status == "TERMINATED":
            status = "completed" if epochs >= cfg.train.epochs else "stopped early"
        else:
            status = "unfinished"
        trial_dir = out / "trials" / trial.trial_id
        checkpoint = None
        if (trial_dir / "final").is_dir() and status == "completed":
            checkpoint = str(trial_dir / "final")
        elif last.get("checkpoint_path") and (Path(last["checkpoint_path"]) / "ranker").is_dir():
            checkpoint = str(Path(last["checkpoint_path"]) / "ranker")
        error = None
        if status == "failed":
            error_file = Path(trial.path or "", "error.txt")
            error = error_summary(error_file.read_text()) if error_file.is_file() else "failed"
        tag = str(trial.experiment_tag or "")
        number = int(tag.split("_", 1)[0]) if tag.split("_", 1)[0].isdigit() else len(records) + 1
        records.append({
            "number": number,
            "trial_id": trial.trial_id,
            "status": status,
            "params": {k: trial.config.get(k) for k in cfg.tune.search_space},
            **{k: _finite(last.get(k)) for k in NDCG_KEYS},
            "epochs": epochs,
            "checkpoint": checkpoint,
            "error": error,
        })
    return sorted(records, key=lambda r: r["number"])


def error_summary(text: str, limit: int = 300) -> str:
    """A failed trial's error in a line: the last `SomeError: ...` line of the traceback Tune saved,
    plus the first sentence of the final line when that adds the cause (e.g. a dead worker)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "failed"
    kinds = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b", ln)]
    head = kinds[-1] if kinds else lines[-1]
    last = lines[-1].split(". ")[0]
    summary = head if last == head or last in head else f"{head} {last}"
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def pick_best(trials: list[dict], metric: str) -> dict | None:
    """The trial with the highest last-reported `metric` (completed or stopped early); ties: the earliest."""
    ok = [t for t in trials if t["status"] in ("completed", "stopped early") and t.get(metric) is not None]
    return max(ok, key=lambda t: (t[metric], -t["number"])) if ok else None


def param_importances(trials: list[dict], cfg: Config) -> tuple[dict[str, float], str]:
    """Optuna's parameter importances (its default evaluator, PED-ANOVA) on a study rebuilt from the trials with a metric value (as
    the searcher saw them: an ASHA-stopped trial counts with its last value). Returns
    ({} , reason) when they cannot be computed (fewer than 2 such trials, a single parameter)."""
    import optuna

    metric = cfg.tune.metric
    done = [t for t in trials if t["status"] in ("completed", "stopped early") and t.get(metric) is not None]
    if len(done) < 2:
        return {}, f"parameter importances need at least 2 trials with {metric}, have {len(done)}"
    if len(cfg.tune.search_space) < 2:
        return {name: 1.0 for name in cfg.tune.search_space}, "a single tuned parameter"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {n: optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
             for n, r in cfg.tune.search_space.items()}
    study = optuna.create_study(direction="maximize")
    for t in done:
        study.add_trial(optuna.trial.create_trial(params={k: float(v) for k, v in t["params"].items()},
                                                  distributions=dists, value=t[metric]))
    try:
        with warnings.catch_warnings():  # e.g. "importances will be equal" when the scores tie
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)  # PED-ANOVA: Optuna's default
    except Exception as e:  # noqa: BLE001 - importances are a nicety; the study's results stand
        return {}, f"parameter importances failed: {e}"
    return {k: float(v) for k, v in imp.items()}, f"PED-ANOVA over {len(done)} trials"


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if (abs(x) < 1e-3 or abs(x) >= 1e4) and x != 0 else f"{x:.{digits}f}"
    return str(x)


def format_trials_table(trials: list[dict], params: list[str], best_id: str | None = None) -> str:
    head = ["#", "trial", *params, "NDCG@3", "NDCG@10", "NDCG@25", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        star = " *" if t["trial_id"] == best_id else ""
        status = t["status"] + (f" ({t['error'][:100]})" if t.get("error") else "")
        cells = [str(t["number"]), t["trial_id"] + star, *(_fmt(t["params"].get(p)) for p in params),
                 *(_fmt(t.get(k)) for k in NDCG_KEYS), str(t["epochs"]), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(trials: list[dict], importances: dict[str, float], note: str, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    colors = {"completed": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red", "unfinished": "tab:gray"}
    best, xs, ys = -math.inf, [], []
    for status, color in colors.items():
        pts = [(t["number"], t[metric]) for t in trials if t["status"] == status and t.get(metric) is not None]
        if pts:
            ax.scatter(*zip(*pts), color=color, label=status, zorder=3)
    for t in trials:
        if t["status"] in ("completed", "stopped early") and t.get(metric) is not None:
            best = max(best, t[metric])
            xs.append(t["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", alpha=0.5, label="best so far")
    for t in trials:
        if t["status"] == "failed":
            ax.axvline(t["number"], color="tab:red", alpha=0.3, linestyle=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (last reported epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if importances:
        names = sorted(importances, key=importances.get)
        bx.barh(names, [importances[n] for n in names], color="tab:green")
        bx.set_xlim(0, 1)
        bx.set_title(f"parameter importance ({note})", fontsize=9)
    else:
        bx.axis("off")
        bx.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_best(cfg: Config, best: dict, out: Path, data_dir: Path) -> Path:
    """best.yaml: the full config with the best parameters; `alro train --config` trains it into
    OUTPUT/best (data.prepared points at the study's data)."""
    best_cfg = trial_config(cfg, best["params"])
    best_cfg.data.prepared = str(data_dir)
    best_cfg.train.output_dir = str(out)
    best_cfg.train.run_name = "best"
    metric = cfg.tune.metric
    path = out / "best.yaml"
    header = (f"# Best trial of study {cfg.tune.name!r}: {best['trial_id']} (#{best['number']}), "
              f"{metric} {best[metric]:.4f} after {best['epochs']} epoch(s), {best['status']}.\n"
              f"# Its ranker: {best['checkpoint']}\n"
              f"# Train it again with: alro train --config {path}\n")
    path.write_text(header + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
    return path


def report_study(cfg: Config, out: Path, data_dir: Path, exp_dir: Path) -> TuneOutcome:
    trials = collect_trials(exp_dir, out, cfg)
    metric = cfg.tune.metric
    complete = bool(trials) and all(t["status"] != "unfinished" for t in trials)
    best = pick_best(trials, metric)
    params = list(cfg.tune.search_space)
    table = format_trials_table(trials, params, best["trial_id"] if best else None)
    (out / "trials.md").write_text(
        f"# Study {cfg.tune.name!r}: {len(trials)} trials, {metric} (last reported epoch)"
        f"{'' if complete else ', interrupted: rerun to resume'}\n\n{table}\n\n* best trial\n")
    importances, note = param_importances(trials, cfg)
    best_yaml = write_best(cfg, best, out, data_dir) if best else None
    (out / "trials.json").write_text(json.dumps({
        "study": cfg.tune.name, "metric": metric, "mode": "max", "complete": complete,
        "experiment_dir": str(exp_dir), "data_dir": str(data_dir), "trials": trials,
        "best": best, "best_yaml": str(best_yaml) if best_yaml else None,
        "importances": importances, "importance_note": note,
    }, indent=2))
    plot = plot_study(trials, importances, note, metric, out / "tune.png")
    return TuneOutcome(out, data_dir, exp_dir, trials, table, complete, best, best_yaml,
                       Path(best["checkpoint"]) if best and best["checkpoint"] else None,
                       plot, importances, note)


# ---------------------------------------------------------------------------------------------
# Command line: `alro tune` (cli.py registers add_tune_args + cmd_tune) and jobs/tune.py (main).


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, metavar="N", help="trials in the study (sets tune.num_samples)")
    parser.add_argument("--max-concurrent", type=int, metavar="M",
                        help="trials running at once (sets tune.max_concurrent)")
    parser.add_argument("--output-dir", help="study directory (default: train.output_dir/tune.name)")
    parser.add_argument("--stop-after-trials", type=int, metavar="K",
                        help="end this session once K trials have ended; rerun the command to resume")


def cmd_tune(args: argparse.Namespace, cfg: Config) -> int:
    if args.num_samples is not None:
        cfg.tune.num_samples = args.num_samples
    if args.max_concurrent is not None:
        cfg.tune.max_concurrent = args.max_concurrent
    check_tune_config(cfg)  # a ConfigError here exits 2 before anything starts
    outcome = run_tune(cfg, args.output_dir, stop_after_trials=args.stop_after_trials)
    print(f"\nStudy {cfg.tune.name!r} ({cfg.tune.metric}, last reported epoch; * best):")
    print(outcome.table)
    print("\nparameter importances: " + (", ".join(f"{k} {v:.3f}" for k, v in outcome.importances.items())
                                          or outcome.importance_note))
    print(f"trial table: {outcome.output_dir / 'trials.md'} and trials.json")
    print(f"plot:        {outcome.plot}")
    if outcome.best:
        b = outcome.best
        print(f"best trial:  {b['trial_id']} " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items())
              + f" -> {cfg.tune.metric} {b[cfg.tune.metric]:.4f}")
        print(f"best config: {outcome.best_yaml}  (alro train --config {outcome.best_yaml})")
        print(f"best ranker: {outcome.best_checkpoint}")
    if not outcome.complete:
        print("\nthe study stopped before its last trial ended: rerun the same command to resume it")
        return EXIT_INTERRUPTED
    if not outcome.best:
        print("\nno trial finished an epoch: see the failed trials' errors above", file=sys.stderr)
        return 1
    return 0
