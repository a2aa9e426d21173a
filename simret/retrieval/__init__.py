"""Retrieval: descriptor extraction, whitening, HDF5 store, FAISS index, re-ranking, Revisited metrics.

Importing ``simret.retrieval`` is cheap: the names below load their module (numpy, torch, faiss, h5py)
on first use.

* ``extract(encoder, root, ids, scales=..., max_size=...)`` → ``ExtractResult`` (multi-scale, L2-normalised)
* ``Index`` (FAISS flat / ivfpq / hnsw, inner product), ``PCAWhitening``
* ``alpha_qe``, ``dba`` (query expansion, database-side augmentation)
* ``store`` (``descriptors.h5``), ``build_index`` / ``IndexDir`` (the ``simret index`` directory)
"""
from __future__ import annotations

import importlib
from typing import Any

from simret.utils.lazy import lazy_exports

_LAZY = {
    "iter_extract": "simret.retrieval.extract",
    "ExtractResult": "simret.retrieval.extract",
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

__all__ = sorted([*_LAZY, "extract"])
_lazy_getattr, _lazy_dir = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list:
    return sorted({*_lazy_dir(), "extract"})


def __getattr__(name: str) -> Any:
    if name == "extract":
        # the submodule simret.retrieval.extract, which is callable as the function extract(): one object under
        # one name, whichever way it is imported (``from simret.retrieval import extract``, ``import
        # simret.retrieval.extract as module``, ``module.extract`` …); the import binds it here
        return importlib.import_module("simret.retrieval.extract")
    return _lazy_getattr(name)
