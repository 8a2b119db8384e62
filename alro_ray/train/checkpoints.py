"""Ray Train checkpoints of a training run: finding and loading the one to resume from, saving
one, and setting an earlier run's final ranker aside when a run fails.

Each epoch every worker saves its part of a DeepSpeed checkpoint (ZeRO-2 shards the optimizer
state, one file per rank) and rank 0 adds the ranker (adapter, tokenizer, config) and
`state.json` (epoch, history); `ray.train.report` then stores it as `epoch_NNN/`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from alro_ray.config import Config
from alro_ray.data.dataset import PreparedStats
from alro_ray.errors import AlroError
from alro_ray.train.guard import check_weights

if TYPE_CHECKING:  # the driver imports this module for resume checks: no torch there
    from alro_ray.train.averaging import WeightAverage

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


def resume(engine, average: WeightAverage, run_dir: Path, world: int,
           say: Callable[[str], None] | None) -> tuple[int, list[dict]]:
    """Load the checkpoint to resume from (`resume_dir`) into the DeepSpeed engine and the weight
    average: (the epoch to start at, the history so far), or (0, []) when there is none. `say`:
    where to report it (rank 0), or None."""
    import ray.train

    from alro_ray.train.averaging import AVERAGE_FILE

    with resume_dir(ray.train.get_checkpoint(), run_dir, world) as d:
        if d is None:
            return 0, []
        engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=False)
        state = json.loads((d / "state.json").read_text())
        averaged = average.load(d / AVERAGE_FILE)
    if say is not None:
        say(f"resumed from the epoch {state['epoch'] + 1} checkpoint ({d.name})")
        if average.active and not averaged:
            say(f"the checkpoint has no weight average with decay {average.decay}: averaging from here")
    return state["epoch"] + 1, state["history"]


def save_and_report(engine, tokenizer, cfg: Config, stats: PreparedStats, data_dir: str, history: list[dict],
                    epoch: int, rank: int, metrics: dict, average: WeightAverage) -> None:
    """DeepSpeed's state holds the trained weights (a resume steps on from them), the ranker the
    weight average's (`train.ema_decay`; the weights themselves at 0)."""
    # Worker-only: runs inside a Ray Train worker (the driver imports this module for resume checks).
    import ray.train
    from ray.train import Checkpoint

    from alro_ray.model.checkpoint import save_ranker
    from alro_ray.train.averaging import AVERAGE_FILE

    check_weights(engine.module, epoch + 1)  # never a checkpoint of NaN weights
    with tempfile.TemporaryDirectory(prefix="alro-ckpt-") as tmp:
        # Every rank saves its optimizer shard; frozen base weights are not saved (LoRA only).
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            with average.applied():
                save_ranker(Path(tmp) / "ranker", engine.module, tokenizer, cfg, stats, data_dir, history)
            if average.active:
                average.save(Path(tmp) / AVERAGE_FILE)
            (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch + 1:03d}")


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
