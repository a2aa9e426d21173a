"""``simret fewshot`` end to end on the embedded digits sample, both layouts, and its errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.data.samples import write_fewshot_sample

MODEL = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "-j", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    write_fewshot_sample(root / "folders", per_class=20, image_size=24)
    write_fewshot_sample(root / "mini", layout="miniimagenet", per_class=20, image_size=24)
    return root


def _run(*args):
    return CliRunner().invoke(cli, ["fewshot", *map(str, args)])


def test_fewshot_on_both_layouts_prints_a_table_and_writes_json(samples, tmp_path):
    common = [*MODEL, "--shot", "1,5", "--query", "5", "--episodes", "40", "--method", "simpleshot,protonet"]
    folders = _run(samples / "folders", *common, "--features-dir", tmp_path / "f", "--out", tmp_path / "f.json")
    assert folders.exit_code == 0, folders.output
    lines = folders.stdout.splitlines()
    assert "test split (folders): 5 classes, 100 images (20 per class)" in lines[0]
    assert "base mean: train split (100 images)" in lines[1]
    assert lines[2].startswith("5-way, 5 queries per class, 40 episodes per shot, seed 0")
    assert lines[4].split() == ["method", "1-shot", "5-shot"]
    assert lines[5].split()[0] == "simpleshot" and lines[6].split()[0] == "protonet"
    assert "±" in lines[5] and len(lines) == 7
    assert (tmp_path / "f" / "features-test.h5").is_file() and (tmp_path / "f" / "features-train.h5").is_file()

    report = json.loads((tmp_path / "f.json").read_text())
    assert report["format"] == "folders" and report["base_split"] == "train" and report["image_size"] == 32
    assert report["encoder"]["arch"] == "test_resnet" and report["encoder"]["weights"] == "random"
    runs = {(r["method"], r["n_shot"]): r for r in report["results"]}
    assert set(runs) == {("simpleshot", 1), ("simpleshot", 5), ("protonet", 1), ("protonet", 5)}
    for run in runs.values():
        assert 0 <= run["mean"] <= 1 and run["ci95"] == pytest.approx(1.96 * run["std"] / 40 ** 0.5)
        assert run["n_episodes"] == 40 and run["n_way"] == 5 and run["n_query"] == 5
    assert runs[("simpleshot", 1)]["protocol"] == "simpleshot: euclidean, norm=cl2n"
    assert f"{100 * runs[('protonet', 5)]['mean']:.2f}" in lines[6]

    # the same images in the miniImageNet CSV layout give the same bank, hence the same episodes and accuracies
    mini = _run(samples / "mini", *common, "--features-dir", tmp_path / "m", "--out", tmp_path / "m.json")
    assert mini.exit_code == 0, mini.output
    assert "test split (miniimagenet)" in mini.stdout
    assert mini.stdout.splitlines()[4:] == lines[4:]
    assert json.loads((tmp_path / "m.json").read_text())["results"] == report["results"]


def test_second_run_reuses_the_feature_banks(samples, tmp_path):
    args = [samples / "folders", *MODEL, "--shot", "1", "--query", "3", "--episodes", "10", "--method", "protonet",
            "--features-dir", tmp_path]
    assert _run(*args).exit_code == 0
    bank = tmp_path / "features-test.h5"
    stamp = bank.stat().st_mtime_ns
    again = _run(*args, "--seed", "3")
    assert again.exit_code == 0, again.output
    assert bank.stat().st_mtime_ns == stamp and not (tmp_path / "features-train.h5").exists()  # protonet: no base


def test_without_a_train_split_simpleshot_falls_back_to_l2n(tmp_path):
    write_fewshot_sample(tmp_path / "only", per_class=8, image_size=16, splits={"val": [1, 2, 3]})
    result = _run(tmp_path / "only", *MODEL, "--split", "val", "--way", "3", "--shot", "1", "--query", "2",
                  "--episodes", "5", "--features-dir", tmp_path / "f", "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["base_split"] is None and report["results"][0]["protocol"] == "simpleshot: euclidean, norm=l2n"


@pytest.mark.parametrize("extra, message", [
    (["--shot", "5", "--query", "16"], r"Error: split 'test' of .*test: 5 class\(es\) have fewer than 21 images "
                                       r"\(shot 5 \+ query 16\): digit_5 \(20 images\), digit_6 \(20 images\)"),
    (["--way", "6"], r"Error: 6-way episodes need 6 classes, but split 'test' .* has only 5"),
    (["--split", "val"], r"Error: .*not a few-shot split: expected val\.csv or val/"),
])
def test_bad_splits_are_one_line_errors(samples, tmp_path, extra, message):
    result = _run(samples / "folders", *MODEL, "--features-dir", tmp_path, *extra)
    assert result.exit_code == 1
    assert re.search(message, result.output), result.output
    assert not list(Path(tmp_path).glob("*.h5"))  # checked before any feature is extracted


def test_missing_root_and_bad_options(samples, tmp_path):
    result = _run(tmp_path / "nowhere", *MODEL)
    assert result.exit_code == 1 and "no such split folder" in result.output
    result = _run(samples / "folders", *MODEL, "--method", "simpleshot,knn")
    assert result.exit_code == 2 and "unknown method(s) knn" in result.output
    result = _run(samples / "folders", *MODEL, "--shot", "1,x")
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_script_wrapper_shows_the_command_help():
    script = Path(__file__).resolve().parent.parent / "scripts" / "run_fewshot.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "SPLIT_ROOT" in out and "--shot" in out and "--method" in out


def test_base_split_equal_to_the_evaluated_split_is_not_used(samples, tmp_path):
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("simret")  # our own handler: independent of where earlier runs sent stderr
    logger.addHandler(handler)
    try:
        result = _run(samples / "folders", *MODEL, "--split", "train", "--shot", "1", "--query", "2", "--episodes",
                      "5", "--features-dir", tmp_path / "f", "--out", tmp_path / "r.json")
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert any("--base-split 'train' is the evaluated split" in m for m in messages), messages
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["base_split"] is None and report["results"][0]["protocol"] == "simpleshot: euclidean, norm=l2n"
