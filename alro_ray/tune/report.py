"""A study's report: the trial table (trials.md, trials.json), Optuna's parameter importances,
the plot (tune.png) and best.yaml, read back from the Tune experiment on disk."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alro_ray.config import Config, to_dict
from alro_ray.tune.space import NDCG_KEYS, trial_config


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
    best_checkpoint: Path | None = None  # the best trial's ranker directory (rank/ranker.py format)
    plot: Path | None = None
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""


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
    from ray.tune import ExperimentAnalysis  # heavy: the CLI imports this module

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
    import optuna  # heavy, and only needed once a study has results

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


def fmt(x, digits: int = 4) -> str:
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
        cells = [str(t["number"]), t["trial_id"] + star, *(fmt(t["params"].get(p)) for p in params),
                 *(fmt(t.get(k)) for k in NDCG_KEYS), str(t["epochs"]), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(trials: list[dict], importances: dict[str, float], note: str, metric: str, path: Path) -> Path:
    import matplotlib  # heavy, and only needed once a study has results

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
