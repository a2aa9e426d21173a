"""Weighted k-NN classification of frozen features, exactly DINO's protocol (``eval_knn.py``).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, ICCV 2021), after Wu et
al. 2018 (instance discrimination). For every test feature:

1. train and test features are L2-normalised (``normalize=True``; DINO normalises them once after extraction);
2. its ``k`` nearest training features by cosine similarity ``s`` are found (``topk``, largest first);
3. each neighbour votes for its class with weight ``exp(s / T)`` (``T = 0.07``); the votes are summed per class;
4. classes are ranked by their summed votes: top-1 is the best class, top-5 whether the label is among the
   first ``min(5, k)`` (DINO: "top5 does not make sense if k < 5"). Classes are ranked by DINO's own call,
   ``sort(descending=True)``, so even ties among unvoted classes fall as in DINO (``simret.probe.metrics``).

DINO evaluates ``k`` in {10, 20, 100, 200} (``--nb_knn``; 20 "is usually working the best") and reports
percentages; simret returns fractions in [0, 1]. Test features are processed in chunks (``chunk_size`` rows,
by default as many as keep the ``(chunk, N_train)`` similarity block near 128 MB); the results do not
depend on the chunking. ``knn_accuracy`` finds the neighbours once for the largest ``k`` and reads every
smaller ``k`` from them, where DINO searches again per ``k`` (same neighbours: ``topk`` is sorted).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

DINO_KS = (10, 20, 100, 200)
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
SIMILARITY_BUDGET = 1 << 25  # similarity floats per chunk of test features (128 MB in float32)


def knn_classify(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, n_classes: Optional[int] = None, **kwargs: Any
                 ) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of the weighted k-NN classifier; see the module docstring.

    Args:
        train_features: ``(N, D)`` array or tensor; train_labels: ``(N,)`` ints in ``0..n_classes-1``.
        test_features: ``(M, D)``; test_labels: ``(M,)``.
        k: neighbours (1..N); temperature: ``T`` of the vote weights ``exp(s / T)``.
        n_classes: number of classes (default ``max(train_labels) + 1``).
        kwargs: ``normalize``, ``chunk_size``, ``device`` as for ``knn_accuracy``.
    """
    return knn_accuracy(train_features, train_labels, test_features, test_labels, ks=(k,), temperature=temperature,
                        n_classes=n_classes, **kwargs)[int(k)]


def knn_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                 ks: Iterable[int] = (DEFAULT_K,), temperature: float = DEFAULT_TEMPERATURE,
                 n_classes: Optional[int] = None, *, normalize: bool = True, chunk_size: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, progress: Optional[str] = None
                 ) -> Dict[int, Tuple[float, float]]:
    """``{k: (top1, top5)}`` (fractions) for every ``k`` of ``ks``; shapes as for ``knn_classify``.

    ``progress``: a label for a progress bar over the test features (None: no bar).

    Raises:
        ValueError: mismatched shapes, labels out of range, ``k`` outside ``1..N``, ``temperature <= 0``.
    """
    import torch

    ks = _check_ks(ks)
    train, train_y, n_classes = _train_side(train_features, train_labels, n_classes, normalize, device)
    test = _features(test_features, "test_features", train.device, normalize)
    test_y = _labels(test_labels, "test_labels", test.shape[0], n_classes, train.device)
    _check_query(train, test, ks, temperature)
    hits = {k: [0, 0] for k in ks}
    with torch.inference_mode(), progress_bar(progress, test.shape[0], "img") as bar:
        for begin, similarities, neighbours in _neighbours(train, test, max(ks), chunk_size):
            labels = test_y[begin:begin + neighbours.shape[0]]
            for k in ks:
                votes = _votes(similarities[:, :k], train_y[neighbours[:, :k]], temperature, n_classes)
                top1, top5 = _hits(votes, labels, min(5, k))
                hits[k][0] += top1
                hits[k][1] += top5
            bar.update(neighbours.shape[0])
    total = test.shape[0]
    return {k: (hits[k][0] / total, hits[k][1] / total) for k in ks}


def knn_votes(train_features: Any, train_labels: Any, test_features: Any, k: int = DEFAULT_K,
              temperature: float = DEFAULT_TEMPERATURE, n_classes: Optional[int] = None, *, normalize: bool = True,
              chunk_size: Optional[int] = None, device: Union[str, torch.device, None] = None) -> np.ndarray:
    """The summed vote of every class for every test feature: ``(M, n_classes)`` float32 (argmax = prediction)."""
    import torch

    train, train_y, n_classes = _train_side(train_features, train_labels, n_classes, normalize, device)
    test = _features(test_features, "test_features", train.device, normalize)
    (k,) = _check_ks((k,))
    _check_query(train, test, (k,), temperature)
    out = np.empty((test.shape[0], n_classes), dtype=np.float32)
    with torch.inference_mode():
        for begin, similarities, neighbours in _neighbours(train, test, k, chunk_size):
            votes = _votes(similarities, train_y[neighbours], temperature, n_classes)
            out[begin:begin + votes.shape[0]] = votes.float().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------ stages


