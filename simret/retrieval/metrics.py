"""Revisited Oxford/Paris metrics: mAP and mP@k exactly as the revisitop protocol computes them.

The protocol (Radenović et al., *Revisiting Oxford and Paris*, CVPR 2018; revisitop ``evaluate.py``),
for each query with ground truth ``ok`` (positives) and ``junk`` (ignored images):

1. ``pos``: the 0-based positions in the query's ranking of every database image listed in ``ok``.
   A ranking that repeats an image counts each occurrence; an image that is not ranked at all (a
   truncated ranking, or an index past the database) never appears but still counts in ``len(ok)``.
2. junk removal: each position is lowered by the number of ``junk`` images ranked *strictly* before it
   (an image listed both as ``ok`` and ``junk`` stays a positive and shifts the positives after it).
3. AP: trapezoids over the precision-recall curve,
   ``AP = Σ_j ((j / r_j if r_j > 0 else 1) + (j + 1) / (r_j + 1)) / 2 / len(ok)``
   for the positives in ranked order (``j`` = 0, 1, …), ``r_j`` their junk-free 0-based positions.
4. mP@k: with 1-based positions ``p``, ``k_q = min(max(p), k)`` and ``P@k = #{p ≤ k_q} / k_q`` (a query
   whose positives all sit above rank k is not charged for the ranks it cannot fill).
5. a query with an empty ``ok`` gets NaN AP and NaN P@k and is left out of the means; when every query is
   empty, the means are NaN (revisitop divides by zero).

One case where revisitop has no answer: a query with positives of which none is ranked (only possible
with a truncated ranking) — revisitop's mP@k fails on ``max([])``; here its AP and P@k are 0.

**Units**: every value returned by this module is a *fraction* in [0, 1], as revisitop returns it;
multiply by 100 for the customary tables (``format_revisited_table`` prints percentages).

**Speed**: nothing here loops over the database in Python. ``compute_map`` finds the positives and junk
of all queries with one lookup of every rank in a table of the listed images; ``compute_map_from_scores``
never sorts the database: each listed image's rank is the number of images scoring higher, plus the
equal-scoring images with a lower index (exactly the order of a *stable* ``argsort(-scores, axis=0)``),
counted with a per-query histogram of score cells and an exact comparison inside the few cells that hold
listed images. Both work through the database in blocks, so memory stays bounded at 1M images x 70
queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)
BLOCK_ELEMENTS = 1 << 18  # ranks/scores elements handled at a time (cache-sized; bounds temporary memory)
SCORE_CELLS = 8190  # scores path: equal-width cells spanning each query's listed scores (+ margin, below, above)
QUERY_CHUNK = 256  # queries per pass of the scores path (bounds the per-query cell tables)
MEMBER_TABLE_LIMIT = 1 << 26  # ranks path: (query, listed image) table up to this size, else binary search

MapResult = Tuple[float, np.ndarray, np.ndarray, np.ndarray]
GroundTruth = Sequence[Mapping[str, Any]]


# ------------------------------------------------------------------------------------------ public API


def compute_map(ranks: Any, gnd: GroundTruth, kappas: Sequence[int] = ()) -> MapResult:
    """mAP, per-query AP, mP@k and per-query P@k of rankings, with revisitop's exact semantics.

    Args:
        ranks: ``(n_ranked, n_queries)`` integer array; column ``q`` lists database indices for query
            ``q``, best first (``n_ranked`` may be smaller than the database: unranked positives count as
            misses). Values outside the listed images (e.g. FAISS's ``-1`` padding) match nothing.
        gnd: one mapping per query with ``"ok"`` (positive database indices) and optionally ``"junk"``.
        kappas: the k of mP@k (positive integers).

    Returns:
        ``(map, aps, pr, prs)``: ``map`` float, ``aps`` ``(n_queries,)``, ``pr`` ``(len(kappas),)``,
        ``prs`` ``(n_queries, len(kappas))``, all fractions; queries without positives are NaN in ``aps``
        and ``prs`` and left out of ``map`` and ``pr``.
    """
    ranks = _check_ranks(ranks, len(gnd))
    kappas = _check_kappas(kappas)
    ok = _index_lists(gnd, "ok", required=True)
    junk = _index_lists(gnd, "junk", required=False)
    hits = _locate_in_ranks(ranks, [np.concatenate([o, j]) for o, j in zip(ok, junk)])
    return _map_from_hits(hits, ok, junk, kappas)


def compute_map_from_scores(scores: Any, gnd: GroundTruth, kappas: Sequence[int] = ()) -> MapResult:
    """``compute_map`` of the rankings that ``scores`` imply, without sorting the database.

    Args:
        scores: ``(n_db, n_queries)`` float array (float16/32/64), higher = more similar, e.g.
            ``X.T @ Q`` for descriptors ``X (D, n_db)`` and queries ``Q (D, n_queries)``.
        gnd, kappas: as for ``compute_map``.

    Returns exactly ``compute_map(np.argsort(-scores, axis=0, kind="stable"), gnd, kappas)``: ties are
    broken by the lower database index first, and NaN scores rank last. (With the default, unstable
    ``argsort`` the two agree whenever no positive or junk image ties with another image.)
    """
    scores = _check_scores(scores, len(gnd))
    kappas = _check_kappas(kappas)
    ok = _index_lists(gnd, "ok", required=True)
    junk = _index_lists(gnd, "junk", required=False)
    hits = _locate_in_scores(scores, [np.concatenate([o, j]) for o, j in zip(ok, junk)], anchors=ok)
    return _map_from_hits(hits, ok, junk, kappas)


def revisited_protocols(gnd: GroundTruth) -> Dict[str, List[Dict[str, np.ndarray]]]:
    """The three Revisited setups as ``compute_map`` ground truth, from ``easy``/``hard``/``junk`` lists.

    ``easy``: ok = easy, junk = junk + hard; ``medium``: ok = easy + hard, junk = junk;
    ``hard``: ok = hard, junk = junk + easy (as revisitop's ``example_evaluate.py``).
    """
    easy, hard, junk = _revisited_lists(gnd)
    return {
        "easy": [{"ok": e, "junk": np.concatenate([j, h])} for e, h, j in zip(easy, hard, junk)],
        "medium": [{"ok": np.concatenate([e, h]), "junk": j} for e, h, j in zip(easy, hard, junk)],
        "hard": [{"ok": h, "junk": np.concatenate([j, e])} for e, h, j in zip(easy, hard, junk)],
    }


def evaluate_revisited(ranks_or_scores: Any, gnd: GroundTruth, kappas: Sequence[int] = DEFAULT_KAPPAS, *,
                       kind: str = "auto", per_query: bool = False) -> Dict[str, Dict[str, Any]]:
    """Revisited Oxford/Paris evaluation: mAP and mP@k for the Easy, Medium and Hard setups.

    Args:
        ranks_or_scores: ``(n_db, n_queries)`` rankings (integer database indices, best first) or
            similarity scores (floats, higher is better).
        gnd: one mapping per query with ``"easy"``, ``"hard"`` and ``"junk"`` database indices (the
            ``gnd`` of a Revisited ground-truth file; ``"junk"`` may be absent).
        kappas: the k of mP@k.
        kind: ``"ranks"``, ``"scores"``, or ``"auto"``: an integer array is ranks, a float array scores.
        per_query: also return each query's AP (``"aps"``, ``(n_queries,)`` array) and P@k (``"prs"``,
            ``(n_queries, len(kappas))``), NaN for queries without positives in that setup.

    Returns:
        ``{"easy": {"map": …, "mp@1": …, "mp@5": …, "mp@10": …}, "medium": {…}, "hard": {…}}``,
        fractions in [0, 1] (× 100 for the usual tables). The positions of the listed images are found
        once and shared by the three setups; each equals ``compute_map`` on ``revisited_protocols(gnd)``.
    """
    array = np.asarray(ranks_or_scores)
    if kind == "auto":
        if np.issubdtype(array.dtype, np.integer):
            kind = "ranks"
        elif np.issubdtype(array.dtype, np.floating):
            kind = "scores"
        else:
            raise ValueError(f"cannot tell ranks from scores for an array of {array.dtype}: pass integer "
                             "ranks or float scores, or kind='ranks'|'scores'")
    if kind not in ("ranks", "scores"):
        raise ValueError(f"kind must be 'auto', 'ranks' or 'scores', not {kind!r}")
    kappas = _check_kappas(kappas)
    easy, hard, junk = _revisited_lists(gnd)
    listed = [np.concatenate(parts) for parts in zip(easy, hard, junk)]
    if kind == "ranks":
        hits = _locate_in_ranks(_check_ranks(array, len(gnd)), listed)
    else:
        positives = [np.concatenate([e, h]) for e, h in zip(easy, hard)]
        hits = _locate_in_scores(_check_scores(array, len(gnd)), listed, anchors=positives)
    setups = {
        "easy": (easy, [np.concatenate([j, h]) for h, j in zip(hard, junk)]),
        "medium": ([np.concatenate([e, h]) for e, h in zip(easy, hard)], junk),
        "hard": (hard, [np.concatenate([j, e]) for e, j in zip(easy, junk)]),
    }
    results: Dict[str, Dict[str, Any]] = {}
    for name, (ok, ignored) in setups.items():
        mean_ap, aps, pr, prs = _map_from_hits(hits, ok, ignored, kappas)
        entry: Dict[str, Any] = {"map": mean_ap}
        entry.update({f"mp@{k}": float(pr[i]) for i, k in enumerate(kappas)})
        if per_query:
            entry["aps"] = aps
            entry["prs"] = prs
        results[name] = entry
    return results


def format_revisited_table(results: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """The customary table of an ``evaluate_revisited`` result, in percent::

        roxford5k          E        M        H
        mAP            85.31    67.24    44.10
        mP@1           97.14    95.71    82.86
        …
    """
    columns = [name for name in PROTOCOLS if name in results]
    metrics = ["map"] + [key for key in results[columns[0]] if key.startswith("mp@")] if columns else []
    width = max(10, len(title) + 1)
    lines = [f"{title:<{width}}" + "".join(f"{name[0].upper():>9}" for name in columns)]
    for metric in metrics:
        label = "mAP" if metric == "map" else "mP@" + metric[3:]
        cells = "".join(f"{100 * float(results[name][metric]):>9.2f}" for name in columns)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ input checking


def _check_kappas(kappas: Sequence[int]) -> Tuple[int, ...]:
    values = tuple(kappas) if kappas is not None else ()
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"kappas must be positive integers, got {list(values)}")
    return tuple(int(k) for k in values)


def _check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a 2-D (n_db, n_queries) array, got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, not {ranks.dtype} "
                         "(similarity scores go to compute_map_from_scores)")
    if ranks.shape[1] != n_queries:
        hint = " (did you pass the (n_queries, k) FAISS layout? use ranks.T)" if ranks.shape[0] == n_queries else ""
        raise ValueError(f"ranks has shape {ranks.shape} but gnd has {n_queries} queries; expected "
                         f"(n_db, {n_queries}){hint}")
    if ranks.dtype == np.uint64:  # np.take wants intp; values ≥ 2**63 wrap negative and match nothing
        ranks = ranks.astype(np.int64)
    return ranks


def _check_scores(scores: Any, n_queries: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_db, n_queries) array, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be floats (higher = more similar), not {scores.dtype} "
                         "(integer rankings go to compute_map)")
    if scores.shape[1] != n_queries:
        hint = " (did you pass (n_queries, n_db)? use scores.T)" if scores.shape[0] == n_queries else ""
        raise ValueError(f"scores has shape {scores.shape} but gnd has {n_queries} queries; expected "
                         f"(n_db, {n_queries}){hint}")
    if scores.dtype not in (np.float16, np.float32, np.float64):
        scores = scores.astype(np.float64)
    return scores


def _index_array(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value if value is not None else [])
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D list of database indices, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(array.dtype, np.integer):
        result = array.astype(np.int64)
    elif np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        result = array.astype(np.int64)  # indices stored as floats (e.g. from MATLAB files)
    else:
        raise ValueError(f"{what} must hold integer database indices, got {array.dtype}")
    if result.min() < 0:
        raise ValueError(f"{what} holds a negative database index ({int(result.min())})")
    return result


def _index_lists(gnd: GroundTruth, key: str, *, required: bool) -> List[np.ndarray]:
    lists = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise ValueError(f"gnd[{i}] must be a dict of index lists, not {type(entry).__name__}")
        if key not in entry:
            if required:
                raise ValueError(f"gnd[{i}] has no {key!r} list (keys: {', '.join(map(str, entry)) or 'none'})")
            lists.append(np.zeros(0, dtype=np.int64))
            continue
        lists.append(_index_array(entry[key], f"gnd[{i}][{key!r}]"))
    return lists


def _revisited_lists(gnd: GroundTruth) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
    return (_index_lists(gnd, "easy", required=True), _index_lists(gnd, "hard", required=True),
            _index_lists(gnd, "junk", required=False))


# ------------------------------------------------------------------------------- (query, item) sets


def _pair_keys(lists: Sequence[np.ndarray], stride: int) -> np.ndarray:
    """Sorted unique ``query * stride + item`` keys of per-query index lists."""
    sizes = np.fromiter((a.size for a in lists), dtype=np.int64, count=len(lists))
    if sizes.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    queries = np.repeat(np.arange(len(lists), dtype=np.int64), sizes)
    return np.unique(queries * stride + np.concatenate(lists))


def _contains(keys: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """``probes ∈ keys`` elementwise, for sorted ``keys``."""
    if keys.size == 0:
        return np.zeros(probes.shape, dtype=bool)
    index = np.minimum(np.searchsorted(keys, probes), keys.size - 1)
    return keys[index] == probes


def _stride(lists: Sequence[np.ndarray]) -> int:
    return max((int(a.max()) for a in lists if a.size), default=-1) + 1


@dataclass
class _Hits:
    """Where listed images sit in each query's ranking; sorted by (query, position).

    query, position (0-based rank), item (database index): ``(H,)`` int64 each.
    """

    query: np.ndarray
    position: np.ndarray
    item: np.ndarray

    @classmethod
    def build(cls, query: np.ndarray, position: np.ndarray, item: np.ndarray) -> _Hits:
        order = np.lexsort((position, query))
        return cls(query[order].astype(np.int64), position[order].astype(np.int64), item[order].astype(np.int64))


_NO_HITS = np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------ block helpers


def _gather(block: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``block.reshape(-1)[index]`` without copying a non-contiguous block first."""
    if block.flags.c_contiguous:
        return block.reshape(-1)[index]
    return block[np.divmod(index, block.shape[1])]


def _query_major(array: np.ndarray) -> bool:
    """True for a Fortran-ordered ``(rows, queries)`` array (e.g. FAISS's ``I.T``): walk it by query."""
    return array.flags.f_contiguous and not array.flags.c_contiguous


# ------------------------------------------------------------------------------------------ ranks path


def _locate_in_ranks(ranks: np.ndarray, lists: Sequence[np.ndarray]) -> _Hits:
    """Every position of ``ranks[:, q]`` whose image is in ``lists[q]`` (as ``np.isin`` would find them).

    One pass over the ranks flags the positions that may hold a listed image: ``rank < max listed + 1``
    (one SIMD comparison) when the listed images fill most of that range, as the Revisited images do
    before the distractors; otherwise a lookup in a boolean table of every listed image (small enough to
    stay in cache). Only the flagged positions are then checked against their own query's list.
    """
    n_ranked, n_queries = ranks.shape
    stride = _stride(lists)
    if stride == 0 or n_ranked == 0:
        return _Hits(_NO_HITS, _NO_HITS, _NO_HITS)
    union = np.unique(np.concatenate(lists))
    by_range = (stride - union.size) * 16 <= n_ranked  # few unlisted images below the largest listed one
    listed = np.zeros(stride + 1, dtype=bool)  # listed[stride] stays False: larger ranks clip onto it
    listed[union] = True
    sizes = np.fromiter((a.size for a in lists), dtype=np.int64, count=n_queries)
    pair_query, pair_item = np.repeat(np.arange(n_queries, dtype=np.int64), sizes), np.concatenate(lists)
    if n_queries * (union.size + 1) <= MEMBER_TABLE_LIMIT:  # (query, image) → listed for that query?
        width_u = union.size + 1
        compact = np.full(stride + 1, union.size, dtype=np.int64)  # unlisted → a column that is all False
        compact[union] = np.arange(union.size)
        member = np.zeros(n_queries * width_u, dtype=bool)
        member[pair_query * width_u + compact[pair_item]] = True

        def belongs(query: np.ndarray, value: np.ndarray) -> np.ndarray:
            return member[query * width_u + compact[value]]
    else:
        keys = np.unique(pair_query * stride + pair_item)

        def belongs(query: np.ndarray, value: np.ndarray) -> np.ndarray:
            return _contains(keys, query * stride + value)

    query_major = _query_major(ranks)
    work = ranks.T if query_major else ranks  # blocks of whole rows of work, in memory order
    width = work.shape[1]
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    queries, positions, items = [], [], []
    for start in range(0, work.shape[0], step):
        block = work[start:start + step]
        flags = np.less(block, stride) if by_range else np.take(listed, block, mode="clip")
        index = np.flatnonzero(flags)  # negative ranks are flagged too (clipped onto 0 by take) …
        values = _gather(block, index).astype(np.int64)
        valid = values >= 0  # … and dropped here
        query = index // width + start if query_major else index % width
        match = np.flatnonzero(valid & belongs(query, np.where(valid, values, 0)))
        index = index[match]
        queries.append(query[match])
        positions.append(index % width if query_major else index // width + start)
        items.append(values[match])
    return _Hits.build(np.concatenate(queries), np.concatenate(positions), np.concatenate(items))


# ----------------------------------------------------------------------------------------- scores path


def _locate_in_scores(scores: np.ndarray, lists: Sequence[np.ndarray],
                      anchors: Optional[Sequence[np.ndarray]] = None) -> _Hits:
    """Ranks, in a stable descending sort of each column of ``scores``, of the images in ``lists``.

    rank(i, q) = #{j : s[j,q] > s[i,q]} + #{j < i : s[j,q] == s[i,q]}, NaN scores last (after -inf),
    i.e. ``argsort(-scores[:, q], kind="stable")``. ``anchors[q]`` (the positives) are always placed;
    other listed images scoring below every anchor of their query are left out, as they follow all of
    them (junk there cannot shift a positive). Images past the database are never ranked.
    """
    n_db, n_queries = scores.shape
    stride = _stride(lists)
    keys = _pair_keys(lists, stride) if stride else _NO_HITS
    query, item = keys // max(stride, 1), keys % max(stride, 1)
    inside = item < n_db
    query, item, keys = query[inside], item[inside], keys[inside]
    value = scores[item, query].astype(np.float64)  # exact for every float width
    if anchors is not None:
        is_anchor = _contains(_pair_keys(anchors, stride), keys) if stride else np.zeros(0, dtype=bool)
        floor = np.full(n_queries, np.inf)  # lowest anchor score; NaN when an anchor scores NaN
        with np.errstate(invalid="ignore"):  # NaN propagates on purpose
            np.minimum.at(floor, query[is_anchor], value[is_anchor])
        below = (value < floor[query]) | (np.isnan(value) & ~np.isnan(floor[query]))
        keep = is_anchor | ~below
        query, item, value = query[keep], item[keep], value[keep]
    rank = np.empty(query.size, dtype=np.int64)
    nan_query = np.zeros(n_queries, dtype=bool)
    nan_query[query[np.isnan(value)]] = True
    for q in np.flatnonzero(nan_query):  # a listed image scores NaN: rare, rank that column by sorting
        order = np.argsort(-scores[:, q], kind="stable")
        inverse = np.empty(n_db, dtype=np.int64)
        inverse[order] = np.arange(n_db)
        mine = query == q
        rank[mine] = inverse[item[mine]]
    regular = ~nan_query[query]
    rank[regular] = _ranks_by_cells(scores, query[regular], item[regular], value[regular])
    return _Hits.build(query, rank, item)


def _ranks_by_cells(scores: np.ndarray, query: np.ndarray, item: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Stable descending ranks of ``scores[item, query]`` (no NaN among them), without sorting a column.

    Every score of query q goes to a cell ``trunc(s * scale_q - shift_q)`` clipped to q's range of cells
    (NaN to its bottom cell). Each step is monotone under any rounding, so an image in a higher cell
    always scores higher, and listed and database scores go through the very same arithmetic. A listed
    image's rank is then the number of images of its query in higher cells (a histogram) plus the number
    in its own cell that score higher or tie with a lower index (compared exactly; only the cells that
    hold listed images are collected). The cells spread query q's listed scores evenly.
    """
    n_db, n_queries = scores.shape
    rank = np.empty(query.size, dtype=np.int64)
    if query.size == 0:
        return rank
    work_dtype = np.float64 if scores.dtype == np.float64 else np.float32
    # per query: cell 0 below the lowest listed score (and NaN), the listed scores over cells 2 … G + 2 (one
    # cell of margin on each side absorbs float rounding), cell G + 3 clipped above
    cells = SCORE_CELLS + 4
    finite = np.isfinite(value)
    lo = np.full(n_queries, np.inf)
    hi = np.full(n_queries, -np.inf)
    np.minimum.at(lo, query[finite], value[finite])
    np.maximum.at(hi, query[finite], value[finite])
    lo[~np.isfinite(lo)] = 0.0
    hi = np.maximum(hi, lo)
    info = np.finfo(work_dtype)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        span = hi - lo
        tight = 1.0 / np.maximum(np.abs(lo) * 2.0 ** -20, float(info.tiny))  # a single listed score
        scale = np.where((span > 0) & np.isfinite(span), SCORE_CELLS / span, tight)
    scale = np.clip(scale, float(info.tiny), float(info.max))
    query_major = _query_major(scores)
    for c0 in range(0, n_queries, QUERY_CHUNK):  # contiguous ranges of queries
        c1 = min(c0 + QUERY_CHUNK, n_queries)
        mine = np.flatnonzero((query >= c0) & (query < c1))
        if mine.size == 0:
            continue
        n_chunk = c1 - c0
        # query j of the chunk owns flat cells j * cells … j * cells + G + 3; s * scale - shift maps lo to
        # j * cells + 2. (Offsets inside the float map save a pass; with scores far from 0 relative to their
        # spread this coarsens the cells — more candidates, never a wrong rank.)
        base = np.arange(n_chunk, dtype=np.float64) * cells
        scale_w = scale[c0:c1].astype(work_dtype)
        shift_w = (lo[c0:c1] * scale_w.astype(np.float64) - base - 2.0).astype(work_dtype)
        floor_w, ceil_w = base.astype(work_dtype), (base + cells - 1).astype(work_dtype)
        cell_map = (scale_w, shift_w, floor_w, ceil_w)

        mine_local = query[mine] - c0
        listed_flat = _flat_cells(value[mine].astype(work_dtype), cell_map, mine_local)  # same IEEE operations
        candidate_cell = np.zeros(n_chunk * cells, dtype=bool)
        candidate_cell[listed_flat] = True
        counts = np.zeros(n_chunk * cells, dtype=np.int64)
        j_block = np.arange(n_chunk)[:, None] if query_major else np.arange(n_chunk)
        step = max(8, BLOCK_ELEMENTS // n_chunk)
        rows, cand_local, cand_flat, cand_score = [], [], [], []
        for start in range(0, n_db, step):  # blocks of database rows
            block = scores.T[c0:c1, start:start + step] if query_major else scores[start:start + step, c0:c1]
            flat = _flat_cells(block, cell_map, j_block)
            np.add.at(counts, flat.reshape(-1), 1)  # histogram in place (no per-block table)
            index = np.flatnonzero(np.take(candidate_cell, flat))
            first, second = np.divmod(index, block.shape[1])
            rows.append(second + start if query_major else first + start)
            cand_local.append(first if query_major else second)
            cand_flat.append(flat.reshape(-1)[index])
            cand_score.append(_gather(block, index).astype(np.float64))
        # images of each query in cells above a given cell: suffix sums of its histogram
        per_query = counts.reshape(n_chunk, cells)
        above = (np.cumsum(per_query[:, ::-1], axis=1)[:, ::-1] - per_query).ravel()
        candidates = (np.concatenate(rows), np.concatenate(cand_local), np.concatenate(cand_flat),
                      np.concatenate(cand_score))
        listed = (mine_local, item[mine], value[mine], listed_flat)
        rank[mine] = above[listed_flat] + _rank_in_cell(candidates, listed, n_db, n_chunk * cells)
    return rank


def _flat_cells(values: np.ndarray, cell_map: Tuple[np.ndarray, ...], j: Any) -> np.ndarray:
    """Flat cell of each score: ``trunc(clip(s * scale_j - shift_j, floor_j, ceil_j))``, int64.

    ``cell_map`` holds per-query ``(scale, shift, floor, ceil)`` in the working float dtype; ``j`` picks
    (broadcasts) each value's query. Every step is monotone in ``s``; NaN goes to ``floor``.
    """
    scale, shift, floor, ceil = cell_map
    with np.errstate(over="ignore"):  # huge scores overflow to inf: clipped to the top cell below
        x = np.multiply(values, scale[j], dtype=scale.dtype)
        x -= shift[j]
    np.fmax(x, floor[j], out=x)  # fmax ignores NaN: NaN → the bottom cell, as argsort puts NaN last
    np.fmin(x, ceil[j], out=x)
    return x.astype(np.int64)  # truncation is monotone too


def _rank_in_cell(candidates: Tuple[np.ndarray, ...], listed: Tuple[np.ndarray, ...], n_db: int,
                  n_cells: int) -> np.ndarray:
    """For each listed image, the images of its cell ranked before it (higher score, or tie + lower index).

    candidates: ``(row, query, flat cell, score)`` of every image in a cell that holds a listed image,
    in increasing row order per query; listed: ``(query, item, score, flat cell)``. A cell with one
    listed image compares its candidates with it directly; cells shared by several (ties) are sorted.
    """
    row, local, flat, score = candidates
    listed_local, item, value, listed_flat = listed
    in_cell = np.bincount(listed_flat, minlength=n_cells)
    owner_of_cell = np.zeros(n_cells, dtype=np.int64)
    owner_of_cell[listed_flat] = np.arange(item.size)  # the listed image of a cell that has one
    shared = in_cell[flat] > 1
    result = np.zeros(item.size, dtype=np.int64)
    alone = slice(None) if not shared.any() else np.flatnonzero(~shared)
    owner = owner_of_cell[flat[alone]]
    s, v = score[alone], value[owner]
    before = (s > v) | ((s == v) & (row[alone] < item[owner]))
    result += np.bincount(owner[before], minlength=item.size)
    if isinstance(alone, np.ndarray):
        mine, theirs = np.flatnonzero(shared), np.flatnonzero(in_cell[listed_flat] > 1)
        result[theirs] = _rank_in_cell_sorted((row[mine], local[mine], flat[mine], score[mine]),
                                              (listed_local[theirs], item[theirs]), n_db)
    return result


def _rank_in_cell_sorted(candidates: Tuple[np.ndarray, ...], listed: Tuple[np.ndarray, ...], n_db: int) -> np.ndarray:
    """``_rank_in_cell`` by sorting the candidates by (cell, -score, row)."""
    row, local, flat, score = candidates
    listed_local, item = listed
    # rows increase per query among the candidates, so a stable sort by (cell, -score) breaks ties by row
    order = np.lexsort((-score, flat))
    sorted_flat = flat[order]
    within = np.arange(order.size) - np.searchsorted(sorted_flat, sorted_flat, side="left")
    key = (local * n_db + row)[order]
    by_key = np.argsort(key)
    wanted = listed_local * n_db + item
    found = by_key[np.minimum(np.searchsorted(key, wanted, sorter=by_key), key.size - 1)]
    if not np.array_equal(key[found], wanted):  # pragma: no cover - the cells are consistent by construction
        raise RuntimeError("internal error: a listed image was not found in its own score cell")
    return within[found]


# ------------------------------------------------------------------------------------- AP and mP@k


def _map_from_hits(hits: _Hits, ok: Sequence[np.ndarray], junk: Sequence[np.ndarray],
                   kappas: Tuple[int, ...]) -> MapResult:
    """revisitop's compute_map from the located images, for one ok/junk split of them."""
    n_queries = len(ok)
    stride = max(_stride(ok), _stride(junk), int(hits.item.max()) + 1 if hits.item.size else 0, 1)
    probe = hits.query * stride + hits.item
    is_ok = _contains(_pair_keys(ok, stride), probe)
    is_junk = _contains(_pair_keys(junk, stride), probe)
    n_positive = np.fromiter((a.size for a in ok), dtype=np.int64, count=n_queries)
    keep = is_ok | is_junk
    query, position, is_ok, is_junk = hits.query[keep], hits.position[keep], is_ok[keep], is_junk[keep]
    first = np.searchsorted(query, np.arange(n_queries))  # each query's first hit
    junk_seen = np.concatenate([[0], np.cumsum(is_junk)])  # junk among hits[:i]
    ok_seen = np.concatenate([[0], np.cumsum(is_ok)])
    index = np.flatnonzero(is_ok)
    pq = query[index]
    # positions without the junk ranked strictly before, and each positive's order j within its query
    rank = position[index] - (junk_seen[index] - junk_seen[first[pq]])
    j = (ok_seen[index] - ok_seen[first[pq]]).astype(np.float64)
    precision_0 = np.where(rank == 0, 1.0, j / np.maximum(rank, 1))
    precision_1 = (j + 1) / (rank + 1)
    recall_step = 1.0 / np.maximum(n_positive[pq], 1)
    trapezoids = (precision_0 + precision_1) * recall_step / 2.0
    aps = np.bincount(pq, weights=trapezoids, minlength=n_queries).astype(np.float64)  # summed in ranked order
    prs = np.zeros((n_queries, len(kappas)))
    if kappas:
        last = np.zeros(n_queries, dtype=np.int64)  # 1-based junk-free position of the last positive
        np.maximum.at(last, pq, rank + 1)
        for column, k in enumerate(kappas):
            kq = np.minimum(last, k)
            within = np.bincount(pq[rank + 1 <= kq[pq]], minlength=n_queries)
            prs[:, column] = np.where(kq > 0, within / np.maximum(kq, 1), 0.0)
    empty = n_positive == 0
    aps[empty] = np.nan
    prs[empty] = np.nan
    valid = ~empty
    count = int(valid.sum())
    if count == 0:
        return math.nan, aps, np.full(len(kappas), np.nan), prs
    mean_ap = float(np.cumsum(aps[valid])[-1] / count)  # sequential sums, as revisitop accumulates
    pr = np.cumsum(prs[valid], axis=0)[-1] / count if kappas else np.zeros(0)
    return mean_ap, aps, pr, prs
