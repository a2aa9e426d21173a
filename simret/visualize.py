"""SimPool attention maps as pictures: upsampled, colour-mapped, overlaid, side by side with the image.

``attention_maps(encoder, paths)`` returns the raw maps; ``render_overlay`` makes the picture;
``simret attention`` writes both (PNG + ``.npy``) for a set of images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from simret.data.images import load_image, resize_long_side, to_tensor

# anchor colours of perceptually ordered maps (sampled from the matplotlib definitions), dark → bright
COLORMAPS = {
    "inferno": [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                (250, 193, 39), (252, 255, 164)],
    "viridis": [(68, 1, 84), (70, 50, 127), (54, 92, 141), (39, 127, 142), (31, 161, 135), (74, 194, 109),
                (159, 218, 58), (253, 231, 37)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0),
            (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


@dataclass
class AttentionMap:
    """One image's attention: ``map`` (h, w) float32 summing to 1 over the feature grid, and the image
    (RGB, resized as the encoder saw it)."""

    image_id: str
    map: np.ndarray
    image: Image.Image


def colorize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Values in [0, 1] of any shape → uint8 RGB of that shape + (3,), by piecewise-linear colour map."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.asarray(COLORMAPS[cmap], dtype=np.float32)
    positions = np.linspace(0.0, 1.0, len(anchors))
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, positions, anchors[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def normalise_map(attention: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1] (a constant map becomes all zeros)."""
    low, high = float(attention.min()), float(attention.max())
    if high - low < 1e-12:
        return np.zeros_like(attention, dtype=np.float32)
    return ((attention - low) / (high - low)).astype(np.float32)


def upsample_map(attention: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``(h, w)`` map → ``size=(width, height)`` by bilinear interpolation (cell centres aligned)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(attention, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def render_overlay(image: Image.Image, attention: np.ndarray, *, cmap: str = "inferno", alpha: float = 0.6,
                   side_by_side: bool = True) -> Image.Image:
    """The image and the colour-mapped attention blended over it (``alpha`` = weight of the map),
    side by side (image | overlay) unless ``side_by_side=False``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = colorize(normalise_map(upsample_map(attention, image.size)), cmap)
    blended = Image.blend(image.convert("RGB"), Image.fromarray(heat), alpha)
    if not side_by_side:
        return blended
    canvas = Image.new("RGB", (image.width * 2 + 8, image.height), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(blended, (image.width + 8, 0))
    return canvas


def attention_maps(encoder, sources: Iterable[Union[str, Path]], *, max_size: Optional[int] = 512,
                   device=None, ids: Optional[Sequence[str]] = None) -> List[AttentionMap]:
    """SimPool attention of ``encoder`` on each image file: list of ``AttentionMap`` (map ``(h, w)``).

    Images are resized so the long side is ``max_size`` (aspect kept) and fed one at a time.

    Raises:
        ValueError: the encoder's pooling has no attention (only SimPool has).
        simret.data.images.ImageReadError: an image cannot be read.
    """
    import torch

    if not hasattr(encoder.pool, "attention"):
        raise ValueError(f"attention maps need pool='simpool'; this encoder pools with {encoder.config['pool']!r}")
    device = device or next(encoder.parameters()).device
    config = encoder.data_config
    results = []
    paths = [Path(s) for s in sources]
    for number, path in enumerate(paths):
        image = resize_long_side(load_image(path), max_size, upscale=True)
        tensor = to_tensor(image, config["mean"], config["std"])[None].to(device)
        with torch.inference_mode():
            attention = encoder.attention(tensor)[0].float().cpu().numpy()
        results.append(AttentionMap(ids[number] if ids else path.name, attention, image))
    return results
