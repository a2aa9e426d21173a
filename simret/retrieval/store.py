"""The HDF5 descriptor store ``descriptors.h5``: descriptors, their ids, the files they came from.

Schema (readable with plain h5py, no simret needed)::

    descriptors   (N, D) float32 or float16   one L2-normalised descriptor per row (not whitened)
    ids           (N,)   utf-8 strings        image paths relative to the indexed root (POSIX style); attribute
                                              sha256: of the ids, each followed by a newline
    sizes         (N,)   int64                the image file's size in bytes when it was described (-1: unknown)
    mtimes        (N,)   int64                its modification time in nanoseconds then (-1: unknown)
    digests       (N,)   64-char ASCII        SHA-256 of its bytes (with --verify-content; "" otherwise)
    attrs         fingerprint, arch, pool, gamma, weights, dim, scales, max_size, simret_version, created,
                  store_format (+ anything passed as ``extra``: root, generation …)

``h5py.File(path)["ids"].asstr()[()]`` gives the ids as Python strings. Every dataset is chunked (about
256 KiB per chunk, whole rows) and carries HDF5's fletcher32 checksum filter, so a damaged byte is detected
when its chunk is read (``StoreDamagedError`` naming the rows), and resizable, so a store is written block
by block (``StoreWriter``) without holding all descriptors in memory. Files are written in the HDF5 1.10
file format, whose metadata (superblock, object headers, chunk indexes) carries checksums too (HDF5 1.10 or
newer reads them: any h5py since 2.8). Stores written by simret before format 2 (contiguous, no checksums, no
file states) are still read.

``open_descriptors`` maps rows straight from the file for fast random access (exact re-scoring of search
candidates); it skips the checksum check, which full reads (``StoreReader.blocks``, ``read_store``) and
``simret check`` do.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from simret.utils import h5checked
from simret.utils.atomic import atomic_path
from simret.utils.filestate import FileStates
from simret.utils.h5attrs import read_attrs_of, write_attrs
from simret.utils.h5checked import FILE_STATE_SETS, H5_READ_ERRORS, IDS_DIGEST, IdsDigest, ids_digest

PathLike = Union[str, os.PathLike]
REQUIRED_ATTRS = ("fingerprint", "arch", "pool", "gamma", "scales", "dim", "simret_version", "created")
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
STORE_FORMAT = 2  # 2: chunked + fletcher32 + file states (1: contiguous, no checksums)
BLOCK_BYTES = 16 << 20  # bytes of descriptors per block read or written at once (x2-4 in float32 copies)
# HDF5 1.10 file format: checksums on the metadata too (superblock, object headers, chunk indexes), so damaged
# metadata is an error when read instead of a crash, a hang or rows read wrongly (the 1.8 format has none)
LIBVER = ("v110", "v110")


class StoreError(ValueError):
    """A descriptor file that cannot be used (missing datasets, wrong shapes, no fingerprint …)."""


class StoreDamagedError(StoreError):
    """A store whose bytes no longer match their HDF5 checksums (``rows``: the damaged row ranges)."""

    def __init__(self, message: str, rows: Sequence[Tuple[int, int]] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


@dataclass
class DescriptorStore:
    """A store's content in memory.

    Attributes:
        descriptors: ``(N, D)`` float32 array (float16 files are widened on read).
        ids: ``N`` ids, row ``i`` of ``descriptors`` belongs to ``ids[i]``.
        attrs: the file attributes (``fingerprint``, ``arch``, ``scales`` …) as plain Python values.
    """

    descriptors: np.ndarray
    ids: List[str]
    attrs: Dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> Optional[str]:
        return self.attrs.get("fingerprint")

    def __len__(self) -> int:
        return len(self.ids)


def store_attrs(provenance: Mapping[str, Any], *, scales: Sequence[float], max_size: Optional[int] = None,
                extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The attributes of a store written from an encoder's ``provenance()`` and the extraction settings."""
    attrs = dict(provenance)
    attrs["scales"] = [float(s) for s in scales]
    attrs["max_size"] = 0 if max_size is None else int(max_size)  # 0: images kept at their own size
    attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    attrs.update(extra or {})
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise StoreError(f"store attributes lack {', '.join(missing)} (pass encoder.provenance())")
    return attrs


