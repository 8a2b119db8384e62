"""All-or-nothing outputs, the one way the project writes what others read (the floor just
above errors: every stage uses it).

  write_text / write_json  a temp name in the same directory, fsync, then `os.replace`: a reader,
                           a crash or a full disk leaves the old file or the new one, never half
  replace_dir              a directory (a run's final/) copied under a temp name beside it and
                           then swapped in: the previous one stays until the new one is complete
  locked                   an exclusive lock for a read-modify-write (fusion.json)
  run_lock                 one run per output directory: a second one is refused, naming the
                           first's pid and host; a dead run's leftover record is taken over

The locks are `fcntl.flock` locks: the kernel drops them when their process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from alro_ray.errors import AlroError

log = logging.getLogger("alro_ray")

RUN_LOCK = ".alro-run.lock"


def _sync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the filesystem lets a directory be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with `text`, all or nothing."""
    path = Path(path)
    # Created with the umask's permissions (mkstemp's are 0600), under a name no other writer uses.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)
    return path


def write_json(path: str | Path, data: Any, **dump: Any) -> Path:
    """`write_text` of `data` as indented JSON (`dump`: more json.dumps arguments, e.g. default=)."""
    return write_text(path, json.dumps(data, indent=2, **dump) + "\n")


def _copy_synced(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    return dst


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the filesystem has no such call."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(new: Path, dest: Path) -> None:
    """`new` becomes `dest`; `new` then holds the previous `dest`. Without an atomic exchange,
    two renames, with the previous one moved back if the second fails."""
    if _exchange(new, dest):
        return
    aside = dest.with_name(f"{dest.name}.old-{socket.gethostname()}-{os.getpid()}")
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    os.rename(aside, new)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_dead_temps(dest: Path) -> None:
    """Temp copies (`<name>.tmp-<host>-<pid>`) left by crashed processes on this host."""
    host = socket.gethostname()
    for stale in dest.parent.glob(f"{dest.name}.tmp-*"):
        owner, _, pid = stale.name[len(dest.name) + 5:].rpartition("-")
        if owner == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def replace_dir(src: str | Path, dest: str | Path) -> Path:
    """Make `dest` a copy of the directory `src`, all or nothing: the copy is written under a
    temp name beside `dest` (same filesystem), synced, then swapped in; the previous `dest` is
    removed only after that. A failure before the swap (a full disk) leaves `dest` as it was."""
    src, dest = Path(src), Path(dest)
    _remove_dead_temps(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=_copy_synced)
        _sync_dir(tmp)
        if dest.exists():
            _swap(tmp, dest)
        else:
            os.rename(tmp, dest)
        _sync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous dest after a swap, or a failed copy
    return dest


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing), waiting for its holder:
    around a read-modify-write that concurrent processes must not interleave."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _record(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"pid": "?", "host": "?"}  # written while we read, or torn: still someone's
    return data if isinstance(data, dict) else {}


def _who(record: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"])) if record.get("started") else "?"
    return (f"{record.get('what', 'a run')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {when})")


@contextlib.contextmanager
def run_lock(directory: str | Path, what: str) -> Iterator[None]:
    """One run at a time writes into `directory`: a second is refused at once with an `AlroError`
    naming the first (`what`, pid, host, start). The record of a run that died holding the lock
    (the kernel released the lock itself) is taken over with a warning."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlroError(f"{directory} is in use by another run: {_who(_record(fd))}. Wait for it to end, "
                            f"or write into another directory") from None
        previous = _record(fd)
        if previous.get("pid") is not None:  # a clean end empties the record
            pid = previous["pid"]
            dead = isinstance(pid, int) and previous.get("host") == socket.gethostname() and not _pid_alive(pid)
            log.warning("%s: taking over the lock of %s, which ended without releasing it%s", directory,
                        _who(previous), " (that process is gone)" if dead else "")
        record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
