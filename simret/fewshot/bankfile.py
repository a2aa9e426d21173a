"""The HDF5 file of a few-shot feature bank, ``features-<split>.h5``, and its resumable form ``<bank>.partial``.

Layout (bank format 2; readable with plain h5py)::

    features  (N, D) float32  the encoder's pooled descriptors (not normalised); chunked by rows, fletcher32
    labels    (N,)   int64    class index of every image, into ``classes``; fletcher32
    ids       (N,)   utf-8    image paths relative to the split's image root; attribute sha256 (of the ids)
    classes   (C,)   utf-8    class names (label i is classes[i])
    sizes     (N,)   int64    each image file's size in bytes when its features were computed (-1: unknown)
    mtimes    (N,)   int64    its modification time in nanoseconds then (-1: unknown)
    digests   (N,)   64 bytes SHA-256 of its bytes (with --verify-content; empty otherwise)
    done      (N,)   bool     the rows that hold features (every row of a complete bank)
    attrs     the encoder's provenance, image_size, crop_pct, split, split_format, split_source, n_images,
              n_classes, bank_format, complete, created

Every numeric dataset carries HDF5's fletcher32 checksum (``simret.utils.h5checked``), so damage is an error
when the rows are read, never wrong features. A partial bank has the same layout with ``complete`` False and
some rows not ``done``; ``new_partial`` writes it under a temporary name (``.features-….tmp``) and renames it
into place, so a killed run leaves a whole partial or none (and at worst a temporary that the next writer
removes). Banks written before format 2 (no checksums, no file states) are still read.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from simret.utils.atomic import atomic_path
from simret.utils.filestate import FileStates
from simret.utils.h5attrs import read_attrs_of, write_attrs
from simret.utils.h5checked import (
    DIGEST_DTYPE,
    IDS_DIGEST,
    checked_dataset,
    chunk_rows,
    create_file_state_sets,
    damaged_ranges,
    describe_ranges,
    has_file_states,
    ids_digest,
    merge_ranges,
    read_file_states,
    write_file_states,
)

PathLike = Union[str, os.PathLike]
BANK_FORMAT = 2  # 2: chunked + fletcher32 + file states (1: contiguous, no checksums, no file states)
PARTIAL_SUFFIX = ".partial"
TEMPORARIES = ".features-*.tmp"  # what bank writers leave when killed while writing a new partial
REQUIRED = ("features", "labels", "ids")


class BankDamagedError(ValueError):
    """A feature bank whose bytes no longer match their checksums."""


@dataclass
class BankHeader:
    """What a bank holds besides its features: attributes, ids, labels, classes and the feature width."""

    attrs: Dict[str, Any]
    ids: List[str]
    labels: np.ndarray  # (N,) int64
    classes: List[str]
    dim: int

    def __len__(self) -> int:
        return len(self.ids)


def partial_path(path: PathLike) -> Path:
    """``<bank>.partial``: the bank being written (the resume state of an interrupted extraction)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


# ---------------------------------------------------------------------------------------------- read


def read_header(handle: Any, shown: PathLike) -> BankHeader:
    """Attributes, ids, labels and classes of an open bank file.

    Raises:
        ValueError: not a feature bank. BankDamagedError: labels or ids fail their checksums.
    """
    missing = [name for name in REQUIRED if name not in handle]
    if missing:
        raise ValueError(f"{shown} is not a feature bank: missing dataset(s) {', '.join(missing)}")
    try:
        labels = np.asarray(handle["labels"][()], dtype=np.int64)
        ids = [str(v) for v in handle["ids"].asstr()[()]]
    except OSError as err:
        raise BankDamagedError(f"{shown} is damaged: its labels or ids cannot be read ({first_line(err)})") from None
    recorded = handle["ids"].attrs.get(IDS_DIGEST)
    if recorded is not None and _text(recorded) != ids_digest(ids):
        raise BankDamagedError(f"{shown} is damaged: its ids no longer match their checksum")
    if "classes" in handle:
        classes = [str(v) for v in handle["classes"].asstr()[()]]
    else:
        classes = [str(c) for c in range(int(labels.max()) + 1 if labels.size else 0)]
    features = handle["features"]
    dim = int(features.shape[1]) if features.ndim == 2 else 0
    return BankHeader(read_attrs_of(handle), ids, labels, classes, dim)


def read_features(handle: Any, shown: PathLike) -> np.ndarray:
    """``(N, D)`` float32 features of an open bank, checksums verified.

    Raises:
        BankDamagedError: some rows fail their checksums (named).
    """
    try:
        return np.asarray(handle["features"][()], dtype=np.float32)
    except OSError:
        ranges = damaged_ranges(handle["features"])
        raise BankDamagedError(f"{shown} is damaged (feature rows {describe_ranges(ranges)} fail their checksums): "
                               f"run the command that made it again to describe those images again") from None


