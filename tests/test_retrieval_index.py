"""FAISS index wrapper, HDF5 store, whitening and re-ranking against plain numpy references."""
import h5py
import numpy as np
import pytest

from simret.retrieval import Index, PCAWhitening, alpha_qe, dba
from simret.retrieval.index import as_matrix, auto_kind, auto_params, blas_for_small_batches
from simret.retrieval.store import (
    RowAccess,
    StoreError,
    append_store,
    open_descriptors,
    read_attrs,
    read_store,
    store_attrs,
    write_store,
)


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, database, k):
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("blas", [True, False], ids=["blas-path", "faiss-default-path"])
@pytest.mark.parametrize("n_queries", [1, 3, 70, 400])
def test_flat_search_equals_numpy_brute_force(n_queries, blas, monkeypatch):
    import simret.retrieval.index as index_module

    monkeypatch.setattr(index_module, "BLAS_MIN_DATABASE_BYTES", 0 if blas else 1 << 40)
    database, queries = unit_rows(3000, 48, seed=1), unit_rows(n_queries, 48, seed=2)
    index = Index.build(database, "flat")
    scores, ids = index.search(queries, k=7)
    ref_scores, ref_ids = brute_force(queries, database, 7)
    assert ids.shape == (n_queries, 7) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_large_flat_databases_search_small_batches_through_blas(monkeypatch):
    import faiss

    import simret.retrieval.index as index_module

    class Spy:  # records FAISS' BLAS threshold at the moment the search runs
        def __init__(self, wrapped):
            self.wrapped, self.thresholds = wrapped, []

        def __getattr__(self, name):
            return getattr(self.wrapped, name)

        def search(self, x, k):
            self.thresholds.append(faiss.cvar.distance_compute_blas_threshold)
            return self.wrapped.search(x, k)

    default = faiss.cvar.distance_compute_blas_threshold
    database = unit_rows(2000, 32, seed=13)  # 256 kB
    for limit, expected in ((128 << 10, 0), (1 << 20, default)):  # database above / below the cache limit
        monkeypatch.setattr(index_module, "BLAS_MIN_DATABASE_BYTES", limit)
        index = Index.build(database, "flat")
        index.faiss = spy = Spy(index.faiss)
        index.search(database[:3], k=4)
        assert spy.thresholds == [expected]
    assert faiss.cvar.distance_compute_blas_threshold == default


def test_search_coerces_inputs_like_faiss():
    database = unit_rows(50, 8)
    index = Index.build(database.tolist(), "flat")  # a list of lists
    scores, ids = index.search(database[3].astype(np.float64), k=2)  # 1-D float64 → one row
    assert ids.shape == (1, 2) and ids[0, 0] == 3 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    torch = pytest.importorskip("torch")
    _, ids_t = index.search(torch.from_numpy(database[:4]), k=1)
    assert ids_t[:, 0].tolist() == [0, 1, 2, 3]
    fortran = np.asfortranarray(database[:5])
    assert as_matrix(fortran).flags["C_CONTIGUOUS"]
    _, ids_k = index.search(database[:2], k=500)  # k beyond the collection: all of it, no -1 padding
    assert ids_k.shape == (2, 50) and (ids_k >= 0).all()
    with pytest.raises(ValueError, match="8-d vectors"):
        index.search(np.ones((2, 9)), k=1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(8, np.nan), k=1)
    with pytest.raises(ValueError, match="at least 1"):
        index.search(database[:1], k=0)


def test_blas_threshold_is_restored():
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    with blas_for_small_batches(0):
        assert faiss.cvar.distance_compute_blas_threshold == 0
    assert faiss.cvar.distance_compute_blas_threshold == before


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_every_kind_saves_loads_and_finds_near_duplicates(tmp_path, kind):
    database = unit_rows(12000, 32, seed=3)
    index = Index.build(database, kind)
    assert index.kind == kind and index.ntotal == 12000 and index.dim == 32
    noisy = database[:20] + 0.01 * unit_rows(20, 32, seed=4)
    _, ids = index.search(noisy, k=5)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9
    index.save(tmp_path / "x.faiss")
    loaded = Index.load(tmp_path / "x.faiss")
    assert loaded.kind == kind and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(noisy, 5)[1], ids)


