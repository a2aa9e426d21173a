"""``simret classify``: label images from a folder of examples (one sub-folder per class)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from simret.commands.options import lock_timeout_option, model_options, verify_content_option

FORMATS = ["table", "jsonl", "tsv"]


@click.command(short_help="Label images from a folder of examples (SUPPORT_DIR/<class>/<images>).")
@click.argument("support_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--method", default="protonet", show_default=True, metavar="NAME",
              help="protonet (nearest class mean, Euclidean), cosine, simpleshot (CL2N with --base-mean, else "
                   "L2N) or logreg (logistic regression on the examples).")
@click.option("--base-mean", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="simpleshot/logreg: the base mean to subtract (CL2N): a .npy vector, or a features-<split>.h5 "
                   "bank of the same encoder whose mean feature is used (e.g. from simret fewshot).")
@click.option("--top", type=int, default=3, show_default=True, help="Best classes listed per image.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table for people; jsonl: {\"image\", \"class\", \"score\", \"top\", \"method\"} per line; tsv: "
                   "image, rank, class, score, method.")
@model_options
@click.option("--img-size", type=int, default=None, metavar="PX",
              help="Square input size (resize + centre crop), support and images alike; default: the encoder's.")
@click.option("--crop-pct", type=float, default=None, metavar="F",
              help="Centre-crop fraction: resize to PX/F, crop PX (default: the encoder's; 1.0 = no crop).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where the support features are kept (default: a folder per support set and encoder under "
                   "$SIMRET_CACHE or ~/.cache/simret/classify); re-extracted when a support image changes.")
@click.option("-b", "--batch-size", type=int, default=32, show_default=True, help="Images per forward pass.")
@click.option("-j", "--workers", type=int, default=0, show_default=True, help="Image-loading worker processes.")
@verify_content_option
@lock_timeout_option
@click.pass_context
def classify(ctx: click.Context, support_dir: Path, images: Tuple[Path, ...], method: str, base_mean: Optional[Path],
             top: int, fmt: str, model_spec: Dict[str, Any], img_size: Optional[int], crop_pct: Optional[float],
             cache_dir: Optional[Path], batch_size: int, workers: int, verify_content: bool,
             lock_timeout: Optional[float]) -> None:
    """Predict the class of each image (files, or folders of images) from the examples in SUPPORT_DIR.

    \b
    SUPPORT_DIR holds one folder of example images per class (SUPPORT_DIR/<class>/<image>); their features
    are extracted once and cached. Each image gets the best class, its score and the next best classes;
    scores are the method's own (higher is better; protonet: minus the distance to the class mean), not
    probabilities. Results go to stdout, logs to stderr; unreadable images are skipped with a warning.

    \b
    Examples:
      simret classify pets/ photo.jpg --weights simpool:vits-dino-simpool-ep100
      simret classify pets/ new-photos/ --method logreg --format jsonl > labels.jsonl
      simret classify digits/train 0001.png --model test_resnet --weights none --img-size 32 --format tsv
    """
    for name, value, low in (("--top", top, 1), ("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if value < low:
            raise click.BadParameter(f"must be at least {low}, got {value}", param_hint=name)
    from simret.data.images import MAX_SIDE

    if img_size is not None and not 8 <= img_size <= MAX_SIDE:
        raise click.BadParameter(f"must be from 8 to {MAX_SIDE} pixels, got {img_size}", param_hint="--img-size")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise click.BadParameter(f"must lie in (0, 1] (1.0: no crop), got {crop_pct:g}", param_hint="--crop-pct")

    import numpy as np

    from simret.classify.support import build_method, load_support

    load_support(support_dir)  # bad folders and methods fail before any model is built
    build_method(method, None if base_mean is None else np.zeros(1, dtype=np.float32), quiet=True)
    paths = _expand(images)

    from simret.classify.support import SupportClassifier
    from simret.commands.options import build_inference_encoder
    from simret.utils.logs import get_logger

    log = get_logger("simret.classify")
    encoder, device = build_inference_encoder(model_spec, ctx, compile=False)
    classifier = SupportClassifier(encoder, support_dir, method, base_mean=base_mean, cache_dir=cache_dir,
                                   image_size=img_size, crop_pct=crop_pct, batch_size=batch_size, workers=workers,
                                   device=device, top=top, lock_timeout=lock_timeout,
                                   verify_content=verify_content)
    log.info("support: %s", classifier.describe())
    predictions = classifier.classify([str(p) for p in paths], skip_unreadable=True)
    if not predictions:
        raise ValueError("no image could be read: nothing to classify")
    _write([p.to_dict() for p in predictions], fmt)


def _expand(images: Tuple[Path, ...]) -> List[Path]:
    """Files as given; folders replaced by the images under them (sorted)."""
    from simret.data.images import list_images

    paths: List[Path] = []
    for item in images:
        if item.is_dir():
            root, found = list_images(item)
            paths += [item / name for name in found]
        else:
            paths.append(item)
    return paths


def _write(rows: List[Dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        for row in rows:
            row = {**row, "score": round(row["score"], 6),
                   "top": [{"class": t["class"], "score": round(t["score"], 6)} for t in row["top"]]}
            click.echo(json.dumps(row, ensure_ascii=False))
    elif fmt == "tsv":
        click.echo("image\trank\tclass\tscore\tmethod")
        for row in rows:
            for rank, entry in enumerate(row["top"], 1):
                click.echo(f"{row['image']}\t{rank}\t{entry['class']}\t{entry['score']:.6f}\t{row['method']}")
    else:
        click.echo(_table(rows))


def _table(rows: List[Dict[str, Any]]) -> str:
    headers = ["image", "class", "score", "next classes (score)"]
    body = [[row["image"], row["class"], f"{row['score']:.4f}",
             ", ".join(f"{t['class']} ({t['score']:.4f})" for t in row["top"][1:])] for row in rows]
    widths = [max(len(line[i]) for line in [headers] + body) for i in range(3)]
    lines = []
    for line in [headers] + body:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1]), line[2].rjust(widths[2]), line[3]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
