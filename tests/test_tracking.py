"""MLflow tracking (`tracking.mlflow`), read back through the MLflow client from a local file store.

One tiny `alro train` (1 worker, 2 epochs of 1 step, with its test summary) and one `alro evaluate`
of its ranker serve the default-run tests; a Tune study's per-trial runs are slow.
"""

import json
from pathlib import Path

import pytest

from alro_ray import tracking
from alro_ray.cli import main as cli_main
from alro_ray.config import TrackingConfig, load_config
from alro_ray.errors import AlroError

REPO = Path(__file__).resolve().parents[1]


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _runs(uri: str, command: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name("alro-ray")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`alro.command` = '{command}'")


def _artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in _client(uri).list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def tracked(ray_local, tmp_path_factory):
    """A tiny training run and an evaluation of its ranker, both logged to one file store."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = (tmp / "mlruns").as_uri()  # file:///...
    code = cli_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--output-dir", str(tmp / "run"),
                     "train.epochs=2", "train.num_workers=1", "train.max_steps_per_epoch=1", "train.eval_users=4",
                     f"tracking.mlflow={uri}"])
    assert code == 0
    code = cli_main(["evaluate", "--checkpoint", str(tmp / "run" / "final"), "--out", str(tmp / "eval"),
                     "--modes", "one-pass,bootstrap@3", "--baselines", "random", "--limit", "4",
                     f"tracking.mlflow={uri}"])
    assert code == 0
    return uri, tmp


@pytest.mark.slow  # default-run time (issue 26): a Train run and an evaluation of their own
def test_train_run_logs_params_epoch_metrics_and_the_ranker(tracked):
    uri, tmp = tracked
    (run,) = _runs(uri, "train")
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (tmp / "run" / tracking.RUN_ID_FILE).read_text().strip()
    params = run.data.params
    # tiny.yaml's loss weights, under their dotted keys and plain; the rest of the config too.
    assert (params["alpha"], params["beta"], params["gamma"]) == ("0.1", "0.01", "2.0")
    assert (params["loss.alpha"], params["train.epochs"], params["model.name"]) == ("0.1", "2", "tiny-random")
    history = json.loads((tmp / "run" / "history.json").read_text())
    ndcg = _client(uri).get_metric_history(run.info.run_id, "valid_ndcg_at_10")
    assert sorted((m.step, m.value) for m in ndcg) == [(h["epoch"], h["valid_ndcg@10"]) for h in history]
    assert len(ndcg) == 2
    for name in ("train_loss", "train_sft", "train_rank", "train_perm", "tokens_per_s", "nonfinite_steps"):
        assert [m.step for m in _client(uri).get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert {"final", "history.json", "eval"} <= _artifacts(uri, run.info.run_id)
    assert {"final/adapter", "final/ranker.json", "final/config.yaml", "final/tokenizer"} <= \
        _artifacts(uri, run.info.run_id, "final")
    # `alro train`'s test summary goes into the same run.
    assert {"eval/report.md", "eval/ndcg.png", "eval/metrics.json"} <= _artifacts(uri, run.info.run_id, "eval")
    test = json.loads((tmp / "run" / "eval" / "metrics.json").read_text())
    assert run.data.metrics["test_ndcg_at_10/one-pass"] == pytest.approx(test["modes"]["one-pass"]["ndcg@10"])


@pytest.mark.slow  # default-run time (issue 26): the same fixture
def test_evaluate_logs_a_run_per_call_with_metrics_per_mode_and_baseline(tracked):
    uri, tmp = tracked
    (run,) = _runs(uri, "evaluate")
    assert run.info.status == "FINISHED"
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    logged = run.data.metrics
    for name, m in [("one-pass", metrics["modes"]["one-pass"]), ("bootstrap_at_3", metrics["modes"]["bootstrap@3"]),
                    ("random", metrics["baselines"]["random"])]:
        assert logged[f"test_ndcg_at_10/{name}"] == pytest.approx(m["ndcg@10"])
        assert logged[f"test_ndcg_at_3/{name}"] == pytest.approx(m["ndcg@3"])
    assert run.data.params["alpha"] == "0.1"  # the ranker's training config
    assert (run.data.params["limit"], run.data.params["modes"]) == ("4", "one-pass,bootstrap@3")
    assert {"report.md", "ndcg.png", "position_bias.png", "metrics.json"} <= _artifacts(uri, run.info.run_id)


def test_an_unusable_store_fails_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the store's directory would go
    with pytest.raises(AlroError, match="MLflow tracking at .* failed.*tracking.mlflow"):
        tracking.start_run(TrackingConfig(mlflow=(blocker / "mlruns").as_uri()), "x")
    assert tracking.start_run(TrackingConfig(), "x") is None  # tracking off: no run


def test_names_and_uris(tmp_path, monkeypatch):
    assert tracking.metric_name("valid_ndcg@10") == "valid_ndcg_at_10"
    assert tracking.metric_name("few-shot (2)") == "few-shot _2_"
    monkeypatch.chdir(tmp_path)
    assert tracking.absolute_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert tracking.absolute_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert tracking.absolute_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert tracking.absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking.absolute_uri("http://host:5000") == "http://host:5000"
    params = tracking.config_params(load_config(REPO / "configs" / "tiny.yaml", ["loss.alpha=0.3"]))
    assert (params["alpha"], params["loss.alpha"], params["tracking.mlflow"]) == ("0.3", "0.3", "null")


def test_evaluate_takes_only_tracking_overrides(tmp_path, capsys):
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "train.epochs=3"])
    assert code == 2
    assert "takes only tracking.* settings, not 'train.epochs=3'" in capsys.readouterr().err


def test_study_end_closes_trials_that_tune_killed(tmp_path):
    """Tune kills a trial that ASHA stops or that fails before its Train run can close its MLflow
    run: the study's end marks them (runs made here as run_training makes a trial's)."""
    from alro_ray.tune.report import TuneOutcome

    t = TrackingConfig(mlflow=(tmp_path / "mlruns").as_uri())
    study = tracking.start_run(t, "study", run_dir=tmp_path, tags={"alro.command": "tune"})
    status = {"a": "completed", "b": "stopped early", "c": "failed", "d": "unfinished"}
    runs = {}
    for trial_id in status:
        runs[trial_id] = tracking.start_run(t, trial_id, run_dir=tmp_path / "trials" / trial_id, parent=study.run_id)
    runs["a"].end()
    best = {"trial_id": "a", "valid_ndcg@10": 0.75}
    outcome = TuneOutcome(tmp_path, tmp_path, tmp_path, [{"trial_id": k, "status": v} for k, v in status.items()],
                          "", complete=False, best=best)
    tracking.log_study(study, outcome)
    client = _client(t.mlflow)
    assert {k: client.get_run(r.run_id).info.status for k, r in runs.items()} == \
        {"a": "FINISHED", "b": "KILLED", "c": "FAILED", "d": "RUNNING"}  # d resumes with the study
    logged = client.get_run(study.run_id)
    assert (logged.info.status, logged.data.metrics["best_valid_ndcg_at_10"]) == ("KILLED", 0.75)
    assert logged.data.metrics["trials_failed"] == 1


@pytest.mark.slow  # two Tune trials, each a Ray Train run: 3-5 min on 2 busy CPUs
def test_tune_study_logs_a_parent_run_and_one_nested_run_per_trial(ray_local, tmp_path):
    from alro_ray.tune.study import run_tune

    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(REPO / "configs" / "tune_tiny.yaml", ["tune.num_samples=2", f"tracking.mlflow={uri}"])
    outcome = run_tune(cfg, tmp_path / "study")
    (study,) = _runs(uri, "tune")
    assert study.info.status == "FINISHED"
    assert {"trials.md", "trials.json", "best.yaml", "tune.png"} <= _artifacts(uri, study.info.run_id)
    trials = {r.info.run_name: r for r in _runs(uri, "train")}
    assert set(trials) == {t["trial_id"] for t in outcome.trials}
    for t in outcome.trials:
        run = trials[t["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == study.info.run_id
        assert float(run.data.params["alpha"]) == pytest.approx(t["params"]["alpha"])
        steps = [m.step for m in _client(uri).get_metric_history(run.info.run_id, "valid_ndcg_at_10")]
        assert steps == list(range(1, t["epochs"] + 1))  # ASHA may stop a trial after epoch 1
        assert run.info.status == {"completed": "FINISHED", "stopped early": "KILLED"}[t["status"]]
    best = outcome.best["valid_ndcg@10"]
    assert study.data.metrics["best_valid_ndcg_at_10"] == pytest.approx(best)


SECRET_URI = "https://alice:s3cret@mlflow.example.com:5000/base?token=abc123&region=eu"


@pytest.mark.parametrize("uri, shown", [
    (SECRET_URI, "https://***@mlflow.example.com:5000/base?token=***&region=***"),
    ("postgresql://bob@db.internal/mlflow", "postgresql://***@db.internal/mlflow"),
    ("http://host:5000", "http://host:5000"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    (None, None),
])
def test_credentials_are_stripped_from_uris_shown(uri, shown):
    assert tracking.redact_uri(uri) == shown


def test_credentials_never_reach_logs_errors_or_params(monkeypatch, caplog):
    """A tracking URI with a password and a token: the client still gets the real URI, but what is
    logged, raised or stored as a param holds neither."""
    seen = {"params": {}}

    class FakeClient:
        def __init__(self, uri):
            seen["uri"] = uri

        def get_experiment_by_name(self, name):
            if seen.get("down"):  # a store echoing the URL back, as HTTP clients do
                raise RuntimeError(f"GET {SECRET_URI.replace('?', '/api?')} refused (user alice:s3cret)")
            return type("Exp", (), {"experiment_id": "1", "lifecycle_stage": "active"})()

        def create_run(self, experiment_id, run_name, tags):
            return type("R", (), {"info": type("I", (), {"run_id": "r1"})()})()

        def get_run(self, run_id):
            return type("R", (), {"data": type("D", (), {"params": {}})()})()

        def log_batch(self, run_id, params=(), metrics=()):
            seen["params"].update({p.key: p.value for p in params})

    monkeypatch.setattr(tracking, "_client", FakeClient)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"tracking.mlflow={SECRET_URI}"])
    with caplog.at_level("INFO", logger="alro_ray"):
        run = tracking.start_run(cfg.tracking, "x", params=tracking.config_params(cfg))
        seen["down"] = True
        with pytest.raises(AlroError) as e:
            tracking.start_run(cfg.tracking, "y")
    assert seen["uri"] == run.uri == SECRET_URI  # the client itself still authenticates
    shown = [str(e.value), caplog.text, json.dumps(seen["params"])]
    assert not any(s in text for s in ("s3cret", "abc123", "alice") for text in shown), shown
    assert seen["params"]["tracking.mlflow"] == "https://***@mlflow.example.com:5000/base?token=***&region=***"
    assert "mlflow.example.com" in str(e.value) and "mlflow.example.com" in caplog.text
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback quoting it
