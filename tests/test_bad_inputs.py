"""Bad input ends in a one-line ``Error: ...`` naming the culprit (exit 1, or 2 for usage), never a traceback,
a crash or a lost index."""
import warnings

import pytest
from click.testing import CliRunner

from simret.cli import cli

MODEL = ["--model", "test_resnet", "--weights", "none"]
FAST = ["--max-size", "64", "-j", "0", "-b", "4"]


def run(*args, code=1):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    return error_lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea"], image_size=48, extra_distractors=0, distractor_views=1)
    return root / "rsample" / "jpg"


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory):
    from simret.models import RandomWeightsWarning

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings():  # module-scoped fixtures run outside conftest's filter
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(cli, ["index", str(photos), "--out", str(out), *MODEL, *FAST])
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------ index


def test_index_a_single_image_file_is_not_read_as_a_list(photos, tmp_path):
    line = run("index", photos / "chelsea_easy_0.jpg", "--out", tmp_path / "o", *MODEL, *FAST)
    assert "is an image file, not a folder or a list" in line


def test_index_a_binary_list_file(tmp_path):
    listing = tmp_path / "list.bin"
    listing.write_bytes(b"\x00\xff\xfe\x80 binary")
    line = run("index", listing, "--out", tmp_path / "o", *MODEL, *FAST)
    assert "list.bin is not a text list of image paths" in line


@pytest.mark.parametrize("param, message", [
    ("nlist=0", "nlist must be at least 1"), ("m=0", "m must be at least 1"), ("nbits=0", "nbits must be at least 1"),
    ("nbits=30", "nbits must be at most 16"), ("nbits=12", "needs at least 2^12 = 4096 training vectors"),
    ("nprobe=100000000000000000000", "nprobe must be at least 1 and below 2^31"),
])
def test_index_bad_ivfpq_parameters_never_crash_faiss(photos, index_dir, param, message):
    before = (index_dir / "meta.json").read_text()
    line = run("index", photos, "--out", index_dir, *MODEL, *FAST, "--index", "ivfpq", "--index-param", param)
    assert message in line
    assert (index_dir / "meta.json").read_text() == before  # the previous index is untouched


def test_index_refuses_negative_workers_and_max_size(photos, tmp_path):
    assert "--workers" in run("index", photos, "--out", tmp_path / "o", *MODEL, "-j", "-1", code=2)
    for size in ("-5", "100000000000000000000"):  # the huge one was an h5py TypeError traceback
        line = run("index", photos, "--out", tmp_path / "o", *MODEL, "--max-size", size, code=2)
        assert f"'--max-size': {size} is not in the range 0<=x<=20000 (0 keeps the size)" in line
    assert not (tmp_path / "o").exists()


def _store_like(index_dir, path, descriptors, ids):
    import h5py
    import numpy as np

    with h5py.File(index_dir / "descriptors.h5", "r") as handle:
        attrs = dict(handle.attrs)
    with h5py.File(path, "w") as handle:
        handle["descriptors"] = np.asarray(descriptors, dtype="float32")
        handle["ids"] = np.array(ids, dtype=h5py.string_dtype())
        handle.attrs.update(attrs)
    return path


def test_whiten_on_bad_descriptor_files_and_unreadable_images(photos, index_dir, tmp_path):
    import numpy as np

    nan = _store_like(index_dir, tmp_path / "nan.h5", np.full((4, 96), np.nan), list("abcd"))
    line = run("index", photos, "--out", tmp_path / "o", *MODEL, *FAST, "--whiten", "pca", "--whiten-on", nan)
    assert "--whiten-on" in line and "NaN" in line
    narrow = _store_like(index_dir, tmp_path / "narrow.h5", np.eye(4, 5), list("abcd"))
    line = run("index", photos, "--out", tmp_path / "o", *MODEL, *FAST, "--whiten", "pca", "--whiten-on", narrow)
    assert "holds 5-d descriptors" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    for n in range(3):
        (broken / f"{n}.jpg").write_text("not a picture")
    line = run("index", photos, "--out", tmp_path / "o", *MODEL, *FAST, "--whiten", "pca", "--whiten-on", broken)
    assert "at least two readable images, 0 of 3" in line
    assert not (tmp_path / "o" / "meta.json").exists()


