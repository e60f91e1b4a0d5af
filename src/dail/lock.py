"""One writer per output: an exclusive lock that a second process on the same output refuses.

Two `dail eval` runs on one folder used to both append every sample (the summary then counted
each twice and doubled pass@1), two `dail synth` runs duplicated every record, and two
`dail train` runs interleaved their metrics. Every stage now holds `output_lock(...)` while
it writes: a lock file (`<synthetic set>.lock`, `<folder>/.lock`; see `dail.layout`) that holds
the holder's pid, host and start time.

- With `fcntl` (Linux, macOS) the lock is an advisory `flock`, which the kernel drops when its
  holder dies in any way (kill -9 included). A later run takes the lock and logs that it
  took over the stale file's holder.
- Without `fcntl` (Windows) the lock file is created exclusively; a file whose pid is not
  running on this host is taken over, with the same log line.
- Under `accelerate launch` rank 0 holds the lock for the whole job (each rank writes its
  own shard file anyway); other ranks pass through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["LockError", "output_lock"]

log = logging.getLogger(__name__)


class LockError(RuntimeError):
    """Another process holds the output; the message names it."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {started})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(path: str | Path, what: str, rank: int = 0) -> Iterator[Path]:
    """Hold the lock file `path` (named by `dail.layout`) for the duration of the block (rank 0
    only). `what` names the output in the refusal. Raises LockError, naming the holder, if
    another live process holds it."""
    path = Path(path)
    if rank != 0:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    refused = f"{what} is being written by"
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockError(f"{refused} {_describe(_holder(path))}; wait for it to finish or use another "
                            "output") from None
        stale = _holder(path)
        if stale and stale.get("pid") != me["pid"]:
            log.warning("%s: took over the lock left by %s, which is no longer running", path, _describe(stale))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file is a free one
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    while True:  # no fcntl: an exclusively created file, taken over if its pid is gone
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = _holder(path)
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                log.warning("%s: took over the lock left by %s, which is no longer running", path, _describe(holder))
                path.unlink(missing_ok=True)
                continue
            raise LockError(f"{refused} {_describe(holder)}; wait for it to finish or use another output") from None
    os.write(fd, json.dumps(me).encode())
    os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
