"""The HDF5 descriptor store ``descriptors.h5``: descriptors, their ids and where they came from.

Schema (readable with plain h5py, no simret needed)::

    descriptors   (N, D) float32 or float16   one L2-normalised descriptor per row (not whitened)
    ids           (N,)   utf-8 strings        image paths relative to the indexed root (POSIX style)
    attrs         fingerprint, arch, pool, gamma, weights, dim, scales, max_size, simret_version, created
                  (+ anything passed as ``extra``)

``h5py.File(path)["ids"].asstr()[()]`` gives the ids as Python strings. Every write goes to a temporary
file that is renamed into place, so an interrupted write leaves the previous store untouched.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from simret.utils.atomic import atomic_path

PathLike = Union[str, os.PathLike]
REQUIRED_ATTRS = ("fingerprint", "arch", "pool", "gamma", "scales", "dim", "simret_version", "created")
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


class StoreError(ValueError):
    """A descriptor file that cannot be used (missing datasets, wrong shapes, no fingerprint …)."""


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


def _check_rows(descriptors: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise StoreError(f"descriptors must be (N, D), got shape {descriptors.shape}")
    if len(ids) != descriptors.shape[0]:
        raise StoreError(f"{len(ids)} ids for {descriptors.shape[0]} descriptors")
    return descriptors


def _h5_value(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.float64 if all(isinstance(v, (int, float)) for v in value) else object)
    if isinstance(value, (dict,)):
        import json

        return json.dumps(value, sort_keys=True)
    return value


def _py_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_py_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_store(path: PathLike, descriptors: np.ndarray, ids: Sequence[str], attrs: Mapping[str, Any], *,
                dtype: str = "float32") -> Path:
    """Write a complete store atomically (replacing any file at ``path``).

    Args:
        descriptors: ``(N, D)`` array; stored as ``dtype`` (``float32`` or ``float16``).
        ids: ``N`` strings.
        attrs: file attributes, normally from ``store_attrs(encoder.provenance(), scales=...)``.
    """
    import h5py

    if dtype not in STORE_DTYPES:
        raise StoreError(f"store dtype must be float32 or float16, not {dtype!r}")
    descriptors = _check_rows(descriptors, ids)
    if "dim" in attrs and descriptors.shape[0] and int(attrs["dim"]) != descriptors.shape[1]:
        raise StoreError(f"attribute dim={attrs['dim']} but descriptors have {descriptors.shape[1]} columns")
    with atomic_path(path, suffix=".h5") as temporary:
        with h5py.File(temporary, "w") as handle:
            # contiguous (not chunked, not compressed): rows can be memory-mapped (open_descriptors)
            handle.create_dataset("descriptors", data=descriptors.astype(STORE_DTYPES[dtype], copy=False))
            handle.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype("utf-8"))
            for key, value in attrs.items():
                handle.attrs[key] = _h5_value(value)
    return Path(path)


def append_store(path: PathLike, descriptors: np.ndarray, ids: Sequence[str], *,
                 expect_fingerprint: Optional[str] = None, block: int = 65536) -> Path:
    """Add rows to an existing store, atomically: a new file with the old rows (copied in blocks) and the
    new ones is written next to it and renamed into place.

    Raises:
        StoreError: the store was computed by another encoder (``expect_fingerprint``) or has another width.
    """
    import h5py

    descriptors = _check_rows(descriptors, ids)
    attrs = read_attrs(path)
    if expect_fingerprint is not None and attrs.get("fingerprint") != expect_fingerprint:
        raise StoreError(f"{path} holds descriptors of encoder {attrs.get('fingerprint')}, "
                         f"not {expect_fingerprint}: they cannot be mixed")
    with h5py.File(path, "r") as source, atomic_path(path, suffix=".h5") as temporary:
        table, names = source["descriptors"], source["ids"]
        if descriptors.shape[1] != table.shape[1]:
            raise StoreError(f"cannot append {descriptors.shape[1]}-d descriptors to the {table.shape[1]}-d "
                             f"store {path}")
        start, total = table.shape[0], table.shape[0] + len(ids)
        with h5py.File(temporary, "w") as handle:
            out = handle.create_dataset("descriptors", shape=(total, table.shape[1]), dtype=table.dtype)
            for first in range(0, start, block):
                last = min(start, first + block)
                out[first:last] = table[first:last]
            out[start:] = descriptors.astype(table.dtype, copy=False)
            handle.create_dataset("ids", data=np.asarray(list(names.asstr()[()]) + list(ids), dtype=object),
                                  dtype=h5py.string_dtype("utf-8"))
            for key, value in source.attrs.items():
                handle.attrs[key] = value
    return Path(path)


def open_descriptors(path: PathLike) -> np.ndarray:
    """The ``descriptors`` dataset as a read-only ``(N, D)`` array without reading it: a ``numpy.memmap`` of
    the file (stores written by simret are contiguous), or, for chunked/compressed files, the whole
    dataset read into memory."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as handle:
        if "descriptors" not in handle:
            raise StoreError(f"{path} has no 'descriptors' dataset")
        table = handle["descriptors"]
        offset = table.id.get_offset() if table.chunks is None and table.compression is None else None
        shape, dtype = table.shape, table.dtype
        if offset is None or not table.size:
            return np.asarray(table[()])
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_attrs(path: PathLike) -> Dict[str, Any]:
    """The attributes of a store, as plain Python values (no descriptors are read)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no descriptor file {path}")
    try:
        with h5py.File(path, "r") as handle:
            return {key: _py_value(value) for key, value in handle.attrs.items()}
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file ({err})") from None


def read_store(path: PathLike, *, rows: Optional[Sequence[int]] = None,
               require_fingerprint: bool = True) -> DescriptorStore:
    """Read a store (all rows, or only ``rows``, in the order given) as float32.

    Raises:
        FileNotFoundError: no such file.
        StoreError: not HDF5, datasets missing or mismatched, or no ``fingerprint`` attribute (unless
            ``require_fingerprint=False``).
    """
    import h5py

    path = Path(path)
    attrs = read_attrs(path)
    if require_fingerprint and not attrs.get("fingerprint"):
        raise StoreError(f"{path} has no 'fingerprint' attribute: simret cannot tell which encoder computed "
                         f"these descriptors (write them with simret.retrieval.store.write_store)")
    with h5py.File(path, "r") as handle:
        for name in ("descriptors", "ids"):
            if name not in handle:
                raise StoreError(f"{path} has no {name!r} dataset (datasets: {', '.join(handle)})")
        table, names = handle["descriptors"], handle["ids"]
        if table.ndim != 2 or names.shape != (table.shape[0],):
            raise StoreError(f"{path}: descriptors {table.shape} and ids {names.shape} do not match")
        if rows is None:
            descriptors = table[()]
            ids = [_py_value(v) for v in names[()]]
        else:
            order = np.asarray(rows, dtype=np.int64)
            if order.size and (order.min() < 0 or order.max() >= table.shape[0]):
                raise StoreError(f"row index out of range for {path} ({table.shape[0]} rows)")
            unique, inverse = np.unique(order, return_inverse=True)
            descriptors = table[unique.tolist()][inverse] if unique.size else np.zeros((0, table.shape[1]))
            picked = [_py_value(v) for v in names[unique.tolist()]] if unique.size else []
            ids = [picked[i] for i in inverse.tolist()]
    return DescriptorStore(np.ascontiguousarray(descriptors, dtype=np.float32), ids, attrs)


def check_fingerprint(found: Optional[str], expected: str, *, what: str, where: str) -> None:
    """Refuse descriptors computed by another encoder, naming both fingerprints.

    Raises:
        StoreError: ``found`` differs from ``expected``.
    """
    if found != expected:
        raise StoreError(f"{what} were computed with encoder {found or '(unknown)'}, but {where} was built with "
                         f"encoder {expected}: descriptors of different encoders cannot be compared "
                         f"(use the index's model, or rebuild the index with this one)")
