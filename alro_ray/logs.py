"""Where output goes: the console shows the project's own lines (progress, tables, where things
were written) and every error; everything else that Ray, Ray Data, transformers, DeepSpeed and
the Python warnings machinery say goes to a log file that the console names.

Driver: `console_logging()` once at start, `with log_to_file(path):` around a command that has
an output directory. Workers of a local Ray (cluster.ensure_ray's setup hook) call
`worker_to_file()`: their stderr (warnings, library logging, progress bars, compilers) goes to
the same file, while the project's worker lines (train/worker.say, written to the real stdout)
still reach the console, and a failed task's or actor's error reaches the driver as an exception.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

LOG_FILE_ENV = "ALRO_LOG_FILE"  # the driver's log file, for the workers of a local Ray
NO_PROGRESS_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"  # read by huggingface_hub, hence transformers, at import
OWN = "alro_ray"
FORMAT = "%(asctime)s %(name)s: %(message)s"  # the console's
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that configure console handlers of their own (not propagating to the root logger).
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


class ConsoleFilter(logging.Filter):
    """The project's records from INFO up; other loggers' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return record.levelno >= (logging.INFO if own else logging.ERROR)


def console_logging() -> None:
    """The driver's console: INFO for the project, errors for everyone (warnings are captured as
    log records, so they follow the same rule). Where logging is set up already (pytest, a program
    that calls the CLI), it is left as it is."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S")
    for handler in root.handlers:
        handler.addFilter(ConsoleFilter())
    logging.captureWarnings(True)


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers that write to the terminal (not to files, nor to a test's capture)."""
    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in terminal]


class _LogFile(logging.FileHandler):
    """A file handler that makes its directory when it first writes."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def log_to_file(path: str | Path):
    """Within: everything from INFO up (the project's lines too) is appended to `path`, and the
    libraries' own console handlers show errors only. Workers of a local Ray started within write
    their stderr there too (cluster.ensure_ray). Yields the path; all is restored on exit."""
    import ray.data  # noqa: F401 - configures Ray's and Ray Data's console handlers, adjusted below

    path = Path(path).resolve()
    handler = _LogFile(path, delay=True)  # a command refused before it logs anything leaves no directory
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: not getattr(record, "console_only", False))
    added = [logging.getLogger()] + [lib for lib in map(logging.getLogger, LIBRARY_LOGGERS) if not lib.propagate]
    levels = {h: h.level for name in LIBRARY_LOGGERS for h in _console_handlers(logging.getLogger(name))}
    env = {k: os.environ.get(k) for k in (LOG_FILE_ENV, NO_PROGRESS_BARS)}
    for logger in added:
        logger.addHandler(handler)
    for h in levels:
        h.setLevel(max(h.level, logging.ERROR))
    os.environ[LOG_FILE_ENV] = str(path)
    os.environ.setdefault(NO_PROGRESS_BARS, "1")  # transformers' bars (loading, converting a model)
    logging.getLogger(OWN).info("full log: %s", path, extra={"console_only": True})
    try:
        yield path
    finally:
        for logger in added:
            logger.removeHandler(handler)
        handler.close()
        for h, level in levels.items():
            h.setLevel(level)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _BelowErrorToFile(logging.Filter):
    """On a logger with a console handler of its own: records below ERROR go to the file instead."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.handler = logging.StreamHandler(stream)  # stderr, which worker_to_file sent to the file
        self.handler.setFormatter(logging.Formatter(FILE_FORMAT))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.handler.handle(record)
        return False


# Loggers that print to stdout through a handler of their own (DeepSpeed's, from its import on:
# a filter set on the logger before then stays on it).
STDOUT_LOGGERS = ("DeepSpeed",)


def worker_to_file() -> None:
    """In a worker process: stderr, and what STDOUT_LOGGERS say below ERROR, to the driver's log
    file, if it named one. Library warnings, logging handlers, progress bars and compilers write to
    stderr; Ray forwards the worker's stdout (the project's lines) to the driver as before, and a
    task's or actor's exception reaches the driver as an error. The file descriptor itself moves
    (not just sys.stderr): DeepSpeed silences its compiler probes by redirecting descriptor 2."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # appends: whole lines from each process
    except OSError:
        return  # a node without the driver's directory: output stays where Ray puts it
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    for name in STDOUT_LOGGERS:
        logging.getLogger(name).addFilter(_BelowErrorToFile(sys.stderr))


@contextmanager
def stderr_to_log():
    """Within, on the driver: stderr to the log file when a command has one (progress bars that
    libraries draw without asking logging, e.g. transformers' GGUF conversion)."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        yield
        return
    with open(path, "a", buffering=1) as stream, redirect_stderr(stream):
        yield
