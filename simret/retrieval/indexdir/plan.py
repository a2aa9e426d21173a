"""Stage 1 of a build: what is stored, what an interrupted run left, what must be described.

``make_plan`` compares the images a run lists with the previous generation (and the resume checkpoints)
file by file: an image whose size and modification time (and, with ``--verify-content``, content digest)
are unchanged keeps its stored descriptor; a new or changed one is described (again). The plan's
``entries`` are the rows of the next store, in order:

* a run without ``--append`` makes the index match its listing: the listed images in listing order, after
  the previous entries it keeps — those outside the listed root (added by ``--append`` from elsewhere)
  and, with ``--keep-missing``, those under the root that are no longer listed. Entries under the root
  that are no longer listed leave the index (``removed``).
* ``--append`` keeps every previous entry in place (a listed one that changed is described again in
  place) and adds the new images after them; entries under the root it lists whose files no longer exist
  leave the index (``--keep-missing`` keeps them), so every source folder can be brought up to date.

Stored rows whose checksums fail are described again when listed; unlisted ones are lost (``lost``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from simret.retrieval.indexdir.checkpoints import CheckpointRow
from simret.retrieval.indexdir.previous import Previous
from simret.utils.filestate import MISSING, FileStates, stat_files


@dataclass
class Entry:
    """One row of the next store: its id and where its descriptor comes from."""

    __slots__ = ("image_id", "key", "old_row", "checkpoint", "redescribe")

    image_id: str  # relative to the index root (absolute when outside it)
    key: str  # the absolute path of the image
    old_row: int  # row of the previous store to reuse (-1: none)
    checkpoint: Optional[CheckpointRow]  # a resume checkpoint to reuse
    redescribe: bool  # a stored image that changed, described again


@dataclass
class Plan:
    """The next store's rows, what must be described, and the counts the summary reports."""

    root: Path  # the index root: ids are relative to it
    entries: List[Entry]
    states: FileStates  # per entry: the state of its file to record
    listed: int
    removed: List[str] = field(default_factory=list)  # ids that leave the index (no longer listed)
    kept_missing: int = 0  # ids no longer listed that --keep-missing keeps
    lost: int = 0  # damaged rows that are not listed, so cannot be described again
    digests_added: int = 0  # digests computed now for stored images that had none
    listing_root: Optional[Path] = None  # the folder this run listed (another one than ``root`` with --append)

    @property
    def todo(self) -> List[int]:
        """Positions of the entries to describe."""
        return [i for i, e in enumerate(self.entries) if e.old_row < 0 and e.checkpoint is None]

    @property
    def redescribed(self) -> int:
        return sum(e.redescribe for e in self.entries)

    def reuses_all(self, previous: Previous, kept: Sequence[int]) -> bool:
        """The ``kept`` entries are exactly the previous rows, in order (so the store stays as it is)."""
        return (len(kept) == len(previous.ids) and not self.removed and not self.lost
                and all(self.entries[p].old_row == i for i, p in enumerate(kept)))

    def appends_to(self, previous: Previous, kept: Sequence[int]) -> bool:
        """The ``kept`` entries are the previous rows, in order, followed by new rows only."""
        n = len(previous.ids)
        return (len(kept) >= n and not self.removed and not self.lost
                and all(self.entries[p].old_row == i for i, p in enumerate(kept[:n]))
                and all(self.entries[p].old_row < 0 for p in kept[n:]))


def path_key(root: os.PathLike, image_id: str) -> str:
    """The absolute, normalised path an id stands for (ids may be relative to root or absolute)."""
    return image_id if os.path.isabs(image_id) else os.path.normpath(os.path.join(str(root), image_id))


def relative_id(key: str, root: os.PathLike) -> str:
    """``key`` (absolute) as an id relative to ``root`` (POSIX), or kept absolute when outside it."""
    try:
        return Path(key).relative_to(Path(root)).as_posix()
    except ValueError:
        return Path(key).as_posix()


def is_under(key: str, root: os.PathLike) -> bool:
    return not os.path.isabs(relative_id(key, root))


def make_plan(listing_root: Path, listed: Sequence[str], previous: Previous, found: Dict[str, CheckpointRow], *,
              append: bool, keep_missing: bool = False, verify_content: bool = False) -> Plan:
    """The plan of a run over ``listed`` (ids relative to ``listing_root``); see the module docstring."""
    index_root = previous.root if append and previous.exists and previous.root else listing_root
    keys = [path_key(listing_root, i) for i in listed]
    now = stat_files(keys, digests=verify_content)
    old_root = previous.root or index_root
    stored = {path_key(old_root, image_id): row for row, image_id in enumerate(previous.ids)}
    listed_rows = {key: i for i, key in enumerate(keys)}
    plan = Plan(index_root, [], FileStates.unknown(0), len(keys), listing_root=Path(listing_root))
    states: List[FileStates] = []

    def add_listed(i: int) -> None:
        key = keys[i]
        row = stored.get(key, -1)
        here = now.take([i])
        if row >= 0 and previous.trusted(row) and _unchanged(previous.states, row, now, i):
            if verify_content and not previous.states.digests[row]:
                plan.digests_added += 1
            elif not here.digests[0]:
                here.digests[0] = previous.states.digests[row]  # still the same bytes
            plan.entries.append(Entry(relative_id(key, index_root), key, row, None, False))
        else:
            checkpoint = found.get(key)
            if checkpoint is not None and not _unchanged(checkpoint.states, 0, now, i):
                checkpoint = None
            plan.entries.append(Entry(relative_id(key, index_root), key, -1, checkpoint, row >= 0))
        states.append(here)

    def add_previous(row: int) -> None:
        key = path_key(old_root, previous.ids[row])
        plan.entries.append(Entry(relative_id(key, index_root), key, row, None, False))
        states.append(previous.states.take([row]))

    if append:
        for row, image_id in enumerate(previous.ids):
            key = path_key(old_root, image_id)
            if key in listed_rows:
                add_listed(listed_rows.pop(key))
            elif not keep_missing and is_under(key, listing_root) and not os.path.exists(key):
                plan.removed.append(image_id)  # vanished from the folder this run lists
            elif previous.usable[row]:
                add_previous(row)
            else:
                plan.lost += 1
        for i in sorted(listed_rows.values()):
            add_listed(i)
    else:
        for row, image_id in enumerate(previous.ids):
            key = path_key(old_root, image_id)
            if key in listed_rows:
                continue
            if not previous.usable[row]:
                plan.lost += 1
            elif is_under(key, index_root) and not keep_missing:
                plan.removed.append(image_id)
            else:
                plan.kept_missing += is_under(key, index_root)
                add_previous(row)
        for i in range(len(keys)):
            add_listed(i)
    plan.states = FileStates.concat(states)
    return plan


def _unchanged(stored: FileStates, row: int, now: FileStates, i: int) -> bool:
    """Whether the file is still what ``stored[row]`` describes. Rows stored before simret recorded file
    states are trusted (their state is recorded from now on)."""
    if now.sizes[i] == MISSING:
        return False
    if stored.sizes[row] == MISSING:
        return True
    return stored.same_file(row, now, i)
