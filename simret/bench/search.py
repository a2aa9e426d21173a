"""Search speed and quality: exact flat search vs FAISS defaults and torch, IVF-PQ recall and memory.

Data: unit vectors drawn around random centres (clustered, like real descriptors), generated in chunks.
"""
from __future__ import annotations

import time

import numpy as np

from simret.bench import Row, Section, interleaved_medians

TITLE = "Search: flat (exact) and IVF-PQ on 1M x 384 descriptors"
K = 10


def clustered_unit_chunks(n: int, dim: int, *, latent: int = 32, n_clusters: int = 4000, spread: float = 0.35,
                          noise: float = 0.05, seed: int = 0, data_seed: int = 0, chunk: int = 100_000):
    """``(n, dim)`` float32 unit vectors shaped like image descriptors, yielded ``chunk`` rows at a time:
    clusters in a ``latent``-dimensional subspace (Gaussian around ``n_clusters`` centres) embedded in ``dim``
    dimensions, plus isotropic noise.

    ``data_seed`` fixes the subspace and the centres (share it between database and queries); ``seed`` draws
    the points.
    """
    shared = np.random.default_rng(data_seed)
    basis = np.linalg.qr(shared.standard_normal((dim, latent)))[0].astype(np.float32)  # (dim, latent)
    centres = shared.standard_normal((n_clusters, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        size = min(n, start + chunk) - start
        z = centres[rng.integers(0, n_clusters, size)] + spread * rng.standard_normal((size, latent), dtype=np.float32)
        rows = z @ basis.T + noise * rng.standard_normal((size, dim), dtype=np.float32)
        yield rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered_unit_vectors(n: int, dim: int, **options) -> np.ndarray:
    """All of ``clustered_unit_chunks`` in one ``(n, dim)`` array."""
    return np.concatenate(list(clustered_unit_chunks(n, dim, **options)))


def torch_topk(database, queries: np.ndarray, k: int, chunk: int = 65536):
    """Exact top-k by chunked ``queries @ chunkᵀ`` and ``topk`` (the baseline a torch user would write)."""
    import torch

    q = torch.from_numpy(queries)
    best_scores, best_ids = None, None
    for start in range(0, database.shape[0], chunk):
        scores = q @ database[start:start + chunk].T
        values, ids = scores.topk(min(k, scores.shape[1]), dim=1)
        ids += start
        if best_scores is not None:
            values, ids = torch.cat([best_scores, values], 1), torch.cat([best_ids, ids], 1)
            values, order = values.topk(k, dim=1)
            ids = ids.gather(1, order)
        best_scores, best_ids = values, ids
    return best_scores.numpy(), best_ids.numpy()


def run(quick: bool = False) -> Section:
    import faiss
    import torch

    from simret.retrieval.index import DEFAULT_RERANK, Index

    n, dim = (80_000, 64) if quick else (1_000_000, 384)
    section = Section("search", TITLE if not quick else "Search (quick sizes)", "python scripts/bench.py search")
    started = time.perf_counter()
    clusters = max(64, n // 250)
    database = clustered_unit_vectors(n, dim, n_clusters=clusters, seed=1)
    queries = {nq: clustered_unit_vectors(nq, dim, n_clusters=clusters, seed=2 + nq) for nq in (70, 1000)}

    simret_flat = Index.build(database, "flat")
    plain = faiss.IndexFlatIP(dim)  # FAISS as it comes: default distance_compute_blas_threshold
    plain.add(database)
    torch_db = torch.from_numpy(database)
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    repeat = 2 if quick else 3
    exact_ids, flat_qps = {}, {}
    for nq, q in queries.items():
        exact_ids[nq] = simret_flat.search(q, K)[1]
        np.testing.assert_array_equal(exact_ids[nq][:, 0], torch_topk(torch_db, q, K)[1][:, 0])
        medians = interleaved_medians({
            "simret": lambda: simret_flat.search(q, K),
            "faiss": lambda: plain.search(q, K),
            "torch": lambda: torch_topk(torch_db, q, K),
        }, repeat=repeat, warmup=1)
        qps = {name: nq / seconds for name, seconds in medians.items()}
        flat_qps[nq] = qps["simret"]
        target = "≥ 2x FAISS defaults" if nq < 300 else "≥ 0.9x FAISS defaults"
        needed = 2.0 if nq < 300 else 0.9
        ratio = qps["simret"] / qps["faiss"]
        section.rows.append(Row(f"flat, {nq} queries, k={K}", qps["simret"], "queries/s",
                                baseline="faiss.IndexFlatIP, default settings", baseline_value=qps["faiss"],
                                ratio=ratio, target=target, met=None if quick else ratio >= needed))
        section.rows.append(Row(f"flat, {nq} queries, k={K}", qps["simret"], "queries/s",
                                baseline="torch matmul + topk, 64k-row chunks", baseline_value=qps["torch"],
                                ratio=qps["simret"] / qps["torch"]))
    assert faiss.cvar.distance_compute_blas_threshold == default_threshold  # simret restores it
    plain = torch_db = None  # free 1.5 GB before the IVF-PQ part

    build_start = time.perf_counter()
    ivf = Index.build(database, "ivfpq")  # parameters chosen from the collection size
    build_seconds = time.perf_counter() - build_start
    params = ivf.params
    for nq, q in queries.items():
        for label, exact in (("codes only", None), (f"+ exact re-scoring of {DEFAULT_RERANK}·k candidates", database)):
            found = ivf.search(q, K, exact=exact)[1]
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact_ids[nq])]))
            seconds = interleaved_medians({"ivf": lambda: ivf.search(q, K, exact=exact)}, repeat=repeat)["ivf"]
            wanted = exact is not None and nq == 70
            section.rows.append(Row(f"ivfpq {label}: recall@{K} vs flat, {nq} queries", recall, "",
                                    target="≥ 0.9" if wanted else None,
                                    met=(recall >= 0.9) if wanted and not quick else None))
            section.rows.append(Row(f"ivfpq {label}: {nq} queries, k={K}", nq / seconds, "queries/s",
                                    baseline="simret flat", baseline_value=flat_qps[nq],
                                    ratio=nq / seconds / flat_qps[nq]))
    section.rows.append(Row("ivfpq memory per vector in RAM (codes + id)", ivf.bytes_per_vector, "bytes",
                            baseline="flat float32", baseline_value=simret_flat.bytes_per_vector,
                            ratio=simret_flat.bytes_per_vector / ivf.bytes_per_vector))
    section.notes.append(f"{n:,} x {dim} unit vectors shaped like descriptors: {clusters:,} Gaussian clusters in a "
                         f"32-d subspace plus noise (clustered_unit_vectors); queries from the same clusters; exact "
                         f"top-{K} from simret's flat index (top-1 checked against torch).")
    section.notes.append(f"ivfpq re-scoring reads the candidates' float vectors (in simret: rows of the memory-mapped "
                         f"descriptors.h5, {4 * dim} bytes each on disk / page cache); only the codes stay in RAM.")
    section.notes.append(f"FAISS {faiss.__version__}: its default distance_compute_blas_threshold "
                         f"({default_threshold}) is compared with n_queries·dim, so up to "
                         f"{default_threshold // dim} queries at d={dim} take a per-query scan that reads the whole "
                         f"database once per query; simret sets the threshold to 0 during flat searches over more than "
                         f"16 MB of vectors (and restores it).")
    section.notes.append(f"ivfpq parameters chosen by auto for {n:,} vectors: {params}; trained on "
                         f"{max(64 * params['nlist'], 10_000):,} sampled vectors; build {build_seconds:.0f} s.")
    section.notes.append(f"{repeat} interleaved runs after a warm-up; "
                         f"section wall time {time.perf_counter() - started:.0f} s.")
    return section
