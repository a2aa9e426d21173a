"""Where feature banks are cached by default: one folder per dataset (or support set) and encoder.

``<$SIMRET_CACHE or ~/.cache/simret>/<kind>/<folder name>-<hash of its resolved path>/
<fingerprint>-<size>px-crop<pct>`` — the scheme ``simret fewshot`` uses for its banks (kind ``fewshot``);
``simret probe`` keeps its banks under kind ``probe`` and ``simret classify`` its support banks under
``classify``. A different encoder, image size or crop gets a folder of its own.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Union


def features_cache_dir(kind: str, root: Union[str, os.PathLike], split_format: str, fingerprint: str,
                       settings: Dict[str, Any]) -> Path:
    """The default folder of the banks of ``root`` (read as ``split_format``) made by an encoder.

    ``settings``: ``{"image_size", "crop_pct"}`` from ``simret.fewshot.features.bank_settings``.
    """
    from simret.utils.paths import cache_dir

    resolved = Path(root).expanduser().resolve()
    digest = hashlib.blake2b(f"{resolved}|{split_format}".encode(), digest_size=4).hexdigest()
    crop = f"{settings['crop_pct']:g}".replace(".", "p")
    return cache_dir() / kind / f"{resolved.name}-{digest}" / f"{fingerprint}-{settings['image_size']}px-crop{crop}"
