"""Helpers for running one command on several processes (``torchrun``), and doing nothing otherwise.

Used by ``simret train`` (DistributedDataParallel) and meant for sharded descriptor extraction:

* ``init_distributed()`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: NCCL when this rank runs on a CUDA device,
  gloo otherwise (``SIMRET_DIST_BACKEND`` overrides). Outside ``torchrun`` it changes nothing and every
  helper below answers as for a single process (rank 0 of 1), so callers need no special cases.
* ``shard_indices(n, rank, world)`` gives each rank a **contiguous**, balanced block of ``range(n)``
  (sizes differ by at most one; the blocks, in rank order, concatenate back to ``range(n)``), so shard
  files merge by plain concatenation in rank order.

Typical sharded work (each rank writes its own file, rank 0 merges)::

    with distributed_session() as dist_ctx:
        part = shard_indices(len(ids), dist_ctx.rank, dist_ctx.world_size)
        write(shard_path(out, dist_ctx.rank, dist_ctx.world_size), compute(ids[part.start:part.stop]))
        barrier()                        # every shard is on disk
        if is_main_process():
            merge([shard_path(out, r, dist_ctx.world_size) for r in range(dist_ctx.world_size)], out)
        barrier()                        # nobody leaves before the merged file exists
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Union

from simret.utils.logs import get_logger

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = get_logger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKEND_VARIABLE = "SIMRET_DIST_BACKEND"


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine), its device and
    the process-group backend (``None`` when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the variables ``torchrun`` (or any ``env://`` launcher) sets are all present."""
    return all(os.environ.get(name) for name in TORCHRUN_VARIABLES)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def is_distributed() -> bool:
    """True when a process group is initialised (more than one process may be working together)."""
    dist = _dist()
    return bool(dist is not None and dist.is_initialized())


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes work together (1 when not distributed)."""
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 when not distributed)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes checkpoints, logs and merged files."""
    return rank() == 0


def _rank_device(requested: Optional[str], local: int) -> torch.device:
    import torch

    from simret.utils.devices import resolve_device

    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else resolve_device("auto")
    if name == "cuda":  # one GPU per rank on this machine
        resolve_device("cuda")  # raises when this machine has no CUDA
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU of its own: only {torch.cuda.device_count()} are "
                             f"visible; start at most that many processes per node (--nproc_per_node)")
        return torch.device("cuda", local)
    return resolve_device(name)


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                     timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group when launched by ``torchrun``; otherwise just pick the device.

    Args:
        device: ``auto`` (default: ``cuda:LOCAL_RANK`` when CUDA exists, else the CPU), ``cuda`` (this
            rank's GPU, ``cuda:LOCAL_RANK``), ``cuda:N`` (exactly that one), ``cpu`` or ``mps``.
        backend: ``nccl``/``gloo``; default NCCL for CUDA devices, gloo otherwise (or ``$SIMRET_DIST_BACKEND``).
        timeout_minutes: how long collectives wait for a missing rank before failing.

    Calling it again once the group exists returns the same context (the group is not re-created).
    """
    import torch

    if not launched_by_torchrun():
        return DistributedContext(0, 1, 0, _rank_device(device, 0), None)
    dist = _dist()
    if dist is None:  # pragma: no cover - torch builds without distributed support
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    target = _rank_device(device, local)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        chosen = backend or os.environ.get(BACKEND_VARIABLE) or ("nccl" if target.type == "cuda" else "gloo")
        if chosen == "nccl" and target.type != "cuda":
            raise ValueError(f"the nccl backend needs CUDA devices, this rank runs on {target}; use gloo")
        options = {"backend": chosen, "init_method": "env://",
                   "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if chosen == "nccl":
            options["device_id"] = target
        try:
            dist.init_process_group(**options)
        except TypeError:  # older torch without device_id
            options.pop("device_id", None)
            dist.init_process_group(**options)
        log.debug("rank %d/%d joined the %s process group on %s", dist.get_rank(), dist.get_world_size(),
                  chosen, target)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local, target, dist.get_backend())


def quiet_unless_main() -> bool:
    """Under ``torchrun``, silence every rank but 0 (no progress bars, warnings only) so the group prints
    once; call it first thing in a command (it reads ``RANK``, no process group needed). True when silenced."""
    if not launched_by_torchrun() or os.environ.get("RANK", "0") == "0":
        return False
    import logging

    from simret.utils import progress
    from simret.utils.logs import LOGGER_NAME

    progress.set_enabled(False)
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
    return True


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        _dist().destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: Optional[str] = None, backend: Optional[str] = None) -> Iterator[DistributedContext]:
    """``init_distributed`` on entry and ``cleanup`` on exit, when this call created the group."""
    created = launched_by_torchrun() and not is_distributed()
    context = init_distributed(device, backend)
    try:
        yield context
    finally:
        if created:
            cleanup()


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if not is_distributed():
        return
    dist = _dist()
    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not distributed.

    For small things (counts, failure lists, RNG states): objects are pickled. Large arrays belong in
    shard files.
    """
    if not is_distributed():
        return [obj]
    gathered: List[Any] = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    holder = [obj]
    _dist().broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it); unchanged when not distributed.

    With NCCL the tensor must live on this rank's GPU.
    """
    if is_distributed():
        _dist().all_reduce(tensor)
    return tensor


def shard_indices(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)`` when split across ``world`` ranks.

    Blocks are balanced (the first ``n % world`` ranks get ``n // world + 1`` items, the others
    ``n // world``) and, in rank order, concatenate back to ``range(n)``; e.g. ``n=5, world=2`` →
    ``range(0, 3)``, ``range(3, 5)``. A rank gets an empty range when ``n < world`` and its rank is ≥ n.
    """
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_path(path: Union[str, os.PathLike], rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` writes its part of ``path`` to: ``name.rank-R-of-W.suffix``
    next to ``path`` (e.g. ``descriptors.rank-0-of-2.h5``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank-{rank}-of-{world}{path.suffix}")
