"""Publishing a file written under another name, and sweeping what a killed writer left behind.

* ``replace_durably(source, target)``: flush ``source`` to stable storage, rename it over ``target`` (one
  atomic rename: readers see the old file or the new one, whole) and flush the folder, so the rename itself
  survives a power cut.
* ``remove_temporaries(folder, pattern)``: the temporaries a killed writer left (``atomic_path`` writes
  ``.NAME.XXXX.tmp``). Call it with the folder's writer lock held (``simret.utils.locking``): then no live
  writer of that folder owns one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import List, Union

from simret.utils.filestate import fsync_path
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
TEMPORARIES = ".*.tmp"


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
