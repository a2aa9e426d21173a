"""Few-shot splits on disk: miniImageNet CSV splits and folder-per-class splits.

Two layouts are understood (``format="auto"`` tells them apart):

* ``miniimagenet`` — as distributed for Ravi & Larochelle (2017): ``ROOT/{train,val,test}.csv`` with a
  ``filename,label`` header and every image in one folder, ``ROOT/images/`` (or ``ROOT`` itself when there is
  no ``images/`` folder; ``images/<label>/<filename>`` is accepted too). The classes of a split are the
  distinct ``label`` values.
* ``folders`` — ``ROOT/{train,val,test}/<class>/<image>``: one folder per class (tieredImageNet, CUB,
  CIFAR-FS and most re-packaged benchmarks ship this way). Images may sit in sub-folders of a class folder.

Loading a split checks that every image it names exists, and names what is wrong otherwise (a missing CSV,
missing images, an empty class folder). A split never makes simret read outside its root (the image folder
of a CSV split, ``ROOT/<split>/`` of a folder split): a CSV row naming an absolute path, a ``..`` component
or a symbolic link that leads outside, and a class folder or image that is a symbolic link leading
outside, are refused (``OutsideRootError``, naming ``file:line`` or the path). The root itself may be a
symbolic link. ``Split.check_class_sizes`` checks that every class holds enough
images for ``shot + query``. Classes are numbered in sorted name order, images listed in sorted order, so a
split always loads the same way.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from simret.data.images import is_image_file, walk_images
from simret.data.paths import OutsideRootError, RootGuard, check_relative, leaves_root
from simret.utils.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
SPLIT_FORMATS = ("miniimagenet", "folders")
SPLIT_NAMES = ("train", "val", "test")
_LISTED = 8  # how many offending entries an error message names


@dataclass
class Split:
    """One split of a few-shot dataset.

    Attributes:
        name: ``train``, ``val``, ``test`` (or any other split name).
        root: folder the ``ids`` are relative to.
        ids: image paths relative to ``root`` (POSIX style), ``N`` of them.
        labels: ``(N,)`` int64, index of each image's class in ``classes``.
        classes: class names, sorted; label ``i`` is ``classes[i]``.
        format: ``miniimagenet`` or ``folders``.
        source: the CSV file or the split folder this split was read from.
    """

    name: str
    root: Path
    ids: List[str]
    labels: np.ndarray
    classes: List[str]
    format: str
    source: Path

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> Dict[str, int]:
        """Images per class, ``{class name: count}`` in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes, counts)}

    def check_class_sizes(self, needed: int, what: str = "") -> None:
        """Raise ``ValueError`` naming every class with fewer than ``needed`` images.

        ``what`` explains the number in the message, e.g. ``"shot 5 + query 15"``.
        """
        small = [(name, count) for name, count in self.class_counts().items() if count < needed]
        if small:
            listed = ", ".join(f"{name} ({count} image{'' if count == 1 else 's'})" for name, count in small[:_LISTED])
            more = f" and {len(small) - _LISTED} more" if len(small) > _LISTED else ""
            because = f" ({what})" if what else ""
            raise ValueError(f"split {self.name!r} of {self.source}: {len(small)} class(es) have fewer than "
                             f"{needed} images{because}: {listed}{more}")

    def check_n_way(self, n_way: int) -> None:
        """Raise ``ValueError`` when the split has fewer classes than ``n_way``."""
        if n_way > self.n_classes:
            raise ValueError(f"{n_way}-way episodes need {n_way} classes, but split {self.name!r} of {self.source} "
                             f"has only {self.n_classes}: {', '.join(self.classes[:_LISTED])}"
                             f"{' …' if self.n_classes > _LISTED else ''}")


