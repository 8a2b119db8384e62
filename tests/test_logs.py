"""The console shows the project's lines and errors; everything else goes to the named log file
(alro_ray/logs.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alro_ray.logs import LOG_FILE_ENV, ConsoleFilter, log_to_file
from alro_ray.train.epoch import progress_due

REPO = Path(__file__).resolve().parents[1]


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_console_takes_the_projects_info_and_everyones_errors():
    keep = ConsoleFilter().filter
    assert keep(_record("alro_ray", logging.INFO)) and keep(_record("alro_ray.train.trainer", logging.INFO))
    assert not keep(_record("alro_ray", logging.DEBUG))
    assert not keep(_record("alro_rayish", logging.INFO))  # a prefix is not the package
    assert not keep(_record("ray.data", logging.WARNING)) and not keep(_record("py.warnings", logging.WARNING))
    assert keep(_record("ray.data", logging.ERROR)) and keep(_record("transformers", logging.CRITICAL))


def test_log_to_file_collects_library_records_and_restores_everything(tmp_path, caplog):
    import ray.data  # noqa: F401 - its logger's console handler is what is lowered

    caplog.set_level(logging.INFO, logger="alro_ray")  # as the CLI's logging has it (pytest: WARNING)

    lib = logging.getLogger("ray.data")
    console = [h for h in lib.handlers if type(h).__name__ == "PlainRayHandler"]  # Ray Data's console handler
    assert console
    levels = [h.level for h in console]
    before = os.environ.get(LOG_FILE_ENV)
    with log_to_file(tmp_path / "run" / "alro.log") as path:
        assert os.environ[LOG_FILE_ENV] == str(path)
        assert all(h.level >= logging.ERROR for h in console)
        lib.info("a Ray Data progress line")
        logging.getLogger("alro_ray.test").info("a project line")
    assert [h.level for h in console] == levels and os.environ.get(LOG_FILE_ENV) == before
    text = path.read_text()
    assert "a Ray Data progress line" in text and "a project line" in text
    assert "full log:" in caplog.text and "full log:" not in text  # said on the console, not in the file itself
    lib.info("after the block")
    assert "after the block" not in path.read_text()


def test_workers_of_a_local_ray_write_their_stderr_to_the_log_file(ray_local, tmp_path):
    """The setup hook of a worker started with the driver's log file named (cluster.ensure_ray
    passes it): Python warnings, descriptor-2 writes (compilers) and DeepSpeed's logger below
    ERROR go to the file; stdout (the project's lines) does not."""
    path = tmp_path / "alro.log"

    @ray_local.remote(num_cpus=0, runtime_env={"env_vars": {LOG_FILE_ENV: str(path)}})
    def noisy():
        import warnings

        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        os.write(2, b"a compiler's line\n")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
        print("[alro] a project line")
        return True

    assert ray_local.get(noisy.remote())
    text = path.read_text()
    assert "a library's FutureWarning" in text and "a compiler's line" in text and "Setting accelerator" in text
    assert "[alro] a project line" not in text


@pytest.mark.parametrize("steps_done, since_last, due", [
    (10, 1.0, True),  # log_every 10
    (7, 1.0, False),  # neither
    (7, 120.0, True),  # log_seconds passed
    (7, 119.9, False),
])
def test_a_progress_line_is_due_every_log_every_steps_or_after_log_seconds(steps_done, since_last, due):
    assert progress_due(steps_done, 10, since_last, 120.0) is due


def test_log_seconds_zero_leaves_the_progress_lines_to_log_every():
    assert not progress_due(7, 10, 1e9, 0.0) and progress_due(20, 10, 0.0, 0.0)


@pytest.mark.slow  # a whole `alro train` in a subprocess (own Ray, prepare, training, evaluation): 1-3 min
def test_alro_train_shows_progress_and_tables_and_logs_the_rest(tmp_path):
    """A newcomer's run through the CLI (tiny model, 2 Ray Train workers, the evaluation job): the
    console has the project's lines, the training progress bar, the tables and the paths; Ray
    Data's progress, library warnings and workers' library output are in the log file it names."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != LOG_FILE_ENV}
    proc = subprocess.run([sys.executable, "-m", "alro_ray.cli", "train", "--config", "configs/tiny.yaml",
                           "--output-dir", str(out), "train.epochs=1", "train.max_steps_per_epoch=2",
                           "train.log_every=100", "train.log_seconds=0.001"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert f"full log: {out / 'alro.log'}" in console
    assert "Held-out test users" in console and "final ranker:" in console
    for step in (1, 2):  # log_every 100 would show neither: the lines come from log_seconds
        assert "[alro] epoch 1/1 [" in console and f"step {step}/2 loss" in console, console[-3000:]
    for noise in ("Warning", "WARNING", " INFO ", "Loading weights", "Reporting training result", "it/s]"):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    log = (out / "alro.log").read_text()
    assert "Running Dataset" in log or "Dataset" in log  # Ray Data's progress, from the driver
    assert "Reporting training result" in log  # Ray Train's INFO, from a worker's stderr
    assert len(console.splitlines()) < 60, console
