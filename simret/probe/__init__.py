"""Probes of frozen features: DINO's weighted k-NN and a linear classifier, on cached feature banks.

    from simret.probe import knn_classify, linear_probe
    top1, top5 = knn_classify(train_features, train_labels, test_features, test_labels, k=20)
    result = linear_probe(train_features, train_labels, test_features, test_labels)

``import simret.probe`` imports NumPy only; torch loads when a probe runs.
"""
from __future__ import annotations

from simret.utils.lazy import lazy_exports

_EXPORTS = {
    "knn_classify": "simret.probe.knn",
    "knn_accuracy": "simret.probe.knn",
    "knn_votes": "simret.probe.knn",
    "DINO_KS": "simret.probe.knn",
    "linear_probe": "simret.probe.linear",
    "LinearProbeResult": "simret.probe.linear",
    "LEARNING_RATES": "simret.probe.linear",
    "ProbeBanks": "simret.probe.run",
    "load_probe_splits": "simret.probe.run",
    "probe_banks": "simret.probe.run",
    "run_probe": "simret.probe.run",
    "PROBE_METHODS": "simret.probe.run",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
