"""Feature banks: the encoder's pooled descriptors of every image of a few-shot split, in one HDF5 file.

``features-<split>.h5`` (readable with plain h5py; the layout is in ``simret.fewshot.bankfile``)::

    features  (N, D) float32   the encoder's pooled descriptors, NOT normalised (methods normalise as their
                               protocol says)
    labels    (N,)   int64     class index of every image, into ``classes``
    ids       (N,)   utf-8     image paths relative to the split's image root
    classes   (C,)   utf-8     class names (label i is classes[i])
    sizes, mtimes, digests     each image file's size, modification time (ns) and, with ``verify_content``,
                               SHA-256 when its features were computed
    attrs: the encoder's provenance (fingerprint, arch, pool, gamma, weights, dim, simret_version), created,
           split, split_format, split_source, image_size, crop_pct, n_images, n_classes, precision (of the
           forward pass: fp32, bf16 or fp16; banks of any precision are reused alike)

Images go through ``classification_transform(encoder.data_config)`` — resize and centre crop at the
encoder's input size, or at ``image_size`` (e.g. 84 for miniImageNet-style data) — in a torch DataLoader.

``feature_bank`` reuses a bank made by the same encoder (fingerprint), at the same image size and crop,
from the same images and labels, whose image files have not changed since (size and modification time;
with ``verify_content`` also their SHA-256). Images replaced in place are described again, and only they;
rows whose checksums fail (a damaged file) likewise; another encoder, preprocessing or list of images
means extracting again.

Nothing is lost on failure, and one writer at a time:

* writers hold the folder's writer lock (``simret.utils.locking``); a second one waits, saying so, up to
  ``lock_timeout`` seconds, then reuses what the first one wrote. Readers of a complete bank take no lock.
* the bank is written to ``features-<split>.h5.partial`` (a ``done`` mask flushed after every batch) and
  renamed into place once complete (the previous bank stays whole until then), so an interrupted
  extraction (Ctrl-C, SIGTERM, a crash, ``kill -9``) resumes where it stopped; temporaries of a killed
  writer are removed by the next one. A full disk is one error naming the file (``DiskWriteError``).
* an unreadable image is an error — a few-shot split must be complete: the extraction finishes the other
  images, then stops naming every unreadable file; fix them and run again to finish.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from simret.data.splits import Split
from simret.fewshot import bankfile
from simret.fewshot.bankfile import BankDamagedError, BankHeader, first_line
from simret.utils.filestate import MISSING, FileStates
from simret.utils.h5checked import damaged_ranges, describe_ranges
from simret.utils.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
_LISTED = 10


@dataclass
class FeatureBank:
    """Features of one split: ``features (N, D)`` float32, ``labels (N,)`` int64, ``ids``, ``classes``.

    ``described``: images whose features this call computed (0 when the bank was reused as it was);
    ``redescribed``: how many of them had been described before and changed since.
    """

    features: np.ndarray
    labels: np.ndarray
    ids: List[str]
    classes: List[str]
    attrs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    described: int = 0
    redescribed: int = 0

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
    """Read a complete feature bank written by ``extract_features`` (checksums verified).

    Raises:
        FileNotFoundError: no such file. ValueError: not a feature bank. BankDamagedError (a ValueError):
        its bytes fail their checksums.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such feature bank: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a feature bank (not a readable HDF5 file: {err})") from None
    with handle:
        header = bankfile.read_header(handle, path)
        features = bankfile.read_features(handle, path)
    return _bank(header, features, path)


def _bank(header: BankHeader, features: np.ndarray, path: Path) -> FeatureBank:
    labels, ids = header.labels, header.ids
    if features.ndim != 2 or labels.shape != (features.shape[0],) or len(ids) != features.shape[0]:
        raise ValueError(f"{path}: inconsistent shapes features {features.shape}, labels {labels.shape}, "
                         f"{len(ids)} ids")
    return FeatureBank(features, labels, ids, header.classes, header.attrs, path)


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


def _expected(encoder, settings: Dict[str, Any]) -> Dict[str, Any]:
    return {"fingerprint": encoder.fingerprint, **settings}


