"""Classification heads on ``(B, D)`` descriptors: linear (cross-entropy) and ArcFace.

Every head has ``head(features) → logits (B, C)`` for predictions and
``head.loss(features, labels) → (loss, logits)``, where ``loss`` is the mean over the batch and ``logits``
are the prediction logits (without any margin), for accuracy.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
HEADS = ("ce", "arcface")


class LinearHead(nn.Module):
    """``logits = W x + b``, trained with cross-entropy (optionally label-smoothed)."""

    def __init__(self, dim: int, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.fc = nn.Linear(dim, num_classes)
        self.label_smoothing = float(label_smoothing)

    def forward(self, features: Tensor) -> Tensor:
        """features ``(B, D)`` → logits ``(B, C)``."""
        return self.fc(features)

    def loss(self, features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self(features)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits


class ArcFaceHead(nn.Module):
    """ArcFace (Deng et al., CVPR 2019): additive angular margin on normalised features and class weights.

    ``cos θ_j = <x/|x|, W_j/|W_j|>``; the target class's logit becomes ``s·cos(θ_y + m)`` (with the usual
    fallback ``s·(cos θ_y − m·sin m)`` once ``θ_y + m`` would pass π, which keeps the logit monotonic), the
    others stay ``s·cos θ_j``; the loss is cross-entropy on these logits. Predictions use ``s·cos θ``.
    """

    def __init__(self, dim: int, num_classes: int, margin: float = 0.5, scale: float = 30.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must be in [0, π/2) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"ArcFace scale must be positive, got {scale}")
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = float(margin)
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)

    def cosine(self, features: Tensor) -> Tensor:
        """features ``(B, D)`` → cosine similarities to every class ``(B, C)``."""
        return F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * self.cosine(features)

    def loss(self, features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        cos = self.cosine(features)
        target = cos.gather(1, labels[:, None])  # (B, 1)
        sin = (1.0 - target * target).clamp(min=1e-12).sqrt()
        with_margin = target * math.cos(self.margin) - sin * math.sin(self.margin)  # cos(θ + m)
        fallback = target - math.sin(math.pi - self.margin) * self.margin  # θ + m > π
        with_margin = torch.where(target > math.cos(math.pi - self.margin), with_margin, fallback)
        logits = cos.scatter(1, labels[:, None], with_margin)
        loss = F.cross_entropy(self.scale * logits, labels, label_smoothing=self.label_smoothing)
        return loss, self.scale * cos


def create_head(kind: str, dim: int, num_classes: int, *, margin: float = 0.5, scale: float = 30.0,
                label_smoothing: float = 0.0) -> nn.Module:
    """``ce`` → ``LinearHead``; ``arcface`` → ``ArcFaceHead`` (``margin`` in radians, ``scale``)."""
    if num_classes < 2:
        raise ValueError(f"a classification head needs at least 2 classes, got {num_classes}")
    if kind == "ce":
        return LinearHead(dim, num_classes, label_smoothing)
    if kind == "arcface":
        return ArcFaceHead(dim, num_classes, margin, scale, label_smoothing)
    raise ValueError(f"unknown head/loss {kind!r}; choose from {', '.join(HEADS)}")
