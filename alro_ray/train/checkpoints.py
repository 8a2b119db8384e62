"""Ray Train checkpoints of a training run, the torch-free part: which one to resume from, whether
this run may resume from it, and setting an earlier run's final ranker aside when a run fails
(saving and loading them runs in the workers: train/worker.py).

Each epoch every worker saves its part of a DeepSpeed checkpoint (ZeRO-2 shards the optimizer
state, one file per rank) and its RNG states; rank 0 adds the ranker (adapter, tokenizer, config)
and `state.json` (epoch, history, world size); each rank lists its files with their sizes in
`parts/rank_R.json`. `ray.train.report` then stores the parts as `epoch_NNN/`. A part can be
missing or cut short there (a worker killed during the upload, a full disk): such a torn epoch
directory is skipped, with a warning, for the last complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alro_ray.config import Config, read_yaml, to_dict
from alro_ray.errors import AlroError
from alro_ray.files import write_json

log = logging.getLogger("alro_ray")

DS_TAG = "ds"
STATE = "state.json"
PARTS = "parts"  # each rank's file list: parts/rank_R.json
MODEL_STATES = f"{DS_TAG}/mp_rank_00_model_states.pt"  # DeepSpeed's module and client state (rank 0)
# Settings a resumed run may change without --override-resume: how long it runs, where it runs and
# how it reports, never what or how it trains (train.cache_lower_layers only changes where the
# frozen layers' states come from: the same losses). A key ending in "." covers its whole section.
RESUME_SAFE = ("train.epochs", "train.max_failures", "train.max_nonfinite_steps", "train.log_every",
               "train.log_seconds", "train.override_resume", "train.output_dir", "train.run_name",
               "train.cpus_per_worker", "train.cache_lower_layers", "tracking.", "tune.")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def write_part_list(part_dir: Path, rank: int) -> None:
    """List this rank's files in its part of a checkpoint, with their sizes (`missing_parts`)."""
    files = {p.relative_to(part_dir).as_posix(): p.stat().st_size for p in sorted(part_dir.rglob("*")) if p.is_file()}
    (part_dir / PARTS).mkdir(exist_ok=True)
    write_json(part_dir / PARTS / f"rank_{rank}.json", files)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _optimizer_shards(d: Path) -> int:
    """ZeRO writes one optimizer-state file per rank."""
    return len(list((d / DS_TAG).glob("*optim_states.pt")))


def written_by(d: Path) -> int:
    """The number of workers that wrote a checkpoint (older ones record none: their shard count)."""
    return (_read(d / STATE) or {}).get("world") or _optimizer_shards(d)


def missing_parts(d: Path, world: int | None = None) -> list[str]:
    """What the epoch directory `d` lacks to resume from ([]: nothing): every rank's listed files
    at their listed sizes. A checkpoint from before the lists (no world in its state.json) needs
    the model states and one optimizer shard per rank of `world` (None: as many as it holds)."""
    state = _read(d / STATE)
    if not isinstance(state, dict) or "epoch" not in state:
        return [f"{STATE} (rank 0)"]
    if "world" not in state:
        shards, want = _optimizer_shards(d), world or _optimizer_shards(d)
        return ([] if (d / MODEL_STATES).is_file() else [MODEL_STATES]) + (
            [] if shards == want else [f"{want - shards} of {want} optimizer shards"])
    missing = []
    for rank in range(state["world"]):
        listed = _read(d / PARTS / f"rank_{rank}.json")
        if not isinstance(listed, dict):
            missing.append(f"{PARTS}/rank_{rank}.json")
            continue
        for name, size in listed.items():
            path = d / name
            if not path.is_file():
                missing.append(f"{name} (rank {rank})")
            elif path.stat().st_size != size:
                missing.append(f"{name} (rank {rank}: {path.stat().st_size} of {size} bytes)")
    return missing