def _header(encoder, split: Split, settings: Dict[str, Any]) -> BankHeader:
    attrs = {**encoder.provenance(), **settings, "split": split.name, "split_format": split.format,
             "split_source": str(split.source), "n_images": len(split), "n_classes": split.n_classes}
    return BankHeader(attrs, list(split.ids), np.asarray(split.labels, dtype=np.int64), list(split.classes),
                      int(encoder.dim))


def _stale_reason(header: BankHeader, expected: Dict[str, Any], split: Split) -> Optional[str]:
    """Why a stored bank (or partial bank) does not fit this encoder/split/preprocessing; None if it does."""
    for key, value in expected.items():
        stored = header.attrs.get(key)
        if isinstance(value, float) and isinstance(stored, (int, float)):
            if abs(float(stored) - value) > 1e-9:
                return f"{key} {stored} ≠ {value}"
        elif stored != value:
            return f"{key} {stored!r} ≠ {value!r}"
    if header.ids != split.ids:
        return "the split's images changed"
    if header.classes != split.classes or not np.array_equal(header.labels, split.labels):
        return "the split's labels changed"
    return None


def _file_states(split: Split, verify_content: bool) -> FileStates:
    """The current state of every image file of ``split`` (``verify_content``: with SHA-256 digests)."""
    from simret.utils.filestate import stat_files

    paths = [image_id if os.path.isabs(image_id) else os.path.join(str(split.root), image_id) for image_id in split.ids]
    return stat_files(paths, digests=verify_content)


def _changed_rows(stored: FileStates, now: FileStates) -> np.ndarray:
    """``(N,)`` bool: files that are not what ``stored`` describes (gone, or another size, time or digest).
    Rows without a recorded state (banks of an older simret) are trusted, as index directories do."""
    return np.array([now.sizes[i] == MISSING or (stored.sizes[i] != MISSING and not stored.same_file(i, now, i))
                     for i in range(len(now))], dtype=bool)


# ---------------------------------------------------------------------------------------------- reuse


@dataclass
class _Verdict:
    """What ``_examine`` found: the bank to use as it is, or why it must be (re)written."""

    bank: Optional[FeatureBank] = None
    reason: str = ""  # for the log ("" when there is no bank yet)
    repairable: bool = False  # same encoder, preprocessing and images: its usable rows are kept
    warn: bool = False  # damage: logged as a warning


def _examine(path: Path, split: Split, expected: Dict[str, Any], verify_content: bool) -> _Verdict:
    """Whether the bank at ``path`` can be used as it is (see the module docstring)."""
    import h5py

    if not path.is_file():
        return _Verdict()
    try:
        with h5py.File(path, "r") as handle:
            header = bankfile.read_header(handle, path)
            stale = _stale_reason(header, expected, split)
            if stale is not None:
                return _Verdict(reason=f"{path} does not fit ({stale}): extracting again")
            try:
                features = np.asarray(handle["features"][()], dtype=np.float32)
                current = bankfile.is_current(handle)
                stored = bankfile.read_file_states(handle) if current else None
                done = np.asarray(handle["done"][()], dtype=bool) if current else None
            except OSError:
                spans = bankfile.damaged_rows(handle)
                return _Verdict(reason=f"{path} is damaged (rows {describe_ranges(spans)} fail their "
                                       f"checksums): describing those images again", repairable=True, warn=True)
    except BankDamagedError as err:
        return _Verdict(reason=f"{err}: describing every image again", warn=True)
    except (OSError, KeyError, ValueError) as err:
        return _Verdict(reason=f"{path} is unreadable ({first_line(err)}): describing every image again", warn=True)
    if stored is None or done is None:
        return _Verdict(reason=f"{path} was written by an older simret (no checksums, no file states): rewriting it "
                               f"with them", repairable=True)
    if not done.all():
        return _Verdict(reason=f"{path} is incomplete: describing the missing images", repairable=True)
    now = _file_states(split, verify_content)
    changed = int(_changed_rows(stored, now).sum())
    if changed:
        return _Verdict(reason=f"{path}: {changed} image(s) changed since their features were computed: describing "
                               f"them again", repairable=True)
    if verify_content and any(n and not s for n, s in zip(now.digests, stored.digests)):
        return _Verdict(reason=f"{path}: recording the images' content digests (--verify-content)", repairable=True)
    return _Verdict(bank=_bank(header, features, path))


