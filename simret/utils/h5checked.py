"""HDF5 datasets that detect their own damage, and the image-file states kept beside them.

What simret's HDF5 formats share (the descriptor store and the few-shot feature banks; the formats stay
distinct, these are the pieces both are made of):

* ``checked_dataset``: chunked (whole rows, about ``CHUNK_BYTES`` per chunk) with HDF5's fletcher32 filter, so
  a damaged byte is an error when its chunk is read, never a silently wrong value.
* ``damaged_ranges``: the ``(start, stop)`` row ranges of a dataset whose chunks fail their checksums.
* the file-state datasets ``sizes (N,) int64``, ``mtimes (N,) int64``, ``digests (N,) 64 ASCII bytes``
  (``FILE_STATE_SETS``): ``create_file_state_sets``, ``write_file_states``, ``read_file_states``.
* ``ids_digest``: the SHA-256 a list of ids is checked with (variable-length strings cannot take HDF5
  filters, so their checksum is an attribute, ``IDS_DIGEST``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from simret.utils.filestate import DIGEST_BYTES, FileStates

CHUNK_BYTES = 256 << 10  # bytes per HDF5 chunk of a row-chunked dataset
FILE_STATE_SETS = ("sizes", "mtimes", "digests")
IDS_DIGEST = "sha256"  # attribute of an ids dataset: SHA-256 of the ids, each followed by a newline
DIGEST_DTYPE = f"S{DIGEST_BYTES}"
# what h5py raises reading a damaged file: OSError for failed checksums and most damage, the others when
# damaged metadata (names, datatypes, B-trees, attributes) is read
H5_READ_ERRORS = (OSError, RuntimeError, ValueError, TypeError, KeyError, UnicodeDecodeError)


def chunk_rows(row_bytes: int, n_rows: Optional[int] = None) -> int:
    """Rows per chunk for rows of ``row_bytes`` bytes (about ``CHUNK_BYTES``; at most ``n_rows`` when given)."""
    rows = max(1, CHUNK_BYTES // max(1, int(row_bytes)))
    return max(1, min(rows, int(n_rows))) if n_rows is not None else rows


def checked_dataset(handle: Any, name: str, *, shape: Tuple[int, ...], dtype: Any, data: Any = None,
                    rows_per_chunk: Optional[int] = None, resizable: bool = False) -> Any:
    """Create ``name`` in the open h5py file ``handle``: chunked by whole rows, fletcher32-checked.

    ``rows_per_chunk`` defaults to ``chunk_rows`` of one row; ``resizable`` lets the first axis grow.
    """
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = rows_per_chunk or chunk_rows(row_bytes)
    chunks = (max(1, int(rows) if resizable else min(int(rows), int(shape[0]) or 1)), *shape[1:])
    extra = {"maxshape": (None, *shape[1:])} if resizable or not shape[0] else {}  # a chunk may not exceed a fixed 0
    return handle.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks, fletcher32=True,
                                 **extra)


def damaged_ranges(dataset: Any, first: int = 0, last: Optional[int] = None) -> List[Tuple[int, int]]:
    """Read ``dataset`` rows ``first:last`` chunk by chunk; the merged ``(start, stop)`` row ranges whose
    checksums fail (or cannot be read at all). A contiguous dataset is one range (it has no checksums)."""
    last = dataset.shape[0] if last is None else min(last, dataset.shape[0])
    step = dataset.chunks[0] if dataset.chunks else max(1, last - first)
    coarse = step * 64
    damaged: List[Tuple[int, int]] = []
    for start in range(first, last, coarse):
        stop = min(last, start + coarse)
        if _readable(dataset, start, stop):
            continue
        for a in range(start, stop, step):  # locate the bad chunks
            b = min(stop, a + step)
            if not _readable(dataset, a, b):
                damaged.append((a, b))
    return merge_ranges(damaged)


def _readable(dataset: Any, first: int, last: int) -> bool:
    try:
        dataset[first:last]
        return True
    except H5_READ_ERRORS:
        return False


def merge_ranges(ranges: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted, overlapping or touching ``(start, stop)`` ranges merged."""
    merged: List[Tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def describe_ranges(ranges: Sequence[Tuple[int, int]], limit: int = 5) -> str:
    """``"0-3, 8-11 …"``: row ranges for a message (inclusive ends)."""
    shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in ranges[:limit])
    return shown + (" …" if len(ranges) > limit else "")


def create_file_state_sets(handle: Any, n: int, *, rows_per_chunk: Optional[int] = None,
                           resizable: bool = False) -> None:
    """The ``sizes``, ``mtimes`` (``-1``: unknown) and ``digests`` datasets of ``n`` rows, checked."""
    for name, dtype in (("sizes", np.int64), ("mtimes", np.int64), ("digests", DIGEST_DTYPE)):
        checked_dataset(handle, name, shape=(n,), dtype=dtype, rows_per_chunk=rows_per_chunk, resizable=resizable)
    if n:
        handle["sizes"][:] = -1
        handle["mtimes"][:] = -1


def write_file_states(handle: Any, states: FileStates, start: int = 0) -> None:
    """Store ``states`` at rows ``start:start + len(states)`` of the file-state datasets."""
    stop = start + len(states)
    if stop == start:
        return
    handle["sizes"][start:stop] = states.sizes
    handle["mtimes"][start:stop] = states.mtimes
    handle["digests"][start:stop] = np.asarray([d.encode("ascii") for d in states.digests], dtype=DIGEST_DTYPE)


def has_file_states(handle: Any) -> bool:
    return all(name in handle for name in FILE_STATE_SETS)


def read_file_states(handle: Any, first: int = 0, last: Optional[int] = None) -> FileStates:
    """The file states of rows ``first:last`` (raises OSError where a checksum fails)."""
    sizes = np.asarray(handle["sizes"][first:last], np.int64)
    mtimes = np.asarray(handle["mtimes"][first:last], np.int64)
    digests = [d.decode("ascii") for d in handle["digests"][first:last].tolist()]
    return FileStates(sizes, mtimes, digests)


class IdsDigest:
    """The SHA-256 of ids added in several parts: each id encoded as UTF-8 and followed by a newline."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, ids: Iterable[str]) -> None:
        for image_id in ids:
            self._digest.update(str(image_id).encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def ids_digest(ids: Iterable[str]) -> str:
    """SHA-256 (hex) of ``ids``, each encoded as UTF-8 and followed by a newline."""
    digest = IdsDigest()
    digest.update(ids)
    return digest.hexdigest()
