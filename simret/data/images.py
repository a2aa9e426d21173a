"""Safe image loading, resizing and cropping, and an ``ImageList`` dataset that never dies on a bad file.

Conventions:
* images are RGB PIL images until they become ``(3, H, W)`` float tensors normalised with the encoder's
  ``data_config`` mean/std;
* boxes are ``(x1, y1, x2, y2)`` in pixels of the original image (the Revisited Oxford/Paris ``bbx``);
* retrieval resizing follows cirtorch: the long side becomes ``max_size`` (never upscaled unless asked),
  the aspect ratio is kept;
* every PIL mode becomes 8-bit RGB by the rules of ``simret.data.pixels`` (16-bit and float scaled, not
  clipped; transparency composited on white);
* a relative id is read only if it resolves inside its root (see ``list_images`` and ``ImageList``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageFile, UnidentifiedImageError

from simret.data.paths import OutsideRootError, is_within, leaves_root
from simret.utils.logs import get_logger

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_SIDE = 20_000  # the longest side asked for (--max-size, --img-size): simret reads no larger image
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # decompression-bomb guard: larger images are refused, not decoded
Box = Tuple[float, float, float, float]
PathLike = Union[str, os.PathLike]

log = get_logger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture


class ImageReadError(OSError):
    """An image that cannot be used; ``reason`` says why in a few words (for ``skipped.tsv``)."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(path: PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(source: PathLike, *, recursive: bool = True) -> Tuple[Path, List[str]]:
    """The images named by ``source``: ``(root, ids)`` with ids relative to root, sorted, POSIX style.

    ``source`` is a folder (searched recursively for image extensions, hidden entries skipped, symbolic
    links to folders not entered) or a text file with one path per line (blank lines and ``#`` comments
    ignored; the paths are kept whatever their extension, in the list's order).

    What a source may name (a relative id always resolves inside the root, so a reader of the index, or a
    server of its images, can rely on it):

    * a folder is the root; an image in it that is a symbolic link leading outside it is refused;
    * in a list file, relative lines are relative to the list's folder (the root) and must stay inside it:
      a line that climbs out with ``..`` or is a symbolic link leading outside is refused, naming
      ``file:line``; an *absolute* line is read where it points and kept as an absolute id (the explicit way
      to name a file elsewhere: check a list from elsewhere for them, e.g. ``grep -n '^/' list.txt``).

    Raises:
        FileNotFoundError: ``source`` does not exist, or a listed file is missing.
        OutsideRootError: a relative entry leads outside the root (the message names it).
        ValueError: the folder holds no images; ``source`` is an image file or not a text file.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"no such folder or list file: {source}")
    if source.is_file():
        return _read_list_file(source)
    root = source.resolve()
    found, links = walk_images(root, recursive=recursive)
    for image_id in links:
        target = leaves_root(root / image_id, str(root))
        if target is not None:
            raise OutsideRootError(f"{root / image_id} is a symbolic link to {target}, outside {root}: simret reads "
                                   f"no file outside the folder it is given (give the folder it points into, or "
                                   f"name the files by absolute path in a list file)")
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])} …) found under {root}")
    return root, found


def _read_list_file(source: Path) -> Tuple[Path, List[str]]:
    """``list_images`` of a text file: one path per line (see there for the rules)."""
    if is_image_file(source):
        raise ValueError(f"{source} is an image file, not a folder or a list: give the folder that holds it, "
                         f"or a text file with one image path per line")
    root = source.parent.resolve()
    ids: List[str] = []
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not a text list of image paths (not UTF-8 text): give a folder of "
                         f"images or a text file with one image path per line") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            raise ValueError(f"{source}:{number}: {line!r} holds a NUL character: not a file name")
        path = Path(line).expanduser()
        relative = not path.is_absolute()
        path = root / path if relative else path
        if not path.exists():
            raise FileNotFoundError(f"{source}:{number}: listed image does not exist: {path}")
        resolved = path.resolve()
        if relative and not is_within(str(resolved), str(root)):
            how = ("climbs out of it with '..'" if os.path.normpath(line).split(os.sep)[0] == ".."
                   else f"is a symbolic link to {resolved}, outside it")
            raise OutsideRootError(f"{source}:{number}: {line!r} is relative to the list's folder {root} but {how}: "
                                   f"write the file's absolute path to index a file elsewhere")
        ids.append(_relative_id(resolved, root))
    if not ids:
        raise ValueError(f"{source} lists no images")
    return root, ids


def walk_images(folder: PathLike, *, recursive: bool = True) -> Tuple[List[str], List[str]]:
    """``(ids, links)``: the image files under ``folder`` (relative POSIX paths, sorted; hidden entries
    skipped; symbolic links to folders not entered) and those of them that are symbolic links.

    One ``os.scandir`` per folder, no ``stat`` per file: the caller resolves only the links.
    """
    folder = Path(folder)
    found: List[str] = []
    links: List[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            listing = os.scandir(folder / prefix if prefix else folder)
        except OSError as err:
            if not prefix:
                raise
            log.warning("%s: cannot be listed (%s): its images are left out", folder / prefix, err.strerror or err)
            continue
        with listing as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                relative = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(relative + "/")
                elif is_image_file(entry.name) and not (entry.is_symlink() and entry.is_dir()):
                    found.append(relative)
                    if entry.is_symlink():
                        links.append(relative)
    return sorted(found), sorted(links)


def _relative_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()  # outside the root: keep the absolute path as the id


def pixel_limit() -> int:
    """The most pixels simret decodes or makes (by a crop): ``MAX_PIXELS``, or PIL's decompression-bomb
    limit ``Image.MAX_IMAGE_PIXELS`` when that is lower (89,478,485 unless changed)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(MAX_PIXELS, int(pil_limit)) if pil_limit else MAX_PIXELS