def test_ivfpq_rescored_with_exact_vectors_equals_brute_force():
    database, queries = unit_rows(12000, 32, seed=10), unit_rows(25, 32, seed=11)
    index = Index.build(database, "ivfpq", nlist=16, nprobe=16)  # every list probed
    ref_scores, ref_ids = brute_force(queries, database, 5)
    approx_scores, approx_ids = index.search(queries, 5)
    assert not np.allclose(approx_scores, ref_scores, atol=1e-4)  # compressed codes: approximate scores
    scores, ids = index.search(queries, 5, exact=database, rerank=12000)  # all candidates re-scored
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    calls = []

    def fetch(rows):
        calls.append(len(rows))
        return database[rows]

    few_scores, few_ids = index.search(queries, 5, exact=fetch, rerank=8)
    assert calls and calls[0] <= 25 * 40  # only the candidates were fetched
    assert (few_ids[:, 0] == ref_ids[:, 0]).mean() >= 0.9
    np.testing.assert_allclose(few_scores, np.take_along_axis(queries @ database.T, few_ids, axis=1), atol=1e-5)


def test_auto_parameters_follow_the_collection_size():
    assert auto_kind(1000) == "flat" and auto_kind(5_000_000) == "ivfpq"
    big, small = auto_params("ivfpq", 1_000_000, 384), auto_params("ivfpq", 20_000, 384)
    assert big["nlist"] == 1024 and small["nlist"] < big["nlist"]
    assert 384 % big["m"] == 0 and 384 // big["m"] >= 4
    assert auto_params("hnsw", 10**6, 64)["M"] > auto_params("hnsw", 1000, 64)["M"]
    with pytest.raises(ValueError, match="unknown index kind"):
        Index.create(8, "lsh")
    with pytest.raises(ValueError, match="does not take"):
        Index.create(8, "flat", nprobe=3)


def test_add_appends_ids_in_order():
    database = unit_rows(100, 16)
    index = Index.build(database[:60], "flat")
    index.add(database[60:])
    _, ids = index.search(database[[5, 75]], k=1)
    assert ids[:, 0].tolist() == [5, 75]


def test_large_ivfpq_codes_get_float16_lookup_tables_on_gpu():
    from simret.retrieval.index import gpu_needs_float16_tables

    big = auto_params("ivfpq", 1_000_000, 384)  # m=64, nbits=8: a 64 KiB float32 table per query
    assert gpu_needs_float16_tables(big["m"], big["nbits"])
    assert not gpu_needs_float16_tables(48, 8) and not gpu_needs_float16_tables(8, 8)


def test_to_gpu_is_guarded():
    import faiss

    index = Index.build(unit_rows(10, 8), "flat")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # pragma: no cover - GPU machines
        index.to_gpu()
        assert index.on_gpu and index.search(unit_rows(1, 8), 1)[1].shape == (1, 1)
        database = unit_rows(10_000, 128, seed=12)
        ivfpq = Index.build(database, "ivfpq", nlist=4, m=64, nbits=8).to_gpu()  # needs float16 tables
        assert ivfpq.search(database[:5], 3, exact=database)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    else:
        with pytest.raises(RuntimeError, match="GPU"):
            index.to_gpu()


# ------------------------------------------------------------------------------------------- store


def provenance(fingerprint="arch-simpool-0123456789abcdef", dim=6):
    return {"fingerprint": fingerprint, "arch": "arch", "pool": "simpool", "gamma": "none", "weights": "random",
            "dim": dim, "simret_version": "0.0"}


def test_store_round_trip_is_plain_h5py(tmp_path):
    x = unit_rows(5, 6)
    ids = ["a/1.jpg", "b/é.jpg", "c.png", "d.jpg", "e.jpg"]
    path = write_store(tmp_path / "d.h5", x, ids, store_attrs(provenance(), scales=(1, 0.5), max_size=512))
    with h5py.File(path, "r") as handle:  # readable without simret
        assert handle["descriptors"].dtype == np.float32 and handle["descriptors"].shape == (5, 6)
        assert list(handle["ids"].asstr()[()]) == ids
        for key in ("fingerprint", "arch", "pool", "gamma", "scales", "dim", "simret_version", "created"):
            assert key in handle.attrs
        assert list(handle.attrs["scales"]) == [1.0, 0.5]
    store = read_store(path)
    np.testing.assert_array_equal(store.descriptors, x)
    assert store.ids == ids and store.fingerprint == provenance()["fingerprint"] and store.attrs["max_size"] == 512
    picked = read_store(path, rows=[4, 0, 4])
    assert picked.ids == ["e.jpg", "a/1.jpg", "e.jpg"]
    np.testing.assert_array_equal(picked.descriptors, x[[4, 0, 4]])