def feature_bank(encoder, split: Split, directory: PathLike, *, image_size: Optional[int] = None,
                 crop_pct: Optional[float] = None, lock_timeout: Optional[float] = None,
                 verify_content: bool = False, **kwargs: Any) -> FeatureBank:
    """The feature bank of ``split`` in ``directory``: reused when it fits, else brought up to date (only the
    images that changed or whose rows are damaged are described again) or extracted, and stored.

    Args:
        lock_timeout: seconds to wait while another process writes a bank in ``directory`` (None: as long as
            it takes; 0: not at all).
        verify_content: also compare the images' SHA-256 digests, not only their sizes and times (reads
            every image).
        kwargs: go to ``extract_features`` (``batch_size``, ``workers``, ``device`` …).

    Raises:
        LockTimeoutError: another writer kept ``directory`` longer than ``lock_timeout``.
        DiskWriteError: the bank could not be written (disk full …); the previous bank is intact.
        ValueError: some images could not be read (all are named; the others are kept for the next run).
    """
    directory = Path(directory)
    path = bank_path(directory, split.name)
    settings = bank_settings(encoder, image_size, crop_pct)
    expected = _expected(encoder, settings)
    verdict = _examine(path, split, expected, verify_content)
    if verdict.bank is None:
        with _writer(directory, lock_timeout):
            verdict = _examine(path, split, expected, verify_content)  # another writer may have just made it
            if verdict.bank is None:
                if verdict.reason:
                    (log.warning if verdict.warn else log.info)("%s", verdict.reason)
                return _extract(encoder, split, path, settings, seed=verdict.repairable,
                                verify_content=verify_content, **kwargs)
    log.info("reusing %s (%d images, %d-d)", path, len(verdict.bank), verdict.bank.dim)
    return verdict.bank


# ---------------------------------------------------------------------------------------------- write


@contextlib.contextmanager
def _writer(directory: Path, timeout: Optional[float]) -> Iterator[None]:
    """The writer lock of a bank folder, with the temporaries of killed writers removed."""
    from simret.utils.atomic import remove_temporaries
    from simret.utils.locking import writer_lock

    with writer_lock(directory, timeout=timeout, what=f"{directory} (feature banks)"):
        remove_temporaries(directory, bankfile.TEMPORARIES)
        yield


