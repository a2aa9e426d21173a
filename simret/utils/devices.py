"""Device selection: ``auto`` picks CUDA when present, then Apple MPS, else the CPU."""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` (or a torch.device) into a usable ``torch.device``.

    Raises:
        ValueError: for an unknown name, or for ``cuda``/``mps`` when this machine has none.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device here; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def default_loader_workers(device: Any = None, processes_here: int = 1) -> int:
    """DataLoader workers per process for a model on ``device`` (a ``torch.device`` or a name).

    Beside an accelerator, loading overlaps the model: up to 8 workers per process, the machine's cores
    (one left over) shared among the ``processes_here`` processes on it (torchrun ranks). On the CPU the
    model already uses every core (torch intra-op threads) and a worker only steals them, so small machines
    decode in the main process (0 workers on <= 2 cores per process) and larger ones use a few.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, processes_here))
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    if kind != "cpu":
        return max(0, min(8, share - 1))
    return max(0, min(4, (share - 2) // 2))
