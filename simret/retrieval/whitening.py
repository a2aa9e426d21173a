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
from typing import Any, Dict, Optional, Union

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
        x = np.asarray(descriptors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"whitening needs at least two descriptors (N, D), got shape {x.shape}")
        n, d = x.shape
        if not np.isfinite(x).all():
            raise ValueError("whitening descriptors contain NaN or infinite values")
        if dim is not None and not 1 <= dim <= d:
            raise ValueError(f"whitening dimension must be in 1..{d}, got {dim}")
        mean = x.mean(axis=0)
        centred = x - mean
        covariance = centred.T @ centred / n
        covariance = (covariance + covariance.T) / 2
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
        return cls(mean.astype(np.float32), projection.astype(np.float32), eigenvalues.astype(np.float32), n)

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
    def load(cls, path: PathLike) -> PCAWhitening:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no whitening file {path}")
        try:
            data = np.load(path, allow_pickle=False)
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
            raise ValueError(f"{path} is not a readable simret whitening file ({reason}): rebuild the index with "
                             f"simret index --overwrite") from None
