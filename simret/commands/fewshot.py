"""``simret fewshot``: episodic N-way K-shot evaluation of an encoder on a few-shot split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from simret.commands.options import (
    BATCH_SIZE,
    WORKERS,
    FiniteFloatRange,
    HintedIntRange,
    PixelRange,
    lock_timeout_option,
    model_options,
    positive_int_list,
    verify_content_option,
)

DEFAULT_METHODS = "simpleshot"


@click.command(short_help="Few-shot accuracy ± 95% CI (ProtoNet, SimpleShot, logreg …) on a split.")
@click.argument("split_root", type=click.Path(path_type=Path))
@click.option("--format", "split_format", type=click.Choice(["auto", "miniimagenet", "folders"]), default="auto",
              show_default=True, help="miniimagenet = ROOT/{train,val,test}.csv + one image folder; "
                                      "folders = ROOT/{train,val,test}/<class>/<image>.")
@click.option("--split", default="test", show_default=True, metavar="test|val",
              help="The split the episodes are drawn from.")
@click.option("--base-split", default="train", show_default=True, metavar="NAME",
              help="The split whose mean feature SimpleShot (CL2N) and softkmeans subtract, when present.")
@model_options
@click.option("--img-size", type=PixelRange(min=8), default=None, metavar="PX",
              help="Square input size (resize + centre crop); default: the encoder's. 84 suits miniImageNet.")
@click.option("--crop-pct", type=FiniteFloatRange(0, 1, min_open=True, hint="1.0: no crop"), default=None,
              metavar="F",
              help="Centre-crop fraction: resize to PX/F, crop PX (default: the encoder's; 1.0 = no crop).")
@click.option("--way", "n_way", type=HintedIntRange(min=2, hint="a 1-way episode is always right"), default=5,
              show_default=True, help="Classes per episode.")
@click.option("--shot", "shots", default="1,5", show_default=True, metavar="K[,K…]",
              help="Support images per class; a comma list runs each.")
@click.option("--query", "n_query", type=click.IntRange(min=1), default=15, show_default=True,
              help="Query images per class.")
@click.option("--episodes", "n_episodes", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Episodes per shot.")
@click.option("--method", "methods", default=DEFAULT_METHODS, show_default=True, metavar="NAME[,NAME…]",
              help="simpleshot, protonet, cosine, logreg, softkmeans; transductive: bdcspn, tim, laplacianshot, "
                   "ptmap (comma list).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Episode seed: same seed, same episodes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.json",
              help="Also write the results (fractions, not percent) and their provenance as JSON.")
@click.option("--features-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where features-<split>.h5 banks are kept and reused (default: a folder per dataset and "
                   "encoder under $SIMRET_CACHE or ~/.cache/simret/fewshot).")
@click.option("-b", "--batch-size", type=BATCH_SIZE, default=64, show_default=True,
              help="Images per forward pass.")
@click.option("-j", "--workers", type=WORKERS, default=2, show_default=True,
              help="Image-loading worker processes.")
@verify_content_option
@lock_timeout_option
@click.pass_context
def fewshot(ctx: click.Context, split_root: Path, split_format: str, split: str, base_split: str,
            model_spec: Dict[str, Any], img_size: Optional[int], crop_pct: Optional[float], n_way: int, shots: str,
            n_query: int, n_episodes: int, methods: str, seed: int, out: Optional[Path], features_dir: Optional[Path],
            batch_size: int, workers: int, verify_content: bool, lock_timeout: Optional[float]) -> None:
    """Evaluate an encoder on N-way K-shot episodes of SPLIT_ROOT and print accuracy ± 95% CI per method and shot.

    Features of every image are extracted once per split into features-<split>.h5 (resumable, reused by later
    runs with the same encoder and image size; images replaced since are described again); episodes are drawn
    from --split with --seed, the same episodes for every method; the 95% confidence interval is
    1.96·std/√episodes (std with ddof=0). SimpleShot
    subtracts the mean feature of --base-split (CL2N); without that split it falls back to L2N, with a warning.

    \b
    Examples:
      simret fewshot ~/data/miniimagenet --img-size 84 --model resnet18 --weights my-resnet18.pth \\
          --shot 1,5 --method simpleshot,protonet,logreg
      simret fewshot ~/data/cub --format folders --split val --way 5 --shot 1 --episodes 600
      simret fewshot digits/ --model test_resnet --weights none --img-size 32 --method simpleshot,protonet
    """
    shot_list = positive_int_list(shots, "--shot")
    method_list = _method_list(methods)

    from simret.commands.options import build_inference_encoder
    from simret.fewshot.experiment import FewShotSettings, load_splits, run_fewshot
    from simret.utils.atomic import write_json_atomic
    from simret.utils.logs import get_logger

    settings = FewShotSettings(split=split, base_split=base_split, split_format=split_format, n_way=n_way,
                               shots=tuple(shot_list), n_query=n_query, n_episodes=n_episodes,
                               methods=tuple(method_list), seed=seed, image_size=img_size, crop_pct=crop_pct,
                               features_dir=features_dir, batch_size=batch_size, workers=workers,
                               lock_timeout=lock_timeout, verify_content=verify_content)
    splits = load_splits(split_root, settings)  # a missing or malformed split fails before any model is built
    encoder, device = build_inference_encoder(model_spec, ctx, compile=False)
    settings.device = device
    report = run_fewshot(encoder, split_root, settings, splits=splits)
    click.echo(report.format())
    if out is not None:
        write_json_atomic(out, report.to_json())
        get_logger("simret.fewshot").info("wrote %s", out)


def _method_list(text: str) -> List[str]:
    from simret.fewshot.methods import list_methods

    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in list_methods()]
    if not names or unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown) if unknown else repr(text)}; known: "
                                 f"{', '.join(list_methods())}", param_hint="--method")
    return list(dict.fromkeys(names))
