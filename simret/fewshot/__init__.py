"""Few-shot: feature banks, reproducible episodes, batched methods, evaluation with 95% CI.

    from simret.fewshot import sample_episodes, evaluate, get_method
    episodes = sample_episodes(labels, n_way=5, n_shot=1, n_query=15, n_episodes=2000, seed=0)
    result = evaluate(features, episodes, "simpleshot", base_mean=train_features.mean(0))
    result.mean, result.ci95, result.accuracies          # fractions; ci95 = 1.96·std/√E (ddof=0)

A whole run on a split (feature banks, the same episodes for every method, a table), as ``simret fewshot``:

    from simret.fewshot import FewShotSettings, run_fewshot
    report = run_fewshot(encoder, "~/data/miniimagenet", FewShotSettings(shots=(1, 5), image_size=84))
    print(report.format())

``import simret.fewshot`` imports NumPy only; torch, scikit-learn, h5py and FAISS load when a method, an
evaluation or a feature bank needs them.
"""
from __future__ import annotations

from simret.fewshot.episodes import Episodes, sample_episodes
from simret.utils.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "simret.fewshot.evaluation",
    "FewShotResult": "simret.fewshot.evaluation",
    "confidence_interval": "simret.fewshot.evaluation",
    "get_method": "simret.fewshot.methods",
    "list_methods": "simret.fewshot.methods",
    "FewShotMethod": "simret.fewshot.methods",
    "MissingBaseMeanWarning": "simret.fewshot.methods",
    "FeatureBank": "simret.fewshot.features",
    "extract_features": "simret.fewshot.features",
    "feature_bank": "simret.fewshot.features",
    "load_feature_bank": "simret.fewshot.features",
    "FewShotSettings": "simret.fewshot.experiment",
    "FewShotReport": "simret.fewshot.experiment",
    "run_fewshot": "simret.fewshot.experiment",
}

__all__ = ["Episodes", "sample_episodes", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
