"""Revisited datasets on disk: layout, safe ground-truth loading, query crops, clear errors."""
import os
import pickle
import warnings

import numpy as np
import pytest

from simret.data.revisited import (
    GroundTruthError,
    UnsafePickleError,
    load_distractors,
    load_revisited,
    restricted_loads,
    revisited_paths,
    safe_load_gnd,
)
from simret.data.samples import write_revisited_sample
from simret.retrieval.metrics import evaluate_revisited


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisited")
    write_revisited_sample(root, landmarks=["chelsea", "rocket", "coffee"], image_size=64, extra_distractors=5)
    return root


def test_load_sample_in_the_standard_layout(sample_root):
    dataset = load_revisited(sample_root, "rsample")
    with open(sample_root / "rsample" / "gnd_rsample.pkl", "rb") as handle:
        raw = pickle.load(handle)  # our own test file: plain pickle is fine here
    assert dataset.name == "rsample" and dataset.root == sample_root / "rsample"
    assert dataset.imlist == raw["imlist"] and dataset.qimlist == raw["qimlist"]
    assert dataset.n_queries == 6 and dataset.n_images == len(raw["imlist"])
    for entry, original in zip(dataset.gnd, raw["gnd"]):
        for key in ("easy", "hard", "junk"):
            assert entry[key].dtype == np.int64 and entry[key].tolist() == list(original[key])
        assert entry["bbx"].dtype == np.float64 and entry["bbx"].shape == (4,)
    assert dataset.image_path(0) == sample_root / "rsample" / "jpg" / (raw["imlist"][0] + ".jpg")
    assert dataset.query_path(1).is_file() and dataset.image_ids[2] == raw["imlist"][2] + ".jpg"
    assert dataset.query_boxes[3] == tuple(raw["gnd"][3]["bbx"].tolist())
    assert "images=" in repr(dataset) and dataset.gnd_path.is_file()


def test_query_is_cropped_to_its_box(sample_root):
    dataset = load_revisited(sample_root, "rsample")
    x1, y1, x2, y2 = dataset.query_boxes[0]
    crop = dataset.load_query(0)
    assert crop.size == (round(x2) - round(x1), round(y2) - round(y1))
    items = dataset.query_images(lambda image, box: (image.crop(tuple(round(v) for v in box)).size, box))
    (size, box), index = items[0]
    assert index == 0 and size == crop.size and box == dataset.query_boxes[0]
    (database_item, index) = dataset.database_images(lambda image: image.size)[1]
    assert index == 1 and database_item[0] > 0


def test_ground_truth_plugs_into_the_metrics(sample_root):
    dataset = load_revisited(sample_root, "rsample")
    scores = np.zeros((dataset.n_images, dataset.n_queries), dtype=np.float32)
    for q, entry in enumerate(dataset.gnd):  # an oracle: easy first, then hard, then junk
        scores[entry["easy"], q], scores[entry["hard"], q], scores[entry["junk"], q] = 3, 2, 1
    results = evaluate_revisited(scores, dataset.gnd)
    assert all(results[name]["map"] == pytest.approx(1.0) for name in ("easy", "medium", "hard"))


def test_load_distractors(sample_root):
    distractors = load_distractors(sample_root)
    listed = (sample_root / "revisitop1m" / "revisitop1m.txt").read_text().split()
    assert distractors.ids == listed and len(distractors) == 5
    assert all(distractors.image_path(i).is_file() for i in range(len(distractors)))
    assert distractors.image_dir == sample_root / "revisitop1m" / "jpg"
    assert load_distractors(sample_root, check_images=True).ids == listed
    assert revisited_paths(sample_root, ["rsample", "roxford5k"]) == {
        "rsample": sample_root / "rsample", "roxford5k": None, "revisitop1m": sample_root / "revisitop1m"}


# --------------------------------------------------------------------------------- safe unpickling


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class EvalExploit:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_pickles_are_refused_before_running(tmp_path, payload):
    target = tmp_path / "pwned"
    evil = {"system": Exploit(target), "eval": EvalExploit(), "class": GroundTruthError("x")}[payload]
    data = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": evil, "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]}
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused to load") as caught:
        safe_load_gnd(path)
    message = str(caught.value)
    assert str(path) in message
    assert {"system": "system'", "eval": "builtin__.eval'", "class": "GroundTruthError'"}[payload] in message
    assert not target.exists()
    assert isinstance(caught.value, ValueError)  # the CLI turns it into a one-line error


def test_codecs_encode_only_for_latin1():
    forged = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match="latin-1"):
        restricted_loads(forged)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_load_with_every_protocol(tmp_path, protocol):
    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"easy": np.array([0, 2]), "hard": np.array([1], dtype=np.int32), "junk": [],
                    "bbx": np.array([1.5, 2.0, 30.0, 40.0], dtype=np.float32)}]}
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation shim on the way
        loaded = safe_load_gnd(path)
    assert loaded["gnd"][0]["easy"].tolist() == [0, 2] and loaded["gnd"][0]["hard"].dtype == np.int64
    assert loaded["gnd"][0]["bbx"].tolist() == [1.5, 2.0, 30.0, 40.0]
    scalars = restricted_loads(pickle.dumps([np.int64(3), np.float32(0.5), np.dtype("<f8"), {1, 2}], protocol))
    assert scalars == [3, 0.5, np.dtype("<f8"), {1, 2}]


