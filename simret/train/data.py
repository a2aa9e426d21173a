"""Labelled images for fine-tuning: folder-per-class trees and few-shot base splits.

``list_labelled_images(data, split)`` is a thin layer over ``simret.data.splits`` (the layouts and their
errors live there):

* ``split=None``: ``DATA/<class>/**/*.jpg`` (one folder per class, searched recursively — read as the split
  named ``DATA.name`` of ``DATA.parent``), or a ``filename,label`` CSV file given directly as ``DATA``
  (images in ``images/`` beside it, or next to it);
* ``split="train"``: one split of a few-shot root, ``DATA/train/<class>/**`` or miniImageNet's ``DATA/train.csv``
  with the images in ``DATA/images/``.

Class names are sorted and label ``i`` is the ``i``-th name, so the same tree always gives the same labels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from simret.data.images import is_image_file
from simret.data.splits import SPLIT_NAMES, Split, load_csv_split, load_folder_split, load_split

PathLike = Union[str, os.PathLike]
LabelledImages = Split  # images with class labels: ids (relative to root), labels (N,) int64, classes


def list_labelled_images(data: PathLike, split: Optional[str] = None) -> Split:
    """The labelled images of a folder-per-class tree, a CSV, or one split of a few-shot split root.

    Raises:
        FileNotFoundError: ``data`` (or the split, or an image a CSV names) does not exist.
        ValueError: no class folders, an empty class, fewer than two classes, a malformed CSV.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"no such folder or file: {data}")
    if split is not None:
        return _checked(load_split(data, split))
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise ValueError(f"{data} is a file: give a folder with one sub-folder per class, or a "
                             f"filename,label .csv file")
        return _checked(load_csv_split(data.parent, data.stem))
    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes and set(classes) <= set(SPLIT_NAMES):
        raise ValueError(f"{data} looks like a few-shot split root (it holds {', '.join(classes)}): "
                         f"pick one with --split {classes[0]}")
    if not classes:
        loose = sum(1 for p in data.iterdir() if p.is_file() and is_image_file(p.name))
        what = f" ({loose} images lie directly in it)" if loose else ""
        raise ValueError(f"{data} has no class folders{what}: expected {data}/<class>/*.jpg, one folder per class")
    return _checked(load_folder_split(data.resolve().parent, data.resolve().name))


def _checked(images: Split) -> Split:
    if len(images.classes) < 2:
        raise ValueError(f"{images.source} has {len(images.classes)} class(es) ({', '.join(images.classes)}); "
                         f"a classifier needs at least two")
    return images


def describe(images: Split, limit: int = 6) -> str:
    """``'200 images, 5 classes (digit_0: 40, …)'``."""
    counts = images.class_counts()
    shown = [f"{name}: {n}" for name, n in list(counts.items())[:limit]]
    more = " …" if len(counts) > limit else ""
    return f"{len(images)} images, {len(images.classes)} classes ({', '.join(shown)}{more})"
