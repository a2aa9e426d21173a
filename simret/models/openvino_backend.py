"""The OpenVINO backend of ``InferenceEncoder.compile``: a CNN encoder run by OpenVINO's CPU runtime.

Optional (``pip install 'simret[openvino]'``). Measured on a 2-core AMX CPU (``scripts/bench.py extract``:
``simret index``, ResNet-50 + SimPool at 1024 px, three scales): 8.3x a bare eager fp32 loop (median of 9
paired windows, 6.2-10.5x from window to window on a shared machine), where ``torch.compile`` (inductor)
gave 5.0x in the same run; converted in 5 s where inductor compiles for 38 s, and from the IR cached on disk
in under a second. The model is converted once (TorchScript tracing) with a
dynamic batch, height and width: one compiled model serves every image size, nothing is padded or resized. bf16 runs as
OpenVINO's ``INFERENCE_PRECISION_HINT``; SimPool's power mean, softmax and L2 normalisation are
converted as the graph computes them (descriptors differ from fp32 by 1 - cos < 1e-5, measured).

Transformers are not converted: their trunks specialise on the patch grid (the position embeddings are
resampled with Python arithmetic on the image size), so a converted graph serves one image size only.

Converted models are cached in ``~/.cache/simret/openvino/<key>/`` (``$SIMRET_CACHE``), keyed by the
encoder's fingerprint (its architecture, pooling and a digest of its weights) and the OpenVINO, torch and
simret versions; a run of the same encoder later loads the IR instead of tracing it again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from simret.utils.logs import get_logger

log = get_logger(__name__)

INSTALL_HINT = "pip install 'simret[openvino]' (or pip install openvino)"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
PARALLEL_STREAMS = 2  # streams of OpenVinoForward.start: requests run side by side, each on half the threads


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cached_model_dir(encoder: Any) -> Path:
    """Where the converted model of ``encoder`` is (or would be) cached."""
    return _cache_root() / _cache_key(encoder)


class OpenVinoForward:
    """``encoder`` compiled by OpenVINO for the CPU: images ``(B, 3, H, W)`` float → ``(B, D)`` float32 torch
    tensors (any B, H, W). Not thread-safe: call it from one thread, as ``InferenceEncoder`` and the server's
    model thread do.

    Two compiled models share the IR: calling it runs one request on all ``threads`` (the lowest latency, for
    a query); ``start`` runs requests on ``PARALLEL_STREAMS`` streams side by side, each on part of the
    threads, so a caller with several images keeps every core busy without a barrier across them (with two
    threads: 1.16x the images/s of calls one after the other, median of 8 interleaved passes of 36 inputs of
    Revisited sizes; the outputs are the same to the bit).

    Args:
        encoder: a ``simret.models.Encoder`` (a CNN trunk).
        precision: ``fp32``, ``bf16`` or ``fp16`` (OpenVINO's inference precision hint).
        example: an input ``(1, 3, H, W)`` for tracing (any size: the converted model is dynamic).
        threads: CPU threads OpenVINO may use (default: torch's).

    Raises:
        ImportError: openvino is not installed (the message says how to install it).
    """

    def __init__(self, encoder: Any, precision: str, example: Any, threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise ImportError(f"the OpenVINO backend needs the openvino package: {INSTALL_HINT}") from err
        import torch

        started = time.perf_counter()
        model, self.from_cache = _load_or_convert(ov, encoder, example)
        self.threads = int(threads or torch.get_num_threads())
        self.streams = PARALLEL_STREAMS if self.threads >= PARALLEL_STREAMS else 1
        base = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": self.threads}
        core = ov.Core()
        self.compiled = core.compile_model(model, "CPU", {**base, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.parallel = _compile_streams(core, model, base, self.streams) if self.streams > 1 else None
        if self.parallel is None:
            self.streams = 1
        self._idle: List[Any] = []  # the parallel model's requests not running now
        self.seconds = time.perf_counter() - started
        log.info("OpenVINO model %s in %.1f s (%s, %d thread(s), %d stream(s) for batches in flight)",
                 "loaded from the cache" if self.from_cache else "converted", self.seconds, precision,
                 self.threads, self.streams)

    def __call__(self, images: Any) -> Any:
        """images ``(B, 3, H, W)`` (any memory layout, on the CPU) → ``(B, D)`` float32, all threads on it."""
        array = _as_array(images)
        self.request.infer({0: array}, share_inputs=True)  # read in place (synchronous: array outlives it)
        return _output(self.request)

    def start(self, images: Any) -> Callable[[], Any]:
        """Start the forward pass of images ``(B, 3, H, W)`` on the parallel streams and return at once; the
        returned function waits for it and gives ``(B, D)`` float32. Requests started while every stream is
        busy queue in OpenVINO. With one stream (one thread) it runs ``__call__`` now."""
        if self.parallel is None:
            result = self(images)
            return lambda: result
        array = _as_array(images)
        request = self._idle.pop() if self._idle else self.parallel.create_infer_request()
        return _Running(request, array, self._idle)


class _Running:
    """One request of ``OpenVinoForward.start`` in flight; calling it waits and returns its output. It holds
    the input array the request reads in place until the request is done (also if it is dropped unread)."""

    def __init__(self, request: Any, array: Any, idle: List[Any]) -> None:
        self.request, self.array, self.idle = request, array, idle
        request.start_async({0: array}, share_inputs=True)

    def __call__(self) -> Any:
        if self.array is None:  # its request went back to the pool: its output is someone else's now
            raise RuntimeError("this OpenVINO pass was already collected")
        try:
            self.request.wait()
            return _output(self.request)
        finally:
            self._release()

    def _release(self) -> None:
        if self.array is not None:
            self.array = None
            self.idle.append(self.request)

    def __del__(self) -> None:
        if self.array is not None:  # never waited for: let it finish before its input is freed
            try:
                self.request.wait()
            except Exception:  # noqa: BLE001 - nobody wants this pass's result, nor its failure
                pass
            self._release()


def _compile_streams(core: Any, model: Any, base: Dict[str, Any], streams: int) -> Any:
    """``model`` compiled to run ``streams`` requests side by side, or None (logged) if that fails: the
    latency model alone still serves every call."""
    try:
        return core.compile_model(model, "CPU", {**base, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
    except Exception as err:  # noqa: BLE001 - any runtime failure: passes run one at a time instead
        log.warning("OpenVINO could not compile %d streams (%s): passes run one at a time", streams,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _as_array(images: Any) -> Any:
    """``(B, 3, H, W)`` tensor → contiguous float32 NCHW numpy array (a view when it already is one)."""
    import numpy as np

    return np.ascontiguousarray(images.detach().float().cpu().numpy())


def _output(request: Any) -> Any:
    """The finished request's ``(B, D)`` output as a float32 torch tensor of its own (the request reuses its
    output buffer)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))


