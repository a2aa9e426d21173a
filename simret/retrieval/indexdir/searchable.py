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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from simret.models.precision import recorded_precision
from simret.retrieval.index import Index, auto_kind
from simret.retrieval.indexdir.assemble import Assembled
from simret.retrieval.indexdir.layout import NewGeneration, link_file
from simret.retrieval.indexdir.names import INDEX_FILE, STORE, STORE_ONLY, WHITENING_FILE
from simret.retrieval.indexdir.previous import Previous
from simret.retrieval.store import RowAccess, StoreReader
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
                     append: bool, encoder: Any, progress: bool, shards: Optional[List[Any]] = None) -> Searchable:
    """Whitening and index for the store ``generation`` holds (see the module docstring).

    ``settings.train_from``: take the trained index and whitening of that directory and add these rows to it;
    ``shards``: the source directories of a merge, whose indexes are merged as they are when they were all
    trained from ``settings.train_from``."""
    meta = previous.meta or {}
    kind = meta["index"]["kind"] if append and meta else settings.kind
    n = assembled.count
    if getattr(settings, "train_from", None) and not (append and meta):
        return _from_trained(generation, assembled, Path(settings.train_from), shards or [])
    if kind == STORE_ONLY:
        index_meta = {"requested": STORE_ONLY, "requested_params": {}, "kind": STORE_ONLY, "params": {},
                      "dim": assembled.dim, "ntotal": n, "bytes_per_vector": 0}
        return Searchable(None, {"kind": "none"}, None, index_meta, {})
    store_path = generation.path(STORE)
    whitening, whitening_meta, whitening_linked = _whitening(generation, assembled, previous, settings, append=append,
                                                            encoder=encoder, progress=progress)
    prepare = whitening.apply if whitening is not None else l2_normalize
    index, linked, quality = _index(generation, assembled, previous, settings, append=append,
                                    whitening_kept=whitening_linked, prepare=prepare, store_path=store_path)
    requested = meta["index"] if append and meta else {"requested": settings.kind,
                                                         "requested_params": dict(settings.index_params),
                                                         "max_memory": settings.max_memory,
                                                         "max_latency_ms": settings.max_latency_ms}
    index_meta = {"requested": requested.get("requested", kind),
                  "requested_params": dict(requested.get("requested_params", {})),
                  "max_memory": requested.get("max_memory"), "max_latency_ms": requested.get("max_latency_ms"),
                  "kind": index.kind, "params": index.params, "dim": index.dim, "ntotal": index.ntotal,
                  "bytes_per_vector": index.bytes_per_vector, **quality}
    return Searchable(whitening, whitening_meta, index, index_meta, {"whitening": whitening_linked, "index": linked})


# --------------------------------------------------------------------------------------- trained elsewhere


