"""Revisited Oxford and Paris (ROxford5k, RParis6k) and the R1M distractors, in their standard layout.

The layout is the one revisitop's ``download.py`` creates (http://cmp.felk.cvut.cz/revisitop/)::

    DATA_ROOT/roxford5k/gnd_roxford5k.pkl    imlist, qimlist and gnd (per query: easy, hard, junk, bbx)
    DATA_ROOT/roxford5k/jpg/<id>.jpg         4,993 database images + the 70 query images
    DATA_ROOT/rparis6k/gnd_rparis6k.pkl      6,322 database images, 70 queries
    DATA_ROOT/rparis6k/jpg/<id>.jpg
    DATA_ROOT/revisitop1m/revisitop1m.txt    one image path per line, relative to jpg/ (extension included)
    DATA_ROOT/revisitop1m/jpg/...            1,001,001 distractor images

``gnd[q]`` holds 0-based indices into ``imlist`` (``easy``, ``hard``, ``junk``) and the query's box
``bbx = (x1, y1, x2, y2)`` in pixels of the query image: the protocol crops each query to its box before
anything else (resizing, feature extraction), which ``query_boxes``/``query_images`` do.

Ground-truth pickles are read with a restricted unpickler: lists, dicts, strings, numbers and numpy arrays
only. Any other global a pickle asks for (``os.system``, ``builtins.eval`` …) is refused with
``UnsafePickleError`` naming it, before anything runs.
"""
from __future__ import annotations

import builtins
import codecs
import importlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
Box = Tuple[float, float, float, float]

DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"
IMAGE_EXTENSION = ".jpg"
DOWNLOAD_HINT = "download it from http://cmp.felk.cvut.cz/revisitop/ (revisitop's python/download.py)"
GND_KEYS = ("imlist", "qimlist", "gnd")
INDEX_KEYS = ("easy", "hard", "junk")


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be used: not a pickle, wrong structure, indices out of range …"""


class UnsafePickleError(GroundTruthError, pickle.UnpicklingError):
    """A pickle that asked for a global outside builtin containers/scalars and numpy arrays."""


# ------------------------------------------------------------------------------- restricted unpickling


def _numpy_internal(module: str, name: str) -> Callable[[], Any]:
    """Resolve ``numpy.core.X.name`` / ``numpy._core.X.name`` (numpy 1.x and 2.x spellings) without the
    deprecated ``numpy.core`` shim when numpy 2 is installed."""

    def resolve() -> Any:
        suffix = module.split(".", 2)[2]  # multiarray / numeric
        for candidate in (f"numpy._core.{suffix}", f"numpy.core.{suffix}"):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise UnsafePickleError(f"numpy has no {module}.{name}")  # pragma: no cover

    return resolve


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only, nothing else)."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "l1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r} (only latin-1 is allowed)")
    return codecs.encode(text, "latin-1", "strict")


_BUILTINS = ("set", "frozenset", "complex", "bytearray", "bytes", "list", "dict", "tuple", "int", "float", "str",
             "bool")
ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    for _name in ("_reconstruct", "scalar"):
        ALLOWED_GLOBALS[(_module, _name)] = _numpy_internal(_module, _name)
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    ALLOWED_GLOBALS[(_module, "_frombuffer")] = _numpy_internal(_module, "_frombuffer")
for _module in ("builtins", "__builtin__"):
    for _name in _BUILTINS:
        ALLOWED_GLOBALS[(_module, _name)] = lambda n=_name: getattr(builtins, n)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings, numbers and numpy arrays/dtypes/scalars; refuses the rest."""

    def __init__(self, handle: Any, source: str) -> None:
        super().__init__(handle, encoding="latin1")  # latin1: numpy arrays pickled under Python 2 load too
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolver = ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load '{module}.{name}': ground-truth pickles may only hold lists, "
                "dicts, strings, numbers and numpy arrays (is this file from the Revisited benchmark?)")
        return resolver()


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """``pickle.loads`` limited to builtin containers/scalars and numpy arrays (see ``ALLOWED_GLOBALS``)."""
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


# --------------------------------------------------------------------------------- ground-truth files


