"""`simret index` / `simret search` end to end on tiny real photographs plus broken files: ranking, resume,
append, interrupted writes, fingerprint checks, output formats, FAISS vs numpy brute force."""
import errno
import json
import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
from cli_run import run

from simret.models import RandomWeightsWarning, create_encoder
from simret.retrieval import IndexDir, IndexSettings, build_index, extract
from simret.retrieval.indexdir import PARTIAL
from simret.retrieval.store import store_attrs, write_store

MODEL = ["--model", "test_resnet", "--weights", "none"]
FAST = ["--max-size", "64", "-j", "0", "-b", "4"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """36 real photographs (two landmarks and distractors) + a truncated JPEG and a text file named .jpg."""
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea", "rocket"], image_size=64, extra_distractors=0)
    folder = root / "rsample" / "jpg"
    good = (folder / "chelsea_easy_0.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])
    (folder / "readme.jpg").write_text("not a picture")
    (folder / "notes.txt").write_text("not listed: not an image extension")
    return folder




@pytest.fixture(scope="module")
def built(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    result = run("index", photos, "--out", out, *MODEL, *FAST, "--scales", "1,0.707")
    return out, result


def jsonl(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_index_writes_the_documented_files(built, photos):
    out, result = built
    assert "indexed 36 images" in result.stdout and "2 skipped" in result.stdout
    public = ["descriptors.h5", "index.faiss", "meta.json", "skipped.tsv"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        public + ["current", "generations"])
    generation = json.loads((out / "meta.json").read_text())["generation"]
    assert (out / "current").resolve() == (out / "generations" / generation).resolve()
    assert sorted(p.name for p in (out / "current").iterdir()) == public
    assert all((out / name).is_symlink() and (out / name).resolve() == (out / "current" / name).resolve()
               for name in public)
    skipped = (out / "skipped.tsv").read_text().splitlines()
    assert skipped[0] == "id\treason"
    reasons = dict(line.split("\t") for line in skipped[1:])
    assert set(reasons) == {"broken.jpg", "readme.jpg"}
    assert "truncated" in reasons["broken.jpg"] and "not an image" in reasons["readme.jpg"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 36 and meta["skipped"] == 2 and meta["scales"] == [1.0, 0.707] and meta["max_size"] == 64
    assert meta["index"]["kind"] == "flat" and meta["whitening"] == {"kind": "none"}
    assert meta["fingerprint"].startswith("test_resnet-simpool-") and meta["model"]["weights"] == "none"
    with h5py.File(out / "descriptors.h5", "r") as handle:
        ids = list(handle["ids"].asstr()[()])
        assert handle["descriptors"].shape == (36, 96) and handle.attrs["fingerprint"] == meta["fingerprint"]
    assert "chelsea_easy_0.jpg" in ids and "broken.jpg" not in ids


def test_every_query_image_ranks_itself_first(built, photos):
    out, _ = built
    names = ["query_chelsea_q0.jpg", "rocket_hard_1.jpg", "moon_0.jpg"]
    lines = jsonl(run("search", out, *[photos / n for n in names], "-k", "3", "--format", "jsonl"))
    assert [line["query"] for line in lines] == [str(photos / n) for n in names]
    for name, line in zip(names, lines):
        assert line["ids"][0] == name and line["scores"][0] == pytest.approx(1.0, abs=1e-4)
        assert len(line["ids"]) == len(line["scores"]) == 3 and line["scores"] == sorted(line["scores"], reverse=True)


def test_output_formats_agree_and_stdout_holds_only_results(built, photos):
    out, _ = built
    query = photos / "query_rocket_q1.jpg"
    as_json = jsonl(run("search", out, query, "-k", "4", "--format", "jsonl"))[0]
    tsv = run("search", out, query, "-k", "4", "--format", "tsv").stdout.splitlines()
    assert tsv[0] == "query\trank\tid\tscore"
    rows = [line.split("\t") for line in tsv[1:]]
    assert [r[0] for r in rows] == [str(query)] * 4 and [r[1] for r in rows] == ["1", "2", "3", "4"]
    assert [r[2] for r in rows] == as_json["ids"]
    np.testing.assert_allclose([float(r[3]) for r in rows], as_json["scores"], atol=1e-5)
    table = run("search", out, query, "-k", "4").stdout.splitlines()
    assert table[0] == f"query: {query}" and table[1].split() == ["rank", "score", "id"]
    assert [line.split()[2] for line in table[2:]] == as_json["ids"]


def test_search_equals_numpy_brute_force_over_the_store(built, photos, encoder):
    out, _ = built
    index_dir = IndexDir(out)
    with h5py.File(out / "descriptors.h5", "r") as handle:
        database, ids = handle["descriptors"][()], list(handle["ids"].asstr()[()])
    names = sorted(p.name for p in photos.glob("*_easy_*.jpg"))
    queries = extract(encoder, photos, names, scales=(1, 0.707), max_size=64, workers=0, progress=False)
    scores = queries.descriptors @ database.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :8]
    found_scores, found = index_dir.search(queries.descriptors, 8)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, expected, axis=1), atol=1e-5)
    lines = jsonl(run("search", out, *[photos / n for n in names], "-k", "8", "--format", "jsonl"))
    assert [line["ids"] for line in lines] == [[ids[i] for i in row] for row in expected]


def test_query_expansion_and_dba_match_their_formulas(built, photos, encoder):
    from simret.retrieval import alpha_qe, dba

    out, _ = built
    index_dir = IndexDir(out)
    with h5py.File(out / "descriptors.h5", "r") as handle:
        database = handle["descriptors"][()]
    query = extract(encoder, photos, ["query_chelsea_q1.jpg"], scales=(1, 0.707), max_size=64, workers=0,
                    progress=False).descriptors
    first = np.argsort(-(query @ database.T), axis=1, kind="stable")
    expanded = alpha_qe(query, database, first, 2, 3.0)
    expected = np.argsort(-(expanded @ database.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(index_dir.search(query, 5, qe=2, alpha=3.0)[1], expected)
    augmented = dba(database, 2, 3.0)
    expected = np.argsort(-(query @ augmented.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(index_dir.search(query, 5, dba=2, alpha=3.0)[1], expected)
    line = jsonl(run("search", out, photos / "query_chelsea_q1.jpg", "--qe", "2", "--dba", "2", "-k", "5",
                     "--format", "jsonl"))[0]
    assert len(line["ids"]) == 5


def test_rerun_is_up_to_date_and_descriptors_file_queries(built, photos, encoder, tmp_path):
    out, _ = built
    result = run("index", photos, "--out", out, *MODEL, *FAST, "--scales", "1,0.707")
    assert "up to date" in result.stdout
    stored = extract(encoder, photos, ["rocket_easy_0.jpg", "chelsea_hard_0.jpg"], scales=(1, 0.707), max_size=64,
                     workers=0, progress=False)
    path = write_store(tmp_path / "q.h5", stored.descriptors, stored.ids,
                       store_attrs(encoder.provenance(), scales=(1, 0.707), max_size=64))
    lines = jsonl(run("search", out, "--descriptors", path, "-k", "2", "--format", "jsonl"))
    assert [line["query"] for line in lines] == stored.ids
    assert [line["ids"][0] for line in lines] == stored.ids


def test_fingerprint_mismatch_is_refused_with_both_fingerprints(built, photos, tmp_path):
    out, _ = built
    index_fingerprint = json.loads((out / "meta.json").read_text())["fingerprint"]
    other = run("search", out, photos / "moon_0.jpg", "--model", "test_convnext", "--weights", "none", ok=False)
    assert other.exit_code == 1 and "test_convnext-simpool-" in other.output and index_fingerprint in other.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        convnext = create_encoder("test_convnext", weights=None)
    path = write_store(tmp_path / "other.h5", np.ones((1, convnext.dim), np.float32), ["x"],
                       store_attrs(convnext.provenance(), scales=(1,)))
    refused = run("search", out, "--descriptors", path, ok=False)
    assert refused.exit_code == 1 and convnext.fingerprint in refused.output and index_fingerprint in refused.output
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as handle:
        handle["descriptors"] = np.ones((1, 96), np.float32)
        handle["ids"] = np.array([b"x"])
    assert "fingerprint" in run("search", out, "--descriptors", bare, ok=False).output
    rebuild = run("index", photos, "--out", out, "--model", "test_convnext", "--weights", "none", *FAST, ok=False)
    assert rebuild.exit_code == 1 and "--overwrite" in rebuild.output and index_fingerprint in rebuild.output


def test_usage_errors(built, photos):
    out, _ = built
    assert run("search", out, ok=False).exit_code == 2  # neither images nor --descriptors
    assert "x1,y1,x2,y2" in run("search", out, photos / "moon_0.jpg", "--bbox", "1,2,3", ok=False).output
    missing = run("search", photos, photos / "moon_0.jpg", ok=False)
    assert missing.exit_code == 1 and "no simret index" in missing.output


def test_store_only_directory_then_a_searchable_index_from_the_same_descriptors(photos, tmp_path):
    out = tmp_path / "store"
    run("index", photos, "--out", out, *MODEL, *FAST, "--index", "none")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["index"]["kind"] == "none" and "index" not in meta["files"] and not (out / "index.faiss").exists()
    with h5py.File(out / "descriptors.h5") as handle:
        stored = handle["descriptors"][()]
    scanned = jsonl(run("search", out, photos / "moon_0.jpg", "-k", "5", "--qe", "2", "--format", "jsonl"))[0]
    assert "up to date" in run("index", photos, "--out", out, *MODEL, *FAST, "--index", "none").output
    flat = run("index", photos, "--out", out, *MODEL, *FAST, "--index", "flat").output
    assert "0 computed" in flat and (out / "index.faiss").exists()
    with h5py.File(out / "descriptors.h5") as handle:
        np.testing.assert_array_equal(handle["descriptors"][()], stored)
    assert run("search", out, photos / "moon_0.jpg", "-k", "1",
               "--format", "tsv").output.splitlines()[1].split("\t")[2] == "moon_0.jpg"
    indexed = jsonl(run("search", out, photos / "moon_0.jpg", "-k", "5", "--qe", "2", "--format", "jsonl"))[0]
    assert scanned["ids"] == indexed["ids"]  # the block-wise scan of the store answers as the flat index does
    np.testing.assert_allclose(scanned["scores"], indexed["scores"], atol=1e-5)
    assert "do not apply" in run("index", photos, "--out", tmp_path / "x", *MODEL, *FAST, "--index", "none",
                                 "--whiten", "pca", ok=False).output


def test_empty_folder_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import simret.commands.options as options

    monkeypatch.setattr(options, "build_encoder", lambda *a, **k: pytest.fail("model built before the listing"))
    (tmp_path / "empty").mkdir()
    result = run("index", tmp_path / "empty", "--out", tmp_path / "idx", "--model", "resnet50", "--weights", "timm",
                 ok=False)
    assert result.exit_code == 1 and "no images" in result.output and not (tmp_path / "idx").exists()


def test_bbox_crops_the_query(built, photos):
    out, _ = built
    whole = jsonl(run("search", out, photos / "query_chelsea_q0.jpg", "-k", "1", "--format", "jsonl"))[0]
    cropped = jsonl(run("search", out, photos / "query_chelsea_q0.jpg", "--bbox", "0,0,20,20", "-k", "1",
                        "--format", "jsonl"))[0]
    assert whole["scores"][0] == pytest.approx(1.0, abs=1e-4) and cropped["scores"][0] < 0.9999


# ------------------------------------------------------------------------- resume, append, atomicity


class Interrupt(KeyboardInterrupt):
    pass


def counting(encoder, stop_after=None):
    """Count the images the encoder sees (per scale-1 pass); raise Interrupt after ``stop_after`` batches."""
    seen = {"images": 0, "batches": 0}
    forward = type(encoder).forward

    def wrapped(images):
        if stop_after is not None and seen["batches"] >= stop_after:
            raise Interrupt()
        seen["batches"] += 1
        seen["images"] += images.shape[0]
        return forward(encoder, images)

    encoder.forward = wrapped
    return seen


def fresh_encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet", weights=None)


SETTINGS = dict(max_size=64, batch_size=4, workers=0, checkpoint_every=4)


def test_interrupted_run_resumes_without_recomputing(photos, tmp_path):
    out = tmp_path / "idx"
    encoder = fresh_encoder()
    seen = counting(encoder, stop_after=5)
    with pytest.raises(Interrupt):
        build_index(photos, out, encoder, IndexSettings(**SETTINGS), progress=False)
    done = seen["images"]
    assert done >= 4 and not (out / "meta.json").exists() and list((out / PARTIAL).glob("part-*.h5"))
    encoder = fresh_encoder()
    seen = counting(encoder)
    summary = build_index(photos, out, encoder, IndexSettings(**SETTINGS), progress=False)
    assert summary.reused == done and summary.computed == 36 - done and seen["images"] == 36 - done
    assert summary.count == 36 and summary.skipped == 2 and not (out / PARTIAL).exists()
    clean = build_index(photos, tmp_path / "clean", fresh_encoder(), IndexSettings(**SETTINGS), progress=False)
    assert clean.count == 36
    with h5py.File(out / "descriptors.h5", "r") as a, h5py.File(tmp_path / "clean" / "descriptors.h5", "r") as b:
        assert list(a["ids"].asstr()[()]) == list(b["ids"].asstr()[()])
        np.testing.assert_allclose(a["descriptors"][()], b["descriptors"][()], atol=1e-5)
    encoder = fresh_encoder()
    seen = counting(encoder)
    again = build_index(photos, out, encoder, IndexSettings(**SETTINGS), progress=False)
    assert again.up_to_date and seen["images"] == 0  # only the two unreadable files are retried


def test_append_adds_new_images_to_the_existing_index(photos, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for path in sorted(photos.glob("*.jpg")):
        target = first if path.name.startswith(("chelsea", "query_chelsea", "broken")) else second
        shutil.copy(path, target / path.name)
    out = tmp_path / "idx"
    run("index", first, "--out", out, *MODEL, *FAST, "--index", "flat")
    before = IndexDir(out)
    old_ids = list(before.ids)
    result = run("index", second, "--out", out, "--append", "-j", "0")  # model and settings from meta.json
    assert len(old_ids) == 8 and "indexed 36 images" in result.stdout
    after = IndexDir(out)
    assert after.ids[:8] == old_ids and after.index.ntotal == len(after.ids) == 36
    new_id = str((second / "rocket_easy_0.jpg").resolve())  # outside the first root: an absolute id
    assert new_id in after.ids
    skipped = (out / "skipped.tsv").read_text()
    assert "broken.jpg" in skipped and "readme.jpg" in skipped  # old and new failures both listed
    line = jsonl(run("search", out, second / "rocket_easy_0.jpg", "-k", "1", "--format", "jsonl"))[0]
    assert line["ids"] == [new_id]


def committed_files(out):
    """The bytes of every public file of the committed generation, and which generation it is."""
    return {p.name: p.read_bytes() for p in (out / "current").iterdir()}, os.readlink(out / "current")


def test_failed_write_leaves_the_previous_index_intact(photos, tmp_path, monkeypatch):
    from simret.retrieval.index import Index

    out = tmp_path / "idx"
    subset = tmp_path / "list.txt"
    subset.write_text("\n".join(str(p) for p in sorted(photos.glob("chelsea*.jpg"))) + "\n")
    build_index(subset, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False)
    files = committed_files(out)
    query = photos / "chelsea_easy_1.jpg"
    before = run("search", out, query, "--format", "jsonl").stdout

    encoder = fresh_encoder()
    seen = counting(encoder, stop_after=2)
    with pytest.raises(Interrupt):  # interrupted during extraction
        build_index(photos, out, encoder, IndexSettings(**SETTINGS), progress=False, append=True)
    assert seen["images"] > 0
    assert committed_files(out) == files  # nothing replaced
    assert run("search", out, query, "--format", "jsonl").stdout == before

    def failing_save(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Index, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device.*previous index in .* is intact"):
        build_index(photos, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False, append=True)
    monkeypatch.undo()
    assert committed_files(out) == files
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # the unfinished generation is gone
    assert sorted(p.name for p in (out / "generations").iterdir()) == [files[1].split("/")[-1]]
    assert run("search", out, query, "--format", "jsonl").stdout == before


def test_inconsistent_directory_is_detected(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    meta_path = copy / "current" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["store_generation"] = "0" * 32
    meta_path.unlink()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different runs"):
        IndexDir(copy)


def test_whitening_ivfpq_and_hnsw_indexes(photos, tmp_path, encoder):
    learn = tmp_path / "learn.txt"
    learn.write_text("\n".join(str(p) for p in sorted(photos.glob("*_[01].jpg"))) + "\n")
    out = tmp_path / "white"
    run("index", photos, "--out", out, *MODEL, *FAST, "--whiten", "pca", "--whiten-on", learn, "--whiten-dim", "8",
        "--index", "hnsw")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["whitening"]["kind"] == "pca" and meta["whitening"]["out_dim"] == 8
    assert meta["whitening"]["learned_on"] == str(learn) and meta["index"]["dim"] == 8
    assert meta["index"]["kind"] == "hnsw" and (out / "whitening.npz").is_file()
    line = jsonl(run("search", out, photos / "moon_1.jpg", "-k", "1", "--format", "jsonl"))[0]
    assert line["scores"][0] == pytest.approx(1.0, abs=1e-4)
    ivf = tmp_path / "ivf"
    run("index", photos, "--out", ivf, *MODEL, *FAST, "--index", "ivfpq", "--index-param", "nlist=2",
        "--index-param", "m=8", "--index-param", "nbits=4")
    meta = json.loads((ivf / "meta.json").read_text())
    assert meta["index"]["kind"] == "ivfpq" and meta["index"]["params"]["nlist"] == 2
    assert meta["index"]["params"]["m"] == 8 and meta["index"]["bytes_per_vector"] < 4 * 96
    query = extract(encoder, photos, ["moon_1.jpg"], max_size=64, workers=0, progress=False).descriptors
    with h5py.File(ivf / "descriptors.h5", "r") as handle:
        database, ids = handle["descriptors"][()], list(handle["ids"].asstr()[()])
    exact = np.argsort(-(query @ database.T)[0], kind="stable")[:3]
    line = jsonl(run("search", ivf, photos / "moon_1.jpg", "-k", "3", "--format", "jsonl"))[0]
    assert line["ids"] == [ids[i] for i in exact]  # candidates re-scored with the stored descriptors
    np.testing.assert_allclose(line["scores"], (query @ database.T)[0][exact], atol=1e-5)
    coarse = jsonl(run("search", ivf, photos / "moon_1.jpg", "-k", "3", "--rerank", "0", "--format", "jsonl"))[0]
    assert not np.allclose(coarse["scores"], line["scores"], atol=1e-4)  # compressed-code scores


def test_ctrl_c_at_the_commit_gives_the_old_or_the_new_generation_whole(photos, tmp_path, monkeypatch):
    import signal

    out = tmp_path / "idx"
    subset = tmp_path / "list.txt"
    subset.write_text("\n".join(str(p) for p in sorted(photos.glob("rocket*.jpg"))) + "\n")
    build_index(subset, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False)
    old = committed_files(out)
    replace, rename = os.replace, os.rename

    def interrupted(operation, when):
        def run_then_interrupt(source, target):
            operation(source, target)
            if when(os.fspath(target)):
                signal.raise_signal(signal.SIGINT)
        return run_then_interrupt

    # Ctrl-C right after the new generation's folder is in place, before `current` points to it: the old one
    monkeypatch.setattr(os, "rename", interrupted(rename, lambda target: "/generations/" in target))
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False, append=True)
    monkeypatch.undo()
    assert committed_files(out) == old and len(IndexDir(out).ids) == 6

    # Ctrl-C while `current` is replaced: held until the public names are linked too, then the new one, whole
    monkeypatch.setattr(os, "replace", interrupted(replace, lambda target: target.endswith("/current")))
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False, append=True)
    monkeypatch.undo()
    index_dir = IndexDir(out)
    assert len(index_dir.ids) == index_dir.index.ntotal == 36 and committed_files(out)[1] != old[1]
    assert all((out / name).resolve().parent == (out / "current").resolve() for name in old[0])
    assert len(list((out / "generations").iterdir())) == 2  # the orphan of the first attempt, until the next write
    build_index(photos, out, fresh_encoder(), IndexSettings(**SETTINGS), progress=False, append=True)
    assert len(list((out / "generations").iterdir())) == 1
