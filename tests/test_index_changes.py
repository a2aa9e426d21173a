"""A living collection (issue 11, items 2-3): images replaced in place are described again (also when size and
time stay, with --verify-content), vanished ones leave (--keep-missing keeps them), another root is refused
unless --append, appended roots survive a re-run of the first, and no message advises a step that drops images
without saying so."""
import ast
import os
import shutil
from pathlib import Path

import numpy as np
from index_campaign import MODEL, committed, make_images, ok, one_error, run

ROOT = Path(__file__).resolve().parents[1]


def top(out, image, k=1):
    import json

    line = ok("search", out, image, "-k", k, "--format", "jsonl").stdout.splitlines()[0]
    return json.loads(line)["ids"]


def replace_keeping_size_and_time(path: Path, seed: int) -> None:
    """New pixels, same byte count (an uncompressed BMP) and the old modification time (as ``rsync -t`` or a
    restore from backup leave it)."""
    from PIL import Image

    before = path.stat()
    size = Image.open(path).size
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_an_image_replaced_in_place_is_described_again(tmp_path):
    images = make_images(tmp_path / "images", 6)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    shutil.copyfile(make_images(tmp_path / "other", 1, seed=99) / "img000.png", images / "img002.png")
    assert "1 indexed image(s) changed since they were described, e.g. img002.png" in run("check", out).stdout
    result = ok("index", images, "--out", out, *MODEL)
    assert "(1 computed, 5 reused, 1 re-described, 0 removed" in result.stdout
    assert top(out, tmp_path / "other" / "img000.png") == ["img002.png"]
    assert ok("check", out).stdout.startswith(f"{out}: OK")


def test_same_size_and_time_is_caught_by_verify_content(tmp_path):
    images = make_images(tmp_path / "images", 5, suffix=".bmp")
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    first = ok("index", images, "--out", out, *MODEL, "--verify-content")  # digests recorded: a new generation
    assert "up to date" not in first.stdout and "(0 computed" in first.stdout
    replace_keeping_size_and_time(images / "img001.bmp", seed=42)
    assert "up to date" in ok("index", images, "--out", out, *MODEL).stdout  # sizes and times only: unseen
    assert ok("check", out).stdout.startswith(f"{out}: OK")
    found = run("check", out, "--verify-content")
    assert found.exit_code == 1 and "changed since they were described, e.g. img001.bmp" in found.stdout
    result = ok("index", images, "--out", out, *MODEL, "--verify-content")
    assert "(1 computed, 4 reused, 1 re-described" in result.stdout
    probe = tmp_path / "probe.bmp"
    shutil.copyfile(images / "img001.bmp", probe)
    assert top(out, probe) == ["img001.bmp"]
    assert ok("check", out, "--verify-content").stdout.startswith(f"{out}: OK")


def test_vanished_images_leave_unless_keep_missing(tmp_path):
    images = make_images(tmp_path / "images", 6)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    (images / "img005.png").unlink()
    assert "1 indexed image(s) no longer exist, e.g. img005.png" in run("check", out).stdout
    kept = ok("index", images, "--out", out, *MODEL, "--keep-missing")
    assert "indexed 6 images" in kept.stdout and "0 removed" in kept.stdout
    removed = ok("index", images, "--out", out, *MODEL)
    assert "indexed 5 images" in removed.stdout and "1 removed" in removed.stdout
    assert ok("check", out).stdout.startswith(f"{out}: OK")


