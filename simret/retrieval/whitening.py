"""PCA whitening of global descriptors (Jégou & Chum 2012; cirtorch's ``pcawhitenlearn``).

Learn ``mean`` and ``projection`` on a set of L2-normalised descriptors ``X (N, D)``:
``C = (X - m)ᵀ (X - m) / N = V Λ Vᵀ``, ``P = Λ^{-1/2} Vᵀ`` (eigenvalues in decreasing order).
Apply: ``x ↦ L2N(P (x - m))``. Directions with (numerically) zero variance are dropped, so whitening
learned on fewer descriptors than dimensions keeps at most ``N - 1`` of them.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Optional, Union

import numpy as np

from simret.utils.atomic import atomic_path
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
RELATIVE_EIGEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest are the null space


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows (by default) scaled to unit L2 norm; all-zero rows stay zero. Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


class Moments:
    """Running count, mean and scatter matrix of descriptors added block by block (float64; blocks merged
    with Chan et al.'s pairwise update, so the result does not depend on how the rows were split)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[np.ndarray] = None
        self.scatter: Optional[np.ndarray] = None

    @property
    def dim(self) -> int:
        return 0 if self.mean is None else int(self.mean.shape[0])

    def add(self, block: np.ndarray) -> None:
        """Add ``block (n, D)``; raises ``ValueError`` for NaN/infinite values or another width."""
        x = np.asarray(block, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"whitening needs descriptors (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("whitening descriptors contain NaN or infinite values")
        if self.mean is not None and x.shape[1] != self.dim:
            raise ValueError(f"whitening descriptors of width {x.shape[1]} after width {self.dim}")
        mean = x.mean(axis=0)
        centred = x - mean
        scatter = centred.T @ centred
        if self.mean is None:
            self.n, self.mean, self.scatter = x.shape[0], mean, scatter
            return
        total = self.n + x.shape[0]
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.n * x.shape[0] / total)
        self.mean = self.mean + delta * (x.shape[0] / total)
        self.n = total

    def covariance(self) -> np.ndarray:
        """The (biased, ``/N``) covariance ``(D, D)``, symmetrised."""
        covariance = self.scatter / self.n
        return (covariance + covariance.T) / 2


@dataclass
class PCAWhitening:
    """A learned whitening: ``apply(x (N, D)) → (N, D')`` L2-normalised, ``D' ≤ D``.

    Attributes:
        mean: ``(D,)`` mean of the learning set.
        projection: ``(D', D)`` rows are principal directions scaled by ``eigenvalue^{-1/2}``.
        eigenvalues: ``(D',)`` kept eigenvalues, decreasing.
        n_learned: how many descriptors it was learned on.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    n_learned: int

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[0])

    @classmethod
    def learn(cls, descriptors: np.ndarray, dim: Optional[int] = None) -> PCAWhitening:
        """Learn from ``descriptors (N, D)``; ``dim`` keeps the first ``dim`` directions (default: all
        with non-zero variance).

        Raises:
            ValueError: fewer than two descriptors, or ``dim`` out of range.
        """
        x = np.asarray(descriptors)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"whitening needs at least two descriptors (N, D), got shape {x.shape}")
        return cls.learn_streaming([x], dim)

    @classmethod
    def learn_streaming(cls, blocks: Iterable[np.ndarray], dim: Optional[int] = None) -> PCAWhitening:
        """Learn from descriptors given as ``(n_i, D)`` blocks (e.g. read from a store one block at a time):
        the same whitening as ``learn`` on their concatenation, in ``O(D²)`` memory whatever ``N`` is."""
        moments = Moments()
        for block in blocks:
            moments.add(block)
        return cls.from_moments(moments, dim)

    @classmethod
    def from_moments(cls, moments: Moments, dim: Optional[int] = None) -> PCAWhitening:
        """The whitening of the descriptors whose mean and covariance ``moments`` accumulated."""
        n, d = moments.n, moments.dim
        if n < 2:
            raise ValueError(f"whitening needs at least two descriptors (N, D), got {n}")
        if dim is not None and not 1 <= dim <= d:
            raise ValueError(f"whitening dimension must be in 1..{d}, got {dim}")
        covariance = moments.covariance()
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        keep = int(np.sum(eigenvalues > RELATIVE_EIGEN_FLOOR * max(eigenvalues[0], 1e-30)))
        if keep == 0:
            raise ValueError(f"whitening needs descriptors that differ: the {n} given are all the same")
        if dim is not None and dim > keep:
            log.warning("whitening: only %d directions have non-zero variance in %d descriptors; keeping %d, not %d",
                        keep, n, keep, dim)
        keep = min(keep, dim or d)
        if keep < d and dim is None:
            log.warning("whitening learned on %d descriptors of dimension %d keeps %d dimensions; learn it on a "
                        "larger set (--whiten-on) for full-width descriptors", n, d, keep)
        eigenvalues, eigenvectors = eigenvalues[:keep], eigenvectors[:, :keep]
        projection = (eigenvectors / np.sqrt(eigenvalues)).T  # (keep, D) = Λ^{-1/2} Vᵀ
        return cls(moments.mean.astype(np.float32), projection.astype(np.float32), eigenvalues.astype(np.float32), n)

    def apply(self, descriptors: np.ndarray) -> np.ndarray:
        """``(N, D)`` or ``(D,)`` → whitened and L2-normalised ``(N, D')`` float32."""
        x = np.asarray(descriptors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.in_dim:
            raise ValueError(f"whitening expects {self.in_dim}-d descriptors, got {x.shape[1]}-d")
        return l2_normalize((x - self.mean) @ self.projection.T)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "pca", "in_dim": self.in_dim, "out_dim": self.out_dim, "n_learned": self.n_learned}

    def save(self, path: PathLike) -> Path:
        """Write ``path`` (``.npz``: ``mean``, ``projection``, ``eigenvalues``, ``n_learned``) atomically."""
        with atomic_path(path, suffix=".npz") as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues,
                         n_learned=np.int64(self.n_learned))
        return Path(path)

    @classmethod
    def load(cls, source: Union[PathLike, BinaryIO], *, shown_as: Optional[PathLike] = None) -> PCAWhitening:
        """Read a whitening written by ``save`` (a path, or an open binary file / ``BytesIO``)."""
        name = shown_as or (source if isinstance(source, (str, os.PathLike)) else "whitening")
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise FileNotFoundError(f"no whitening file {source}")
        try:
            data = np.load(source, allow_pickle=False)
            if not hasattr(data, "files"):
                raise ValueError("a single array, not an .npz archive")
            with data:
                missing = {"mean", "projection", "eigenvalues", "n_learned"} - set(data.files)
                if missing:
                    raise ValueError(f"missing {', '.join(sorted(missing))}")
                return cls(data["mean"].astype(np.float32), data["projection"].astype(np.float32),
                           data["eigenvalues"].astype(np.float32), int(data["n_learned"]))
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            reason = "not an .npz archive" if "pickled" in str(err) else str(err)  # numpy's hint to unpickle: no
            raise ValueError(f"{name} is not a readable simret whitening file ({reason})") from None


def learn_whitening_on(source: PathLike, encoder: Any, *, dim: Optional[int] = None, scales: Any = (1.0,),
                       max_size: Optional[int] = 1024, batch_size: int = 16, workers: Optional[int] = None,
                       precision: Optional[str] = None, progress: bool = True) -> PCAWhitening:
    """PCA whitening learned on other images than the ones it will whiten (``--whiten-on``).

    ``source`` is a descriptor store (``.h5``/``.hdf5``) of the same encoder, read block by block, or a
    folder / list file of images, described with the given extraction settings.

    Raises:
        StoreError: the store was computed by another encoder.
        ValueError: another width, fewer than two usable descriptors or images.
    """
    from simret.retrieval.store import StoreReader, check_fingerprint

    source = Path(source).expanduser()
    if source.suffix.lower() in (".h5", ".hdf5"):
        with StoreReader(source) as reader:
            check_fingerprint(reader.fingerprint, encoder.fingerprint, what=f"whitening descriptors in {source}",
                              where="this encoder")
            if reader.dim != encoder.dim:
                raise ValueError(f"--whiten-on {source} holds {reader.dim}-d descriptors, this encoder gives "
                                 f"{encoder.dim}-d ones")
            try:
                return PCAWhitening.learn_streaming((block for _, block in reader.blocks()), dim)
            except ValueError as err:
                raise ValueError(f"--whiten-on {source}: {err}") from None
    from simret.data.images import list_images
    from simret.retrieval.extraction import extract

    root, ids = list_images(source)
    log.info("learning whitening on %d images from %s", len(ids), source)
    result = extract(encoder, root, ids, scales=scales, max_size=max_size, batch_size=batch_size, workers=workers,
                     precision=precision, progress=progress)
    if result.failures:
        log.warning("whitening: %d of %d images under %s could not be used", len(result.failures), len(ids), source)
    if len(result.ids) < 2:
        raise ValueError(f"--whiten-on {source}: whitening needs at least two readable images, "
                         f"{len(result.ids)} of {len(ids)} could be used")
    return PCAWhitening.learn(result.descriptors, dim)
