"""Episodic evaluation on a feature bank: ``evaluate(features, episodes, method)`` → accuracy ± 95% CI.

``accuracies[e]`` is the fraction of episode ``e``'s queries whose highest-scoring class is their label (a
tie goes to the lowest class index). ``mean`` is their average, ``std`` their **population** standard
deviation (NumPy's default ``ddof=0``, what most few-shot code reports) and ``ci95 = 1.96 · std / √E``.

How it runs (never one giant tensor, never a Python loop over episodes):

* any method: episodes are processed in chunks (``chunk_size`` episodes, by default as many as fit in about
  32 MB of gathered features); each chunk gathers ``(e, S, D)`` support and ``(e, Q, D)`` query features from
  the bank and calls the method once.
* prototype methods (``protonet``, ``cosine``, ``simpleshot``) are scored straight from the bank: the bank is
  normalised once (CL2N/L2N), each chunk's prototypes come from one fused gather-and-mean (torch's
  ``embedding_bag``), and the query–prototype products from FAISS's fused gather-and-dot kernel
  (``fvec_inner_products_by_idx``), which never copies a query feature; on a GPU, for float64 banks or
  without FAISS, from a gather and one batched matmul. Per-query terms that cannot change the ranking of the
  classes are left out (``‖q‖²`` for ``protonet``/``simpleshot``, ``‖q‖`` for ``cosine``), so the predictions
  are the method's own argmax; the cost is essentially reading each episode's query rows once.

Why not the bank's Gram matrix? With ``G = X Xᵀ`` each query–prototype product is a mean of ``n_shot`` Gram
entries, but ``G`` costs ``N²·D`` to compute (92 GMAC for a 12,000-image, 640-d bank) and its entries are read
at random from ``N²`` floats: on the benchmark CPU computing ``G`` alone took longer than evaluating ten
thousand episodes by gathering (see ``simret/bench/fewshot.py``, which measures both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union

import numpy as np

from simret.fewshot.episodes import Episodes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from simret.fewshot.methods import FewShotMethod, PrototypeMethod

Z_95 = 1.96
GATHER_BUDGET = 1 << 23  # floats of gathered features per chunk (32 MB in float32)
PROTOTYPE_BUDGET = 1 << 22  # prototype floats per chunk on the FAISS path (16 MB)


def confidence_interval(accuracies: Any, z: float = Z_95) -> float:
    """Half-width of the 95% confidence interval: ``z · std(accuracies, ddof=0) / √E``."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"accuracies must be a non-empty 1-D array, got shape {values.shape}")
    return float(z * values.std() / math.sqrt(values.size))


@dataclass
class FewShotResult:
    """Per-episode accuracies (fractions in [0, 1]) and their summary."""

    accuracies: np.ndarray
    method: str
    n_way: int
    n_shot: int
    n_query: int
    seed: Optional[int] = None
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_episodes(self) -> int:
        return int(self.accuracies.shape[0])

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def std(self) -> float:
        """Population standard deviation (``ddof=0``) of the per-episode accuracies."""
        return float(self.accuracies.std())

    @property
    def ci95(self) -> float:
        """``1.96 · std / √E`` (``std`` with ``ddof=0``)."""
        return confidence_interval(self.accuracies)

    def format(self, percent: bool = True, digits: int = 2) -> str:
        """``"63.12 ± 0.45"`` (percent) or ``"0.6312 ± 0.0045"``."""
        scale = 100.0 if percent else 1.0
        digits = digits if percent else digits + 2
        return f"{self.mean * scale:.{digits}f} ± {self.ci95 * scale:.{digits}f}"

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "n_way": self.n_way, "n_shot": self.n_shot, "n_query": self.n_query,
                "n_episodes": self.n_episodes, "seed": self.seed, "mean": self.mean, "std": self.std,
                "ci95": self.ci95, **self.details}

    def __repr__(self) -> str:
        return (f"FewShotResult({self.method}, {self.n_way}-way {self.n_shot}-shot, {self.n_episodes} episodes: "
                f"{self.format()} %)")


