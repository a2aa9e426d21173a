"""Top-1 / top-n hits of class scores, ranked exactly as DINO ranks them.

Classes are ranked by ``torch.sort(scores, dim=1, descending=True)`` — the call of DINO's
``knn_classifier`` (``probs.sort(1, True)``). Where scores tie exactly, that sort is not stable: tied classes
come in an order of torch's choosing (fixed for a given torch build and device). With k-NN votes this
happens for classes that received no vote at all: when fewer than ``n`` classes got votes, the remaining
places of the top-``n`` go to unvoted classes, and DINO counts a hit if the label is among them. simret
keeps that behaviour so its numbers are DINO's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import torch


def ranked_classes(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, C)`` scores → ``(B, min(n, C))`` class indices, best first (ties as ``torch.sort`` leaves them)."""
    import torch

    order = torch.sort(scores, dim=1, descending=True).indices
    return order[:, :min(int(n), scores.shape[1])]


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, n: int = 5) -> Tuple[int, int]:
    """How many rows have their label first, and among the first ``n``: ``(hits@1, hits@n)``.

    Args:
        scores: ``(B, C)`` class scores, higher is better.
        labels: ``(B,)`` int64 class indices.
        n: the second rank cut-off (5 for top-5; ``min(5, k)`` for k-NN, as DINO). With fewer than ``n``
            classes every label is within the first ``n``.
    """
    top = ranked_classes(scores, n)
    correct = top.eq(labels.view(-1, 1))
    return int(correct[:, 0].sum()), int(correct.any(dim=1).sum())
