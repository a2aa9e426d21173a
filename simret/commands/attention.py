"""``simret attention``: SimPool attention maps as PNG overlays plus the raw maps as ``.npy``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import click

from simret.commands.options import MAX_SIZE, FiniteFloatRange, model_options

CMAPS = ["inferno", "viridis", "jet", "gray"]


@click.command(short_help="SimPool attention maps: PNG overlays side by side with the image, raw .npy maps.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@model_options
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <image>.png (image | overlay) and <image>.npy (the (h, w) map).")
@click.option("--max-size", type=MAX_SIZE, default=512, show_default=True,
              help="Long side of the image fed to the encoder.")
@click.option("--cmap", type=click.Choice(CMAPS), default="inferno", show_default=True, help="Colour map.")
@click.option("--alpha", default=0.6, show_default=True, type=FiniteFloatRange(0, 1),
              help="Weight of the colour-mapped attention in the overlay.")
def attention(images: Tuple[Path, ...], model_spec: Dict[str, Any], out: Path, max_size: int, cmap: str,
              alpha: float) -> None:
    """Draw where SimPool looks. IMAGES are image files and/or folders (searched recursively).

    For each image, writes OUT/<name>.png — the image and its attention map (bilinearly upsampled,
    min-max scaled, colour-mapped, blended over the image) side by side — and OUT/<name>.npy, the raw
    attention over the feature grid (h, w), summing to 1. Needs --pool simpool (the default).

    \b
    Examples:
      simret attention photo.jpg --model vit_small_patch16_224 --weights simpool:vits-dino-simpool-ep300 -o maps/
      simret attention photos/ --model resnet50 --gamma 2.0 --weights ckpt/encoder.safetensors -o maps/
    """
    import numpy as np

    from simret.commands.options import build_inference_encoder
    from simret.data.images import ImageReadError, list_images
    from simret.utils.atomic import atomic_path
    from simret.utils.logs import get_logger
    from simret.utils.progress import progress
    from simret.visualize import attention_maps, render_overlay

    log = get_logger("simret.attention")
    if model_spec["pool"] != "simpool":
        raise ValueError(f"attention maps need --pool simpool (got --pool {model_spec['pool']})")
    sources: List[Tuple[Path, str]] = []
    for item in images:
        if item.is_dir():
            root, ids = list_images(item)
            sources += [(root / image_id, f"{item.name}/{image_id}") for image_id in ids]
        else:
            sources.append((item, item.name))
    encoder, device = build_inference_encoder(model_spec, compile=False)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    stems = _unique_stems([image_id for _, image_id in sources])
    for (path, image_id), stem in progress(list(zip(sources, stems)), desc="attention", unit="img"):
        try:
            (result,) = attention_maps(encoder, [path], max_size=max_size, device=device, ids=[image_id])
        except ImageReadError as err:
            skipped.append((image_id, err.reason))
            log.warning("skipped %s: %s", image_id, err.reason)
            continue
        with atomic_path(out / f"{stem}.png") as temporary:  # an interrupted run leaves no half picture
            render_overlay(result.image, result.map, cmap=cmap, alpha=alpha).save(temporary, format="PNG")
        with atomic_path(out / f"{stem}.npy") as temporary, open(temporary, "wb") as handle:
            np.save(handle, result.map.astype(np.float32))
        peak = np.unravel_index(int(result.map.argmax()), result.map.shape)
        written.append((image_id, result.map.shape, peak, float(result.map.max()), f"{stem}.png"))
    if not written:
        shown = "; ".join(f"{image_id}: {reason}" for image_id, reason in skipped[:3])
        raise ValueError(f"no image could be read ({shown}{' …' if len(skipped) > 3 else ''}): give image files "
                         f"(.jpg, .png …) or folders of them")
    from simret.utils.text import escape_field  # a tab or newline in a file name never splits a row

    written = [(escape_field(name), shape, peak, top, escape_field(picture))
               for name, shape, peak, top, picture in written]
    width = max([len(w[0]) for w in written] + [5])
    click.echo(f"{'image':<{width}}  grid     peak (row, col)  max weight  picture")
    for image_id, shape, peak, top, picture in written:
        click.echo(f"{image_id:<{width}}  {shape[0]:>2}x{shape[1]:<4}  ({peak[0]:>2}, {peak[1]:>2})         "
                   f"{top:>9.4f}  {picture}")
    summary = f"wrote {len(written)} attention picture(s) and map(s) to {out}"
    if skipped:
        summary += f"; skipped {len(skipped)} unreadable image(s)"
    click.echo(summary, err=True)


def _unique_stems(image_ids: List[str]) -> List[str]:
    """One output stem per image: ``_safe_name``, with ``-2``, ``-3`` … added where two images would share
    one (``a/x.jpg`` and ``b/x.jpg`` given as files, ``x.jpg`` beside ``x.png``), so none overwrites another."""
    used, stems = set(), []
    for image_id in image_ids:
        stem, number = _safe_name(image_id), 1
        candidate = stem
        while candidate.lower() in used:  # case-insensitive: macOS and Windows file systems
            number += 1
            candidate = f"{stem}-{number}"
        used.add(candidate.lower())
        stems.append(candidate)
    return stems


def _safe_name(image_id: str) -> str:
    stem = image_id.rsplit(".", 1)[0] if "." in Path(image_id).name else image_id
    return stem.replace("/", "__").replace("\\", "__")
