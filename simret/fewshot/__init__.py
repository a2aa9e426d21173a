"""Few-shot: feature banks, reproducible episodes, batched methods, evaluation with 95% CI."""
