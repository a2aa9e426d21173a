"""``simret eval``: Revisited Oxford/Paris evaluation (mAP E/M/H, mP@k; +R1M distractors, αQE, αDBA)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import click

from simret.commands.options import (
    ALPHA,
    BATCH_SIZE_AUTO,
    MAX_SIZE,
    NEIGHBOURS,
    WORKERS,
    compile_option,
    lock_timeout_option,
    model_options,
)

DISTRACTOR_NAMES = {"r1m": "revisitop1m", "revisitop1m": "revisitop1m"}


@click.command("eval", short_help="Revisited Oxford/Paris: mAP Easy/Medium/Hard and mP@k (+R1M, αQE, αDBA).")
@click.argument("dataset", metavar="DATASET")
@click.option("--data-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding DATASET/{gnd_DATASET.pkl, jpg/} (and revisitop1m/ for --distractors).")
@model_options
@click.option("--scales", default="1", show_default=True, metavar="S1,S2,…",
              help="Multi-scale extraction, e.g. 1,0.707,0.5 (averaged, then L2-normalised).")
@click.option("--max-size", type=MAX_SIZE, default=1024, show_default=True,
              help="Long side of each image before scaling.")
@click.option("--distractors", type=click.Choice(sorted(DISTRACTOR_NAMES)), default=None,
              help="Also evaluate with the R1M distractors (DATA_ROOT/revisitop1m/).")
@click.option("--qe", type=NEIGHBOURS, default=0, show_default=True, metavar="N",
              help="Also evaluate with αQE over the top N.")
@click.option("--dba", type=NEIGHBOURS, default=0, show_default=True, metavar="N",
              help="Database-side augmentation with N neighbours.")
@click.option("--alpha", type=ALPHA, default=3.0, show_default=True,
              help="Similarity exponent of αQE and αDBA.")
@click.option("--whiten-on", default=None, type=click.Path(exists=True), metavar="IMAGES|FILE.h5",
              help="Learn PCA whitening on other images (or a descriptors file) and apply it to everything.")
@click.option("-b", "--batch-size", type=BATCH_SIZE_AUTO, default="auto", show_default=True,
              help="Images of one size per forward pass (auto: by image size and device).")
@compile_option
@click.option("-j", "--workers", type=WORKERS, default=None,
              help="Image-loading worker processes (default: up to 8 beside a GPU, none on a small CPU).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where descriptors are kept between runs (default: ~/.cache/simret/eval or $SIMRET_CACHE/eval).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every result (fractions), the encoder's provenance and the settings as JSON.")
@lock_timeout_option
def evaluate(dataset: str, data_root: Path, model_spec: Dict[str, Any], scales: str, max_size: int,
             distractors: Optional[str], qe: int, dba: int, alpha: float, whiten_on: Optional[str],
             batch_size: Any, compile: str, workers: Optional[int], cache: Optional[Path],
             out: Optional[Path], lock_timeout: Optional[float]) -> None:
    """Evaluate an encoder on DATASET (roxford5k, rparis6k, or any folder in their layout under
    --data-root) with the Revisited protocol, and print the standard table (mAP and mP@1/5/10 in % for the
    Easy, Medium and Hard setups), one per configuration: plain, +R1M distractors, +αQE, +αDBA.

    Descriptors of the database (and of the distractors) are cached per encoder and setting in --cache,
    so a second run only describes the queries; an interrupted run resumes. Queries are cropped to their
    box before resizing, as the protocol says. Scores are exact inner products; nothing is approximated.

    \b
    Examples:
      simret eval roxford5k --data-root ~/data/revisitop --model resnet50 --gamma 2.0 \\
          --weights simpool:resnet50-dino-simpool-ep100 --scales 1,0.707,0.5 --out roxford.json
      simret eval rparis6k --data-root ~/data/revisitop --model vit_small_patch16_224 \\
          --weights simpool:vits-dino-simpool-ep300 --distractors r1m --qe 2
    """
    from dataclasses import replace

    from simret.commands.options import build_inference_encoder
    from simret.retrieval.evaluation import EvalSettings, evaluate_encoder
    from simret.retrieval.extraction import parse_scales
    from simret.retrieval.metrics import format_revisited_table
    from simret.utils.atomic import write_json_atomic

    settings = EvalSettings(scales=parse_scales(scales), max_size=max_size or None, batch_size=batch_size,
                            workers=workers, distractors=DISTRACTOR_NAMES.get(distractors or ""),
                            qe=qe, dba=dba, alpha=alpha, whiten_on=whiten_on, cache_dir=cache,
                            lock_timeout=lock_timeout)
    from simret.data.revisited import load_distractors, load_revisited

    load_revisited(data_root, dataset)  # a missing or malformed dataset fails before any model is built
    if settings.distractors:
        load_distractors(data_root, settings.distractors)
    encoder, _ = build_inference_encoder(model_spec, compile=compile)
    settings = replace(settings, precision=encoder.precision)
    report = evaluate_encoder(encoder, data_root, dataset, settings)
    weights = report.provenance.get("weights")
    click.echo(f"{report.dataset}: {report.counts['database']} images, {report.counts['queries']} queries"
               + (f", {report.counts['distractors']:,} distractors" if report.counts["distractors"] else "")
               + f"; encoder {report.provenance['fingerprint']} ({weights} weights), scales {scales}, "
                 f"max size {max_size}")
    for name, result in report.results.items():
        click.echo("")
        click.echo(format_revisited_table(result, name))
    if out is not None:
        write_json_atomic(out, report.to_json())
        click.echo(f"\nwrote {out}", err=True)
