"""Ray Train checkpoints of a training run, the torch-free part: which one to resume from, and
setting an earlier run's final ranker aside when a run fails (saving and loading them runs in the
workers: train/worker.py).

Each epoch every worker saves its part of a DeepSpeed checkpoint (ZeRO-2 shards the optimizer
state, one file per rank) and rank 0 adds the ranker (adapter, tokenizer, config) and
`state.json` (epoch, history); `ray.train.report` then stores it as `epoch_NNN/`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from alro_ray.errors import AlroError

DS_TAG = "ds"


def check_resume_world(run_dir: Path, num_workers: int) -> None:
    """A rerun resumes from the run's checkpoints, whose ZeRO optimizer state is sharded one
    file per worker: a different worker count cannot load it, so say so before workers start."""
    for d in sorted(run_dir.glob("epoch_*")):
        shards = _optimizer_shards(d)
        if (d / "state.json").is_file() and shards and shards != num_workers:
            raise AlroError(
                f"{d} was written by {shards} workers and this run has train.num_workers={num_workers}: "
                f"resume with train.num_workers={shards}, or start afresh with another train.run_name "
                f"or output directory")


def _complete(d: Path, world: int) -> bool:
    """Every rank's part is there: rank 0's state and one ZeRO optimizer shard per rank."""
    return (d / "state.json").is_file() and _optimizer_shards(d) == world


def _optimizer_shards(d: Path) -> int:
    """ZeRO writes one optimizer-state file per rank."""
    return len(list((d / DS_TAG).glob("*optim_states.pt")))


def _epoch_of(d: Path | None) -> int:
    return json.loads((d / "state.json").read_text())["epoch"] if d is not None else -1


@contextlib.contextmanager
def resume_dir(checkpoint, run_dir: Path, world: int):
    """The checkpoint to resume from: the newer of Ray's latest registered checkpoint and the
    latest complete one in the run's storage. A worker that crashes right after reporting can
    die before Ray's controller registers that report, though its files are already stored;
    without the scan the restarted group would begin from an older checkpoint or from scratch.
    (The scan covers local and mounted storage; remote URIs rely on Ray's record alone.)"""
    on_disk = max((d for d in run_dir.glob("epoch_*") if _complete(d, world)), key=_epoch_of, default=None)
    if checkpoint is None:
        yield on_disk
        return
    with checkpoint.as_directory() as d:
        registered = Path(d)
        yield on_disk if _epoch_of(on_disk) > _epoch_of(registered) else registered


def set_aside_final(out: Path) -> str:
    """After a failed run, an earlier run's final/ must not pass for this run's result: move it
    (and its history) aside, and say where to."""
    if not (out / "final").exists():
        return " No final ranker was written."
    shutil.rmtree(out / "final.previous", ignore_errors=True)
    (out / "final").rename(out / "final.previous")
    if (out / "history.json").exists():
        (out / "history.json").replace(out / "history.previous.json")
    return f" No final ranker was written; the earlier run's is now {out / 'final.previous'}."
