"""The fast inference path of an encoder: precision, memory layout, compiled graphs, batch size.

``prepare_for_inference(encoder, precision="auto", device=None, compile="auto")`` returns an
``InferenceEncoder``: images ``(B, 3, H, W)`` → float32 descriptors ``(B, D)``, computed the fastest way
measured to keep descriptor fidelity (``scripts/bench.py extract``):

* precision: ``resolve_precision`` (bf16 autocast on CPUs with AMX/AVX512-BF16, bf16/fp16 on GPUs);
  SimPool, the post-pool norms and the L2 normalisations stay float32 (``simret.models.precision``);
* transformer trunks at bf16 on a CPU run from a copy of the encoder whose trunk holds its weights in
  bf16 (``_trunk_in_precision``): under autocast alone the residual stream stays float32 and every
  linear layer casts its input and weight again at every call (28% of a ViT-S/16 forward at 1024 px); the
  copy, 1.13x faster end to end, costs the trunk's weights once more in 16 bits (44 MB for ViT-S, 170 MB for
  ViT-B) and is rebuilt when the weights change. The trunk's own LayerNorms then run in bf16 (inputs, weights);
  SimPool and the post-pool norm keep float32 weights;
* memory layout: CNN trunks run channels-last (NHWC; oneDNN's and cuDNN's fast layout for convolutions
  and what makes bf16 pay off on CPUs); transformer trunks keep the default layout (channels-last makes them
  slower);
* compiled graphs for CNNs, with the image height and width dynamic: one compilation serves every image
  size (Revisited images all differ), nothing is padded or resized, so descriptors are the eager ones up to
  float rounding. The backend: OpenVINO on a CPU when it is installed (``simret.models.openvino_backend``:
  as fast as inductor, converted in seconds rather than tens of seconds, and cached on disk), else
  ``torch.compile`` (inductor, weights frozen as constants); ``$SIMRET_COMPILE_BACKEND``
  (``openvino``/``inductor``) or ``compile="openvino"`` chooses. Transformers are compiled only on request
  (``compile=True``, inductor): their graphs specialise on the patch grid, one compilation per image size
  (torch's recompile limit, 8, then bounds it: further sizes run eager). Compiling costs seconds to tens of
  seconds (logged), so ``compile="auto"`` compiles only when the work left is long enough to repay it
  (``CompilePolicy``); ``True`` always, ``False`` never. A compilation that fails falls back to eager.

The encoder itself is converted in place (memory layout only: its weights, outputs and fingerprint do not
change) and kept in ``InferenceEncoder.encoder``. Compiled graphs are cached on the encoder per precision
and device, and dropped when its weights change; inductor keeps its kernels on disk in
``~/.cache/simret/inductor`` (``$SIMRET_CACHE``), so a later run of the same model compiles much faster.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from simret.models.precision import autocast, resolve_precision
from simret.utils.logs import get_logger

log = get_logger(__name__)

CompileSpec = Union[bool, str, None]  # True/"on", False/"off", "auto"/None
_CACHE_ATTRIBUTE = "_simret_compiled"
COMPILE_ENV = "SIMRET_COMPILE"  # "off" disables compilation everywhere (e.g. where no C++ compiler exists)
BACKEND_ENV = "SIMRET_COMPILE_BACKEND"  # "openvino" or "inductor": the backend of compile="auto"/"on"
BACKENDS = ("openvino", "inductor")


def parse_compile(value: CompileSpec) -> str:
    """``"on"``, ``"off"`` or ``"auto"`` for a ``compile`` argument (True/False/None/"auto"/"on"/"off"…; a
    backend's name, ``"openvino"`` or ``"inductor"``, is ``"on"`` with that backend)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text in ("on", "yes", "true", "1", "always") or text in BACKENDS:
        return "on"
    if text in ("off", "no", "false", "0", "never"):
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"compile takes auto, on, off, openvino or inductor, not {value!r}")


def requested_backend(value: CompileSpec) -> Optional[str]:
    """The backend a ``compile`` argument names (``"openvino"``, ``"inductor"``), else None."""
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return text if text in BACKENDS else None