# ------------------------------------------------------------------------------------------- helpers


def _load_or_convert(ov: Any, encoder: Any, example: Any):
    """The OpenVINO model of ``encoder``: read from the cache, else traced, converted and cached."""
    folder = cached_model_dir(encoder)
    xml = folder / "model.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(str(xml)), True
        except Exception as err:  # noqa: BLE001 - a damaged cache entry is converted again
            log.warning("cached OpenVINO model %s unreadable (%s): converting again", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    model = _convert(ov, encoder, example)
    _save(ov, model, folder)
    return model, False


def _convert(ov: Any, encoder: Any, example: Any):
    """Trace ``encoder`` (fp32, contiguous example) into an OpenVINO model with dynamic batch, height, width."""
    import warnings

    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about Python values taken from shapes: in a CNN encoder those are checks that hold
        # for every size (patch alignment is for ViTs, which are not converted), so the constants are right
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.export specialises the batch of SimPool's reshapes (measured): tracing stays the dynamic path
        warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=FutureWarning)
        example = example.detach().float().cpu().contiguous().clone()
        return ov.convert_model(encoder, example_input=example, input=[ov.PartialShape([-1, 3, -1, -1])])


def _save(ov: Any, model: Any, folder: Path) -> None:
    """Write the IR beside its final place, then rename it there (a concurrent run keeps the first one)."""
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
        os.rename(staging, folder)
    except OSError as err:  # no space, read-only cache, or another run cached it first: run without caching
        if not folder.is_dir():
            log.warning("could not cache the OpenVINO model in %s: %s", folder, err)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_root() -> Path:
    from simret.utils.paths import cache_dir

    return cache_dir() / "openvino"


def _cache_key(encoder: Any) -> str:
    import openvino
    import torch

    from simret import __version__

    versions = f"{openvino.__version__}|{torch.__version__}|{__version__}"
    return f"{encoder.fingerprint}-{hashlib.sha256(versions.encode()).hexdigest()[:12]}"
