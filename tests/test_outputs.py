"""All-or-nothing outputs and honest resumes, without Ray: the files module (atomic writes, the
directory swap, the locks), fusion.json under concurrent writers, stats.json on a failing
re-prepare, torn checkpoints and the resume check on hand-made epoch directories."""

import errno
import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alro_ray import files
from alro_ray.config import load_config, to_dict
from alro_ray.data.dataset import read_stats
from alro_ray.errors import AlroError, DataError
from alro_ray.rank import fusion
from alro_ray.train.checkpoints import latest_complete, missing_parts, plan_resume, resume_dir, write_part_list


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_write_text_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    files.write_json(path, {"ndcg": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        files.write_json(path, {"ndcg": 2})
    assert json.loads(path.read_text()) == {"ndcg": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_replace_dir_failing_mid_copy_keeps_the_previous_directory(tmp_path, monkeypatch):
    """final/ was deleted, then copied: a full disk in between lost the last good ranker."""
    final, new = tmp_path / "final", tmp_path / "ckpt"
    for d, text in ((final, "old"), (new, "new")):
        (d / "adapter").mkdir(parents=True)
        for name in ("ranker.json", "config.yaml", "adapter/adapter_model.safetensors"):
            (d / name).write_text(f"{text} {name}")
    before = _tree(final)
    copied = []
    real = files._copy_synced

    def fails_on_the_second_file(src, dst):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        copied.append(dst)
        return real(src, dst)

    monkeypatch.setattr(files, "_copy_synced", fails_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        files.replace_dir(new, final)
    assert copied and _tree(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "final"]  # the partial copy is gone
    monkeypatch.setattr(files, "_copy_synced", real)
    files.replace_dir(new, final)
    assert _tree(final) == _tree(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "final"]


def test_replace_dir_without_an_atomic_exchange_swaps_by_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # NFS, older kernels
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("new")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "x").write_text("old")
    files.replace_dir(tmp_path / "src", tmp_path / "final")
    assert (tmp_path / "final" / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "src"]


_HOLD = """
import sys, time
from alro_ray.files import run_lock
with run_lock(sys.argv[1], "alro train (run tiny)"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_locked_directory_is_refused_naming_the_first(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(AlroError, match=f"in use by another run: alro train \\(run tiny\\) \\(pid {first.pid} "
                                            f"on host {socket.gethostname()}"):
            with files.run_lock(tmp_path, "alro train"):
                pass
    finally:
        first.kill()
        first.wait()
    with files.run_lock(tmp_path, "alro train"):  # the kernel dropped the dead one's lock
        with pytest.raises(AlroError, match=f"pid {os.getpid()} "):  # one process, two runs: refused too
            with files.run_lock(tmp_path, "alro evaluate"):
                pass


def test_a_dead_runs_lock_record_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / files.RUN_LOCK).write_text(json.dumps({"what": "alro train", "pid": dead.pid,
                                                       "host": socket.gethostname(), "started": time.time()}))
    with caplog.at_level(logging.WARNING, logger="alro_ray"), files.run_lock(tmp_path, "alro train"):
        record = json.loads((tmp_path / files.RUN_LOCK).read_text())
    assert record["pid"] == os.getpid()
    assert f"taking over the lock of alro train (pid {dead.pid} on host" in caplog.text
    assert "that process is gone" in caplog.text
    assert (tmp_path / files.RUN_LOCK).read_text() == ""  # a clean end leaves no record


def _slow_read(ranker_dir):
    defaults = _real_read(ranker_dir)
    time.sleep(0.02)  # widen the read-modify-write window
    return defaults


_real_read = fusion.read_fusion_defaults


def _save_many(ranker_dir: str, prefix: str, n: int) -> None:
    for i in range(n):
        fusion.save_fusion_defaults(ranker_dir, {"x": {"mode": f"{prefix}{i}", "baseline": "mf", "weight": 0.5,
                                                       "method": "score", "valid_lists": 3, "valid_ndcg@10": 0.5}},
                                    "eval")


def test_two_concurrent_save_fusion_runs_keep_every_entry(tmp_path, monkeypatch):
    """Two `--save-fusion` runs into one ranker: each read-modify-write of fusion.json keeps the
    other's entries (before: the later write dropped what the other wrote meanwhile)."""
    monkeypatch.setattr(fusion, "read_fusion_defaults", _slow_read)
    ctx = multiprocessing.get_context("fork")  # the children inherit the slowed read
    writers = [ctx.Process(target=_save_many, args=(str(tmp_path), p, 8)) for p in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    keys = set(_real_read(tmp_path))
    assert keys == {f"{p}{i}/mf" for p in "ab" for i in range(8)}


def test_a_failing_reprepare_leaves_no_valid_looking_stats(tmp_path):
    """A prepare rewrites the split files in place: an earlier prepare's stats.json must not vouch
    for them when this one fails (it is removed first and written last)."""
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stats.json").write_text(json.dumps({"format": "alro-prepared-v1", "candidates": 5}))
    (tmp_path / "interactions.csv").write_text("user_id,item_id,rating,timestamp\nu1,i1,5000,1\n")
    (tmp_path / "items.csv").write_text("item_id,title\ni1,Album\n")
    cfg = load_config(None, ["data.dataset=table", f"data.data_dir={tmp_path}", "model.name=tiny-random"])
    from alro_ray.data.prepare import prepare  # loads Ray Data's module, not a cluster

    with pytest.raises(DataError, match="rating 5000"):
        prepare(cfg, out)
    assert not (out / "stats.json").exists()
    with pytest.raises(DataError, match="not a directory written by `alro prepare`"):
        read_stats(out)


# ---------------------------------------------------------------------------------------------
# Checkpoints on disk, made by hand: what a resume takes.


def _epoch(run_dir: Path, n: int, cfg=None, world: int = 2) -> Path:
    """epoch_00n as `ray.train.report` stores it: every rank's part merged into one directory."""
    d = run_dir / f"epoch_{n:03d}"
    for rank in range(world):
        part = run_dir / f"part{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100)
        (part / f"rng_rank{rank}.pt").write_bytes(b"r" * 10)
        if rank == 0:
            (part / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 50)
            (part / "ranker").mkdir()
            (part / "ranker" / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg or load_config("configs/tiny.yaml"))))
            (part / "state.json").write_text(json.dumps({"epoch": n - 1, "history": [{"epoch": n}], "world": world}))
        write_part_list(part, rank)
        shutil.copytree(part, d, dirs_exist_ok=True)
        shutil.rmtree(part)
    return d


def test_torn_epoch_directories_are_skipped_for_the_last_complete_one(tmp_path, caplog):
    run = tmp_path / "ray" / "tiny"
    _epoch(run, 1)
    _epoch(run, 2)
    (run / "epoch_002" / "parts" / "rank_1.json").unlink()  # rank 1's part never arrived
    _epoch(run, 3)
    with open(run / "epoch_003" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(60)  # cut short by a full disk
    # Written before the part lists: optimizer shards and state.json, but no model states. The old
    # check (shards and state.json) took it, and every restart failed inside DeepSpeed.
    old = _epoch(run, 4)
    (old / "ds" / "mp_rank_00_model_states.pt").unlink()
    shutil.rmtree(old / "parts")
    (old / "state.json").write_text(json.dumps({"epoch": 3, "history": []}))

    assert missing_parts(run / "epoch_004", 2) == ["ds/mp_rank_00_model_states.pt"]
    assert missing_parts(run / "epoch_003") == ["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1: 60 of 100 bytes)"]
    assert missing_parts(run / "epoch_002") == ["parts/rank_1.json"]
    with caplog.at_level(logging.WARNING, logger="alro_ray"):
        assert latest_complete(run, 2) == run / "epoch_001"
    assert [r.message.split(" (")[0] for r in caplog.records] == [
        f"skipping the torn checkpoint {run / f'epoch_00{n}'}" for n in (4, 3, 2)]
    with resume_dir(None, run, 2) as d:
        assert d == run / "epoch_001"


def test_a_rerun_with_other_settings_is_refused_unless_overridden(tmp_path):
    run = tmp_path / "ray" / "tiny"
    assert plan_resume(run, load_config("configs/tiny.yaml")) is None  # nothing to resume: no check
    _epoch(run, 1)
    _epoch(run, 2)
    # Safe: how long it runs and how it reports.
    resume = plan_resume(run, load_config("configs/tiny.yaml", ["train.epochs=3", "tracking.experiment=x"]))
    assert (resume.checkpoint, resume.epoch, resume.overrides) == (run / "epoch_002", 1, {})
    changed = ["train.epochs=3", "train.lr=0.05", "data.candidates=4"]
    with pytest.raises(AlroError) as e:
        plan_resume(run, load_config("configs/tiny.yaml", changed))
    assert "data.candidates: 5 in the checkpoint, 4 now; train.lr: 0.001 in the checkpoint, 0.05 now." in str(e.value)
    assert "--override-resume" in str(e.value) and "train.epochs" not in str(e.value)
    resume = plan_resume(run, load_config("configs/tiny.yaml", [*changed, "train.override_resume=true"]))
    assert resume.overrides == {"data.candidates": [5, 4], "train.lr": [0.001, 0.05]}
    with pytest.raises(AlroError, match="written by 2 workers and this run has train.num_workers=1"):
        plan_resume(run, load_config("configs/tiny.yaml", ["train.num_workers=1", "train.override_resume=true"]))