@contextlib.contextmanager
def _writing(path: Path, intact: str) -> Iterator[None]:
    """Turn an OSError of a write (disk full, no permission, I/O error) into one clear ``DiskWriteError``."""
    from simret.utils.atomic import DiskWriteError, write_failure

    try:
        yield
    except (DiskWriteError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as err:
        raise write_failure(path, err, intact) from None


def extract_features(encoder, split: Split, path: PathLike, *, batch_size: int = 64, workers: int = 0,
                     image_size: Optional[int] = None, crop_pct: Optional[float] = None, device=None,
                     resume: bool = True, lock_timeout: Optional[float] = None,
                     verify_content: bool = False) -> FeatureBank:
    """Run ``encoder`` over every image of ``split`` and write the bank to ``path`` (see the module docstring).

    Args:
        encoder: a ``simret.models.Encoder`` (on the device it should run on).
        split: from ``simret.data.splits.load_split``.
        path: the ``.h5`` file to write (its folder is created).
        batch_size, workers: DataLoader batch size and worker processes.
        image_size: square input size (default: the encoder's); crop_pct: centre-crop fraction (default:
            the encoder's), i.e. resize to ``image_size / crop_pct`` then centre-crop ``image_size``.
        device: where to run (default: where the encoder's parameters are).
        resume: continue a matching ``<path>.partial`` left by an interrupted run (its rows whose image files
            changed since are described again).
        lock_timeout: seconds to wait for another writer of the folder (None: as long as it takes).
        verify_content: record the images' SHA-256 digests (and compare them when resuming).

    Raises:
        ValueError: some images could not be read (all are named; the others are kept for the next run).
        LockTimeoutError, DiskWriteError: as ``feature_bank``.
    """
    path = Path(path)
    settings = bank_settings(encoder, image_size, crop_pct)
    with _writer(path.parent, lock_timeout):
        return _extract(encoder, split, path, settings, seed=False, batch_size=batch_size, workers=workers,
                        device=device, resume=resume, verify_content=verify_content)


def _extract(encoder, split: Split, path: Path, settings: Dict[str, Any], *, seed: bool, batch_size: int = 64,
             workers: int = 0, device=None, resume: bool = True, verify_content: bool = False) -> FeatureBank:
    """Bring the partial bank up to date and describe what it lacks; commit it as ``path``. Call with the
    folder's writer lock held. ``seed``: start from the usable rows of the bank at ``path``."""
    import torch

    if int(batch_size) < 1 or int(workers) < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    partial = bankfile.partial_path(path)
    header = _header(encoder, split, settings)
    if device is None:
        device = next(iter(encoder.parameters())).device
    device = torch.device(device)
    now = _file_states(split, verify_content)
    intact = (f"{'the previous bank ' + str(path) + ' is intact' if path.is_file() else 'no bank was replaced'}; the "
              f"features computed so far are kept in {partial.name} and the same command resumes from them once "
              f"the problem is fixed")
    with _writing(partial, intact):
        handle = _start(partial, path, header, _expected(encoder, settings), split, resume, seed)
    try:
        todo, changed = _rows_to_describe(handle, now, partial, intact)
        _log_start(partial, len(split), todo.size, changed)
        _describe(encoder, split, settings, handle, todo, now, batch_size, workers, device, partial, intact)
        with _writing(partial, intact):
            bankfile.mark_complete(handle)
            handle.close()
    except BaseException:
        with contextlib.suppress(Exception):
            handle.close()
        raise
    from simret.utils.atomic import replace_durably

    with _writing(path, intact):
        replace_durably(partial, path)
    bank = load_feature_bank(path)
    bank.described, bank.redescribed = int(todo.size), changed
    log.info("wrote %s (%d images, %d-d): %d described%s, %d reused", path, len(bank), bank.dim, todo.size,
             f" ({changed} of them again: their files changed)" if changed else "", len(bank) - todo.size)
    return bank


def _start(partial: Path, path: Path, header: BankHeader, expected: Dict[str, Any], split: Split, resume: bool,
           seed: bool):
    """The partial bank to continue: an interrupted run's, else one seeded from the bank, else a new one."""
    handle = _open_partial(partial, header, expected, split) if resume and partial.exists() else None
    if handle is None and seed and path.is_file():
        handle = _seeded_partial(partial, path, header)
    if handle is None:
        handle = bankfile.new_partial(partial, header)
    return handle


def _seeded_partial(partial: Path, path: Path, header: BankHeader):
    import h5py

    try:
        source = h5py.File(path, "r")
    except OSError as err:
        log.warning("cannot read %s (%s): describing every image again", path, first_line(err))
        return None
    with source:
        return bankfile.new_partial(partial, header, source=source)


def _open_partial(partial: Path, header: BankHeader, expected: Dict[str, Any], split: Split):
    """The partial bank to continue, or None when it cannot be continued (a new one replaces it)."""
    import h5py

    try:
        handle = h5py.File(partial, "r+")
    except OSError as err:  # e.g. an older simret died while the file was being created
        log.warning("cannot continue %s (%s): starting over", partial, first_line(err))
        return None
    try:
        if not bankfile.is_current(handle):
            reason = "written by an older simret"
        else:
            stored = bankfile.read_header(handle, partial)
            reason = _stale_reason(stored, expected, split)
            if reason is None and stored.dim != header.dim:
                reason = "feature width changed"
            if reason is None:
                bankfile.read_file_states(handle)  # readable (checksums hold)
                handle["done"][()]
    except (KeyError, OSError, ValueError) as err:
        reason = f"unreadable ({first_line(err)})"
    if reason is not None:
        handle.close()
        log.info("%s does not fit (%s): starting over", partial, reason)
        return None
    damaged = damaged_ranges(handle["features"])
    if damaged:
        log.warning("%s is damaged (rows %s fail their checksums): describing those images again", partial,
                    describe_ranges(damaged))
        bankfile.mark_todo(handle, np.concatenate([np.arange(a, b) for a, b in damaged]))
    return handle


def _rows_to_describe(handle, now: FileStates, partial: Path, intact: str) -> Tuple[np.ndarray, int]:
    """Mark the done rows whose image files changed as to do and record the state of the unchanged ones;
    ``(rows to describe, how many of them were described before, from another file)``.

    A row to describe keeps the state of the file it was described from until it is described again (with
    the state taken now, before the file is read), so an interrupted update still counts it as changed.
    """
    done = np.asarray(handle["done"][()], dtype=bool)
    stored = bankfile.read_file_states(handle)
    changed = _changed_rows(stored, now)
    todo = ~done | changed
    kept = np.flatnonzero(~todo)
    # unchanged rows: the state now (sizes and times are equal; a digest computed now is recorded)
    digests = [now.digests[i] or stored.digests[i] for i in kept.tolist()]
    with _writing(partial, intact):
        bankfile.mark_todo(handle, np.flatnonzero(done & changed))
        bankfile.write_file_states_at(handle, kept, FileStates(now.sizes[kept], now.mtimes[kept], digests))
        handle.flush()
    again = todo & changed & (stored.sizes != MISSING)
    return np.flatnonzero(todo), int(again.sum())


def _log_start(partial: Path, n_images: int, todo: int, changed: int) -> None:
    if todo < n_images:
        log.info("%s: %d of %d images to describe%s, %d kept", partial.name, todo, n_images,
                 f" ({changed} changed since they were described)" if changed else "", n_images - todo)


def _describe(encoder, split: Split, settings: Dict[str, Any], handle, todo: np.ndarray, now: FileStates,
              batch_size: int, workers: int, device, partial: Path, intact: str) -> None:
    """Compute the features of rows ``todo`` into the open partial bank, batch by batch (each flushed), with
    the states of their files ``now`` (taken before they were read).

    Raises:
        ValueError: some images could not be read (named); the others are kept in the partial bank.
    """
    import torch

    from simret.data.images import ImageList, classification_transform, collate_skip_failed
    from simret.utils.progress import progress

    size = settings["image_size"]
    transform = classification_transform(encoder.data_config, input_size=(3, size, size),
                                         crop_pct=settings["crop_pct"])
    dataset = torch.utils.data.Subset(ImageList(split.root, split.ids, transform), todo.tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), shuffle=False,
                                         num_workers=int(workers), collate_fn=collate_skip_failed,
                                         pin_memory=device.type == "cuda")
    encoder.eval()
    failures = []
    bar = progress(total=len(todo), desc=f"features {split.name}", unit="img")
    with bar, torch.inference_mode():
        for images, indices, failed in loader:
            failures.extend(failed)
            if images is not None:
                features = encoder(images.to(device, non_blocking=True)).float().cpu().numpy()
                with _writing(partial, intact):
                    rows = indices.numpy()
                    bankfile.write_rows(handle, rows, features, now.take(rows))
            bar.update(len(indices) + len(failed))
    if failures:
        listed = "; ".join(f"{f.path}: {f.reason}" for f in failures[:_LISTED])
        more = f"; and {len(failures) - _LISTED} more" if len(failures) > _LISTED else ""
        raise ValueError(f"{len(failures)} image(s) of split {split.name!r} could not be read ({listed}{more}). "
                         f"A few-shot split must be complete: fix or replace them and run again — the "
                         f"{len(split) - len(failures)} features already computed are kept in {partial}")

