"""Stage 3 of a build: write the next generation's descriptor store, block by block.

Rows come from the previous store (reused) and from the resume checkpoints (described by this run or an
interrupted one), in the plan's order; memory use is one block whatever the store's size. Two cheaper
routes where they give the same file content: an unchanged store is hard-linked into the new generation
(no copy), and a pure append copies the previous file (kernel-side) and extends it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from simret.retrieval.indexdir.checkpoints import CheckpointRow, Checkpoints
from simret.retrieval.indexdir.layout import link_file
from simret.retrieval.indexdir.plan import Plan
from simret.retrieval.indexdir.previous import Previous
from simret.retrieval.store import StoreWriter, block_rows
from simret.utils.logs import get_logger

log = get_logger(__name__)


@dataclass
class Assembled:
    """The store written: how many rows, and how (``linked``, ``extended`` or ``written``)."""

    count: int
    dim: int
    store_generation: str  # the generation whose writer produced the file (differs when linked)
    route: str
    first_new_row: int  # rows from here on were added by this run (``extended``); 0 otherwise


def resolve_sources(plan: Plan, found: Dict[str, CheckpointRow]) -> List[int]:
    """Give every entry without a source its freshly checkpointed row; the positions of entries that have a
    descriptor (in order)."""
    kept = []
    for position, entry in enumerate(plan.entries):
        if entry.old_row < 0 and entry.checkpoint is None:
            entry.checkpoint = found.get(entry.key)
        if entry.old_row >= 0 or entry.checkpoint is not None:
            kept.append(position)
    return kept


def assemble_store(path: Path, plan: Plan, kept: Sequence[int], previous: Previous, checkpoints: Checkpoints,
                   attrs: Dict[str, Any], dtype: str, generation: str) -> Assembled:
    """Write the store of the next generation at ``path`` (see the module docstring)."""
    dim = int(attrs["dim"])
    if previous.store is not None and plan.reuses_all(previous, kept) and not plan.digests_added \
            and previous.format_version >= 2 and previous.store.has_file_states and previous.states_intact \
            and previous.attrs.get("root") == str(plan.root):
        link_file(previous.store.path, path)
        return Assembled(len(kept), dim, str(previous.attrs.get("generation")), "linked", 0)
    if previous.store is not None and _extendable(plan, kept, previous):
        first_new = len(previous.ids)
        shutil.copyfile(previous.store.path, path)
        with StoreWriter.reopen(path) as writer:
            _write_rows(writer, plan, kept[first_new:], previous, checkpoints)
            writer.set_attrs({"generation": generation, "root": str(plan.root)})
        return Assembled(len(kept), dim, generation, "extended", first_new)
    with StoreWriter(path, dim, {**attrs, "root": str(plan.root), "generation": generation}, dtype=dtype) as writer:
        _write_rows(writer, plan, kept, previous, checkpoints)
    return Assembled(len(kept), dim, generation, "written", 0)


def _extendable(plan: Plan, kept: Sequence[int], previous: Previous) -> bool:
    return (plan.appends_to(previous, kept) and not plan.digests_added
            and previous.format_version >= 2 and previous.store.has_file_states and previous.states_intact
            and previous.attrs.get("root") == str(plan.root) and bool(previous.usable.all()))


def _write_rows(writer: StoreWriter, plan: Plan, positions: Sequence[int], previous: Previous,
                checkpoints: Checkpoints) -> None:
    step = block_rows(writer.dim, writer.dtype)
    for start in range(0, len(positions), step):
        block = positions[start:start + step]
        rows = np.empty((len(block), writer.dim), np.float32)
        old = [(j, plan.entries[p].old_row) for j, p in enumerate(block) if plan.entries[p].old_row >= 0]
        new = [(j, plan.entries[p].checkpoint) for j, p in enumerate(block) if plan.entries[p].old_row < 0]
        if old:
            rows[[j for j, _ in old]] = previous.store.rows([r for _, r in old])
        if new:
            rows[[j for j, _ in new]] = checkpoints.rows([c for _, c in new])
        writer.append(rows, [plan.entries[p].image_id for p in block], plan.states.take(block))
