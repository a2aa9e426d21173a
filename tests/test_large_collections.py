"""Collections beyond RAM and beyond one machine: streamed builds equal in-memory ones, block-wise exact search
equals flat search, memory budgets, memory-mapped indexes, shards + merge equal one run, recall in meta.json.

Tiny block and chunk sizes force every streamed path through many blocks."""
import json

import numpy as np
import pytest
from cli_run import run

from simret.retrieval import store as store_module
from simret.retrieval.budget import choose_index, index_bytes, parse_size
from simret.retrieval.exact import RunningTopK, exact_search, recall_at
from simret.retrieval.index import Index
from simret.retrieval.indexdir import IndexDir, IndexSettings
from simret.retrieval.indexdir.build import build_from_store
from simret.retrieval.indexdir.shards import select_shard, shard_of
from simret.retrieval.rerank import dba
from simret.retrieval.store import read_store, store_attrs, write_store
from simret.utils import h5checked

MODEL = ["--model", "test_resnet", "--weights", "none"]
FAST = ["--max-size", "64", "-j", "0", "-b", "4"]


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def provenance(dim):
    return {"fingerprint": f"test-simpool-{dim:016x}", "arch": "test", "pool": "simpool", "gamma": "none",
            "weights": "random", "dim": dim, "simret_version": "0"}


