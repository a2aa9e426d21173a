"""Query descriptors for an index: query images described exactly as the index described its images.

One home for "describe these query images for this index", used by ``simret search`` and by
``simret serve``: the index's ``scales`` and ``max_size`` (from its ``meta.json``), an optional box per image
(cropped first, as ``--bbox``), then ``simret.retrieval.extraction.extract`` with the caller's encoder (at its
own precision: descriptors of any precision are comparable, the fingerprint is the same). The raw
descriptors returned go to ``IndexDir.search``, which whitens and normalises them as the index did.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Box = Tuple[float, float, float, float]
PathLike = Union[str, os.PathLike]


@dataclass
class QueryDescriptors:
    """Descriptors of the query images that could be used, and why the others could not.

    Attributes:
        names: the queries described, as given (row ``i`` of ``descriptors`` is ``names[i]``), in input order.
        descriptors: ``(n_ok, D)`` float32 raw descriptors (L2-normalised, not whitened).
        positions: ``(n_ok,)`` int64 positions of ``names`` in the input list.
        failures: ``(name, reason)`` of every query that could not be used, in input order.
    """

    names: List[str]
    descriptors: np.ndarray
    positions: np.ndarray
    failures: List[Tuple[str, str]] = field(default_factory=list)


def describe_settings(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The extraction settings of an index (``scales``, ``max_size``) from its ``meta.json`` record."""
    return {"scales": tuple(float(s) for s in meta["scales"]), "max_size": meta["max_size"]}


def describe_queries(encoder: Any, meta: Dict[str, Any], paths: Sequence[PathLike], *,
                     boxes: Optional[Sequence[Optional[Box]]] = None, batch_size: int = 16, workers: int = 0,
                     device: Any = None, progress: bool = False) -> QueryDescriptors:
    """Describe the query image files ``paths`` for the index whose ``meta.json`` record is ``meta``.

    Args:
        encoder: the index's encoder (same fingerprint; the caller checks it with ``IndexDir.check_queries``).
        meta: the index's meta record (``IndexDir.meta``): its scales and max_size are used.
        paths: image files (relative paths are taken from the working directory).
        boxes: optional ``(x1, y1, x2, y2)`` per image (None: the whole image), in pixels of the image.
        batch_size: images per forward pass (only images of equal size after resizing share one).
        workers: image-loading worker processes (0: load in this thread).
        device: where the encoder runs (default: where its parameters are).
        progress: show a progress bar.

    Returns:
        ``QueryDescriptors``: the raw ``(n_ok, D)`` descriptors, in input order, and the failures.
    """
    from simret.retrieval.extraction import extract

    names = [str(p) for p in paths]
    absolute = [str(Path(p).resolve()) for p in paths]
    result = extract(encoder, "/", absolute, boxes=list(boxes) if boxes is not None else None,
                     batch_size=batch_size, workers=workers, device=device, progress=progress,
                     **describe_settings(meta))
    reasons = dict(result.failures)
    kept = set(result.positions.tolist())
    failures = [(name, reasons[path]) for position, (name, path) in enumerate(zip(names, absolute))
                if position not in kept]
    return QueryDescriptors([names[i] for i in result.positions.tolist()], result.descriptors,
                            result.positions, failures)


def parse_box(text: Optional[str]) -> Optional[Box]:
    """``"x1,y1,x2,y2"`` (pixels) → a box; ``None`` or ``""`` → None.

    Raises:
        ValueError: not four finite numbers, or an empty box (x2 <= x1 or y2 <= y1).
    """
    if text is None or not text.strip():
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"bbox: expected x1,y1,x2,y2 in pixels, got {text!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"bbox: expected finite numbers of pixels, got {text!r}")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox: x2 > x1 and y2 > y1 needed, got {text!r}")
    return (x1, y1, x2, y2)
