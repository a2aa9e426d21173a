"""``simret demo``: the whole pipeline, offline, on real photographs and digits shipped by installed packages."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import List, Optional

import click

from simret.commands.options import PixelRange, precision_options

STEPS = 8


@click.command(short_help="Run every command offline on embedded real data (under a minute on a CPU).")
@click.option("-o", "--out", default="demo-out", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for everything the demo writes (data, index, checkpoints, pictures, results).")
@click.option("-m", "--model", "arch", default="resnet18", show_default=True, metavar="ARCH",
              help="timm architecture; the demo always starts from random weights (no network).")
@click.option("--gamma", default=2.0, show_default=True, type=float, help="SimPool's power-mean exponent.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fine-tuning epochs on the digits' base classes.")
@click.option("--episodes", type=click.IntRange(min=1), default=600, show_default=True,
              help="Few-shot episodes per shot.")
@click.option("--image-size", type=PixelRange(min=64), default=320, show_default=True,
              help="Long side of the demo photographs.")
@click.option("--small", is_flag=True, help="Tiny sizes everywhere (what the tests run): seconds, not minutes.")
@precision_options
def demo(out: Path, arch: str, gamma: float, epochs: int, episodes: int, image_size: int, small: bool,
         precision: str) -> None:
    """Run the main jobs end to end, offline, and say what was written where.

    \b
    1. data       a Revisited-format benchmark of real photographs (scikit-image, scikit-learn) with exact
                  easy/hard/junk ground truth, 20 extra distractors, and handwritten digits as a few-shot split
    2. index      simret index on the benchmark's database images
    3. search     simret search with a query cropped to its box
    4. eval       simret eval: mAP Easy/Medium/Hard and mP@k, then with the distractors and with αQE
    5. few-shot   simret fewshot on the digits' novel classes (5-9), SimpleShot and ProtoNet
    6. train      simret train: fine-tune on the base classes (0-4) ...
    7. few-shot   ... and few-shot accuracy on the novel classes again, with the fine-tuned encoder
    8. attention  simret attention: SimPool attention pictures of a few queries

    The encoders start from RANDOM weights (nothing can be downloaded here), so absolute figures are low;
    the point is that every command runs, and that fine-tuning moves few-shot accuracy. Each step prints
    the command it runs: copy it, change --model/--weights, and run it on your own data.
    """
    from click.core import ParameterSource

    from simret.cli import cli

    ctx = click.get_current_context()
    overridden = [f"--{name.replace('_', '-')}" for name in ("arch", "epochs", "episodes", "image_size")
                  if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if small and overridden:
        raise click.UsageError(f"--small sets {', '.join(o.replace('--arch', '--model') for o in overridden)} "
                               f"itself: drop --small or those options")
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if small:
        arch, image_size, episodes, epochs = "test_resnet", 96, 100, 2
    arithmetic = ["--half"] if precision == "half" else ["--precision", precision]  # every encoder step
    model = ["--model", arch, "--weights", "none", "--gamma", f"{gamma:g}", *arithmetic]

    def run(step: int, title: str, args: List[str], note: Optional[str] = None) -> None:
        click.secho(f"\n[{step}/{STEPS}] {title}", bold=True)
        if note:
            click.echo(f"      {note}")
        click.secho("$ simret " + " ".join(shlex.quote(a) for a in args), fg="cyan")
        cli.main(args=args, prog_name="simret", standalone_mode=False)

    # 1. data ---------------------------------------------------------------------------------------
    from simret.data.samples import write_fewshot_sample, write_revisited_sample

    click.secho(f"[1/{STEPS}] data: real photographs and digits from installed packages", bold=True)
    sample = write_revisited_sample(data, image_size=image_size, extra_distractors=20)
    digits = write_fewshot_sample(data / "digits", image_size=32, per_class=30 if small else 60)
    from simret.data.revisited import load_revisited

    dataset = load_revisited(data, sample.name)
    database_list = data / "rsample-database.txt"
    database_list.write_text("".join(f"{sample.name}/jpg/{name}.jpg\n" for name in dataset.imlist))
    click.echo(f"      {sample.dataset_dir}: {sample.n_database} database images, {sample.n_queries} queries "
               f"(gnd_{sample.name}.pkl), {sample.n_distractors} distractors in {sample.distractors_dir}")
    click.echo(f"      {digits.root}: digits 0-4 in train/ (base classes), 5-9 in test/ (novel), "
               f"{digits.images_per_class} per class")

    # 2-4. retrieval ------------------------------------------------------------------------------------
    index_dir = out / "index"
    scales = "1" if small else "1,0.707"
    run(2, "index the database images", ["index", str(database_list), "--out", str(index_dir), *model,
                                         "--scales", scales, "--max-size", str(image_size), "--overwrite"])
    query = 2  # chelsea, the cat: a box around its face
    query_image = dataset.query_path(query)
    box = ",".join(f"{v:.0f}" for v in dataset.gnd[query]["bbx"])
    run(3, "search with a query cropped to its box", ["search", str(index_dir), str(query_image), "--bbox", box,
                                                      "-k", "5", *arithmetic],
        note=f"the query's box holds the subject; positives of {dataset.qimlist[query]} are named chelsea_*")
    results = out / "results"
    run(4, "evaluate with the Revisited protocol",
        ["eval", sample.name, "--data-root", str(data), *model, "--scales", scales, "--max-size", str(image_size),
         "--distractors", "r1m", "--qe", "2", "--cache", str(out / "cache"), "--out", str(results / "revisited.json")])

    # 5-7. few-shot and fine-tuning ----------------------------------------------------------------------
    fewshot = ["fewshot", str(digits.root), "--img-size", "32", "--shot", "1,5", "--method", "simpleshot,protonet",
               "--episodes", str(episodes), "--query", "10" if small else "15"]
    features = out / "features"  # one folder per encoder, so the second run keeps the first one's banks
    run(5, "few-shot on the novel digits, random-init encoder",
        [*fewshot, *model, "--features-dir", str(features / "random-init"),
         "--out", str(results / "fewshot-before.json")])
    checkpoints = out / "checkpoints"
    run(6, "fine-tune on the base digits (0-4)",
        ["train", str(digits.root), "--split", "train", "--out", str(checkpoints), *model, "--img-size", "32",
         "--epochs", str(epochs), "--batch-size", "32", "--lr", "1e-3", "--no-augment", "--overwrite"])
    trained = checkpoints / "encoder.safetensors"
    run(7, "few-shot on the novel digits again, fine-tuned encoder",
        [*fewshot, "--weights", str(trained), *arithmetic, "--features-dir", str(features / "fine-tuned"),
         "--out", str(results / "fewshot-after.json")])

    # 8. attention -------------------------------------------------------------------------------------
    pictures = out / "attention"
    queries = [str(dataset.query_path(i)) for i in range(0, min(len(dataset.qimlist), 6), 2)]
    run(8, "SimPool attention pictures", ["attention", *queries, *model, "-o", str(pictures),
                                         "--max-size", str(image_size)])

    # summary ------------------------------------------------------------------------------------------
    click.secho(f"\ndemo finished in {time.monotonic() - started:.0f} s", bold=True)
    for line in summary_lines(results, sample.name):
        click.echo(line)
    click.secho(f"written under {out}/:", bold=True)
    for path, what in [
        (data, f"{sample.name}/ (Revisited layout), revisitop1m/ (distractors), digits/ (few-shot split)"),
        (index_dir, "descriptors.h5, index.faiss, meta.json, skipped.tsv"),
        (out / "cache", "descriptors kept by simret eval (reused by the next run)"),
        (features, "few-shot feature banks features-<split>.h5: random-init/, fine-tuned/"),
        (results / "revisited.json", "mAP E/M/H and mP@k, with and without distractors"),
        (results / "fewshot-before.json", "few-shot accuracy ± 95% CI, random-init encoder"),
        (results / "fewshot-after.json", "few-shot accuracy ± 95% CI, fine-tuned encoder"),
        (checkpoints, "last.pth (training state), encoder.safetensors (use with --weights), log.jsonl"),
        (pictures, "<query>.png (image | attention overlay) and <query>.npy (raw map)"),
    ]:
        click.echo(f"  {str(path):<44} {what}")
    click.echo("All encoders here were RANDOMLY initialised: point --weights at timm, an official SimPool "
               "checkpoint or your own file for meaningful descriptors (see README).")
    click.secho("Search the index in a browser (Ctrl-C stops):", bold=True)
    click.echo(f"  simret serve {shlex.quote(str(index_dir))}    # then open http://127.0.0.1:8080/")


def summary_lines(results: Path, dataset: str) -> List[str]:
    """The demo's figures side by side: retrieval mAP, and few-shot accuracy before → after fine-tuning."""
    import json

    lines = []
    revisited = json.loads((results / "revisited.json").read_text(encoding="utf-8"))["results"]
    for name in (dataset, f"{dataset}+R1M"):
        if name in revisited:
            table = revisited[name]
            lines.append(f"  retrieval, {name:<14} mAP  E {100 * table['easy']['map']:5.2f}  "
                         f"M {100 * table['medium']['map']:5.2f}  H {100 * table['hard']['map']:5.2f}"
                         f"   (random-init encoder)")
    before = json.loads((results / "fewshot-before.json").read_text(encoding="utf-8"))
    after = json.loads((results / "fewshot-after.json").read_text(encoding="utf-8"))
    found = {(r["method"], r["n_shot"]): r for r in after["results"]}
    lines.append(f"  few-shot, novel digits, {before['n_way']}-way, accuracy % ± 95% CI over "
                 f"{before['n_episodes']} episodes:")
    lines.append(f"    {'method':<12}{'shot':>4}   {'random init':>13}   {'fine-tuned':>13}")
    for row in before["results"]:
        tuned = found.get((row["method"], row["n_shot"]))
        right = f"{100 * tuned['mean']:6.2f} ± {100 * tuned['ci95']:4.2f}" if tuned else "-"
        lines.append(f"    {row['method']:<12}{row['n_shot']:>4}   {100 * row['mean']:6.2f} ± {100 * row['ci95']:4.2f}"
                     f"   {right:>13}")
    return lines
