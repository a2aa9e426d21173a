"""Fine-tuning encoders with SimPool, single process or torchrun DDP.

``train(TrainConfig(data, out, ...))`` is what ``simret train`` runs; ``simret.utils.distributed`` holds
the process-group helpers (also for sharded extraction). Importing this package imports nothing heavy;
the names below load their modules on first use.
"""
from __future__ import annotations

from simret.utils.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "simret.train.trainer",
    "TrainResult": "simret.train.trainer",
    "train": "simret.train.trainer",
    "LabelledImages": "simret.train.data",
    "list_labelled_images": "simret.train.data",
    "create_head": "simret.train.heads",
    "LinearHead": "simret.train.heads",
    "ArcFaceHead": "simret.train.heads",
    "WarmupCosine": "simret.train.schedule",
    "load_checkpoint": "simret.train.checkpoint",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
