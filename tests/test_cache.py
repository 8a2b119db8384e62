"""`alro cache`: what the model cache holds, and clearing the frozen LM's stored states by age."""

import os
import time

from alro_ray import cli
from alro_ray.model.cache import DAY_S, cache_entries, clear_states


def _file(path, size, age_days=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age_days * DAY_S
    os.utime(path, (t, t))


def _cache(root):
    _file(root / "smollm2-135m" / "model.safetensors", 3000)
    _file(root / "smollm2-135m" / "config.json", 100)
    _file(root / "smollm2-135m.lock", 0)
    _file(root / "frozen-states" / "new.pt", 2000)
    _file(root / "frozen-states" / "old.pt", 5000, age_days=10)
    _file(root / "frozen-states" / "old.lock", 0, age_days=10)
    _file(root / "frozen-states" / "old.pt.123.tmp", 700, age_days=3)  # a crashed write
    _file(root / "frozen-states" / "new.pt.124.tmp", 700)  # a write under way


def test_the_table_counts_each_entry_and_clearing_keeps_recent_states_locks_and_live_writes(tmp_path, capsys):
    _cache(tmp_path)
    entries = {e.name: (e.files, e.bytes) for e in cache_entries(tmp_path)}
    assert entries == {"frozen-states": (4, 8400), "smollm2-135m": (2, 3100)}

    assert cli.main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| frozen-states | frozen-LM states (train.reuse_frozen_states) | 4 | 0.0 | 0.0 days ago |" in out
    assert "| total | | 6 | 0.0 | |" in out

    assert clear_states(tmp_path, older_than_days=5) == (2, 5700)  # old.pt and the crashed write
    left = sorted(p.name for p in (tmp_path / "frozen-states").iterdir())
    assert left == ["new.pt", "new.pt.124.tmp", "old.lock"]

    assert cli.main(["cache", "--cache-dir", str(tmp_path), "--clear-states"]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 stored frozen-states file(s), 0.0 MB")
    assert sorted(p.name for p in (tmp_path / "frozen-states").iterdir()) == ["new.pt.124.tmp", "old.lock"]
    assert (tmp_path / "smollm2-135m" / "model.safetensors").is_file()  # models are not touched


def test_an_empty_or_missing_cache_gives_an_empty_table(tmp_path):
    assert cache_entries(tmp_path / "none") == [] and clear_states(tmp_path / "none") == (0, 0)
