"""The loss-weight study (Ray Tune + Optuna + ASHA) on the tiny model and synthetic data.

One study serves most tests (each trial is a real Ray Train run, so it costs a minute on 2 CPUs):
2 trials at once, in one session. Slow: a study interrupted once a trial has ended and resumed by
rerunning it, a study in which ASHA stops trials (it must finish and leave no placement group
behind), and a trial whose Train workers cannot get a CPU (it must fail within
tune.resource_timeout_s)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import with_tiny_data
from alro_ray.tune import report as tune_report, study as tuning
from alro_ray.cli import main as cli_main
from alro_ray.config import load_config
from alro_ray.train.trainer import run_training
from alro_ray.tune.space import NDCG_KEYS, PAPER_POINT

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return load_config(REPO / "configs" / "tune_tiny.yaml", list(overrides))


def _held_placement_groups(ray) -> list[dict]:
    """Placement groups that still hold CPUs (Train worker groups; Tune's trial groups hold none)."""
    return [pg for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and any(b.get("CPU") for b in pg["bundles"].values())]


def _starts(out: Path, trial_id: str) -> int:
    log = out / "trials" / trial_id / "starts.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


TRIALS = 2  # the default run's study: both at once on 2 CPUs, one session


@pytest.fixture(scope="module")
def study(ray_local, tiny_data, tmp_path_factory):
    """A whole study in one session. Its data is configs/tiny.yaml's (tune_tiny.yaml has the
    same data.*), prepared once for the test session."""
    out = with_tiny_data(tiny_data, tmp_path_factory.mktemp("study"))
    return tuning.run_tune(_cfg(f"tune.num_samples={TRIALS}"), out), out


@pytest.fixture(scope="module")
def interrupted_study(ray_local, tiny_data, tmp_path_factory):
    out = with_tiny_data(tiny_data, tmp_path_factory.mktemp("interrupted"))
    # Session 1 ends (like Ctrl-C: SIGUSR1 to the driver) once a trial has ended: the other one
    # running beside it is interrupted (unless it ended at the same time), the third not started.
    first = tuning.run_tune(_cfg("tune.num_samples=3"), out, stop_after_trials=1)
    starts_then = {t["trial_id"]: _starts(out, t["trial_id"]) for t in first.trials}
    # Session 2: the same call again resumes the study.
    second = tuning.run_tune(_cfg("tune.num_samples=3"), out)
    return first, starts_then, second, out


@pytest.mark.slow  # default-run time (issue 26): a study in two sessions; the default run's study covers Tune
def test_interrupted_study_resumes_without_rerunning_ended_trials(interrupted_study):
    first, starts_then, second, out = interrupted_study
    ended = [t for t in first.trials if t["status"] != "unfinished"]
    assert not first.complete and len(ended) >= 1
    assert all(starts_then[t["trial_id"]] == 1 for t in ended)

    assert second.complete
    assert [t["number"] for t in second.trials] == [1, 2, 3]  # tune.num_samples, no more, no fewer
    again = {t["trial_id"]: t for t in second.trials}
    for t in ended:
        # Not started again, and its results are the ones session 1 recorded.
        assert _starts(out, t["trial_id"]) == 1
        assert again[t["trial_id"]] == t
    # Every trial of the study ran (at least once); only the interrupted ones started twice.
    for t in second.trials:
        if t["trial_id"] not in {e["trial_id"] for e in ended}:
            assert _starts(out, t["trial_id"]) >= 1


def test_study_writes_table_best_yaml_and_plot(study):
    outcome, out = study
    assert outcome.complete
    first_trial = outcome.trials[0]
    assert first_trial["params"] == pytest.approx(PAPER_POINT)  # the paper's values first
    for t in outcome.trials:
        assert t["status"] in ("completed", "stopped early"), t
        assert 1 <= t["epochs"] <= 2
        assert all(0 <= t[k] <= 1 for k in NDCG_KEYS)
    assert len({t["params"]["alpha"] for t in outcome.trials}) == TRIALS  # TPE proposed new points

    table = (out / "trials.md").read_text()
    assert table.count("\n| ") == 1 + TRIALS and "NDCG@10" in table and "status" in table
    data = json.loads((out / "trials.json").read_text())
    assert data["complete"] and len(data["trials"]) == TRIALS
    assert data["best"]["trial_id"] == outcome.best["trial_id"]
    assert outcome.best["valid_ndcg@10"] == max(t["valid_ndcg@10"] for t in outcome.trials)

    assert outcome.best_yaml == out / "best.yaml" and outcome.best_yaml.exists()
    assert outcome.best_checkpoint and (outcome.best_checkpoint / "adapter").is_dir()
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(outcome.importances) == {"alpha", "beta", "gamma"}
    assert sum(outcome.importances.values()) == pytest.approx(1.0)


@pytest.mark.slow  # default-run time (issue 26): one more Train run of a config the study wrote
def test_best_yaml_trains(study, tmp_path):
    outcome, out = study
    cfg = load_config(outcome.best_yaml, ["train.epochs=1", "train.max_steps_per_epoch=1", "train.eval_users=4"])
    best = outcome.best["params"]
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma) == pytest.approx((best["alpha"], best["beta"], best["gamma"]))
    assert Path(cfg.data.prepared) == out / "data"
    trained = run_training(cfg, tmp_path)
    assert [h["epoch"] for h in trained.history] == [1]
    assert (trained.final_dir / "adapter").is_dir()