# ----------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("content, message", [  # in a generation folder simret wrote: damage, repaired by simret
    ("[1, 2]", "meta.json is damaged (a JSON list in a generation simret wrote"),
    ('{"name": "other tool"}', "meta.json is damaged (format None in a generation simret wrote"),
    ('{"format": "simret-index"}', "is damaged (missing or malformed: generation"),
])
def test_search_a_foreign_or_damaged_meta_json(index_dir, photos, tmp_path, content, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy, symlinks=True)  # as cp -r and rsync -a copy it: links kept
    (copy / "meta.json").write_text(content)
    assert message in run("search", copy, photos / "chelsea_easy_0.jpg")


@pytest.mark.parametrize("option, message", [
    (["--qe", "1000"], "--qe: 1000 is more than the"), (["--dba", "1000"], "--dba: 1000 neighbours need more"),
    (["--alpha", "-1", "--qe", "2"], "'--alpha': -1.0 is not in the range x>=0"),
    (["--alpha", "nan", "--qe", "2"], "'--alpha': nan is not a finite number in the range x>=0"),
    (["-j", "-1"], "'--workers': -1 is not in the range x>=0"),
    (["-b", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["-k", "0"], "'--top-k': 0 is not in the range x>=1"), (["--rerank", "-1"], "'--rerank': -1 is not in the range"),
    (["--dba", "-2"], "'--dba': -2 is not in the range x>=0"),
])
def test_search_refuses_impossible_options(index_dir, photos, option, message):
    assert message in run("search", index_dir, photos / "chelsea_easy_0.jpg", *option, code=2)


def test_search_with_empty_or_mismatched_descriptor_files(index_dir, tmp_path):
    import numpy as np

    empty = _store_like(index_dir, tmp_path / "empty.h5", np.zeros((0, 96)), [])
    assert "empty.h5 holds no descriptors" in run("search", index_dir, "--descriptors", empty)
    narrow = _store_like(index_dir, tmp_path / "narrow.h5", np.eye(2, 5), ["a", "b"])
    assert "narrow.h5 holds 5-d descriptors" in run("search", index_dir, "--descriptors", narrow)
    nan = _store_like(index_dir, tmp_path / "nan.h5", np.full((2, 96), np.inf), ["a", "b"])
    assert "nan.h5 holds NaN or infinite descriptors" in run("search", index_dir, "--descriptors", nan)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    assert "garbage.h5 is not a readable HDF5 file" in run("search", index_dir, "--descriptors", garbage)


# ------------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def revisited(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("rev")
    write_revisited_sample(root, landmarks=["chelsea"], image_size=48, extra_distractors=0, distractor_views=1)
    return root


@pytest.mark.parametrize("option, message", [
    (["--max-size", "-5"], "'--max-size': -5 is not in the range 0<=x<=20000"),
    (["-b", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["-j", "-1"], "'--workers': -1 is not in the range x>=0"),
    (["--alpha", "inf", "--qe", "1"], "'--alpha': inf is not a finite number"),
    (["--qe", "-1"], "'--qe': -1 is not in the range x>=0"),
    (["--whiten-on", "no-such-folder"], "'--whiten-on': Path 'no-such-folder' does not exist"),
])
def test_eval_refuses_bad_options_before_any_work(revisited, tmp_path, option, message):
    line = run("eval", "rsample", "--data-root", revisited, *MODEL, "--cache", tmp_path / "cache", *option, code=2)
    assert message in line
    assert not (tmp_path / "cache").exists()


def test_eval_dba_beyond_the_collection(revisited, tmp_path):
    line = run("eval", "rsample", "--data-root", revisited, *MODEL, "--cache", tmp_path / "cache", "--dba", "1000")
    assert "--dba 1000 asks for more neighbours than the" in line


def test_eval_whiten_on_unreadable_images(revisited, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for n in range(2):
        (broken / f"{n}.png").write_bytes(b"\x89PNG but not really")
    line = run("eval", "rsample", "--data-root", revisited, *MODEL, *FAST, "--cache", tmp_path / "cache",
               "--whiten-on", broken)
    assert "--whiten-on" in line and "0 of 2 could be used" in line


# ---------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("content, message", [
    ({"epoch": 3}, "no_tensors.pth: checkpoint holds no tensors"), (None, "is not a readable PyTorch checkpoint"),
])
def test_weights_files_without_weights_are_named(photos, tmp_path, content, message):
    import torch

    path = tmp_path / "no_tensors.pth"
    if content is None:
        path.write_bytes(b"\x80\x04 truncated")
    else:
        torch.save(content, path)
    line = run("index", photos, "--out", tmp_path / "o", "--model", "test_resnet", "--weights", path, *FAST)
    assert message in line and "no_tensors.pth" in line


# ---------------------------------------------------------------------------------------- fewshot

FEW = ["--model", "test_resnet", "--weights", "none", "--img-size", "16", "-j", "0", "--episodes", "3",
       "--shot", "1", "--query", "2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from simret.data.samples import write_fewshot_sample

    root = tmp_path_factory.mktemp("digits")
    write_fewshot_sample(root / "mini", layout="miniimagenet", image_size=16, per_class=4)
    return root / "mini"


@pytest.mark.parametrize("option, message", [
    (["--way", "1"], "'--way': 1 is not in the range x>=2 (a 1-way episode is always right)"),
    (["--img-size", "0"], "'--img-size': 0 is not in the range 8<=x<=20000"),
    (["--img-size", "100000000000000000000"], "'--img-size': 100000000000000000000 is not in the range 8<=x<=20000"),
    (["--crop-pct", "0"], "'--crop-pct': 0.0 is not in the range 0<x<=1"),
    (["--crop-pct", "nan"], "'--crop-pct': nan is not a finite number"), (["--seed", "-1"], "'--seed': -1 is not"),
    (["--out", "."], "'--out': File '.' is a directory"),
])
def test_fewshot_refuses_bad_options_before_any_work(digits, tmp_path, option, message):
    assert message in run("fewshot", digits, *FEW, "--features-dir", tmp_path / "f", *option, code=2)
    assert not (tmp_path / "f").exists()


def test_fewshot_features_dir_that_is_a_file(digits, tmp_path):
    (tmp_path / "f").write_text("a file")
    assert "'--features-dir': Directory" in run("fewshot", digits, *FEW, "--features-dir", tmp_path / "f", code=2)


def test_fewshot_split_root_that_is_a_file(tmp_path):
    (tmp_path / "split.csv").write_text("filename,label\n")
    assert "split.csv is a file, not a few-shot split folder" in run("fewshot", tmp_path / "split.csv", *FEW)


def test_fewshot_binary_csv(digits, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    (copy / "test.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert "test.csv is not a UTF-8 text CSV" in run("fewshot", copy, *FEW, "--features-dir", tmp_path / "f")


# ------------------------------------------------------------------------------------------ train

TRAIN = ["--model", "test_resnet", "--weights", "none", "--img-size", "16", "--workers", "0", "--epochs", "1"]


def test_train_on_only_unreadable_images_fails_without_a_checkpoint(tmp_path):
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for n in range(2):
            (data / name / f"{n}.jpg").write_text("not a picture")
    line = run("train", data, "--out", tmp_path / "ckpt", *TRAIN, "--batch-size", "2")
    assert "no image of" in line and "could be read" in line and "skipped.tsv" in line
    assert not (tmp_path / "ckpt" / "last.pth").exists() and (tmp_path / "ckpt" / "skipped.tsv").is_file()


@pytest.mark.parametrize("option, message", [
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1)"), (["--epochs", "0"], "--epochs must be at"),
    (["--lr", "-1"], "--lr must be positive"), (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--img-size", "100000000000000000000"], "--img-size must be from 8 to 20000 pixels"),
    (["--resume"], "--resume: no checkpoint to continue"),
])
def test_train_refuses_bad_options(tmp_path, option, message):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    assert message in run("train", data, "--out", tmp_path / "ckpt", *TRAIN, *option)


# ------------------------------------------------------------------------------------ attention, demo


def test_attention_on_unreadable_images_names_them(tmp_path):
    (tmp_path / "fake.jpg").write_text("not a picture")
    line = run("attention", tmp_path / "fake.jpg", *MODEL, "-o", tmp_path / "maps")
    assert "no image could be read (fake.jpg: not an image" in line


def test_attention_negative_max_size_or_nan_alpha(photos, tmp_path):
    line = run("attention", photos / "chelsea_easy_0.jpg", *MODEL, "--max-size", "-5", "-o", tmp_path / "m", code=2)
    assert "'--max-size': -5 is not in the range 0<=x<=20000" in line
    line = run("attention", photos / "chelsea_easy_0.jpg", *MODEL, "--alpha", "nan", "-o", tmp_path / "m", code=2)
    assert "'--alpha': nan is not a finite number in the range 0<=x<=1" in line  # FloatRange alone let NaN in
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option, message", [
    (["--small", "--model", "resnet50"], "--small sets --model itself"),
    (["--episodes", "0"], "'--episodes': 0 is not in the range x>=1"),
    (["--image-size", "8"], "'--image-size': 8 is not in the range 64<=x<=20000"),
    (["--image-size", "100000000000000000000"],
     "'--image-size': 100000000000000000000 is not in the range 64<=x<=20000"),
])
def test_demo_refuses_options_it_would_ignore_or_cannot_use(tmp_path, option, message):
    assert message in run("demo", "-o", tmp_path / "demo", *option, code=2)
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("option, message", [
    (["--scales", "1e9"], "scales must be at most 4"), (["--scales", "nan"], "scales must be positive numbers"),
    (["--gamma", "inf"], "gamma must be a positive finite number"),
])
def test_index_refuses_absurd_numbers(photos, tmp_path, option, message):
    assert message in run("index", photos, "--out", tmp_path / "o", *MODEL, *FAST, *option)


@pytest.mark.parametrize("box", ["0,0,inf,inf", "nan,0,5,5"])
def test_search_refuses_non_finite_boxes(index_dir, photos, box):
    line = run("search", index_dir, photos / "chelsea_easy_0.jpg", "--bbox", box, code=2)
    assert "--bbox: expected finite numbers of pixels" in line


@pytest.mark.parametrize("content", [b"junk, not numpy", b""])
def test_search_with_a_damaged_whitening_file(photos, tmp_path, content):
    out = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(photos), "--out", str(out), *MODEL, *FAST, "--whiten", "pca"])
    assert result.exit_code == 0, result.output
    (out / "whitening.npz").write_bytes(content)  # through the link: the committed generation's file
    line = run("search", out, photos / "chelsea_easy_0.jpg")
    assert f"{out / 'whitening.npz'} is damaged (its checksum no longer matches" in line
    assert f"simret check {out} --repair" in line


