"""Experiment tracking in MLflow: with `tracking.mlflow: URI` every command logs a run a team can
browse and compare (`mlflow ui --backend-store-uri URI`; docs/tracking.md).

  train     one run: the flattened config as params (`loss.alpha`, ..., and plain `alpha`, `beta`,
            `gamma`), each epoch's metrics as it ends (step = epoch; train/train_tracking.py), then
            final/ and history.json, and `alro train`'s test summary (report.md, plots, metrics)
  tune      a parent run for the study (trial table, best.yaml, plot) and one nested run per trial,
            each the trial's Train run as above
  evaluate  one run: metrics per ranking mode and per baseline (`test_ndcg_at_10/generate`,
            `test_ndcg_at_10/random`), the ranker's config as params, report.md and plots
  compare   a parent run with every table row's metrics, the trained variants nested under it

A run's id is kept in its output directory (`mlflow_run_id`), so a resumed run (same directory)
logs into the same MLflow run. Everything goes through `MlflowClient` with explicit run ids, not
mlflow's process-global active run: one process may hold several runs (a study and its trials).
Starting a run fails loudly (before any training); a logging call that fails mid-run only warns,
since a tracking server's hiccup must not cost a training run. A URI's credentials (user:password@,
query values such as tokens) never reach a log line, an error or a run param (`redact_uri`); the
client itself gets the URI as given (MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN variables
keep them out of config files too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from alro_ray.config import Config, TrackingConfig, read_yaml, to_dict
from alro_ray.errors import AlroError

log = logging.getLogger("alro_ray")

RUN_ID_FILE = "mlflow_run_id"
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's own nested runs set; the UI nests on it
PLAIN_PARAMS = {"alpha": "loss.alpha", "beta": "loss.beta", "gamma": "loss.gamma"}
_BATCH = 100  # MLflow's limit on params per log_batch call
_ILLEGAL = re.compile(r"[^/\w.\- ]")  # MLflow names: alphanumerics, _ - . / and space
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # user:password@ after a scheme (a password may hold @)


def enabled(t: TrackingConfig | None) -> bool:
    return bool(t is not None and t.mlflow)


def absolute_uri(uri: str | None) -> str | None:
    """A local store (a path, file:PATH or sqlite:///PATH) made absolute: Ray runs the Train
    controller and Tune trials in other working directories."""
    if not uri:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path) if parsed.scheme else uri).resolve().as_uri()
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and uri[10:] not in ("", ":memory:"):
        return "sqlite:///" + str(Path(uri[10:]).resolve())  # sqlite:////abs/path.db
    return uri


def redact_uri(uri: str | None) -> str | None:
    """`uri` as logs, errors and run params show it: user and password, and every query value
    (tokens travel there), replaced by ***."""
    if not uri:
        return uri
    base, sep, query = uri.partition("?")
    query, hash_, fragment = query.partition("#")
    shown = "&".join(k + "=***" if eq else k for k, eq, _ in (q.partition("=") for q in query.split("&")))
    return _USERINFO.sub("***@", base) + (sep + shown + hash_ + fragment if sep else "")


def _scrub(text: str, uri: str) -> str:
    """`text` (an error a store raised) without `uri`'s credentials, in whatever form it quotes them."""
    text = _USERINFO.sub("***@", text.replace(uri, redact_uri(uri)))
    userinfo = _USERINFO.search(uri)
    secrets = [v for _, _, v in (q.partition("=") for q in uri.partition("?")[2].partition("#")[0].split("&"))]
    secrets += userinfo.group()[:-1].split(":", 1) if userinfo else []  # the user is someone's name
    for secret in sorted({s for v in secrets for s in (v, unquote(v)) if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")  # shorter values are no credentials, and would garble the text
    return text


def metric_name(key: str) -> str:
    """An MLflow-legal name: `@` is not allowed, so `valid_ndcg@10` becomes `valid_ndcg_at_10`."""
    return _ILLEGAL.sub("_", key.replace("@", "_at_"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_params(cfg: Config | dict) -> dict[str, str]:
    """The whole config as dotted params (`loss.alpha`, `train.lr`, ...) plus plain alpha, beta, gamma."""
    flat = _flat(to_dict(cfg) if isinstance(cfg, Config) else cfg)
    flat.update({name: flat[key] for name, key in PLAIN_PARAMS.items() if key in flat})
    if isinstance(flat.get("tracking.mlflow"), str):
        flat["tracking.mlflow"] = redact_uri(flat["tracking.mlflow"])
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}


def scalars(d: dict, prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (nested) metrics dict, nested keys joined with `_`; bools and lists left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _client(uri: str):
    # mlflow costs about a second of imports: only runs that track pay for it.
    import mlflow

    if uri.startswith("file:"):
        # MLflow 3 refuses its file store (in maintenance; sqlite preferred) unless this is set.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside the database (MLflow's default, ./mlruns,
    depends on the working directory); other stores keep their own default."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[10:]).parent / "mlartifacts").as_uri()
    return None


def _experiment_id(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException  # only reached with tracking on

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(uri))
        except MlflowException:  # another process (a concurrent trial) created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise AlroError(f"MLflow experiment {name!r} in {redact_uri(uri)} is deleted: restore it "
                        f"(mlflow experiments restore) or choose another tracking.experiment")
    return exp.experiment_id


@dataclass
class Run:
    """One MLflow run, by id (picklable: the Train controller gets a copy)."""

    uri: str = field(repr=False)  # may hold credentials
    run_id: str

    def _try(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must not stop a run; say what was lost
            log.warning("MLflow: could not %s in run %s at %s: %s", what, self.run_id, redact_uri(self.uri),
                        _scrub(str(e), self.uri))

    def log_params(self, params: dict[str, str]) -> None:
        """Params are immutable in MLflow: a resumed run logs the new ones and keeps the first
        value of any that changed (with a warning naming them)."""
        from mlflow.entities import Param  # only reached with tracking on

        client = _client(self.uri)
        old = client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        if changed:
            log.warning("MLflow run %s keeps its first values of %s (params cannot change)",
                        self.run_id, ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in old]
        for i in range(0, len(new), _BATCH):
            client.log_batch(self.run_id, params=new[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric  # only reached with tracking on

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), v, now, step) for k, v in metrics.items()]
        self._try("log metrics", lambda: _client(self.uri).log_batch(self.run_id, metrics=batch))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A directory's files, or one file, under `artifact_path` in the run."""
        path = Path(path)
        if not path.exists():
            return
        client = _client(self.uri)
        fn = client.log_artifacts if path.is_dir() else client.log_artifact
        self._try(f"log {path}", fn, self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._try(f"tag {key}", lambda: _client(self.uri).set_tag(self.run_id, key, value))

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (a resumable stop)."""
        self._try(f"mark it {status}", lambda: _client(self.uri).set_terminated(self.run_id, status))


def run_id_in(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def _resumable(client, run_id: str | None):
    """The stored run, if this store still has it (not deleted)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - another store, or a run deleted for good: start a new one
        return None
    return run if run.info.lifecycle_stage == "active" else None


def start_run(t: TrackingConfig | None, name: str, *, run_dir: str | Path | None = None,
              parent: str | None = None, params: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> Run | None:
    """A new MLflow run, or the one whose id `run_dir` holds (a resumed run); None when tracking
    is off. Raises AlroError, before anything is trained, if the store cannot be used."""
    if not enabled(t):
        return None
    uri = absolute_uri(t.mlflow)
    try:
        client = _client(uri)
        old = _resumable(client, run_id_in(run_dir) if run_dir else None)
        if old is not None:
            client.update_run(old.info.run_id, status="RUNNING")
            run = Run(uri, old.info.run_id)
            log.info("MLflow: resuming run %s (%s) at %s", run.run_id, name, redact_uri(uri))
        else:
            all_tags = {**(tags or {}), **({PARENT_TAG: parent} if parent else {})}
            created = client.create_run(_experiment_id(client, uri, t.experiment), run_name=name, tags=all_tags)
            run = Run(uri, created.info.run_id)
            log.info("MLflow: run %s (%s) in experiment %r at %s", run.run_id, name, t.experiment, redact_uri(uri))
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / RUN_ID_FILE).write_text(run.run_id + "\n")
        if params:
            run.log_params(params)
    except AlroError:
        raise
    except Exception as e:  # noqa: BLE001 - any store error: say which setting to fix
        # `from None`: the store's own exception (and its traceback) may quote the credentials.
        raise AlroError(f"MLflow tracking at {redact_uri(uri)} failed: {type(e).__name__}: {_scrub(str(e), uri)}. "
                        f"Check tracking.mlflow (e.g. file:///tmp/mlruns, sqlite:///mlflow.db, http://HOST:5000) "
                        f"or leave it unset") from None
    return run


# ---------------------------------------------------------------------------------------------
# What each command logs, besides training (train/train_tracking.py).


def _ranking_metrics(rows: dict[str, dict], split: str) -> dict[str, float]:
    """`{split}_{metric}/{row}` for every row (ranking mode, baseline or compare row), e.g.
    `test_ndcg_at_10/random`; MLflow groups names on `/` (so a row's own `/` is dropped: `wo SLL`)."""
    return {f"{split}_{metric_name(k)}/{metric_name(row.replace('/', ''))}": v
            for row, m in rows.items() for k, v in scalars(m).items()}


def run_in(t: TrackingConfig | None, run_dir: str | Path) -> Run | None:
    """The run whose id `run_dir` holds, to add to (`alro train` adds its test summary)."""
    run_id = run_id_in(run_dir) if enabled(t) else None
    return Run(absolute_uri(t.mlflow), run_id) if run_id else None


@contextlib.contextmanager
def tracked(t: TrackingConfig | None, name: str, **start):
    """`start_run(t, name, **start)` (None when off) for a `with` block: the run ends FINISHED,
    or FAILED if the block raises."""
    run = start_run(t, name, **start)
    try:
        yield run
    except BaseException:
        if run:
            run.end("FAILED")
        raise
    if run:
        run.end()


def evaluation_params(checkpoint: str | Path, **settings) -> dict[str, str]:
    """An evaluation's settings, after the ranker's training config (its alpha, beta, gamma)."""
    ckpt = Path(checkpoint)
    params = config_params(read_yaml(ckpt / "config.yaml")) if (ckpt / "config.yaml").is_file() else {}
    return {**params, "checkpoint": str(ckpt.resolve()), **{k: str(v) for k, v in settings.items()}}


def log_evaluation(run: Run | None, metrics: dict, out_dir: str | Path, artifact_path: str | None = None) -> None:
    """An evaluation's metrics per mode and per baseline, report.md, plots and metrics.json."""
    if run is None:
        return
    out = Path(out_dir)
    rows = {**metrics.get("baselines", {}), **metrics.get("modes", {})}
    run.log_metrics(_ranking_metrics(rows, metrics.get("split", "test")))
    for f in sorted(out.glob("*.png")) + [out / "report.md", out / "metrics.json"]:
        run.log_artifacts(f, artifact_path)


def log_compare(run: Run | None, rows: dict[str, dict], out_dir: str | Path) -> None:
    """The finished comparison table (test split) and compare.md/json; ends the run."""
    if run is None:
        return
    run.log_metrics(_ranking_metrics(rows, "test"))
    for name in ("compare.md", "compare.json"):
        run.log_artifacts(Path(out_dir) / name)
    run.end()


_TRIAL_END = {"stopped early": "KILLED", "failed": "FAILED"}  # tune/report.py's trial status -> MLflow's


def log_study(run: Run | None, outcome) -> None:
    """A study's outcome (`tune.report.TuneOutcome`) into its parent run: best trial, table, plot.
    A study stopped early (it resumes when rerun) is marked KILLED, else FINISHED."""
    if run is None:
        return
    trials = outcome.trials
    run.log_metrics({"trials": float(len(trials)),
                     "trials_failed": float(sum(t.get("status") == "failed" for t in trials))})
    if outcome.best:
        best = {k: v for k, v in outcome.best.items() if k.startswith("valid_")}
        run.log_metrics({f"best_{k}": v for k, v in scalars(best).items()})
        run.set_tag("alro.best_trial", str(outcome.best["trial_id"]))
    for f in (outcome.output_dir / "trials.md", outcome.output_dir / "trials.json", outcome.best_yaml, outcome.plot):
        if f is not None:
            run.log_artifacts(f)
    # Tune kills a trial that ASHA stops or that fails, before its Train run can close its MLflow run.
    for trial in trials:
        trial_run = run_id_in(outcome.output_dir / "trials" / trial["trial_id"])
        if trial_run and trial["status"] in _TRIAL_END:
            Run(run.uri, trial_run).end(_TRIAL_END[trial["status"]])
    run.end("FINISHED" if outcome.complete else "KILLED")
