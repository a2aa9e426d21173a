"""``simret train``: fine-tune an encoder (SimPool pooling by default) on labelled images."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from simret.commands.options import command_device, lock_timeout_option, model_options


@click.command(short_help="Fine-tune an encoder on labelled images (one process, or many with torchrun).")
@click.argument("data", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(), metavar="CKPT_DIR",
              help="Folder for last.pth (checkpoint, rewritten every epoch), encoder.safetensors, log.jsonl.")
@click.option("--split", default=None, metavar="NAME",
              help="Train on one split of a few-shot root: DATA/NAME/<class>/* or DATA/NAME.csv (+ DATA/images/).")
@model_options
@click.option("--loss", type=click.Choice(["ce", "arcface"]), default="ce", show_default=True,
              help="ce: linear head + cross-entropy; arcface: normalised head with an additive angular margin.")
@click.option("--margin", type=float, default=0.5, show_default=True, help="ArcFace margin m (radians).")
@click.option("--scale", type=float, default=30.0, show_default=True, help="ArcFace scale s.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True, help="Cross-entropy label smoothing.")
@click.option("--freeze-trunk", is_flag=True,
              help="Train only the pooling and the head; the trunk stays frozen in eval mode (BatchNorm too).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Peak learning rate (AdamW). Default 1e-4, 1e-3 with --freeze-trunk.")
@click.option("--min-lr", type=float, default=1e-6, show_default=True, help="Where the cosine decay ends.")
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True,
              help="Linear warm-up length in epochs (counted in steps; fractions allowed).")
@click.option("--weight-decay", type=float, default=0.05, show_default=True,
              help="AdamW weight decay (never on biases, norms, 1-d parameters, position embeddings).")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Global batch: under torchrun each of N processes loads batch-size/N images per step.")
@click.option("--grad-clip", type=float, default=None, metavar="NORM", help="Clip the gradient norm to NORM.")
@click.option("--amp", is_flag=True, hidden=True,
              help="Deprecated: --precision auto on CUDA (bf16 where supported, else fp16 with a gradient scaler).")
@click.option("--img-size", type=int, default=None, metavar="PX",
              help="Training crop size (default: the model's); saved with the encoder for later preprocessing.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="timm training augmentations (random resized crop, flip, colour jitter) or plain resize + crop.")
@click.option("--workers", type=int, default=None, metavar="N",
              help="Image loading processes per rank. Default: beside a GPU up to 8 (the cores shared among the "
                   "ranks on the machine); on a CPU 0 on small machines (decode in the training process), a few "
                   "on larger ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialisation, order, augmentation.")
@click.option("--deterministic", is_flag=True, help="Deterministic kernels (slower on GPU; CPU runs are already).")
@click.option("--resume", is_flag=True, help="Continue CKPT_DIR/last.pth exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Start afresh even if CKPT_DIR already holds a checkpoint.")
@click.option("--keep", type=int, default=0, show_default=True, metavar="N",
              help="Also keep the N most recent epochs as epoch-NNN.pth (last.pth is always kept).")
@lock_timeout_option
@click.pass_context
def train(ctx: click.Context, data: str, out: str, split: Optional[str], model_spec: Dict[str, Any],
          **options: Any) -> None:
    """Fine-tune ARCH + pooling (SimPool by default) with a linear or ArcFace head on DATA.

    DATA is a folder per class (DATA/<class>/*.jpg), a filename,label CSV, or, with --split, one split of
    a few-shot root (DATA/train/<class>/* or miniImageNet's DATA/train.csv + DATA/images/).

    \b
    Examples:
      simret train photos/ --out ckpt/ --model resnet50 --gamma 2.0 --weights timm --freeze-trunk
      simret train ~/data/miniimagenet --split train --out ckpt/ --model resnet18 --weights none \\
          --img-size 84 --epochs 90 --lr 1e-3 --batch-size 128
      simret train photos/ --out ckpt/ --model resnet50 --gamma 2.0 --weights timm --freeze-trunk --resume
                                          # after a stop: the same command plus --resume
      torchrun --nproc_per_node=4 -m simret train photos/ --out ckpt/ --model resnet50 --batch-size 256

    \b
    CKPT_DIR receives:
      last.pth             weights + optimizer + schedule + RNG: --resume continues from it exactly;
                           it also loads as an encoder (--weights CKPT_DIR/last.pth)
      encoder.safetensors  the fine-tuned encoder alone, written at the end
      log.jsonl            one line per epoch: loss, accuracy, lr, time
      skipped.tsv          images that could not be read (they are skipped, training goes on)

    \b
    Use the result anywhere an encoder is asked for:
      simret index PHOTOS --out IDX --weights CKPT_DIR/encoder.safetensors
    """
    from simret.train.trainer import TrainConfig
    from simret.train.trainer import train as run_training
    from simret.utils.distributed import quiet_unless_main

    other_rank = quiet_unless_main()
    device = command_device(model_spec, ctx)
    config = TrainConfig(
        data=data, out=out, split=split, arch=model_spec.get("arch"), pool=model_spec.get("pool", "simpool"),
        gamma=model_spec.get("gamma"), weights=model_spec.get("weights"),
        checkpoint_key=model_spec.get("checkpoint_key"), device=device,
        precision=model_spec.get("precision", "fp32"), **options)
    result = run_training(config)
    if other_rank:
        return  # rank 0 reports for the group
    last = result.history[-1] if result.history else None
    if last is not None:
        click.echo(f"trained {result.epochs} epoch(s) on {len(result.classes)} classes: last epoch loss "
                   f"{last['loss']:.4f}, accuracy {100 * last['accuracy']:.1f}%")
    click.echo(f"checkpoint  {result.checkpoint}  (continue with the same command and --resume)")
    click.echo(f"encoder     {result.encoder_file}  ({result.fingerprint})")
    click.echo(f"use it      simret index PHOTOS --out IDX --weights {result.encoder_file}")