# -------------------------------------------------------------------------------- damaged outputs


def test_index_over_a_damaged_store_describes_the_images_again(photos, index_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy, symlinks=True)
    (copy / "descriptors.h5").write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["index", str(photos), "--out", str(copy), *MODEL, *FAST])
    assert result.exit_code == 0, result.output
    assert "descriptors.h5 is unreadable" in result.output and "repairing it" in result.output
    assert "indexed 18 images" in result.stdout and "18 computed" in result.stdout
    assert "up to date" in CliRunner().invoke(cli, ["index", str(photos), "--out", str(copy), *MODEL, *FAST]).stdout


@pytest.mark.parametrize("name, content", [("descriptors.h5", b"garbage"), ("meta.json", b"{not json")])
def test_eval_describes_a_damaged_cache_again(revisited, tmp_path, name, content):
    args = ["eval", "rsample", "--data-root", str(revisited), *MODEL, *FAST, "--cache", str(tmp_path / "cache")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    (damaged,) = (tmp_path / "cache").glob(f"rsample/*/index/{name}")
    damaged.write_bytes(content)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert f"{name} is" in again.output and "repairing it" in again.output
    assert again.stdout.split("\n", 1)[1] == first.stdout.split("\n", 1)[1]


def test_search_meta_json_without_index_kind(index_dir, photos, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy, symlinks=True)  # as cp -r and rsync -a copy it: links kept
    meta = json.loads((copy / "meta.json").read_text())
    meta["index"] = {}
    (copy / "meta.json").write_text(json.dumps(meta))
    line = run("search", copy, photos / "chelsea_easy_0.jpg")
    assert "meta.json is damaged (missing or malformed: index)" in line


def test_out_of_memory_is_one_line(digits, tmp_path, monkeypatch):
    import simret.fewshot.episodes

    def too_big(*args, **kwargs):  # what numpy raises for --episodes 10000000000 (373 GiB)
        raise MemoryError("Unable to allocate 373. GiB for an array with shape (10000000000, 5) and data type int64")

    monkeypatch.setattr(simret.fewshot.episodes, "sample_episodes", too_big)
    line = run("fewshot", digits, *FEW, "--features-dir", tmp_path / "f")
    assert "out of memory (Unable to allocate 373. GiB" in line and "ask for less" in line