def safe_load_gnd(path: PathLike) -> Dict[str, Any]:
    """Read and check a Revisited ground-truth pickle (``gnd_<name>.pkl``).

    Returns:
        ``{"imlist": [str], "qimlist": [str], "gnd": [{"easy", "hard", "junk": int64 (n,) arrays of
        indices into imlist, "bbx": float64 (4,) array x1, y1, x2, y2}]}``.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle asks for anything but builtins and numpy arrays (nothing is run).
        GroundTruthError: not a readable pickle, or a structure other than the Revisited one (the message
            names the file, the query and the field).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    data = path.read_bytes()
    try:
        loaded = restricted_loads(data, str(path))
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated, corrupt, not a pickle at all …
        raise GroundTruthError(f"{path}: not a readable ground-truth pickle ({type(err).__name__}: {err})") from None
    return validate_gnd(loaded, str(path))


def validate_gnd(data: Any, source: str = "ground truth") -> Dict[str, Any]:
    """Check the Revisited structure and normalise it (plain lists of str, int64/float64 numpy arrays)."""
    if not isinstance(data, dict):
        raise GroundTruthError(f"{source}: expected a dict with keys {', '.join(GND_KEYS)}, got {type(data).__name__}")
    missing = [key for key in GND_KEYS if key not in data]
    if missing:
        raise GroundTruthError(f"{source}: missing key(s) {', '.join(missing)} (has: {', '.join(map(str, data))})")
    imlist = _names(data["imlist"], source, "imlist")
    qimlist = _names(data["qimlist"], source, "qimlist")
    if not imlist:
        raise GroundTruthError(f"{source}: imlist is empty")
    entries = data["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise GroundTruthError(f"{source}: 'gnd' must be a list (one dict per query), got {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise GroundTruthError(f"{source}: 'gnd' has {len(entries)} entries for {len(qimlist)} queries in qimlist")
    gnd = [_query_gnd(entry, len(imlist), f"{source}: query {q} ({qimlist[q]!r})")
           for q, entry in enumerate(entries)]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _names(value: Any, source: str, key: str) -> List[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GroundTruthError(f"{source}: {key!r} must be a list of image names, got {type(value).__name__}")
    names = []
    for i, name in enumerate(value):
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not isinstance(name, str) or not name:
            raise GroundTruthError(f"{source}: {key}[{i}] must be a non-empty image name, got {name!r}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise GroundTruthError(f"{source}: {key}[{i}] = {name!r} must be relative to the jpg/ folder")
        names.append(name)
    return names


def _query_gnd(entry: Any, n_images: int, where: str) -> Dict[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise GroundTruthError(f"{where}: expected a dict with {', '.join(INDEX_KEYS)} and bbx, got {type(entry).__name__}")
    missing = [key for key in INDEX_KEYS + ("bbx",) if key not in entry]
    if missing:
        raise GroundTruthError(f"{where}: missing {', '.join(missing)}")
    out: Dict[str, np.ndarray] = {}
    for key in INDEX_KEYS:
        array = np.asarray(entry[key])
        if array.size == 0:
            out[key] = np.zeros(0, dtype=np.int64)
            continue
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer)
                                   or (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))):
            raise GroundTruthError(f"{where}: {key!r} must be a 1-D list of integer image indices, "
                                   f"got {array.dtype} with shape {array.shape}")
        indices = array.astype(np.int64)
        bad = indices[(indices < 0) | (indices >= n_images)]
        if bad.size:
            raise GroundTruthError(f"{where}: {key!r} index {int(bad[0])} is outside imlist ({n_images} images)")
        out[key] = indices
    try:
        box = np.asarray(entry["bbx"], dtype=np.float64)
    except (TypeError, ValueError):
        raise GroundTruthError(f"{where}: 'bbx' must be 4 numbers x1, y1, x2, y2, got {entry['bbx']!r}") from None
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise GroundTruthError(f"{where}: 'bbx' must be 4 finite numbers x1, y1, x2 > x1, y2 > y1, "
                               f"got {np.asarray(entry['bbx']).tolist()!r}")
    out["bbx"] = box
    return out


# ---------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True, repr=False, eq=False)
class RevisitedDataset:
    """A Revisited benchmark on disk: database ``imlist``, queries ``qimlist`` and their ``gnd``.

    Image ids are ``<name>.jpg`` relative to ``image_dir``; ``query_boxes[q]`` is query q's ``bbx``.
    """

    name: str
    root: Path
    imlist: List[str]
    qimlist: List[str]
    gnd: List[Dict[str, np.ndarray]]
    ext: str = IMAGE_EXTENSION

    def __repr__(self) -> str:
        return (f"RevisitedDataset({self.name!r}, root={str(self.root)!r}, images={len(self.imlist)}, "
                f"queries={len(self.qimlist)})")

    @property
    def gnd_path(self) -> Path:
        return self.root / f"gnd_{self.name}.pkl"

    @property
    def image_dir(self) -> Path:
        return self.root / "jpg"

    @property
    def n_images(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    @property
    def image_ids(self) -> List[str]:
        """Database image files relative to ``image_dir`` (``<id>.jpg``), in ``imlist`` order."""
        return [name + self.ext for name in self.imlist]

    @property
    def query_ids(self) -> List[str]:
        return [name + self.ext for name in self.qimlist]

    def image_path(self, index: int) -> Path:
        return self.image_dir / (self.imlist[index] + self.ext)

    def query_path(self, index: int) -> Path:
        return self.image_dir / (self.qimlist[index] + self.ext)

    @property
    def query_boxes(self) -> List[Box]:
        """Each query's ``(x1, y1, x2, y2)`` crop in pixels (the protocol crops before resizing)."""
        return [tuple(float(v) for v in entry["bbx"]) for entry in self.gnd]  # type: ignore[misc]

    def load_query(self, index: int):
        """Query ``index`` as an RGB PIL image cropped to its box."""
        from simret.data.images import crop_box, load_image

        return crop_box(load_image(self.query_path(index)), self.query_boxes[index])

    def database_images(self, transform: Callable):
        """An ``ImageList`` over the database images (items ``(tensor, index)`` or ``Failed``)."""
        from simret.data.images import ImageList

        return ImageList(self.image_dir, self.image_ids, transform)

    def query_images(self, transform: Callable):
        """An ``ImageList`` over the queries, each cropped to its box before ``transform`` resizes it.

        ``transform(image, box)`` must crop first, as ``simret.data.images.RetrievalTransform`` does.
        """
        from simret.data.images import ImageList

        return ImageList(self.image_dir, self.query_ids, transform, boxes=self.query_boxes)

    def missing_images(self) -> List[Path]:
        """Database and query files that do not exist."""
        return [path for path in (self.image_dir / name for name in self.image_ids + self.query_ids)
                if not path.is_file()]


