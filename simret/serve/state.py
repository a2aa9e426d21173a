"""The index generation a server answers from, loaded whole, and the poller that swaps in newer ones.

A ``LoadedIndex`` is immutable once built: everything a query needs (FAISS index, ids, whitening, the
memory-mapped store) is loaded eagerly, so files replaced on disk later never change it. ``IndexHolder``
keeps the current one; a reload builds a new ``LoadedIndex`` and swaps the reference in one assignment,
so a query that took the old one finishes on it. A reload that fails keeps the old one and logs why.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]


def current_generation(path: PathLike) -> Optional[str]:
    """The generation committed now (None when there is none): one ``readlink``, a cheap poll."""
    from simret.retrieval.indexdir import current_generation as committed

    return committed(path)


@dataclass
class LoadedIndex:
    """One generation of an index directory, ready to answer queries from several threads."""

    index_dir: Any  # simret.retrieval.indexdir.IndexDir, fully loaded
    generation: str
    ids: List[str]
    row_of: Dict[str, int]
    root: Path
    raw: Any  # RowAccess over the (N, D) stored raw descriptors (memory-mapped), for "more like this"
    rerank: Optional[int]  # None: the index's own depth (meta.json)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def meta(self) -> Dict[str, Any]:
        return self.index_dir.meta

    @property
    def count(self) -> int:
        return len(self.ids)

    def stored_descriptor(self, image_id: str) -> Optional[np.ndarray]:
        """The raw stored descriptor ``(1, D)`` float32 of an indexed id, or None for an unknown id."""
        row = self.row_of.get(image_id)
        return None if row is None else np.asarray(self.raw[[row]], dtype=np.float32)

    def search(self, raw: np.ndarray, k: int, *, qe: int = 0, alpha: float = 3.0) -> Tuple[List[str], List[float]]:
        """Raw query descriptor ``(1, D)`` → top-``k`` ``(ids, scores)``, as ``simret search`` ranks them.

        FAISS searches of one generation are serialised (an index keeps search settings such as
        ``efSearch`` on itself); they take milliseconds.
        """
        with self.lock:
            scores, rows = self.index_dir.search(raw, k, qe=qe, alpha=alpha, rerank=self.rerank)
        keep = [(self.ids[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]
        return [i for i, _ in keep], [s for _, s in keep]


def load_index(path: PathLike, fingerprint: str, *, rerank: Optional[int]) -> LoadedIndex:
    """Load the generation ``path`` holds now, eagerly, for queries described by an encoder of ``fingerprint``.

    Raises:
        ValueError, FileNotFoundError, OSError: no usable index, another encoder, a store-only index, or
            the directory changed while it was read (try again later).
    """
    from simret.retrieval.indexdir import IndexDir

    index_dir = IndexDir(path)  # one generation, its files held open: later commits change nothing for it
    index_dir.check_queries(fingerprint, what="queries of the server's encoder")
    generation = index_dir.generation
    if index_dir.searchable:
        index_dir.index  # noqa: B018 - load the FAISS index now (store-only directories are scanned exactly)
    ids = list(index_dir.ids)
    raw = index_dir.store.row_access()
    if len(ids):
        index_dir.exact_vectors(np.zeros(1, np.int64))  # opens the memory map ivfpq re-scoring reads
    if len(ids) != index_dir.meta["count"] or raw.shape[0] != len(ids):
        raise ValueError(f"{index_dir.path}: {len(ids)} ids, {raw.shape[0]} descriptors, meta.json says "
                         f"{index_dir.meta['count']}; run simret index again")
    return LoadedIndex(index_dir, generation, ids, {image_id: row for row, image_id in enumerate(ids)},
                       index_dir.root, raw, rerank)


class IndexHolder:
    """The current ``LoadedIndex`` and the reloads that replace it.

    ``current`` is read without a lock (one reference); ``reload()`` loads the generation on disk when it
    differs from the current one and swaps it in; a failure keeps the current one and is logged once per
    failing generation and reason.
    """

    def __init__(self, path: PathLike, loader: Callable[[], LoadedIndex]) -> None:
        self.path = Path(path)
        self._loader = loader
        self.current: LoadedIndex = loader()
        self._reload_lock = threading.Lock()
        self._last_failure: Optional[Tuple[Optional[str], str]] = None
        self.reloads = 0
        self.failed_reloads = 0

    def reload(self, force: bool = False) -> bool:
        """Swap in the generation on disk if it is new (or ``force``); True when a new one was swapped in."""
        with self._reload_lock:
            try:
                generation = current_generation(self.path)
            except (ValueError, OSError) as err:
                self._failed(None, str(err))
                return False
            if generation is None:
                self._failed(None, f"{self.path} holds no index now (meta.json missing)")
                return False
            if generation == self.current.generation and not force:
                return False
            try:
                loaded = self._loader()
            except Exception as err:  # noqa: BLE001 - any failure keeps the old generation serving
                self._failed(generation, f"{type(err).__name__}: {err}" if not isinstance(err, (ValueError, OSError))
                             else str(err))
                return False
            previous, self.current = self.current, loaded
            self._last_failure = None
            self.reloads += 1
            log.info("serving generation %s of %s (%d images; was %s, %d images)", loaded.generation, self.path,
                     loaded.count, previous.generation, previous.count)
            return True

    def _failed(self, generation: Optional[str], reason: str) -> None:
        self.failed_reloads += 1
        if self._last_failure != (generation, reason):
            log.warning("reload of %s failed, still serving generation %s: %s", self.path, self.current.generation,
                        reason)
        self._last_failure = (generation, reason)


class Poller:
    """A daemon thread that calls ``holder.reload()`` every ``interval`` seconds, or at once on ``wake()``
    (SIGHUP)."""

    def __init__(self, holder: IndexHolder, interval: float) -> None:
        self.holder = holder
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="simret-serve-reload", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval if self.interval > 0 else None)
            self._wake.clear()
            if not self._stop.is_set():
                self.holder.reload()