def damage_chunk(path, chunk):
    """Invert a byte of descriptor chunk number ``chunk`` of the store at ``path``; returns rows per chunk."""
    import h5py

    with h5py.File(path, "r") as handle:
        rows_per_chunk = handle["descriptors"].chunks[0]
        offsets = store_module._chunk_offsets(handle["descriptors"], rows_per_chunk)
    data = bytearray(path.read_bytes())
    data[offsets[chunk] + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    return rows_per_chunk


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Stores of a few rows per chunk and per block: every streamed path runs over many blocks."""
    monkeypatch.setattr(h5checked, "CHUNK_BYTES", 64 * 4)
    monkeypatch.setattr(store_module, "BLOCK_BYTES", 3 * 64 * 4)




@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea", "rocket"], image_size=64, extra_distractors=0)
    return root / "rsample" / "jpg"


# ------------------------------------------------------------------------------------------- exact search


def test_running_top_k_over_blocks_equals_a_full_sort():
    database, queries = unit_rows(500, 16), unit_rows(7, 16, seed=1)
    database[10] = database[20]  # a tie: the lower row first, as a stable sort over everything
    queries[0] = database[10]
    truth = np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :12]
    blocks = [(start, database[start:start + 37]) for start in range(0, 500, 37)]
    scores, rows = exact_search(blocks, queries, 12)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, truth, axis=1), atol=1e-6)
    assert rows[0, 0] == 10 and rows[0, 1] == 20
    _, without_self = exact_search(blocks, database[:3], 5, exclude=np.arange(3))
    assert not (without_self == np.arange(3)[:, None]).any()
    top = RunningTopK(1, 3)
    top.add(np.array([[0.5, 0.9]]), 0)
    top.add(np.array([[0.7]]), 2)
    assert top.result()[1].tolist() == [[1, 2, 0]]
    assert recall_at(np.array([[1, 2, 9]]), np.array([[1, 2, 3]]), 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sampled_rows_are_gathered_in_one_streamed_pass(tmp_path, tiny_blocks, dtype):
    x = unit_rows(103, 16, seed=5)
    path = tmp_path / "store.h5"
    write_store(path, x, [f"{i}.jpg" for i in range(103)], store_attrs(provenance(16), scales=(1.0,)), dtype=dtype)
    picked = np.sort(np.random.default_rng(1).choice(103, 37, replace=False))
    with store_module.StoreReader(path) as reader:
        sampled = reader.sampled_rows(picked)
        assert sampled.dtype == np.float32 and sampled.shape == (37, 16)
        np.testing.assert_array_equal(sampled, reader.rows(picked))
        np.testing.assert_array_equal(reader.sampled_rows([102]), reader.rows([102]))
        assert reader.sampled_rows(np.zeros(0, np.int64)).shape == (0, 16)
    with store_module.RowAccess(path) as access:  # closes (unmaps) on exit
        np.testing.assert_array_equal(access[picked].astype(np.float32), sampled)
    assert access._map is None and access._rows_at is None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_read_with_pread_equal_the_memory_map_and_leave_nothing_mapped(tmp_path, tiny_blocks, dtype):
    """``RowAccess(mapped=False)`` (recall measurement over a large store) gathers the same rows as the memory
    map, unsorted and repeated, from chunked stores (checksummed) and from a contiguous one another program
    wrote; a damaged chunk is still named, and a truncated file is an error, not zeros."""
    import h5py

    x = unit_rows(103, 16, seed=5)
    chunked = write_store(tmp_path / "store.h5", x, [f"{i}.jpg" for i in range(103)],
                          store_attrs(provenance(16), scales=(1.0,)), dtype=dtype)
    contiguous = tmp_path / "plain.h5"
    with h5py.File(contiguous, "w") as handle:
        handle["descriptors"] = x.astype(dtype)
    wanted = np.array([102, 5, 6, 7, 5, 0, 64, 65, 1, 101, 102])
    for path in (chunked, contiguous):
        with store_module.RowAccess(path) as mapped, store_module.RowAccess(path, mapped=False) as read:
            assert read._map is None and mapped._map is not None
            np.testing.assert_array_equal(read[wanted], mapped[wanted])
            assert read[wanted].dtype == np.dtype(dtype) and read[[]].shape == (0, 16)
            with pytest.raises(IndexError):
                read[[103]]

    rows_per_chunk = damage_chunk(chunked, 3)
    first, last = 3 * rows_per_chunk, 4 * rows_per_chunk - 1
    with store_module.RowAccess(chunked, mapped=False) as read:
        np.testing.assert_array_equal(read[[0, 100]], x[[0, 100]].astype(dtype))
        with pytest.raises(store_module.StoreDamagedError, match=f"rows {first}-{last}"):
            read[[first + 1]]

    whole = contiguous.read_bytes()
    with store_module.RowAccess(contiguous, mapped=False) as read:
        contiguous.write_bytes(whole[:len(whole) - 40])  # cut under the open reader
        with pytest.raises(store_module.StoreDamagedError, match="truncated"):
            read[[102]]


def test_a_streamed_block_over_a_damaged_chunk_names_that_chunk(tmp_path, monkeypatch):
    """Blocks of many chunks (16 MB in real stores): the error names the damaged chunk's rows, not the block's."""
    monkeypatch.setattr(h5checked, "CHUNK_BYTES", 64 * 4)  # a few rows per chunk, every row in one block
    x = unit_rows(103, 16, seed=6)
    path = write_store(tmp_path / "store.h5", x, [f"{i}.jpg" for i in range(103)],
                       store_attrs(provenance(16), scales=(1.0,)))
    rows_per_chunk = damage_chunk(path, 5)
    first, stop = 5 * rows_per_chunk, 6 * rows_per_chunk
    with store_module.StoreReader(path) as store:
        assert store_module.block_rows(16, store.dtype) >= 103  # one block holds every chunk
        with pytest.raises(store_module.StoreDamagedError, match=f"rows {first}-{stop - 1}: ") as caught:
            list(store.blocks())
        assert caught.value.rows == [(first, stop)]
        with pytest.raises(store_module.StoreDamagedError) as caught:
            store.rows([first + 1, first + 2])  # a read from the middle of the chunk names the whole chunk
        assert caught.value.rows == [(first, stop)]
        np.testing.assert_array_equal(store.rows([0, 102]), x[[0, 102]])  # the other chunks still read


def test_store_only_directory_is_searched_exactly_block_by_block(tmp_path, tiny_blocks):
    database = unit_rows(300, 64)
    ids = [f"img{i:03d}.jpg" for i in range(300)]
    source = write_store(tmp_path / "s.h5", database, ids, store_attrs(provenance(64), scales=(1,)))
    build_from_store(tmp_path / "none", IndexSettings(kind="none"), source=source, progress=False)
    build_from_store(tmp_path / "flat", IndexSettings(kind="flat"), source=source, progress=False)
    queries = unit_rows(5, 64, seed=3)
    scanned, flat = IndexDir(tmp_path / "none"), IndexDir(tmp_path / "flat")
    assert not scanned.searchable and scanned.store.count == 300
    for options in ({}, {"qe": 3}):
        s1, r1 = scanned.search(queries, 10, **options)
        s2, r2 = flat.search(queries, 10, **options)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_streamed_dba_equals_the_in_memory_formula(tmp_path, tiny_blocks):
    database = unit_rows(120, 64)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(120)],
                         store_attrs(provenance(64), scales=(1,)))
    build_from_store(tmp_path / "flat", IndexSettings(kind="flat"), source=source, progress=False)
    queries = unit_rows(4, 64, seed=5)
    scores, rows = IndexDir(tmp_path / "flat").search(queries, 8, dba=3, alpha=2.0)
    augmented = dba(database, 3, 2.0)
    truth = np.argsort(-(queries @ augmented.T), axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ augmented.T, truth, axis=1), atol=1e-5)


# --------------------------------------------------------------------------------------- streamed builds


@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivfpq", {"nlist": 8, "m": 8, "nbits": 6})])
def test_streamed_build_equals_the_in_memory_one(tmp_path, tiny_blocks, kind, params):
    database = unit_rows(2000, 64)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(2000)],
                         store_attrs(provenance(64), scales=(1,)))
    build_from_store(tmp_path / "idx", IndexSettings(kind=kind, index_params=params), source=source, progress=False)
    streamed = IndexDir(tmp_path / "idx")
    in_memory = Index.create(64, kind, n_hint=2000, **params)
    in_memory.train(database, train_size=2000, seed=0)  # the same sample (all rows) and seed
    in_memory.add(database)
    queries = unit_rows(20, 64, seed=7)
    np.testing.assert_array_equal(streamed.index.search(queries, 10, rerank=0)[1],
                                  in_memory.search(queries, 10, rerank=0)[1])
    if kind != "flat":
        recall = streamed.meta["index"]["recall_at_10"]
        assert 0 < recall <= 1 and streamed.meta["index"]["recall_queries"] == 1000
        assert ("recall_at_10_rescored" in streamed.meta["index"]) == (kind == "ivfpq")
    else:
        assert "recall_at_10" not in streamed.meta["index"]  # exact: nothing to measure


def test_hnsw_built_block_by_block_finds_the_exact_neighbours(tmp_path, tiny_blocks):
    database = unit_rows(2000, 32)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(2000)],
                         store_attrs(provenance(32), scales=(1,)))
    build_from_store(tmp_path / "idx", IndexSettings(kind="hnsw"), source=source, progress=False)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())["index"]
    assert meta["kind"] == "hnsw" and meta["recall_at_10"] >= 0.95  # graph search: near exact at this size


def test_recall_is_measured_against_exact_search(tmp_path):
    database = unit_rows(3000, 32)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(3000)],
                         store_attrs(provenance(32), scales=(1,)))
    coarse = {"nlist": 64, "m": 4, "nbits": 4, "nprobe": 1}
    build_from_store(tmp_path / "ivf", IndexSettings(kind="ivfpq", index_params=coarse), source=source, progress=False)
    meta = json.loads((tmp_path / "ivf" / "meta.json").read_text())["index"]
    index = IndexDir(tmp_path / "ivf")
    rows = np.sort(np.random.default_rng(1).choice(3000, 1000, replace=False))  # the sample measure_recall uses
    truth = np.argsort(-(database[rows] @ database.T), axis=1, kind="stable")[:, 1:11]
    found = index.index.search(database[rows], 11, rerank=0)[1]
    found = np.stack([r[r != q][:10] for r, q in zip(found, rows)])
    assert meta["recall_at_10"] == pytest.approx(recall_at(found, truth, 10), abs=2e-3)
    assert meta["recall_at_10"] < meta["recall_at_10_rescored"] <= 1.0  # re-scoring helps coarse codes
    assert "recall@10" in run("info", tmp_path / "ivf").output
    # the depth: the shallowest that reaches 0.95 (else the deepest tried), measured as searches then run
    from simret.retrieval.indexdir.searchable import RECALL_TARGET, RERANK_DEPTHS

    depth = meta["rerank"]
    assert depth in RERANK_DEPTHS and index.rerank == depth
    assert meta["recall_at_10_rescored"] >= RECALL_TARGET or depth == RERANK_DEPTHS[-1]
    rescored = index.index.search(database[rows], 11, exact=database, rerank=depth)[1]
    rescored = np.stack([r[r != q][:10] for r, q in zip(rescored, rows)])
    assert meta["recall_at_10_rescored"] == pytest.approx(recall_at(rescored, truth, 10), abs=2e-3)
    if depth > RERANK_DEPTHS[0]:  # a shallower depth was tried and fell short
        shallower = index.index.search(database[rows], 11, exact=database, rerank=RERANK_DEPTHS[0])[1]
        shallower = np.stack([r[r != q][:10] for r, q in zip(shallower, rows)])
        assert recall_at(shallower, truth, 10) < RECALL_TARGET
    np.testing.assert_array_equal(index.search(database[:5], 10)[1], index.search(database[:5], 10, rerank=depth)[1])


# ------------------------------------------------------------------------------------------------ budgets


def test_budget_picks_flat_when_it_fits_then_sized_ivfpq():
    assert parse_size("4GB") == 4 * 10 ** 9 and parse_size("512MiB") == 512 * 2 ** 20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="a size like"):
        parse_size("lots")
    fits = choose_index(100_000, 128, 2 * 10 ** 9)
    assert fits.kind == "flat" and "fits" in fits.reason
    tight = choose_index(10_000_000, 128, 250 * 10 ** 6)
    assert tight.kind == "ivfpq" and tight.bytes <= 250 * 10 ** 6 and "flat index would need" in tight.reason
    roomier = choose_index(10_000_000, 128, 600 * 10 ** 6)
    assert roomier.params["m"] > tight.params["m"]  # more memory, longer codes (better recall)
    assert index_bytes("ivfpq", 10_000_000, 128, tight.params) == tight.bytes
    with pytest.raises(ValueError, match="no index of 10,000,000"):
        choose_index(10_000_000, 128, 50 * 10 ** 6)
    with pytest.raises(ValueError, match="flat index of"):
        choose_index(10_000_000, 128, 10 ** 9, kind="flat")
    assert choose_index(1000, 64, 10 ** 8, kind="hnsw").kind == "hnsw"


def test_max_memory_on_the_command_line_records_its_choice(tmp_path):
    database = unit_rows(5000, 64)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(5000)],
                         store_attrs(provenance(64), scales=(1,)))
    output = run("index", "--from-descriptors", source, "--out", tmp_path / "idx", "--max-memory", "400kB").output
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())["index"]
    assert meta["kind"] == "ivfpq" and meta["max_memory"] == 400_000 and "flat index would need" in meta["choice"]
    assert "ivfpq" in output and "choice" in run("info", tmp_path / "idx").output
    refused = run("index", "--from-descriptors", source, "--out", tmp_path / "x", "--max-memory", "10kB", ok=False)
    assert refused.exit_code == 1 and "no index of 5,000 64-d vectors fits" in refused.output


@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivfpq", {"nlist": 8, "m": 8, "nbits": 6}),
                                          ("hnsw", {"M": 8})])
def test_memory_mapped_search_equals_in_memory_search(tmp_path, kind, params):
    database = unit_rows(1500, 64)
    source = write_store(tmp_path / "s.h5", database, [str(i) for i in range(1500)],
                         store_attrs(provenance(64), scales=(1,)))
    build_from_store(tmp_path / "idx", IndexSettings(kind=kind, index_params=params), source=source, progress=False)
    queries = unit_rows(9, 64, seed=2)
    mapped, loaded = IndexDir(tmp_path / "idx", mmap=True), IndexDir(tmp_path / "idx", mmap=False)
    for options in ({}, {"qe": 2}):
        s1, r1 = mapped.search(queries, 10, **options)
        s2, r2 = loaded.search(queries, 10, **options)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, atol=1e-6)


# ---------------------------------------------------------------------------------------- shards and merge


def test_shards_are_stable_and_cover_the_listing_once():
    ids = [f"folder/{i}.jpg" for i in range(1000)]
    shards = [select_shard(ids, i, 4) for i in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids) and all(150 < len(s) < 350 for s in shards)
    grown = ids + [f"new/{i}.jpg" for i in range(100)]
    assert set(shards[2]) <= set(select_shard(grown, 2, 4))  # an image stays in its shard as the collection grows
    assert shard_of("folder/7.jpg", 4) == shard_of("folder/7.jpg", 4)


def test_shards_merged_equal_one_run_over_the_same_images(photos, tmp_path):
    run("index", photos, "--out", tmp_path / "one", *MODEL, *FAST)
    for i in range(3):
        run("index", photos, "--out", tmp_path / f"shard{i}", "--shard", f"{i}/3", *MODEL, *FAST)
    merged = run("merge", *[tmp_path / f"shard{i}" for i in range(3)], "--out", tmp_path / "merged").output
    assert "merged 3 directories" in merged
    one, together = read_store(tmp_path / "one" / "descriptors.h5"), read_store(tmp_path / "merged" / "descriptors.h5")
    assert sorted(one.ids) == sorted(together.ids) and len(set(together.ids)) == len(together.ids)
    by_id = dict(zip(together.ids, together.descriptors))
    np.testing.assert_allclose(np.stack([by_id[i] for i in one.ids]), one.descriptors, atol=1e-6)
    skipped = (tmp_path / "merged" / "skipped.tsv").read_text()
    assert "broken" not in skipped or "\t" in skipped  # the shards' skipped lists are carried
    query = photos / "chelsea_hard_0.jpg"
    lines = [json.loads(run("search", *dirs, query, "-k", "5", "--format", "jsonl").stdout)
             for dirs in ([tmp_path / "one"], [tmp_path / "merged"], [tmp_path / f"shard{i}" for i in range(3)])]
    assert lines[0]["ids"] == lines[1]["ids"] == lines[2]["ids"]
    np.testing.assert_allclose(lines[0]["scores"], lines[2]["scores"], atol=1e-5)
    overlap = run("merge", tmp_path / "one", tmp_path / "shard0", "--out", tmp_path / "bad", ok=False)
    assert overlap.exit_code == 1 and "must not overlap" in overlap.output


def test_shards_trained_from_one_directory_merge_without_retraining(photos, tmp_path):
    ivf = ["--index", "ivfpq", "--index-param", "nlist=2", "--index-param", "m=8", "--index-param", "nbits=4"]
    run("index", photos, "--out", tmp_path / "idx0", *MODEL, *FAST, *ivf)
    run("index", photos, "--out", tmp_path / "all", "--train-from", tmp_path / "idx0", *MODEL, *FAST)
    for i in range(2):
        run("index", photos, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2", "--train-from", tmp_path / "idx0",
            *MODEL, *FAST)
    result = run("merge", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "merged")
    assert "no vector re-added" in result.output
    trained = json.loads((tmp_path / "merged" / "meta.json").read_text())["index"]["trained_from"]
    assert trained["path"] == str((tmp_path / "idx0").resolve())
    merged, whole = IndexDir(tmp_path / "merged"), IndexDir(tmp_path / "all")
    queries = whole.store.rows(range(6))
    s1, r1 = merged.search(queries, 5, rerank=0)
    s2, r2 = whole.search(queries, 5, rerank=0)
    assert [[merged.ids[r] for r in row] for row in r1] == [[whole.ids[r] for r in row] for row in r2]
    np.testing.assert_allclose(s1, s2, atol=1e-5)  # the same codes: the same compressed scores


def test_search_over_shards_refuses_incomparable_directories(photos, tmp_path):
    run("index", photos, "--out", tmp_path / "a", *MODEL, *FAST)
    run("index", photos, "--out", tmp_path / "b", "--model", "test_resnet", "--weights", "none", "--pool", "avg",
        *FAST)
    refused = run("search", tmp_path / "a", tmp_path / "b", photos / "moon_0.jpg", ok=False)
    assert refused.exit_code == 1 and "cannot be compared" in refused.output


def test_a_store_from_elsewhere_is_checked_before_it_is_indexed(tmp_path):
    database = unit_rows(6, 64)
    twice = write_store(tmp_path / "twice.h5", database, ["a", "b", "a", "c", "d", "e"],
                        store_attrs(provenance(64), scales=(1,)))
    assert "lists 1 id(s) more than once (e.g. 'a')" in run("index", "--from-descriptors", twice, "--out",
                                                              tmp_path / "x", ok=False).output
    database[3, 5] = np.nan
    broken = write_store(tmp_path / "nan.h5", database, list("abcdef"), store_attrs(provenance(64), scales=(1,)))
    refused = run("index", "--from-descriptors", broken, "--out", tmp_path / "y", ok=False)
    assert refused.exit_code == 1 and "nan.h5 holds NaN or infinite descriptors (row 3, id 'd')" in refused.output
    assert not (tmp_path / "y" / "meta.json").exists()
    altered = write_store(tmp_path / "altered.h5", unit_rows(6, 64), list("abcdef"),
                          store_attrs(provenance(64), scales=(1,)))
    import h5py

    with h5py.File(altered, "r+") as handle:  # an id changed after the checksum was written
        handle["ids"][2] = "z"
    refused = run("index", "--from-descriptors", altered, "--out", tmp_path / "z", ok=False)
    assert refused.exit_code == 1 and "ids no longer match their checksum" in refused.output


def test_a_large_store_is_indexed_block_by_block_with_its_ids_and_states(tmp_path, tiny_blocks):
    """--from-descriptors copies rows, ids and file states block by block: the new store equals the source."""
    from simret.retrieval.store import StoreReader, StoreWriter
    from simret.utils.filestate import FileStates

    database, ids = unit_rows(301, 64, seed=3), [f"img/{i:05d}.jpg" for i in range(301)]
    states = FileStates(np.arange(301, dtype=np.int64) + 10, np.arange(301, dtype=np.int64) * 7,
                        [f"{i:064x}" for i in range(301)])
    source = tmp_path / "source.h5"
    with StoreWriter(source, 64, store_attrs(provenance(64), scales=(1,)), dtype="float16") as writer:
        for start in range(0, 301, 50):
            part = range(start, min(301, start + 50))
            writer.append(database[part], ids[start:start + 50], states.take(part))
    run("index", "--from-descriptors", source, "--out", tmp_path / "idx", "--index", "flat")
    with StoreReader(source) as a, StoreReader(tmp_path / "idx" / "descriptors.h5") as b:
        assert b.ids == a.ids and b.dtype == a.dtype and b.count == 301
        np.testing.assert_array_equal(b.rows(range(301)), a.rows(range(301)))
        assert b.file_states().digests == a.file_states().digests
        np.testing.assert_array_equal(b.file_states().sizes, a.file_states().sizes)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["count"] == 301 and meta["index"]["ntotal"] == 301
