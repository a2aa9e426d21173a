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

Ground-truth pickles are read with a restricted unpickler: lists, dicts, strings, numbers and numeric numpy
arrays only. Any other global a pickle asks for (``os.system``, ``builtins.eval`` …) is refused with
``UnsafePickleError`` naming it, before anything runs; so is a constructor that would allocate from an
integer (``bytes(n)``, ``bytearray(n)``, an array whose shape is larger than its data, an object array),
and a file larger than ``MAX_GND_BYTES`` (64 MiB; real ones are under 1 MB), so memory stays proportional
to the file. Image names must be relative paths without ``..``, and no image may be a symbolic link
leading outside ``jpg/`` (``OutsideRootError``, naming the ``imlist``/``qimlist`` entry or the list's line).
"""
from __future__ import annotations

import codecs
import importlib
import io
import math
import os
import pickle
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.data.paths import OutsideRootError, RootGuard, check_relative

PathLike = Union[str, "os.PathLike[str]"]
Box = Tuple[float, float, float, float]

DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"
IMAGE_EXTENSION = ".jpg"
DOWNLOAD_HINT = "download it from http://cmp.felk.cvut.cz/revisitop/ (revisitop's python/download.py)"
GND_KEYS = ("imlist", "qimlist", "gnd")
INDEX_KEYS = ("easy", "hard", "junk")


MAX_GND_BYTES = 64 * 1024 * 1024  # a ground-truth pickle larger than this is refused unread (real ones: < 1 MB)


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be used: not a pickle, wrong structure, indices out of range …"""


class UnsafePickleError(GroundTruthError, pickle.UnpicklingError):
    """A pickle that asked for something a ground-truth file does not hold (a global outside the allowed
    constructors, an allocation from an integer, an object array …), or one larger than ``MAX_GND_BYTES``."""


# ------------------------------------------------------------------------------- restricted unpickling
#
# What a ground-truth pickle may hold: lists, tuples, dicts, sets, str, bytes, int, float, bool, None,
# complex, and numeric numpy arrays, dtypes and scalars (bool, int, uint, float, complex: no object,
# string, structured or sub-array dtypes). Every constructor a pickle may call is wrapped so that it only
# turns bytes already in the file into an object: ``bytes(n)``, ``bytearray(n)``, ``numpy.ndarray(shape)``,
# ``_reconstruct`` with a non-empty shape, an array state whose data is shorter than its shape … are refused
# before anything is allocated, so memory stays proportional to the file's size (capped by MAX_GND_BYTES).
# Dict keys and set members must be strings or numbers (hashing a nested tuple can take exponential time).
# The pure-Python unpickler is used: its memo is a dict (the C one allocates an array up to the largest
# memo index a pickle names) and its BUILD step can be checked.

_NUMERIC_KINDS = "biufc"
_SCALAR_KEYS = (str, bytes, int, float, complex, type(None), np.number, np.bool_)


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may use it (calling it is refused)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("numpy.ndarray(...) (it allocates from its shape)")


_NDARRAY = _NdarrayType()


def _refuse(message: str) -> UnsafePickleError:
    return UnsafePickleError(f"refused {message}: ground-truth pickles hold only lists, dicts, strings, numbers and "
                             f"numeric numpy arrays")


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


def _numeric_dtype(dtype: Any) -> np.dtype:
    """``dtype`` if it is a plain numeric numpy dtype (bool, int, uint, float, complex), else refused."""
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"a numpy dtype given as {type(dtype).__name__}")
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
        raise _refuse(f"numpy dtype {str(dtype)[:40]!r} (only numeric arrays)")
    return dtype


def _shape(shape: Any) -> Tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(
            type(n) is int and n >= 0 for n in shape):  # noqa: E721 - exactly int: no bool, no big objects
        raise _refuse("an array shape that is not a tuple of non-negative integers")
    return shape


