"""Label new images from a folder of examples: ``SUPPORT_DIR/<class>/<images>`` is a few-shot support set.

    from simret.classify import SupportClassifier
    classifier = SupportClassifier(encoder, "support/", method="protonet")
    for prediction in classifier.classify(["query.jpg", pil_image]):
        print(prediction.image, prediction.label, prediction.score, prediction.top)

The support set is one few-shot episode with every class of the folder (``E = 1``); each image is a query
scored by ``simret.fewshot.get_method(method)`` against it — ``protonet`` (minus the Euclidean distance to the
class means), ``cosine``, ``simpleshot`` (CL2N with a base mean, else L2N) or ``logreg`` (logistic regression
on the support set). Transductive methods are refused: their answer for one image would depend on the other
images classified with it. Scores are the method's own (higher is better), not probabilities.

Support features are a feature bank cached per support folder and encoder (``simret.fewshot.cache``; kind
``classify``); the bank records every support file's size and modification time: a support image edited in
place is described again, adding, removing or renaming one makes the next classifier extract the bank again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.classify.embed import ImageInput
from simret.data.splits import Split
from simret.utils.logs import get_logger

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
DEFAULT_METHOD = "protonet"
DEFAULT_TOP = 5
_LISTED = 8


@dataclass
class Prediction:
    """The predicted class of one image, its score, the best classes with their scores, and the method."""

    image: str
    label: str
    score: float
    top: List[Tuple[str, float]] = field(default_factory=list)
    method: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """``{"image", "class", "score", "top": [{"class", "score"}, …], "method"}`` (JSON-ready)."""
        return {"image": self.image, "class": self.label, "score": self.score,
                "top": [{"class": name, "score": score} for name, score in self.top], "method": self.method}


class SupportClassifier:
    """A few-shot classifier whose classes are the sub-folders of ``support_dir`` (see the module docstring).

    Args:
        encoder: a ``simret.models.Encoder`` (on the device it should run on).
        support_dir: ``<dir>/<class>/<images>`` (images may sit in sub-folders of a class folder).
        method: ``protonet`` (default), ``cosine``, ``simpleshot`` or ``logreg``.
        base_mean: for ``simpleshot``/``logreg`` (CL2N): a ``(D,)`` array, a ``.npy`` file holding one, or a
            feature bank ``.h5`` whose mean feature is used (it must come from the same encoder).
        cache_dir: where the support bank is kept (default: ``simret.fewshot.cache`` under kind ``classify``).
        image_size, crop_pct: preprocessing (default: the encoder's); queries get the same.
        batch_size, workers, device: for extraction (device default: the encoder's).
        lock_timeout, verify_content: for the support bank (``simret.fewshot.features.feature_bank``).
        top: how many best classes each prediction lists.

    Raises:
        FileNotFoundError / NotADirectoryError: no such support folder.
        ValueError: fewer than two classes, a class folder without images, an unknown or transductive
            method, a base mean of the wrong width or encoder, unreadable support images (all named).
    """

    def __init__(self, encoder, support_dir: PathLike, method: str = DEFAULT_METHOD, *,
                 base_mean: Union[None, PathLike, np.ndarray] = None, cache_dir: Optional[PathLike] = None,
                 image_size: Optional[int] = None, crop_pct: Optional[float] = None, batch_size: int = 64,
                 workers: int = 0, device: Union[str, torch.device, None] = None, top: int = DEFAULT_TOP,
                 lock_timeout: Optional[float] = None, verify_content: bool = False) -> None:
        from simret.fewshot.cache import features_cache_dir
        from simret.fewshot.features import bank_settings

        if int(top) < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        self.encoder = encoder
        self.split = load_support(support_dir)
        mean = load_base_mean(base_mean, encoder) if base_mean is not None else None
        self.method = build_method(method, mean)
        self.method_name = str(method).strip().lower()
        self.top = int(top)
        self.settings = bank_settings(encoder, image_size, crop_pct)
        self.options = {"batch_size": int(batch_size), "workers": int(workers), "device": device}
        self.directory = Path(cache_dir) if cache_dir is not None else features_cache_dir(
            "classify", self.split.source, "folders", encoder.fingerprint, self.settings)
        self.bank = support_bank(encoder, self.split, self.directory, self.settings, lock_timeout=lock_timeout,
                                 verify_content=verify_content, **self.options)

    @property
    def classes(self) -> List[str]:
        return list(self.split.classes)

    def describe(self) -> str:
        """``support/ — 5 classes, 50 images (10 per class); protonet: euclidean, norm=none``."""
        from simret.data.splits import describe_split

        text = describe_split(self.split).split(": ", 1)[1]
        return f"{self.split.source} — {text}; {self.method.describe()}"

    def classify(self, images: Sequence[ImageInput], names: Optional[Sequence[str]] = None, *,
                 skip_unreadable: bool = False) -> List[Prediction]:
        """One ``Prediction`` per image (paths or PIL images), in order.

        ``names`` label the images in the predictions (default: the paths as given, ``image-<i>`` for PIL
        images). An unreadable file raises ``ValueError`` naming every one, unless ``skip_unreadable``: then
        it is left out with a warning in the log.
        """
        from simret.classify.embed import embed_images

        images = list(images)
        names = list(names) if names is not None else [_name(item, i) for i, item in enumerate(images)]
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        if not images:
            return []
        features, kept, failures = embed_images(self.encoder, images, self.settings, **self.options)
        if failures and not skip_unreadable:
            listed = "; ".join(f"{names[i]}: {reason}" for i, reason in failures[:_LISTED])
            raise ValueError(f"{len(failures)} image(s) could not be read: {listed}")
        for index, reason in failures:
            log.warning("%s skipped: %s", names[index], reason)
        return self.classify_features(features, [names[i] for i in kept])

    def classify_features(self, features: Any, names: Sequence[str], *, top: Optional[int] = None
                          ) -> List[Prediction]:
        """Predictions for already-extracted features ``(Q, D)`` (this encoder's, not normalised); ``top``:
        how many best classes each lists (default: the classifier's)."""
        import torch

        if top is not None and int(top) < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        query = np.asarray(features, dtype=np.float32)
        if query.ndim != 2 or query.shape[1] != self.bank.dim or query.shape[0] != len(names):
            raise ValueError(f"expected features ({len(names)}, {self.bank.dim}), got shape {query.shape}")
        if not query.shape[0]:
            return []
        # float64: distances by the |q|² + |c|² - 2q·c expansion cancel badly in float32 (errors ~1e-5 that vary
        # with the number of images classified together); in float64 an image's scores never depend on the others
        support = torch.from_numpy(self.bank.features).double()[None]  # (1, S, D)
        labels = torch.from_numpy(self.bank.labels)[None]  # (1, S)
        with torch.inference_mode():
            scores = self.method(support, labels, torch.from_numpy(query).double()[None], n_way=self.split.n_classes)
        return self._predictions(np.asarray(scores[0], dtype=np.float64), names, self.top if top is None else int(top))

    def _predictions(self, scores: np.ndarray, names: Sequence[str], top: int) -> List[Prediction]:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :min(top, scores.shape[1])]
        out = []
        for name, row, best in zip(names, scores, order):
            listed = [(self.split.classes[c], float(row[c])) for c in best]
            out.append(Prediction(str(name), listed[0][0], listed[0][1], listed, self.method_name))
        return out


# ------------------------------------------------------------------------------------ support set


def load_support(support_dir: PathLike) -> Split:
    """The support set as a ``Split`` (named after the folder), checked: at least two classes, each with images.

    Raises:
        FileNotFoundError, NotADirectoryError: no such folder. ValueError: no/one class folder, an empty one.
    """
    from simret.data.splits import load_folder_split

    folder = Path(support_dir).expanduser()
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file: the support set is a folder with one sub-folder of images "
                                 f"per class ({folder}/<class>/<image>)")
    if not folder.is_dir():
        raise FileNotFoundError(f"no such support folder: {folder}")
    folder = folder.resolve()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise ValueError(f"support folder {folder} needs at least two class folders ({folder}/<class>/<image>); "
                         f"found {found}")
    try:
        return load_folder_split(folder.parent, folder.name)
    except ValueError as err:
        if "hold no images" not in str(err):
            raise
        empty = str(err).split("hold no images: ", 1)[1]
        raise ValueError(f"support folder {folder}: class folder(s) without images: {empty} (add images or remove "
                         f"the folder)") from None


def support_bank(encoder, split: Split, directory: PathLike, settings: Dict[str, Any], **kwargs: Any):
    """The support features (a ``FeatureBank``): the support images edited since are described again, and the
    whole bank is extracted again when images were added, removed or renamed (``feature_bank``)."""
    from simret.fewshot.features import feature_bank

    return feature_bank(encoder, split, directory, image_size=settings["image_size"], crop_pct=settings["crop_pct"],
                        **kwargs)


# ------------------------------------------------------------------------------------------ method


def build_method(name: str, base_mean: Optional[np.ndarray] = None, *, quiet: bool = False):
    """``get_method(name)`` for one-image-at-a-time use; ``simpleshot`` without a base mean uses L2N (and says so
    in the log, unless ``quiet``)."""
    from simret.fewshot.methods import METHOD_OPTIONS, get_method, list_methods

    key = str(name).strip().lower()
    if key not in list_methods():
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(inductive_methods())}")
    takes_mean = "base_mean" in METHOD_OPTIONS.get(key, ())
    if base_mean is not None and not takes_mean:
        users = [m for m in inductive_methods() if "base_mean" in METHOD_OPTIONS.get(m, ())]
        raise ValueError(f"a base mean applies to {', '.join(users)}, not to {key}")
    if key == "simpleshot" and base_mean is None:
        if not quiet:
            log.warning("simpleshot without a base mean: L2N instead of CL2N (give the mean feature of a base "
                        "split to centre the features)")
        method = get_method(key, norm="l2n")
    else:
        method = get_method(key, **({"base_mean": base_mean} if base_mean is not None else {}))
    if getattr(method, "transductive", False):
        raise ValueError(f"{key} is transductive: its answer for one image would depend on the other images "
                         f"classified with it; use one of {', '.join(inductive_methods())}")
    return method


def inductive_methods() -> List[str]:
    """The few-shot methods that classify each image on its own (the ones ``classify`` accepts)."""
    import warnings

    from simret.fewshot.methods import get_method, list_methods

    names = []
    for name in list_methods():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. simpleshot without a base mean
            try:
                transductive = getattr(get_method(name), "transductive", False)
            except (TypeError, ValueError):  # a method that cannot be built without options
                continue
        if not transductive:
            names.append(name)
    return names


def load_base_mean(source: Union[PathLike, np.ndarray], encoder=None) -> np.ndarray:
    """A ``(D,)`` float32 base mean from an array, a ``.npy`` file or a feature bank ``.h5`` (its mean feature).

    With ``encoder``: its width must match, and a bank must have been made by it (same fingerprint).
    """
    if isinstance(source, np.ndarray):
        mean, origin = source, "the base mean"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such base-mean file: {path} (a .npy vector or a features-<split>.h5 bank)")
        mean, origin = _read_mean(path, encoder), str(path)
    mean = np.asarray(mean)
    if mean.ndim == 2 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 1 or not np.issubdtype(mean.dtype, np.number):
        raise ValueError(f"{origin} must hold one vector (D,), got an array of shape {mean.shape}")
    if encoder is not None and mean.shape[0] != int(encoder.dim):
        raise ValueError(f"{origin} is {mean.shape[0]}-d, the encoder's features are {encoder.dim}-d")
    if not np.isfinite(mean).all():
        raise ValueError(f"{origin} holds NaN or infinite values")
    return mean.astype(np.float32)


def _read_mean(path: Path, encoder) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path} is not a plain .npy array ({err})") from None
    if path.suffix.lower() in (".h5", ".hdf5"):
        from simret.fewshot.features import load_feature_bank

        bank = load_feature_bank(path)
        made_by = bank.attrs.get("fingerprint")
        if encoder is not None and made_by is not None and made_by != encoder.fingerprint:
            raise ValueError(f"{path} was made by encoder {made_by}, not by {encoder.fingerprint}: its mean is of "
                             f"other features (extract that split with this encoder)")
        return bank.mean()
    raise ValueError(f"{path}: a base mean is a .npy vector or a features-<split>.h5 bank, not a {path.suffix} file")


def _name(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image-{index}"
