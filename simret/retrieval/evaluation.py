"""Revisited Oxford/Paris evaluation of an encoder: extract (cached), score, re-rank, evaluate.

``evaluate_encoder(encoder, data_root, "roxford5k", settings)`` describes the database images (cached in an
index directory per encoder and setting, so later runs reuse them and interrupted runs resume), the query
images cropped to their boxes, optionally the R1M distractors (cached likewise, scored in chunks straight
from the HDF5 store), and evaluates every configuration asked for — plain, +αQE, +αDBA, +R1M — with
``evaluate_revisited`` (exact revisitop protocol, scores path: nothing sorts the whole collection).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from simret.utils.logs import get_logger

log = get_logger(__name__)

DBA_LIMIT = 200_000  # exact DBA needs an all-pairs search of the collection


@dataclass
class EvalSettings:
    """How descriptors are computed and which configurations are evaluated."""

    scales: Tuple[float, ...] = (1.0,)
    max_size: Optional[int] = 1024
    batch_size: int = 16
    workers: Optional[int] = None
    precision: str = "fp32"  # fp32|bf16|fp16 (resolved; simret.models.precision)
    distractors: Optional[str] = None  # None or "revisitop1m"
    qe: int = 0  # αQE neighbours (0: off)
    dba: int = 0  # αDBA neighbours (0: off)
    alpha: float = 3.0
    whiten_on: Optional[str] = None  # images (folder / list) or a descriptors .h5 to learn PCA whitening on
    cache_dir: Optional[Path] = None
    kappas: Tuple[int, ...] = (1, 5, 10)
    lock_timeout: Optional[float] = None  # seconds to wait for another writer of the cache (None: as long as it takes)


@dataclass
class EvalReport:
    """Results of every configuration (fractions; ``format_revisited_table`` prints percent)."""

    dataset: str
    results: Dict[str, Dict[str, Dict[str, float]]]
    counts: Dict[str, int]
    provenance: Dict[str, Any]
    settings: Dict[str, Any]
    timings: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"dataset": self.dataset, "units": "fraction (x100 for %)", "results": self.results,
                "counts": self.counts, "encoder": self.provenance, "settings": self.settings,
                "timings_s": self.timings}


def default_cache_dir() -> Path:
    from simret.utils.paths import cache_dir

    return cache_dir() / "eval"


def cached_descriptors(encoder: Any, paths: Sequence[Path], cache: Path, settings: EvalSettings, *,
                       what: str, allow_failures: bool) -> Tuple[Any, List[int]]:
    """Describe ``paths`` into the index directory ``cache`` (reused and resumed by later runs; images that
    changed since are described again; damaged files are repaired).

    Returns:
        ``(store, order)``: an open ``StoreReader`` of the cached descriptors (close it when done) whose row
        ``order[i]`` is ``paths[i]`` (failed paths are absent and only allowed with ``allow_failures``).

    Raises:
        ValueError: some images could not be read and ``allow_failures`` is False (they are named).
    """
    from simret.retrieval.indexdir import (
        STORE,
        STORE_ONLY,
        IndexDamagedError,
        IndexSettings,
        build_index,
        current,
        path_key,
        read_meta,
    )
    from simret.retrieval.store import StoreReader
    from simret.utils.atomic import write_text_atomic

    foreign = False
    try:  # something that is no simret index (eval has no --overwrite): replaced; damage is repaired by the build
        read_meta(cache / "index")
    except IndexDamagedError:
        pass
    except ValueError as err:
        log.warning("%s: the cache holds no usable index (%s); describing the images again", what, err)
        foreign = True
    listing = cache / "images.txt"
    resolved = [str(Path(p).resolve()) for p in paths]
    text = "".join(f"{p}\n" for p in resolved)
    if not listing.is_file() or listing.read_text() != text:
        write_text_atomic(listing, text)
    index_settings = IndexSettings(scales=tuple(settings.scales), max_size=settings.max_size, kind=STORE_ONLY,
                                   precision=settings.precision, batch_size=settings.batch_size,
                                   workers=settings.workers, lock_timeout=settings.lock_timeout)
    summary = build_index(listing, cache / "index", encoder, index_settings, overwrite=foreign, progress=True)
    log.info("%s: %s", what, summary.line())
    if summary.failures and not allow_failures:
        shown = "; ".join(f"{i}: {reason}" for i, reason in summary.failures[:5])
        raise ValueError(f"{len(summary.failures)} {what} image(s) could not be read ({shown}); the protocol needs "
                         f"every one of them")
    store = StoreReader(current(cache / "index").file(STORE))  # held open: a later commit changes nothing for it
    position = {path_key(listing.parent, image_id): row for row, image_id in enumerate(store.ids)}
    order = [position.get(p, -1) for p in resolved]
    missing = [str(p) for p, row in zip(paths, order) if row < 0]
    if missing and not allow_failures:
        store.close()
        raise ValueError(f"{len(missing)} {what} image(s) have no descriptor, e.g. {missing[0]}")
    return store, [row for row in order if row >= 0]


def _settings_key(encoder: Any, settings: EvalSettings) -> str:
    precision = {"half": False} if settings.precision == "fp32" else {"half": True, "precision": settings.precision}
    key = json.dumps({"fp": encoder.fingerprint, "scales": list(settings.scales), "max": settings.max_size,
                      **precision}, sort_keys=True)  # fp32 keys are those of caches made before --precision
    return f"{encoder.fingerprint}-{hashlib.blake2b(key.encode(), digest_size=4).hexdigest()}"


def _whiten(vectors: np.ndarray, whitening: Any) -> np.ndarray:
    from simret.retrieval.whitening import l2_normalize

    return vectors if whitening is None else l2_normalize(whitening.apply(vectors))


def _chunked_scores(store: Any, queries: np.ndarray, whitening: Any) -> np.ndarray:
    """``(N, Q)`` similarities of every row of an open store to the queries, read block by block."""
    scores = np.empty((store.count, queries.shape[0]), np.float32)
    for start, block in store.blocks():
        scores[start:start + len(block)] = _whiten(block, whitening) @ queries.T
    return scores


def _store_rows(store: Any, rows: np.ndarray, whitening: Any) -> np.ndarray:
    """Rows of an open store (any order, repeats allowed), whitened if asked."""
    return _whiten(store.rows(np.asarray(rows, dtype=np.int64)), whitening)


@dataclass
class _Described:
    """Everything the scoring needs: whitened database and query descriptors, the distractors' open store."""

    database: np.ndarray  # (n_db, D') whitened
    queries: np.ndarray  # (Q, D') whitened
    whitening: Any
    distractors: Any = None  # an open StoreReader, or None
    distractor_rows: List[int] = field(default_factory=list)
    distractor_name: str = ""


