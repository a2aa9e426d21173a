"""Where simret keeps files between runs (no heavy imports)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """simret's cache root: ``$SIMRET_CACHE`` or ``~/.cache/simret``.

    Downloaded weights go to ``downloads/``, ``simret eval`` descriptors to ``eval/``, few-shot feature
    banks to ``fewshot/``.
    """
    return Path(os.environ.get("SIMRET_CACHE", Path.home() / ".cache" / "simret")).expanduser()