def detect_format(root: PathLike, split: Optional[str] = None) -> str:
    """``miniimagenet`` when ``ROOT/<split>.csv`` exists (any of train/val/test when ``split`` is None),
    ``folders`` when ``ROOT/<split>/`` is a folder.

    Raises:
        FileNotFoundError: ``root`` is missing or holds neither layout.
    """
    root = Path(root).expanduser()
    if root.is_file():
        raise NotADirectoryError(f"{root} is a file, not a few-shot split folder (give the folder holding "
                                 f"{split or 'test'}.csv or {split or 'test'}/)")
    if not root.is_dir():
        raise FileNotFoundError(f"no such split folder: {root}")
    names = [split] if split else list(SPLIT_NAMES)
    if any((root / f"{name}.csv").is_file() for name in names):
        return "miniimagenet"
    if any((root / name).is_dir() for name in names):
        return "folders"
    wanted = f"{split}.csv or {split}/" if split else "train/val/test.csv or train/, val/, test/ folders"
    raise FileNotFoundError(f"{root} is not a few-shot split: expected {wanted} (miniImageNet CSV layout or "
                            f"one folder per class)")


def available_splits(root: PathLike, format: str = "auto") -> List[str]:
    """The splits among train/val/test present under ``root`` in the given (or detected) layout."""
    root = Path(root).expanduser()
    format = detect_format(root) if format == "auto" else _check_format(format)
    if format == "miniimagenet":
        return [name for name in SPLIT_NAMES if (root / f"{name}.csv").is_file()]
    return [name for name in SPLIT_NAMES if (root / name).is_dir()]


def load_split(root: PathLike, split: str = "test", format: str = "auto",
               images_dir: Optional[PathLike] = None) -> Split:
    """Read one split of a few-shot dataset (see the module docstring for the layouts).

    Args:
        root: the dataset folder (holding ``test.csv`` … or ``test/`` …).
        split: ``train``, ``val`` or ``test`` (any name works: ``<split>.csv`` or ``<split>/``).
        format: ``auto``, ``miniimagenet`` or ``folders``.
        images_dir: miniImageNet layout only: where the images are (default ``ROOT/images`` or ``ROOT``).

    Raises:
        FileNotFoundError: the CSV / split folder, or any image it names, is missing (all are named).
        ValueError: a malformed CSV, a class folder without images, an empty split.
    """
    root = Path(root).expanduser()
    format = detect_format(root, split) if format == "auto" else _check_format(format)
    if format == "miniimagenet":
        return load_csv_split(root, split, images_dir=images_dir)
    if images_dir is not None:
        raise ValueError("images_dir applies to the miniimagenet (CSV) layout only")
    return load_folder_split(root, split)


def _check_format(format: str) -> str:
    if format not in SPLIT_FORMATS:
        raise ValueError(f"unknown split format {format!r}: use auto, {' or '.join(SPLIT_FORMATS)}")
    return format


def load_csv_split(root: PathLike, split: str, images_dir: Optional[PathLike] = None) -> Split:
    """A miniImageNet-style split: ``ROOT/<split>.csv`` (``filename,label``) over one image folder."""
    root = Path(root).expanduser()
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        present = [p.name for p in sorted(root.glob("*.csv"))] if root.is_dir() else []
        hint = f" (found: {', '.join(present)})" if present else ""
        raise FileNotFoundError(f"split {split!r}: no such CSV file {csv_path}{hint}")
    image_root = Path(images_dir).expanduser() if images_dir is not None else (
        root / "images" if (root / "images").is_dir() else root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} does not exist")
    rows = _read_csv_rows(csv_path)
    _, names, labels = zip(*rows)
    classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    guard = RootGuard(image_root)
    ids, missing = [], []
    for number, filename, label in rows:
        relative = _find_csv_image(image_root, filename, label, f"{csv_path}:{number}")
        if relative is None:
            missing.append(filename)
        else:
            guard.refuse(relative, f"{csv_path}:{number}")
        ids.append(relative or filename)
    if missing:
        listed = ", ".join(missing[:_LISTED]) + (f" and {len(missing) - _LISTED} more"
                                                 if len(missing) > _LISTED else "")
        raise FileNotFoundError(f"{csv_path}: {len(missing)} of {len(rows)} listed image(s) are missing from "
                                f"{image_root}: {listed}")
    duplicates = len(names) - len(set(names))
    if duplicates:
        log.warning("%s lists %d file name(s) more than once", csv_path, duplicates)
    return Split(split, image_root.resolve(), ids, np.array([index[label] for label in labels], dtype=np.int64),
                 classes, "miniimagenet", csv_path)


def _read_csv_rows(csv_path: Path) -> List[Tuple[int, str, str]]:
    """``(line number, filename, label)`` of every row of a split CSV."""
    try:
        return _parse_csv_rows(csv_path)
    except UnicodeDecodeError:
        raise ValueError(f"{csv_path} is not a UTF-8 text CSV: expected a 'filename,label' header and one row per "
                         f"image") from None