def evaluate_encoder(encoder: Any, data_root: Path, dataset_name: str, settings: EvalSettings) -> EvalReport:
    """Evaluate ``encoder`` on a Revisited dataset; see the module docstring."""
    from simret.data.revisited import load_distractors, load_revisited

    timings: Dict[str, float] = {}
    started = time.monotonic()
    dataset = load_revisited(data_root, dataset_name)
    distractors = load_distractors(data_root, settings.distractors) if settings.distractors else None
    _check_neighbours(dataset, distractors, settings)
    cache_root = Path(settings.cache_dir or default_cache_dir()).expanduser()
    with contextlib.ExitStack() as stack:
        described = _describe(encoder, dataset, distractors, settings, cache_root, stack, timings)
        mark = time.monotonic()
        results = _score_configurations(dataset, described, settings)
        timings["evaluate"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    counts = {"database": len(dataset.imlist), "queries": len(dataset.qimlist),
              "distractors": len(described.distractor_rows)}
    settings_record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
    settings_record["cache_dir"] = str(cache_root)
    return EvalReport(dataset.name, results, counts, encoder.provenance(), settings_record, timings)


def _check_neighbours(dataset: Any, distractors: Any, settings: EvalSettings) -> None:
    n_db, n_dis = len(dataset.imlist), len(distractors.ids) if distractors is not None else 0
    if settings.qe > n_db:
        raise ValueError(f"--qe {settings.qe} asks for more neighbours than the {n_db} images of {dataset.name}")
    if settings.dba >= n_db + n_dis > 0:
        raise ValueError(f"--dba {settings.dba} asks for more neighbours than the {n_db + n_dis - 1} other images "
                         f"of {dataset.name}" + (" and its distractors" if n_dis else ""))
    if settings.dba and n_db + n_dis > DBA_LIMIT:
        raise ValueError(f"--dba needs an exact all-pairs search over {n_db + n_dis:,} descriptors; it is supported "
                         f"up to {DBA_LIMIT:,} (use --qe with distractors)")


def _describe(encoder: Any, dataset: Any, distractors: Any, settings: EvalSettings, cache_root: Path,
              stack: contextlib.ExitStack, timings: Dict[str, float]) -> _Described:
    """Database (cached), whitening, queries (cropped to their boxes) and distractors (cached)."""
    from simret.retrieval.extraction import extract
    from simret.retrieval.whitening import learn_whitening_on

    key = _settings_key(encoder, settings)
    mark = time.monotonic()
    db_store, db_rows = cached_descriptors(
        encoder, [dataset.image_path(i) for i in range(len(dataset.imlist))], cache_root / dataset.name / key,
        settings, what=f"{dataset.name} database", allow_failures=False)
    stack.callback(db_store.close)
    timings["database"] = time.monotonic() - mark
    whitening = learn_whitening_on(settings.whiten_on, encoder, scales=settings.scales, max_size=settings.max_size,
                                   batch_size=settings.batch_size, workers=settings.workers,
                                   precision=settings.precision) if settings.whiten_on else None
    database = _whiten(db_store.rows(db_rows), whitening)
    mark = time.monotonic()
    query_result = extract(encoder, dataset.image_dir, dataset.query_ids, boxes=dataset.query_boxes,
                           scales=settings.scales, max_size=settings.max_size, batch_size=settings.batch_size,
                           workers=0, precision=settings.precision)
    if query_result.failures:
        shown = "; ".join(f"{i}: {r}" for i, r in query_result.failures[:5])
        raise ValueError(f"{len(query_result.failures)} query image(s) could not be used: {shown}")
    described = _Described(database, _whiten(query_result.descriptors, whitening), whitening)
    timings["queries"] = time.monotonic() - mark
    if distractors is not None:
        mark = time.monotonic()
        n_dis = len(distractors.ids)
        described.distractors, described.distractor_rows = cached_descriptors(
            encoder, [distractors.image_path(i) for i in range(n_dis)], cache_root / distractors.name / key, settings,
            what=f"{distractors.name} distractor", allow_failures=True)
        stack.callback(described.distractors.close)
        described.distractor_name = distractors.name
        timings["distractors"] = time.monotonic() - mark
        if len(described.distractor_rows) < n_dis:
            log.warning("%d of %d distractors could not be read and are left out",
                        n_dis - len(described.distractor_rows), n_dis)
    return described


def _score_configurations(dataset: Any, described: _Described, settings: EvalSettings
                          ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Every configuration asked for: plain (+R1M), then with αDBA; each also with αQE."""
    from simret.retrieval.metrics import evaluate_revisited
    from simret.retrieval.rerank import alpha_qe, dba

    n_db, queries, whitening = len(dataset.imlist), described.queries, described.whitening
    dis_store, dis_rows = described.distractors, described.distractor_rows
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    configurations: List[Tuple[str, bool]] = [(dataset.name, False)]
    if dis_store is not None:
        configurations.append((f"{dataset.name}+{_short(described.distractor_name)}", True))
    for name, with_distractors in configurations:
        for augment in (False, True) if settings.dba else (False,):  # plain first, then with αDBA
            db_vectors, dis_vectors = described.database, None
            if augment and with_distractors:
                everything = np.concatenate([db_vectors, _store_rows(dis_store, np.asarray(dis_rows), whitening)])
                augmented = dba(everything, settings.dba, settings.alpha)
                db_vectors, dis_vectors = augmented[:n_db], augmented[n_db:]
            elif augment:
                db_vectors = dba(db_vectors, settings.dba, settings.alpha)
            dis_source = dis_store if with_distractors else None
            scores = _scores(db_vectors, queries, dis_source, dis_rows, whitening, dis_vectors)
            base = name + (f"+αDBA{settings.dba}" if augment else "")
            results[base] = _round(evaluate_revisited(scores, dataset.gnd, settings.kappas))
            if settings.qe:
                top = np.argpartition(-scores, settings.qe - 1, axis=0)[:settings.qe]  # (n, Q), unordered
                neighbours = _gather(top, db_vectors, dis_source, dis_rows, whitening, dis_vectors)
                local = np.arange(top.size).reshape(queries.shape[0], settings.qe)  # rows of `neighbours`
                expanded = alpha_qe(queries, neighbours, local, settings.qe, settings.alpha, layout="I")
                scores = _scores(db_vectors, expanded, dis_source, dis_rows, whitening, dis_vectors)
                results[f"{base}+αQE{settings.qe}"] = _round(evaluate_revisited(scores, dataset.gnd, settings.kappas))
    return results


def _short(name: str) -> str:
    return "R1M" if name == "revisitop1m" else name


def _round(result: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    return {setup: {metric: float(value) for metric, value in values.items()} for setup, values in result.items()}


def _scores(database: np.ndarray, queries: np.ndarray, dis_store: Any, dis_rows: Sequence[int],
            whitening: Any, dis_vectors: Optional[np.ndarray]) -> np.ndarray:
    """``(n_db [+ n_distractors], Q)`` similarities: database rows first, then distractors."""
    scores = database @ queries.T
    if dis_store is None:
        return scores.astype(np.float32, copy=False)
    if dis_vectors is not None:
        distractor_scores = dis_vectors @ queries.T
    else:
        distractor_scores = _chunked_scores(dis_store, queries, whitening)
        if len(dis_rows) != distractor_scores.shape[0]:
            distractor_scores = distractor_scores[np.asarray(dis_rows, dtype=np.int64)]
    return np.concatenate([scores, distractor_scores]).astype(np.float32, copy=False)


def _gather(top: np.ndarray, database: np.ndarray, dis_store: Any, dis_rows: Sequence[int],
            whitening: Any, dis_vectors: Optional[np.ndarray]) -> np.ndarray:
    """Descriptors of the neighbours ``top (n, Q)`` (collection indices), as ``(Q·n, D)`` query-major rows."""
    flat = top.T.reshape(-1)
    n_db = database.shape[0]
    out = np.empty((flat.size, database.shape[1]), np.float32)
    in_db = flat < n_db
    out[in_db] = database[flat[in_db]]
    if (~in_db).any():
        positions = flat[~in_db] - n_db
        if dis_vectors is not None:
            out[~in_db] = dis_vectors[positions]
        else:
            out[~in_db] = _store_rows(dis_store, np.asarray(dis_rows, dtype=np.int64)[positions], whitening)
    return out
