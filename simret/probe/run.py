"""``simret probe`` as a library: cache the features of an ImageFolder train/val split, then k-NN and linear probes.

    from simret.probe import load_probe_splits, probe_banks, run_probe
    train, val = load_probe_splits("~/data/imagenet")                  # ROOT/train/<class>/…, ROOT/val/<class>/…
    banks = probe_banks(encoder, train, val, "features/", batch_size=128)
    results = run_probe(banks, methods=("knn", "linear"), ks=(10, 20, 100, 200))

Features are the encoder's pooled descriptors (not normalised), stored as few-shot feature banks
(``features-train.h5``, ``features-val.h5``: resumable, reused while fingerprint, image size, crop and the
image lists match). Validation labels are matched to the train split's classes by folder name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.data.splits import Split
from simret.fewshot.features import FeatureBank
from simret.probe.knn import DEFAULT_K, DEFAULT_TEMPERATURE
from simret.probe.linear import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, LEARNING_RATES

PathLike = Union[str, os.PathLike]
PROBE_METHODS = ("knn", "linear")
_LISTED = 8


@dataclass
class ProbeBanks:
    """Features of both splits; ``test_labels`` number the test images by the train split's ``classes``."""

    train: FeatureBank
    test: FeatureBank
    test_labels: np.ndarray
    classes: List[str]
    directory: Path

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def load_probe_splits(root: PathLike, train_split: str = "train", test_split: str = "val") -> Tuple[Split, Split]:
    """Both splits of an ImageFolder dataset, checked: every test class must be a train class.

    Raises:
        FileNotFoundError: no ``root``, or no ``root/<split>/`` folder. ValueError: a class folder without
        images, test classes the train split lacks, the same split twice.
    """
    from simret.data.splits import load_split

    root = Path(root).expanduser()
    if root.is_file():
        raise NotADirectoryError(f"{root} is a file: give the folder holding {train_split}/ and {test_split}/")
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    if train_split == test_split:
        raise ValueError(f"the train and test splits are both {train_split!r}: probe on a held-out split")
    train = load_split(root, train_split, "folders")
    test = load_split(root, test_split, "folders")
    unseen = [name for name in test.classes if name not in set(train.classes)]
    if unseen:
        listed = ", ".join(unseen[:_LISTED]) + (f" and {len(unseen) - _LISTED} more" if len(unseen) > _LISTED else "")
        raise ValueError(f"{len(unseen)} class folder(s) of {test.source} are not in {train.source}: {listed} "
                         f"(a probe classifies into the train split's classes)")
    return train, test


def probe_banks(encoder, train: Split, test: Split, directory: PathLike, *, image_size: Optional[int] = None,
                crop_pct: Optional[float] = None, **kwargs: Any) -> ProbeBanks:
    """The feature banks of both splits in ``directory`` (extracted or reused; ``kwargs`` go to
    ``extract_features``: ``batch_size``, ``workers``, ``device``)."""
    from simret.fewshot.features import feature_bank

    options = {"image_size": image_size, "crop_pct": crop_pct, **kwargs}
    train_bank = feature_bank(encoder, train, directory, **options)
    test_bank = feature_bank(encoder, test, directory, **options)
    return ProbeBanks(train_bank, test_bank, aligned_labels(train_bank.classes, test_bank), list(train_bank.classes),
                      Path(directory))


def aligned_labels(classes: Sequence[str], bank: FeatureBank) -> np.ndarray:
    """``bank.labels`` renumbered by class name into ``classes`` (``(N,)`` int64)."""
    index = {name: i for i, name in enumerate(classes)}
    missing = [name for name in bank.classes if name not in index]
    if missing:
        raise ValueError(f"classes {', '.join(missing[:_LISTED])} are not among the train classes")
    mapping = np.array([index[name] for name in bank.classes], dtype=np.int64)
    return mapping[bank.labels]


def run_probe(banks: ProbeBanks, methods: Sequence[str] = ("knn",), *, ks: Sequence[int] = (DEFAULT_K,),
              temperature: float = DEFAULT_TEMPERATURE, learning_rates: Sequence[float] = LEARNING_RATES,
              epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE, norm: str = "bn", seed: int = 0,
              device=None, progress: bool = False) -> List[Dict[str, Any]]:
    """Run each probe of ``methods`` (``knn``, ``linear``) on the banks; one result dict per k and per linear run.

    k-NN results: ``{"method": "knn", "k", "temperature", "top1", "top5", "protocol"}``; linear: see
    ``LinearProbeResult.to_dict`` (plus ``"protocol"``). Accuracies are fractions on the test split.
    """
    from simret.probe.knn import knn_accuracy
    from simret.probe.linear import linear_probe

    unknown = [name for name in methods if name not in PROBE_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown probe(s) {', '.join(unknown) or 'none'}; known: {', '.join(PROBE_METHODS)}")
    results: List[Dict[str, Any]] = []
    train, train_y, test = banks.train.features, banks.train.labels, banks.test.features
    for name in dict.fromkeys(methods):
        if name == "knn":
            scores = knn_accuracy(train, train_y, test, banks.test_labels, ks=ks, temperature=temperature,
                                  n_classes=banks.n_classes, device=device, progress="k-NN" if progress else None)
            results += [{"method": "knn", "k": k, "temperature": temperature, "top1": top1, "top5": top5,
                         "protocol": knn_protocol(k, temperature)} for k, (top1, top5) in scores.items()]
        else:
            result = linear_probe(train, train_y, test, banks.test_labels, banks.n_classes,
                                  learning_rates=learning_rates, epochs=epochs, batch_size=batch_size, norm=norm,
                                  seed=seed, device=device, progress="linear probe" if progress else None)
            results.append({**result.to_dict(), "protocol": linear_protocol(result)})
    return results


def knn_protocol(k: int, temperature: float) -> str:
    return (f"DINO weighted k-NN: L2-normalised features, cosine similarity, {k} neighbours, "
            f"votes exp(s/{temperature:g}) summed per class")


def linear_protocol(result) -> str:
    return (f"linear classifier on frozen cached features (norm={result.norm}), SGD momentum 0.9, no weight decay, "
            f"cosine schedule, {result.epochs} epochs, batch {result.batch_size}, "
            f"{len(result.sweep)} learning rate(s) swept, best top-1 on the test split (DINOv2)")
