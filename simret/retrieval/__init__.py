"""Retrieval: descriptor extraction, whitening, HDF5 store, FAISS index, re-ranking, Revisited metrics.

Importing ``simret.retrieval`` is cheap: the names below load their module (numpy, torch, faiss, h5py)
on first use.

* ``extract(encoder, root, ids, scales=..., max_size=...)`` → ``ExtractResult`` (multi-scale, L2-normalised)
* ``Index`` (FAISS flat / ivfpq / hnsw, inner product), ``PCAWhitening``
* ``alpha_qe``, ``dba`` (query expansion, database-side augmentation)
* ``store`` (``descriptors.h5``), ``build_index`` / ``IndexDir`` (the ``simret index`` directory)
"""
from __future__ import annotations

from simret.utils.lazy import lazy_exports

_LAZY = {
    "extract": "simret.retrieval.extraction",
    "iter_extract": "simret.retrieval.extraction",
    "ExtractResult": "simret.retrieval.extraction",
    "Index": "simret.retrieval.index",
    "PCAWhitening": "simret.retrieval.whitening",
    "l2_normalize": "simret.retrieval.whitening",
    "alpha_qe": "simret.retrieval.rerank",
    "dba": "simret.retrieval.rerank",
    "DescriptorStore": "simret.retrieval.store",
    "read_store": "simret.retrieval.store",
    "write_store": "simret.retrieval.store",
    "append_store": "simret.retrieval.store",
    "build_index": "simret.retrieval.indexdir",
    "IndexDir": "simret.retrieval.indexdir",
    "IndexSettings": "simret.retrieval.indexdir",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
