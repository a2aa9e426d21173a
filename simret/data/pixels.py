"""Every PIL image mode to faithful 8-bit RGB: the rules ``simret.data.images.load_image`` applies.

An image reaches the encoders as 8-bit RGB whatever it was stored as (``index``, ``search``, ``eval``,
``fewshot``, ``train``, ``attention`` all read through ``load_image``). The rules, mode by mode:

* ``RGB``: as stored. ``RGBX``: the padding byte dropped. ``1``: 0 → black, 1 → white. ``L``: grey
  ``v`` → ``(v, v, v)``. ``P`` (palette): the palette colour of each index.
* Transparency (``RGBA``, ``LA``, ``PA``, an 8-bit palette, grey or RGB image with a ``transparency``
  entry, e.g. a PNG ``tRNS`` chunk or a GIF's transparent index): composited on **white** (``BACKGROUND``), as
  a browser shows it on a white page, so a dark logo on a transparent background stays visible:
  ``out = round((c·α + 255·(255 − α)) / 255)``. Premultiplied ``RGBa``/``La``: ``out = c + 255 − α``.
* ``CMYK``: ``R = round((255 − C)(255 − K) / 255)`` (and G, B from M, Y): the device-independent
  formula; embedded ICC profiles are not applied (nor are they for any other mode). JPEGs written
  inverted by Adobe software are un-inverted by PIL's decoder first.
* ``YCbCr``: the JPEG/JFIF full-range BT.601 equations (``R = Y + 1.402 (Cr − 128)`` …).
* ``HSV``: the standard hexcone conversion (H, S, V each 0–255 for 0–1).
* ``LAB`` (PIL's layout: ``L`` = L*·255/100, ``a``/``b`` = a*, b* as signed bytes): CIE L*a*b* relative
  to the D50 white (the ICC and TIFF convention) → XYZ → Bradford-adapted to D65 → sRGB (IEC 61966-2-1
  transfer curve); colours outside sRGB are clipped.
* 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, 16-bit PNG/TIFF/PGM): the full 0–65535 range
  maps onto 0–255, ``v8 = round(v / 257)`` (65535 → 255, 257·k → k): nothing is clipped.
* 32-bit integer grey (``I``): when every value lies in 0–65535 (PIL opens 16-bit PGMs, and some
  16-bit TIFFs, as ``I``) the 16-bit rule, so a picture looks the same whatever mode PIL chose;
  otherwise the image's own range, ``round((v − min)·255 / (max − min))``.
* Float grey (``F``): when every finite value lies in 0–1 (the float-image convention) ``round(v·255)``;
  otherwise the image's own finite range as for ``I``. NaN is black; +inf/−inf are the top/bottom of
  the range.
* A constant image whose single value lies outside those ranges (nothing to scale by) is black.
* Any other mode PIL can convert to RGB: PIL's conversion; one it cannot: an ``ImageReadError``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

BACKGROUND: Tuple[int, int, int] = (255, 255, 255)  # what shows through transparent pixels
ALPHA_MODES = ("RGBA", "LA", "PA")
PREMULTIPLIED_MODES = ("RGBa", "La")
PIL_CONVERTED = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV")  # PIL's own conversion is the rule above

# CIE L*a*b* (D50) → linear sRGB, Bradford-adapted (Lindbloom's sRGB/D50 matrix, inverted)
D50_WHITE = (0.96422, 1.0, 0.82521)
XYZ_D50_TO_LINEAR_SRGB = np.array([[3.1338561, -1.6168667, -0.4906146],
                                   [-0.9787684, 1.9161415, 0.0334540],
                                   [0.0719453, -0.2289914, 1.4052427]], dtype=np.float64)


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit ``RGB`` image with ``image``'s pixels, by the rules of the module docstring.

    Raises:
        ValueError: a mode PIL cannot convert to RGB (the message names it).
    """
    mode = image.mode
    if mode in PREMULTIPLIED_MODES:
        return _composite_premultiplied(image)
    if mode in ALPHA_MODES or has_transparency(image):
        return _composite(image.convert("RGBA") if image.mode != "RGBA" else image)
    if mode == "RGB":
        return image.copy()
    if mode in PIL_CONVERTED:
        return image.convert("RGB")
    if mode == "LAB":
        return Image.fromarray(lab_to_rgb(np.asarray(image)), "RGB")
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return Image.fromarray(grey_to_8bit(_grey_array(image), mode), "L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"image mode {mode!r} cannot be converted to RGB ({err})") from None


def has_transparency(image: Image.Image) -> bool:
    """True for modes with an alpha band and for 8-bit images with a ``transparency`` entry (a PNG
    ``tRNS`` chunk, a GIF's transparent index) or a palette with alpha. (A ``transparency`` entry of a
    16-bit or float image is ignored: PIL can only apply it by clipping the values to 8 bits.)"""
    if image.mode in ALPHA_MODES + PREMULTIPLIED_MODES:
        return True
    if "transparency" in image.info and image.mode in ("1", "L", "P", "RGB"):
        return True
    palette = image.palette if image.mode in ("P", "PA") else None
    return palette is not None and palette.mode == "RGBA"


def _composite(rgba: Image.Image) -> Image.Image:
    """Straight (non-premultiplied) ``RGBA`` over ``BACKGROUND``: ``round((c·α + bg·(255 − α)) / 255)``."""
    array = np.asarray(rgba, dtype=np.uint32)  # (H, W, 4)
    alpha = array[..., 3:4]
    background = np.asarray(BACKGROUND, dtype=np.uint32)
    mixed = (array[..., :3] * alpha + background * (255 - alpha) + 127) // 255  # exact rounding: no ties
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _composite_premultiplied(image: Image.Image) -> Image.Image:
    """Premultiplied ``RGBa``/``La`` over ``BACKGROUND``: ``c + round(bg·(255 − α) / 255)``, at most 255."""
    array = np.asarray(image, dtype=np.uint32)
    if image.mode == "La":  # (H, W, 2): grey, alpha
        colour, alpha = np.repeat(array[..., :1], 3, axis=-1), array[..., 1:2]
    else:
        colour, alpha = array[..., :3], array[..., 3:4]
    background = np.asarray(BACKGROUND, dtype=np.uint32)
    mixed = np.minimum(colour + (background * (255 - alpha) + 127) // 255, 255)
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _grey_array(image: Image.Image) -> np.ndarray:
    """The pixel values of a one-band 16/32-bit or float image as a numpy array ``(H, W)``."""
    try:
        array = np.asarray(image)
    except (TypeError, ValueError, KeyError):  # a mode numpy has no layout for (e.g. I;16S on old Pillow)
        array = np.asarray(image.convert("I"))
    if array.ndim != 2:
        raise ValueError(f"image mode {image.mode!r} has {array.shape[-1]} bands, expected one")
    return array


def grey_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """``(H, W)`` 16-bit, 32-bit or float grey values → ``(H, W)`` uint8 by the module's rules.

    ``mode`` is the PIL mode they came from: ``I;16…`` (0–65535 → 0–255), ``I`` (16-bit rule when the
    values fit, else own range) or ``F`` (0–1 convention when the values fit, else own range).
    """
    if mode.startswith("I;16") and values.dtype.kind == "u":
        return _scale_16bit(values)
    if values.dtype.kind in "iu":
        if values.size == 0 or (int(values.min()) >= 0 and int(values.max()) <= 65535):
            return _scale_16bit(values)
        return _own_range(values.astype(np.float64))
    floats = values.astype(np.float64)
    finite = np.isfinite(floats)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = float(floats[finite].min()), float(floats[finite].max())
    if low >= 0.0 and high <= 1.0:
        scaled = np.where(np.isnan(floats), 0.0, floats) * 255.0
        return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    return _own_range(floats, low, high)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0–65535 → 0–255 exactly: ``round(v / 257)`` (integer arithmetic, no ties: 257 is odd)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _own_range(values: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """The image's own finite range onto 0–255; NaN → 0, ±inf → the ends; constant → 0."""
    if low is None or high is None:
        finite = values[np.isfinite(values)]
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.where(np.isnan(values), low, values) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """PIL ``LAB`` bytes ``(H, W, 3)`` (L*·255/100, signed a*, signed b*) → sRGB ``(H, W, 3)`` uint8.

    CIE L*a*b* relative to D50 → XYZ (D50) → linear sRGB with the Bradford-adapted matrix → sRGB curve.
    """
    lab = np.ascontiguousarray(lab, dtype=np.uint8)
    lightness = lab[..., 0].astype(np.float64) * (100.0 / 255.0)
    a = lab[..., 1].view(np.int8).astype(np.float64)
    b = lab[..., 2].view(np.int8).astype(np.float64)
    fy = (lightness + 16.0) / 116.0
    xyz = np.stack([_lab_f_inverse(fy + a / 500.0) * D50_WHITE[0], _lab_f_inverse(fy),
                    _lab_f_inverse(fy - b / 200.0) * D50_WHITE[2]], axis=-1)
    linear = np.clip(xyz @ XYZ_D50_TO_LINEAR_SRGB.T, 0.0, 1.0)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1.0 / 2.4) - 0.055)
    return np.rint(np.clip(encoded, 0.0, 1.0) * 255.0).astype(np.uint8)


def _lab_f_inverse(t: np.ndarray) -> np.ndarray:
    delta = 6.0 / 29.0
    return np.where(t > delta, t ** 3, 3.0 * delta * delta * (t - 4.0 / 29.0))
