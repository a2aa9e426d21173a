"""Defaults of the model layer that the command line reads too: this module imports nothing heavy, so
``simret --help`` can use it without importing torch."""
from __future__ import annotations

from typing import Any, Optional

DEFAULT_ARCH = "resnet50"
"""The architecture built when none is named and the weights name none either (timm's weights, random init)."""


def arch_or_default(arch: Optional[str], weights: Any) -> Optional[str]:
    """The architecture to build: ``arch``; else ``DEFAULT_ARCH`` for weights that name no architecture
    (None, ``none``, ``random``, ``timm``); else None: files and official checkpoints name their own."""
    if arch is None and (weights is None or str(weights) in ("none", "random", "timm")):
        return DEFAULT_ARCH
    return arch
