"""The restricted unpickler of ground-truth files: handcrafted pickle bombs (tiny files asking for huge
allocations, hash or repr blow-ups) are refused before anything large is allocated; real-looking ground
truth (protocols 2 and 4, Python 2 style) still loads."""
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from simret.data.revisited import (
    MAX_GND_BYTES,
    GroundTruthError,
    UnsafePickleError,
    restricted_loads,
    safe_load_gnd,
)

LIMIT = 16 * 2 ** 20  # no bomb may make the loader allocate more than this (the payloads ask for terabytes)
HUGE = 10 ** 12


# ------------------------------------------------------------------------------- opcode building blocks


def proto(n=2):
    return b"\x80" + bytes([n])


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def long1(value):
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) > 255:
        return b"\x8b" + struct.pack("<I", len(raw)) + raw  # LONG4
    return b"\x8a" + bytes([len(raw)]) + raw


def text(value):
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def raw_bytes(value):
    return b"C" + bytes([len(value)]) + value  # SHORT_BINBYTES (protocol 3+)


def py2_str(value):
    return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING: a Python 2 str


def tup(*parts):
    return b"(" + b"".join(parts) + b"t"


def call(function, *args):
    return function + tup(*args) + b"R"


MULTIARRAY = "numpy.core.multiarray"
NDARRAY = glob("numpy", "ndarray")


def dtype(code, py2=False):
    spec = py2_str(code.encode()) if py2 else text(code)
    state = tup(b"K\x03", py2_str(b"<") if py2 else text("<"), b"N", b"N", b"N", b"J\xff\xff\xff\xff",
                b"J\xff\xff\xff\xff", b"K\x00")
    return call(glob("numpy", "dtype"), spec, b"\x89", b"\x88") + state + b"b"


def array(shape_parts, code, data, py2=False):
    """numpy's own pickle of an array: _reconstruct(ndarray, (0,), b'b') then BUILD with its state."""
    empty = call(glob(MULTIARRAY, "_reconstruct"), NDARRAY, tup(b"K\x00"), py2_str(b"b"))
    payload = py2_str(data) if py2 and len(data) < 256 else raw_bytes(data)
    return empty + tup(b"K\x01", tup(*shape_parts), dtype(code, py2), b"\x89", payload) + b"b"


def shared_nesting(depth, leaf=b"K\x01"):
    """A list of two references to a list of two references … ``depth`` deep: 2**depth leaves, a few bytes."""
    out = leaf + b"q\x00"
    for level in range(depth):
        out += b"0](h" + bytes([level % 200]) + b"h" + bytes([level % 200]) + b"eq" + bytes([(level + 1) % 200])
    return out  # POP (0) keeps only the outermost list on the stack


def gnd_with(easy_payload):
    return (proto(2) + b"}(" + text("imlist") + b"]" + text("a") + b"a" + text("qimlist") + b"]" + text("q") + b"a"
            + text("gnd") + b"]}(" + text("easy") + easy_payload + text("hard") + b"]" + text("junk") + b"]"
            + text("bbx") + b"](K\x00K\x00K\x04K\x04e" + b"uau.")


