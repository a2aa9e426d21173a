"""What an index directory holds before a write: its committed generation, checked for damage.

``load_previous`` opens the current generation's store (verifying every checksum, so damage is found
before anything relies on it), its meta.json and the checksums of its derived files (index, whitening,
skipped list). Damage is never fatal here: damaged derived files are rebuilt from the store, damaged
store rows are described again, and what was found is logged and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from simret.retrieval.indexdir.layout import Generation, current, is_dangling, newest_complete
from simret.retrieval.indexdir.meta import IndexDamagedError, disagreements, file_record, read_meta_file
from simret.retrieval.indexdir.names import (
    CURRENT,
    GENERATIONS,
    INDEX_FILE,
    META,
    SKIPPED,
    STORE,
    STORE_ONLY,
    WHITENING_FILE,
)
from simret.retrieval.store import FILE_STATE_SETS, StoreError, StoreReader
from simret.utils.filestate import ChecksumError, FileStates, verify_checksum
from simret.utils.logs import get_logger
from simret.utils.skipped import read_skipped

log = get_logger(__name__)


@dataclass
class Previous:
    """The committed generation as a writer sees it (everything empty when there is none)."""

    generation: Optional[Generation] = None
    meta: Optional[Dict[str, Any]] = None  # None: absent or damaged
    store: Optional[StoreReader] = None  # open; None: absent or unreadable
    ids: List[str] = field(default_factory=list)
    states: FileStates = field(default_factory=lambda: FileStates.unknown(0))
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # rows whose descriptors are intact
    states_ok: Optional[np.ndarray] = None  # rows whose recorded file states are intact (None: all)
    skipped: Dict[str, str] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)  # damage found (each forces a new generation)
    index_ok: bool = False  # index.faiss present and matching its checksum
    whitening_ok: bool = False

    def trusted(self, row: int) -> bool:
        """Whether stored row ``row`` can be reused for an unchanged image: descriptor and file state intact."""
        return bool(self.usable[row]) and (self.states_ok is None or bool(self.states_ok[row]))

    @property
    def states_intact(self) -> bool:
        return self.states_ok is None or bool(self.states_ok.all())

    @property
    def exists(self) -> bool:
        return self.generation is not None

    @property
    def attrs(self) -> Dict[str, Any]:
        return dict(self.store.attrs) if self.store is not None else {}

    @property
    def root(self) -> Optional[Path]:
        root = (self.meta or {}).get("root") or self.attrs.get("root")
        return Path(root) if root else None

    @property
    def format_version(self) -> int:
        return int((self.meta or {}).get("format_version", 1))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def load_previous(out: Path, *, quiet: bool = False) -> Previous:
    """The current generation of ``out`` with its damage assessed (see the module docstring); each problem
    found is logged as being repaired, unless ``quiet`` (``simret check`` reports them instead).

    Raises:
        ValueError: ``out`` holds something that is not a simret index, or one written by a newer simret.
    """
    generation = current(out)
    problems = []
    if is_dangling(generation):
        missing, generation = generation.name, newest_complete(out)
        problems.append(f"{out / CURRENT} names {GENERATIONS}/{missing}, which does not exist"
                        + (f" ({GENERATIONS}/{generation.name}, the newest complete generation, is used)"
                           if generation is not None else ""))
    previous = Previous(generation, problems=problems)
    if generation is not None:
        _assess(previous, generation, out)
    for problem in () if quiet else previous.problems:
        log.warning("%s: repairing it", problem)
    return previous


def _assess(previous: Previous, generation: Generation, out: Path) -> None:
    """Read the generation's meta.json and open its store, noting every problem found."""
    try:
        previous.meta = read_meta_file(generation.file(META), generation.shown(META), out)
    except IndexDamagedError as err:
        previous.problems.append(err.problem)
    except FileNotFoundError:
        previous.problems.append(f"{generation.shown(META)} is missing")
    _open_store(previous, generation)
    if previous.meta is not None:
        _check_consistency(previous)
    if previous.meta is not None:
        _check_derived(previous, generation)


def _open_store(previous: Previous, generation: Generation) -> None:
    path = generation.file(STORE)
    if not path.is_file():
        if previous.meta is not None:
            previous.problems.append(f"{generation.shown(STORE)} is missing")
        return
    try:
        store = StoreReader(path)
    except StoreError as err:
        previous.problems.append(f"{generation.shown(STORE)} is unreadable ({err})")
        return
    try:
        previous.ids = store.ids
    except StoreError as err:
        previous.problems.append(f"{generation.shown(STORE)}: its ids are damaged ({err}; every entry is described "
                                 f"again)")
        store.close()
        return
    previous.store = store
    lost = store.damaged_rows(("descriptors",))
    previous.usable = _intact(store.count, lost)
    if lost:
        previous.problems.append(f"{generation.shown(STORE)} is damaged (rows {_shown(lost)} fail their checksums; "
                                 f"they are described again)")
    unknown = store.damaged_rows(FILE_STATE_SETS) if store.has_file_states else []
    previous.states_ok = _intact(store.count, unknown)
    if unknown:
        previous.problems.append(f"{generation.shown(STORE)} is damaged (the file states of rows {_shown(unknown)} "
                                 f"fail their checksums; their descriptors are intact, their images are described "
                                 f"again when listed)")
    previous.states = store.file_states(tolerate_damage=bool(unknown))


def _intact(count: int, damaged: List[Tuple[int, int]]) -> np.ndarray:
    rows = np.ones(count, bool)
    for first, last in damaged:
        rows[first:last] = False
    return rows


def _shown(ranges: List[Tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b - 1}" for a, b in ranges[:5]) + (" …" if len(ranges) > 5 else "")


def _check_consistency(previous: Previous) -> None:
    meta, generation = previous.meta, previous.generation
    if previous.store is None:
        return
    if disagreements(meta, previous.attrs, previous.store.count):
        previous.problems.append(f"{generation.shown(META)} and {generation.shown(STORE)} come from different runs "
                                 f"(an interrupted write of an older simret?)")
        previous.meta = None


def _check_derived(previous: Previous, generation: Generation) -> None:
    """Checksums of index.faiss, whitening.npz and skipped.tsv (each that the generation has)."""
    meta = previous.meta
    previous.index_ok = _verified(previous, generation, "index", INDEX_FILE) \
        if meta["index"].get("kind") != STORE_ONLY else True
    previous.whitening_ok = _verified(previous, generation, "whitening", WHITENING_FILE) \
        if meta["whitening"].get("kind") == "pca" else True
    if _verified(previous, generation, "skipped", SKIPPED):
        previous.skipped = read_skipped(generation.file(SKIPPED))


def _verified(previous: Previous, generation: Generation, key: str, name: str) -> bool:
    path = generation.file(name)
    if not path.is_file():
        previous.problems.append(f"{generation.shown(name)} is missing")
        return False
    try:
        verify_checksum(path, file_record(previous.meta, key).get("checksum"), shown_as=generation.shown(name))
    except ChecksumError as err:
        previous.problems.append(str(err))
        return False
    return True