@pytest.mark.parametrize("args, message", [
    (["tune.search_space.alpha.low=2"], "tune.search_space.alpha: empty or inverted range"),
    (["tune.search_space.gamma.low=8.0"], "tune.search_space.gamma: empty or inverted range"),
    (["tune.search_space.delta={low: 0.1, high: 1.0}"], "tune.search_space.delta: not a tunable parameter"),
    (["tune.search_space.ema_decay={low: 0.9, high: 1.0}"],
     "tune.search_space.ema_decay: the range [0.9, 1.0] reaches a value the config refuses (train.ema_decay"),
    (["--num-samples", "0"], "tune.num_samples"),
    (["--max-concurrent", "0"], "tune.max_concurrent"),
    (["tune.metric=train_loss"], "tune.metric"),
])
def test_bad_input_is_refused_before_anything_starts(args, message, tmp_path, capsys):
    out = tmp_path / "study"
    code = cli_main(["tune", "--config", str(REPO / "configs" / "tune_tiny.yaml"), "--output-dir", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_job_entry_point_refuses_bad_input_with_exit_code_2(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--num-samples", "0",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "tune.num_samples" in proc.stderr and not out.exists()


def test_resume_with_a_different_config_is_refused(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.yaml").write_text((REPO / "configs" / "tune_tiny.yaml").read_text())
    code = cli_main(["tune", "--config", str(REPO / "configs" / "tune_tiny.yaml"), "--output-dir", str(out),
                        "tune.search_space.gamma.high=4.0"])
    assert code == 2


def test_report_helpers_cope_with_failed_and_few_trials(tmp_path):
    cfg = _cfg()
    ok = {"number": 1, "trial_id": "a", "status": "completed", "params": dict(PAPER_POINT),
          "valid_ndcg@3": 0.5, "valid_ndcg@10": 0.6, "valid_ndcg@25": 0.6, "epochs": 2,
          "checkpoint": None, "error": None}
    failed = {**ok, "number": 2, "trial_id": "b", "status": "failed", "valid_ndcg@3": None,
              "valid_ndcg@10": None, "valid_ndcg@25": None, "epochs": 0, "error": "RuntimeError: boom"}
    assert tune_report.pick_best([ok, failed], "valid_ndcg@10") is ok
    assert tune_report.pick_best([failed], "valid_ndcg@10") is None
    importances, note = tune_report.param_importances([ok, failed], cfg)
    assert importances == {} and "at least 2" in note
    table = tune_report.format_trials_table([ok, failed], ["alpha", "beta", "gamma"], "a")
    assert "a *" in table and "failed (RuntimeError: boom)" in table
    png = tune_report.plot_study([ok, failed], importances, note, "valid_ndcg@10", tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert tune_report.error_summary("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                "ray.train.WorkerGroupError: Training failed due to worker errors:\n"
                                "[Rank 0 Error Snippet]:\nThe actor is dead because its worker process "
                                "has died. Worker exit type: SYSTEM_ERROR") == (
        "ray.train.WorkerGroupError: Training failed due to worker errors: "
        "The actor is dead because its worker process has died")


@pytest.mark.slow
def test_study_in_which_asha_stops_trials_finishes_and_releases_them(ray_local, tmp_path):
    # The learning rate in the space makes the trials' NDCGs differ (with only α, β, γ the tiny
    # model often ranks identically, and ASHA stops no tie); 3 epochs, rung at 1, keep the top third.
    cfg = _cfg("tune.num_samples=6", "train.epochs=3", "tune.reduction_factor=3",
               "tune.search_space.lr={low: 0.0001, high: 0.05, log: true}")
    outcome = tuning.run_tune(cfg, tmp_path)
    statuses = [t["status"] for t in outcome.trials]
    assert outcome.complete and len(statuses) == 6, statuses
    assert "stopped early" in statuses, statuses
    stopped = [t for t in outcome.trials if t["status"] == "stopped early"]
    assert all(t["epochs"] < 3 for t in stopped)
    # Every stopped trial had recorded its Train placement group, and none is left holding CPUs.
    for t in stopped:
        assert (tmp_path / "trials" / t["trial_id"] / "placement_groups").read_text().split()
    assert _held_placement_groups(ray_local) == []


@pytest.mark.slow  # default-run time (issue 26): a second study; the default run's study covers Tune
def test_trial_that_cannot_get_its_cpus_fails_within_the_timeout(ray_local, tmp_path):
    # Another job holds one of the 2-CPU Ray's CPUs for the whole study, and the trial's Train run
    # wants 2. (The other CPU stays free: Ray Data, which reads the trial's data, waits while no
    # CPU at all is free, even for its zero-CPU read tasks.)
    cfg = _cfg("tune.num_samples=1", "tune.max_concurrent=1", "tune.resource_timeout_s=5",
               "train.num_workers=2")
    # An earlier test's Train worker group must be gone first: with it and the hog holding both
    # CPUs the trial could never be placed, and the test would hang (seen once, session 12).
    deadline = time.time() + 120
    while _held_placement_groups(ray_local) and time.time() < deadline:
        time.sleep(2)
    assert _held_placement_groups(ray_local) == [], "an earlier run still holds its CPUs"
    hog = ray_local.util.placement_group([{"CPU": 1}])
    ray_local.get(hog.ready(), timeout=60)
    try:
        outcome = tuning.run_tune(cfg, tmp_path)
    finally:
        ray_local.util.remove_placement_group(hog)
    (trial,) = outcome.trials
    assert trial["status"] == "failed", trial
    assert "ResourceTimeoutError" in trial["error"], trial["error"]
    assert "waited 5 s for 2 CPU" in trial["error"] and "the cluster has 2 CPU, free now 1 CPU" in trial["error"]
    assert _held_placement_groups(ray_local) == []
