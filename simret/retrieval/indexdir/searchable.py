"""Stage 4 of a build: the whitening and the FAISS index of the next generation, streamed from its store.

Whitening is learned from the store block by block (``PCAWhitening.learn_streaming``) or on other images
(``--whiten-on``); an index is trained on a seeded sample of rows read from the store and filled block by
block, so memory holds the index and one block, whatever the collection's size. What has not changed is
not rebuilt: an unchanged store with the same settings links the previous files; ``--append`` keeps the
trained index and its whitening and adds the new rows only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from simret.retrieval.index import Index, auto_kind
from simret.retrieval.indexdir.assemble import Assembled
from simret.retrieval.indexdir.layout import NewGeneration, link_file
from simret.retrieval.indexdir.names import INDEX_FILE, STORE, STORE_ONLY, WHITENING_FILE
from simret.retrieval.indexdir.previous import Previous
from simret.retrieval.store import StoreReader
from simret.retrieval.whitening import PCAWhitening, l2_normalize, learn_whitening_on
from simret.utils.logs import get_logger

log = get_logger(__name__)
INDEXED = "indexed images"  # ``learned_on`` of a whitening learned on the index's own descriptors
SAMPLE_SEED = 0


@dataclass
class Searchable:
    """What stage 4 wrote into the generation (``None``: no such file)."""

    whitening: Optional[PCAWhitening]
    whitening_meta: Dict[str, Any]
    index: Optional[Index]
    index_meta: Dict[str, Any]
    linked: Dict[str, bool]  # file key → taken unchanged from the previous generation


def build_searchable(generation: NewGeneration, assembled: Assembled, previous: Previous, settings: Any, *,
                     append: bool, encoder: Any, progress: bool) -> Searchable:
    """Whitening and index for the store ``generation`` holds (see the module docstring)."""
    meta = previous.meta or {}
    kind = meta["index"]["kind"] if append and meta else settings.kind
    n = len(assembled.ids)
    if kind == STORE_ONLY:
        index_meta = {"requested": STORE_ONLY, "requested_params": {}, "kind": STORE_ONLY, "params": {},
                      "dim": assembled.dim, "ntotal": n, "bytes_per_vector": 0}
        return Searchable(None, {"kind": "none"}, None, index_meta, {})
    store_path = generation.path(STORE)
    whitening, whitening_meta, whitening_linked = _whitening(generation, assembled, previous, settings, append=append,
                                                            encoder=encoder, progress=progress)
    prepare = whitening.apply if whitening is not None else l2_normalize
    index, linked = _index(generation, assembled, previous, settings, append=append, whitening_kept=whitening_linked,
                           prepare=prepare, store_path=store_path)
    requested = meta["index"] if append and meta else {"requested": settings.kind,
                                                         "requested_params": dict(settings.index_params)}
    index_meta = {"requested": requested.get("requested", kind),
                  "requested_params": dict(requested.get("requested_params", {})),
                  "kind": index.kind, "params": index.params, "dim": index.dim, "ntotal": index.ntotal,
                  "bytes_per_vector": index.bytes_per_vector}
    return Searchable(whitening, whitening_meta, index, index_meta, {"whitening": whitening_linked, "index": linked})


# -------------------------------------------------------------------------------------------- whitening


def _whitening(generation: NewGeneration, assembled: Assembled, previous: Previous, settings: Any, *, append: bool,
               encoder: Any, progress: bool):
    """``(whitening or None, its meta, linked from the previous generation)``."""
    meta = previous.meta or {}
    old = meta.get("whitening") or {"kind": "none"}
    wanted = old if append and meta else _wanted_whitening(settings)
    if wanted.get("kind") != "pca":
        return None, {"kind": "none"}, False
    same_source = old.get("kind") == "pca" and old.get("learned_on") == wanted.get("learned_on") \
        and (wanted.get("out_dim") is None or old.get("out_dim") == wanted.get("out_dim"))
    unchanged_input = wanted.get("learned_on") != INDEXED or assembled.route == "linked" or append
    if same_source and unchanged_input and previous.whitening_ok and previous.generation is not None:
        link_file(previous.generation.file(WHITENING_FILE), generation.path(WHITENING_FILE))
        return PCAWhitening.load(generation.path(WHITENING_FILE)), old, True
    dim = wanted.get("out_dim") if append else settings.whiten_dim
    source = wanted.get("learned_on", INDEXED)
    if source == INDEXED:
        with StoreReader(generation.path(STORE)) as store:
            whitening = PCAWhitening.learn_streaming((block for _, block in store.blocks()), dim)
    else:
        whitening = learn_whitening_on(source, encoder, dim=dim, scales=settings.scales, max_size=settings.max_size,
                                       batch_size=settings.batch_size, workers=settings.workers, half=settings.half,
                                       progress=progress)
    _saving(generation.path(WHITENING_FILE), whitening.save)
    return whitening, {**whitening.describe(), "learned_on": source}, False


def _wanted_whitening(settings: Any) -> Dict[str, Any]:
    if settings.whiten != "pca":
        return {"kind": "none"}
    source = str(Path(settings.whiten_on).expanduser()) if settings.whiten_on else INDEXED
    return {"kind": "pca", "learned_on": source, "out_dim": settings.whiten_dim}


# ------------------------------------------------------------------------------------------------ index


def _index(generation: NewGeneration, assembled: Assembled, previous: Previous, settings: Any, *, append: bool,
           whitening_kept: bool, prepare: Callable[[np.ndarray], np.ndarray], store_path: Path):
    """``(index, linked from the previous generation)``; the index file is written into the generation."""
    meta = previous.meta or {}
    usable_old = previous.index_ok and previous.generation is not None and bool(meta) \
        and (whitening_kept or meta.get("whitening", {}).get("kind", "none") == "none")
    target = generation.path(INDEX_FILE)
    if usable_old and assembled.route == "linked" and (append or same_index_settings(meta, settings)):
        link_file(previous.generation.file(INDEX_FILE), target)
        return Index.load(target), True
    if append and usable_old and assembled.route == "extended":
        index = Index.load(previous.generation.file(INDEX_FILE))
        if index.ntotal == assembled.first_new_row:
            _fill(index, store_path, prepare, start=assembled.first_new_row)
            _saving(target, index.save)
            return index, False
        log.warning("%s holds %d vectors, the store %d rows: rebuilding it", previous.generation.shown(INDEX_FILE),
                    index.ntotal, assembled.first_new_row)
    if append and meta:
        kind, params = meta["index"]["kind"], dict(meta["index"].get("params", {}))
    else:
        kind, params = settings.kind, dict(settings.index_params)
    index = stream_build(store_path, prepare, kind, params)
    _saving(target, index.save)
    return index, False


def stream_build(store_path: Path, prepare: Callable[[np.ndarray], np.ndarray], kind: str,
                 params: Dict[str, Any]) -> Index:
    """A new index of ``kind`` over every row of the store: trained on a seeded sample, filled block by block."""
    with StoreReader(store_path) as store:
        n = store.count
        resolved = auto_kind(n) if kind == "auto" else kind
        probe = prepare(store.rows([0]))
        log.info("building a %s index over %d %d-d descriptors", resolved, n, probe.shape[1])
        index = Index.create(probe.shape[1], resolved, n_hint=n, **params)
        if not index.faiss.is_trained:
            size = index.train_size(n)
            rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size, replace=False)) if size < n \
                else np.arange(n)
            index.train(prepare(store.rows(rows)), train_size=len(rows), seed=SAMPLE_SEED)
    _fill(index, store_path, prepare)
    return index


def _fill(index: Index, store_path: Path, prepare: Callable[[np.ndarray], np.ndarray], start: int = 0) -> None:
    with StoreReader(store_path) as store:
        for _, block in store.blocks(start=start):
            index.add(prepare(block))


# ----------------------------------------------------------------------------------------------- shared


def _saving(path: Path, save: Callable[[Path], Any]) -> None:
    """``save(path)``; a failure (disk full …) names ``path`` (``OSError.filename``) for the one error line."""
    try:
        save(path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def same_index_settings(meta: Dict[str, Any], settings: Any) -> bool:
    """Whether the previous index was asked for with these settings (kind, parameters, whitening, precision)."""
    index = meta.get("index", {})
    same_index = (index.get("requested") == settings.kind
                  and index.get("requested_params", {}) == dict(settings.index_params))
    old = meta.get("whitening", {})
    wanted = _wanted_whitening(settings)
    same_whitening = old.get("kind", "none") == wanted["kind"] and (
        wanted["kind"] == "none" or (old.get("learned_on") == wanted["learned_on"]
                                     and (settings.whiten_dim is None or old.get("out_dim") == settings.whiten_dim)))
    return same_index and same_whitening and meta.get("half") == settings.half