def refused_small(payload, error=UnsafePickleError, match=None):
    """``restricted_loads(payload)`` raises ``error`` and allocates less than LIMIT on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as caught:
            restricted_loads(payload, "bomb.pkl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT, f"allocated {peak} bytes"
    return caught.value


# ------------------------------------------------------------------------------------------ the bombs


BOMBS = {
    "bytes(n)": call(glob("__builtin__", "bytes"), long1(HUGE)),
    "bytearray(n)": call(glob("builtins", "bytearray"), long1(HUGE)),
    "ndarray(shape)": call(NDARRAY, tup(long1(HUGE), long1(HUGE))),
    "reconstruct(huge shape)": call(glob(MULTIARRAY, "_reconstruct"), NDARRAY, tup(long1(HUGE)), py2_str(b"b")),
    "reconstruct(not ndarray)": call(glob(MULTIARRAY, "_reconstruct"), glob("numpy", "dtype"), tup(b"K\x00"),
                                     py2_str(b"b")),
    "array state larger than its data": array([long1(HUGE)], "f8", b""),
    "object dtype": dtype("O"),
    "void dtype": dtype("V999999"),
    "sub-array dtype": call(glob("numpy", "dtype"), text("(99999,99999)f8"), b"\x89", b"\x88"),
    "numpy.zeros": call(glob("numpy", "zeros"), tup(long1(HUGE))),
    "numpy.empty": call(glob("numpy.core.multiarray", "empty"), tup(long1(HUGE))),
    "scalar of the wrong size": call(glob(MULTIARRAY, "scalar"), dtype("f8"), raw_bytes(b"\x00")),
    "frombuffer of the wrong size": call(glob("numpy._core.numeric", "_frombuffer"), raw_bytes(b"\x00" * 8),
                                         dtype("f8"), tup(long1(HUGE)), text("C")),
    "str() of a shared nesting": call(glob("builtins", "str"), shared_nesting(60)),
    "list() of bytes": call(glob("builtins", "list"), raw_bytes(b"ab")),
    "tuple key hash": b"}" + shared_nesting(26).replace(b"](", b"(").replace(b"eq", b"tq") + b"K\x01s",
    "set of tuples": call(glob("builtins", "set"), b"]" + tup(b"K\x01") + b"a"),
    "BUILD on a list": b"]" + b"}b",
    "_codecs.encode of another codec": call(glob("_codecs", "encode"), text("x" * 10), text("zlib")),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_without_allocating(name):
    error = refused_small(proto(4 if "frombuffer" in name else 2) + BOMBS[name] + b".")
    assert "bomb.pkl" in str(error) and len(str(error)) < 400


def test_bombs_are_tiny():
    assert max(len(b) for name, b in BOMBS.items() if "shared" not in name and "hash" not in name) < 160


@pytest.mark.parametrize("payload", [
    proto(4) + b"N" + b"r\xff\xff\xff\x7f" + b".",  # LONG_BINPUT at memo index 2**31: the C unpickler's memo array
    proto(4) + b"\x8e" + struct.pack("<Q", 2 ** 60) + b"abc.",  # BINBYTES8 claiming an exabyte
    proto(4) + b"\x95" + struct.pack("<Q", 2 ** 60) + b"N.",  # a FRAME claiming an exabyte
    proto(4) + b"\x8d" + struct.pack("<Q", 2 ** 40) + b"abc.",  # BINUNICODE8 claiming a terabyte
])
def test_length_fields_do_not_allocate(payload):
    tracemalloc.start()
    try:
        try:
            result = restricted_loads(payload, "bomb.pkl")
        except Exception as err:  # noqa: BLE001 - truncated: any clean error is fine, MemoryError is not
            assert not isinstance(err, MemoryError)
            result = "error"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT and result in (None, "error")


def test_shared_nesting_in_the_ground_truth_is_not_expanded(tmp_path):
    path = tmp_path / "gnd_bomb.pkl"
    path.write_bytes(gnd_with(shared_nesting(40)))  # 2**40 leaves if turned into an array
    assert len(path.read_bytes()) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(GroundTruthError, match=r"query 0 \('q'\): 'easy' must be a 1-D list of integer") as caught:
            safe_load_gnd(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT and len(str(caught.value)) < 400


def test_huge_integer_index_is_reported_briefly(tmp_path):
    path = tmp_path / "gnd_int.pkl"
    path.write_bytes(gnd_with(b"]" + long1(10 ** 2000) + b"a"))
    with pytest.raises(GroundTruthError, match="integer image indices") as caught:
        safe_load_gnd(path)
    assert len(str(caught.value)) < 400


def test_file_size_cap_refuses_before_reading(tmp_path):
    path = tmp_path / "gnd_big.pkl"
    with open(path, "wb") as handle:
        handle.write(pickle.dumps({"imlist": []}, protocol=2))
        handle.truncate(MAX_GND_BYTES + 1)  # sparse: nothing written to disk
    tracemalloc.start()
    try:
        with pytest.raises(UnsafePickleError, match=r"more than the 67,108,864 .* not read"):
            safe_load_gnd(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT
    with pytest.raises(UnsafePickleError, match="more than"):
        restricted_loads(b"\x00" * (MAX_GND_BYTES + 1))


# ------------------------------------------------------------------------------- real ground truth loads


def real_looking():
    rng = np.random.default_rng(0)
    names = [f"all_souls_{i:06d}" for i in range(300)]
    gnd = []
    for _ in range(5):
        picks = rng.permutation(300)
        gnd.append({"easy": picks[:20].astype(np.int64), "hard": picks[20:30].astype(np.int32),
                    "junk": picks[30:40].tolist(), "bbx": [136.5, 34.1, 648.0, 955.2]})
    return {"imlist": names, "qimlist": [f"all_souls_{i:06d}" for i in range(5)], "gnd": gnd}


@pytest.mark.parametrize("protocol", [2, 4])
def test_real_looking_ground_truth_loads(tmp_path, protocol):
    data = real_looking()
    path = tmp_path / "gnd_real.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = safe_load_gnd(path)
    assert loaded["imlist"] == data["imlist"] and loaded["qimlist"] == data["qimlist"]
    for mine, theirs in zip(loaded["gnd"], data["gnd"]):
        assert mine["easy"].tolist() == list(theirs["easy"]) and mine["hard"].dtype == np.int64
        assert mine["junk"].tolist() == theirs["junk"] and mine["bbx"].tolist() == theirs["bbx"]


def test_python2_style_pickle_loads(tmp_path):
    """As Python 2 wrote them: str as SHORT_BINSTRING, __builtin__ and numpy.core module names, array data
    as a (latin-1) str, a float array with bytes above 127."""
    easy = np.array([2, 0, 1], dtype="<i8")
    box = np.array([1.5, 2.25, 30.0, 40.0], dtype="<f8")
    entry = (b"}(" + py2_str(b"easy") + array([b"K\x03"], "i8", easy.tobytes(), py2=True)
             + py2_str(b"hard") + b"]" + py2_str(b"junk") + b"]" + py2_str(b"bbx")
             + array([b"K\x04"], "f8", box.tobytes(), py2=True) + b"u")
    payload = (proto(2) + b"}(" + py2_str(b"imlist") + b"](" + py2_str(b"a") + py2_str(b"b") + py2_str(b"c") + b"e"
               + py2_str(b"qimlist") + b"]" + py2_str(b"q") + b"a" + py2_str(b"gnd") + b"]" + entry + b"a"
               + py2_str(b"extra") + call(glob("__builtin__", "set"), b"]" + py2_str(b"x") + b"a") + b"u.")
    reference = pickle.loads(payload, encoding="latin1")  # the file is a valid pickle …
    assert reference["gnd"][0]["bbx"].tolist() == box.tolist()
    assert any(byte > 127 for byte in box.tobytes())
    path = tmp_path / "gnd_py2.pkl"
    path.write_bytes(payload)
    loaded = safe_load_gnd(path)  # … and the restricted loader reads the same
    assert loaded["imlist"] == ["a", "b", "c"] and loaded["qimlist"] == ["q"]
    assert loaded["gnd"][0]["easy"].tolist() == [2, 0, 1] and loaded["gnd"][0]["bbx"].tolist() == box.tolist()
    assert restricted_loads(payload)["extra"] == {"x"}


def test_numpy_scalars_sets_complex_and_bytes_still_load():
    values = [np.int64(3), np.float32(0.5), np.uint8(7), {1, 2}, frozenset({"a"}), 1 + 2j, b"", b"abc",
              bytearray(b"xy"), np.arange(5, dtype=np.int16), np.zeros((2, 3), np.float32)]
    for protocol in (2, 3, 4, 5):
        loaded = restricted_loads(pickle.dumps(values, protocol=protocol))
        assert loaded[:9] == values[:9] and loaded[9].tolist() == [0, 1, 2, 3, 4]
        assert loaded[10].shape == (2, 3) and loaded[10].dtype == np.float32


def test_a_dtype_state_never_changes_numpy_shared_dtypes():
    payload = (proto(2) + call(glob("numpy", "dtype"), text("f8"), b"\x89", b"\x89")  # copy=False asked for
               + tup(b"K\x03", text(">"), b"N", b"N", b"N", b"J\xff\xff\xff\xff", b"J\xff\xff\xff\xff", b"K\x00")
               + b"b.")
    loaded = restricted_loads(payload)
    assert loaded.str == ">f8" and loaded is not np.dtype("f8")
    assert np.dtype("f8").str == "<f8" and np.arange(2.0).dtype.str == "<f8"