def test_another_root_is_refused_and_appended_roots_survive(tmp_path):
    first, second = make_images(tmp_path / "first", 4), make_images(tmp_path / "second", 3, seed=3)
    out = tmp_path / "idx"
    ok("index", first, "--out", out, *MODEL)
    before = committed(out)
    line = one_error(run("index", second, "--out", out, *MODEL))
    assert f"holds an index of {first}, not of {second}: pass --append" in line and "(its 4 images leave it)" in line
    assert committed(out) == before
    ok("index", second, "--out", out, "--append", "-j", "0")
    appended = {str(second / f"img{i:03d}.png") for i in range(3)}
    again = ok("index", first, "--out", out, *MODEL)  # a plain re-run of the first root keeps them
    assert "indexed 7 images" in again.stdout and "0 removed" in again.stdout
    assert appended <= set(top(out, first / "img000.png", k=7))
    assert "up to date (7 images" in ok("index", first, "--out", out, *MODEL).stdout
    shutil.copyfile(first / "img000.png", second / "img001.png")  # an appended image replaced in place
    result = ok("index", second, "--out", out, "--append", "-j", "0")
    assert "(1 computed" in result.stdout and "1 re-described" in result.stdout
    (second / "img002.png").unlink()  # an appended image deleted: the next --append of its folder drops it
    kept = ok("index", second, "--out", out, "--append", "-j", "0", "--keep-missing")
    assert "up to date (7 images" in kept.stdout
    dropped = ok("index", second, "--out", out, "--append", "-j", "0")
    assert "indexed 6 images" in dropped.stdout and "1 removed" in dropped.stdout
    assert ok("check", out).exit_code == 0  # nothing vanished left behind


def test_refusals_that_mention_overwrite_say_what_it_drops(tmp_path):
    from simret.retrieval.store import write_store

    images = make_images(tmp_path / "images", 3)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    before = committed(out)
    lines = [
        one_error(run("index", images, "--out", out, "--append", "--scales", "1,0.5", "-j", "0")),
        one_error(run("index", images, "--out", out, *MODEL, "--scales", "1,0.5")),
    ]
    store = tmp_path / "other.h5"
    attrs = {"fingerprint": "another-encoder", "arch": "x", "pool": "y", "gamma": "none", "scales": [1.0], "dim": 4,
             "simret_version": "0", "created": "now"}
    write_store(store, np.eye(4, dtype=np.float32), list("abcd"), attrs)
    lines.append(one_error(run("index", "--from-descriptors", store, "--out", out)))
    assert "--append describes the new images as the index's were (leave out --model" in lines[0]
    for line in lines:
        assert "--overwrite" in line and ("drop its 3 images" in line or "its 3 images leave it" in line), line
    assert committed(out) == before


def _raised_messages(path: Path):
    """The literal text of every ``raise X("…")`` in a module (f-string parts joined, fields left out)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            parts = [n.value for n in ast.walk(node.exc.args[0]) if isinstance(n, ast.Constant)
                     and isinstance(n.value, str)]
            yield "".join(parts)


def test_no_error_message_advises_overwrite_without_saying_what_it_drops():
    modules = [path for package in ("simret/retrieval", "simret/commands") for path in (ROOT / package).rglob("*.py")]
    advice = [(path.name, text) for path in sorted(modules) for text in _raised_messages(path)
              if "--overwrite" in text and "--append and --overwrite" not in text]
    assert advice  # the scan sees the messages
    for name, text in advice:
        assert "leave it" in text or "drop" in text or "not written by simret" in text, (name, text)


def test_the_eval_cache_describes_a_changed_image_again(tmp_path):
    from simret.models import create_encoder
    from simret.retrieval.evaluation import EvalSettings, cached_descriptors
    from simret.retrieval.extraction import extract

    images = make_images(tmp_path / "images", 4)
    paths = sorted(images.glob("*.png"))
    encoder = create_encoder("test_resnet", weights=None)
    settings = EvalSettings(max_size=64, batch_size=4, workers=0)

    def cached():
        store, order = cached_descriptors(encoder, paths, tmp_path / "cache", settings, what="database",
                                          allow_failures=False)
        with store:
            return store.rows(order)

    before = cached()
    shutil.copyfile(make_images(tmp_path / "other", 1, seed=99) / "img000.png", paths[2])
    after = cached()
    fresh = extract(encoder, images, [p.name for p in paths], max_size=64, workers=0, progress=False).descriptors
    np.testing.assert_allclose(after, fresh, atol=1e-5)
    assert not np.allclose(before[2], after[2], atol=1e-3)
    np.testing.assert_array_equal(before[[0, 1, 3]], after[[0, 1, 3]])
