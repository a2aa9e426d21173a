"""``IndexDir``: a committed generation of an index directory, opened for searching.

A reader never takes the writer lock. It resolves the current generation once, reads that generation's
meta.json and opens its files, keeping them open: a writer that commits a newer generation meanwhile (and
removes this one) changes nothing for it. If the generation disappears between resolving and opening (a
commit in that instant), it resolves again. Every file is checked when read: the store's HDF5 checksums
(full reads), the SHA-256 recorded for index.faiss and whitening.npz, the generation ids tying them
together; damage is one error naming the file and the repair.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.retrieval.exact import exact_search
from simret.retrieval.index import DEFAULT_RERANK, Index
from simret.retrieval.indexdir.layout import Generation, current, current_generation, is_dangling
from simret.retrieval.indexdir.meta import (
    IndexDamagedError,
    disagreements,
    file_record,
    read_meta_file,
    repair_hint,
    store_repair_hint,
)
from simret.retrieval.indexdir.names import (
    CURRENT,
    GENERATIONS,
    INDEX_FILE,
    META,
    STORE,
    STORE_ONLY,
    WHITENING_FILE,
)
from simret.retrieval.store import RowAccess, StoreDamagedError, StoreError, StoreReader, check_fingerprint
from simret.retrieval.whitening import PCAWhitening, l2_normalize
from simret.utils.filestate import bytes_checksum, damaged, stream_checksum
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
OPEN_ATTEMPTS = 10  # a commit can slip in between resolving `current` and opening its files


class IndexDir:
    """A finished index directory: its meta, store ids, whitening and FAISS index (loaded lazily).

    >>> index_dir = IndexDir("idx/")
    >>> scores, rows = index_dir.search(raw_queries, k=10)     # raw: as extract() returns them
    >>> [index_dir.ids[r] for r in rows[0]]
    """

    def __init__(self, path: PathLike, *, mmap: Optional[bool] = None) -> None:
        """Open the committed generation of ``path``. ``mmap``: map the FAISS index from its file instead of
        reading it (True), read it (False), or decide by size (None: maps an index larger than half the
        memory available). A mapped index is not checked against its checksum (``simret check`` does that)."""
        self.path = Path(path).expanduser()
        self._mmap = mmap
        if not self.path.is_dir():
            raise FileNotFoundError(f"no index directory {self.path}")
        self._store: Optional[StoreReader] = None
        self._index_file: Optional[BinaryIO] = None
        self._index: Optional[Index] = None
        self._whitening: Optional[PCAWhitening] = None
        self._rows: Optional[RowAccess] = None
        for attempt in range(OPEN_ATTEMPTS):
            generation = current(self.path)
            if generation is None:
                raise FileNotFoundError(f"{self.path} holds no simret index ({META} missing; build one with "
                                        f"simret index)")
            try:
                self._open(generation)
                break
            except (FileNotFoundError, ValueError) as err:  # IndexDamagedError and StoreError are ValueErrors
                self.close()
                if generation.name and current_generation(self.path) != generation.name \
                        and attempt + 1 < OPEN_ATTEMPTS:
                    # a newer generation was committed meanwhile, and this one is being removed (its files go
                    # one by one): what looked missing or damaged is that removal; open the new one
                    time.sleep(0.01 * (attempt + 1))
                    continue
                if not isinstance(err, FileNotFoundError):
                    raise
                if is_dangling(generation):
                    raise IndexDamagedError(f"{self.path / CURRENT} names {GENERATIONS}/{generation.name}, which does "
                                            f"not exist", self.path) from None
                raise IndexDamagedError(f"{generation.shown(META)} is missing", self.path) from None

    def _open(self, generation: Generation) -> None:
        self.generation_dir = generation
        self.meta = read_meta_file(generation.file(META), generation.shown(META), self.path)
        self.searchable = self.meta["index"].get("kind") != STORE_ONLY
        needed = (STORE,) + ((INDEX_FILE,) if self.searchable else ())
        for name in needed + ((WHITENING_FILE,) if self.meta["whitening"].get("kind") == "pca" else ()):
            if not generation.file(name).is_file():
                raise IndexDamagedError(f"{generation.shown(name)} is missing", self.path,
                                        store_repair_hint(self.path) if name == STORE else None)
        try:
            self._store = StoreReader(generation.file(STORE))
        except StoreError as err:
            raise self._store_damaged(err) from None
        differ = disagreements(self.meta, self._store.attrs, self._store.count)
        if differ:
            raise ValueError(f"{self.path}: {STORE} and {META} come from different runs ({', '.join(differ)} "
                             f"differ): {repair_hint(self.path)}")
        if self.searchable:
            self._index_file = open(generation.file(INDEX_FILE), "rb")  # pinned: loaded lazily, maybe much later
        if self.meta["whitening"].get("kind") == "pca":
            self._whitening = self._load_whitening(generation)

    def _load_whitening(self, generation: Generation) -> PCAWhitening:
        with open(generation.file(WHITENING_FILE), "rb") as handle:
            data = handle.read()
        expected = file_record(self.meta, "whitening").get("checksum")
        if expected and bytes_checksum(data) != expected:
            raise IndexDamagedError(damaged(generation.shown(WHITENING_FILE)), self.path)
        try:
            return PCAWhitening.load(io.BytesIO(data), shown_as=generation.shown(WHITENING_FILE))
        except ValueError as err:
            raise IndexDamagedError(str(err), self.path) from None

    # ------------------------------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def root(self) -> Path:
        return Path(self.meta["root"])

    @property
    def count(self) -> int:
        """How many images the index holds."""
        return int(self.meta["count"])

    @property
    def generation(self) -> str:
        """The id of the generation this reader answers from (``simret serve`` reloads when it changes)."""
        return str(self.meta["generation"])

    # ------------------------------------------------------------------------------------------ content

    @property
    def index(self) -> Index:
        if self._index is None:
            if not self.searchable:
                raise ValueError(f"{self.path} keeps descriptors only (--index none, e.g. simret eval's cache): "
                                 f"build a searchable index with simret index --index flat|ivfpq|hnsw|auto")
            self._index = self._load_index()
        return self._index

    def _load_index(self) -> Index:
        shown = self.generation_dir.shown(INDEX_FILE)
        handle = self._index_file
        handle.seek(0)
        mmap = self._mmap if self._mmap is not None else should_map(os.fstat(handle.fileno()).st_size)
        expected = file_record(self.meta, "index").get("checksum")
        if expected and not mmap and stream_checksum(handle) != expected:
            raise IndexDamagedError(damaged(shown), self.path)
        pinned = f"/proc/self/fd/{handle.fileno()}"
        try:
            index = Index.load(pinned if os.path.exists(pinned) else self.generation_dir.file(INDEX_FILE), mmap=mmap)
        except ValueError as err:
            raise IndexDamagedError(f"{shown} is damaged ({err})", self.path) from None
        if index.ntotal != self.meta["count"]:
            raise IndexDamagedError(f"{shown} holds {index.ntotal} vectors but {META} says {self.meta['count']}",
                                    self.path)
        return index

    @property
    def ids(self) -> List[str]:
        try:
            return self._store.ids
        except StoreError as err:
            raise self._store_damaged(err) from None

    def _store_damaged(self, err: StoreError) -> IndexDamagedError:
        """A damaged store as one error naming the public file and its repair."""
        shown = self.generation_dir.shown(STORE)
        detail = str(err).replace(str(self.generation_dir.file(STORE)), "").strip(" :")
        for prefix in ("is damaged:", "is "):
            detail = detail[len(prefix):].strip() if detail.startswith(prefix) else detail
        return IndexDamagedError(f"{shown} is damaged ({detail})", self.path, store_repair_hint(self.path))

    @property
    def store(self) -> StoreReader:
        """The generation's descriptor store, open (it stays readable whatever writers do meanwhile)."""
        return self._store

    @property
    def whitening(self) -> Optional[PCAWhitening]:
        return self._whitening

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors ``(Q, D)`` (as extracted) → the index's space (whitened, L2-normalised)."""
        raw = np.atleast_2d(np.asarray(raw, dtype=np.float32))
        return self.whitening.apply(raw) if self.whitening is not None else l2_normalize(raw)

    def database_vectors(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Database descriptors in the index's space, exact (read from the store, checksums verified), all
        or ``rows``."""
        try:
            return self._database_vectors(rows)
        except StoreError as err:
            raise self._store_damaged(err) from None

    def _database_vectors(self, rows: Optional[Sequence[int]]) -> np.ndarray:
        if rows is not None:
            return self.prepare(self._store.rows(rows))
        out = None
        for start, block in self._store.blocks():
            prepared = self.prepare(block)
            if out is None:
                out = np.empty((self._store.count, prepared.shape[1]), np.float32)
            out[start:start + len(block)] = prepared
        return out if out is not None else np.zeros((0, self.meta["dim"]), np.float32)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the memory-mapped store in the index's space (what re-scores ivfpq candidates)."""
        if self._rows is None:
            self._rows = self._store.row_access()
        try:
            return self.prepare(np.asarray(self._rows[np.asarray(rows, dtype=np.int64)], dtype=np.float32))
        except StoreDamagedError as err:
            raise IndexDamagedError(str(err), self.path, repair=store_repair_hint(self.path)) from None

    def check_queries(self, fingerprint: Optional[str], what: str = "the queries") -> None:
        check_fingerprint(fingerprint, self.fingerprint, what=what, where=f"the index {self.path}")

    def search(self, raw_queries: Any, k: int = 10, *, qe: int = 0, alpha: float = 3.0,
               dba: int = 0, rerank: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Search raw query descriptors ``(Q, D)``; optional αQE (``qe`` neighbours) and αDBA (``dba``).

        An ivfpq index re-scores its top ``k·rerank`` candidates with the exact (memory-mapped) stored
        descriptors (``rerank=0``: compressed scores only; None: ``self.rerank``, the depth its build
        measured). A directory without an index (``--index none``) is searched exactly, reading the store block by
        block (it never needs to fit in memory).

        Returns ``(scores (Q, k'), rows (Q, k'))``; ``rows`` index ``self.ids``.
        """
        from simret.retrieval.rerank import alpha_qe

        queries = self.prepare(raw_queries)
        if dba:
            log.info("database-side augmentation over %d descriptors (n=%d, alpha=%g)", self.meta["count"], dba, alpha)
            augmented = self._augmented(dba, alpha)
            nearest = augmented.search
            vectors = augmented.reconstruct
        else:
            nearest = self._nearest(rerank)
            vectors = self.exact_vectors
        scores, rows = nearest(queries, max(k, qe))
        if qe:
            top = rows[:, :qe]
            valid = top >= 0
            unique, inverse = np.unique(np.where(valid, top, 0), return_inverse=True)
            local = np.where(valid, inverse.reshape(top.shape), -1)
            queries = alpha_qe(queries, vectors(unique), local, min(qe, top.shape[1]), alpha, layout="I")
            scores, rows = nearest(queries, k)
        return scores[:, :k], rows[:, :k]

    @property
    def rerank(self) -> int:
        """Candidates per result an ivfpq index re-scores by default: the shallowest depth its build measured to
        reach recall@10 >= 0.95 (``meta.json``), else ``DEFAULT_RERANK``."""
        return int(self.meta.get("index", {}).get("rerank", DEFAULT_RERANK))

    def _nearest(self, rerank: Optional[int] = None) -> Callable[[np.ndarray, int], Tuple[np.ndarray, np.ndarray]]:
        """``(prepared queries, k) → (scores, rows)``: the FAISS index (ivfpq candidates re-scored exactly), or
        an exact scan of the store where there is no index."""
        rerank = self.rerank if rerank is None else rerank
        if not self.searchable:
            return lambda queries, k: exact_search(self._store.blocks(), queries, k, prepare=self.prepare)
        exact = self.exact_vectors if rerank else None
        return lambda queries, k: self.index.search(queries, k, exact=exact, rerank=rerank)

    def _augmented(self, n: int, alpha: float) -> Index:
        """A flat index of the αDBA-augmented database, built block by block (memory: that index and a block)."""
        from simret.retrieval.rerank import dba_block

        n = min(n, self.meta["count"] - 1)
        nearest = self._nearest()
        augmented: Optional[Index] = None
        for first, block in self._store.blocks():
            prepared = self.prepare(block)
            _, neighbours = nearest(prepared, n + 1)
            rows = np.arange(first, first + len(block))
            vectors = dba_block(prepared, rows, neighbours, self.exact_vectors, n, alpha)
            augmented = augmented or Index.create(vectors.shape[1], "flat")
            augmented.add(vectors)
        return augmented

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the files (the reader cannot load anything more afterwards)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._index_file is not None:
            self._index_file.close()
            self._index_file = None

    def __enter__(self) -> IndexDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def should_map(index_bytes: int) -> bool:
    """Whether an index of this size is better mapped than read: larger than half the available memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return index_bytes > int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return False
