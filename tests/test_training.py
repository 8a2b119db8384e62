"""ALRO training on a real local Ray: 2 CPU workers under DeepSpeed ZeRO-2, checkpoints, resume, recovery."""

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from conftest import with_tiny_data
from alro_ray.rank.ranker import load_ranker
from alro_ray.config import load_config
from alro_ray.errors import AlroError
from alro_ray.rank.evaluation import prompt_ids
from alro_ray.data.dataset import read_split, read_split_table
from alro_ray.files import run_lock
from alro_ray.train.averaging import AVERAGE_FILE
from alro_ray.train.checkpoints import missing_parts
from alro_ray.train.trainer import run_training


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["train.max_steps_per_epoch=3", "train.eval_users=6", *overrides])


@pytest.fixture(scope="module")
def trained(ray_local, tiny_data, tmp_path_factory):
    out = with_tiny_data(tiny_data, tmp_path_factory.mktemp("run"))
    return run_training(_cfg("train.ema_decay=0.5"), out), out  # a weight average on the LoRA path (resume below)


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


@pytest.mark.slow  # default-run time (issue 26): a second full run; the fixture's run covers the path
def test_a_seeded_run_repeats(trained, tmp_path):
    """The same config from nothing in another directory: the same losses, validation and LoRA
    weights, bit for bit. Each worker trains on its own fixed share of the rows (train/shares.py);
    Ray Data's streaming split handed rows out in no fixed assignment, and runs differed."""
    outcome, out = trained
    again = run_training(_cfg("train.ema_decay=0.5"), tmp_path)
    timing = {"train_seconds", "tokens_per_s", "steady_tokens_per_s"}
    assert ([{k: v for k, v in h.items() if k not in timing} for h in again.history]
            == [{k: v for k, v in h.items() if k not in timing} for h in outcome.history])
    first, second = (load_file(o.final_dir / "adapter" / "adapter_model.safetensors") for o in (outcome, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in (out / "shares").iterdir()) == ["train_0.parquet", "train_1.parquet"]


@pytest.mark.slow  # two runs over whole epochs (2-4 min here); tests/test_lower_states.py has the numbers
def test_the_states_below_lora_are_read_once_and_shared_by_the_next_run(ray_local, tiny_data, tmp_path):
    """train.cache_lower_layers under Ray Train and ZeRO-2: the states below the top LoRA layer
    are read once per distinct sequence (epoch 1: the prompts and their first permutation, epoch
    2: the second permutation, epoch e reading permutation e mod 2), and a run with another seed
    on the same data reads them all back from the model cache (train/lower_states.py)."""
    out = with_tiny_data(tiny_data, tmp_path / "first")
    lower = ["model.lora.layers=1", "train.cache_lower_layers=true", f"model.cache_dir={tmp_path / 'cache'}",
             "train.max_steps_per_epoch=0"]  # whole epochs: every row is met in each
    first = run_training(_cfg(*lower), out)
    again = run_training(_cfg(*lower, "train.seed=1", f"data.prepared={out / 'data'}"), tmp_path / "second")
    read = [[h["lower_states_read"] for h in o.history] for o in (first, again)]
    rows = read_split_table(out / "data", "train").to_pylist()
    distinct = [{tuple(r["input_ids"]) for r in rows} | {tuple(r["perm_input_ids"][k]) for r in rows}
                for k in (0, 1)]
    assert read[0] == [len(distinct[0]), len(distinct[1] - distinct[0])] and read[0][1] > 0
    assert read[1] == [0, 0]
    assert len(list((tmp_path / "cache" / "frozen-states").glob("lower-*of2.pt"))) == 2  # one per worker
    for o in (first, again):
        assert all(math.isfinite(h["train_loss"]) and h["train_perm"] > 0 for h in o.history)
        weights = load_file(o.final_dir / "adapter" / "adapter_model.safetensors")
        assert all(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)
        assert {n.split(".layers.")[1].split(".")[0] for n in weights} == {"1"}  # the top layer's LoRA only


def test_checkpoint_loads_back_and_ranks(trained):
    outcome, _ = trained
    ranker = load_ranker(outcome.final_dir)
    rows = read_split(outcome.data_dir, "test").to_dict("records")[:3]
    for mode in ("one-pass", "generate"):
        orders, _ = ranker.rank([prompt_ids(r) for r in rows], mode)
        assert all(sorted(o) == list(range(5)) for o in orders)


@pytest.mark.slow  # default-run time (issue 26): a second Ray Train run (CI's slow set runs it)
def test_rerun_resumes_from_the_last_checkpoint(trained, caplog):
    """...the last complete one (a torn epoch_003 is skipped), with the weight average: its step
    count goes on from the checkpoint's (3 steps an epoch). A rerun with other settings is refused
    before the workers start; --override-resume applies them, and the history says so."""
    outcome, out = trained
    run = out / "ray" / "tiny"
    assert not missing_parts(run / "epoch_002")
    assert all((run / "epoch_002" / f"rng_rank{r}.pt").is_file() for r in (0, 1))  # each worker's RNG states
    steps = [torch.load(run / f"epoch_00{e}" / AVERAGE_FILE, weights_only=True)["steps"] for e in (1, 2)]
    # What a worker killed during the upload leaves: the state and shards, no model states. It
    # used to count as complete, and every restart failed inside DeepSpeed.
    torn = run / "epoch_003"
    shutil.copytree(run / "epoch_002", torn)
    (torn / "ds" / "mp_rank_00_model_states.pt").unlink()
    (torn / "state.json").write_text(json.dumps({**json.loads((torn / "state.json").read_text()), "epoch": 2}))
    changed = ("train.epochs=3", "train.ema_decay=0.5", "train.lr=0.002", "train.schedule=constant")
    with pytest.raises(AlroError, match="train.lr: 0.001 in the checkpoint, 0.002 now; "
                                        "train.schedule: 'linear' in the checkpoint, 'constant' now"):
        run_training(_cfg(*changed), out)
    with caplog.at_level(logging.WARNING, logger="alro_ray"):
        again = run_training(_cfg(*changed, "train.override_resume=true"), out)
    assert f"skipping the torn checkpoint {torn}" in caplog.text
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert again.history[:2] == outcome.history
    assert again.history[2]["resumed"] is True
    assert again.history[2]["resume_overrides"] == {"train.lr": [0.001, 0.002], "train.schedule": ["linear", "constant"]}
    assert again.history[2]["lr"] == pytest.approx(0.002)  # the new lr and schedule, not the checkpoint's
    assert not missing_parts(torn)  # written again, whole
    resumed = torch.load(torn / AVERAGE_FILE, weights_only=True)["steps"]
    assert steps == [3, 6] and resumed == 9


def test_resuming_with_another_worker_count_is_refused(trained):
    _, out = trained
    with pytest.raises(AlroError, match="written by 2 workers.*train.num_workers=1"):
        run_training(_cfg("train.num_workers=1"), out)


def test_saved_random_states_bring_back_the_same_draws(tmp_path):
    """What a resumed worker restores (worker.resume): torch's (LoRA dropout), Python's and numpy's
    states, read back with weights_only."""
    import random

    import numpy as np

    from alro_ray.train.worker import restore_rng, rng_state

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    drawn = (torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()) == drawn


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    """Refused at once, before Ray or any worker starts, naming the first run's pid and host."""
    with run_lock(tmp_path, "alro train (run tiny)"):
        with pytest.raises(AlroError, match=f"in use by another run: alro train \\(run tiny\\) \\(pid {os.getpid()} "
                                            f"on host {socket.gethostname()}"):
            run_training(_cfg(), tmp_path)


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes: children of its own raylet (other Ray clusters on
    the machine are left alone)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def _kill_a_worker_after(run_dir: Path, epochs_done: int, killed: dict) -> None:
    """SIGKILL one Train worker as soon as the epoch `epochs_done` checkpoint is complete."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if (run_dir / f"epoch_{epochs_done:03d}" / "state.json").exists():
            workers = _train_workers()
            if workers:
                done = sorted(run_dir.glob("epoch_*/state.json"))
                killed.update(pid=workers[-1].pid, last_checkpoint=int(done[-1].parent.name[6:]))
                workers[-1].send_signal(signal.SIGKILL)
                return
        time.sleep(0.2)


@pytest.mark.slow  # 4 epochs plus a worker-group restart: 2-4 min on 2 CPUs
def test_sigkilled_worker_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    """A Train worker SIGKILLed at the start of epoch 3 of 4: the group restarts from the epoch-2
    checkpoint (train.max_failures) and the run finishes with every epoch in its history."""
    killed: dict = {}
    cfg = load_config("configs/tiny.yaml", ["train.epochs=4", "train.max_steps_per_epoch=8", "train.eval_users=6",
                                            "train.max_failures=1"])
    killer = threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "ray" / "tiny", 2, killed))
    killer.start()
    outcome = run_training(cfg, tmp_path)
    killer.join()
    assert killed, "no Train worker was found to kill"
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4]
    resumed = [h["epoch"] for h in outcome.history if h["resumed"]]
    # The group resumes from the newest checkpoint complete at the kill (epoch 2, or 3 if epoch 3
    # had already finished on a slow machine), not from scratch.
    assert resumed == [killed["last_checkpoint"] + 1]


def test_local_ray_workers_silence_the_placement_group_cleaner(ray_local):
    """The local Ray has no dashboard, so Ray Train's placement-group cleaner would warn once a
    second that it cannot reach the state API: every worker process starts with its logger at
    ERROR (`cluster.quiet_worker_logs`), and only that logger."""
    import logging

    from alro_ray.cluster import _NOISY_WORKER_LOGGERS

    @ray.remote(num_cpus=0)
    def levels():
        return [logging.getLogger(n).getEffectiveLevel() for n in (*_NOISY_WORKER_LOGGERS, "ray.train.v2")]

    *noisy, train = ray.get(levels.remote())
    assert noisy == [logging.ERROR] * len(_NOISY_WORKER_LOGGERS)
    assert train < logging.ERROR  # Ray Train's own warnings still reach the log


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


def test_keep_best_picks_the_best_validation_and_the_earliest_of_ties():
    from types import SimpleNamespace

    from alro_ray.train.trainer import kept_checkpoint

    def result(*scores):
        return SimpleNamespace(best_checkpoints=[(f"ckpt{e}", {"epoch": e, "valid_ndcg@10": s})
                                                 for e, s in scores])

    assert kept_checkpoint(result((3, 0.5), (1, 0.7), (4, 0.6))) == "ckpt1"
    assert kept_checkpoint(result((5, 0.7), (2, 0.7), (6, 0.1))) == "ckpt2"
    with pytest.raises(AlroError, match="no epoch reported valid_ndcg@10"):
        kept_checkpoint(SimpleNamespace(best_checkpoints=[("c", {"epoch": 1})]))
