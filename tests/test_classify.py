"""``simret classify`` and ``SupportClassifier``: predictions, formats, the support cache and bad inputs."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from digit_folders import support_and_queries
from PIL import Image

from simret.cli import cli

MODEL = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """``train/digit_{0..4}/`` (the support set, 6 examples each) and ``test/digit_{0..4}/`` queries."""
    return support_and_queries(tmp_path_factory.mktemp("classify"), classes=range(5), per_class=9, n_support=6,
                               image_size=24, queries="test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(*args, code=0):
    result = CliRunner().invoke(cli, ["classify", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def error_line(*args, code=1):
    result = run(*args, code=code)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _bank(cache):
    from simret.fewshot.features import load_feature_bank

    return load_feature_bank(cache / "features-support.h5")


def test_jsonl_is_protonet_on_the_cached_support_features(digits, cache):
    queries = [digits / "test" / "digit_3" / "0006.png", digits / "test" / "digit_0"]
    result = run(digits / "support", *queries, *MODEL, "--cache-dir", cache, "--format", "jsonl", "--top", "4")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(queries[0])] + [str(digits / "test" / "digit_0" / f"{n:04d}.png")
                                                             for n in (6, 7, 8)]
    bank = _bank(cache)
    assert bank.classes == [f"digit_{d}" for d in range(5)] and len(bank) == 30

    from simret.classify.embed import embed_images
    from simret.commands.options import build_encoder

    encoder, _ = build_encoder({"arch": "test_resnet", "weights": "none", "device": "cpu"})
    query, kept, failed = embed_images(encoder, [str(q) for q in [queries[0], *sorted(queries[1].iterdir())]],
                                       {"image_size": 32, "crop_pct": 0.95})
    means = np.stack([bank.features[bank.labels == c].mean(0) for c in range(5)])
    scores = -np.linalg.norm(query[:, None] - means[None], axis=-1)  # protonet by hand
    for row, expected in zip(rows, scores):
        order = np.argsort(-expected)[:4]
        assert row["method"] == "protonet" and row["class"] == bank.classes[order[0]]
        assert [t["class"] for t in row["top"]] == [bank.classes[c] for c in order]
        np.testing.assert_allclose([t["score"] for t in row["top"]], expected[order], atol=2e-5)
        assert row["score"] == row["top"][0]["score"]


def test_table_and_tsv(digits, cache):
    query = digits / "test" / "digit_2" / "0007.png"
    table = run(digits / "support", query, *MODEL, "--cache-dir", cache).stdout.splitlines()
    assert table[0].split()[:3] == ["image", "class", "score"] and "next classes (score)" in table[0]
    assert table[1].startswith(str(query)) and table[1].count("(") == 2 and len(table) == 2  # --top 3
    tsv = run(digits / "support", query, *MODEL, "--cache-dir", cache, "--format", "tsv", "--method", "logreg",
              "--top", "5").stdout.splitlines()
    assert tsv[0] == "image\trank\tclass\tscore\tmethod" and len(tsv) == 6
    cells = [line.split("\t") for line in tsv[1:]]
    assert [c[1] for c in cells] == ["1", "2", "3", "4", "5"] and {c[4] for c in cells} == {"logreg"}
    assert sorted(c[2] for c in cells) == [f"digit_{d}" for d in range(5)]
    scores = [float(c[3]) for c in cells]
    assert scores == sorted(scores, reverse=True)


def test_simpleshot_with_a_base_mean_from_npy_or_bank(digits, cache, tmp_path):
    query = digits / "test" / "digit_4" / "0008.png"
    run(digits / "support", query, *MODEL, "--cache-dir", cache)  # the support bank (reused when there)
    bank = _bank(cache)
    np.save(tmp_path / "mean.npy", bank.mean())
    args = [digits / "support", query, *MODEL, "--cache-dir", cache, "--method", "simpleshot", "--format", "jsonl"]
    from_npy = json.loads(run(*args, "--base-mean", tmp_path / "mean.npy").stdout)
    from_bank = json.loads(run(*args, "--base-mean", cache / "features-support.h5").stdout)
    plain = json.loads(run(*args).stdout)
    assert from_npy == from_bank and from_npy["method"] == "simpleshot"
    assert [t["score"] for t in from_npy["top"]] != [t["score"] for t in plain["top"]]  # CL2N ≠ L2N


def test_library_accepts_pil_images_and_paths_alike(digits, cache):
    from simret.classify import SupportClassifier
    from simret.commands.options import build_encoder

    encoder, _ = build_encoder({"arch": "test_resnet", "weights": "none", "device": "cpu"})
    classifier = SupportClassifier(encoder, digits / "support", "cosine", cache_dir=cache, image_size=32, top=2)
    path = digits / "test" / "digit_1" / "0006.png"
    with Image.open(path) as image:
        picture = image.copy()
    by_path, by_picture = classifier.classify([str(path), picture])
    assert by_picture.image == "image-1" and by_path.image == str(path)
    assert by_path.label == by_picture.label and len(by_path.top) == 2
    assert by_path.score == pytest.approx(by_picture.score, abs=1e-6)
    assert by_path.to_dict()["class"] == by_path.label and classifier.classes[1] == "digit_1"
    assert "5 classes, 30 images (6 per class); cosine" in classifier.describe()


def test_support_changes_are_noticed(digits, tmp_path):
    support = tmp_path / "support"
    shutil.copytree(digits / "support", support)
    query = digits / "test" / "digit_0" / "0006.png"
    args = [support, query, *MODEL, "--cache-dir", tmp_path / "c"]
    run(*args)
    bank = tmp_path / "c" / "features-support.h5"
    stamp = bank.stat().st_mtime_ns
    run(*args)
    assert bank.stat().st_mtime_ns == stamp  # unchanged support: reused

    shutil.copy(query, support / "digit_0" / "extra.png")  # one more example
    run(*args)
    assert len(_bank(tmp_path / "c")) == 31
    stamp = bank.stat().st_mtime_ns
    edited = support / "digit_1" / "0000.png"
    Image.new("RGB", (24, 24), "white").save(edited)  # same name, new pixels
    os.utime(edited, ns=(stamp + 10**9, stamp + 10**9))
    run(*args)
    assert bank.stat().st_mtime_ns != stamp


def test_unreadable_images_are_skipped_with_a_warning(digits, cache, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = digits / "test" / "digit_2" / "0006.png"
    result = run(digits / "support", broken, good, *MODEL, "--cache-dir", cache, "--format", "jsonl")
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == [str(good)]
    assert "broken.png skipped" in result.stderr
    assert "no image could be read" in error_line(digits / "support", broken, *MODEL, "--cache-dir", cache)


def test_default_cache_is_per_support_folder(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path / "cache"))
    run(digits / "support", digits / "test" / "digit_0" / "0006.png", *MODEL)
    banks = list((tmp_path / "cache" / "classify").rglob("features-support.h5"))
    assert len(banks) == 1 and banks[0].parent.parent.name.startswith("support-")


def test_bad_support_folders(digits, tmp_path):
    query = digits / "test" / "digit_0" / "0006.png"
    assert "no such support folder" in error_line(tmp_path / "missing", query, *MODEL)
    assert "is a file" in error_line(query, query, *MODEL)
    one = tmp_path / "one"
    shutil.copytree(digits / "support" / "digit_0", one / "digit_0")
    assert "needs at least two class folders" in error_line(one, query, *MODEL)
    empty = tmp_path / "empty"
    shutil.copytree(digits / "support", empty)
    (empty / "digit_9").mkdir()
    line = error_line(empty, query, *MODEL)
    assert "class folder(s) without images: digit_9" in line and "(add images or remove the folder)" in line
    assert "does not exist" in error_line(digits / "support", tmp_path / "nope.png", *MODEL, code=2)


def test_bad_methods_and_base_means(digits, cache, tmp_path):
    args = [digits / "support", digits / "test" / "digit_0" / "0006.png", *MODEL, "--cache-dir", cache]
    assert "unknown method 'knn'; use one of protonet, cosine, simpleshot, logreg" in error_line(*args, "--method",
                                                                                                "knn")
    assert "softkmeans is transductive" in error_line(*args, "--method", "softkmeans")
    np.save(tmp_path / "mean.npy", np.zeros(96, np.float32))
    assert "a base mean applies to simpleshot, logreg, not to protonet" in error_line(
        *args, "--base-mean", tmp_path / "mean.npy")
    np.save(tmp_path / "short.npy", np.zeros(5, np.float32))
    assert "is 5-d, the encoder's features are 96-d" in error_line(*args, "--method", "simpleshot", "--base-mean",
                                                                  tmp_path / "short.npy")
    assert "no such base-mean file" in error_line(*args, "--method", "simpleshot", "--base-mean", tmp_path / "x.npy")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["features"] = np.zeros((2, 96), np.float32)
        handle["labels"] = np.zeros(2, np.int64)
        handle["ids"] = np.array(["a", "b"], dtype=object)
        handle.attrs["fingerprint"] = "resnet50-simpool-0123456789abcdef"
    assert "was made by encoder resnet50-simpool-0123456789abcdef" in error_line(
        *args, "--method", "simpleshot", "--base-mean", tmp_path / "other.h5")
    assert "--top: must be at least 1" in error_line(*args, "--top", "0", code=2)
