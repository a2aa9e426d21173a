"""Damaged index directories (issue 11, item 4): a flipped byte in any file, a malformed or foreign meta.json,
a missing file, a `current` link to nowhere, an older format. Each is one error line for readers naming the
file and the repair, a problem in `simret check` (exit status 1), and is repaired by `simret index` (never
"up to date" over damage) or `simret check --repair`, without describing again what is intact."""
import json
import shutil

import numpy as np
import pytest
from index_campaign import (
    MODEL,
    answer,
    chunk_offsets,
    copy_index,
    finish,
    flip,
    generation,
    make_images,
    ok,
    one_error,
    queries,
    run,
    simret_main,
    start,
    write_format1,
)

IMAGES = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = make_images(tmp_path_factory.mktemp("images"), IMAGES)
    (folder / "broken.png").write_text("not a picture")  # so that skipped.tsv has a row
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """An intact index with whitening (all five files), and the answer it gives."""
    out = tmp_path_factory.mktemp("ref") / "idx"
    ok("index", images, "--out", out, *MODEL, "--whiten", "pca")
    return out, answer(out, queries(), k=3)


@pytest.fixture
def damaged(reference, tmp_path):
    return copy_index(reference[0], tmp_path / "idx")


def index_again(images, out):
    return ok("index", images, "--out", out, *MODEL, "--whiten", "pca")


def assert_repaired(out, reference, result, computed):
    assert "up to date" not in result.stdout and f"({computed} computed" in result.stdout, result.output
    report = ok("check", out)
    assert f"{out}: OK" in report.stdout
    assert answer(out, queries(), k=3) == reference[1]


def check_problem(out, *expected):
    report = run("check", out)
    assert report.exit_code == 1 and "PROBLEM" in report.stdout, report.output
    for text in expected:
        assert text in report.stdout, report.stdout
    return report.stdout


# ---------------------------------------------------------------------------------------- derived files