def _safe_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype(spec, align, copy=True)`` for a short type code (``'i8'``, ``'<f4'``) of a numeric dtype.

    Always a copy: the BUILD that follows sets its state, which must never change numpy's shared dtypes.
    """
    if not isinstance(spec, (str, bytes)) or len(spec) > 8:
        raise _refuse(f"numpy.dtype({type(spec).__name__}) (only short numeric type codes)")
    try:
        dtype = np.dtype(spec, align=bool(align), copy=True)
    except (TypeError, ValueError) as err:
        raise _refuse(f"numpy dtype {spec!r} ({err})") from None
    return _numeric_dtype(dtype)


def _safe_reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills (checked)."""
    if subtype is not _NDARRAY:
        raise _refuse(f"_reconstruct of {type(subtype).__name__} (only numpy.ndarray)")
    if math.prod(_shape(shape)) != 0:
        raise _refuse(f"_reconstruct with shape {shape} (numpy pickles an empty array, filled afterwards)")
    reconstruct = _numpy_internal("numpy.core.multiarray", "_reconstruct")()
    return reconstruct(np.ndarray, shape, _safe_dtype(code))


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's ``scalar(dtype, bytes)`` for a numeric dtype and exactly ``itemsize`` bytes."""
    dtype = _numeric_dtype(dtype)
    if isinstance(data, str):  # a Python 2 pickle: bytes as latin-1 text
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _refuse(f"a numpy scalar of {dtype} from {type(data).__name__} data of the wrong size")
    return _numpy_internal("numpy.core.multiarray", "scalar")()(dtype, data)


def _safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """numpy's ``_frombuffer`` (protocol 5): an array over bytes of exactly the shape's size."""
    dtype = _numeric_dtype(dtype)
    if not isinstance(buffer, (bytes, bytearray)) or math.prod(_shape(shape)) * dtype.itemsize != len(buffer):
        raise _refuse(f"numpy _frombuffer with {type(buffer).__name__} data that does not match shape {shape}")
    if order not in ("C", "F", "A"):
        raise _refuse(f"numpy _frombuffer with order {order!r}")
    return _numpy_internal("numpy.core.numeric", "_frombuffer")()(buffer, dtype, shape, order)


