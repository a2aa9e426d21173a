"""Encoders and pooling: SimPool, the pooling registry, timm encoders and their weights."""
from simret.models.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    WeightsError,
    WeightsNotFoundError,
    WeightsUnavailableError,
    list_official_checkpoints,
)
from simret.models.encoder import (
    Encoder,
    RandomWeightsWarning,
    create_encoder,
    encoder_metadata,
    load_encoder,
    save_encoder,
)
from simret.models.pooling import (
    AvgPool,
    ClsPool,
    GeMPool,
    MaxPool,
    create_pool,
    list_pools,
    register_pool,
)
from simret.models.simpool import SimPool

__all__ = [
    "SimPool", "AvgPool", "MaxPool", "GeMPool", "ClsPool", "create_pool", "list_pools", "register_pool",
    "Encoder", "create_encoder", "load_encoder", "save_encoder", "encoder_metadata", "RandomWeightsWarning",
    "WeightsError", "WeightsNotFoundError", "WeightsUnavailableError", "OFFICIAL_CHECKPOINTS",
    "list_official_checkpoints",
]
