"""ALRO training on a real local Ray: 2 CPU workers under DeepSpeed ZeRO-2, checkpoints, resume, recovery."""

import json
import math
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from alro_ray.model.checkpoint import load_ranker
from alro_ray.config import load_config
from alro_ray.errors import AlroError
from alro_ray.rank.evaluation import prompt_ids
from alro_ray.data.prepare import read_split
from alro_ray.train.trainer import run_training


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["train.max_steps_per_epoch=3", "train.eval_users=6", *overrides])


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run_training(_cfg(), out), out


def test_two_workers_train_log_every_term_and_change_lora(trained):
    outcome, _ = trained
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    for h in outcome.history:
        for key in ("train_loss", "train_sft", "train_rank", "train_perm", "valid_ndcg@3", "valid_ndcg@10"):
            assert math.isfinite(h[key]), key
        assert h["train_rank"] > 0 and h["train_perm"] > 0
        assert h["nonfinite_steps"] == 0
    weights = load_file(outcome.final_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [w for n, w in weights.items() if "lora_B" in n]
    # PEFT starts lora_B at zero: non-zero values prove the optimizer stepped through DeepSpeed.
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)


def test_checkpoint_loads_back_and_ranks(trained):
    outcome, _ = trained
    ranker = load_ranker(outcome.final_dir)
    rows = read_split(outcome.data_dir, "test").to_dict("records")[:3]
    for mode in ("one-pass", "generate"):
        orders, _ = ranker.rank([prompt_ids(r) for r in rows], mode)
        assert all(sorted(o) == list(range(5)) for o in orders)


def test_rerun_resumes_from_the_last_checkpoint(trained):
    outcome, out = trained
    again = run_training(_cfg("train.epochs=3"), out)
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert again.history[:2] == outcome.history
    assert again.history[2]["resumed"] is True


def test_resuming_with_another_worker_count_is_refused(trained):
    _, out = trained
    with pytest.raises(AlroError, match="written by 2 workers.*train.num_workers=1"):
        run_training(_cfg("train.num_workers=1"), out)


def test_crashed_worker_group_restarts_from_checkpoint(ray_local, tmp_path):
    outcome = run_training(_cfg("train.inject_failure_epoch=2", "train.max_failures=1"), tmp_path)
    assert (tmp_path / "injected_failure").exists()
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    assert outcome.history[1]["resumed"] is True and outcome.history[0]["resumed"] is False


def test_bad_data_is_refused_before_workers_start(ray_local, tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AlroError, match="format"):
        run_training(_cfg(f"data.prepared={tmp_path}"), tmp_path / "out")
    with pytest.raises(AlroError, match="not a directory written by `alro prepare`"):
        run_training(_cfg(f"data.prepared={tmp_path / 'nowhere'}"), tmp_path / "out")


@pytest.mark.slow  # a tiny run, prepared data and one worker-group restart: 2-5 min on 2 busy CPUs
def test_diverging_run_stops_with_a_non_finite_error_and_no_final(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)  # an earlier run's ranker: must not pass for this run's
    (out / "final" / "ranker.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "alro_ray.cli", "train", "--config", "configs/tiny.yaml",
                           "train.lr=1e30", "--output-dir", str(out), "--no-test-summary"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("alro train: error:")]
    assert error and "non-finite loss at epoch 1" in error[0] and "(users u" in error[0], proc.stderr[-3000:]
    assert "train.max_nonfinite_steps=5" in error[0] and "final.previous" in error[0]
    assert not (out / "final").exists() and (out / "final.previous" / "ranker.json").exists()
    assert not list((out / "ray").rglob("state.json"))  # no checkpoint either
