"""Feature banks: the encoder's pooled descriptors of every image of a few-shot split, in one HDF5 file.

``features-<split>.h5`` (readable with plain h5py)::

    features  (N, D) float32   the encoder's pooled descriptors, NOT normalised (methods normalise as their
                               protocol says)
    labels    (N,)   int64     class index of every image, into ``classes``
    ids       (N,)   utf-8     image paths relative to the split's image root
    classes   (C,)   utf-8     class names (label i is classes[i])
    attrs: the encoder's provenance (fingerprint, arch, pool, gamma, weights, dim, simret_version), created,
           split, split_format, split_source, image_size, crop_pct, n_images, n_classes, precision (of the
           forward pass: fp32, bf16 or fp16; banks of any precision are reused alike)

Images go through ``classification_transform(encoder.data_config)`` — resize and centre crop at the
encoder's input size, or at ``image_size`` (e.g. 84 for miniImageNet-style data) — in a torch DataLoader.

Nothing is lost on failure: the bank is written to ``features-<split>.h5.partial`` (with a ``done`` mask
flushed after every batch) and renamed into place once complete, so an interrupted extraction resumes where
it stopped. An unreadable image is an error — a few-shot split must be complete: the extraction finishes the
other images, then stops naming every unreadable file; fix them and run again to finish.
``feature_bank`` reuses an existing bank when it was made by the same encoder (fingerprint), at the same
image size and crop, from the same images and labels; otherwise it extracts again.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from simret.data.splits import Split
from simret.utils.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
_LISTED = 10


@dataclass
class FeatureBank:
    """Features of one split: ``features (N, D)`` float32, ``labels (N,)`` int64, ``ids``, ``classes``."""

    features: np.ndarray
    labels: np.ndarray
    ids: List[str]
    classes: List[str]
    attrs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def mean(self) -> np.ndarray:
        """The mean feature ``(D,)`` float32 (accumulated in float64) — SimpleShot's base mean on a train split."""
        return self.features.mean(axis=0, dtype=np.float64).astype(np.float32)


def bank_path(directory: PathLike, split: str) -> Path:
    """``<directory>/features-<split>.h5``."""
    return Path(directory) / f"features-{split}.h5"