def _check_array_state(state: Any) -> None:
    """An ndarray's ``__setstate__`` argument: ``(version, shape, dtype, fortran, data)`` whose data holds
    exactly ``prod(shape) · itemsize`` bytes of a numeric dtype (nothing allocated from the shape alone)."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _refuse("an array state that is not numpy's (version, shape, dtype, order, data)")
    shape, dtype, _, data = state[-4:]
    dtype = _numeric_dtype(dtype)
    if not isinstance(data, (bytes, bytearray, str)):  # str: a Python 2 pickle, bytes as latin-1 text
        raise _refuse(f"array data given as {type(data).__name__}")
    if math.prod(_shape(shape)) * dtype.itemsize != len(data):
        raise _refuse(f"an array of shape {shape} and {dtype} over {len(data)} bytes of data")


def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only, nothing else)."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "l1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r} (only latin-1 is allowed)")
    if not isinstance(text, str):
        raise _refuse(f"_codecs.encode of {type(text).__name__}")
    return codecs.encode(text, "latin-1", "strict")


def _from_bytes(kind: type) -> Callable[..., Any]:
    """``bytes()`` / ``bytearray()`` of bytes already in the pickle: ``bytes(n)`` would allocate n bytes."""

    def build(*args: Any) -> Any:
        if not args:
            return kind()
        if isinstance(args[0], str) and len(args) == 2:  # bytearray(text, 'latin-1') in old pickles
            return kind(_latin1_encode(args[0], args[1]))
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(args[0])
        raise _refuse(f"{kind.__name__}({', '.join(type(a).__name__ for a in args)}) (only from bytes: "
                      f"{kind.__name__}(n) would allocate n bytes)")

    return build


def _collection(kind: type) -> Callable[..., Any]:
    """``set()`` / ``frozenset()`` of a list, tuple or set in the pickle (members strings or numbers)."""

    def build(*args: Any) -> Any:
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (list, tuple, set, frozenset)):
            _check_keys(args[0], f"{kind.__name__} member")
            return kind(args[0])
        raise _refuse(f"{kind.__name__}({', '.join(type(a).__name__ for a in args)})")

    return build


def _safe_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise _refuse("complex() of anything but two numbers")
    return complex(real, imag)


def _check_keys(items: Any, what: str) -> None:
    for item in items:
        if not isinstance(item, _SCALAR_KEYS):
            raise _refuse(f"a {what} of type {type(item).__name__} (only strings and numbers)")


ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: _NDARRAY,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED_GLOBALS[(_module, "_reconstruct")] = lambda: _safe_reconstruct
    ALLOWED_GLOBALS[(_module, "scalar")] = lambda: _safe_scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    ALLOWED_GLOBALS[(_module, "_frombuffer")] = lambda: _safe_frombuffer
for _module in ("builtins", "__builtin__"):
    ALLOWED_GLOBALS[(_module, "bytes")] = lambda: _from_bytes(bytes)
    ALLOWED_GLOBALS[(_module, "bytearray")] = lambda: _from_bytes(bytearray)
    ALLOWED_GLOBALS[(_module, "set")] = lambda: _collection(set)
    ALLOWED_GLOBALS[(_module, "frozenset")] = lambda: _collection(frozenset)
    ALLOWED_GLOBALS[(_module, "complex")] = lambda: _safe_complex


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc] - the pure-Python one
    """Unpickles what a ground-truth file holds (see the section comment above); refuses the rest."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

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

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is np.ndarray:
            _check_array_state(state)
        elif not isinstance(inst, np.dtype):
            raise _refuse(f"to set the state of a {type(inst).__name__}")
        super().load_build()
        if isinstance(inst, np.dtype):
            _numeric_dtype(inst)

    def load_dict(self) -> None:
        _check_keys(self.stack[0::2], "dict key")
        super().load_dict()

    def load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1], "dict key")
        super().load_setitem()

    def load_setitems(self) -> None:
        _check_keys(self.stack[0::2], "dict key")
        super().load_setitems()

    def load_additems(self) -> None:
        _check_keys(self.stack, "set member")
        super().load_additems()

    def load_frozenset(self) -> None:
        _check_keys(self.stack, "set member")
        super().load_frozenset()

    for _opcode, _method in ((pickle.BUILD, load_build), (pickle.DICT, load_dict), (pickle.SETITEM, load_setitem),
                             (pickle.SETITEMS, load_setitems), (pickle.ADDITEMS, load_additems),
                             (pickle.FROZENSET, load_frozenset)):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """``pickle.loads`` limited to what ground-truth files hold (see ``ALLOWED_GLOBALS`` and the rules
    above); memory stays proportional to ``len(data)``, at most ``MAX_GND_BYTES``.

    Raises:
        UnsafePickleError: anything else asked for, or ``data`` larger than ``MAX_GND_BYTES``.
    """
    if len(data) > MAX_GND_BYTES:
        raise UnsafePickleError(f"{source}: {len(data):,} bytes is more than the {MAX_GND_BYTES:,} a ground-truth "
                                f"pickle may have (real ones are under 1 MB)")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as err:
        message = str(err)
        raise UnsafePickleError(message if message.startswith(source) else f"{source}: {message}") from None


# --------------------------------------------------------------------------------- ground-truth files


