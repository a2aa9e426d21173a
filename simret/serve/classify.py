"""``POST /classify`` of ``simret serve --support DIR``: label an uploaded image from a folder of examples.

The support set is a ``simret.classify.SupportClassifier`` made with the server's encoder, so its features
are cached where ``simret classify`` caches them and an answer equals ``simret classify SUPPORT_DIR IMAGE
--format jsonl`` for the same image. A query image is described on the model thread (micro-batched with
other images to classify, preprocessed exactly as the support images are), then scored by
``classify_features`` on a worker thread. The support folder is read once, when the server starts.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
DEFAULT_TOP = 3  # best classes listed per answer, as simret classify --top
OFF_MESSAGE = ("classification is off on this server: start it with --support SUPPORT_DIR (a folder with one "
               "sub-folder of example images per class; create_app(..., support=...) in Python)")


class SupportSet:
    """The classifier ``/classify`` answers with, and how its query images are described.

    Args:
        classifier: a ``SupportClassifier`` whose encoder has the server encoder's fingerprint.
        encoder: the server's encoder (query images are described by it, on the model thread).
        device: where the encoder runs.
    """

    def __init__(self, classifier: Any, encoder: Any, device: Any) -> None:
        self.classifier = classifier
        self.encoder = encoder
        self.device = device

    @property
    def method(self) -> str:
        return self.classifier.method_name

    @property
    def n_classes(self) -> int:
        return len(self.classifier.classes)

    def health(self) -> Dict[str, Any]:
        """``{"classes": N, "method": NAME}`` for ``/health``."""
        return {"classes": self.n_classes, "method": self.method}

    def embed(self, paths: List[str]) -> Tuple[np.ndarray, List[int], List[Tuple[int, str]]]:
        """Features ``(n, D)`` of image files as the support set's are made, the indices kept and
        ``[(index, reason)]`` of the unreadable ones (``embed_images``). Runs on the model thread only."""
        from simret.classify.embed import embed_images

        return embed_images(self.encoder, paths, self.classifier.settings, batch_size=max(1, len(paths)), workers=0,
                            device=self.device)

    def answer(self, features: np.ndarray, name: str, top: int) -> Dict[str, Any]:
        """The JSON answer for one image's features ``(1, D)``: ``{"image", "class", "score", "top", "method"}``
        with scores rounded as ``simret classify --format jsonl`` writes them."""
        (prediction,) = self.classifier.classify_features(features, [name], top=top)
        row = prediction.to_dict()
        return {**row, "score": round(row["score"], 6),
                "top": [{"class": entry["class"], "score": round(entry["score"], 6)} for entry in row["top"]]}


def load_support_set(encoder: Any, device: Any, support: Any, *, method: Optional[str] = None,
                     base_mean: Union[None, PathLike, np.ndarray] = None) -> SupportSet:
    """The support set of a server: ``support`` is a folder (``<dir>/<class>/<images>``, read now, its features
    extracted or taken from the cache) or a ready ``SupportClassifier`` of an encoder with the same fingerprint.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: as ``SupportClassifier`` (a bad folder, method or base
            mean), or a classifier of another encoder.
    """
    from simret.classify.support import DEFAULT_METHOD, SupportClassifier

    if isinstance(support, SupportClassifier):
        if method is not None or base_mean is not None:
            raise ValueError("support_method and base_mean apply to a support folder; a SupportClassifier "
                             "brings its own method")
        if support.encoder.fingerprint != encoder.fingerprint:
            raise ValueError(f"the support classifier's encoder ({support.encoder.fingerprint}) is not the "
                             f"server's ({encoder.fingerprint}): its features would not compare")
        classifier = support
    else:
        classifier = SupportClassifier(encoder, support, method or DEFAULT_METHOD, base_mean=base_mean,
                                       device=device)
    log.info("classify: %s", classifier.describe())
    return SupportSet(classifier, encoder, device)