def default_compile_backend(encoder: Any, device: Any) -> str:
    """``$SIMRET_COMPILE_BACKEND`` if set; else ``openvino`` for a CNN on a CPU when openvino is installed
    (as fast as inductor end to end, compiled in 4 s instead of 30 s for ResNet-50; ``scripts/bench.py
    extract``), else ``inductor``."""
    from simret.models.openvino_backend import openvino_available

    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be openvino or inductor, not {chosen!r}")
        return chosen
    on_cpu = getattr(device, "type", str(device)).split(":")[0] == "cpu"
    return "openvino" if on_cpu and uses_channels_last(encoder) and openvino_available() else "inductor"


def uses_channels_last(encoder: Any) -> bool:
    """Whether the encoder's trunk is a convolutional network (feature maps), which runs faster NHWC."""
    return not getattr(encoder, "is_transformer", False) and any(
        getattr(module, "weight", None) is not None and getattr(module.weight, "ndim", 0) == 4
        for module in encoder.modules())


def compile_pays_off(encoder: Any) -> bool:
    """Whether ``compile="auto"`` considers compiling this encoder (measured on a 2-core AMX CPU): CNNs yes —
    one graph serves every image size, 1.7-2.5x over eager bf16 + channels-last; transformers no — their
    graphs specialise on the patch grid, so every new image size recompiles (25-45 s each), for 1.6x once
    compiled."""
    return uses_channels_last(encoder)


@dataclass
class CompilePolicy:
    """When ``compile="auto"`` switches from eager to compiled: once the eager time the rest of the run
    would take, times the fraction compiling saves, exceeds the expected compile time (with a margin).

    ``expected_seconds`` and ``speedup`` are measurements on a 2-core AMX CPU (inductor, ResNet-50: 40-110 s
    to compile, 25-65 s with a warm cache; 1.7-2.5x faster than eager bf16 + channels-last, 2.2x on single
    1024-px images); the eager time per image is measured on the run's own first images.
    """

    expected_seconds: float = 60.0
    speedup: float = 2.0
    margin: float = 1.5
    min_observed: int = 2

    @classmethod
    def for_backend(cls, backend: str, cached: bool = False) -> CompilePolicy:
        """The policy of a backend: OpenVINO converts in 4-12 s (under 1 s from its disk cache; 3 s counted,
        to leave short runs alone), and its forward pass of ResNet-50 at 1024 px was 2.7x eager bf16 +
        channels-last in a forward-only loop here; inductor as above."""
        if backend == "openvino":
            return cls(expected_seconds=3.0 if cached else 15.0, speedup=2.7)
        return cls()

    def should_compile(self, observed_images: int, observed_seconds: float, remaining_images: int) -> bool:
        if observed_images < self.min_observed or observed_seconds <= 0:
            return False
        per_image = observed_seconds / observed_images
        saved = remaining_images * per_image * (1.0 - 1.0 / self.speedup)
        return saved > self.margin * self.expected_seconds


