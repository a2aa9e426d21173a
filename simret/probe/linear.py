"""Linear probe: a linear classifier trained on frozen, cached features, with DINOv2's learning-rate sweep.

What DINO (``eval_linear.py``, used by the SimPool paper) does: a BN-free ``nn.Linear`` (weights
``N(0, 0.01)``, bias 0) on the frozen features as they come (the pooled output; CLS tokens for the
official ViTs), SGD with momentum 0.9 and no weight decay, a learning rate scaled by ``batch / 256``
(``--lr 0.001`` by default), cosine annealing to 0, 100 epochs, trained on images with
``RandomResizedCrop`` + flips, and the best validation accuracy over the epochs is reported. DINOv2
(``dinov2/eval/linear.py``) trains one such classifier per learning rate of the grid
``1e-5 … 0.1`` (``LEARNING_RATES``) on the same batches and reports the one best on the validation split.

What ``linear_probe`` does, on features extracted once (no augmentation, hence fast, deterministic and
cacheable — and therefore **not** the paper's number, which needs the augmented training of eval_linear.py):

* features normalised by ``norm``: ``"bn"`` (default) standardises every dimension with the train split's
  mean and (biased) variance, ``(x − μ) / √(σ² + 1e-5)`` — a ``BatchNorm1d(affine=False)`` in eval mode
  with the statistics of the whole train split, as in MAE's / MoCo v3's linear probe; it makes one learning
  rate grid fit encoders whose feature scales differ by orders of magnitude. ``"l2n"``: L2-normalised;
  ``"none"``: as they come (DINO);
* one linear classifier per learning rate (default: DINOv2's grid, each scaled by ``batch_size / 256``),
  all trained together on the same shuffled mini-batches (``batch_size`` 1024 = DINO's 8 GPUs × 128),
  cross-entropy, SGD momentum 0.9, weight decay 0, cosine annealing per step to 0 over ``epochs`` epochs
  (100, as DINO and SimPool), weights ``N(0, 0.01)`` and bias 0 drawn from ``seed``;
* every classifier is scored on the test (validation) split after the last epoch; the result is the one with
  the best top-1 there (DINOv2's choice, ties to the smaller rate), and every rate's scores are kept.

Same inputs and seed, same result (on the same device type).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

# dinov2/eval/linear.py defaults (per batch of 256; scaled by batch_size / 256)
LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
NORMS = ("bn", "l2n", "none")
BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default
MOMENTUM = 0.9
INIT_STD = 0.01
DEFAULT_EPOCHS = 100
DEFAULT_BATCH_SIZE = 1024
EVAL_BUDGET = 1 << 24  # logits floats per chunk of test features
STATS_CHUNK = 1 << 16  # rows per chunk when the "bn" statistics are accumulated


@dataclass
class LinearProbeResult:
    """The classifier chosen on the test split and every rate's scores (accuracies are fractions)."""

    top1: float
    top5: float
    learning_rate: float  # per batch of 256, as given
    scaled_learning_rate: float  # what SGD used: learning_rate * batch_size / 256
    norm: str
    epochs: int
    batch_size: int
    seed: int
    sweep: List[Dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"method": "linear", "top1": self.top1, "top5": self.top5, "learning_rate": self.learning_rate,
                "scaled_learning_rate": self.scaled_learning_rate, "norm": self.norm, "epochs": self.epochs,
                "batch_size": self.batch_size, "seed": self.seed, "selected_on": "test split (best top-1)",
                "sweep": self.sweep}


def linear_probe(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                 n_classes: Optional[int] = None, *, learning_rates: Sequence[float] = LEARNING_RATES,
                 epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE, norm: str = "bn",
                 seed: int = 0, device: Union[str, torch.device, None] = None,
                 progress: Optional[str] = None) -> LinearProbeResult:
    """Train and score linear classifiers on frozen features (see the module docstring).

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)`` ints in ``0..n_classes-1``.
        test_features: ``(M, D)``; test_labels: ``(M,)``.
        n_classes: default ``max(train_labels) + 1``.
        learning_rates: per batch of 256 (each is multiplied by ``batch_size / 256``).
        epochs, batch_size: passes over the train features and rows per SGD step.
        norm: ``bn``, ``l2n`` or ``none``. seed: initial weights and batch order.
        device: where to train (default: the features' device; CPU for arrays).
        progress: a label for a progress bar over the epochs (None: no bar).

    Raises:
        ValueError: bad shapes or labels, an empty split, a non-positive rate, epochs or batch size.
    """
    import torch

    from simret.probe.knn import _features, _labels, progress_bar

    rates = _check_options(learning_rates, epochs, batch_size, norm)
    target = torch.device(device) if device is not None else None
    train = _features(train_features, "train_features", target, normalize=False)
    test = _features(test_features, "test_features", train.device, normalize=False)
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError("the linear probe needs training and test features")
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"test features are {test.shape[1]}-d, train features {train.shape[1]}-d")
    train_y = _labels(train_labels, "train_labels", train.shape[0], n_classes, train.device)
    n_classes = int(n_classes) if n_classes is not None else int(train_y.max()) + 1
    test_y = _labels(test_labels, "test_labels", test.shape[0], n_classes, train.device)
    train, test = normalise_pair(train, test, norm)
    scaled = [rate * batch_size / 256.0 for rate in rates]
    with progress_bar(progress, epochs, "epoch") as bar:
        weight, bias = train_linear(train, train_y, n_classes, scaled, epochs=epochs, batch_size=batch_size, seed=seed,
                                    bar=bar)
    with torch.inference_mode():
        scores = _score(weight, bias, test, test_y)
    sweep = [{"learning_rate": rate, "scaled_learning_rate": lr, "top1": top1, "top5": top5}
             for rate, lr, (top1, top5) in zip(rates, scaled, scores)]
    best = max(range(len(rates)), key=lambda i: (scores[i][0], -i))
    return LinearProbeResult(scores[best][0], scores[best][1], rates[best], scaled[best], norm, int(epochs),
                             int(batch_size), int(seed), sweep)


