"""``simret probe`` end to end on an ImageFolder split of the embedded digits, and its errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.data.samples import write_fewshot_sample

MODEL = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "-j", "0", "--device", "cpu"]
LINEAR = ["--epochs", "5", "--lr", "0.01,0.3", "--linear-batch-size", "16"]


def image_folder(root, classes=(0, 1, 2, 3, 4, 5), per_class=12, every=3):
    """Digits as ROOT/train/<class>/ and ROOT/val/<class>/ (every third image of a class goes to val)."""
    source = root.parent / f"{root.name}-source"
    write_fewshot_sample(source, splits={"all": list(classes)}, per_class=per_class, image_size=24)
    for folder in sorted((source / "all").iterdir()):
        for n, image in enumerate(sorted(folder.iterdir())):
            target = root / ("val" if n % every == 0 else "train") / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("probe") / "digits")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def run(*args, code=0):
    result = CliRunner().invoke(cli, ["probe", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def error_line(*args, code=1):
    result = run(*args, code=code)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_knn_and_linear_table_and_json(digits, features, tmp_path):
    result = run(digits, *MODEL, "--method", "knn,linear", "-k", "3,10", *LINEAR, "--features-dir", features,
                 "--out", tmp_path / "r.json")
    lines = result.stdout.splitlines()
    assert "train split (folders): 6 classes, 48 images (8 per class)" in lines[0]
    assert "val split (folders): 6 classes, 24 images (4 per class)" in lines[0]
    assert "test_resnet-simpool-" in lines[1] and "accuracy % on the val split" in lines[1]
    assert lines[3].split() == ["probe", "top-1", "top-5"]
    assert lines[4].startswith("k-NN k=3 T=0.07") and lines[5].startswith("k-NN k=10 T=0.07")
    assert lines[6].startswith("linear bn, lr ") and "(best of 2), 5 ep" in lines[6] and len(lines) == 7

    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["n_classes"], report["n_train"], report["n_val"]) == (6, 48, 24)
    assert report["encoder"]["arch"] == "test_resnet" and report["image_size"] == 32
    knn = {r["k"]: r for r in report["results"] if r["method"] == "knn"}
    linear = [r for r in report["results"] if r["method"] == "linear"][0]
    assert set(knn) == {3, 10} and knn[10]["temperature"] == 0.07
    assert [r["learning_rate"] for r in linear["sweep"]] == [0.01, 0.3] and linear["epochs"] == 5
    assert f"{100 * knn[3]['top1']:.2f}" in lines[4] and f"{100 * linear['top5']:.2f}" in lines[6]

    # the numbers are the library's on the cached banks
    from simret.fewshot.features import load_feature_bank
    from simret.probe.knn import knn_classify

    train, val = load_feature_bank(features / "features-train.h5"), load_feature_bank(features / "features-val.h5")
    assert train.classes == val.classes and len(train) == 48
    assert knn_classify(train.features, train.labels, val.features, val.labels, k=10) == (knn[10]["top1"],
                                                                                         knn[10]["top5"])
    assert knn[10]["top1"] > 2 / 6  # digits are easy even for random features: far above chance


def test_second_run_reuses_the_banks(digits, features):
    run(digits, *MODEL, "-k", "5", "--features-dir", features)
    stamps = [(features / f"features-{s}.h5").stat().st_mtime_ns for s in ("train", "val")]
    result = run(digits, *MODEL, "-k", "5", "--features-dir", features)
    assert [(features / f"features-{s}.h5").stat().st_mtime_ns for s in ("train", "val")] == stamps
    assert "k-NN k=5" in result.stdout and "linear" not in result.stdout  # knn is the default probe


def test_val_classes_are_matched_to_train_classes_by_name(digits, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(digits, root)
    shutil.rmtree(root / "val" / "digit_0")  # val now numbers its classes differently from train
    run(root, *MODEL, "-k", "1", "--features-dir", tmp_path / "f", "--out", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]

    from simret.fewshot.features import load_feature_bank
    from simret.probe.knn import knn_classify

    train = load_feature_bank(tmp_path / "f" / "features-train.h5")
    val = load_feature_bank(tmp_path / "f" / "features-val.h5")
    aligned = np.array([train.classes.index(val.classes[label]) for label in val.labels])
    assert (result["top1"], result["top5"]) == knn_classify(train.features, train.labels, val.features, aligned, k=1)
    assert (result["top1"], result["top5"]) != knn_classify(train.features, train.labels, val.features, val.labels,
                                                            k=1)


def test_default_features_folder_is_under_the_cache(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path / "cache"))
    run(digits, *MODEL, "-k", "2")
    banks = sorted(p.name for p in (tmp_path / "cache" / "probe").rglob("*.h5"))
    assert banks == ["features-train.h5", "features-val.h5"]


@pytest.mark.parametrize("option, message", [
    (["--method", "knn,svm"], "--method: unknown probe(s) svm; known: knn, linear"),
    (["-k", "49"], "--k: 49 neighbours, but"),
    (["-k", "0"], "--k: expected integers >= 1"),
    (["--temperature", "0"], "--temperature: must be a finite number > 0"),
    (["--lr", "0.1,-1"], "--lr: expected finite numbers > 0"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
])
def test_bad_options_are_refused_before_any_work(digits, tmp_path, option, message):
    line = error_line(digits, *MODEL, "--method", "knn,linear", "--features-dir", tmp_path / "f", *option, code=2)
    assert message in line
    assert not (tmp_path / "f").exists()


def test_k_larger_than_the_train_set_names_its_size(digits, tmp_path):
    assert "holds 48 images: use at most 48" in error_line(digits, *MODEL, "-k", "20,49", code=2)


def test_bad_folders_are_one_error_line(digits, tmp_path):
    assert "no such dataset folder" in error_line(tmp_path / "missing", *MODEL)
    (tmp_path / "file").write_text("x")
    assert "is a file" in error_line(tmp_path / "file", *MODEL)
    only_train = tmp_path / "only_train"
    shutil.copytree(digits / "train", only_train / "train")
    assert "split 'val': no such folder" in error_line(only_train, *MODEL)
    assert "split 'test': no such folder" in error_line(digits, *MODEL, "--val-split", "test")
    assert "both 'train'" in error_line(digits, *MODEL, "--val-split", "train")

    extra = tmp_path / "extra"
    shutil.copytree(digits, extra)
    shutil.copytree(extra / "val" / "digit_1", extra / "val" / "digit_9")
    line = error_line(extra, *MODEL)
    assert "1 class folder(s) of" in line and "are not in" in line and line.endswith("digit_9 (a probe classifies "
                                                                                   "into the train split's classes)")

    empty = tmp_path / "empty"
    shutil.copytree(digits, empty)
    (empty / "train" / "digit_7").mkdir()
    assert "class folder(s) hold no images: digit_7" in error_line(empty, *MODEL)


def test_help_needs_no_torch():
    code = ("import sys\nfrom simret.cli import main\nfor argv in (['probe', '--help'], ['classify', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('HEAVY', [m for m in ('torch', 'timm', 'faiss', 'numpy', 'h5py') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "simret probe digits/" in out and "simret classify pets/" in out
