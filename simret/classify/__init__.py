"""Label new images from a folder of examples (``simret classify``; ``POST /classify`` of ``simret serve``).

    from simret.classify import SupportClassifier
    predictions = SupportClassifier(encoder, "support/", method="protonet").classify(["a.jpg", "b.jpg"])

``import simret.classify`` imports NumPy only; torch loads when a classifier is built.
"""
from __future__ import annotations

from simret.utils.lazy import lazy_exports

_EXPORTS = {
    "SupportClassifier": "simret.classify.support",
    "Prediction": "simret.classify.support",
    "load_support": "simret.classify.support",
    "load_base_mean": "simret.classify.support",
    "inductive_methods": "simret.classify.support",
    "embed_images": "simret.classify.embed",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