def safe_load_gnd(path: PathLike) -> Dict[str, Any]:
    """Read and check a Revisited ground-truth pickle (``gnd_<name>.pkl``).

    Returns:
        ``{"imlist": [str], "qimlist": [str], "gnd": [{"easy", "hard", "junk": int64 (n,) arrays of
        indices into imlist, "bbx": float64 (4,) array x1, y1, x2, y2}]}``.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle asks for anything but what ground truth holds (nothing is run, nothing
            large allocated), or the file is larger than ``MAX_GND_BYTES`` (it is not read).
        GroundTruthError: not a readable pickle, or a structure other than the Revisited one (the message
            names the file, the query and the field), or an image name that is absolute or holds ``..``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    size = path.stat().st_size
    if size > MAX_GND_BYTES:
        raise UnsafePickleError(f"{path}: {size:,} bytes is more than the {MAX_GND_BYTES:,} a ground-truth pickle "
                                f"may have (real ones are under 1 MB): not read")
    with open(path, "rb") as handle:
        data = handle.read(size + 1)  # a file grown since the stat is refused by restricted_loads
    try:
        loaded = restricted_loads(data, str(path))
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, not a pickle at all …
        raise GroundTruthError(f"{path}: not a readable ground-truth pickle ({type(err).__name__}: "
                               f"{_short(str(err))})") from None
    return validate_gnd(loaded, str(path))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def _short(value: Any) -> str:
    """A short repr of a value read from a file (bounded however large or deeply shared it is)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a huge int inside a list, a broken object …
        return f"a {type(value).__name__}"


def validate_gnd(data: Any, source: str = "ground truth") -> Dict[str, Any]:
    """Check the Revisited structure and normalise it (plain lists of str, int64/float64 numpy arrays).

    Only flat lists are converted to arrays (a nested list of shared references could stand for billions
    of elements), and the messages show bounded excerpts of what was found.
    """
    if not isinstance(data, dict):
        raise GroundTruthError(f"{source}: expected a dict with keys {', '.join(GND_KEYS)}, got {type(data).__name__}")
    missing = [key for key in GND_KEYS if key not in data]
    if missing:
        present = ", ".join(_short(key) for key in list(data)[:10])
        raise GroundTruthError(f"{source}: missing key(s) {', '.join(missing)} (has: {present})")
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
    if not isinstance(value, (list, tuple)):
        raise GroundTruthError(f"{source}: {key!r} must be a list of image names, got {type(value).__name__}")
    names = []
    for i, name in enumerate(value):
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        where = f"{source}: {key}[{i}]" + (f" (query {i})" if key == "qimlist" else "")
        if not isinstance(name, str) or not name:
            raise GroundTruthError(f"{where} must be a non-empty image name, got {_short(name)}")
        try:
            check_relative(name, where, "the jpg/ folder")
        except OutsideRootError as err:
            raise GroundTruthError(str(err)) from None
        names.append(name)
    return names


def _query_gnd(entry: Any, n_images: int, where: str) -> Dict[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise GroundTruthError(f"{where}: expected a dict with {', '.join(INDEX_KEYS)} and bbx, "
                               f"got {type(entry).__name__}")
    missing = [key for key in INDEX_KEYS + ("bbx",) if key not in entry]
    if missing:
        raise GroundTruthError(f"{where}: missing {', '.join(missing)}")
    out: Dict[str, np.ndarray] = {key: _indices(entry[key], n_images, f"{where}: {key!r}") for key in INDEX_KEYS}
    out["bbx"] = _box(entry["bbx"], where)
    return out


def _flat_numbers(value: Any) -> Optional[np.ndarray]:
    """A 1-D numeric array or a flat list/tuple of numbers (no bool) as a float64/int64 array, else None."""
    if isinstance(value, np.ndarray):
        return value if value.ndim == 1 and value.dtype.kind in "iuf" else None
    if not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               for v in value):
        return None
    if any(isinstance(v, int) and not -2 ** 62 < v < 2 ** 62 for v in value):
        return None
    floats = any(isinstance(v, (float, np.floating)) for v in value)
    return np.asarray(value, dtype=np.float64 if floats else np.int64).reshape(len(value))


