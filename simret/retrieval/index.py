"""FAISS indexes for L2-normalised descriptors: inner-product similarity (cosine), higher is better.

Kinds:

* ``flat``: exact search (``IndexFlatIP``). Once the vectors outgrow the CPU caches (16 MB), simret routes
  every query batch to FAISS' BLAS kernels: with the library default (``distance_compute_blas_threshold``,
  compared with ``n_queries · dim``), batches of up to a few hundred queries fall into a per-query scan
  that reads the whole database once per query (~10x slower for 70 queries against 1M x 384).
* ``ivfpq``: inverted lists + product quantization (``IndexIVFPQ``), ``m`` bytes per vector; ``nlist``,
  ``m``, ``nbits`` and ``nprobe`` follow the collection size unless given.
* ``hnsw``: graph index over the raw vectors (``IndexHNSWFlat``), ``M`` and ``efSearch`` from the size.
* ``auto``: ``flat`` up to ``AUTO_FLAT_MAX`` vectors, ``ivfpq`` beyond.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np

from simret.utils.atomic import atomic_path
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
KINDS = ("flat", "ivfpq", "hnsw", "auto")
AUTO_FLAT_MAX = 200_000  # exact search stays fast (~0.2 s for 70 queries on 2 cores) up to here
DEFAULT_RERANK = 16  # ivfpq with exact vectors: candidates per result re-scored exactly
BLAS_THRESHOLD = 0  # every query batch through BLAS …
BLAS_MIN_DATABASE_BYTES = 16 << 20  # … once the vectors outgrow the CPU caches (below, FAISS' scan is as fast)
GPU_MAX_K = 2048  # the largest k FAISS' GPU indexes select
GPU_SHARED_MEMORY = 48 << 10  # bytes per block FAISS' GPU IVFPQ kernels may use for a query's lookup table


def as_matrix(x: Any, dim: Optional[int] = None, *, what: str = "vectors") -> np.ndarray:
    """Coerce an array-like (numpy, torch, list) to a C-contiguous float32 ``(N, D)`` matrix.

    A 1-D input becomes one row. Raises ``ValueError`` for other ranks, a wrong width or non-finite values.
    """
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} must be (N, D) or (D,), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have {array.shape[1]} dimensions, the index holds {dim}-d vectors")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(array)


@contextlib.contextmanager
def blas_for_small_batches(threshold: int = BLAS_THRESHOLD) -> Iterator[None]:
    """Temporarily set ``faiss.cvar.distance_compute_blas_threshold`` (restored afterwards)."""
    import faiss

    previous = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = threshold
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = previous


# ------------------------------------------------------------------------------------ parameters


def _power_of_two(value: float) -> int:
    return 1 << max(0, int(round(math.log2(max(1.0, value)))))


def auto_kind(n: int) -> str:
    """The index kind ``auto`` picks for ``n`` vectors."""
    return "flat" if n <= AUTO_FLAT_MAX else "ivfpq"


def auto_params(kind: str, n: int, dim: int) -> Dict[str, int]:
    """Parameters for ``kind`` on a collection of ``n`` vectors of width ``dim``.

    * ivfpq: ``nlist`` ≈ √n (a power of two, at most n/39 so k-means has 39 points per list),
      ``m`` = the largest divisor of ``dim`` with ≥ 4 dimensions per sub-vector and at most 64 bytes,
      ``nbits`` = 8 (fewer for tiny collections), ``nprobe`` = nlist/16 (at least 8).
    * hnsw: ``M`` = 16 below 100k vectors, else 32; ``efConstruction`` = 2·M·… (80 / 160);
      ``efSearch`` = 64 below 100k vectors, else 128.
    """
    if kind == "flat":
        return {}
    if kind == "ivfpq":
        nlist = max(1, min(_power_of_two(math.sqrt(max(n, 1))), _floor_power_of_two(max(1, n // 39))))
        m = max((c for c in range(1, min(dim // 4, 64) + 1) if dim % c == 0), default=1)
        nbits = int(min(8, max(1, math.floor(math.log2(max(2, n / 39))))))
        nprobe = max(1, min(nlist, max(8, nlist // 16)))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}
    if kind == "hnsw":
        small = n < 100_000
        return {"M": 16 if small else 32, "efConstruction": 80 if small else 160, "efSearch": 64 if small else 128}
    raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")


def gpu_needs_float16_tables(m: int, nbits: int) -> bool:
    """Whether an ivfpq index with ``m`` sub-quantizers of ``nbits`` needs float16 lookup tables on a GPU:
    FAISS keeps a query's ``m · 2^nbits`` table in shared memory (e.g. m=64, nbits=8: 64 KiB as float32)."""
    return int(m) * (1 << int(nbits)) * 4 > GPU_SHARED_MEMORY


