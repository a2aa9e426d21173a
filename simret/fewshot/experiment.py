"""Few-shot evaluation of an encoder on a split: feature banks, episodes, every method, one report.

``run_fewshot(encoder, split_root, settings)`` is what ``simret fewshot`` runs, in four stages:

1. splits (``load_splits``): the evaluated split and, when a method subtracts a base mean (SimpleShot's CL2N,
   softkmeans), the base split; checked (enough classes, enough images per class) before any feature is
   computed;
2. feature banks of both (``feature_bank``: reused when they match, extracted and stored otherwise) in
   ``settings.features_dir``, by default a folder per dataset and encoder under the cache;
3. per shot, one set of episodes (``settings.seed``), the same for every method;
4. a ``FewShotReport``: the results, ``format()`` (what ``simret fewshot`` prints) and ``to_json()`` (what
   ``simret fewshot --out`` writes).

Example::

    from simret.fewshot import FewShotSettings, run_fewshot
    from simret.models import create_encoder

    encoder = create_encoder("resnet18", weights="my-resnet18.pth")
    settings = FewShotSettings(shots=(1, 5), methods=("simpleshot", "protonet"), image_size=84)
    report = run_fewshot(encoder, "~/data/miniimagenet", settings)
    print(report.format())                       # the table, accuracy % ± 95% CI
    report.result("simpleshot", 5).mean          # a fraction; .ci95 = 1.96·std/√episodes
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from simret.data.splits import Split
from simret.fewshot.evaluation import FewShotResult
from simret.utils.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
BASE_MEAN_METHODS = ("simpleshot", "softkmeans", "laplacianshot")  # methods given the base split's mean (CL2N)
CI95_NOTE = "1.96 * std(accuracies, ddof=0) / sqrt(n_episodes); accuracies are fractions"


@dataclass
class FewShotSettings:
    """Which episodes are drawn, which methods score them, and how the feature banks are made."""

    split: str = "test"  # the split the episodes are drawn from
    base_split: str = "train"  # whose mean feature simpleshot (CL2N) and softkmeans subtract, when present
    split_format: str = "auto"  # auto, miniimagenet (ROOT/<split>.csv) or folders (ROOT/<split>/<class>/)
    n_way: int = 5
    shots: Sequence[int] = (1, 5)
    n_query: int = 15  # query images per class
    n_episodes: int = 2000  # per shot
    methods: Sequence[str] = ("simpleshot",)
    seed: int = 0  # same seed, same episodes
    image_size: Optional[int] = None  # square input size (default: the encoder's)
    crop_pct: Optional[float] = None  # centre-crop fraction (default: the encoder's)
    features_dir: Optional[Path] = None  # where features-<split>.h5 are kept (default: default_features_dir)
    batch_size: int = 64
    workers: int = 2  # image-loading worker processes
    device: Any = None  # where the encoder runs (default: where its parameters are)
    lock_timeout: Optional[float] = None  # seconds to wait for another writer of the banks (None: as long as it takes)
    verify_content: bool = False  # also compare the images' SHA-256 to find files replaced in place


@dataclass
class FewShotSplits:
    """The splits a run uses: ``split`` (evaluated) and ``base`` (None: no base mean, methods use L2N)."""

    format: str
    split: Split
    base: Optional[Split]


@dataclass
class FewShotReport:
    """Every method at every shot (fractions; ``format()`` prints percent), with what produced them."""

    split_root: Path
    split: Split
    base: Optional[Split]
    settings: FewShotSettings
    preprocessing: Dict[str, Any]  # {"image_size", "crop_pct"} the feature banks were made with
    features_dir: Path
    encoder: Dict[str, Any]  # the encoder's provenance (fingerprint, arch, weights, dim …)
    results: List[FewShotResult]  # shot-major, methods in settings order; details["protocol"] names each

    def result(self, method: str, shot: int) -> FewShotResult:
        """The result of ``method`` at ``shot`` shots."""
        for result in self.results:
            if result.method == method and result.n_shot == shot:
                return result
        raise KeyError(f"no result for {method} at {shot} shot(s)")

    def format_table(self) -> str:
        """One row per method, one column per shot: ``mean ± ci95`` in percent."""
        shots = list(dict.fromkeys(result.n_shot for result in self.results))
        methods = list(dict.fromkeys(result.method for result in self.results))
        headers = ["method"] + [f"{shot}-shot" for shot in shots]
        rows = [[name] + [self.result(name, shot).format() for shot in shots] for name in methods]
        widths = [max(len(row[i]) for row in [headers] + rows) for i in range(len(headers))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                         for row in [headers] + rows)

    def format(self) -> str:
        """What ``simret fewshot`` prints: the split, the encoder, the protocol, a blank line, the table."""
        from simret.data.splits import describe_split

        settings, weights = self.settings, self.encoder["weights"]
        lines = [
            f"{self.split_root} — {describe_split(self.split)}",
            f"encoder {self.encoder['fingerprint']} ({weights} weights, {self.encoder['dim']}-d, "
            f"{self.preprocessing['image_size']} px)"
            + (f"; base mean: {self.base.name} split ({len(self.base)} images)" if self.base is not None else ""),
            f"{settings.n_way}-way, {settings.n_query} queries per class, {settings.n_episodes} episodes per shot, "
            f"seed {settings.seed}; accuracy % ± 95% CI",
            "",
            self.format_table(),
        ]
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        """What ``simret fewshot --out`` writes: results as fractions, with their provenance."""
        settings = self.settings
        return {
            "split_root": str(self.split_root), "format": self.split.format, "split": settings.split,
            "n_classes": self.split.n_classes, "n_images": len(self.split),
            "base_split": self.base.name if self.base is not None else None, "encoder": self.encoder,
            **self.preprocessing, "n_way": settings.n_way, "n_query": settings.n_query,
            "n_episodes": settings.n_episodes, "seed": settings.seed, "ci95": CI95_NOTE,
            "features": {"directory": str(self.features_dir)}, "results": [result.to_dict() for result in self.results],
        }


def run_fewshot(encoder: Any, split_root: PathLike, settings: Optional[FewShotSettings] = None, *,
                splits: Optional[FewShotSplits] = None) -> FewShotReport:
    """Evaluate ``encoder`` on N-way K-shot episodes of ``split_root`` (see the module docstring).

    Args:
        encoder: a ``simret.models.Encoder`` (images ``(B, 3, H, W)`` → ``(B, D)``).
        split_root: the dataset folder (``test.csv`` … or ``test/<class>/`` …).
        settings: episodes, methods and preprocessing (default: ``FewShotSettings()``).
        splits: ``load_splits(split_root, settings)`` when already loaded (``simret fewshot`` checks them
            before it builds the encoder).

    Returns:
        ``FewShotReport`` with one ``FewShotResult`` per shot and method (``accuracies (E,)``, ``mean``,
        ``ci95``).

    Raises:
        FileNotFoundError, ValueError: a missing or malformed split, too few classes or images per class,
            unknown methods, unreadable images (the features already computed are kept).
    """
    settings = settings if settings is not None else FewShotSettings()
    splits = splits if splits is not None else load_splits(split_root, settings)
    from simret.fewshot.features import bank_settings, feature_bank

    preprocessing = bank_settings(encoder, settings.image_size, settings.crop_pct)
    directory = Path(settings.features_dir) if settings.features_dir is not None else default_features_dir(
        split_root, splits.format, encoder.fingerprint, preprocessing)
    options = {**preprocessing, "batch_size": settings.batch_size, "workers": settings.workers,
               "device": settings.device, "lock_timeout": settings.lock_timeout,
               "verify_content": settings.verify_content}
    bank = feature_bank(encoder, splits.split, directory, **options)
    base_mean = feature_bank(encoder, splits.base, directory, **options).mean() if splits.base is not None else None
    results = _evaluate_methods(bank, base_mean, settings)
    return FewShotReport(Path(split_root), splits.split, splits.base, settings, preprocessing, directory,
                         encoder.provenance(), results)


def load_splits(split_root: PathLike, settings: FewShotSettings) -> FewShotSplits:
    """The evaluated split and the base split a run needs, checked against the episodes asked for.

    The base split is loaded only when a method subtracts a base mean; when it is missing (or is the
    evaluated split itself) a warning says those methods use L2N instead of CL2N.
    """
    from simret.data.splits import available_splits, detect_format, load_split

    shots, methods = _checked(settings)
    split_format = detect_format(split_root, settings.split) if settings.split_format == "auto" \
        else settings.split_format
    split = load_split(split_root, settings.split, split_format)
    split.check_n_way(settings.n_way)
    split.check_class_sizes(max(shots) + settings.n_query, f"shot {max(shots)} + query {settings.n_query}")
    needing = "/".join(name for name in methods if name in BASE_MEAN_METHODS)
    base = None
    if needing:
        if settings.base_split == settings.split:
            log.warning("--base-split %r is the evaluated split: %s will use L2N instead of CL2N (no base mean)",
                        settings.base_split, needing)
        elif settings.base_split in available_splits(split_root, split_format):
            base = load_split(split_root, settings.base_split, split_format)
        else:
            log.warning("no %r split under %s: %s will use L2N instead of CL2N (no base mean)", settings.base_split,
                        split_root, needing)
    return FewShotSplits(split_format, split, base)


def default_features_dir(root: PathLike, split_format: str, fingerprint: str, preprocessing: Dict[str, Any]) -> Path:
    """``<cache>/fewshot/<dataset name>-<hash of its path>/<fingerprint>-<size>px-crop<pct>``."""
    from simret.fewshot.cache import features_cache_dir

    return features_cache_dir("fewshot", root, split_format, fingerprint, preprocessing)


def _checked(settings: FewShotSettings):
    """``(shots, methods)`` of ``settings``, refused before any work when empty or unknown."""
    from simret.fewshot.methods import list_methods

    shots = [int(shot) for shot in settings.shots]
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be integers >= 1, got {list(settings.shots)}")
    methods = [str(name).strip().lower() for name in settings.methods]
    unknown = [name for name in methods if name not in list_methods()]
    if not methods or unknown:
        raise ValueError(f"unknown few-shot method(s) {', '.join(unknown) if unknown else 'none given'}; known: "
                         f"{', '.join(list_methods())}")
    return shots, methods


def _evaluate_methods(bank: Any, base_mean: Any, settings: FewShotSettings) -> List[FewShotResult]:
    """Every method on the same episodes, shot by shot (shot-major results)."""
    from simret.fewshot.episodes import sample_episodes
    from simret.fewshot.evaluation import evaluate
    from simret.fewshot.methods import MissingBaseMeanWarning, get_method

    shots, methods = _checked(settings)
    results = []
    for shot in shots:
        episodes = sample_episodes(bank.labels, settings.n_way, shot, settings.n_query, settings.n_episodes,
                                   settings.seed, class_names=bank.classes)
        for name in methods:
            kwargs = {"base_mean": base_mean} if name in BASE_MEAN_METHODS and base_mean is not None else {}
            with warnings.catch_warnings():
                if base_mean is None:  # load_splits has said so once
                    warnings.simplefilter("ignore", MissingBaseMeanWarning)
                method = get_method(name, **kwargs)
            log.debug("%d-shot: %s", shot, method.describe())
            result = evaluate(bank.features, episodes, method, progress=f"{name} {shot}-shot")
            result.method = name
            result.details["protocol"] = method.describe()
            results.append(result)
    return results