def _indices(value: Any, n_images: int, where: str) -> np.ndarray:
    if (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 0) or (
            isinstance(value, np.ndarray) and value.size == 0):
        return np.zeros(0, dtype=np.int64)
    array = _flat_numbers(value)
    if array is None or (array.dtype.kind == "f" and not (np.all(np.isfinite(array))
                                                          and np.all(array == np.round(array)))):
        raise GroundTruthError(f"{where} must be a 1-D list of integer image indices, got {_short(value)}")
    bad = array[(array < 0) | (array >= n_images)]
    if bad.size:
        raise GroundTruthError(f"{where} index {_short(bad[0].item())} is outside imlist ({n_images} images)")
    return array.astype(np.int64)


def _box(value: Any, where: str) -> np.ndarray:
    box = _flat_numbers(value)
    if box is None or box.shape != (4,):
        raise GroundTruthError(f"{where}: 'bbx' must be 4 finite numbers x1, y1, x2 > x1, y2 > y1, got {_short(value)}")
    box = box.astype(np.float64)
    if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise GroundTruthError(f"{where}: 'bbx' must be 4 finite numbers x1, y1, x2 > x1, y2 > y1, "
                               f"got {box.tolist()!r}")
    return box


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
        OutsideRootError: an image is a symbolic link leading outside ``jpg/`` (the message names the
            ``imlist``/``qimlist`` entry).
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
    _refuse_links_outside(dataset)
    if check_images:
        missing = dataset.missing_images()
        if missing:
            shown = ", ".join(str(path) for path in missing[:3])
            raise FileNotFoundError(f"dataset {name!r}: {len(missing)} of {dataset.n_images + dataset.n_queries} "
                                    f"images listed in {dataset.gnd_path} are missing, e.g. {shown}")
    return dataset


def _refuse_links_outside(dataset: RevisitedDataset) -> None:
    """No database or query image may be a symbolic link leading outside ``jpg/`` (one folder read)."""
    guard = RootGuard(dataset.image_dir)
    for key, ids in (("imlist", dataset.image_ids), ("qimlist", dataset.query_ids)):
        for i, image_id in enumerate(ids):
            query = f" (query {i})" if key == "qimlist" else ""
            guard.refuse(image_id, f"{dataset.gnd_path}: {key}[{i}]{query}")


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
        ValueError: no paths at all.
        OutsideRootError: an absolute path or one leaving the folder (``..``), naming ``file:line``.
    """
    return [entry for _, entry in _list_entries(Path(path))]


def _list_entries(path: Path) -> List[Tuple[int, str]]:
    """``(line number, path)`` of every non-blank line of a distractor list (see ``read_image_list``)."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if entry:
            entries.append((number, check_relative(entry, f"{path}:{number}", "the jpg/ folder")))
    if not entries:
        raise ValueError(f"{path} lists no images")
    return entries


def load_distractors(data_root: PathLike, name: str = DISTRACTORS, *, check_images: bool = False) -> DistractorSet:
    """Load ``DATA_ROOT/revisitop1m/{revisitop1m.txt, jpg/}``: ids relative to ``jpg/``, in list order.

    ``check_images=False`` (default) only checks that the first listed image exists (a wrong root shows at
    once; a million ``stat`` calls do not run); ``True`` checks them all and names the missing ones. Either
    way no listed path may lead outside ``jpg/`` (``..``, absolute, or a symbolic link leading outside:
    found by reading each listed folder once, see ``RootGuard``).

    Raises:
        FileNotFoundError: the folder, the list file, ``jpg/`` or (checked) images are missing.
        ValueError: the list file is empty.
        OutsideRootError: a listed path leads outside ``jpg/`` (the message names ``file:line``).
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
    entries = _list_entries(folder / relative.name)
    distractors = DistractorSet(name, folder, [image_id for _, image_id in entries])
    guard = RootGuard(distractors.image_dir)
    for number, image_id in entries:
        guard.refuse(image_id, f"{distractors.list_path}:{number}")
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