def load_feature_bank(path: PathLike) -> FeatureBank:
    """Read a complete feature bank written by ``extract_features``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a feature bank.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such feature bank: {path}")
    with h5py.File(path, "r") as handle:
        missing = [name for name in ("features", "labels", "ids") if name not in handle]
        if missing:
            raise ValueError(f"{path} is not a feature bank: missing dataset(s) {', '.join(missing)}")
        features = handle["features"][()].astype(np.float32, copy=False)
        labels = handle["labels"][()].astype(np.int64, copy=False)
        ids = [str(v) for v in handle["ids"].asstr()[()]]
        classes = [str(v) for v in handle["classes"].asstr()[()]] if "classes" in handle else \
            [str(c) for c in range(int(labels.max()) + 1 if labels.size else 0)]
        attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    if features.ndim != 2 or labels.shape != (features.shape[0],) or len(ids) != features.shape[0]:
        raise ValueError(f"{path}: inconsistent shapes features {features.shape}, labels {labels.shape}, "
                         f"{len(ids)} ids")
    return FeatureBank(features, labels, ids, classes, attrs, path)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def bank_settings(encoder, image_size: Optional[int] = None, crop_pct: Optional[float] = None) -> Dict[str, Any]:
    """The preprocessing a bank is made with: ``{"image_size", "crop_pct"}`` (the encoder's when not given)."""
    config = encoder.data_config
    size = int(image_size) if image_size is not None else int(config["input_size"][-1])
    if size < 8:
        raise ValueError(f"image size {size} is too small (at least 8 pixels)")
    pct = float(crop_pct) if crop_pct is not None else float(config.get("crop_pct", 0.875))
    if not 0 < pct <= 1:
        raise ValueError(f"crop_pct must lie in (0, 1], got {pct}")
    return {"image_size": size, "crop_pct": pct}


def _expected(encoder, split: Split, settings: Dict[str, Any]) -> Dict[str, Any]:
    return {"fingerprint": encoder.fingerprint, **settings}


def _stale_reason(attrs: Dict[str, Any], labels: np.ndarray, ids: List[str], classes: List[str],
                  expected: Dict[str, Any], split: Split) -> Optional[str]:
    """Why a stored bank (or partial bank) does not fit this encoder/split/preprocessing; None if it does."""
    for key, value in expected.items():
        stored = attrs.get(key)
        if isinstance(value, float) and isinstance(stored, (int, float)):
            if abs(float(stored) - value) > 1e-9:
                return f"{key} {stored} ≠ {value}"
        elif stored != value:
            return f"{key} {stored!r} ≠ {value!r}"
    if ids != split.ids:
        return "the split's images changed"
    if classes != split.classes or not np.array_equal(labels, split.labels):
        return "the split's labels changed"
    return None


def feature_bank(encoder, split: Split, directory: PathLike, *, image_size: Optional[int] = None,
                 crop_pct: Optional[float] = None, **kwargs: Any) -> FeatureBank:
    """The feature bank of ``split`` in ``directory``: reused when it matches, else extracted (and stored).

    ``kwargs`` go to ``extract_features`` (``batch_size``, ``workers``, ``device`` …).
    """
    path = bank_path(directory, split.name)
    settings = bank_settings(encoder, image_size, crop_pct)
    if path.is_file():
        try:
            bank = load_feature_bank(path)
            reason = _stale_reason(bank.attrs, bank.labels, bank.ids, bank.classes,
                                   _expected(encoder, split, settings), split)
        except (OSError, ValueError, KeyError) as err:
            reason = f"unreadable ({err})"
        if reason is None:
            log.info("reusing %s (%d images, %d-d)", path, len(bank), bank.dim)
            return bank
        log.info("%s does not fit (%s): extracting again", path, reason)
    return extract_features(encoder, split, path, image_size=settings["image_size"], crop_pct=settings["crop_pct"],
                            **kwargs)


def extract_features(encoder, split: Split, path: PathLike, *, batch_size: int = 64, workers: int = 0,
                     image_size: Optional[int] = None, crop_pct: Optional[float] = None, device=None,
                     resume: bool = True) -> FeatureBank:
    """Run ``encoder`` over every image of ``split`` and write the bank to ``path`` (see the module docstring).

    Args:
        encoder: a ``simret.models.Encoder`` (on the device it should run on).
        split: from ``simret.data.splits.load_split``.
        path: the ``.h5`` file to write (its folder is created).
        batch_size, workers: DataLoader batch size and worker processes.
        image_size: square input size (default: the encoder's); crop_pct: centre-crop fraction (default:
            the encoder's), i.e. resize to ``image_size / crop_pct`` then centre-crop ``image_size``.
        device: where to run (default: where the encoder's parameters are).
        resume: continue a matching ``<path>.partial`` left by an interrupted run.

    Raises:
        ValueError: some images could not be read (all are named; the others are kept for the next run).
    """
    import torch

    from simret.data.images import ImageList, classification_transform, collate_skip_failed
    from simret.utils.progress import progress

    if int(batch_size) < 1 or int(workers) < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    settings = bank_settings(encoder, image_size, crop_pct)
    expected = _expected(encoder, split, settings)
    if device is None:
        device = next(iter(encoder.parameters())).device
    device = torch.device(device)
    n_images, dim = len(split), int(encoder.dim)

    handle = _open_partial(partial, split, expected, dim, resume) if partial.exists() else None
    if handle is None:
        handle = _create_partial(partial, encoder, split, settings, dim)
    failures = []
    try:
        done = handle["done"][()]
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming %s: %d of %d images already done", partial, int(done.sum()), n_images)
        transform = classification_transform(encoder.data_config, input_size=(3, settings["image_size"],
                                                                              settings["image_size"]),
                                             crop_pct=settings["crop_pct"])
        dataset = torch.utils.data.Subset(ImageList(split.root, split.ids, transform), todo.tolist())
        loader = torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), shuffle=False,
                                             num_workers=int(workers), collate_fn=collate_skip_failed,
                                             pin_memory=device.type == "cuda")
        encoder.eval()
        bar = progress(total=len(todo), desc=f"features {split.name}", unit="img")
        with bar, torch.inference_mode():
            for images, indices, failed in loader:
                failures.extend(failed)
                if images is not None:
                    features = encoder(images.to(device, non_blocking=True)).float().cpu().numpy()
                    _write_rows(handle, indices.numpy(), features)
                bar.update(len(indices) + len(failed))
        if failures:
            listed = "; ".join(f"{f.path}: {f.reason}" for f in failures[:_LISTED])
            more = f"; and {len(failures) - _LISTED} more" if len(failures) > _LISTED else ""
            raise ValueError(f"{len(failures)} image(s) of split {split.name!r} could not be read ({listed}{more}). "
                             f"A few-shot split must be complete: fix or replace them and run again — the "
                             f"{n_images - len(failures)} features already computed are kept in {partial}")
        handle.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.attrs["complete"] = True
    finally:
        handle.close()
    os.replace(partial, path)
    log.info("wrote %s (%d images, %d-d)", path, n_images, dim)
    return load_feature_bank(path)