def evaluate(features: Any, episodes: Episodes, method: Union[str, Callable, FewShotMethod] = "protonet", *,
             chunk_size: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
             progress: Optional[str] = None, **kwargs: Any) -> FewShotResult:
    """Accuracy of ``method`` on ``episodes`` drawn from the feature bank ``features``.

    Args:
        features: ``(N, D)`` array or tensor, or a ``FeatureBank`` (its ``features``); ``episodes`` index it.
        episodes: from ``sample_episodes``.
        method: a name for ``get_method`` (with ``**kwargs`` as its options, e.g. ``base_mean=``), a
            ``FewShotMethod``, or any callable ``(support (E,S,D), support_labels (E,S), query (E,Q,D)) →
            scores (E,Q,n_way)`` (tensors in; tensor or array out).
        chunk_size: episodes per chunk (default: a budget of 16–32 MB of gathered features or prototypes).
        device: where to compute (default: the features' device; CPU for arrays).
        progress: a label to show a progress bar over the episodes on stderr (e.g. ``"logreg 5-shot"``);
            None (default): no bar. Bars follow ``simret.utils.progress`` (off with ``simret -q``).

    Returns:
        ``FewShotResult`` with ``accuracies (E,)``, ``mean``, ``std``, ``ci95``.
    """
    import torch

    from simret.fewshot.methods import PrototypeMethod, as_tensor, get_method

    bank = getattr(features, "features", features)
    bank = as_tensor(bank, device=torch.device(device) if device is not None else None)
    if bank.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        bank = bank.float()
    if isinstance(method, str):
        name = method
        method = get_method(method, **kwargs)
    else:
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} only apply when the method is given by name")
        name = getattr(method, "name", getattr(method, "__name__", type(method).__name__))
    _check_episodes(episodes, bank.shape[0])
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with _bar(progress, len(episodes)) as bar, torch.inference_mode():
        if isinstance(method, PrototypeMethod):
            accuracies = _prototype_accuracies(bank, episodes, method, chunk_size, bar)
        else:
            accuracies = _generic_accuracies(bank, episodes, method, chunk_size, bar)
    return FewShotResult(accuracies, str(name), episodes.n_way, episodes.n_shot, episodes.n_query, episodes.seed)