def normalise_pair(train: torch.Tensor, test: torch.Tensor, norm: str):
    """Both splits normalised as ``norm`` says, with statistics from the train split only."""
    import torch

    if norm == "none":
        return train, test
    if norm == "l2n":
        return torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    mean = train.mean(0, dtype=torch.float64)
    squares = torch.zeros_like(mean)
    for begin in range(0, train.shape[0], STATS_CHUNK):  # the variance in float64, never a float64 copy
        squares += (train[begin:begin + STATS_CHUNK].double() - mean).square_().sum(0)
    scale = (squares / train.shape[0] + BN_EPS).rsqrt().float()
    mean = mean.float()
    return (train - mean) * scale, (test - mean) * scale


def train_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, rates: Sequence[float], *, epochs: int,
                 batch_size: int, seed: int = 0, bar: Any = None):
    """Train one linear classifier per learning rate on the same batches; returns ``weight (L, C, D)``, ``bias (L, C)``.

    ``x (N, D)`` float features (already normalised), ``y (N,)`` int64 labels, ``rates`` the learning rates SGD
    uses (already scaled). Each classifier follows ``torch.optim.SGD(momentum=0.9, weight_decay=0)`` with
    ``CosineAnnealingLR(T_max=all steps, eta_min=0)`` stepped after every batch, cross-entropy loss, weights
    ``N(0, 0.01)`` then one ``randperm`` per epoch, both drawn from a CPU generator seeded with ``seed``.
    """
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    epochs, batch_size = int(epochs), int(batch_size)
    n, dim = x.shape
    heads = len(rates)
    weight = torch.empty(heads, n_classes, dim).normal_(0.0, INIT_STD, generator=generator).to(x.device)
    bias = torch.zeros(heads, n_classes, device=x.device)
    weight_buf, bias_buf = torch.zeros_like(weight), torch.zeros_like(bias)
    base = torch.tensor([float(rate) for rate in rates], dtype=x.dtype, device=x.device)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for begin in range(0, n, batch_size):
            rows = order[begin:begin + batch_size]
            batch, labels = x.index_select(0, rows), y.index_select(0, rows)
            grad_w, grad_b = _gradients(weight, bias, batch, labels)
            lr = base * (0.5 * (1.0 + math.cos(math.pi * step / total)))  # CosineAnnealingLR, eta_min 0
            if step:  # torch.optim.SGD: buf = momentum·buf + grad, buf = grad at the first step
                weight_buf.mul_(MOMENTUM).add_(grad_w)
                bias_buf.mul_(MOMENTUM).add_(grad_b)
            else:
                weight_buf.copy_(grad_w)
                bias_buf.copy_(grad_b)
            weight.sub_(lr.view(-1, 1, 1) * weight_buf)
            bias.sub_(lr.view(-1, 1) * bias_buf)
            step += 1
        if bar is not None:
            bar.update(1)
    return weight, bias


def _logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(L, C, D)``, ``(L, C)``, ``(B, D)`` → ``(L, B, C)``."""
    import torch

    return torch.baddbmm(bias.unsqueeze(1), x.unsqueeze(0).expand(weight.shape[0], -1, -1), weight.transpose(1, 2))


def _gradients(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Gradients of every head's mean cross-entropy on the batch ``x (B, D)``, ``y (B,)``."""
    import torch

    probs = torch.softmax(_logits(weight, bias, x), dim=-1)  # (L, B, C)
    probs[:, torch.arange(x.shape[0], device=x.device), y] -= 1.0
    probs /= x.shape[0]
    grad_w = torch.bmm(probs.transpose(1, 2), x.unsqueeze(0).expand(weight.shape[0], -1, -1))  # (L, C, D)
    return grad_w, probs.sum(1)


def _score(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> List[tuple]:
    """``[(top1, top5)]`` per head (fractions) on ``x``, ``y``; top-5 is top-n for fewer than 5 classes."""
    from simret.probe.metrics import topk_hits

    heads, n_classes = weight.shape[:2]
    rows = max(1, EVAL_BUDGET // max(1, heads * n_classes))
    hits = np.zeros((heads, 2), dtype=np.int64)
    for begin in range(0, x.shape[0], rows):
        logits = _logits(weight, bias, x[begin:begin + rows])
        labels = y[begin:begin + rows]
        for head in range(heads):
            hits[head] += topk_hits(logits[head], labels, 5)
    return [(float(h1) / x.shape[0], float(h5) / x.shape[0]) for h1, h5 in hits]


def _check_options(rates: Sequence[float], epochs: int, batch_size: int, norm: str) -> List[float]:
    values = [float(rate) for rate in rates]
    if not values or not all(rate > 0 and math.isfinite(rate) for rate in values):
        raise ValueError(f"learning rates must be finite numbers > 0, got {', '.join(map(str, values)) or 'none'}")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise ValueError(f"epochs and batch size must be at least 1, got {epochs}, {batch_size}")
    if norm not in NORMS:
        raise ValueError(f"unknown feature normalisation {norm!r}: use {', '.join(NORMS)}")
    return list(dict.fromkeys(values))