class InferenceEncoder:
    """An encoder prepared for inference: images ``(B, 3, H, W)`` → descriptors ``(B, D)`` float32 (not
    normalised), at ``precision`` on ``device``; see the module docstring.

    Attributes:
        encoder: the ``simret.models.Encoder`` (channels-last for CNNs).
        precision: ``fp32``, ``bf16`` or ``fp16`` (resolved).
        device: the ``torch.device`` it runs on.
        channels_last: whether inputs are laid out NHWC.
        compile_mode: ``on``, ``off`` or ``auto`` (compiled once ``maybe_compile`` says so).
        compiled: whether the compiled graph is in use.
        compile_seconds: time the compilation took (0 while not compiled).
        compile_backend: ``openvino`` or ``inductor`` (``default_compile_backend``).
    """

    def __init__(self, encoder: Any, precision: str, device: Any, channels_last: bool, compile_mode: str,
                 compile_backend: str = "inductor") -> None:
        self.encoder = encoder
        self.precision = precision
        self.device = device
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.compiled = False
        self.compile_seconds = 0.0
        self.compile_backend = compile_backend
        self._forward = encoder
        self._casts_trunk = (precision in LOW_PRECISION_TRUNK and getattr(encoder, "is_transformer", False)
                             and getattr(device, "type", str(device)).split(":")[0] == "cpu")
        self._compile_failed = False
        self._default_policy: Optional[Tuple[str, CompilePolicy]] = None  # (backend, its policy)

    # ---------------------------------------------------------------------------------- passthrough

    def __getattr__(self, name: str) -> Any:
        """Everything else is the encoder's (``fingerprint``, ``dim``, ``data_config``, ``provenance`` …)."""
        if name.startswith("__") or name in ("encoder", "_forward"):
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def describe(self) -> str:
        """One line for logs: ``bf16, channels-last, compiled (openvino, 9.2 s) on cpu``; ``bf16 (16-bit trunk
        weights), contiguous on cpu`` for a transformer run from its 16-bit copy."""
        weights = f" ({self.precision[-2:]}-bit trunk weights)" if self._casts_trunk and not self.compiled else ""
        parts = [self.precision + weights, "channels-last" if self.channels_last else "contiguous"]
        if self.compiled:
            parts.append(f"compiled ({self.compile_backend}, {self.compile_seconds:.1f} s)")
        elif self.compile_mode != "off":
            parts.append(f"eager (compile: {self.compile_mode})")
        return f"{', '.join(parts)} on {self.device}"

    # -------------------------------------------------------------------------------------- compute

    def context(self):
        """``inference_mode`` and the precision's autocast (what every forward pass here runs under)."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(self.precision, self.device))
        return stack

    def prepare_images(self, images):
        """images on the device, in the layout the forward pass takes (the copy is asynchronous from pinned
        memory): channels-last for an eager or inductor CNN; as they come for OpenVINO, which takes NCHW
        arrays (a channels-last tensor would be laid out twice, there and back)."""
        import torch

        images = images.to(self.device, non_blocking=True)
        takes_nchw = self.compiled and self.compile_backend == "openvino"
        if self.channels_last and images.ndim == 4 and not takes_nchw:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def __call__(self, images):
        """images ``(B, 3, H, W)`` → ``(B, D)`` float32 descriptors (not normalised)."""
        images = self.prepare_images(images)
        with self.context():
            if self.compiled:
                return self._compiled_call(images).float()
            return self._eager_forward()(images).float()

    @property
    def runs_in_parallel(self) -> bool:
        """Whether ``start`` runs forward passes in the background, side by side (OpenVINO with more than one
        stream); otherwise it runs each at once."""
        return self.compiled and getattr(self._forward, "parallel", None) is not None

    def start(self, images, side_by_side: bool = True) -> Callable[[], Any]:
        """Start the forward pass of images ``(B, 3, H, W)``; the returned function waits for it and gives
        ``(B, D)`` float32 descriptors (not normalised). With ``side_by_side`` and ``runs_in_parallel`` it
        returns at once, so the caller prepares the next images while this runs; otherwise the pass runs now
        (on all threads)."""
        if side_by_side and self.runs_in_parallel:
            return self._forward.start(self.prepare_images(images))
        result = self(images)
        return lambda: result

    def _eager_forward(self):
        """The eager module: the encoder, or its copy with a 16-bit trunk (transformers on a CPU)."""
        if self._forward is self.encoder and self._casts_trunk:
            return _trunk_in_precision(self.encoder, self.precision, self.device)
        return self._forward

    def attention(self, images):
        """SimPool attention maps ``(B, h, w)`` float32 (eager: attention maps are few and not compiled)."""
        images = self.prepare_images(images)
        with self.context():
            return self.encoder.attention(images).float()

    # ---------------------------------------------------------------------------------- compilation

    def maybe_compile(self, observed_images: int = 0, observed_seconds: float = 0.0, remaining_images: int = 0,
                      policy: Optional[CompilePolicy] = None) -> bool:
        """Compile now if ``compile_mode`` is ``on``, or ``auto`` and ``policy`` says the rest of the run
        repays it (see ``CompilePolicy``); returns whether the compiled graph is in use."""
        if self.compiled or self._compile_failed or self.compile_mode == "off":
            return self.compiled
        if self.compile_mode == "auto":
            if not compile_pays_off(self.encoder):
                return False
            if not (policy or self._policy()).should_compile(observed_images, observed_seconds, remaining_images):
                return False
            log.info("compiling the encoder: about %d images left, %.2f s each in eager mode", remaining_images,
                     observed_seconds / max(observed_images, 1))
        self.compile()
        return self.compiled

    def _policy(self) -> CompilePolicy:
        """The backend's policy, looked up once (``maybe_compile`` asks after every eager batch)."""
        if self._default_policy is None or self._default_policy[0] != self.compile_backend:
            cached = False
            if self.compile_backend == "openvino":
                from simret.models.openvino_backend import cached_model_dir

                cached = cached_model_dir(self.encoder).is_dir()
            self._default_policy = (self.compile_backend, CompilePolicy.for_backend(self.compile_backend, cached))
        return self._default_policy[1]

    def compile(self, example: Any = None) -> float:
        """Compile the forward pass now (``compile_backend``: OpenVINO, or ``torch.compile`` with inductor and
        frozen weights; dynamic height and width) by running it once on ``example`` (default: a small random
        batch); returns the seconds it took. Failures are logged and leave the eager path in use."""
        import torch

        if self.compiled:
            return self.compile_seconds
        _persistent_compile_cache()
        cache = _compiled_cache(self.encoder)
        key = (self.compile_backend, *_cache_key(self.encoder, self.precision, self.device))
        started = time.perf_counter()
        if example is None:
            side = _example_side(self.encoder)
            example = torch.randn(1, 3, side, side + 32)
        try:
            compiled = cache.get(key)
            if compiled is None:
                compiled = self._compile_with_backend(example)
            self._forward = compiled
            self.compiled = True
            example = self.prepare_images(example)
            _mark_dynamic(example)
            with self.context():
                self._compiled_call(example)
            cache[key] = compiled
        except Exception as err:  # noqa: BLE001 - any compiler failure: keep the (correct) eager path
            self._forward, self.compiled, self._compile_failed = self.encoder, False, True
            log.warning("compiling with %s failed, running eager (%s: %s)", self.compile_backend,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return 0.0
        self.compile_seconds = time.perf_counter() - started
        log.info("compiled the encoder in %.1f s (%s)", self.compile_seconds, self.describe())
        return self.compile_seconds

    def _compile_with_backend(self, example: Any):
        """The compiled forward of ``compile_backend`` (OpenVINO converts now; torch.compile on first call)."""
        import torch

        if self.compile_backend == "openvino":
            from simret.models.openvino_backend import OpenVinoForward

            if self.device.type != "cpu":
                raise ValueError(f"the OpenVINO backend runs on the CPU, not on {self.device}")
            if not uses_channels_last(self.encoder):
                raise ValueError("the OpenVINO backend converts CNN encoders only (a transformer's graph would "
                                 "serve one image size): use --compile inductor")
            return OpenVinoForward(self.encoder, self.precision, example)
        return torch.compile(self.encoder, backend=self.compile_backend)

    def _compiled_call(self, images):
        """The compiled forward (inside ``context()``: inference mode, autocast)."""
        import torch
        import torch._inductor.config as inductor_config

        if self.compile_backend == "openvino":
            return self._forward(images)

        if not images.is_inference():  # one kind of input tensor: dynamo guards on it (else one graph per kind)
            images = images.clone(memory_format=torch.preserve_format)
        _mark_dynamic(images)
        with inductor_config.patch(freezing=True):
            return self._forward(images)


def prepare_for_inference(encoder: Any, precision: Optional[str] = "fp32", device: Any = None,
                          compile: CompileSpec = False, channels_last: Optional[bool] = None) -> InferenceEncoder:
    """``encoder`` ready for fast inference (see the module docstring).

    Args:
        encoder: a ``simret.models.Encoder``, or an ``InferenceEncoder``: returned as it is when it runs as
            asked (None for ``precision``, ``device``, ``compile``: as it does), re-prepared otherwise.
        precision: ``fp32`` (default: exact), ``bf16``, ``fp16``, ``auto`` (or the legacy ``half``); the
            command line's default is ``auto``.
        device: where to run (default: where the encoder's parameters are); the encoder is moved there.
        compile: False (default), True, or ``"auto"`` (when the run repays it, see
            ``InferenceEncoder.maybe_compile``); ``"openvino"`` or ``"inductor"``: now, with that backend
            (default backend: ``default_compile_backend``). ``SIMRET_COMPILE=off`` turns compilation off
            everywhere.
        channels_last: override the layout choice (default: CNNs yes, transformers no).
    """
    import torch

    from simret.utils.devices import resolve_device

    if isinstance(encoder, InferenceEncoder):
        if _same_settings(encoder, precision, device, compile, channels_last):
            return encoder
        encoder = encoder.encoder
    parameter = next(encoder.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = resolve_device(device)
    if parameter is not None and parameter.device != device:
        encoder.to(device)
    resolved = resolve_precision(precision or "fp32", device)
    layout = uses_channels_last(encoder) if channels_last is None else bool(channels_last)
    if layout:
        encoder.to(memory_format=torch.channels_last)
    mode = parse_compile(False if compile is None else compile)
    if os.environ.get(COMPILE_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        mode = "off"
    encoder.eval()
    backend = requested_backend(compile) or default_compile_backend(encoder, device)
    prepared = InferenceEncoder(encoder, resolved, device, layout, mode, backend)
    if mode == "on":
        prepared.compile()
    return prepared


# ------------------------------------------------------------------------------------------ batch size

CPU_PIXEL_BUDGET = 16 * 224 * 224  # pixels per forward pass on a CPU (batch 16 at 224 px, 1 at 1024 px)
GPU_PIXEL_BUDGET = 128 * 224 * 224


def auto_batch_size(max_size: Optional[int], device: Any, *, square: bool = False) -> int:
    """Images per forward pass for images whose long side is ``max_size`` pixels on ``device``.

    On a CPU a forward pass of a large image already keeps every core busy and larger batches only grow
    the working set past the caches (batch 1 is 1.2x faster than 16 at 1024 px, measured): a fixed pixel
    budget per pass (16 images at 224 px, 1 at 724 px and above). On a GPU the budget is 8x that (larger
    batches fill it). ``square``: the images are ``max_size`` x ``max_size`` (not only their long side).
    """
    side = int(max_size or 224)
    pixels = side * side if square else side * side * 3 // 4  # photographs are about 4:3
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    budget = CPU_PIXEL_BUDGET if kind == "cpu" else GPU_PIXEL_BUDGET
    return max(1, min(256, budget // max(1, pixels)))


# ------------------------------------------------------------------------------------------- helpers


def _same_settings(prepared: InferenceEncoder, precision: Optional[str], device: Any, compile: CompileSpec,
                   channels_last: Optional[bool]) -> bool:
    """Whether ``prepared`` already runs as asked (None for ``device``/``compile``: as it is)."""
    from simret.utils.devices import resolve_device

    if device is not None and resolve_device(device) != prepared.device:
        return False
    if precision is not None and resolve_precision(precision, prepared.device) != prepared.precision:
        return False
    if compile is not None and parse_compile(compile) != prepared.compile_mode:
        return False
    if requested_backend(compile) not in (None, prepared.compile_backend):
        return False
    return channels_last is None or bool(channels_last) == prepared.channels_last


def _persistent_compile_cache() -> None:
    """Keep inductor's compiled kernels and graphs in simret's cache (``~/.cache/simret/inductor``) rather than
    under ``/tmp``, so a later run (after a reboot too) compiles the same model in seconds; an explicit
    ``TORCHINDUCTOR_CACHE_DIR`` wins."""
    from simret.utils.paths import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def _compiled_cache(encoder: Any) -> Dict[Tuple[Any, ...], Any]:
    cache = encoder.__dict__.get(_CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        encoder.__dict__[_CACHE_ATTRIBUTE] = cache
    return cache


LOW_PRECISION_TRUNK = ("bf16",)  # fp16 on a CPU stays under autocast alone (older torch autocasts no fp16 there)
_TRUNK_COPY = "trunk in precision"
_SOURCE_ATTRIBUTE = "_simret_copied_from"  # on a trunk copy: [(the encoder's tensors, their versions), registrations]


def _trunk_in_precision(encoder: Any, precision: str, device: Any) -> Any:
    """A copy of ``encoder`` whose trunk's weights are in ``precision`` (its pooling and post-pool norm stay
    float32), cached beside the compiled graphs and made again once the encoder's weights change."""
    import copy

    from simret.models.encoder import weights_state
    from simret.models.precision import torch_dtype

    cache = _compiled_cache(encoder)
    key = (_TRUNK_COPY, precision, str(device))
    made = cache.get(key)
    if made is not None and _copy_is_current(encoder, made):
        return made
    for stale in [k for k in cache if k[0] == _TRUNK_COPY]:
        del cache[stale]
    made = copy.deepcopy(encoder, {id(cache): {}})  # compiled graphs (and earlier copies) are not copied
    made.trunk.to(torch_dtype(precision))
    for norm in _post_pool_norms(made.trunk):  # they take SimPool's float32 output
        norm.float()
    made.eval().requires_grad_(False)
    tensors = list(encoder.state_dict(keep_vars=True).values())
    made.__dict__[_SOURCE_ATTRIBUTE] = [(tensors, weights_state(tensors)), _registrations()]
    cache[key] = made
    log.debug("%s trunk: a copy with %s weights", encoder.config.get("arch", "the"), precision)
    return made


def _copy_is_current(encoder: Any, made: Any) -> bool:
    """Whether the trunk copy ``made`` still holds ``encoder``'s weights (``simret.models.encoder.same_weights``):
    the tensors it was copied from unchanged (their versions: no module walk per call), and still the encoder's
    — walked only after a parameter or buffer was assigned somewhere (a replaced ``nn.Parameter`` is a new
    tensor)."""
    from simret.models.encoder import same_weights, weights_state

    source = made.__dict__[_SOURCE_ATTRIBUTE]
    key, seen = source
    if seen == _registrations():
        return weights_state(key[0]) == key[1]
    if not same_weights(key, list(encoder.state_dict(keep_vars=True).values())):
        return False
    source[1] = _registrations()
    return True


_REGISTERED = [0, False]  # [parameters and buffers assigned on any module since counting began, hooks installed]


def _registrations() -> int:
    """How many parameters and buffers were assigned on any module since simret began counting (torch's global
    registration hooks, installed once: a counter, nothing else)."""
    if not _REGISTERED[1]:
        import torch.nn.modules.module as module

        def count(*_: Any) -> None:
            _REGISTERED[0] += 1

        module.register_module_parameter_registration_hook(count)
        module.register_module_buffer_registration_hook(count)
        _REGISTERED[1] = True
    return _REGISTERED[0]


def _post_pool_norms(trunk: Any) -> List[Any]:
    """The trunk's norms applied after pooling (ViT ``fc_norm``, ConvNeXt ``head.norm``), as modules."""
    found = [getattr(trunk, "fc_norm", None), getattr(getattr(trunk, "head", None), "norm", None)]
    return [norm for norm in found if hasattr(norm, "float") and any(True for _ in norm.parameters())]


def _cache_key(encoder: Any, precision: str, device: Any) -> Tuple[Any, ...]:
    """Compiled graphs hold the weights as constants: the key includes every tensor's identity and version, so
    a graph is never reused after the weights changed (training, load_state_dict, a replaced parameter)."""
    from simret.models.encoder import weights_state

    tensors = list(encoder.state_dict(keep_vars=True).values())
    return (precision, str(device), tuple(id(t) for t in tensors), weights_state(tensors))


def _example_side(encoder: Any) -> int:
    size = encoder.data_config.get("input_size", (3, 224, 224))
    return int(size[-1])


def _mark_dynamic(images) -> None:
    """Height and width vary from image to image: one graph for all of them (no recompilation per size)."""
    import torch

    torch._dynamo.maybe_mark_dynamic(images, 2)  # "maybe": a trunk that needs a relation (ViT: multiples of the
    torch._dynamo.maybe_mark_dynamic(images, 3)  # patch) gets guards, not a ConstraintViolationError