def store_dtype(precision: str) -> str:
    """How descriptors computed at ``precision`` are stored: float32 from fp32, float16 from bf16/fp16 (their
    own rounding is coarser than float16's, so nothing more is lost, and the store is half the size)."""
    return "float32" if precision == "fp32" else "float16"


def chunk_rows(dim: int, dtype: Any = np.float32) -> int:
    """Rows per HDF5 chunk for ``dim``-wide rows of ``dtype`` (``simret.utils.h5checked.chunk_rows``)."""
    return min(65536, h5checked.chunk_rows(dim * np.dtype(dtype).itemsize))


def block_rows(dim: int, dtype: Any = np.float32) -> int:
    """Rows per block for streaming reads and writes (about ``BLOCK_BYTES``, whole chunks)."""
    per_chunk = chunk_rows(dim, dtype)
    return per_chunk * max(1, BLOCK_BYTES // (per_chunk * max(1, dim * np.dtype(dtype).itemsize)))


def _check_rows(descriptors: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise StoreError(f"descriptors must be (N, D), got shape {descriptors.shape}")
    if len(ids) != descriptors.shape[0]:
        raise StoreError(f"{len(ids)} ids for {descriptors.shape[0]} descriptors")
    return descriptors


# ------------------------------------------------------------------------------------------- writing


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes a store through: the first failed write (disk full, I/O error) is kept and every
    later write is dropped, so HDF5 never sees an error. (An HDF5 file whose flush failed stays half-open
    inside the library, which prints errors while Python collects it and crashes the interpreter when it
    exits.) ``StoreWriter.close`` raises the kept error once HDF5 has let go of the file."""

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__()
        self._file = open(path, mode)
        self.error: Optional[OSError] = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer)

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as err:
                self.error = err
        return len(memoryview(data))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: Optional[int] = None) -> int:
        if self.error is None:
            try:
                return self._file.truncate(size)
            except OSError as err:
                self.error = err
        return self.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None and not self._file.closed:
            try:
                self._file.flush()
            except OSError as err:
                self.error = err

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            try:
                self._file.close()
            except OSError as err:
                self.error = self.error or err
        super().close()


def _open_for_writing(path: Path, mode: str) -> Tuple[Any, _GuardedFile]:
    """``(h5py.File, its guarded file)`` for writing ``path`` (``mode`` "w" or "r+")."""
    import h5py

    guarded = _GuardedFile(path, "w+b" if mode == "w" else "r+b")
    try:
        return h5py.File(guarded, mode, libver=LIBVER), guarded
    except BaseException:
        guarded.close()
        raise


class StoreWriter:
    """Write a store block by block: ``append(rows, ids, states)`` as often as needed, then ``close()``.

    The file at ``path`` is written in place (wrap it in ``atomic_path`` or a new index generation so an
    interrupted write is never seen). Memory use is the block passed in, whatever the store's size.
    A write that fails (disk full …) raises ``OSError`` naming ``path``, at the latest from ``close()``.
    """

    def __init__(self, path: PathLike, dim: int, attrs: Mapping[str, Any], *, dtype: str = "float32") -> None:
        import h5py

        if dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype must be float32 or float16, not {dtype!r}")
        if "dim" in attrs and int(attrs["dim"]) != int(dim):
            raise StoreError(f"attribute dim={attrs['dim']} but descriptors have {dim} columns")
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = STORE_DTYPES[dtype]
        self.count = 0
        self._ids_digest = IdsDigest()
        rows = chunk_rows(self.dim, self.dtype)
        self._handle, self._file = _open_for_writing(self.path, "w")
        try:
            h5checked.checked_dataset(self._handle, "descriptors", shape=(0, self.dim), dtype=self.dtype,
                                      rows_per_chunk=rows, resizable=True)
            id_rows = max(1, min(rows * 4, 4096))
            # variable-length strings cannot take HDF5 filters: their checksum is an attribute (IDS_DIGEST)
            self._handle.create_dataset("ids", shape=(0,), maxshape=(None,), chunks=(id_rows,),
                                        dtype=h5py.string_dtype("utf-8"))
            h5checked.create_file_state_sets(self._handle, 0, rows_per_chunk=id_rows, resizable=True)
            write_attrs(self._handle, {**attrs, "store_format": STORE_FORMAT})
        except BaseException:
            self._release()
            raise

    def append(self, descriptors: np.ndarray, ids: Sequence[str], states: Optional[FileStates] = None) -> None:
        """Add ``descriptors (n, D)`` for ``ids`` (and the ``states`` of their files, if known)."""
        descriptors = _check_rows(descriptors, ids)
        if descriptors.shape[0] and descriptors.shape[1] != self.dim:
            raise StoreError(f"cannot write {descriptors.shape[1]}-d descriptors into the {self.dim}-d store "
                             f"{self.path}")
        n = descriptors.shape[0]
        if n == 0:
            return
        states = states if states is not None else FileStates.unknown(n)
        if len(states) != n:
            raise StoreError(f"{len(states)} file states for {n} descriptors")
        start, stop = self.count, self.count + n
        for name in ("descriptors", "ids", *FILE_STATE_SETS):
            self._handle[name].resize(stop, axis=0)
        self._handle["descriptors"][start:stop] = descriptors.astype(self.dtype, copy=False)
        ids = [str(i) for i in ids]
        self._handle["ids"][start:stop] = np.asarray(ids, dtype=object)
        self._ids_digest.update(ids)
        h5checked.write_file_states(self._handle, states, start)
        self.count = stop

    @classmethod
    def reopen(cls, path: PathLike) -> StoreWriter:
        """Continue writing a complete format-2 store (e.g. a copy of the previous generation's) in place.

        Raises:
            StoreError: the file is not a resizable format-2 store.
        """

        writer = cls.__new__(cls)
        writer.path = Path(path)
        writer._handle, writer._file = _open_for_writing(writer.path, "r+")
        try:
            table = writer._handle["descriptors"]
            names = ("ids", *FILE_STATE_SETS)
            if table.maxshape[0] is not None or any(n not in writer._handle for n in names) \
                    or any(writer._handle[n].maxshape[0] is not None for n in names):
                raise StoreError(f"{path} is not a resizable simret store (format {STORE_FORMAT})")
            writer.dim, writer.dtype, writer.count = int(table.shape[1]), table.dtype.type, int(table.shape[0])
            writer._ids_digest = IdsDigest()
            writer._ids_digest.update(writer._handle["ids"].asstr()[()])
        except BaseException:
            writer._release()
            raise
        return writer

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        write_attrs(self._handle, attrs)

    def close(self) -> None:
        """Finish the file. Raises ``OSError`` naming the path if any write failed (the file is then unusable)."""
        if self._handle is not None:
            try:
                self._handle["ids"].attrs[IDS_DIGEST] = self._ids_digest.hexdigest()
            finally:
                self._release()
        error, self._file.error = self._file.error, None
        if error is not None:
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from None

    def _release(self) -> None:
        """Close the HDF5 file and the file under it (errors are kept for ``close``)."""
        try:
            if self._handle is not None:
                self._handle.close()
        finally:
            self._handle = None
            self._file.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # already failing: the first error is the one to report
            self.close()


def write_store(path: PathLike, descriptors: np.ndarray, ids: Sequence[str], attrs: Mapping[str, Any], *,
                dtype: str = "float32", states: Optional[FileStates] = None) -> Path:
    """Write a complete store atomically (replacing any file at ``path``).

    Args:
        descriptors: ``(N, D)`` array; stored as ``dtype`` (``float32`` or ``float16``).
        ids: ``N`` strings.
        attrs: file attributes, normally from ``store_attrs(encoder.provenance(), scales=...)``.
        states: the image files' sizes, modification times and digests (unknown when not given).
    """
    descriptors = _check_rows(descriptors, ids)
    with atomic_path(path, suffix=".h5") as temporary:
        with StoreWriter(temporary, descriptors.shape[1], attrs, dtype=dtype) as writer:
            writer.append(descriptors, ids, states)
    return Path(path)


def append_store(path: PathLike, descriptors: np.ndarray, ids: Sequence[str], *,
                 expect_fingerprint: Optional[str] = None, block: Optional[int] = None) -> Path:
    """Add rows to an existing store, atomically: a new file with the old rows (copied block by block) and
    the new ones is written next to it and renamed into place.

    Raises:
        StoreError: the store was computed by another encoder (``expect_fingerprint``) or has another width.
    """
    descriptors = _check_rows(descriptors, ids)
    with StoreReader(path) as source:
        if expect_fingerprint is not None and source.attrs.get("fingerprint") != expect_fingerprint:
            raise StoreError(f"{path} holds descriptors of encoder {source.attrs.get('fingerprint')}, "
                             f"not {expect_fingerprint}: they cannot be mixed")
        if descriptors.shape[1] != source.dim:
            raise StoreError(f"cannot append {descriptors.shape[1]}-d descriptors to the {source.dim}-d store {path}")
        dtype = "float16" if source.dtype == np.float16 else "float32"
        with atomic_path(path, suffix=".h5") as temporary:
            with StoreWriter(temporary, source.dim, source.attrs, dtype=dtype) as writer:
                for start, rows in source.blocks(block):
                    writer.append(rows, source.ids[start:start + len(rows)],
                                  source.file_states().take(range(start, start + len(rows))))
                writer.append(descriptors, ids)
    return Path(path)


# ------------------------------------------------------------------------------------------- reading


class StoreReader:
    """An open store: attributes, ids and file states on demand, descriptors in verified blocks or by rows.

    Keeps the file open until ``close()`` (a ``with`` block), so a reader keeps working even when a writer
    replaces the file by a newer generation meanwhile.
    """

    def __init__(self, path: PathLike) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no descriptor file {self.path}")
        try:
            self._handle = h5py.File(self.path, "r")
        except OSError as err:
            raise StoreError(f"{self.path} is not a readable HDF5 file ({_first_line(err)})") from None
        self._ids: Optional[List[str]] = None
        self._states: Optional[FileStates] = None
        try:
            self.attrs = read_attrs_of(self._handle)
            for name in ("descriptors", "ids"):
                if name not in self._handle:
                    raise StoreError(f"{self.path} has no {name!r} dataset (datasets: "
                                     f"{', '.join(_text(n) for n in self._handle)})")
            self._table = self._handle["descriptors"]
            if self._table.ndim != 2 or self._handle["ids"].shape != (self._table.shape[0],):
                raise StoreError(f"{self.path}: descriptors {self._table.shape} and ids "
                                 f"{self._handle['ids'].shape} do not match")
            self._has_states = all(name in self._handle for name in FILE_STATE_SETS)
            self._check_shapes()
        except H5_READ_ERRORS as err:
            self._handle.close()
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"{self.path} is damaged: its HDF5 structure cannot be read "
                             f"({_first_line(err)})") from None
        except BaseException:
            self._handle.close()
            raise

    def _check_shapes(self) -> None:
        """Every file-state dataset has one entry per row (a damaged dataspace can claim billions of rows,
        which reading chunk by chunk would take forever to find out)."""
        rows = self.count
        wrong = [name for name in FILE_STATE_SETS if self._has_states and self._handle[name].shape != (rows,)]
        if wrong:
            raise StoreError(f"{self.path} is damaged: the shapes of {', '.join(wrong)} do not match its {rows} rows")

    # shape and content

    @property
    def count(self) -> int:
        return int(self._table.shape[0])

    def __len__(self) -> int:
        return self.count

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self._table.dtype

    @property
    def fingerprint(self) -> Optional[str]:
        return self.attrs.get("fingerprint")

    @property
    def ids(self) -> List[str]:
        if self._ids is None:
            names = self._guarded(lambda: self._handle["ids"].asstr()[()], "ids", (0, self.count))
            self._ids = [str(v) for v in names]
            expected = self._guarded(lambda: self._handle["ids"].attrs.get(IDS_DIGEST), "ids", (0, self.count))
            expected = expected.decode("utf-8", "replace") if isinstance(expected, bytes) else expected
            if expected and ids_digest(self._ids) != expected:
                raise StoreDamagedError(f"{self.path} is damaged: its ids no longer match their checksum",
                                        [(0, self.count)])
        return self._ids

    def id_blocks(self, rows_per_block: int = 65536) -> Iterator[Tuple[int, List[str]]]:
        """``(first row, ids)`` over every row, read block by block (never all ids at once); the ids' checksum
        is verified once the last block is read.

        Raises:
            StoreDamagedError: an id cannot be read, or the ids do not match their checksum.
        """
        if self._ids is not None:
            for first in range(0, self.count, rows_per_block):
                yield first, self._ids[first:first + rows_per_block]
            return
        digest = IdsDigest()
        for first in range(0, self.count, rows_per_block):
            last = min(self.count, first + rows_per_block)
            names = self._guarded(lambda a=first, b=last: self._handle["ids"].asstr()[a:b], "ids", (first, last))
            block = [str(v) for v in names]
            digest.update(block)
            yield first, block
        expected = self._guarded(lambda: self._handle["ids"].attrs.get(IDS_DIGEST), "ids", (0, self.count))
        expected = expected.decode("utf-8", "replace") if isinstance(expected, bytes) else expected
        if expected and digest.hexdigest() != expected:
            raise StoreDamagedError(f"{self.path} is damaged: its ids no longer match their checksum",
                                    [(0, self.count)])

    def ids_of(self, indices: Sequence[int]) -> List[str]:
        """The ids of rows ``indices`` (in that order), reading only those."""
        order = np.asarray(indices, dtype=np.int64).ravel()
        if self._ids is not None or order.size == 0:
            return [self.ids[i] for i in order.tolist()]
        unique, inverse = np.unique(order, return_inverse=True)
        names = self._guarded(lambda: self._handle["ids"].asstr()[unique.tolist()], "ids",
                              (int(unique[0]), int(unique[-1]) + 1))
        return [str(names[i]) for i in inverse.tolist()]

    @property
    def has_file_states(self) -> bool:
        return self._has_states

    def file_states(self, *, tolerate_damage: bool = False) -> FileStates:
        """The image files' states recorded with the rows (``FileStates.unknown`` for older stores);
        ``tolerate_damage``: rows whose state chunks fail their checksums get unknown states instead of an error.

        Raises:
            StoreDamagedError: a state chunk fails its checksum (unless ``tolerate_damage``).
        """
        if not self.has_file_states:
            return FileStates.unknown(self.count)
        if tolerate_damage:
            damaged = self.damaged_rows(FILE_STATE_SETS)
            if damaged:
                return self._states_around(damaged)
        if self._states is None:
            span = (0, self.count)
            sizes = self._guarded(lambda: self._handle["sizes"][()], "sizes", span)
            mtimes = self._guarded(lambda: self._handle["mtimes"][()], "mtimes", span)
            digests = self._guarded(lambda: self._handle["digests"][()], "digests", span)
            self._states = FileStates(np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64),
                                      [d.decode("ascii", "replace") for d in digests.tolist()])
        return self._states

    def file_states_of(self, start: int, stop: int) -> FileStates:
        """The recorded states of rows ``start:stop`` only (``FileStates.unknown`` for older stores).

        Raises:
            StoreDamagedError: a state chunk fails its checksum.
        """
        if not self.has_file_states:
            return FileStates.unknown(max(0, stop - start))
        if self._states is not None:
            return self._states.take(np.arange(start, stop))
        span = (start, stop)
        sizes = self._guarded(lambda: self._handle["sizes"][start:stop], "sizes", span)
        mtimes = self._guarded(lambda: self._handle["mtimes"][start:stop], "mtimes", span)
        digests = self._guarded(lambda: self._handle["digests"][start:stop], "digests", span)
        return FileStates(np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64),
                          [d.decode("ascii", "replace") for d in digests.tolist()])

    def _states_around(self, damaged: List[Tuple[int, int]]) -> FileStates:
        """The recorded states, unknown for the ``damaged`` row ranges (read around them)."""
        states = FileStates.unknown(self.count)
        rows = np.ones(self.count, bool)
        for first, last in damaged:
            rows[first:last] = False
        for first, last in _true_runs(rows):
            states.sizes[first:last] = self._handle["sizes"][first:last]
            states.mtimes[first:last] = self._handle["mtimes"][first:last]
            states.digests[first:last] = [d.decode("ascii", "replace") for d in self._handle["digests"][first:last]]
        return states

    def blocks(self, rows_per_block: Optional[int] = None, start: int = 0,
               stop: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row, float32 block)`` over rows ``start:stop``, checksums verified.

        Raises:
            StoreDamagedError: a block's bytes do not match their checksums (naming the rows).
        """
        step = rows_per_block or block_rows(self.dim, self.dtype)
        stop = self.count if stop is None else min(stop, self.count)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            block = self._guarded(lambda a=first, b=last: self._table[a:b], "descriptors", (first, last))
            yield first, np.asarray(block, dtype=np.float32)

    def sampled_rows(self, sorted_rows: np.ndarray) -> np.ndarray:
        """``(R, D)`` float32 rows of ``sorted_rows`` (sorted, distinct), gathered in one streamed pass over the
        store (``blocks``): many rows scattered over a large store cost one sequential read and a bounded
        working set, rather than a memory map that ends up resident in full. Checksums verified."""
        picked = np.asarray(sorted_rows, dtype=np.int64).ravel()
        out = np.empty((picked.size, self.dim), np.float32)
        if not picked.size:
            return out
        stop = int(picked[-1]) + 1
        for first, block in self.blocks(start=int(picked[0]), stop=stop):
            lo, hi = np.searchsorted(picked, [first, first + len(block)])
            out[lo:hi] = block[picked[lo:hi] - first]
        return out

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices), D)`` float32 rows in the order given (repeats allowed), checksums verified."""
        order = np.asarray(indices, dtype=np.int64).ravel()
        if order.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if order.min() < 0 or order.max() >= self.count:
            raise StoreError(f"row index out of range for {self.path} ({self.count} rows)")
        unique, inverse = np.unique(order, return_inverse=True)
        picked = np.empty((unique.size, self.dim), np.float32)
        for begin, end in _runs(unique, 1):  # consecutive rows are read as one slice
            first, last = int(unique[begin]), int(unique[end - 1]) + 1
            picked[begin:end] = self._guarded(lambda a=first, b=last: self._table[a:b], "descriptors", (first, last))
        return picked[inverse]

    def row_access(self, *, mapped: bool = True) -> RowAccess:
        """Fast random access to rows straight from the file (each chunk checked once); see ``RowAccess``."""
        return RowAccess(self.path, mapped=mapped)

    def damaged_rows(self, datasets: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
        """Read ``datasets`` (default: all of them — ids, descriptors, file states) chunk by chunk; the
        ``(start, stop)`` row ranges whose checksums fail."""
        names = ("ids", "descriptors", *FILE_STATE_SETS) if datasets is None else tuple(datasets)
        damaged: List[Tuple[int, int]] = []
        if "ids" in names:
            try:
                _ = self.ids  # reading them checks their checksum
            except StoreDamagedError as err:
                damaged.extend(err.rows)
        for name in [n for n in names if n != "ids" and n in self._handle]:
            damaged.extend(h5checked.damaged_ranges(self._handle[name]))
        return h5checked.merge_ranges(damaged)

    # housekeeping

    def _guarded(self, read, name: str, span: Tuple[int, int]):
        try:
            return read()
        except H5_READ_ERRORS as err:  # a damaged chunk, damaged bytes of an id, damaged HDF5 metadata
            spans = [span]
            if name != "ids":  # rows in checksummed chunks: name the damaged chunks, not the whole read
                spans = self._damaged_within(name, span) or spans
            more = f" and {len(spans) - 1} more range(s)" if len(spans) > 1 else ""
            raise StoreDamagedError(f"{self.path} is damaged: dataset {name!r} fails its checksum or cannot be read "
                                    f"(rows {spans[0][0]}-{spans[0][1] - 1}{more}: {_first_line(err)})",
                                    spans) from None

    def _damaged_within(self, name: str, span: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The row ranges of the damaged chunks that ``span`` of dataset ``name`` touches (whole chunks: the
        search starts at a chunk boundary); empty if it cannot tell."""
        try:
            dataset = self._handle[name]
            step = dataset.chunks[0] if dataset.chunks else 1
            stop = min(dataset.shape[0], -(-span[1] // step) * step)
            return h5checked.damaged_ranges(dataset, span[0] - span[0] % step, stop)
        except Exception:  # noqa: BLE001 - the structure itself is damaged: the whole read is named
            return []

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RowAccess:
    """Rows of a store's ``descriptors`` gathered straight from the file, ``rows (R,) → (R, D)`` in the
    stored dtype: a memory map of the file (contiguous stores, or chunked ones without compression, whose
    chunks are located once), else h5py reads. Each chunk is checked against its HDF5 checksum the first
    time one of its rows is gathered (``StoreDamagedError`` naming its rows); later gathers are plain reads.

    ``mapped=False`` reads the rows with ``pread`` instead of a memory map: nothing of the file becomes
    resident in this process (the pages a map touches count in its RSS until it is unmapped), at one system
    call per run of consecutive rows. For a build that gathers many scattered rows once (recall measurement).

    Holds the file open, so it survives the file being replaced or removed meanwhile.
    """

    def __init__(self, path: PathLike, *, mapped: bool = True) -> None:
        import h5py

        self.path = Path(path)
        self._handle = h5py.File(self.path, "r")
        table = self._handle["descriptors"]
        self.shape: Tuple[int, int] = (int(table.shape[0]), int(table.shape[1]))
        self.dtype = np.dtype(table.dtype)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._table = None
        self._chunk_offsets: Optional[np.ndarray] = None
        self._map: Optional[np.memmap] = None
        self._offset: Optional[int] = None
        filters = table.compression is not None or table.scaleoffset is not None or table.shuffle
        if table.chunks is None and self.shape[0]:
            self._offset = table.id.get_offset()
        elif table.chunks is not None and not filters and table.chunks[1] == self.shape[1] and self.shape[0]:
            self._chunk_rows = int(table.chunks[0])
            self._chunk_offsets = _chunk_offsets(table, self._chunk_rows)
            self._verified = np.zeros(len(self._chunk_offsets), bool) if table.fletcher32 else None
            self._checked = table
        if self._offset is None and self._chunk_offsets is None:
            self._table = table  # compressed or unusual layouts (or no rows): h5py reads
            return
        self._file = open(self.path, "rb")
        self._rows_at = None
        if mapped:
            self._map = np.memmap(self._file, dtype=np.uint8, mode="r")
            _advise_random(self._map)
            # every byte offset as the start of one row's bytes (overlapping items): a gather is one fancy index
            self._rows_at = np.ndarray((len(self._map) - self._row_bytes + 1,),
                                       dtype=np.dtype((np.void, self._row_bytes)), buffer=self._map, offset=0,
                                       strides=(1,))
        if self._chunk_offsets is None or getattr(self, "_verified", None) is None:
            self._handle.close()

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        """Unmap the file (its pages leave this process's resident memory) and close it."""
        self._rows_at = self._map = self._table = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
        self._handle.close()

    def __enter__(self) -> RowAccess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getitem__(self, rows: Any) -> np.ndarray:
        index = np.asarray(rows, dtype=np.int64).ravel()
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.path} ({self.shape[0]} rows)")
        if index.size == 0 or self.shape[0] == 0:
            return np.zeros((index.size, self.shape[1]), self.dtype)
        if self._table is not None:
            unique, inverse = np.unique(index, return_inverse=True)
            return np.asarray(self._table[unique.tolist()])[inverse]
        if self._offset is not None:
            starts = self._offset + index * self._row_bytes
        else:
            self._verify(index // self._chunk_rows)
            starts = self._chunk_offsets[index // self._chunk_rows] + (index % self._chunk_rows) * self._row_bytes
        if self._map is None:
            return self._read(starts)
        return self._rows_at[starts].view(self.dtype).reshape(index.size, self.shape[1])

    def _read(self, starts: np.ndarray) -> np.ndarray:
        """Rows whose bytes begin at ``starts`` (file offsets), read with ``pread``: each run of rows adjacent
        in the file (after sorting) in one call."""
        unique, inverse = np.unique(starts, return_inverse=True)
        data = np.empty((unique.size, self._row_bytes), np.uint8)
        for begin, end in _runs(unique, self._row_bytes):
            self._read_into(memoryview(data[begin:end]).cast("B"), int(unique[begin]))
        return data.view(self.dtype).reshape(unique.size, self.shape[1])[inverse]

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` from the file at ``offset`` (reads can come back short: go on until full or the
        file ends, which means it was cut)."""
        handle, done = self._file.fileno(), 0
        while done < len(buffer):
            if hasattr(os, "preadv"):
                got = os.preadv(handle, [buffer[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv (Windows)
                self._file.seek(offset + done)
                got = self._file.readinto(buffer[done:]) or 0
            if got == 0:
                raise StoreDamagedError(f"{self.path} is truncated: {len(buffer)} bytes of descriptors at offset "
                                        f"{offset}, {done} read", [])
            done += got

    def _verify(self, chunks: np.ndarray) -> None:
        """Read each chunk not checked yet through HDF5, whose fletcher32 filter verifies it."""
        if getattr(self, "_verified", None) is None:
            return
        unique = np.unique(chunks)
        for chunk in unique[~self._verified[unique]].tolist():
            first, last = chunk * self._chunk_rows, min(self.shape[0], (chunk + 1) * self._chunk_rows)
            try:
                self._checked[first:last]
            except H5_READ_ERRORS as err:
                raise StoreDamagedError(f"{self.path} is damaged: descriptor rows {first}-{last - 1} fail their "
                                        f"checksum ({_first_line(err)})", [(first, last)]) from None
            self._verified[chunk] = True


def _advise_random(mapped: np.memmap) -> None:
    """Row gathers touch scattered pages: tell the kernel not to read (and map) the pages around each one, so
    only the rows gathered become resident (else a large store ends up resident in full)."""
    import mmap

    raw = getattr(mapped, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            raw.madvise(mmap.MADV_RANDOM)
        except OSError:  # advice only
            pass


def _chunk_offsets(table: Any, rows_per_chunk: int) -> np.ndarray:
    """Byte offset in the file of every chunk of a row-chunked 2-D dataset (``-1``: never written)."""
    n_chunks = -(-table.shape[0] // rows_per_chunk)
    offsets = np.full(n_chunks, -1, np.int64)

    def visit(info: Any) -> None:
        offsets[info.chunk_offset[0] // rows_per_chunk] = info.byte_offset

    table.id.chunk_iter(visit)
    if (offsets < 0).any():
        raise StoreError(f"{table.file.filename}: {int((offsets < 0).sum())} chunk(s) of descriptors were never "
                         f"written: the store is incomplete")
    return offsets


def _true_runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """``(start, stop)`` of every run of True in a boolean vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _text(name: Any) -> str:
    """A name h5py returns (``bytes`` when damaged bytes are not UTF-8) as text for messages."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _runs(ascending: np.ndarray, step: int) -> List[Tuple[int, int]]:
    """``(begin, end)`` positions of the runs of ``ascending`` (sorted, distinct) values ``step`` apart: rows
    (``step`` 1) or row offsets (``step`` = bytes per row) that one read fetches together."""
    if not len(ascending):
        return []
    breaks = (np.flatnonzero(np.diff(ascending) != step) + 1).tolist()
    return list(zip([0] + breaks, breaks + [len(ascending)]))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_descriptors(path: PathLike) -> RowAccess:
    """The ``descriptors`` of a store as a read-only row gatherer ``rows (R,) → (R, D)``, without reading them
    (a memory map of the file; see ``RowAccess``). Checksums are not verified on this path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no descriptor file {path}")
    try:
        return RowAccess(path)
    except (OSError, KeyError) as err:
        raise StoreError(f"{path} is not a readable descriptor store ({_first_line(err)})") from None


def read_attrs(path: PathLike) -> Dict[str, Any]:
    """The attributes of a store, as plain Python values (no descriptors are read)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no descriptor file {path}")
    try:
        with h5py.File(path, "r") as handle:
            return read_attrs_of(handle)
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file ({_first_line(err)})") from None


def read_ids(path: PathLike) -> List[str]:
    """The ``ids`` of a store, without reading its descriptors (8 GB for R1M at 2048-d)."""
    with StoreReader(path) as reader:
        return reader.ids


def read_store(path: PathLike, *, rows: Optional[Sequence[int]] = None,
               require_fingerprint: bool = True) -> DescriptorStore:
    """Read a store (all rows, or only ``rows``, in the order given) as float32, checksums verified.

    Raises:
        FileNotFoundError: no such file.
        StoreError: not HDF5, datasets missing or mismatched, no ``fingerprint`` attribute (unless
            ``require_fingerprint=False``); ``StoreDamagedError`` when checksums fail.
    """
    with StoreReader(path) as reader:
        if require_fingerprint and not reader.fingerprint:
            raise StoreError(f"{reader.path} has no 'fingerprint' attribute: simret cannot tell which encoder "
                             f"computed these descriptors (write them with simret.retrieval.store.write_store)")
        if rows is None:
            descriptors = np.empty((reader.count, reader.dim), np.float32)
            for start, block in reader.blocks():
                descriptors[start:start + len(block)] = block
            ids = reader.ids
        else:
            descriptors = reader.rows(rows)
            ids = reader.ids_of(rows)
        return DescriptorStore(np.ascontiguousarray(descriptors, dtype=np.float32), ids, dict(reader.attrs))


def check_fingerprint(found: Optional[str], expected: str, *, what: str, where: str) -> None:
    """Refuse descriptors computed by another encoder, naming both fingerprints.

    Raises:
        StoreError: ``found`` differs from ``expected``.
    """
    if found != expected:
        raise StoreError(f"{what} were computed with encoder {found or '(unknown)'}, but {where} was built with "
                         f"encoder {expected}: descriptors of different encoders cannot be compared "
                         f"(use the index's model, or rebuild the index with this one)")