def _dataset_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"invalid dataset name {name!r} (expected e.g. {', '.join(DATASETS)})")
    return name.lower() if name.lower() in DATASETS + (DISTRACTORS,) else name  # ROxford5k → roxford5k


def _data_root(data_root: PathLike, expected: Path) -> Path:
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (expected {root / expected})")
    return root


def load_revisited(data_root: PathLike, name: str, *, check_images: bool = True) -> RevisitedDataset:
    """Load ``DATA_ROOT/<name>/gnd_<name>.pkl`` (``roxford5k``, ``rparis6k``, or any folder in that layout).

    Args:
        data_root: the folder holding ``roxford5k/``, ``rparis6k/``, ``revisitop1m/``.
        name: the dataset folder's name.
        check_images: check that every database and query image exists under ``jpg/`` (a few thousand
            ``stat`` calls) and name the missing ones.

    Raises:
        FileNotFoundError: the root, the dataset folder, its ground truth, ``jpg/`` or listed images are
            missing (the message gives the expected path).
        GroundTruthError / UnsafePickleError: the ground truth is malformed or not a safe pickle.
    """
    name = _dataset_name(name)
    relative = Path(name) / f"gnd_{name}.pkl"
    root = _data_root(data_root, relative)
    folder = root / name
    hint = f"; {DOWNLOAD_HINT}" if name in DATASETS else ""
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {name!r} not found: no folder {folder} (expected {folder / relative.name} "
                                f"and {folder / 'jpg'}/){hint}")
    if not (folder / relative.name).is_file():
        raise FileNotFoundError(f"dataset {name!r}: ground truth {folder / relative.name} is missing{hint}")
    if not (folder / "jpg").is_dir():
        raise FileNotFoundError(f"dataset {name!r}: image folder {folder / 'jpg'} is missing{hint}")
    data = safe_load_gnd(folder / relative.name)
    dataset = RevisitedDataset(name, folder, data["imlist"], data["qimlist"], data["gnd"])
    if check_images:
        missing = dataset.missing_images()
        if missing:
            shown = ", ".join(str(path) for path in missing[:3])
            raise FileNotFoundError(f"dataset {name!r}: {len(missing)} of {dataset.n_images + dataset.n_queries} "
                                    f"images listed in {dataset.gnd_path} are missing, e.g. {shown}")
    return dataset


