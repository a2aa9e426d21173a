"""Labelled images for fine-tuning: folder-per-class trees and few-shot base splits.

Layouts understood by ``list_labelled_images(data, split)``:

* ``split=None``: ``DATA/<class>/**/*.jpg`` (a folder per class, searched recursively), or a
  ``filename,label`` CSV file given directly as ``DATA`` (images next to it or in ``images/`` beside it);
* ``split="train"``: a few-shot split root, either ``DATA/train/<class>/**/*.jpg`` or the miniImageNet
  CSV layout ``DATA/train.csv`` (``filename,label`` rows) with the images in ``DATA/images/`` (or ``DATA/``).

Class names are sorted and label ``i`` is the ``i``-th name, so the same tree always gives the same labels.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from simret.data.images import is_image_file, list_images

PathLike = Union[str, os.PathLike]
SPLIT_NAMES = ("train", "val", "validation", "test")


@dataclass
class LabelledImages:
    """Images with class labels: ``ids[i]`` (relative to ``root``) has label ``labels[i]`` →
    ``classes[labels[i]]``."""

    root: Path
    ids: List[str]
    labels: List[int]
    classes: List[str]

    def __len__(self) -> int:
        return len(self.ids)

    def counts(self) -> Dict[str, int]:
        """Images per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for label in self.labels:
            counts[self.classes[label]] += 1
        return counts


def list_labelled_images(data: PathLike, split: Optional[str] = None) -> LabelledImages:
    """The labelled images of a folder-per-class tree or of one split of a few-shot split root.

    Raises:
        FileNotFoundError: ``data`` (or the split, or an image a CSV names) does not exist.
        ValueError: no class folders, an empty class, fewer than two classes, a malformed CSV.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"no such folder or file: {data}")
    if split is None:
        if data.is_file():
            if data.suffix.lower() != ".csv":
                raise ValueError(f"{data} is a file: give a folder with one sub-folder per class, or a "
                                 f"filename,label .csv file")
            return _from_csv(data, _csv_image_folder(data))
        return _from_class_folders(data, hint_split=True)
    folder, table = data / split, data / f"{split}.csv"
    if folder.is_dir():
        return _from_class_folders(folder, hint_split=False)
    if table.is_file():
        return _from_csv(table, _csv_image_folder(table))
    present = sorted(p.name for p in data.iterdir() if p.is_dir() or p.suffix.lower() == ".csv") if data.is_dir() else []
    raise FileNotFoundError(f"split {split!r} not found under {data}: expected the folder {folder} (one "
                            f"sub-folder per class) or the file {table} (filename,label rows)"
                            + (f"; found: {', '.join(present)}" if present else ""))


def _from_class_folders(root: Path, *, hint_split: bool) -> LabelledImages:
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    root = root.resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and is_image_file(p.name))
    if not classes:
        what = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise ValueError(f"{root} has no class folders{what}: expected {root}/<class>/*.jpg, one folder per class")
    if hint_split and set(classes) <= set(SPLIT_NAMES):
        raise ValueError(f"{root} looks like a few-shot split root (it holds {', '.join(classes)}): "
                         f"pick one with --split {classes[0]}")
    if loose:
        raise ValueError(f"{root} holds images outside the class folders (e.g. {loose[0]}): move them into "
                         f"{root}/<class>/ or remove them")
    ids: List[str] = []
    labels: List[int] = []
    empty: List[str] = []
    for label, name in enumerate(classes):
        try:
            _, found = list_images(root / name)
        except ValueError:
            empty.append(name)
            continue
        ids.extend(f"{name}/{image_id}" for image_id in found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(empty[:8]) + (f" … and {len(empty) - 8} more" if len(empty) > 8 else "")
        raise ValueError(f"{len(empty)} class folder(s) under {root} hold no images: {shown}")
    return _checked(LabelledImages(root, ids, labels, classes), root)


def _csv_image_folder(table: Path) -> Path:
    images = table.parent / "images"
    return images if images.is_dir() else table.parent


def _from_csv(table: Path, image_root: Path) -> LabelledImages:
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows = [row for row in rows if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{table} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    if header[:2] != ["filename", "label"]:
        raise ValueError(f"{table} must start with the header 'filename,label', found {','.join(rows[0])!r}")
    pairs = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{table}:{number}: expected 'filename,label', got {','.join(row)!r}")
        pairs.append((row[0].strip(), row[1].strip()))
    if not pairs:
        raise ValueError(f"{table} lists no images")
    root = image_root.resolve()
    missing = [name for name, _ in pairs if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) named in {table} are not in {root}, e.g. {missing[0]}")
    classes = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(classes)}
    return _checked(LabelledImages(root, [n for n, _ in pairs], [index[c] for _, c in pairs], classes), table)


def _checked(images: LabelledImages, where: Path) -> LabelledImages:
    if len(images.classes) < 2:
        raise ValueError(f"{where} has {len(images.classes)} class(es) ({', '.join(images.classes)}); "
                         f"a classifier needs at least two")
    return images


def describe(images: LabelledImages, limit: int = 6) -> str:
    """``'200 images, 5 classes (digit_0: 40, …)'``."""
    counts = images.counts()
    shown: Sequence[str] = [f"{name}: {n}" for name, n in list(counts.items())[:limit]]
    more = " …" if len(counts) > limit else ""
    return f"{len(images)} images, {len(images.classes)} classes ({', '.join(shown)}{more})"
