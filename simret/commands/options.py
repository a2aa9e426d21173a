"""Options shared by the commands that build an encoder (``index``, ``eval``, ``fewshot`` …)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import click

POOL_CHOICES = ["simpool", "avg", "max", "gem", "cls"]
DEFAULT_ARCH = "resnet50"
DEVICE_METAVAR = "auto|cpu|cuda[:N]|mps"


def check_device_name(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """Click callback: a usage error for a device name that can never work (checked without torch)."""
    from simret.utils.devices import DEVICE_PATTERN

    if value is None:
        return None
    name = value.strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise click.BadParameter(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps", ctx, param)
    return name


def check_max_size(max_size: int) -> None:
    """A usage error for a ``--max-size`` no image can have (negative, or past the longest side simret reads)."""
    from simret.data.images import MAX_SIDE

    if not 0 <= max_size <= MAX_SIDE:
        raise click.BadParameter(f"must be a number of pixels from 1 to {MAX_SIDE} (0 keeps the size), got "
                                 f"{max_size}", param_hint="--max-size")


def model_options(command: Callable) -> Callable:
    """Add ``--model --pool --gamma --weights --checkpoint-key --device`` to a command.

    The command receives them collected in one ``model_spec`` dict argument.
    """
    options = [
        click.option("-m", "--model", "arch", default=None, metavar="ARCH",
                     help="Any timm architecture (resnet50, convnext_small, vit_small_patch16_224 …; a .tag "
                          "suffix picks timm pretrained weights). Default: the one an official checkpoint or a "
                          "simret-saved file names, else resnet50."),
        click.option("--pool", type=click.Choice(POOL_CHOICES), default="simpool", show_default=True,
                     help="Global pooling of the trunk's features."),
        click.option("--gamma", type=float, default=None, metavar="G",
                     help="SimPool power-mean exponent (paper: 2.0 CNNs, 1.25 ViTs); omit for the plain mean."),
        click.option("-w", "--weights", default="timm", show_default=True, metavar="timm|none|simpool:NAME|PATH",
                     help="timm = timm's pretrained trunk; none = random init; simpool:NAME = an official "
                          "SimPool checkpoint (simret info --checkpoints); PATH = a .pth/.safetensors file."),
        click.option("--checkpoint-key", default=None, metavar="KEY",
                     help="Entry of a checkpoint dict holding the weights (default: teacher, state_dict, model …)."),
        click.option("--device", default=None, metavar=DEVICE_METAVAR, callback=check_device_name,
                     help="Device for the model (default: simret --device, i.e. auto)."),
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, arch: str, pool: str, gamma: Optional[float], weights: str,
                checkpoint_key: Optional[str], device: Optional[str], **kwargs: Any) -> Any:
        kwargs["model_spec"] = {"arch": arch, "pool": pool, "gamma": gamma, "weights": weights,
                                "checkpoint_key": checkpoint_key, "device": device}
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def build_encoder(model_spec: Dict[str, Any], ctx: Optional[click.Context] = None):
    """``(encoder on its device, device)`` from the options collected by ``model_options``."""
    from simret.models import create_encoder
    from simret.utils.devices import resolve_device

    ctx = ctx or click.get_current_context(silent=True)
    device_name = model_spec.get("device") or (getattr(ctx.obj, "device", None) if ctx and ctx.obj else None)
    device = resolve_device(device_name or "auto")
    weights = model_spec.get("weights")
    weights = None if weights in (None, "none", "random") else weights
    arch = model_spec.get("arch")
    if arch is None and weights in (None, "timm"):
        arch = DEFAULT_ARCH  # files and official checkpoints name their own architecture
    encoder = create_encoder(arch, pool=model_spec.get("pool", "simpool"), gamma=model_spec.get("gamma"),
                             weights=weights, checkpoint_key=model_spec.get("checkpoint_key"))
    return encoder.to(device), device



def lock_timeout_option(command: Callable) -> Callable:
    """``--lock-timeout SECONDS`` for commands that write a directory (one writer at a time)."""
    return click.option("--lock-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                        help="How long to wait while another simret process writes the same output (default: as "
                             "long as it takes; 0: fail at once).")(command)
