"""Few-shot: feature banks, reproducible episodes, batched methods, evaluation with 95% CI.

    from simret.fewshot import sample_episodes, evaluate, get_method
    episodes = sample_episodes(labels, n_way=5, n_shot=1, n_query=15, n_episodes=2000, seed=0)
    result = evaluate(features, episodes, "simpleshot", base_mean=train_features.mean(0))
    result.mean, result.ci95, result.accuracies          # fractions; ci95 = 1.96·std/√E (ddof=0)

Names load lazily: ``import simret.fewshot`` imports neither torch nor NumPy.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

_EXPORTS: Dict[str, Tuple[str, str]] = {
    "Episodes": ("simret.fewshot.episodes", "Episodes"),
    "sample_episodes": ("simret.fewshot.episodes", "sample_episodes"),
    "get_method": ("simret.fewshot.methods", "get_method"),
    "list_methods": ("simret.fewshot.methods", "list_methods"),
    "FewShotMethod": ("simret.fewshot.methods", "FewShotMethod"),
    "MissingBaseMeanWarning": ("simret.fewshot.methods", "MissingBaseMeanWarning"),
    "evaluate": ("simret.fewshot.evaluate", "evaluate"),
    "FewShotResult": ("simret.fewshot.evaluate", "FewShotResult"),
    "confidence_interval": ("simret.fewshot.evaluate", "confidence_interval"),
    "FeatureBank": ("simret.fewshot.features", "FeatureBank"),
    "extract_features": ("simret.fewshot.features", "extract_features"),
    "feature_bank": ("simret.fewshot.features", "feature_bank"),
    "load_feature_bank": ("simret.fewshot.features", "load_feature_bank"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'simret.fewshot' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