def _neighbours(train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: Optional[int]):
    """Yield ``(begin, similarities (B, k), indices (B, k))`` per chunk of test rows, most similar first."""
    import torch

    rows = int(chunk_size) if chunk_size is not None else max(1, SIMILARITY_BUDGET // max(1, train.shape[0]))
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    train_t = train.t()
    for begin in range(0, test.shape[0], rows):
        similarity = torch.mm(test[begin:begin + rows], train_t)  # (B, N) cosine similarities
        values, indices = similarity.topk(k, dim=1, largest=True, sorted=True)
        yield begin, values, indices


def _votes(similarities: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float,
           n_classes: int) -> torch.Tensor:
    """``(B, k)`` similarities and neighbour labels → ``(B, n_classes)`` sums of ``exp(s / T)`` per class."""
    import torch

    weights = similarities.clone().div_(temperature).exp_()
    votes = torch.zeros(similarities.shape[0], n_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def _hits(votes: torch.Tensor, labels: torch.Tensor, n: int) -> Tuple[int, int]:
    from simret.probe.metrics import topk_hits

    return topk_hits(votes, labels, n)


def progress_bar(label: Optional[str], total: int, unit: str):
    """A progress bar on stderr (``simret.utils.progress``), or a do-nothing stand-in when ``label`` is None."""
    import contextlib

    from simret.utils.progress import progress

    return progress(total=total, desc=str(label), unit=unit) if label is not None else contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int) -> None:
        pass


# ------------------------------------------------------------------------------------------ checks


def _check_ks(ks: Iterable[int]) -> Tuple[int, ...]:
    values = tuple(dict.fromkeys(int(k) for k in ks))
    if not values or min(values) < 1:
        raise ValueError(f"k must be at least 1, got {', '.join(map(str, values)) or 'nothing'}")
    return values


def _train_side(features: Any, labels: Any, n_classes: Optional[int], normalize: bool,
                device: Union[str, torch.device, None]):
    import torch

    target = torch.device(device) if device is not None else None
    train = _features(features, "train_features", target, normalize)
    if train.shape[0] == 0:
        raise ValueError("no training features: k-NN needs at least one labelled training image")
    raw = _labels(labels, "train_labels", train.shape[0], None, train.device)
    if n_classes is None:
        n_classes = int(raw.max()) + 1
    elif int(raw.max()) >= int(n_classes):
        raise ValueError(f"train_labels must lie in 0..{int(n_classes) - 1}, found {int(raw.max())}")
    return train, raw, int(n_classes)


def _features(values: Any, what: str, device, normalize: bool) -> torch.Tensor:
    import torch

    from simret.fewshot.methods import as_tensor

    tensor = as_tensor(getattr(values, "features", values), device=device)
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be (N, D), got shape {tuple(tensor.shape)}")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} hold NaN or infinite values: extract them again")
    return torch.nn.functional.normalize(tensor, dim=1, p=2) if normalize else tensor


def _labels(values: Any, what: str, count: int, n_classes: Optional[int], device) -> torch.Tensor:
    import torch

    from simret.fewshot.methods import as_tensor

    tensor = as_tensor(values if isinstance(values, torch.Tensor) else np.asarray(values), device=device)
    if tensor.ndim != 1 or tensor.shape[0] != count:
        raise ValueError(f"{what} must be ({count},), got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        raise ValueError(f"{what} must be integers, got {tensor.dtype}")
    tensor = tensor.long()
    if count and int(tensor.min()) < 0:
        raise ValueError(f"{what} must not be negative, found {int(tensor.min())}")
    if n_classes is not None and count and int(tensor.max()) >= n_classes:
        raise ValueError(f"{what} must lie in 0..{n_classes - 1}, found {int(tensor.max())}")
    return tensor


def _check_query(train: torch.Tensor, test: torch.Tensor, ks: Sequence[int], temperature: float) -> None:
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"test features are {test.shape[1]}-d, train features {train.shape[1]}-d")
    if test.shape[0] == 0:
        raise ValueError("no test features to classify")
    if max(ks) > train.shape[0]:
        raise ValueError(f"k={max(ks)} is more than the {train.shape[0]} training images: use k <= {train.shape[0]}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