def _check_episodes(episodes: Episodes, n_bank: int) -> None:
    for what in ("support", "query"):
        index = getattr(episodes, what)
        if index.ndim != 2 or index.shape[0] != len(episodes):
            raise ValueError(f"episodes.{what} must be (E, n), got shape {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= n_bank):
            raise ValueError(f"episodes.{what} indexes images {index.min()}..{index.max()}, but the feature bank "
                             f"holds {n_bank}: episodes drawn from another split?")
    if episodes.support_labels.shape != episodes.support.shape or episodes.query_labels.shape != episodes.query.shape:
        raise ValueError("episodes: labels and indices have different shapes")


def _chunk(chunk: Optional[int], rows_per_episode: int, dim: int, budget: int = GATHER_BUDGET) -> int:
    """Episodes per chunk: as given, or as many as keep ``budget`` floats of gathered features."""
    return int(chunk) if chunk is not None else max(1, budget // max(1, rows_per_episode * dim))


def _bar(label: Optional[str], total: int):
    """A progress bar over ``total`` episodes, or a do-nothing stand-in when ``label`` is None."""
    import contextlib

    if label is None:
        return contextlib.nullcontext(_NoBar())
    from simret.utils.progress import progress

    return progress(total=total, desc=str(label), unit="episode")


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _generic_accuracies(bank: torch.Tensor, episodes: Episodes, method: Callable, chunk: Optional[int],
                        bar: Any = None) -> np.ndarray:
    """Any method: gather each chunk's features, call the method once per chunk."""
    from simret.fewshot.methods import as_tensor

    device, dim = bank.device, bank.shape[1]
    chunk = _chunk(chunk, episodes.support.shape[1] + episodes.query.shape[1], dim)
    out = np.empty(len(episodes), dtype=np.float64)
    for begin in range(0, len(episodes), chunk):
        part = episodes[begin:begin + chunk]
        e = len(part)
        support = bank.index_select(0, _index(part.support, device)).view(e, -1, dim)
        query = bank.index_select(0, _index(part.query, device)).view(e, -1, dim)
        labels = _index(part.support_labels, device).view(e, -1)
        scores = method(support, labels, query)
        scores = as_tensor(scores).to(device)
        if scores.shape[:2] != query.shape[:2]:
            raise ValueError(f"method returned scores of shape {tuple(scores.shape)} for queries "
                             f"{tuple(query.shape[:2])}")
        out[begin:begin + e] = _accuracy(scores.argmax(-1).cpu().numpy(), part.query_labels)
        if bar is not None:
            bar.update(e)
    return out


def _prototype_accuracies(bank: torch.Tensor, episodes: Episodes, method: PrototypeMethod,
                          chunk: Optional[int], bar: Any = None) -> np.ndarray:
    """Nearest-prototype methods scored from the (normalised) bank; see the module docstring."""
    import torch

    features = method.transform(bank).contiguous()
    n_way, dim = episodes.n_way, features.shape[1]
    n_query = episodes.query.shape[1]
    use_faiss = features.device.type == "cpu" and features.dtype == torch.float32 and _faiss() is not None
    chunk = _chunk(chunk, n_way if use_faiss else n_way + n_query, dim,
                   PROTOTYPE_BUDGET if use_faiss else GATHER_BUDGET)
    out = np.empty(len(episodes), dtype=np.float64)
    for begin in range(0, len(episodes), chunk):
        part = episodes[begin:begin + chunk]
        e = len(part)
        prototypes = _prototypes(features, part)  # (e, W, D)
        if method.metric == "cosine":  # cos(q, μ) ranks classes as q·μ/‖μ‖ does
            prototypes = torch.nn.functional.normalize(prototypes, dim=-1, eps=1e-12)
            half_norms = None
        else:  # -‖q − μ‖ and -‖q − μ‖² rank classes as 2 q·μ − ‖μ‖², i.e. q·μ − ‖μ‖²/2, do
            half_norms = 0.5 * (prototypes * prototypes).sum(-1)  # (e, W)
        if use_faiss:
            dots = _faiss_dots(features.numpy(), prototypes.numpy(), part.query)  # (e, W, Q)
            if half_norms is not None:
                dots -= half_norms.numpy()[:, :, None]
            out[begin:begin + e] = _accuracy_over_classes(dots, part.query_labels)
        else:
            query = features.index_select(0, _index(part.query, features.device)).view(e, n_query, dim)
            scores = torch.bmm(query, prototypes.transpose(1, 2))  # (e, Q, W)
            if half_norms is not None:
                scores -= half_norms.unsqueeze(1)
            out[begin:begin + e] = _accuracy(scores.argmax(-1).cpu().numpy(), part.query_labels)
        if bar is not None:
            bar.update(e)
    return out


def _prototypes(features: torch.Tensor, episodes: Episodes) -> torch.Tensor:
    """Class means of the support features, ``(e, n_way, D)``, by one fused gather-and-mean (embedding_bag)."""
    import torch

    e, n_support = episodes.support.shape
    n_way, device = episodes.n_way, features.device
    shots = n_support // n_way
    if shots * n_way == n_support and (episodes.support_labels == np.repeat(np.arange(n_way), shots)).all():
        bags = torch.from_numpy(np.ascontiguousarray(episodes.support, dtype=np.int64)).view(e * n_way, shots)
        return torch.nn.functional.embedding_bag(bags.to(device), features, mode="mean").view(e, n_way, -1)
    # any order, any number of shots per class: sort each episode's support by label, one bag per class
    order = np.argsort(episodes.support_labels, axis=1, kind="stable")
    indices = np.take_along_axis(episodes.support, order, axis=1)
    counts = (episodes.support_labels[:, :, None] == np.arange(n_way)).sum(1)  # (e, W)
    if (counts == 0).any():
        episode, label = np.argwhere(counts == 0)[0]
        raise ValueError(f"episode {episode} has no support example of class {label} (n_way={n_way})")
    offsets = np.concatenate([[0], np.cumsum(counts.ravel())[:-1]])
    prototypes = torch.nn.functional.embedding_bag(_index(indices, device), features, _index(offsets, device),
                                                   mode="mean")
    return prototypes.view(e, n_way, -1)


def _faiss_dots(features: np.ndarray, prototypes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``(e, W, Q)`` products of every prototype with its episode's queries, by FAISS's fused gather-and-dot
    kernel (no query feature is copied). ``features (N, D)``, ``prototypes (e, W, D)`` float32, ``query (e, Q)``."""
    faiss = _faiss()
    e, n_way, dim = prototypes.shape
    n_query = query.shape[1]
    prototypes = np.ascontiguousarray(prototypes, dtype=np.float32).reshape(e * n_way, dim)
    ids = np.ascontiguousarray(np.broadcast_to(query[:, None, :], (e, n_way, n_query)), dtype=np.int64)
    dots = np.empty((e, n_way, n_query), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(dots), faiss.swig_ptr(prototypes), faiss.swig_ptr(features),
                                     faiss.swig_ptr(ids), dim, e * n_way, n_query)
    return dots


_FAISS: Dict[str, Any] = {}


def _faiss():
    """The faiss module when it offers the fused kernel, else None (then torch does the gathers)."""
    if "module" not in _FAISS:
        try:
            import faiss

            _FAISS["module"] = faiss if hasattr(faiss, "fvec_inner_products_by_idx") else None
        except ImportError:  # pragma: no cover - faiss is a dependency
            _FAISS["module"] = None
    return _FAISS["module"]


def _index(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).reshape(-1).to(device)


def _accuracy_over_classes(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(e, W, Q)`` class scores (classes on the middle axis) and ``(e, Q)`` labels → ``(e,)`` fraction of
    queries whose ``argmax`` over the classes is their label, exactly as ``scores.argmax(1)`` decides (a tie
    goes to the lowest class, NaN wins) without NumPy's slow arg-reduction over a middle axis: a query is right
    when its label's score equals the best one, and only queries with a tie or a NaN are decided by argmax."""
    best = np.maximum.reduce(scores, axis=1)  # (e, Q), contiguous row-wise maxima (NaN propagates)
    own = np.take_along_axis(scores, labels[:, None, :], axis=1)[:, 0]  # (e, Q): the label's score
    hit = own == best
    unclear = (scores == best[:, None, :]).sum(1) > 1  # several classes share the best score
    unclear |= np.isnan(best)
    if unclear.any():
        hit[unclear] = scores.argmax(1)[unclear] == labels[unclear]
    return hit.mean(axis=1)


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(e, Q)`` predicted labels vs ``(e, Q)`` true labels → ``(e,)`` fraction correct."""
    return (np.asarray(predictions) == np.asarray(labels)).mean(axis=1)
