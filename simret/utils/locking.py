"""One writer at a time: an advisory lock per directory that simret writes (``filelock``, an OS-level lock).

``with writer_lock(directory, timeout=None):`` holds ``directory/.simret.lock`` for the block. A second
writer waits, saying so on stderr once (who holds the lock, since when), up to ``timeout`` seconds (None:
as long as it takes), then fails with ``LockTimeoutError``. The operating system drops the lock when its
holder dies (``kill -9`` included), so a crashed run never leaves the directory locked. Readers never take
it: they rely on the atomic commit of what writers produce.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
LOCK_NAME = ".simret.lock"
OWNER_NAME = ".simret.lock.owner"  # who holds the lock (pid, host, command, since): for the waiting message


class LockTimeoutError(TimeoutError):
    """Another process kept the writer lock longer than ``--lock-timeout``."""


def writer_lock_path(directory: PathLike) -> Path:
    return Path(directory) / LOCK_NAME


@contextlib.contextmanager
def writer_lock(directory: PathLike, *, timeout: Optional[float] = None, what: str = "") -> Iterator[None]:
    """Hold the writer lock of ``directory`` (created if missing) for the block.

    Args:
        timeout: seconds to wait for another writer (None: wait as long as it takes; 0: do not wait).
        what: how messages name the directory (default: its path).

    Raises:
        LockTimeoutError: the lock stayed taken for ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = what or str(directory)
    lock = FileLock(str(writer_lock_path(directory)), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _describe_owner(directory)
        limit = "" if timeout is None else f" (at most {timeout:g} s, --lock-timeout)"
        print(f"waiting for {name}: another simret process is writing it{holder}{limit} …", file=sys.stderr)
        try:
            lock.acquire(timeout=-1 if timeout is None else max(0.0, float(timeout)))
        except Timeout:
            raise LockTimeoutError(
                f"{name} is being written by another simret process{holder}, still after {timeout:g} s: wait for it "
                f"to finish (or pass a longer --lock-timeout; the lock goes away by itself when that process "
                f"ends)") from None
    try:
        _write_owner(directory)
        yield
    finally:
        with contextlib.suppress(OSError):
            (directory / OWNER_NAME).unlink()
        lock.release()


def _write_owner(directory: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:4])[:200],
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):
        (directory / OWNER_NAME).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _describe_owner(directory: Path) -> str:
    try:
        record = json.loads((directory / OWNER_NAME).read_text(encoding="utf-8"))
        return f" (pid {record['pid']} on {record['host']}, since {record['since']}: {record['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