def _parse_csv_rows(csv_path: Path) -> List[Tuple[int, str, str]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM from spreadsheet tools
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty: expected a 'filename,label' header and one row per image")
        columns = [column.strip().lower() for column in header]
        if "filename" not in columns or "label" not in columns:
            raise ValueError(f"{csv_path}: the header must name 'filename' and 'label' columns, found {header}")
        name_col, label_col = columns.index("filename"), columns.index("label")
        rows = []
        for number, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(name_col, label_col):
                raise ValueError(f"{csv_path}:{number}: expected filename,label, got {row}")
            filename, label = row[name_col].strip(), row[label_col].strip()
            if not filename or not label:
                raise ValueError(f"{csv_path}:{number}: empty filename or label in {row}")
            rows.append((number, filename, label))
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    return rows


def _find_csv_image(image_root: Path, filename: str, label: str, where: str) -> Optional[str]:
    """``filename`` relative to ``image_root`` (flat, or under a ``<label>/`` folder); None if absent.

    Raises:
        OutsideRootError: ``filename`` or ``label`` is absolute or holds ``..`` (``where`` names the row).
    """
    check_relative(filename, f"{where}: filename", image_root)
    check_relative(label, f"{where}: label", image_root)
    for relative in (filename, f"{label}/{filename}"):
        if (image_root / relative).is_file():
            return relative
    return None


def load_folder_split(root: PathLike, split: str) -> Split:
    """A folder-per-class split: ``ROOT/<split>/<class>/**/<image>``."""
    root = Path(root).expanduser()
    split_dir = root / split
    if not split_dir.is_dir():
        present = [p.name for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
        hint = f" (found folders: {', '.join(present)})" if present else ""
        raise FileNotFoundError(f"split {split!r}: no such folder {split_dir}{hint}")
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    real_split = str(split_dir.resolve())
    if not classes:
        raise ValueError(f"split folder {split_dir} has no class folders: expected {split_dir}/<class>/<image>")
    loose = [entry.name for entry in split_dir.iterdir() if entry.is_file() and is_image_file(entry.name)]
    if loose:
        log.warning("%s: %d image(s) outside any class folder are ignored (e.g. %s)", split_dir, len(loose), loose[0])
    ids: List[str] = []
    labels: List[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _class_images(split_dir, name, real_split)
        if not found:
            empty.append(name)
        ids.extend(f"{name}/{relative}" for relative in found)
        labels.extend([label] * len(found))
    if empty:
        listed = ", ".join(empty[:_LISTED]) + (f" and {len(empty) - _LISTED} more" if len(empty) > _LISTED else "")
        raise ValueError(f"split {split!r} in {split_dir}: {len(empty)} class folder(s) hold no images: {listed}")
    return Split(split, split_dir.resolve(), ids, np.array(labels, dtype=np.int64), classes, "folders", split_dir)


def _class_images(split_dir: Path, name: str, real_split: str) -> List[str]:
    """The images of class folder ``name``, relative to it; a class folder or an image that is a symbolic
    link leading outside ``split_dir`` (resolved: ``real_split``) is refused."""
    folder = split_dir / name
    target = leaves_root(folder, real_split)
    if target is not None:
        raise OutsideRootError(f"class folder {folder} is a symbolic link to {target}, outside {split_dir}: "
                               f"simret reads no file outside the split's folder")
    found, links = walk_images(folder)
    for relative in links:
        target = leaves_root(folder / relative, real_split)
        if target is not None:
            raise OutsideRootError(f"{folder / relative} is a symbolic link to {target}, outside {split_dir}: "
                                   f"simret reads no file outside the split's folder")
    return found


def describe_split(split: Split) -> str:
    """One line: ``test split (folders): 5 classes, 300 images (60 per class)``."""
    per_class = np.bincount(split.labels, minlength=split.n_classes)
    sizes = f"{per_class.min()} per class" if per_class.min() == per_class.max() else \
        f"{per_class.min()}–{per_class.max()} per class"
    return f"{split.name} split ({split.format}): {split.n_classes} classes, {len(split)} images ({sizes})"