def _from_trained(generation: NewGeneration, assembled: Assembled, trained_dir: Path, shards: List[Any]) -> Searchable:
    """The trained index (emptied) and the whitening of ``trained_dir``, filled with this store's rows, or
    merged from ``shards`` built the same way (no vector re-added)."""
    from simret.retrieval.indexdir.meta import file_record
    from simret.retrieval.indexdir.reader import IndexDir

    with IndexDir(trained_dir) as trained:
        if not trained.searchable:
            raise ValueError(f"--train-from {trained_dir} keeps descriptors only: give a directory with an index")
        origin = {"path": str(trained_dir.resolve()), "generation": trained.generation,
                  "checksum": file_record(trained.meta, "index").get("checksum")}
        whitening_meta = dict(trained.meta["whitening"])
        if trained.whitening is not None:
            trained.whitening.save(generation.path(WHITENING_FILE))
        index = Index.load(trained.generation_dir.file(INDEX_FILE))
        index.faiss.reset()  # keeps what training learned (coarse centroids, codebooks)
        prepare = trained.prepare
        whitening = trained.whitening
    mergeable = [s for s in shards if (s.meta["index"].get("trained_from") or {}).get("checksum") == origin["checksum"]]
    if shards and len(mergeable) == len(shards) and index.kind != "hnsw":
        for shard in shards:  # rows of the merged store are the shards' rows in this order
            index.faiss.merge_from(shard.index.faiss, index.ntotal if index.kind == "ivfpq" else 0)
        log.info("merged the indexes of %d shards trained from %s (no vector re-added)", len(shards), trained_dir)
    else:
        _fill(index, generation.path(STORE), prepare)
    quality = measure_recall(index, generation.path(STORE), prepare) if index.kind in ("ivfpq", "hnsw") else {}
    index.save(generation.path(INDEX_FILE))
    index_meta = {"requested": "train-from", "requested_params": {}, "trained_from": origin, "kind": index.kind,
                  "params": index.params, "dim": index.dim, "ntotal": index.ntotal,
                  "bytes_per_vector": index.bytes_per_vector, **quality}
    return Searchable(whitening, whitening_meta, index, index_meta, {"whitening": False, "index": False})


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
                                       batch_size=settings.batch_size, workers=settings.workers,
                                       precision=settings.precision, progress=progress)
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
    """``(index, linked from the previous generation, quality record)``; the file is written into the generation."""
    meta = previous.meta or {}
    old_quality = {k: v for k, v in meta.get("index", {}).items() if k in QUALITY_KEYS}
    usable_old = previous.index_ok and previous.generation is not None and bool(meta) \
        and (whitening_kept or meta.get("whitening", {}).get("kind", "none") == "none")
    target = generation.path(INDEX_FILE)
    if usable_old and assembled.route == "linked" and (append or same_index_settings(meta, settings)):
        link_file(previous.generation.file(INDEX_FILE), target)
        return Index.load(target), True, old_quality
    index = None
    if append and usable_old and assembled.route == "extended":
        index = Index.load(previous.generation.file(INDEX_FILE))
        if index.ntotal == assembled.first_new_row:
            _fill(index, store_path, prepare, start=assembled.first_new_row)
        else:
            log.warning("%s holds %d vectors, the store %d rows: rebuilding it",
                        previous.generation.shown(INDEX_FILE), index.ntotal, assembled.first_new_row)
            index = None
    quality: Dict[str, Any] = {}
    if index is None:
        if append and meta:
            kind, params, budget = meta["index"]["kind"], dict(meta["index"].get("params", {})), None
        else:
            kind, params, budget = settings.kind, dict(settings.index_params), settings.max_memory
        index, reason = stream_build(store_path, prepare, kind, params, max_memory=budget)
        quality.update({"choice": reason} if reason else {})
    if settings.max_latency_ms and not append and index.kind in ("ivfpq", "hnsw"):
        quality.update(tune_latency(index, store_path, prepare, settings.max_latency_ms))
    quality.update(_recall(index, store_path, prepare, old_quality, assembled))
    _saving(target, index.save)
    return index, False, quality


QUALITY_KEYS = ("choice", "recall_at_10", "recall_at_10_rescored", "recall_queries", "recall_measured_at", "tuned",
                "rerank")
RECALL_QUERIES = 1000  # stored rows used as queries to measure an approximate index's recall
RESCORE_BYTES = 64 << 20  # float32 rows gathered at once to re-score those queries
RECALL_TARGET = 0.95  # recall@10 with re-scoring the build aims for, by choosing the re-scoring depth
RERANK_DEPTHS = (16, 32, 64, 128)  # candidates re-scored per result tried, shallowest first
REMEASURE_GROWTH = 0.1  # an appended index is measured again once it grew by this fraction


