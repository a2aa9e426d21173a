"""Describe a handful of images (files or PIL images) in memory, preprocessed exactly as a feature bank's."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

ImageInput = Union[str, os.PathLike, "Image.Image"]


def bank_transform(encoder, settings: Dict[str, Any]):
    """The eval transform ``extract_features`` uses for ``settings`` (``{"image_size", "crop_pct"}``)."""
    from simret.data.images import classification_transform

    size = int(settings["image_size"])
    return classification_transform(encoder.data_config, input_size=(3, size, size), crop_pct=settings["crop_pct"])


def embed_images(encoder, images: Sequence[ImageInput], settings: Dict[str, Any], *, batch_size: int = 64,
                 workers: int = 0, device: Union[str, torch.device, None] = None
                 ) -> Tuple[np.ndarray, List[int], List[Tuple[int, str]]]:
    """Features of ``images``: ``(features (n, D) float32, kept indices, [(index, reason)] unreadable)``.

    ``images`` are paths (read in ``workers`` processes) or RGB-convertible PIL images; ``features[i]`` belongs
    to ``images[kept[i]]``; an unreadable file is reported with its reason, never raised.
    """
    import torch

    from simret.data.images import ImageList, collate_skip_failed

    transform = bank_transform(encoder, settings)
    if device is None:
        device = next(iter(encoder.parameters())).device
    device = torch.device(device)
    paths = [(i, str(Path(item).expanduser().resolve())) for i, item in enumerate(images) if _is_path(item)]
    pictures = [(i, item) for i, item in enumerate(images) if not _is_path(item)]
    rows: Dict[int, np.ndarray] = {}
    failures: List[Tuple[int, str]] = []
    encoder.eval()
    with torch.inference_mode():
        if paths:
            dataset = ImageList("/", [path for _, path in paths], transform)
            loader = torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), shuffle=False,
                                                 num_workers=int(workers), collate_fn=collate_skip_failed)
            for batch, indices, failed in loader:
                failures += [(paths[f.index][0], f.reason) for f in failed]
                if batch is not None:
                    features = encoder(batch.to(device)).float().cpu().numpy()
                    rows.update({paths[int(i)][0]: row for i, row in zip(indices, features)})
        for begin in range(0, len(pictures), int(batch_size)):
            chunk = pictures[begin:begin + int(batch_size)]
            batch = torch.stack([transform(picture.convert("RGB")) for _, picture in chunk])
            features = encoder(batch.to(device)).float().cpu().numpy()
            rows.update({index: row for (index, _), row in zip(chunk, features)})
    kept = sorted(rows)
    features = np.stack([rows[i] for i in kept]) if kept else np.zeros((0, int(encoder.dim)), dtype=np.float32)
    return features.astype(np.float32, copy=False), kept, sorted(failures)


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))
