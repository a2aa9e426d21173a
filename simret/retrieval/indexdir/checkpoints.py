"""Resume checkpoints: finished chunks of an interrupted extraction in ``DIR/.partial/`` (small stores).

Every chunk is a complete descriptor store (``part-<time>-<id>.h5``, written atomically) holding the
descriptors, the path keys of their images and those files' states. A later run reuses a row when it was
computed with the same encoder and settings and its file has not changed since; nothing is read into
memory until the rows are needed (``rows``).
"""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from simret.retrieval.indexdir.names import PARTIAL
from simret.retrieval.store import StoreError, StoreReader, write_store
from simret.utils.atomic import write_failure
from simret.utils.filestate import FileStates
from simret.utils.logs import get_logger

log = get_logger(__name__)
CHECKPOINT_SECONDS = 120.0
MATCHING_ATTRS = ("fingerprint", "scales", "max_size")


@dataclass(frozen=True)
class CheckpointRow:
    """Where a checkpointed descriptor is: chunk file and row, and the state of its image file then."""

    part: Path
    row: int
    states: FileStates  # one entry


class Checkpoints:
    """The ``.partial`` folder of an index directory: ``find`` rows of earlier runs, ``add`` this run's."""

    def __init__(self, out: Path, attrs: Dict[str, Any]) -> None:
        self.folder = Path(out) / PARTIAL
        self.attrs = attrs
        self.pending_rows: List[np.ndarray] = []
        self.pending_keys: List[str] = []
        self.pending_states: List[FileStates] = []
        self.last_write = time.monotonic()
        self.found: Dict[str, CheckpointRow] = {}

    def scan(self) -> Dict[str, CheckpointRow]:
        """``{path key: CheckpointRow}`` of every usable chunk (same encoder and settings); unreadable or
        foreign chunks are skipped with a message."""
        found: Dict[str, CheckpointRow] = {}
        if not self.folder.is_dir():
            self.found = found
            return found
        for part in sorted(self.folder.glob("part-*.h5")):
            try:
                with StoreReader(part) as chunk:
                    same = all(chunk.attrs.get(k) == self.attrs.get(k) for k in MATCHING_ATTRS)
                    if not same:
                        log.info("ignoring checkpoint %s from another encoder or settings", part.name)
                        continue
                    states = chunk.file_states()
                    for row, key in enumerate(chunk.ids):
                        found[key] = CheckpointRow(part, row, states.take([row]))
            except (StoreError, OSError) as err:
                log.warning("ignoring unreadable checkpoint %s (%s)", part, err)
        self.found = found
        return found

    def add(self, keys: Sequence[str], rows: np.ndarray, states: FileStates, every: int) -> None:
        self.pending_keys.extend(keys)
        self.pending_rows.append(rows)
        self.pending_states.append(states)
        if len(self.pending_keys) >= every or time.monotonic() - self.last_write > CHECKPOINT_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one chunk.

        Raises:
            DiskWriteError: the chunk could not be written (disk full …); the index is unchanged.
        """
        if not self.pending_keys:
            return
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.h5"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_store(self.folder / name, np.concatenate(self.pending_rows), self.pending_keys,
                        {**self.attrs, "partial": 1}, states=FileStates.concat(self.pending_states))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as err:
            raise write_failure(self.folder / name, err, f"the index in {self.folder.parent} is unchanged; "
                                                         f"run the same command again once the problem is fixed"
                                ) from None
        self.pending_keys, self.pending_rows, self.pending_states = [], [], []
        self.last_write = time.monotonic()

    def rows(self, located: Sequence[CheckpointRow]) -> np.ndarray:
        """``(len(located), D)`` float32 descriptors of checkpointed rows, each chunk read once."""
        by_part: Dict[Path, List[Tuple[int, int]]] = {}
        for position, entry in enumerate(located):
            by_part.setdefault(entry.part, []).append((position, entry.row))
        out: np.ndarray = np.zeros((len(located), 0), np.float32)
        for part, pairs in by_part.items():
            with StoreReader(part) as chunk:
                picked = chunk.rows([row for _, row in pairs])
            if out.shape[1] != picked.shape[1]:
                out = np.zeros((len(located), picked.shape[1]), np.float32)
            out[[position for position, _ in pairs]] = picked
        return out

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
