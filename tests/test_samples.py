"""The embedded demo/test data: real photographs from installed packages, exact ground truth."""
import pickle

import numpy as np
from PIL import Image

from simret.data.samples import LANDMARKS, load_photo, write_fewshot_sample, write_revisited_sample


def test_packaged_photos_are_real_colour_images():
    photo = load_photo("chelsea")
    assert photo.mode == "RGB" and min(photo.size) >= 200
    assert np.asarray(photo).std() > 20  # a photograph, not a flat placeholder


def test_revisited_sample_layout_and_ground_truth(tmp_path):
    sample = write_revisited_sample(tmp_path, landmarks=["chelsea", "rocket"], extra_distractors=3, image_size=96)
    gnd_path = tmp_path / "rsample" / "gnd_rsample.pkl"
    with open(gnd_path, "rb") as handle:
        data = pickle.load(handle)
    assert set(data) == {"imlist", "qimlist", "gnd"}
    assert len(data["qimlist"]) == 4 == sample.n_queries and len(data["imlist"]) == sample.n_database
    for name in data["imlist"] + data["qimlist"]:
        assert (tmp_path / "rsample" / "jpg" / f"{name}.jpg").is_file()
    for query, gnd in zip(data["qimlist"], data["gnd"]):
        landmark = query.split("_")[1]
        for kind in ("easy", "hard", "junk"):
            names = [data["imlist"][i] for i in gnd[kind]]
            assert names and all(n.startswith(f"{landmark}_{kind}") for n in names)
        x1, y1, x2, y2 = gnd["bbx"]
        width, height = Image.open(tmp_path / "rsample" / "jpg" / f"{query}.jpg").size
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    listed = (tmp_path / "revisitop1m" / "revisitop1m.txt").read_text().split()
    assert len(listed) == 3 and all((tmp_path / "revisitop1m" / "jpg" / n).is_file() for n in listed)


def test_revisited_sample_is_deterministic(tmp_path):
    write_revisited_sample(tmp_path / "a", landmarks=["coffee"], extra_distractors=0, image_size=64)
    write_revisited_sample(tmp_path / "b", landmarks=["coffee"], extra_distractors=0, image_size=64)
    a = (tmp_path / "a" / "rsample" / "gnd_rsample.pkl").read_bytes()
    b = (tmp_path / "b" / "rsample" / "gnd_rsample.pkl").read_bytes()
    assert a == b
    assert set(LANDMARKS) >= {"coffee"}


def test_fewshot_sample_layouts(tmp_path):
    folders = write_fewshot_sample(tmp_path / "f", per_class=5)
    assert folders.classes["train"] == [f"digit_{d}" for d in range(5)]
    assert len(list((tmp_path / "f" / "test" / "digit_7").glob("*.png"))) == 5
    mini = write_fewshot_sample(tmp_path / "m", layout="miniimagenet", per_class=4)
    rows = (tmp_path / "m" / "test.csv").read_text().splitlines()
    assert rows[0] == "filename,label" and len(rows) == 1 + 5 * 4
    assert mini.layout == "miniimagenet" and (tmp_path / "m" / "images" / rows[1].split(",")[0]).is_file()
