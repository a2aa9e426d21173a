"""Encoders and pooling: SimPool, the pooling registry, timm encoders and their weights.

Importing ``simret.models`` is cheap: the names below load their module (torch, timm) on first use, so
the command line can read ``simret.models.defaults`` without importing torch.

* ``create_encoder(arch, pool="simpool", gamma=None, weights=None)`` → ``Encoder`` (images → ``(B, D)``)
* ``save_encoder`` / ``load_encoder``: one file holding configuration and weights
* ``resolve_weights`` → ``WeightsSource`` (where the weights come from), ``read_weights`` (their tensors)
* ``SimPool`` and the pooling registry (``create_pool``, ``register_pool``, ``list_pools``)
"""
from __future__ import annotations

from simret.utils.lazy import lazy_exports

_EXPORTS = {
    "SimPool": "simret.models.simpool",
    **{name: "simret.models.pooling" for name in (
        "AvgPool", "MaxPool", "GeMPool", "ClsPool", "create_pool", "list_pools", "register_pool")},
    **{name: "simret.models.encoder" for name in (
        "Encoder", "create_encoder", "load_encoder", "save_encoder", "encoder_metadata", "RandomWeightsWarning")},
    **{name: "simret.models.checkpoints" for name in (
        "WeightsError", "WeightsNotFoundError", "WeightsUnavailableError", "OFFICIAL_CHECKPOINTS",
        "list_official_checkpoints", "resolve_weights", "read_weights", "WeightsSource")},
    "DEFAULT_ARCH": "simret.models.defaults",
    "arch_or_default": "simret.models.defaults",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
