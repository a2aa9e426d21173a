"""Exact search without holding the database in memory: the store is read block by block and a running
top-k kept per query (one pass over the store per batch of queries).

Used where no FAISS index exists (``--index none`` directories), to measure an approximate index's recall
against the truth, and wherever exact neighbours of stored rows are needed (αDBA).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import numpy as np

Prepare = Callable[[np.ndarray], np.ndarray]
SCORES_PER_STEP = 1 << 21  # query × row scores computed at once (8 MB of float32; with the selection, ~40 MB)


class RunningTopK:
    """The ``k`` best ``(score, row)`` per query over blocks of candidates seen one after another.

    Ties keep the lower row (the one seen first), as a stable sort over the whole database would.
    """

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = int(k)
        self.scores = np.full((n_queries, 0), -np.inf, np.float32)
        self.rows = np.zeros((n_queries, 0), np.int64)

    def add(self, scores: np.ndarray, first_row: int) -> None:
        """``scores (Q, B)`` of rows ``first_row … first_row + B - 1`` (memory: the block and ``Q × 2k``)."""
        scores = scores.astype(np.float32, copy=False)
        if scores.shape[1] > self.k:  # the block's own best k first (ties: argpartition may pick either; the
            # exact order below breaks them by row, and a tie at the k-th place is rare enough to accept)
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            rows = part.astype(np.int64) + first_row
            scores = np.take_along_axis(scores, part, axis=1)
        else:
            rows = np.broadcast_to(np.arange(first_row, first_row + scores.shape[1], dtype=np.int64), scores.shape)
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_rows = np.concatenate([self.rows, rows], axis=1)
        order = np.lexsort((all_rows, -all_scores), axis=1)[:, :self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.rows = np.take_along_axis(all_rows, order, axis=1)

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k'), rows (Q, k'))``, best first."""
        return self.scores, self.rows


def exact_search(blocks: Iterable[Tuple[int, np.ndarray]], queries: np.ndarray, k: int,
                 prepare: Optional[Prepare] = None, exclude: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries (Q, D')`` over database ``blocks`` ``(first row, (B, D))``.

    Args:
        prepare: maps a raw block into the queries' space (whitening, L2 normalisation); None: as is.
        exclude: ``(Q,)`` a row per query to leave out (the query itself, when queries are stored rows).

    Returns:
        ``(scores (Q, k'), rows (Q, k'))`` best first, ``k' = min(k, rows seen)``.
    """
    top = RunningTopK(queries.shape[0], k)
    step = max(1, SCORES_PER_STEP // max(1, queries.shape[0]))  # bounds the (Q, step) score matrix
    for first, block in blocks:
        vectors = prepare(block) if prepare is not None else block
        for offset in range(0, len(vectors), step):
            part = vectors[offset:offset + step]
            start = first + offset
            scores = queries @ part.T
            if exclude is not None:
                inside = (exclude >= start) & (exclude < start + len(part))
                scores[np.flatnonzero(inside), exclude[inside] - start] = -np.inf
            top.add(scores, start)
    return top.result()


def recall_at(approximate: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-``k`` rows found in its approximate top-``k``."""
    exact, approximate = exact[:, :k], approximate[:, :k]
    if exact.size == 0:
        return 1.0
    hits = [len(np.intersect1d(a[a >= 0], e)) / max(1, len(e)) for a, e in zip(approximate, exact)]
    return float(np.mean(hits))