@pytest.mark.parametrize("name", ["index.faiss", "whitening.npz", "skipped.tsv"])
def test_a_flipped_byte_in_a_derived_file_is_named_and_rebuilt_without_describing(images, reference, damaged,
                                                                                   name, tmp_path):
    path = generation(damaged) / name
    flip(path, path.stat().st_size // 2)
    check_problem(damaged, f"PROBLEM: {damaged / name} is damaged")
    search = run("search", damaged, images / "img001.png", "-k", "2")
    if name == "skipped.tsv":  # not needed to answer
        assert search.exit_code == 0, search.output
    else:
        line = one_error(search)
        assert f"{damaged / name} is damaged" in line and f"simret check {damaged} --repair" in line
    by_check = copy_index(damaged, tmp_path / "by-check")
    repaired = ok("check", by_check, "--repair")
    assert "repaired:" in repaired.output and "(0 computed" in repaired.output and f"{by_check}: OK" in repaired.stdout
    result = index_again(images, damaged)
    assert "repairing it" in result.output
    assert_repaired(damaged, reference, result, computed=0)


# ---------------------------------------------------------------------------------------- the store


def test_a_flipped_byte_in_a_descriptor_chunk_describes_those_rows_again(images, reference, damaged):
    store = generation(damaged) / "descriptors.h5"
    flip(store, chunk_offsets(store, "descriptors")[0] + 100)
    check_problem(damaged, f"{damaged / 'descriptors.h5'} is damaged (rows 0-{IMAGES - 1} fail their checksums")
    result = index_again(images, damaged)
    assert f"{IMAGES} re-described" in result.stdout
    assert_repaired(damaged, reference, result, computed=IMAGES)


def test_repair_of_a_store_whose_every_row_is_damaged_says_so(images, reference, damaged, tmp_path):
    from simret.retrieval.store import write_store

    store = generation(damaged) / "descriptors.h5"
    flip(store, chunk_offsets(store, "descriptors")[0] + 100)
    before = {p.name: p.read_bytes() for p in generation(damaged).iterdir()}
    line = one_error(run("check", damaged, "--repair"))
    assert f"{damaged / 'descriptors.h5'} holds no usable descriptor ({IMAGES} rows" in line
    assert "describe the images again with your simret index command" in line
    assert {p.name: p.read_bytes() for p in generation(damaged).iterdir()} == before
    empty = tmp_path / "empty.h5"
    write_store(empty, np.zeros((0, 96), np.float32), [], {"fingerprint": "f", "arch": "a", "pool": "p",
                "gamma": "none", "scales": [1.0], "dim": 96, "simret_version": "0", "created": "now"})
    assert "empty.h5 holds no usable descriptor (0 rows" in one_error(run("index", "--from-descriptors", empty,
                                                                         "--out", tmp_path / "new"))


@pytest.mark.parametrize("where", ["the id strings", "the id references"])
def test_damaged_ids_are_one_error_and_repaired_by_describing_again(images, reference, damaged, where):
    store = generation(damaged) / "descriptors.h5"
    offset = store.read_bytes().find(b"img003.png") + 3 if where == "the id strings" \
        else chunk_offsets(store, "ids")[0] + 5
    flip(store, offset)
    check_problem(damaged, f"{damaged / 'descriptors.h5'}: its ids are damaged")
    line = one_error(run("search", damaged, images / "img001.png"))
    assert f"{damaged / 'descriptors.h5'} is damaged" in line and "run your simret index command" in line
    assert_repaired(damaged, reference, index_again(images, damaged), computed=IMAGES)


def test_damaged_file_states_keep_the_intact_descriptors(images, reference, damaged, tmp_path):
    store = generation(damaged) / "descriptors.h5"
    flip(store, chunk_offsets(store, "mtimes")[0] + 20)
    check_problem(damaged, "the file states of rows", "their descriptors are intact")
    by_check = copy_index(damaged, tmp_path / "by-check")
    repaired = ok("check", by_check, "--repair")
    assert f"indexed {IMAGES} images" in repaired.output and "(0 computed" in repaired.output
    assert answer(by_check, queries(), k=3) == reference[1]  # nothing dropped
    result = index_again(images, damaged)  # whether the images changed is unknown: they are described again
    assert_repaired(damaged, reference, result, computed=IMAGES)


@pytest.mark.parametrize("where", ["superblock", "dataset name"])
def test_damaged_hdf5_structure_is_one_error_naming_the_store(images, reference, damaged, where):
    store = generation(damaged) / "descriptors.h5"
    flip(store, 10 if where == "superblock" else store.read_bytes().find(b"descriptors") + 2)
    check_problem(damaged, f"{damaged / 'descriptors.h5'} is unreadable")
    line = one_error(run("search", damaged, images / "img001.png"))
    assert f"{damaged / 'descriptors.h5'} is damaged" in line and "run your simret index command" in line
    assert_repaired(damaged, reference, index_again(images, damaged), computed=IMAGES)


def test_a_store_claiming_billions_of_rows_is_found_damaged_not_read_forever(images, reference, damaged, tmp_path):
    import h5py

    with h5py.File(generation(damaged) / "descriptors.h5", "r+") as handle:  # what a flipped dataspace byte does
        handle["sizes"].resize((1 << 40,))
    checking = start(simret_main, ["check", damaged], tmp_path / "log")
    assert finish(checking) == 1  # within the deadline: not chunk after chunk of 2^40 rows
    assert "sizes do not match its 8 rows" in (tmp_path / "log").read_text()
    assert_repaired(damaged, reference, index_again(images, damaged), computed=IMAGES)


# ---------------------------------------------------------------------------------------- meta.json


def _edited(**changes):
    def edit(text):
        meta = json.loads(text)
        for key, value in changes.items():
            if value is KeyError:
                meta.pop(key)
            else:
                meta[key] = value
        return json.dumps(meta)
    return edit


META_DAMAGE = {
    "not JSON": (lambda text: text[:40], "is not readable JSON"),
    "empty": (lambda text: "", "is not readable JSON"),
    "binary": (lambda text: b"\xff\xfe\x00garbage", "is not readable JSON"),
    "a JSON list": (lambda text: "[1, 2]", "a JSON list in a generation simret wrote"),
    "format flipped": (lambda text: text.replace('"simret-index"', '"simret-indey"'), "format 'simret-indey'"),
    "format_version a string": (_edited(format_version="2"), "format_version '2'"),
    "count a string": (_edited(count="ten"), "missing or malformed: count"),
    "scales a string": (_edited(scales="abc"), "missing or malformed: scales"),
    "files a number": (_edited(files=5), "missing or malformed: files"),
    "files left out": (_edited(files=KeyError), "missing or malformed: files"),
    "root a number": (_edited(root=5), "missing or malformed: root"),
    "model null": (_edited(model=None), "missing or malformed: model"),
    "generation null": (_edited(generation=None), "missing or malformed: generation"),
    "max_size a string": (_edited(max_size="big"), "missing or malformed: max_size"),
    "another fingerprint": (_edited(fingerprint="other-encoder"), "come from different runs"),
    "another count": (_edited(count=3), "come from different runs"),
    "another root": (_edited(root="/elsewhere"), "come from different runs"),
    "other scales": (_edited(scales=[1.5]), "come from different runs"),  # queries would be described wrongly
}


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_a_damaged_meta_json_is_named_and_repaired_without_describing(images, reference, damaged, case):
    edit, problem = META_DAMAGE[case]
    path = generation(damaged) / "meta.json"
    damage = edit(path.read_text())
    path.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    check_problem(damaged, problem)
    line = one_error(run("search", damaged, images / "img001.png"))
    assert str(damaged) in line and f"simret check {damaged} --repair" in line
    result = index_again(images, damaged)
    assert "repairing it" in result.output
    assert_repaired(damaged, reference, result, computed=0)


def test_append_over_a_damaged_meta_json_takes_the_model_from_the_store(images, reference, damaged, tmp_path):
    (generation(damaged) / "meta.json").write_text("{oops")
    more = make_images(tmp_path / "more", 2, seed=5)
    result = ok("index", more, "--out", damaged, "--append", "-j", "0")  # no model options: they follow the index
    assert f"indexed {IMAGES + 2} images" in result.stdout and "(2 computed" in result.stdout
    assert ok("check", damaged).stdout.startswith(f"{damaged}: OK")


def test_a_newer_format_is_refused_and_left_alone(images, damaged):
    path = generation(damaged) / "meta.json"
    path.write_text(_edited(format_version=99)(path.read_text()))
    before = {p.name: p.read_bytes() for p in generation(damaged).iterdir()}
    for args in (("search", damaged, images / "img001.png"), ("check", damaged), ("check", damaged, "--repair"),
                 ("index", images, "--out", damaged, *MODEL)):
        assert "written by a newer simret (index format 99" in one_error(run(*args))
    assert {p.name: p.read_bytes() for p in generation(damaged).iterdir()} == before


def test_a_foreign_meta_json_is_refused_not_replaced(images, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "meta.json").write_text('{"name": "another tool"}')
    for args in (("search", out, images / "img001.png"), ("index", images, "--out", out, *MODEL)):
        assert "not a simret index description (format None" in one_error(run(*args))
    assert (out / "meta.json").read_text() == '{"name": "another tool"}' and sorted(p.name for p in out.iterdir()) \
        == [".simret.lock", "meta.json"]


# ---------------------------------------------------------------------------------------- missing pieces


@pytest.mark.parametrize("name, computed", [("index.faiss", 0), ("whitening.npz", 0), ("skipped.tsv", 0),
                                            ("meta.json", 0), ("descriptors.h5", IMAGES)])
def test_a_missing_file_is_named_and_restored(images, reference, damaged, name, computed):
    (generation(damaged) / name).unlink()
    check_problem(damaged, f"{damaged / name} is missing")
    if name != "skipped.tsv":
        line = one_error(run("search", damaged, images / "img001.png"))
        assert f"{damaged / name} is missing" in line and "--repair" in line
    assert_repaired(damaged, reference, index_again(images, damaged), computed=computed)


def test_missing_public_names_are_linked_again(images, reference, damaged):
    for name in ("index.faiss", "meta.json", "whitening.npz"):
        (damaged / name).unlink()
    assert answer(damaged, queries(), k=3) == reference[1]  # readers go through `current`
    assert "up to date" in index_again(images, damaged).stdout
    assert all((damaged / name).resolve() == generation(damaged) / name for name in ("index.faiss", "whitening.npz"))


def test_current_naming_a_missing_generation_falls_back_to_the_newest_complete_one(images, reference, damaged):
    (damaged / "current").unlink()
    (damaged / "current").symlink_to("generations/000009-deadbeef")
    line = one_error(run("search", damaged, images / "img001.png"))
    assert f"{damaged / 'current'} names generations/000009-deadbeef, which does not exist" in line
    check_problem(damaged, "names generations/000009-deadbeef, which does not exist",
                  "the newest complete generation, is used")
    assert_repaired(damaged, reference, index_again(images, damaged), computed=0)
    assert len(list((damaged / "generations").iterdir())) == 1


def test_current_naming_a_removed_generation_is_rebuilt_from_the_images(images, reference, damaged):
    shutil.rmtree(generation(damaged))
    assert "which does not exist" in one_error(run("search", damaged, images / "img001.png"))
    check_problem(damaged, "which does not exist")
    assert_repaired(damaged, reference, index_again(images, damaged), computed=IMAGES)


# ---------------------------------------------------------------------------------------- older formats


def test_a_format_1_directory_is_read_then_migrated_without_describing(images, reference, tmp_path):
    old = write_format1(reference[0], tmp_path / "v1")
    assert answer(old, queries(), k=3) == reference[1]
    assert ok("check", old).stdout.startswith(f"{old}: OK")
    result = index_again(images, old)  # never "up to date" over an older format: migrated
    assert_repaired(old, reference, result, computed=0)
    assert (old / "current").is_symlink() and all((old / n).is_symlink() for n in ("meta.json", "descriptors.h5"))
    assert json.loads((old / "meta.json").read_text())["format_version"] == 2
    assert "up to date" in index_again(images, old).stdout


def test_appending_to_a_format_1_directory_keeps_its_images(images, reference, tmp_path):
    old = write_format1(reference[0], tmp_path / "v1")
    more = make_images(tmp_path / "more", 2, seed=5)
    result = ok("index", more, "--out", old, "--append", "-j", "0")
    assert f"indexed {IMAGES + 2} images" in result.stdout and "(2 computed" in result.stdout
    ids = answer(old, queries(), k=IMAGES + 2)[1][0]
    assert {f"img{i:03d}.png" for i in range(IMAGES)} <= set(ids)


# ---------------------------------------------------------------------------------------- known gaps


def test_ivfpq_rescoring_never_answers_from_a_damaged_row(tmp_path):
    """Re-scoring gathers rows through a memory map; each chunk is checked the first time it is touched."""
    images = make_images(tmp_path / "images", 40)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL, "--index", "ivfpq", "--index-param", "nlist=2",
       "--index-param", "m=8", "--index-param", "nbits=4")
    store = generation(out) / "descriptors.h5"
    flip(store, chunk_offsets(store, "descriptors")[0] + 96 * 4 * 1 + 3)  # row 1 (img001), first value
    result = run("search", out, images / "img001.png", "-k", "3", "--format", "jsonl")
    assert result.exit_code != 0 or json.loads(result.stdout)["ids"][0] == "img001.png"
    if result.exit_code:
        assert "descriptors.h5 is damaged" in result.output and "simret index command" in result.output
