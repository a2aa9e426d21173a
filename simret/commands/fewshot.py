"""``simret fewshot``: episodic N-way K-shot evaluation of an encoder on a few-shot split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from simret.commands.options import model_options

DEFAULT_METHODS = "simpleshot"
BASE_MEAN_METHODS = ("simpleshot", "softkmeans", "laplacianshot")  # methods given the train split's mean (CL2N)


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
@click.option("--img-size", type=int, default=None, metavar="PX",
              help="Square input size (resize + centre crop); default: the encoder's. 84 suits miniImageNet.")
@click.option("--crop-pct", type=float, default=None, metavar="F",
              help="Centre-crop fraction: resize to PX/F, crop PX (default: the encoder's; 1.0 = no crop).")
@click.option("--way", "n_way", type=int, default=5, show_default=True, help="Classes per episode.")
@click.option("--shot", "shots", default="1,5", show_default=True, metavar="K[,K…]",
              help="Support images per class; a comma list runs each.")
@click.option("--query", "n_query", type=int, default=15, show_default=True, help="Query images per class.")
@click.option("--episodes", "n_episodes", type=int, default=2000, show_default=True, help="Episodes per shot.")
@click.option("--method", "methods", default=DEFAULT_METHODS, show_default=True, metavar="NAME[,NAME…]",
              help="simpleshot, protonet, cosine, logreg, softkmeans; transductive: bdcspn, tim, laplacianshot, "
                   "ptmap (comma list).")
@click.option("--seed", type=int, default=0, show_default=True, help="Episode seed: same seed, same episodes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.json",
              help="Also write the results (fractions, not percent) and their provenance as JSON.")
@click.option("--features-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where features-<split>.h5 banks are kept and reused (default: a folder per dataset and "
                   "encoder under $SIMRET_CACHE or ~/.cache/simret/fewshot).")
@click.option("-b", "--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("-j", "--workers", type=int, default=2, show_default=True, help="Image-loading worker processes.")
@click.pass_context
def fewshot(ctx: click.Context, split_root: Path, split_format: str, split: str, base_split: str,
            model_spec: Dict[str, Any], img_size: Optional[int], crop_pct: Optional[float], n_way: int, shots: str,
            n_query: int, n_episodes: int, methods: str, seed: int, out: Optional[Path], features_dir: Optional[Path],
            batch_size: int, workers: int) -> None:
    """Evaluate an encoder on N-way K-shot episodes of SPLIT_ROOT and print accuracy ± 95% CI per method and shot.

    Features of every image are extracted once per split into features-<split>.h5 (resumable, reused by later
    runs with the same encoder and image size); episodes are drawn from --split with --seed, the same episodes
    for every method; the 95% confidence interval is 1.96·std/√episodes (std with ddof=0). SimpleShot
    subtracts the mean feature of --base-split (CL2N); without that split it falls back to L2N, with a warning.

    \b
    Examples:
      simret fewshot ~/data/miniimagenet --img-size 84 --model resnet18 --weights my-resnet18.pth \\
          --shot 1,5 --method simpleshot,protonet,logreg
      simret fewshot ~/data/cub --format folders --split val --way 5 --shot 1 --episodes 600
      simret fewshot digits/ --model test_resnet --weights none --img-size 32 --method simpleshot,protonet
    """
    shot_list = _int_list(shots, "--shot")
    method_list = _method_list(methods)
    for name, value, low in (("--way", n_way, 2), ("--query", n_query, 1), ("--episodes", n_episodes, 1),
                             ("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--seed", seed, 0)):
        if value < low:
            raise click.BadParameter(f"must be at least {low}, got {value}"
                                     + (" (a 1-way episode is always right)" if name == "--way" else ""),
                                     param_hint=name)
    from simret.data.images import MAX_SIDE

    if img_size is not None and not 8 <= img_size <= MAX_SIDE:
        raise click.BadParameter(f"must be from 8 to {MAX_SIDE} pixels, got {img_size}", param_hint="--img-size")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise click.BadParameter(f"must lie in (0, 1] (1.0: no crop), got {crop_pct:g}", param_hint="--crop-pct")

    from simret.data.splits import available_splits, describe_split, load_split
    from simret.utils.logs import get_logger

    log = get_logger("simret.fewshot")
    split_format = _resolved_format(split_root, split, split_format)
    eval_split = load_split(split_root, split, split_format)
    eval_split.check_n_way(n_way)
    eval_split.check_class_sizes(max(shot_list) + n_query, f"shot {max(shot_list)} + query {n_query}")
    wants_base = any(name in BASE_MEAN_METHODS for name in method_list)
    base = None
    if wants_base:
        needing = "/".join(n for n in method_list if n in BASE_MEAN_METHODS)
        if base_split == split:
            log.warning("--base-split %r is the evaluated split: %s will use L2N instead of CL2N (no base mean)",
                        base_split, needing)
        elif base_split in available_splits(split_root, split_format):
            base = load_split(split_root, base_split, split_format)
        else:
            log.warning("no %r split under %s: %s will use L2N instead of CL2N (no base mean)", base_split, split_root,
                        needing)

    from simret.commands.options import build_encoder
    from simret.fewshot.features import bank_settings, feature_bank

    encoder, device = build_encoder(model_spec, ctx)
    settings = bank_settings(encoder, img_size, crop_pct)
    directory = features_dir if features_dir is not None else _default_features_dir(split_root, split_format,
                                                                                       encoder.fingerprint, settings)
    options = {"image_size": settings["image_size"], "crop_pct": settings["crop_pct"], "batch_size": batch_size,
               "workers": workers, "device": device}
    bank = feature_bank(encoder, eval_split, directory, **options)
    base_mean = feature_bank(encoder, base, directory, **options).mean() if base is not None else None

    import warnings

    from simret.fewshot.episodes import sample_episodes
    from simret.fewshot.evaluate import evaluate
    from simret.fewshot.methods import MissingBaseMeanWarning, get_method

    results = []
    table: Dict[str, Dict[int, str]] = {name: {} for name in method_list}
    for shot in shot_list:
        episodes = sample_episodes(bank.labels, n_way, shot, n_query, n_episodes, seed, class_names=bank.classes)
        for name in method_list:
            kwargs = {"base_mean": base_mean} if name in BASE_MEAN_METHODS and base_mean is not None else {}
            with warnings.catch_warnings():
                if base is None:  # already said once above
                    warnings.simplefilter("ignore", MissingBaseMeanWarning)
                method = get_method(name, **kwargs)
            log.debug("%d-shot: %s", shot, method.describe())
            result = evaluate(bank.features, episodes, method, progress=f"{name} {shot}-shot")
            results.append({**result.to_dict(), "method": name, "protocol": method.describe()})
            table[name][shot] = result.format()

    click.echo(f"{split_root} — {describe_split(eval_split)}")
    weights = encoder.provenance()["weights"]
    click.echo(f"encoder {encoder.fingerprint} ({'random' if weights == 'random' else weights} weights, "
               f"{encoder.dim}-d, {settings['image_size']} px)"
               + (f"; base mean: {base.name} split ({len(base)} images)" if base is not None else ""))
    click.echo(f"{n_way}-way, {n_query} queries per class, {n_episodes} episodes per shot, seed {seed}; "
               f"accuracy % ± 95% CI")
    click.echo("")
    click.echo(_format_table(method_list, shot_list, table))
    if out is not None:
        from simret.utils.atomic import write_json_atomic

        write_json_atomic(out, {
            "split_root": str(split_root), "format": eval_split.format, "split": split,
            "n_classes": eval_split.n_classes, "n_images": len(eval_split),
            "base_split": base.name if base is not None else None, "encoder": encoder.provenance(), **settings,
            "n_way": n_way, "n_query": n_query, "n_episodes": n_episodes, "seed": seed,
            "ci95": "1.96 * std(accuracies, ddof=0) / sqrt(n_episodes); accuracies are fractions",
            "features": {"directory": str(directory)}, "results": results,
        })
        log.info("wrote %s", out)


def _int_list(text: str, option: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {text!r}", param_hint=option)
    return list(dict.fromkeys(values))


def _method_list(text: str) -> List[str]:
    from simret.fewshot.methods import list_methods

    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in list_methods()]
    if not names or unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown) if unknown else repr(text)}; known: "
                                 f"{', '.join(list_methods())}", param_hint="--method")
    return list(dict.fromkeys(names))


def _resolved_format(root: Path, split: str, split_format: str) -> str:
    from simret.data.splits import detect_format

    return detect_format(root, split) if split_format == "auto" else split_format


def _default_features_dir(root: Path, split_format: str, fingerprint: str, settings: Dict[str, Any]) -> Path:
    """``<cache>/fewshot/<dataset name>-<hash of its path>/<fingerprint>-<size>px-crop<pct>``."""
    import hashlib

    from simret.models.checkpoints import cache_dir

    resolved = Path(root).expanduser().resolve()
    digest = hashlib.blake2b(f"{resolved}|{split_format}".encode(), digest_size=4).hexdigest()
    crop = f"{settings['crop_pct']:g}".replace(".", "p")
    return cache_dir() / "fewshot" / f"{resolved.name}-{digest}" / f"{fingerprint}-{settings['image_size']}px-crop{crop}"


def _format_table(methods: List[str], shots: List[int], table: Dict[str, Dict[int, str]]) -> str:
    headers = ["method"] + [f"{shot}-shot" for shot in shots]
    rows = [[name] + [table[name][shot] for shot in shots] for name in methods]
    widths = [max(len(row[i]) for row in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [headers] + rows]
    return "\n".join(lines)