def _create_partial(partial: Path, encoder, split: Split, settings: Dict[str, Any], dim: int):
    import h5py

    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    n_images = len(split)
    handle = h5py.File(partial, "w")
    try:
        strings = h5py.string_dtype("utf-8")
        handle.create_dataset("features", shape=(n_images, dim), dtype=np.float32,
                              chunks=(max(1, min(n_images, 1024)), dim))
        handle.create_dataset("labels", data=np.asarray(split.labels, dtype=np.int64))
        handle.create_dataset("ids", data=np.array(split.ids, dtype=object), dtype=strings)
        handle.create_dataset("classes", data=np.array(split.classes, dtype=object), dtype=strings)
        handle.create_dataset("done", data=np.zeros(n_images, dtype=bool))
        attrs = {**encoder.provenance(), **settings, "precision": getattr(encoder, "precision", "fp32"),
                 "split": split.name, "split_format": split.format,
                 "split_source": str(split.source), "n_images": n_images, "n_classes": split.n_classes,
                 "complete": False}
        for key, value in attrs.items():
            handle.attrs[key] = value
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def _open_partial(partial: Path, split: Split, expected: Dict[str, Any], dim: int, resume: bool):
    """The partial bank to continue, or None (after removing it) when it cannot be continued."""
    import h5py

    if not resume:
        return None
    try:
        handle = h5py.File(partial, "r+")
    except OSError as err:  # e.g. the process died while the file was being created
        log.warning("cannot continue %s (%s): starting over", partial, err)
        return None
    try:
        attrs = {key: _plain(value) for key, value in handle.attrs.items()}
        reason = _stale_reason(attrs, handle["labels"][()], [str(v) for v in handle["ids"].asstr()[()]],
                               [str(v) for v in handle["classes"].asstr()[()]], expected, split)
        if reason is None and handle["features"].shape != (len(split), dim):
            reason = "feature width changed"
    except (KeyError, OSError, ValueError) as err:
        reason = f"unreadable ({err})"
    if reason is not None:
        handle.close()
        log.info("%s does not fit (%s): starting over", partial, reason)
        return None
    return handle


def _write_rows(handle, indices: np.ndarray, features: np.ndarray) -> None:
    """Store ``features`` at rows ``indices`` (increasing) and mark them done; flushed to disk."""
    if indices.size == 0:
        return
    if indices[-1] - indices[0] + 1 == indices.size:  # a contiguous run: one slice write
        handle["features"][int(indices[0]):int(indices[-1]) + 1] = features
        handle["done"][int(indices[0]):int(indices[-1]) + 1] = True
    else:
        handle["features"][indices] = features
        handle["done"][indices] = True
    handle.flush()