def stream_build(store_path: Path, prepare: Callable[[np.ndarray], np.ndarray], kind: str,
                 params: Dict[str, Any], *, max_memory: Optional[int] = None) -> Tuple[Index, str]:
    """A new index over every row of the store: trained on a seeded sample, filled block by block.

    With ``max_memory`` (bytes), the kind and parameters are chosen to fit (``simret.retrieval.budget``).
    Returns ``(index, why this kind)``.
    """
    from simret.retrieval.budget import choose_index

    with StoreReader(store_path) as store:
        n = store.count
        dim = prepare(store.rows([0])).shape[1]
        reason = ""
        if max_memory:
            choice = choose_index(n, dim, max_memory, kind, params)
            kind, params, reason = choice.kind, choice.params, choice.reason
            log.info("--max-memory: %s", reason)
        resolved = auto_kind(n) if kind == "auto" else kind
        log.info("building an index (%s) over %d %d-d descriptors", resolved, n, dim)
        index = Index.create(dim, resolved, n_hint=n, **params)
        if not index.faiss.is_trained:
            picked = _sample(n, index.train_size(n))  # sorted: gathered in one streamed pass
            index.train(prepare(store.sampled_rows(picked)), train_size=len(picked), seed=SAMPLE_SEED)
    _fill(index, store_path, prepare)
    return index, reason