def load_image(path: PathLike) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, EXIF orientation applied, every mode converted by the rules
    of ``simret.data.pixels`` (16-bit and float grey scaled to their range, transparency on white).

    Raises:
        ImageReadError: missing, not an image, truncated/corrupt, absurdly large, or a mode that has no
            RGB conversion (with the reason).
    """
    from simret.data.pixels import to_rgb  # numpy: imported with the first image, not with this module

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found" if not path.exists() else "not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                if handle.width * handle.height > pixel_limit():
                    raise ImageReadError(path, f"too large ({handle.width}x{handle.height} pixels)")
                handle.load()
                return to_rgb(_apply_orientation(handle))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, "too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err).split("\n")[0] or type(err).__name__
        if "truncated" in reason.lower() or "broken data stream" in reason.lower():
            reason = f"truncated or corrupt ({reason})"
        raise ImageReadError(path, reason) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types on malformed files (struct.error, EOFError …)
        message = str(err).split("\n")[0]
        raise ImageReadError(path, f"unreadable ({type(err).__name__}{': ' + message if message else ''})") from None


_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}  # EXIF orientation → transpose (as ImageOps.exif_transpose)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """The pixels turned upright by the EXIF orientation tag. Unlike ``ImageOps.exif_transpose`` nothing of
    the EXIF block is rewritten, so a malformed block elsewhere never rejects a good picture; an unreadable
    or nonsensical orientation leaves the image as stored."""
    try:
        method = _ORIENTATION.get(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        method = None
    return image.transpose(method) if method is not None else image


def crop_box(image: Image.Image, box: Optional[Sequence[float]]) -> Image.Image:
    """Crop to ``(x1, y1, x2, y2)`` exactly as revisitop/cirtorch do (``PIL.Image.crop(bbx)``); None keeps all.

    Coordinates are rounded as PIL rounds them; a box reaching past the border is *not* clipped: the part
    outside the image is black, as in the protocol's own query crops (so descriptors match its numbers).
    The crop is a new picture of the box's size, so a box of more than ``pixel_limit()`` pixels (about
    89 million: the most simret decodes) is refused, whatever the image's size, rather than allocated.

    Raises:
        ValueError: the box is not 4 finite numbers, is empty, does not overlap the image, or is larger
            than ``pixel_limit()`` pixels.
    """
    if box is None:
        return image
    values = [float(v) for v in box]
    if len(values) != 4 or not all(abs(v) < float("inf") for v in values):  # NaN fails too
        raise ValueError(f"crop box {tuple(box)}: expected 4 finite numbers x1, y1, x2, y2")
    left, top, right, bottom = (int(round(v)) for v in values)
    if right <= left or bottom <= top:
        raise ValueError(f"empty crop box {tuple(box)} for an image of {image.width}x{image.height}")
    if right <= 0 or bottom <= 0 or left >= image.width or top >= image.height:
        raise ValueError(f"crop box {tuple(box)} lies outside the image of {image.width}x{image.height}")
    width, height = right - left, bottom - top
    if width * height > pixel_limit():
        raise ValueError(f"crop box {tuple(box)} would make a {width}x{height} picture from an image of "
                         f"{image.width}x{image.height}: more than the {pixel_limit():,} pixels simret "
                         f"handles (the part past the border is black): give a box within the image")
    with warnings.catch_warnings():  # within the limit: PIL's own bomb warning (crop) is not for us
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return image.crop((left, top, right, bottom))


def resize_long_side(image: Image.Image, max_size: Optional[int], *, upscale: bool = False) -> Image.Image:
    """Resize so the long side is ``max_size`` (aspect kept; smaller images kept unless ``upscale``)."""
    if not max_size:
        return image
    long_side = max(image.size)
    if long_side == max_size or (long_side < max_size and not upscale):
        return image
    ratio = max_size / long_side
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    return image.resize(size, Image.BICUBIC if ratio > 1 else Image.LANCZOS)


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]):
    """RGB PIL image → normalised float tensor ``(3, H, W)``."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
    tensor = torch.empty((3, *pixels.shape[:2]), dtype=torch.float32)
    tensor.copy_(pixels.permute(2, 0, 1))  # to float and to (3, H, W) in one pass
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.div_(255.0).sub_(mean_t).div_(std_t)  # the same float32 operations as (x / 255 - mean) / std


