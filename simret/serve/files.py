"""Indexed image files for ``/images`` and ``/thumbnails``: only ids of the index, only files inside its root
(symlinks resolved), and thumbnails kept in a small in-memory LRU cache."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

from simret.retrieval.indexdir import path_key

THUMBNAIL_SIZES = (16, 1024)  # smallest and largest long side a thumbnail may ask for


def indexed_file(loaded, image_id: str) -> Optional[Path]:
    """The file of an indexed id, resolved, when it is a regular file inside the index's root; else None.

    Anything not listed by the index (``../`` paths, absolute paths, encoded variants) is None before the
    file system is looked at; a listed id whose real path (symlinks resolved) leaves the root is None too.
    """
    if image_id not in loaded.row_of:
        return None
    try:
        root = loaded.root.resolve(strict=True)
        real = Path(path_key(loaded.root, image_id)).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    try:
        real.relative_to(root)
    except ValueError:
        return None
    return real if real.is_file() else None


class ThumbnailCache:
    """JPEG thumbnails by (file, modification time, size), least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = 64 << 20, quality: int = 85) -> None:
        self.max_bytes = max_bytes
        self.quality = quality
        self._entries: OrderedDict[Tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: Path, size: int) -> bytes:
        """The JPEG thumbnail (long side ``size``, never upscaled) of ``path``.

        Raises:
            simret.data.images.ImageReadError: the file cannot be read as an image.
        """
        key = (str(path), path.stat().st_mtime_ns, int(size))
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = self._render(path, size)
        with self._lock:
            if key not in self._entries and len(data) <= self.max_bytes:
                self._entries[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self._bytes -= len(dropped)
        return data

    def _render(self, path: Path, size: int) -> bytes:
        from simret.data.images import load_image

        image = load_image(path)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()
