"""What the commands share: the encoder options (``model_options``, with ``--precision``), the device a
command runs on (``command_device``), ``--compile`` and ``--batch-size N|auto``, and the option types of
bounded numbers, whose ranges ``--help`` shows."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import click

from simret.models.defaults import DEFAULT_ARCH

POOL_CHOICES = ["simpool", "avg", "max", "gem", "cls"]
DEVICE_METAVAR = "auto|cpu|cuda[:N]|mps"


# ------------------------------------------------------------------------------------- number ranges


class _Hinted:
    """Mixin for click's range types: the error message ends with what the bounds mean (``hint``)."""

    def __init__(self, *args: Any, hint: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hint = hint

    def fail(self, message: str, param: Optional[click.Parameter] = None, ctx: Optional[click.Context] = None):
        super().fail(f"{message.rstrip('.')} ({self.hint})." if self.hint else message, param, ctx)


class HintedIntRange(_Hinted, click.IntRange):
    """``click.IntRange(min, max, hint=...)``: a range error says what the bounds mean."""


class FiniteFloatRange(_Hinted, click.FloatRange):
    """``click.FloatRange(min, max, hint=...)`` that also refuses NaN and ±inf (``FloatRange`` lets NaN
    through every bound)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number in the range {self._describe_range()}.", param, ctx)
        return number


class PixelRange(HintedIntRange):
    """A number of pixels from ``min`` up to ``simret.data.images.MAX_SIDE``, the longest side simret reads.

    The bound is looked up when the range is first shown or checked, so declaring an option with this type
    imports no image library (``simret --help`` stays light).
    """

    def __init__(self, min: int, *, hint: str = "") -> None:
        super().__init__(min=min, hint=hint)

    def _with_max(self) -> None:
        if self.max is None:
            from simret.data.images import MAX_SIDE

            self.max = MAX_SIDE

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        self._with_max()
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        self._with_max()
        return super()._describe_range()


BATCH_SIZE = click.IntRange(min=1)
"""``--batch-size``: images per forward pass (or per step)."""
WORKERS = HintedIntRange(min=0, hint="0: load images in this process")
"""``--workers``: image-loading processes."""
MAX_SIZE = PixelRange(min=0, hint="0 keeps the size")
"""``--max-size``: the long side images are resized to."""
NEIGHBOURS = click.IntRange(min=0)
"""``--qe``, ``--dba``: a number of neighbours, 0 for off."""
ALPHA = FiniteFloatRange(min=0, hint="0: plain average")
"""``--alpha``: the similarity exponent of αQE and αDBA."""


# ------------------------------------------------------------------------------------------ devices


def check_device_name(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """Click callback: a usage error for a device name that can never work (checked without torch)."""
    from simret.utils.devices import DEVICE_PATTERN

    if value is None:
        return None
    name = value.strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise click.BadParameter(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps", ctx, param)
    return name


def command_device(model_spec: Optional[Mapping[str, Any]] = None,
                   ctx: Optional[click.Context] = None) -> Optional[str]:
    """The device name a command was asked to run on: its own ``--device`` (in ``model_spec``), else
    ``simret --device``; None when neither was given (a command invoked outside the ``simret`` group).

    ``ctx`` defaults to the current click context; ``resolve_device`` turns the name (None: auto) into a
    ``torch.device``.
    """
    ctx = ctx or click.get_current_context(silent=True)
    asked = (model_spec or {}).get("device")
    return asked or (getattr(ctx.obj, "device", None) if ctx is not None and ctx.obj is not None else None)


# ---------------------------------------------------------------------------------------- precision

PRECISION_CHOICES = ["auto", "fp32", "bf16", "fp16"]
PRECISION_OPTIONS = [
    click.option("--precision", type=click.Choice(PRECISION_CHOICES, case_sensitive=False), default="auto",
                 show_default=True, envvar="SIMRET_PRECISION",
                 help="Arithmetic of the model's forward pass. auto: bf16 on CPUs with AMX or AVX512-BF16 and on "
                      "GPUs that have it, fp16 on older GPUs, fp32 elsewhere. SimPool, the norms and the L2 "
                      "normalisation stay fp32; descriptors of any precision are searched together. "
                      "Default from $SIMRET_PRECISION when set."),
    click.option("--half", is_flag=True, hidden=True,
                 help="Deprecated: --precision bf16 on the CPU, fp16 on a GPU."),
]
COMPILE_CHOICES = ["auto", "on", "off", "openvino", "inductor"]


def _precision_choice(precision: str, half: bool) -> str:
    """``--precision`` (lower-cased), or the deprecated ``--half`` (with a warning) when it was not given."""
    if half:
        from simret.utils.logs import get_logger

        ctx = click.get_current_context(silent=True)
        given = ctx is not None and given_on_command_line(ctx, "precision")
        get_logger("simret.commands").warning("--half is deprecated: use --precision bf16|fp16|auto%s",
                                              " (--precision wins)" if given else " (taken as bf16 on a CPU, fp16 "
                                                                                  "on a GPU)")
        if not given:
            return "half"
    return precision.lower()


def given_on_command_line(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (not a default, nor an environment variable's)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def precision_options(command: Callable) -> Callable:
    """``--precision`` (and the hidden, deprecated ``--half``) for a command that runs an encoder without
    ``model_options``; the command receives ``precision`` (``auto|fp32|bf16|fp16``, or ``half``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, precision: str, half: bool, **kwargs: Any) -> Any:
        return command(*args, precision=_precision_choice(precision, half), **kwargs)

    for option in reversed(PRECISION_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def compile_option(command: Callable) -> Callable:
    """``--compile auto|on|off|openvino|inductor`` for commands that run an encoder over many images (the
    command receives ``compile``)."""
    return click.option("--compile", "compile", type=click.Choice(COMPILE_CHOICES, case_sensitive=False),
                        default="auto", show_default=True,
                        help="Compile the encoder (CNNs; one graph for every image size): with OpenVINO on a CPU "
                             "when it is installed (pip install 'simret[openvino]'; about 10 s, then cached), else "
                             "torch.compile (tens of seconds). auto: once the images left repay the compile time "
                             "(logged); on: now; openvino/inductor: now, with that backend; off: never.")(command)


class BatchSizeType(click.IntRange):
    """``--batch-size``: a number >= 1, or ``auto`` (by image size and device: 1 at 1024 px on a CPU)."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def get_metavar(self, param: click.Parameter, ctx: Optional[click.Context] = None) -> str:
        return f"{super().get_metavar(param, ctx) or 'INTEGER RANGE'}|auto"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return super().convert(value, param, ctx)


BATCH_SIZE_AUTO = BatchSizeType()
"""``--batch-size N|auto`` of the retrieval commands (images of one size per forward pass)."""


# ------------------------------------------------------------------------------------------ encoder


def model_options(command: Callable) -> Callable:
    """Add ``--model --pool --gamma --weights --checkpoint-key --device --precision`` to a command.

    The command receives them collected in one ``model_spec`` dict argument (``precision``: ``auto``,
    ``fp32``, ``bf16``, ``fp16``, or ``half`` from the deprecated ``--half``; resolve it with
    ``simret.models.precision.resolve_precision(spec["precision"], device)``).
    """
    options = [
        click.option("-m", "--model", "arch", default=None, metavar="ARCH",
                     help="Any timm architecture (resnet50, convnext_small, vit_small_patch16_224 …; a .tag "
                          "suffix picks timm pretrained weights). Default: the one an official checkpoint or a "
                          f"simret-saved file names, else {DEFAULT_ARCH}."),
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
        *PRECISION_OPTIONS,
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, arch: str, pool: str, gamma: Optional[float], weights: str,
                checkpoint_key: Optional[str], device: Optional[str], precision: str, half: bool,
                **kwargs: Any) -> Any:
        kwargs["model_spec"] = {"arch": arch, "pool": pool, "gamma": gamma, "weights": weights,
                                "checkpoint_key": checkpoint_key, "device": device,
                                "precision": _precision_choice(precision, half)}
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def build_inference_encoder(model_spec: Dict[str, Any], ctx: Optional[click.Context] = None,
                            compile: Any = "auto"):
    """``(InferenceEncoder, device)``: the encoder of ``model_spec`` prepared for fast inference at
    ``model_spec["precision"]`` (``simret.models.runtime.prepare_for_inference``): one call for a command
    that describes images itself (e.g. ``serve``). ``compile="on"`` compiles now."""
    from simret.models.runtime import prepare_for_inference

    encoder, device = build_encoder(model_spec, ctx)
    return prepare_for_inference(encoder, model_spec.get("precision", "auto"), device, compile=compile), device


def build_encoder(model_spec: Dict[str, Any], ctx: Optional[click.Context] = None):
    """``(encoder on its device, device)`` from the options collected by ``model_options``."""
    from simret.models.encoder import create_encoder_from_spec
    from simret.utils.devices import resolve_device

    device = resolve_device(command_device(model_spec, ctx) or "auto")
    return create_encoder_from_spec(model_spec).to(device), device


def lock_timeout_option(command: Callable) -> Callable:
    """``--lock-timeout SECONDS`` for commands that write a directory (one writer at a time)."""
    return click.option("--lock-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                        help="How long to wait while another simret process writes the same output (default: as "
                             "long as it takes; 0: fail at once).")(command)


def verify_content_option(command: Callable) -> Callable:
    """``--verify-content`` for commands that keep descriptors of image files and reuse them while the files are
    unchanged (size and modification time; with this flag also the SHA-256 of the bytes, which are stored)."""
    return click.option("--verify-content", is_flag=True,
                        help="Also compare file contents (SHA-256), not only sizes and modification times, to find "
                             "images replaced in place; the digests are stored.")(command)


def positive_int_list(text: str, option: str) -> List[int]:
    """``"1,5,5"`` → ``[1, 5]`` (comma-separated integers >= 1, duplicates dropped); a usage error otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {text!r}", param_hint=option)
    return list(dict.fromkeys(values))


def index_params_option(pairs: Tuple[str, ...]) -> Dict[str, int]:
    """``--index-param NAME=VALUE`` pairs → ``{name: int}``; a usage error naming the bad pair."""
    params: Dict[str, int] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not value:
            raise click.BadParameter(f"expected NAME=VALUE (e.g. nprobe=32), got {pair!r}", param_hint="--index-param")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            raise click.BadParameter(f"{name} takes an integer, got {value!r}", param_hint="--index-param") from None
    return params


def memory_size(text: Optional[str]) -> Optional[int]:
    """``--max-memory 4GB`` → bytes (None stays None); a usage error for what is not a size."""
    from simret.retrieval.budget import parse_size

    try:
        return parse_size(text) if text is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--max-memory") from None