@dataclass(frozen=True)
class RetrievalTransform:
    """Retrieval preprocessing: optional box crop, long side to ``max_size``, normalise. Picklable."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    max_size: Optional[int] = 1024
    upscale: bool = False

    def __call__(self, image: Image.Image, box: Optional[Sequence[float]] = None):
        image = resize_long_side(crop_box(image, box), self.max_size, upscale=self.upscale)
        return to_tensor(image, self.mean, self.std)


def classification_transform(data_config: Dict[str, Any], *, train: bool = False, **overrides: Any) -> Callable:
    """timm's eval (resize + centre crop) or train (random resized crop, flips, …) transform for a config."""
    from timm.data import create_transform

    config = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
              if k in data_config}
    config.update(overrides)
    return create_transform(**config, is_training=train)


@dataclass
class Failed:
    """What a dataset item becomes when its image cannot be read."""

    index: int
    path: str
    reason: str


class ImageList:
    """A torch ``Dataset`` over image paths: item ``i`` → ``(tensor, i)`` or ``Failed(i, path, reason)``.

    A bad file never stops a DataLoader: it comes out as ``Failed`` and ``collate_skip_failed`` sets it
    aside. ``boxes`` (optional, one per image, None for whole images) crop before the transform.
    A relative id that resolves outside ``root`` (a symbolic link made or changed after the listing) is
    not read: it comes out as ``Failed`` too. Absolute ids are read where they point.
    """

    def __init__(self, root: PathLike, ids: Sequence[str], transform: Callable,
                 boxes: Optional[Sequence[Optional[Sequence[float]]]] = None) -> None:
        if boxes is not None and len(boxes) != len(ids):
            raise ValueError(f"{len(boxes)} boxes for {len(ids)} images")
        self.root = Path(root)
        self.ids = list(ids)
        self.transform = transform
        self.boxes = list(boxes) if boxes is not None else None
        self._real_root = os.path.realpath(self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, index: int) -> Path:
        image_id = self.ids[index]
        return Path(image_id) if os.path.isabs(image_id) else self.root / image_id

    def __getitem__(self, index: int):
        path = self.path(index)
        try:
            if not os.path.isabs(self.ids[index]):
                target = leaves_root(path, self._real_root)
                if target is not None:
                    raise ImageReadError(path, f"leads outside {self.root} (a symbolic link to {target}): not read")
            image = load_image(path)
            box = self.boxes[index] if self.boxes is not None else None
            if box is not None:
                return self.transform(image, box), index
            return self.transform(image), index
        except ImageReadError as err:
            return Failed(index, self.ids[index], err.reason)
        except ValueError as err:  # e.g. an empty crop box
            return Failed(index, self.ids[index], str(err))


def collate_skip_failed(items: List[Any]):
    """Collate ``(tensor, index)`` items of equal size; ``Failed`` ones go to the third element.

    Returns ``(images (B, 3, H, W) or None, indices (B,) int64, failures [Failed])``.
    """
    import torch

    good = [item for item in items if not isinstance(item, Failed)]
    failed = [item for item in items if isinstance(item, Failed)]
    if not good:
        return None, torch.zeros(0, dtype=torch.int64), failed
    images = torch.stack([tensor for tensor, _ in good])
    indices = torch.tensor([index for _, index in good], dtype=torch.int64)
    return images, indices, failed