def test_numpy_1x_module_paths_load(tmp_path):
    data = pickle.dumps({"a": np.arange(4), "b": np.float64(2.5)}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy  # the module path numpy 1.x writes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = restricted_loads(legacy)
    assert loaded["a"].tolist() == [0, 1, 2, 3] and loaded["b"] == 2.5


# ------------------------------------------------------------------------------ malformed content


def write_gnd(tmp_path, data, raw=None):
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(raw if raw is not None else pickle.dumps(data, protocol=4))
    return path


def good_gnd():
    return {"imlist": ["a", "b", "c"], "qimlist": ["q0", "q1"],
            "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 10, 10]},
                    {"easy": [], "hard": [2], "junk": [], "bbx": [1, 1, 5, 6]}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("qimlist"), "missing key.*qimlist"),
    (lambda d: d["gnd"].pop(), "1 entries for 2 queries"),
    (lambda d: d["gnd"][1].update(hard=[3]), r"query 1 \('q1'\): 'hard' index 3 is outside imlist \(3 images\)"),
    (lambda d: d["gnd"][0].update(junk=[-1]), r"query 0 \('q0'\): 'junk' index -1"),
    (lambda d: d["gnd"][0].update(easy=[0.5]), "integer image indices"),
    (lambda d: d["gnd"][1].pop("bbx"), r"query 1 \('q1'\): missing bbx"),
    (lambda d: d["gnd"][1].update(bbx=[1, 2, 3]), "'bbx' must be 4 finite numbers"),
    (lambda d: d["gnd"][1].update(bbx=[5, 1, 1, 6]), "x2 > x1"),
    (lambda d: d.update(imlist=["a", None, "c"]), r"imlist\[1\] must be a non-empty image name"),
    (lambda d: d.update(imlist=["a", "../../etc/passwd", "c"]), "relative to the jpg/ folder"),
    (lambda d: d.update(gnd="nope"), "'gnd' must be a list"),
])
def test_malformed_ground_truth_names_file_and_query(tmp_path, change, message):
    data = good_gnd()
    change(data)
    path = write_gnd(tmp_path, data)
    with pytest.raises(GroundTruthError, match=message) as caught:
        safe_load_gnd(path)
    assert str(path) in str(caught.value)


def test_not_a_pickle_or_truncated(tmp_path):
    for raw in (b"definitely not a pickle", pickle.dumps(good_gnd(), protocol=4)[:40], b""):
        path = write_gnd(tmp_path, None, raw=raw)
        with pytest.raises(GroundTruthError, match="not a readable ground-truth pickle"):
            safe_load_gnd(path)
    path = write_gnd(tmp_path, ["a", "list"])
    with pytest.raises(GroundTruthError, match="expected a dict"):
        safe_load_gnd(path)
    good = safe_load_gnd(write_gnd(tmp_path, good_gnd()))
    assert good["qimlist"] == ["q0", "q1"] and good["gnd"][1]["easy"].size == 0


# --------------------------------------------------------------------------------- missing files


def test_missing_dataset_pieces_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root .*nowhere does not exist"):
        load_revisited(tmp_path / "nowhere", "roxford5k")
    with pytest.raises(FileNotFoundError, match=r"no folder .*roxford5k.*gnd_roxford5k\.pkl.*revisitop"):
        load_revisited(tmp_path, "roxford5k")
    (tmp_path / "rparis6k" / "jpg").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"rparis6k/gnd_rparis6k\.pkl is missing"):
        load_revisited(tmp_path, "rparis6k")
    (tmp_path / "rparis6k" / "jpg").rmdir()
    (tmp_path / "rparis6k" / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(good_gnd()))
    with pytest.raises(FileNotFoundError, match=r"image folder .*rparis6k/jpg is missing"):
        load_revisited(tmp_path, "rparis6k")
    (tmp_path / "rparis6k" / "jpg").mkdir()
    with pytest.raises(FileNotFoundError, match=r"5 of 5 images listed in .*gnd_rparis6k\.pkl are missing.*a\.jpg"):
        load_revisited(tmp_path, "rparis6k")
    assert load_revisited(tmp_path, "rparis6k", check_images=False).n_images == 3
    with pytest.raises(ValueError, match="invalid dataset name"):
        load_revisited(tmp_path, "../rparis6k")


def test_missing_image_in_the_sample_is_named(tmp_path):
    write_revisited_sample(tmp_path, landmarks=["coffee"], image_size=48, extra_distractors=2)
    dataset = load_revisited(tmp_path, "rsample")
    dataset.image_path(4).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of .*{dataset.imlist[4]}.jpg"):
        load_revisited(tmp_path, "rsample")


def test_distractor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"revisitop1m.*revisitop1m\.txt"):
        load_distractors(tmp_path)
    folder = tmp_path / "revisitop1m"
    (folder / "jpg" / "0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"image list .*revisitop1m\.txt is missing"):
        load_distractors(tmp_path)
    (folder / "revisitop1m.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        load_distractors(tmp_path)
    (folder / "revisitop1m.txt").write_text("0/a.jpg\n../escape.jpg\n")
    with pytest.raises(ValueError, match=r"revisitop1m\.txt:2: '\.\./escape\.jpg'"):
        load_distractors(tmp_path)
    (folder / "revisitop1m.txt").write_text("0/a.jpg\n\n0/b.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed .* missing, e\.g\. .*0/a\.jpg"):
        load_distractors(tmp_path)
    (folder / "jpg" / "0" / "a.jpg").write_bytes(b"x")
    assert load_distractors(tmp_path).ids == ["0/a.jpg", "0/b.jpg"]  # only the first is checked by default
    with pytest.raises(FileNotFoundError, match=r"0/b\.jpg"):
        load_distractors(tmp_path, check_images=True)


def test_known_names_are_case_insensitive(sample_root):
    with pytest.raises(FileNotFoundError, match=r"'roxford5k' not found: no folder .*/roxford5k "):
        load_revisited(sample_root, "ROxford5k")
    assert load_distractors(sample_root, "RevisitOP1M").name == "revisitop1m"
