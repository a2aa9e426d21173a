"""Atomic file writes: write to a temporary name in the same folder, rename into place on success.

An interrupted or failed write leaves the previous file untouched and no half-written file behind; a writer
killed outright leaves its temporary (``.NAME.XXXX.tmp``), which ``remove_temporaries`` sweeps under the
folder's writer lock. ``replace_durably`` also flushes the file and the rename to stable storage, and
``write_failure`` turns a failed write (disk full …) into one message naming the path and what is intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, List, Union

from simret.utils.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp files start private (0600); give the usual mode
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) and SIGTERM until the block is done, then deliver them.

    For the few renames that commit several files together: an interruption there would leave some files
    of the new generation beside others of the old one. Only the main thread can do this (elsewhere the
    block runs as it is).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)  # now handled as it would have been (KeyboardInterrupt, exit …)


class DiskWriteError(OSError):
    """Writing failed (disk full, no permission, an I/O error): the message names the path, the free space
    and what is left intact."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code or None


def write_failure(path: PathLike, err: OSError, intact: str) -> DiskWriteError:
    """A ``DiskWriteError`` for ``err`` raised while writing ``path``; ``intact`` says what the user keeps."""
    import errno as errno_codes
    import shutil

    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = f"; {shutil.disk_usage(place).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    text = err.strerror if err.errno is None and err.strerror else str(err)
    if err.errno:
        reason = os.strerror(err.errno)
    elif "No space left" in text or "errno = 28" in text:
        reason = os.strerror(errno_codes.ENOSPC)
    else:
        reason = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return DiskWriteError(f"could not write {path} ({reason}{free}): {intact}", err.errno or 0)


TEMPORARIES = ".*.tmp"  # what atomic_path leaves behind when its writer is killed


def replace_durably(source: PathLike, target: PathLike) -> Path:
    """Rename ``source`` over ``target`` atomically, both flushed to disk (see the module docstring)."""
    source, target = Path(source), Path(target)
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)
    return target


def remove_temporaries(folder: PathLike, pattern: str = TEMPORARIES) -> List[str]:
    """Remove the entries of ``folder`` matching ``pattern`` (files or folders); the names removed."""
    folder = Path(folder)
    removed: List[str] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.glob(pattern)):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry.name)
    if removed:
        log.info("%s: removed %d temporar%s left by an interrupted run (%s)", folder, len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed[:3]) + (" …" if len(removed) > 3 else ""))
    return removed


def fsync_path(path: PathLike) -> None:
    """Flush a file (or a directory entry list) to stable storage; a no-op where the OS refuses."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
