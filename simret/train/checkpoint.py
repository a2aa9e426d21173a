"""Training checkpoints: one file that is both a simret encoder file and a complete training state.

``CKPT_DIR/last.pth`` holds (all of it loadable with ``torch.load(weights_only=True)``)::

    simret_encoder  {arch, pool, gamma, pool_kwargs, trunk_kwargs, seed, data_config, fingerprint}
                    (what save_encoder writes: the file loads with create_encoder(None, weights=...))
    state_dict      the encoder's weights (trunk.*, pool.*)
    head            the classification head's weights
    optimizer       AdamW state
    schedule        learning-rate schedule position and totals
    scaler          AMP GradScaler state ({} without fp16 AMP)
    epoch           epochs completed;  step: optimisation steps taken
    rng             one dict per rank: torch (CPU and this rank's CUDA device), numpy and Python RNG states
    classes         class names, label order
    args            the training options (plain values)

RNG states are stored as tensors and plain numbers, never as pickled Python objects.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from simret.models.checkpoints import SIMRET_FORMAT_KEY, WeightsError, read_checkpoint
from simret.utils.atomic import atomic_path, write_text_atomic

PathLike = Union[str, os.PathLike]
LAST = "last.pth"
ENCODER_FILE = "encoder.safetensors"
LOG_FILE = "log.jsonl"
SKIPPED_FILE = "skipped.tsv"


# ------------------------------------------------------------------------------------------- RNG


def capture_rng(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """This process's RNG states (torch CPU, ``device`` if CUDA, numpy, Python) as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    """Put back what ``capture_rng`` captured."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), int(numpy_state["pos"]),
                         int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"])))
    python_state = state["python"]
    random.setstate((int(python_state["version"]), tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + rename: a crash never leaves half a file), flushed
    to disk before the rename.

    Raises:
        OSError: the file could not be written (disk full …: written through a Python file, so the error keeps
            its errno instead of becoming torch's RuntimeError); ``path`` is left as it was.
    """
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: unreadable, or not a training checkpoint written by ``simret train``.
    """
    obj, meta = read_checkpoint(path)
    missing = [k for k in ("state_dict", "head", "optimizer", "epoch") if k not in obj]
    if not meta or missing:
        raise WeightsError(f"{path} is not a simret training checkpoint (missing: "
                           f"{', '.join(missing) or SIMRET_FORMAT_KEY})")
    return dict(obj)


def keep_epoch_copy(checkpoint_dir: PathLike, epoch: int, keep: int) -> Optional[Path]:
    """Keep ``last.pth`` of ``epoch`` (1-based) as ``epoch-NNN.pth`` (a hard link where the file system
    allows, else a copy) and delete all but the ``keep`` most recent such copies. ``keep=0``: none."""
    folder = Path(checkpoint_dir)
    target = None
    if keep > 0:
        target = folder / f"epoch-{epoch:03d}.pth"
        with atomic_path(target) as temporary:
            temporary.unlink()
            try:
                os.link(folder / LAST, temporary)
            except OSError:
                import shutil

                shutil.copyfile(folder / LAST, temporary)
    copies = sorted(folder.glob("epoch-[0-9][0-9][0-9]*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    for old in copies[: max(0, len(copies) - keep)]:
        old.unlink()
    return target


# ------------------------------------------------------------------------------------------- logs


def read_log(checkpoint_dir: PathLike) -> List[Dict[str, Any]]:
    path = Path(checkpoint_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_log(checkpoint_dir: PathLike, record: Dict[str, Any]) -> None:
    """Add one epoch's record to ``log.jsonl``, dropping records of that epoch or later (a resumed run
    rewrites what an interrupted one logged after its last checkpoint). Written atomically."""
    kept = [r for r in read_log(checkpoint_dir) if int(r.get("epoch", 0)) < int(record["epoch"])]
    lines = [json.dumps(r, sort_keys=True) for r in [*kept, record]]
    write_text_atomic(Path(checkpoint_dir) / LOG_FILE, "\n".join(lines) + "\n")