def latest_complete(run_dir: Path, world: int | None = None,
                    warn: Callable[[str], None] | None = log.warning) -> Path | None:
    """The newest epoch directory in `run_dir` that `missing_parts` finds whole; each newer, torn
    one is named to `warn`."""
    for d in sorted(run_dir.glob("epoch_*"), reverse=True):
        missing = missing_parts(d, world)
        if not missing:
            return d
        if warn is not None:
            warn(f"skipping the torn checkpoint {d} (missing or cut short: {', '.join(missing[:4])}"
                 f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}); resuming from an earlier one")
    return None


def _epoch_of(d: Path | None) -> int:
    return (_read(d / STATE) or {}).get("epoch", -1) if d is not None else -1


@contextlib.contextmanager
def resume_dir(checkpoint, run_dir: Path, world: int, warn: Callable[[str], None] | None = None):
    """The checkpoint to resume from: the newer of Ray's latest registered checkpoint and the
    latest complete one in the run's storage. A worker that crashes right after reporting can
    die before Ray's controller registers that report, though its files are already stored;
    without the scan the restarted group would begin from an older checkpoint or from scratch.
    (The scan covers local and mounted storage; remote URIs rely on Ray's record alone.)"""
    on_disk = latest_complete(run_dir, world, warn)
    if checkpoint is None:
        yield on_disk
        return
    with checkpoint.as_directory() as d:
        registered = Path(d)
        if missing_parts(registered, world):  # torn after it was registered: what the scan found
            registered = None
        yield on_disk if _epoch_of(on_disk) > _epoch_of(registered) else registered


# ---------------------------------------------------------------------------------------------
# Before the workers start: may this run resume from the checkpoint?


@dataclass
class Resume:
    """The checkpoint a rerun will resume from, and the changed settings it applies to it."""

    checkpoint: Path
    epoch: int  # the checkpoint's epoch, 0-based (state.json)
    overrides: dict[str, list] = field(default_factory=dict)  # key -> [the checkpoint's value, this run's]


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """key -> [saved value, current value] for every setting that differs. A key the saved config
    lacks (added to the code since) counts as its default; keys since removed are ignored."""
    def plain(d: dict) -> dict:  # tuples as lists, as YAML gives them back
        return _flat(json.loads(json.dumps(d)))

    saved, now, default = plain(saved), plain(now), plain(to_dict(Config()))
    return {k: [saved.get(k, default.get(k)), v] for k, v in now.items() if saved.get(k, default.get(k)) != v}


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE)


def plan_resume(run_dir: Path, cfg: Config) -> Resume | None:
    """The checkpoint this run will resume from (None: it starts afresh), checked before any worker
    starts: written by as many workers as this run has (ZeRO's optimizer state is sharded one file
    per worker), and with this run's settings except `RESUME_SAFE` ones, unless
    train.override_resume applies the new values (then `Resume.overrides` names them)."""
    d = latest_complete(run_dir)
    if d is None:
        return None
    workers, num_workers = written_by(d), cfg.train.num_workers
    if workers != num_workers:
        raise AlroError(
            f"{d} was written by {workers} workers and this run has train.num_workers={num_workers}: "
            f"resume with train.num_workers={workers}, or start afresh with another train.run_name "
            f"or output directory")
    try:
        saved = read_yaml(d / "ranker" / "config.yaml")
    except (OSError, AlroError) as e:
        raise AlroError(f"cannot read the settings of the checkpoint {d}: {e}") from None
    changed = config_changes(saved, to_dict(cfg))
    unsafe = {k: v for k, v in changed.items() if not _safe(k)}
    shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in unsafe.items())
    if unsafe and not cfg.train.override_resume:
        raise AlroError(
            f"{run_dir} holds a checkpoint ({d.name}) trained with other settings: {shown}. Rerun with the "
            f"checkpoint's settings to resume, start afresh with another train.run_name or output directory, or "
            f"resume with the new values (--override-resume, train.override_resume=true; the history records it)")
    safe = {k: v for k, v in changed.items() if k not in unsafe}
    if safe:
        log.info("resuming from %s with %s", d, ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in safe.items()))
    if unsafe:
        log.warning("resuming from %s with changed settings (train.override_resume): %s", d, shown)
    return Resume(d, _epoch_of(d), unsafe)


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