# ------------------------------------------------------------------------------------- distractors


@dataclass(frozen=True, repr=False, eq=False)
class DistractorSet:
    """The R1M distractors (or any list-file + ``jpg/`` folder): ``ids`` relative to ``image_dir``."""

    name: str
    root: Path
    ids: List[str]

    def __repr__(self) -> str:
        return f"DistractorSet({self.name!r}, root={str(self.root)!r}, images={len(self.ids)})"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def list_path(self) -> Path:
        return self.root / f"{self.name}.txt"

    @property
    def image_dir(self) -> Path:
        return self.root / "jpg"

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.ids[index]

    def images(self, transform: Callable):
        """An ``ImageList`` over the distractors (unreadable files come out as ``Failed``)."""
        from simret.data.images import ImageList

        return ImageList(self.image_dir, self.ids, transform)


def read_image_list(path: PathLike) -> List[str]:
    """Image paths of a list file, one per line, relative to its ``jpg/`` folder (blank lines skipped).

    Raises:
        ValueError: an absolute path or one leaving the folder (``..``), or no paths at all.
    """
    path = Path(path)
    ids = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        if entry.startswith("/") or ".." in Path(entry).parts:
            raise ValueError(f"{path}:{number}: {entry!r} must be a path relative to the jpg/ folder")
        ids.append(entry)
    if not ids:
        raise ValueError(f"{path} lists no images")
    return ids


def load_distractors(data_root: PathLike, name: str = DISTRACTORS, *, check_images: bool = False) -> DistractorSet:
    """Load ``DATA_ROOT/revisitop1m/{revisitop1m.txt, jpg/}``: ids relative to ``jpg/``, in list order.

    ``check_images=False`` (default) only checks that the first listed image exists (a wrong root shows at
    once; a million ``stat`` calls do not run); ``True`` checks them all and names the missing ones.

    Raises:
        FileNotFoundError: the folder, the list file, ``jpg/`` or (checked) images are missing.
        ValueError: the list file is empty or holds paths outside ``jpg/``.
    """
    name = _dataset_name(name)
    relative = Path(name) / f"{name}.txt"
    root = _data_root(data_root, relative)
    folder = root / name
    hint = f"; {DOWNLOAD_HINT}" if name == DISTRACTORS else ""
    if not folder.is_dir():
        raise FileNotFoundError(f"distractors {name!r} not found: no folder {folder} (expected "
                                f"{folder / relative.name} and {folder / 'jpg'}/){hint}")
    if not (folder / relative.name).is_file():
        raise FileNotFoundError(f"distractors {name!r}: image list {folder / relative.name} is missing{hint}")
    if not (folder / "jpg").is_dir():
        raise FileNotFoundError(f"distractors {name!r}: image folder {folder / 'jpg'} is missing{hint}")
    distractors = DistractorSet(name, folder, read_image_list(folder / relative.name))
    to_check = range(len(distractors)) if check_images else range(1)
    missing = [distractors.image_path(i) for i in to_check if not distractors.image_path(i).is_file()]
    if missing:
        shown = ", ".join(str(path) for path in missing[:3])
        raise FileNotFoundError(f"distractors {name!r}: {len(missing)} image(s) listed in {distractors.list_path} "
                                f"are missing, e.g. {shown}")
    return distractors


def revisited_paths(data_root: PathLike, names: Sequence[str] = DATASETS) -> Dict[str, Optional[Path]]:
    """Which of ``names`` (and ``revisitop1m``) exist under ``data_root``: name → folder or None."""
    root = Path(data_root).expanduser()
    found: Dict[str, Optional[Path]] = {}
    for name in list(names) + [DISTRACTORS]:
        marker = root / name / (f"{name}.txt" if name == DISTRACTORS else f"gnd_{name}.pkl")
        found[name] = marker.parent if marker.is_file() else None
    return found