def _sample(n: int, size: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """``size`` distinct rows of ``n``, sorted, the same for the same ``(n, size)``."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _fill(index: Index, store_path: Path, prepare: Callable[[np.ndarray], np.ndarray], start: int = 0) -> None:
    with StoreReader(store_path) as store:
        for _, block in store.blocks(start=start):
            index.add(prepare(block))


def _recall(index: Index, store_path: Path, prepare: Callable[[np.ndarray], np.ndarray], old: Dict[str, Any],
            assembled: Assembled) -> Dict[str, Any]:
    """recall@10 of an approximate index against exact search, on stored rows used as queries (each query's
    own row left out of both rankings); an appended index keeps its figure until it grew by 10%."""
    if index.kind not in ("ivfpq", "hnsw"):
        return {}
    measured_at = old.get("recall_measured_at")
    if assembled.route == "extended" and measured_at and index.ntotal <= measured_at * (1 + REMEASURE_GROWTH):
        return {k: v for k, v in old.items() if k.startswith("recall") or k == "rerank"}
    return measure_recall(index, store_path, prepare)


def measure_recall(index: Index, store_path: Path, prepare: Callable[[np.ndarray], np.ndarray],
                   n_queries: int = RECALL_QUERIES, k: int = 10) -> Dict[str, Any]:
    """``{"recall_at_10", "recall_at_10_rescored" (ivfpq), "recall_queries", "recall_measured_at"}``."""
    from simret.retrieval.exact import exact_search, recall_at

    with StoreReader(store_path) as store:
        n = store.count
        k = min(k, n - 1)
        if k < 1:
            return {}
        rows = _sample(n, min(n_queries, n), seed=SAMPLE_SEED + 1)
        queries = prepare(store.sampled_rows(rows))
        _, truth = exact_search(store.blocks(), queries, k, prepare=prepare, exclude=rows)

        def without_self(found: np.ndarray, own: np.ndarray) -> np.ndarray:
            return np.stack([r[r != q][:k] for r, q in zip(found, own)])

        record = {"recall_queries": int(len(rows)), "recall_measured_at": int(n)}
        found = without_self(index.search(queries, k + 1, rerank=0)[1], rows)
        record["recall_at_10"] = round(recall_at(found, truth, k), 4)
        if index.kind == "ivfpq":  # the shallowest re-scoring depth that reaches the target (searches use it)
            with store.row_access(mapped=False) as access:  # one reader: each chunk's checksum verified once
                for rerank in RERANK_DEPTHS:
                    found = _rescored(index, access, prepare, queries, k + 1, rerank)
                    record["recall_at_10_rescored"] = round(recall_at(without_self(found, rows), truth, k), 4)
                    record["rerank"] = rerank
                    if record["recall_at_10_rescored"] >= RECALL_TARGET:
                        break
    rescored = f", {record['recall_at_10_rescored']:.3f} re-scoring {record['rerank']}·k candidates" \
        if "recall_at_10_rescored" in record else ""
    log.info("recall@%d of the %s index against exact search, %d stored images as queries: %.3f%s", k, index.kind,
             len(rows), record["recall_at_10"], rescored)
    return record


def _rescored(index: Index, access: RowAccess, prepare: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
              k: int, rerank: int) -> np.ndarray:
    """Row ids ``(Q, k)`` of an ivfpq search re-scored with the stored rows, read through ``access`` (a
    ``RowAccess(mapped=False)``: ``pread``, since a memory map would leave every page it touched resident, most
    of a large store), as many queries at a time as keep the rows gathered under ``RESCORE_BYTES``."""
    per_query = k * rerank * access.shape[1] * 4
    batch = max(1, RESCORE_BYTES // per_query)

    def stored(picked: np.ndarray) -> np.ndarray:
        return prepare(access[picked].astype(np.float32, copy=False))

    return np.concatenate([index.search(queries[i:i + batch], k, exact=stored, rerank=rerank)[1]
                           for i in range(0, len(queries), batch)])


def tune_latency(index: Index, store_path: Path, prepare: Callable[[np.ndarray], np.ndarray],
                 max_ms: float, n_queries: int = 200) -> Dict[str, Any]:
    """The largest ``nprobe`` (ivfpq) or ``efSearch`` (hnsw) whose median single-query search time, measured
    on stored rows, stays within ``max_ms``; set on the index and returned as ``{"tuned": {...}}``."""
    import time

    with StoreReader(store_path) as store:
        rows = _sample(store.count, min(n_queries, store.count), seed=SAMPLE_SEED + 2)
        queries = prepare(store.sampled_rows(rows))
    name = "nprobe" if index.kind == "ivfpq" else "efSearch"
    limit = index.params["nlist"] if index.kind == "ivfpq" else 1024
    chosen, median = 1, float("inf")
    for value in sorted({min(limit, 1 << p) for p in range(0, 11)}, reverse=True):
        index.set_search_params(**{name: value})
        times = []
        for query in queries:
            start = time.perf_counter()
            index.search(query[None], 10, rerank=0)
            times.append((time.perf_counter() - start) * 1000)
        median = float(np.median(times))
        chosen = value
        if median <= max_ms:
            break
    index.set_search_params(**{name: chosen})
    if median > max_ms:
        log.warning("--max-latency-ms %g: even %s=%d takes %.2f ms per query here", max_ms, name, chosen, median)
    else:
        log.info("--max-latency-ms %g: %s=%d (%.2f ms per query, median of %d)", max_ms, name, chosen, median,
                 len(queries))
    return {"tuned": {name: chosen, "median_ms": round(median, 3), "max_latency_ms": max_ms}}


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
    if getattr(settings, "train_from", None) or index.get("trained_from"):
        from simret.retrieval.indexdir.layout import current_generation

        origin = index.get("trained_from") or {}
        return bool(settings.train_from) and origin.get("path") == str(Path(settings.train_from).resolve()) \
            and origin.get("generation") == current_generation(settings.train_from)
    same_index = (index.get("requested") == settings.kind
                  and index.get("requested_params", {}) == dict(settings.index_params))
    old = meta.get("whitening", {})
    wanted = _wanted_whitening(settings)
    same_whitening = old.get("kind", "none") == wanted["kind"] and (
        wanted["kind"] == "none" or (old.get("learned_on") == wanted["learned_on"]
                                     and (settings.whiten_dim is None or old.get("out_dim") == settings.whiten_dim)))
    same_budget = (index.get("max_memory") == settings.max_memory
                   and index.get("max_latency_ms") == settings.max_latency_ms)
    return same_index and same_whitening and same_budget and recorded_precision(meta) == settings.precision
