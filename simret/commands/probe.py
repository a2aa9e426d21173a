"""``simret probe``: k-NN (DINO) and linear-probe accuracy of an encoder on an ImageFolder train/val split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from simret.commands.options import (
    lock_timeout_option,
    model_options,
    positive_int_list,
    verify_content_option,
)

PROBES = ("knn", "linear")
NORM_CHOICES = ["bn", "l2n", "none"]


@click.command(short_help="k-NN (DINO) and linear-probe top-1/top-5 on an ImageFolder train/val split.")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--method", "methods", default="knn", show_default=True, metavar="knn|linear[,…]",
              help="Probes to run (comma list).")
@click.option("--train-split", default="train", show_default=True, metavar="NAME",
              help="The folder of labelled training images (ROOT/NAME/<class>/<image>).")
@click.option("--val-split", default="val", show_default=True, metavar="NAME",
              help="The folder of evaluated images; its classes must be train classes (matched by name).")
@model_options
@click.option("--img-size", type=int, default=None, metavar="PX",
              help="Square input size (resize + centre crop); default: the encoder's (224 for ImageNet models).")
@click.option("--crop-pct", type=float, default=None, metavar="F",
              help="Centre-crop fraction: resize to PX/F, crop PX (default: the encoder's; DINO: 0.875).")
@click.option("-k", "--k", "ks", default="20", show_default=True, metavar="K[,K…]",
              help="k-NN neighbours; a comma list runs each (DINO: 10,20,100,200).")
@click.option("--temperature", type=float, default=0.07, show_default=True, metavar="T",
              help="k-NN vote weight exp(similarity / T).")
@click.option("--lr", "learning_rates", default=None, metavar="LR[,LR…]",
              help="Linear probe learning rates per batch of 256, swept (default: DINOv2's 13 rates 1e-5 … 0.1; "
                   "DINO/SimPool use 0.001).")
@click.option("--epochs", type=int, default=100, show_default=True, help="Linear probe epochs.")
@click.option("--linear-batch-size", type=int, default=1024, show_default=True, metavar="N",
              help="Linear probe rows per SGD step.")
@click.option("--linear-norm", type=click.Choice(NORM_CHOICES), default="bn", show_default=True,
              help="Features fed to the linear probe: bn = standardised with the train split's statistics; "
                   "l2n = L2-normalised; none = as extracted (DINO).")
@click.option("--seed", type=int, default=0, show_default=True, help="Linear probe initial weights and batch order.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.json",
              help="Also write the results (fractions, not percent) and their provenance as JSON.")
@click.option("--features-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where features-<split>.h5 banks are kept and reused (default: a folder per dataset and "
                   "encoder under $SIMRET_CACHE or ~/.cache/simret/probe).")
@click.option("-b", "--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("-j", "--workers", type=int, default=2, show_default=True, help="Image-loading worker processes.")
@verify_content_option
@lock_timeout_option
@click.pass_context
def probe(ctx: click.Context, root: Path, methods: str, train_split: str, val_split: str, model_spec: Dict[str, Any],
          img_size: Optional[int], crop_pct: Optional[float], ks: str, temperature: float,
          learning_rates: Optional[str], epochs: int, linear_batch_size: int, linear_norm: str, seed: int,
          out: Optional[Path], features_dir: Optional[Path], batch_size: int, workers: int, verify_content: bool,
          lock_timeout: Optional[float]) -> None:
    """Top-1 / top-5 accuracy on ROOT/val of classifiers trained on the frozen features of ROOT/train.

    \b
    ROOT is laid out as ImageNet: ROOT/train/<class>/<image>, ROOT/val/<class>/<image>. Features of both
    splits are extracted once into features-<split>.h5 (resumable, reused by later runs with the same
    encoder and image size), then:
      knn     DINO's weighted k-NN (eval_knn.py): L2-normalised features, cosine similarity, the k nearest
              train images vote for their class with weight exp(similarity / T); equal to DINO's
              knn_classifier on the same features.
      linear  a linear classifier on the cached features (--linear-norm), SGD with momentum 0.9, no weight
              decay, cosine schedule, one classifier per learning rate of the sweep, trained together; the
              rate best on the val split is reported (DINOv2's protocol). No augmentation: not the number
              DINO's eval_linear.py gets by training on augmented images.
    DINO's preprocessing (resize to 256, centre crop 224) is --img-size 224 --crop-pct 0.875.

    \b
    Examples:
      simret probe ~/data/imagenet --weights simpool:vits-dino-simpool-ep100 --img-size 224 --crop-pct 0.875 \\
          -k 10,20,100,200
      simret probe ~/data/imagenet --weights simpool:resnet50-dino-simpool-ep100 --img-size 224 \\
          --crop-pct 0.875 --method knn,linear --out resnet50-simpool.json
      simret probe digits/ --model test_resnet --weights none --img-size 32 --method knn,linear -k 5
    """
    method_list = _probe_list(methods)
    k_list = positive_int_list(ks, "--k")
    rates = _float_list(learning_rates, "--lr") if learning_rates is not None else None
    _check_numbers(img_size, crop_pct, temperature, epochs, linear_batch_size, seed, batch_size, workers)

    from simret.probe.run import load_probe_splits

    train, val = load_probe_splits(root, train_split, val_split)
    if "knn" in method_list and max(k_list) > len(train):
        raise click.BadParameter(f"{max(k_list)} neighbours, but {train.source} holds {len(train)} images: use at "
                                 f"most {len(train)}", param_hint="--k")

    from simret.commands.options import build_inference_encoder
    from simret.fewshot.cache import features_cache_dir
    from simret.fewshot.features import bank_settings
    from simret.probe.linear import LEARNING_RATES
    from simret.probe.run import probe_banks, run_probe
    from simret.utils import progress
    from simret.utils.logs import get_logger

    log = get_logger("simret.probe")
    encoder, device = build_inference_encoder(model_spec, ctx, compile=False)
    settings = bank_settings(encoder, img_size, crop_pct)
    directory = features_dir if features_dir is not None else features_cache_dir("probe", root, "folders",
                                                                                   encoder.fingerprint, settings)
    banks = probe_banks(encoder, train, val, directory, image_size=settings["image_size"],
                        crop_pct=settings["crop_pct"], batch_size=batch_size, workers=workers, device=device,
                        lock_timeout=lock_timeout, verify_content=verify_content)
    results = run_probe(banks, method_list, ks=k_list, temperature=temperature,
                        learning_rates=rates or LEARNING_RATES, epochs=epochs, batch_size=linear_batch_size,
                        norm=linear_norm, seed=seed, device=device, progress=progress.is_enabled())

    from simret.data.splits import describe_split

    click.echo(f"{root} — {describe_split(train)}; {describe_split(val)}")
    weights = encoder.provenance()["weights"]
    click.echo(f"encoder {encoder.fingerprint} ({'random' if weights == 'random' else weights} weights, "
               f"{encoder.dim}-d, {settings['image_size']} px); accuracy % on the {val.name} split")
    click.echo("")
    click.echo(_format_table(results))
    if out is not None:
        from simret.utils.atomic import write_json_atomic

        write_json_atomic(out, {
            "root": str(root), "train_split": train.name, "val_split": val.name, "n_classes": banks.n_classes,
            "n_train": len(train), "n_val": len(val), "encoder": encoder.provenance(), **settings,
            "features": {"directory": str(directory)}, "results": results,
        })
        log.info("wrote %s", out)


def _format_table(results: List[Dict[str, Any]]) -> str:
    headers = ["probe", "top-1", "top-5"]
    rows = [[_label(r), f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}"] for r in results]
    widths = [max(len(row[i]) for row in [headers] + rows) for i in range(len(headers))]
    lines = []
    for row in [headers] + rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _label(result: Dict[str, Any]) -> str:
    if result["method"] == "knn":
        return f"k-NN k={result['k']} T={result['temperature']:g}"
    swept = len(result["sweep"])
    return (f"linear {result['norm']}, lr {result['learning_rate']:g}"
            + (f" (best of {swept})" if swept > 1 else "") + f", {result['epochs']} ep")


def _probe_list(text: str) -> List[str]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in PROBES]
    if not names or unknown:
        raise click.BadParameter(f"unknown probe(s) {', '.join(unknown) if unknown else repr(text)}; known: "
                                 f"{', '.join(PROBES)}", param_hint="--method")
    return list(dict.fromkeys(names))


def _float_list(text: str, option: str) -> List[float]:
    import math

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise click.BadParameter(f"expected finite numbers > 0, got {text!r}", param_hint=option)
    return list(dict.fromkeys(values))


def _check_numbers(img_size: Optional[int], crop_pct: Optional[float], temperature: float, epochs: int,
                   linear_batch_size: int, seed: int, batch_size: int, workers: int) -> None:
    import math

    from simret.data.images import MAX_SIDE

    if img_size is not None and not 8 <= img_size <= MAX_SIDE:
        raise click.BadParameter(f"must be from 8 to {MAX_SIDE} pixels, got {img_size}", param_hint="--img-size")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise click.BadParameter(f"must lie in (0, 1] (1.0: no crop), got {crop_pct:g}", param_hint="--crop-pct")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise click.BadParameter(f"must be a finite number > 0, got {temperature:g}", param_hint="--temperature")
    for name, value, low in (("--epochs", epochs, 1), ("--linear-batch-size", linear_batch_size, 1),
                             ("--seed", seed, 0), ("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if value < low:
            raise click.BadParameter(f"must be at least {low}, got {value}", param_hint=name)
