"""The index directory ``simret index`` writes and ``simret search`` reads.

::

    DIR/meta.json        → current/meta.json: model, fingerprint, scales, max_size, index kind and parameters,
                           whitening, counts, the generation id and the checksum of every file (written last)
    DIR/descriptors.h5   → current/…: descriptors (N, D) + ids + file states, as computed (L2-normalised, not
                           whitened), HDF5 fletcher32 checksums; see simret.retrieval.store
    DIR/index.faiss      → current/…: FAISS index over the whitened descriptors, row i = ids[i]
    DIR/whitening.npz    → current/…: PCA whitening (mean, projection), when --whiten pca
    DIR/skipped.tsv      → current/…: id <TAB> reason, for every listed file that could not be used
    DIR/current          → generations/<id>: the committed generation (replacing this link commits)
    DIR/generations/<id>/  the files of one generation
    DIR/.partial/        while extraction runs: finished chunks of descriptors, so an interrupted run resumes
    DIR/.simret.lock     the writer lock (one writer at a time; readers never take it)

Modules, in the order a build runs: ``settings`` (what to do), ``previous`` (what is there, damage
assessed), ``plan`` (stage 1), ``describe`` (stage 2, checkpointed in ``checkpoints``), ``assemble``
(stage 3), ``searchable`` (stage 4), ``layout`` (stage 5, the commit), orchestrated by ``build``;
``reader`` opens a committed generation, ``meta`` reads and writes its record, ``check`` verifies one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from simret.retrieval.indexdir.build import build_index
from simret.retrieval.indexdir.layout import current, current_generation
from simret.retrieval.indexdir.meta import (
    FORMAT,
    FORMAT_VERSION,
    IndexDamagedError,
    model_record,
    read_meta_file,
    spec_from_meta,
)
from simret.retrieval.indexdir.names import (
    CURRENT,
    GENERATIONS,
    INDEX_FILE,
    META,
    PARTIAL,
    SKIPPED,
    STORE,
    STORE_ONLY,
    WHITENING_FILE,
)
from simret.retrieval.indexdir.plan import path_key, relative_id
from simret.retrieval.indexdir.reader import IndexDir
from simret.retrieval.indexdir.settings import BuildSummary, IndexSettings


def read_meta(out: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The meta.json of the committed generation of ``out`` (None: no index there).

    Raises:
        IndexDamagedError: it is damaged. ValueError: not a simret index, or written by a newer simret.
    """
    generation = current(out)
    if generation is None:
        return None
    return read_meta_file(generation.file(META), generation.shown(META), out)


__all__ = [
    "build_index", "IndexSettings", "BuildSummary", "IndexDir", "read_meta", "current_generation", "model_record",
    "spec_from_meta", "path_key", "relative_id", "IndexDamagedError", "FORMAT", "FORMAT_VERSION", "META", "STORE",
    "INDEX_FILE", "WHITENING_FILE", "SKIPPED", "PARTIAL", "STORE_ONLY", "CURRENT", "GENERATIONS",
]