def test_store_float16_append_memmap_and_fingerprint_check(tmp_path):
    x = unit_rows(4, 6)
    path = write_store(tmp_path / "d.h5", x[:2], ["a", "b"], store_attrs(provenance(), scales=(1,)), dtype="float16")
    append_store(path, x[2:], ["c", "d"], expect_fingerprint=provenance()["fingerprint"], block=1)
    store = read_store(path)
    assert store.ids == ["a", "b", "c", "d"] and store.descriptors.dtype == np.float32
    np.testing.assert_allclose(store.descriptors, x, atol=1e-3)
    mapped = open_descriptors(path)
    assert isinstance(mapped, RowAccess) and mapped.dtype == np.float16 and mapped.shape == (4, 6)
    assert mapped._map is not None  # rows come straight from a memory map of the file
    np.testing.assert_array_equal(np.asarray(mapped[[3, 1]], np.float32), store.descriptors[[3, 1]])
    assert read_attrs(path)["fingerprint"] == provenance()["fingerprint"]  # attributes survive the append
    with pytest.raises(StoreError, match="cannot be mixed"):
        append_store(path, x[:1], ["e"], expect_fingerprint="other-simpool-ffff")
    with pytest.raises(StoreError, match="6-d"):
        append_store(path, np.ones((1, 3)), ["e"])
    assert read_store(path).ids == ["a", "b", "c", "d"]  # failed appends left the file as it was
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]  # and no temporary behind


def test_store_without_fingerprint_is_refused(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as handle:
        handle["descriptors"] = np.ones((2, 3), np.float32)
        handle["ids"] = np.array([b"a", b"b"])
    with pytest.raises(StoreError, match="fingerprint"):
        read_store(path)
    assert read_store(path, require_fingerprint=False).ids == ["a", "b"]
    assert read_attrs(path) == {}
    with pytest.raises(FileNotFoundError):
        read_store(tmp_path / "missing.h5")


# --------------------------------------------------------------------------------------- whitening


def test_pca_whitening_decorrelates_and_round_trips(tmp_path):
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8)) + 3.0
    white = PCAWhitening.learn(raw)
    projected = (raw - white.mean) @ white.projection.T  # before the final L2N
    np.testing.assert_allclose(np.cov(projected.T, bias=True), np.eye(8), atol=1e-3)
    out = white.apply(raw)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    white.save(tmp_path / "w.npz")
    again = PCAWhitening.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(again.apply(raw[:3]), white.apply(raw[:3]))
    reduced = PCAWhitening.learn(raw, dim=3)
    assert reduced.apply(raw).shape == (500, 3)


def test_whitening_on_few_descriptors_drops_the_null_space():
    few = unit_rows(5, 16)
    white = PCAWhitening.learn(few)
    assert white.out_dim == 4  # 5 centred points span 4 directions
    assert np.isfinite(white.apply(unit_rows(3, 16, seed=9))).all()
    with pytest.raises(ValueError, match="at least two"):
        PCAWhitening.learn(few[:1])


# --------------------------------------------------------------------------------------- re-ranking


def test_alpha_qe_matches_the_formula_for_both_neighbour_layouts():
    database, queries = unit_rows(30, 8, seed=6), unit_rows(4, 8, seed=7)
    _, neighbours = brute_force(queries, database, 30)
    n, alpha = 3, 3.0
    expected = []
    for q, row in zip(queries, neighbours):
        total = q.astype(np.float64).copy()
        for i in row[:n]:
            total += max(float(q @ database[i]), 0.0) ** alpha * database[i]
        expected.append(total / np.linalg.norm(total))
    np.testing.assert_allclose(alpha_qe(queries, database, neighbours, n, alpha), expected, atol=1e-5)
    np.testing.assert_allclose(alpha_qe(queries, database, neighbours.T, n, alpha), expected, atol=1e-5)  # ranks
    np.testing.assert_allclose(alpha_qe(queries, database, neighbours, 0, alpha), queries, atol=1e-6)


def test_dba_matches_the_formula():
    database = unit_rows(25, 6, seed=8)
    n, alpha = 2, 3.0
    similarities = database.astype(np.float64) @ database.T
    expected = []
    for j, row in enumerate(similarities):
        others = [i for i in np.argsort(-row, kind="stable") if i != j][:n]
        total = database[j].astype(np.float64).copy()
        for i in others:
            total += max(row[i], 0.0) ** alpha * database[i]
        expected.append(total / np.linalg.norm(total))
    np.testing.assert_allclose(dba(database, n, alpha), expected, atol=1e-5)
    np.testing.assert_allclose(dba(database, 0), database, atol=1e-6)