def _floor_power_of_two(value: int) -> int:
    return 1 << max(0, int(value).bit_length() - 1)


# ----------------------------------------------------------------------------------------- Index


class Index:
    """A FAISS index over L2-normalised descriptors, searched by inner product.

    >>> index = Index.build(database, kind="flat")      # database (N, D) float array-like
    >>> scores, ids = index.search(queries, k=10)        # (Q, k) float32 and int64, best first

    ``search`` returns ``min(k, ntotal)`` columns; rows of ``ids`` are positions in the order vectors were
    added (``-1`` only where an approximate index finds fewer than ``k`` candidates).
    """

    def __init__(self, faiss_index: Any, kind: Optional[str] = None) -> None:
        self.faiss = faiss_index
        self.kind = kind or _kind_of(faiss_index)
        self._gpu_resources = None

    # construction

    @classmethod
    def create(cls, dim: int, kind: str = "flat", n_hint: int = 0, **params: Any) -> Index:
        """An empty index of ``kind`` (``auto`` decides from ``n_hint``); ``params`` override the automatic
        ones (``nlist``, ``m``, ``nbits``, ``nprobe`` for ivfpq; ``M``, ``efConstruction``, ``efSearch``
        for hnsw)."""
        import faiss

        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}")
        kind = auto_kind(n_hint) if kind == "auto" else kind
        chosen = {**auto_params(kind, n_hint, dim), **{k: v for k, v in params.items() if v is not None}}
        unknown = set(chosen) - set(auto_params(kind, max(n_hint, 1), dim))
        if unknown:
            raise ValueError(f"{kind} index does not take {', '.join(sorted(unknown))}")
        for name, value in chosen.items():  # FAISS crashes (not raises) on zero or negative sizes
            if not 1 <= int(value) < 2 ** 31:
                raise ValueError(f"{kind} index: {name} must be at least 1"
                                 + (f", got {value}" if int(value) < 1 else f" and below 2^31, got {value}"))
        if kind == "ivfpq" and int(chosen["nbits"]) > 16:
            raise ValueError(f"ivfpq index: nbits must be at most 16 (2^nbits centroids per sub-quantizer), "
                             f"got {chosen['nbits']}")
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivfpq":
            if dim % chosen["m"]:
                raise ValueError(f"ivfpq: m={chosen['m']} must divide the dimension {dim}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, int(chosen["nlist"]), int(chosen["m"]), int(chosen["nbits"]),
                                     faiss.METRIC_INNER_PRODUCT)
            index.own_fields = True
            quantizer.this.disown()
            index.nprobe = int(chosen["nprobe"])
        else:
            index = faiss.IndexHNSWFlat(dim, int(chosen["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(chosen["efConstruction"])
            index.hnsw.efSearch = int(chosen["efSearch"])
        return cls(index, kind)

    @classmethod
    def build(cls, vectors: Any, kind: str = "flat", *, train_size: Optional[int] = None, seed: int = 0,
              **params: Any) -> Index:
        """Create, train (ivfpq: on at most ``train_size`` vectors, default 64 per list, ≥ 10k) and fill."""
        x = as_matrix(vectors)
        index = cls.create(x.shape[1], kind, n_hint=x.shape[0], **params)
        index.train(x, train_size=train_size, seed=seed)
        index.add(x)
        return index

    def train(self, vectors: Any, *, train_size: Optional[int] = None, seed: int = 0) -> None:
        """Train an index that needs it (ivfpq) on a random sample of ``vectors``; others ignore this."""
        if self.faiss.is_trained:
            return
        x = as_matrix(vectors, self.dim)
        ivf = self._ivf()
        nlist = ivf.nlist if ivf is not None else 1
        need = max(nlist, 1)
        if x.shape[0] < need:
            raise ValueError(f"{self.kind} with nlist={nlist} needs at least {need} training vectors, got {x.shape[0]}")
        nbits = self.params.get("nbits")
        if nbits is not None and x.shape[0] < 2 ** nbits:
            raise ValueError(f"{self.kind} with nbits={nbits} needs at least 2^{nbits} = {2 ** nbits} training "
                             f"vectors, got {x.shape[0]}: lower nbits (--index-param nbits=N) or use a flat index")
        size = train_size or self.train_size(x.shape[0])
        if x.shape[0] > size:
            rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))
            x = x[rows]
        if ivf is not None:
            ivf.cp.seed = seed
        self.faiss.train(x)

    def train_size(self, n: int) -> int:
        """How many of ``n`` vectors training samples (ivfpq: 64 per list, at least 10,000; others: none)."""
        ivf = self._ivf()
        if ivf is None or self.faiss.is_trained:
            return 0
        return min(int(n), max(64 * int(ivf.nlist), 10_000))

    def add(self, vectors: Any) -> None:
        """Append ``vectors (N, D)``; they get ids ``ntotal … ntotal + N - 1``."""
        x = as_matrix(vectors, self.dim)
        if not self.faiss.is_trained:
            raise ValueError(f"the {self.kind} index is not trained yet: call train() (or use Index.build)")
        self.faiss.add(x)

    # queries

    def search(self, queries: Any, k: int = 10, *, exact: Any = None,
               rerank: int = DEFAULT_RERANK) -> Tuple[np.ndarray, np.ndarray]:
        """``queries (Q, D)`` or ``(D,)`` → ``(scores (Q, k'), ids (Q, k'))``, ``k' = min(k, ntotal)``.

        Scores are inner products (cosine similarity for L2-normalised vectors), highest first.

        Args:
            exact: for ivfpq, the database vectors in this index's space, to re-score candidates exactly:
                an ``(N, D)`` array-like (a ``numpy.memmap`` of the descriptor store is fine) or a callable
                ``rows (R,) int64 → (R, D)``. The top ``k·rerank`` candidates of the compressed codes are
                re-scored and re-ordered; the scores returned are then exact. Ignored by flat and hnsw,
                which hold the vectors themselves.
            rerank: candidates per requested result for that re-scoring.
        """
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = as_matrix(queries, self.dim, what="queries")
        k = min(int(k), self.ntotal)
        if k == 0 or x.shape[0] == 0:
            return np.zeros((x.shape[0], k), np.float32), np.zeros((x.shape[0], k), np.int64)
        refine = exact is not None and self.kind == "ivfpq" and rerank > 1
        depth = min(self.ntotal, k * int(rerank)) if refine else k
        if self.on_gpu:  # FAISS' GPU k-selection stops at GPU_MAX_K
            depth = max(k, min(depth, GPU_MAX_K))
        hnsw = getattr(self.faiss, "hnsw", None)
        if hnsw is not None and hnsw.efSearch < depth:
            hnsw.efSearch = depth
        large = self.kind == "flat" and self.ntotal * self.dim * 4 > BLAS_MIN_DATABASE_BYTES and not self.on_gpu
        with blas_for_small_batches() if large else contextlib.nullcontext():
            scores, ids = self.faiss.search(x, depth)
        if refine:
            scores, ids = _rescore(x, ids, exact, k)
        return scores, ids

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` (flat and hnsw: exact; ivfpq: decoded approximations)."""
        rows = np.asarray(ids, dtype=np.int64).ravel()
        ivf = self._ivf()
        if ivf is not None and not self.on_gpu:
            ivf.make_direct_map()
        return (np.stack([self.faiss.reconstruct(int(i)) for i in rows]) if rows.size
                else np.zeros((0, self.dim), np.float32))

    # properties

    @property
    def dim(self) -> int:
        return int(self.faiss.d)

    @property
    def ntotal(self) -> int:
        return int(self.faiss.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def params(self) -> Dict[str, Any]:
        """The parameters in use (what ``meta.json`` records)."""
        ivf = self._ivf()
        if ivf is not None:
            params = {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
            pq = getattr(ivf, "pq", None)
            if pq is not None:
                params.update({"m": int(pq.M), "nbits": int(pq.nbits)})
            return params
        hnsw = getattr(self.faiss, "hnsw", None)
        if hnsw is not None:
            return {"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction),
                    "efSearch": int(hnsw.efSearch)}
        return {}

    @property
    def bytes_per_vector(self) -> float:
        """Memory of the stored codes per vector (ids and graph links included where FAISS keeps them)."""
        params = self.params
        if self.kind == "ivfpq":
            return float(math.ceil(params["m"] * params["nbits"] / 8) + 8)  # code + 64-bit id in its list
        if self.kind == "hnsw":
            return float(4 * self.dim + 4 * 2 * params["M"] * 1.05)  # vector + ~2M links on level 0 (+ upper levels)
        return float(4 * self.dim)

    def set_search_params(self, *, nprobe: Optional[int] = None, efSearch: Optional[int] = None) -> None:
        """Speed/recall trade-off at search time (ivfpq: ``nprobe``; hnsw: ``efSearch``)."""
        ivf = self._ivf()
        if nprobe is not None:
            if ivf is None:
                raise ValueError(f"nprobe applies to ivfpq indexes, not {self.kind}")
            ivf.nprobe = int(nprobe)
            if self.faiss is not self._cpu_index():  # a GPU copy
                import faiss

                faiss.GpuParameterSpace().set_index_parameter(self.faiss, "nprobe", int(nprobe))
        if efSearch is not None:
            hnsw = getattr(self.faiss, "hnsw", None)
            if hnsw is None:
                raise ValueError(f"efSearch applies to hnsw indexes, not {self.kind}")
            hnsw.efSearch = int(efSearch)

    # persistence and devices

    def save(self, path: PathLike) -> Path:
        """Write the index (``faiss.write_index`` format) atomically; a GPU index is copied to the CPU first."""
        import faiss

        with atomic_path(path, suffix=".faiss") as temporary:
            try:
                faiss.write_index(self._cpu_index(), str(temporary))
            except RuntimeError as err:  # FAISS reports a failed fwrite (disk full …) as a RuntimeError
                raise OSError(f"FAISS could not write {path} ({str(err).strip().splitlines()[0]})") from None
        return Path(path)

    @classmethod
    def load(cls, path: PathLike, *, mmap: bool = False) -> Index:
        """Read an index file; ``mmap=True`` maps its vectors / inverted lists from the file instead of reading
        them (``faiss.IO_FLAG_MMAP``): a large index opens at once and pages in what searches touch."""
        import faiss

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no FAISS index file {path}")
        # flat and hnsw storage maps with MMAP_IFC, inverted lists with MMAP (the two together fail for IVF)
        attempts = [faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY] \
            if mmap else [0]
        for number, flags in enumerate(attempts):
            try:
                index = faiss.read_index(str(path), flags)
            except RuntimeError as err:
                if number + 1 < len(attempts):
                    continue
                raise ValueError(f"{path} is not a readable FAISS index ({str(err).splitlines()[0]})") from None
            if mmap and number == 0 and isinstance(index, faiss.IndexIVF):  # its lists were read, not mapped
                continue
            break
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} does not use inner-product similarity; simret indexes always do")
        return cls(index)

    def to_gpu(self, device: int = 0) -> Index:
        """Move the index to GPU ``device`` (in place; returns self). flat and ivfpq only.

        Raises:
            RuntimeError: FAISS was built without GPU support (faiss-cpu) or no CUDA device is visible.
            ValueError: hnsw, which FAISS cannot run on a GPU.
        """
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("this FAISS has no GPU support (faiss-cpu); install the gpu extra: "
                               "pip install 'simret[gpu]' (faiss-gpu-cu12)")
        count = faiss.get_num_gpus()
        if count == 0:
            raise RuntimeError("FAISS has GPU support but sees no CUDA device")
        if not 0 <= device < count:
            raise RuntimeError(f"GPU {device} asked for, FAISS sees {count}")
        if self.kind == "hnsw":
            raise ValueError("FAISS cannot run an HNSW index on a GPU; use flat or ivfpq")
        options = faiss.GpuClonerOptions()
        if self.kind == "ivfpq":  # float16 lookup tables where float32 ones overflow the 48 KiB of shared memory
            options.useFloat16 = gpu_needs_float16_tables(self.params["m"], self.params["nbits"])
        resources = faiss.StandardGpuResources()
        self.faiss = faiss.index_cpu_to_gpu(resources, device, self._cpu_index(), options)
        self._gpu_resources = resources
        return self

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def _cpu_index(self):
        if self._gpu_resources is None:
            return self.faiss
        import faiss

        return faiss.index_gpu_to_cpu(self.faiss)

    def _ivf(self):
        """The index itself when it is an inverted-file index (CPU ``IndexIVFPQ`` or its GPU copy), else None."""
        import faiss

        if isinstance(self.faiss, faiss.IndexIVF) or (self.on_gpu and self.kind == "ivfpq"):
            return self.faiss
        return None

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal}, params={self.params})"


def _rescore(queries: np.ndarray, candidates: np.ndarray, exact: Any, k: int,
             block_bytes: int = 64 << 20) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner products of ``queries (Q, D)`` with their ``candidates (Q, C)`` (``-1``: none) → top ``k``
    (the candidates' vectors are laid out for a block of queries at a time, ``block_bytes`` at most)."""
    valid = candidates >= 0
    rows = np.unique(candidates[valid])
    fetch = exact if callable(exact) else (lambda picked: np.asarray(exact[picked]))
    vectors = as_matrix(fetch(rows) if rows.size else np.zeros((0, queries.shape[1]), np.float32),
                        queries.shape[1], what="exact database vectors")
    if vectors.shape[0] != rows.size:
        raise ValueError(f"exact vectors: asked for {rows.size} rows, got {vectors.shape[0]}")
    position = np.searchsorted(rows, np.where(valid, candidates, rows[0] if rows.size else 0))
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    block = max(1, block_bytes // max(1, candidates.shape[1] * queries.shape[1] * 4))
    for start in range(0, queries.shape[0], block):
        part = slice(start, start + block)
        if rows.size:
            scores[part] = np.einsum("qd,qcd->qc", queries[part], vectors[position[part]])
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best_ids = np.take_along_axis(np.where(valid, candidates, -1), order, axis=1)
    best_scores = np.take_along_axis(scores, order, axis=1)
    return best_scores, best_ids


def _kind_of(index: Any) -> str:
    import faiss

    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    name = type(index).__name__
    if "Flat" in name and "IVF" not in name:
        return "flat"
    if "IVF" in name:
        return "ivfpq"
    raise ValueError(f"unsupported FAISS index type {name}")