def damaged_rows(handle: Any) -> List[Tuple[int, int]]:
    """Row ranges of every per-row dataset (features, file states, done) whose checksums fail."""
    names = [n for n in ("features", "sizes", "mtimes", "digests", "done") if n in handle]
    return merge_ranges(span for name in names for span in damaged_ranges(handle[name]))


def is_current(handle: Any) -> bool:
    """Whether an open bank has this format's layout (checksums, file states, done mask)."""
    return int(handle.attrs.get("bank_format", 1)) >= BANK_FORMAT and has_file_states(handle) and "done" in handle


# --------------------------------------------------------------------------------------------- write


def new_partial(partial: Path, header: BankHeader, source: Any = None):
    """Write an empty partial bank for ``header`` (every row to do) and open it for writing.

    With ``source`` (an open bank of the same images, encoder and preprocessing), every row of it that
    passes its checksums is copied, with its file state, and counts as done. Written under a temporary
    name and renamed into place (an interruption leaves the previous partial, if any).
    """
    import h5py

    with atomic_path(partial, suffix=".h5") as temporary:
        with h5py.File(temporary, "w") as handle:
            _create_layout(handle, header)
            if source is not None:
                _copy_usable_rows(source, handle)
    return h5py.File(partial, "r+")


def _create_layout(handle: Any, header: BankHeader) -> None:
    import h5py

    n, dim = len(header), header.dim
    checked_dataset(handle, "features", shape=(n, dim), dtype=np.float32, rows_per_chunk=chunk_rows(4 * dim, n))
    checked_dataset(handle, "labels", shape=(n,), dtype=np.int64, data=np.asarray(header.labels, dtype=np.int64))
    strings = h5py.string_dtype("utf-8")
    handle.create_dataset("ids", data=np.array(header.ids, dtype=object), dtype=strings)
    handle["ids"].attrs[IDS_DIGEST] = ids_digest(header.ids)
    handle.create_dataset("classes", data=np.array(header.classes, dtype=object), dtype=strings)
    create_file_state_sets(handle, n)
    checked_dataset(handle, "done", shape=(n,), dtype=bool, data=np.zeros(n, dtype=bool))
    write_attrs(handle, {**header.attrs, "bank_format": BANK_FORMAT, "complete": False})


def _copy_usable_rows(source: Any, target: Any) -> int:
    """Copy the rows of ``source`` that are done and pass their checksums (block by block, by its chunks)."""
    features = source["features"]
    n = int(target["features"].shape[0])
    step = int(features.chunks[0]) if features.chunks else max(1, n)
    try:
        done = np.asarray(source["done"][()], dtype=bool) if "done" in source else np.ones(n, dtype=bool)
    except OSError:
        return 0
    usable = np.zeros(n, dtype=bool)
    with_states = has_file_states(source)
    for first in range(0, n, step):
        last = min(n, first + step)
        try:
            block = features[first:last]
            states = read_file_states(source, first, last) if with_states else None
        except OSError:
            continue  # a damaged chunk: these rows are described again
        target["features"][first:last] = block
        if states is not None:
            write_file_states(target, states, first)
        usable[first:last] = done[first:last]
    target["done"][:] = usable
    return int(usable.sum())


def write_rows(handle: Any, indices: np.ndarray, features: np.ndarray, states: FileStates) -> None:
    """Store ``features`` at rows ``indices`` (increasing) with the ``states`` of their image files and mark
    them done; flushed to disk."""
    if indices.size == 0:
        return
    if indices[-1] - indices[0] + 1 == indices.size:  # a contiguous run: one slice write
        rows = slice(int(indices[0]), int(indices[-1]) + 1)
        handle["features"][rows] = features
        write_file_states(handle, states, int(indices[0]))
        handle["done"][rows] = True
    else:
        handle["features"][indices] = features
        write_file_states_at(handle, indices, states)
        handle["done"][indices] = True
    handle.flush()


def write_file_states_at(handle: Any, rows: np.ndarray, states: FileStates) -> None:
    """Store ``states`` at the (increasing) ``rows`` of the file-state datasets."""
    if rows.size == 0:
        return
    handle["sizes"][rows] = states.sizes
    handle["mtimes"][rows] = states.mtimes
    handle["digests"][rows] = np.asarray([d.encode("ascii") for d in states.digests], dtype=DIGEST_DTYPE)


def mark_todo(handle: Any, rows: np.ndarray) -> None:
    """Rows to describe again (their features no longer count)."""
    if rows.size:
        done = np.asarray(handle["done"][()], dtype=bool)
        done[rows] = False
        handle["done"][:] = done


def mark_complete(handle: Any) -> None:
    write_attrs(handle, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": True})


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
