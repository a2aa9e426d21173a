"""Query expansion and database-side augmentation for global descriptors.

* α-query expansion (αQE, Radenović et al., TPAMI 2018): a query ``q`` becomes
  ``L2N(q + Σ_{i ≤ n} max(qᵀx_i, 0)^α · x_i)`` over its top-``n`` database neighbours ``x_i``; the query
  itself has weight 1 (its similarity to itself). ``alpha=0`` is average query expansion (Chum et al. 2007).
* α-database-side augmentation (αDBA; Gordo et al., IJCV 2017 with Radenović's weights): every database
  vector ``x_j`` becomes ``L2N(x_j + Σ_{i ≤ n} max(x_jᵀx_i, 0)^α · x_i)`` over its ``n`` nearest *other*
  database vectors. Search the augmented database with (optionally expanded) queries.

All descriptors are L2-normalised rows; similarities are inner products.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from simret.retrieval.whitening import l2_normalize


def _neighbours(ranks_or_I: Any, n_queries: int, layout: str) -> np.ndarray:
    """``(Q, k)`` neighbour indices from either FAISS' ``I (Q, k)`` or revisitop ``ranks (n_db, Q)``."""
    array = np.asarray(ranks_or_I)
    if array.ndim != 2:
        raise ValueError(f"neighbours must be 2-D (I (Q, k) or ranks (n_db, Q)), got shape {array.shape}")
    if layout == "auto":
        layout = "I" if array.shape[0] == n_queries else "ranks" if array.shape[1] == n_queries else "?"
    if layout == "I":
        if array.shape[0] != n_queries:
            raise ValueError(f"I has {array.shape[0]} rows for {n_queries} queries")
        return array.astype(np.int64, copy=False)
    if layout == "ranks":
        if array.shape[1] != n_queries:
            raise ValueError(f"ranks have {array.shape[1]} columns for {n_queries} queries")
        return np.ascontiguousarray(array.T, dtype=np.int64)
    raise ValueError(f"cannot tell how neighbours of shape {array.shape} relate to {n_queries} queries; "
                     f"pass layout='I' ((Q, k)) or layout='ranks' ((n_db, Q))")


def alpha_qe(queries: Any, database: Any, ranks_or_I: Any, n: int, alpha: float = 3.0, *,
             layout: str = "auto") -> np.ndarray:
    """α-query expansion.

    Args:
        queries: ``(Q, D)`` L2-normalised query descriptors (a ``(D,)`` vector is one query).
        database: ``(N, D)`` L2-normalised database descriptors (the ones the neighbours index).
        ranks_or_I: the first search's neighbours, best first: ``I (Q, k)`` from ``Index.search`` or
            revisitop ``ranks (N, Q)``; ``k ≥ n``. Negative entries (no result) are ignored.
        n: how many top neighbours to merge (``n = 0`` returns the queries unchanged).
        alpha: similarity exponent (``0``: plain average).
        layout: ``"I"``, ``"ranks"`` or ``"auto"`` (decided from which axis has ``Q`` entries).

    Returns:
        ``(Q, D)`` float32 expanded queries, L2-normalised.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    x = np.asarray(database, dtype=np.float32)
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if n == 0:
        return l2_normalize(q)
    if x.ndim != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"database {x.shape} and queries {q.shape} have different widths")
    neighbours = _neighbours(ranks_or_I, q.shape[0], layout)
    if neighbours.shape[1] < n:
        raise ValueError(f"αQE with n={n} needs at least {n} neighbours per query, got {neighbours.shape[1]}")
    top = neighbours[:, :n]
    valid = top >= 0
    vectors = x[np.where(valid, top, 0)]  # (Q, n, D)
    weights = _weights(np.einsum("qd,qnd->qn", q, vectors), alpha) * valid
    return l2_normalize(q + np.einsum("qn,qnd->qd", weights, vectors))


def dba(database: Any, n: int, alpha: float = 3.0, *, neighbours: Optional[Any] = None,
        chunk: int = 4096) -> np.ndarray:
    """α-database-side augmentation.

    Args:
        database: ``(N, D)`` L2-normalised descriptors.
        n: how many nearest other database vectors each one is merged with (``0``: unchanged).
        alpha: similarity exponent.
        neighbours: optional precomputed ``(N, ≥ n+1)`` self-search result (e.g. from an approximate
            index); by default an exact inner-product search is run.
        chunk: rows per block of the exact search.

    Returns:
        ``(N, D)`` float32 augmented descriptors, L2-normalised.
    """
    x = np.asarray(database, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"database must be (N, D), got shape {x.shape}")
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if n == 0 or x.shape[0] < 2:
        return l2_normalize(x)
    n = min(n, x.shape[0] - 1)
    if neighbours is None:
        from simret.retrieval.index import Index

        _, neighbours = Index.build(x, "flat").search(x, n + 1)
    augmented = np.empty_like(x)
    for start in range(0, x.shape[0], chunk):
        rows = np.arange(start, min(start + chunk, x.shape[0]))
        augmented[rows] = dba_block(x[rows], rows, np.asarray(neighbours)[rows], lambda picked: x[picked], n, alpha)
    return augmented


def dba_block(block: np.ndarray, block_rows: np.ndarray, neighbours: np.ndarray,
              vectors_of: Callable[[np.ndarray], np.ndarray], n: int, alpha: float) -> np.ndarray:
    """αDBA of some database rows, the rest of the database read through ``vectors_of``.

    Args:
        block: ``(b, D)`` L2-normalised descriptors of database rows ``block_rows (b,)``.
        neighbours: ``(b, ≥ n+1)`` database rows nearest to each (itself among them, or not; ``-1``: none).
        vectors_of: database rows ``(r,)`` → their ``(r, D)`` descriptors.

    Returns:
        ``(b, D)`` float32 augmented descriptors, L2-normalised.
    """
    others = _drop_self(np.asarray(neighbours, dtype=np.int64), n, np.asarray(block_rows, dtype=np.int64))
    valid = others >= 0
    unique, inverse = np.unique(np.where(valid, others, 0), return_inverse=True)  # row 0 stands in for none
    vectors = np.asarray(vectors_of(unique), dtype=np.float32)[inverse.reshape(others.shape)]  # (b, n, D)
    weights = _weights(np.einsum("bd,bnd->bn", block, vectors), alpha) * valid
    return l2_normalize(block + np.einsum("bn,bnd->bd", weights, vectors))


def _drop_self(neighbours: np.ndarray, n: int, rows: np.ndarray) -> np.ndarray:
    """The first ``n`` neighbours of each row other than the row itself (ties may put it anywhere)."""
    is_self = neighbours == rows[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # non-self entries first, their order kept
    others = np.take_along_axis(neighbours, order, axis=1)
    if others.shape[1] < n:
        raise ValueError(f"DBA with n={n} needs at least {n + 1} neighbours per vector, got {others.shape[1]}")
    return others[:, :n]


def _weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    return np.power(np.maximum(similarities, 0.0), alpha).astype(np.float32)
