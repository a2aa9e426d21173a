"""A descriptor store indexed as it is (``simret index --from-descriptors``), streamed end to end.

A store written elsewhere (by shards, by ``simret eval``, by another program in the documented format) may
hold tens of millions of rows. Nothing here holds a Python object per row: the source is checked (every id
once, every descriptor finite, the ids' checksum) and copied into the new generation block by block —
descriptors, ids and file states of one block at a time — so the memory of this stage is one block and one
64-bit hash per row, whatever the store's size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from simret.retrieval.indexdir.assemble import Assembled
from simret.retrieval.store import StoreReader, StoreWriter, block_rows
from simret.utils.logs import get_logger

log = get_logger(__name__)


def check_source(path: Path, store: StoreReader) -> None:
    """Every id once, every descriptor finite, the ids matching their checksum (two streamed passes).

    Raises:
        ValueError: an id listed twice, or a NaN or infinite descriptor (the message names one).
        StoreDamagedError: ids or descriptors fail their checksums.
    """
    hashes = np.empty(store.count, np.int64)  # hash() is stable within this process: all a duplicate test needs
    for first, ids in store.id_blocks():
        hashes[first:first + len(ids)] = np.fromiter(map(hash, ids), np.int64, len(ids))
    twice = _repeated(store, hashes)
    if twice:
        raise ValueError(f"{path} lists {len(twice)} id(s) more than once (e.g. {twice[0]!r}): every image must have "
                         f"one descriptor")
    for start, block in store.blocks():
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(f"{path} holds NaN or infinite descriptors (row {row}, id "
                             f"{store.ids_of([row])[0]!r}): recompute them")


def copy_source(target: Path, store: StoreReader, attrs: Dict[str, Any], dtype: str, generation: str) -> Assembled:
    """The store of the new generation at ``target``: the source's rows, ids and file states, block by block."""
    step = block_rows(store.dim, store.dtype)
    id_blocks = store.id_blocks(step)
    with StoreWriter(target, store.dim, {**attrs, "generation": generation}, dtype=dtype) as writer:
        for (first, block), (_, ids) in zip(store.blocks(step), id_blocks):
            writer.append(block, ids, store.file_states_of(first, first + len(block)))
        for _ in id_blocks:  # the end of the ids: their checksum is verified there
            pass
    return Assembled(store.count, store.dim, generation, "written", 0)


def _repeated(store: StoreReader, hashes: np.ndarray) -> list:
    """The ids whose hash appears more than once and that are really equal (hash collisions are not)."""
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not same.size:
        return []
    rows = np.unique(np.concatenate([order[same], order[same + 1]]))
    ids = store.ids_of(rows)
    seen: set = set()
    return [i for i in ids if i in seen or seen.add(i)]
