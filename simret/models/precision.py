"""Numeric precision of an encoder's forward pass: ``fp32``, ``bf16``, ``fp16`` or ``auto``.

``resolve_precision("auto", device)`` picks what the hardware runs fast without losing descriptor accuracy:

* CPU: ``bf16`` where the CPU has native bfloat16 arithmetic (Intel AMX-BF16 or AVX512-BF16, read from
  ``/proc/cpuinfo``; the same instructions oneDNN uses), else ``fp32`` (emulated bf16 is slower than fp32);
* CUDA: ``bf16`` on GPUs of compute capability 8.0 and newer (Ampere, Hopper …), ``fp16`` on older ones;
* MPS: ``fp16``; anything else ``fp32``.

Reduced precision is autocast (``torch.autocast``): weights stay float32, matrix products and convolutions
run in the reduced type, and everything that decides descriptor accuracy runs in float32 — SimPool's
softmax, power mean and LayerNorm (``SimPool`` disables autocast inside), the trunk's norms (autocast keeps
them in float32) and the L2 normalisations. One exception, for speed: a transformer at bf16 on a CPU runs
from a copy whose trunk holds bf16 weights, so its residual stream and its own LayerNorms are bf16 there
(``simret.models.runtime``; descriptors still within cosine 0.99999 of fp32 on the demo data).
Descriptors are float32 whatever the precision, and an encoder's fingerprint does not depend on it:
descriptors computed at one precision are searched with queries computed at another.

This module imports torch only inside the functions that need it, so the CLI options can name the choices.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = (*PRECISIONS, "auto")
LEGACY_HALF = "half"  # the deprecated --half / half=True: bf16 on the CPU, fp16 on accelerators (the old rule)
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    try:  # no /proc/cpuinfo (not Linux): ask oneDNN
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return False


def check_precision(name: str) -> str:
    """``name`` lower-cased if it is one of ``fp32|bf16|fp16|auto`` (or the legacy ``half``), else ValueError."""
    value = str(name).strip().lower()
    if value not in CHOICES and value != LEGACY_HALF:
        raise ValueError(f"unknown precision {name!r}: use {', '.join(CHOICES)}")
    return value


def resolve_precision(name: Optional[str], device: Any = None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``name`` (``auto``, ``half`` or one of those) on ``device``.

    ``device`` is a ``torch.device`` or a name (None: the CPU). Explicit choices are kept as they are.
    """
    value = check_precision(name or "auto")
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    if value in PRECISIONS:
        return value
    if value == LEGACY_HALF:
        return "bf16" if kind == "cpu" else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        major, _ = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
        return "bf16" if major >= 8 else "fp16"
    if kind == "mps":
        return "fp16"
    return "fp32"


def torch_dtype(precision: str):
    """The ``torch.dtype`` of a resolved precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[check_precision(precision)]


def autocast(precision: str, device: Any) -> ContextManager:
    """The autocast context of ``precision`` (resolved) on ``device``; a no-op for ``fp32``."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    return torch.autocast(device_type=kind, dtype=torch_dtype(precision))


def recorded_precision(record: Mapping[str, Any], default: str = "fp32") -> str:
    """The precision a meta.json, settings dict or HDF5 attrs record says: ``precision``, or the legacy
    ``half`` flag of files written before it existed (``half: true`` → ``bf16``, what it meant on the CPU;
    ``half: false`` → ``fp32``)."""
    value = record.get("precision")
    if value is not None:
        value = str(value.decode() if isinstance(value, bytes) else value).lower()
        if value in PRECISIONS:
            return value
    if "half" in record:
        return "bf16" if bool(record.get("half")) else "fp32"
    return default


def describe_cpu() -> str:
    """The flags that decide the CPU's precision, for logs and benchmarks (e.g. ``amx_bf16 avx512_bf16 …``)."""
    interesting = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
                   "amx_int8", "amx_fp16")
    flags = cpu_flags()
    return " ".join(flag for flag in interesting if flag in flags) or "unknown"
