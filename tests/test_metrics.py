"""Revisited mAP / mP@k: hand-computed cases, an independent loop reference, scores path = ranks path."""
import math

import numpy as np
import pytest

from simret.retrieval import metrics
from simret.retrieval.metrics import (
    compute_map,
    compute_map_from_scores,
    evaluate_revisited,
    format_revisited_table,
    revisited_protocols,
)

# ------------------------------------------------------------------------------------------ reference


def reference_map(ranks, gnd, kappas=()):
    """The protocol written as plain loops over each ranking, from its definitions."""
    n_queries = len(gnd)
    aps = [math.nan] * n_queries
    prs = [[math.nan] * len(kappas) for _ in range(n_queries)]
    for q in range(n_queries):
        ok = [int(i) for i in gnd[q]["ok"]]
        junk = set(int(i) for i in gnd[q].get("junk", []))
        if not ok:
            continue
        positives = set(ok)
        ranked = []  # junk-free 0-based positions of the positives, in ranked order
        junk_so_far = 0
        for position in range(len(ranks)):
            image = int(ranks[position][q])
            if image in positives:
                ranked.append(position - junk_so_far)
            if image in junk:
                junk_so_far += 1
        ap = 0.0
        for j, r in enumerate(ranked):
            precision_before = 1.0 if r == 0 else j / r
            precision_after = (j + 1) / (r + 1)
            ap += (precision_before + precision_after) * (1.0 / len(ok)) / 2.0
        aps[q] = ap
        for c, k in enumerate(kappas):
            if not ranked:
                prs[q][c] = 0.0
                continue
            kq = min(max(r + 1 for r in ranked), k)
            prs[q][c] = sum(1 for r in ranked if r + 1 <= kq) / kq
    valid = [q for q in range(n_queries) if not math.isnan(aps[q])]
    mean_ap = sum(aps[q] for q in valid) / len(valid) if valid else math.nan
    pr = [sum(prs[q][c] for q in valid) / len(valid) if valid else math.nan for c in range(len(kappas))]
    return mean_ap, np.array(aps), np.array(pr), np.array(prs).reshape(n_queries, len(kappas))


def assert_same(result, expected):
    mean_ap, aps, pr, prs = result
    assert isinstance(mean_ap, float)
    np.testing.assert_allclose(mean_ap, expected[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(aps, expected[1], rtol=1e-12, atol=0)
    np.testing.assert_allclose(pr, expected[2], rtol=1e-12, atol=0)
    np.testing.assert_allclose(prs, expected[3], rtol=1e-12, atol=0)


def column(*images):
    return np.array(images, dtype=np.int64)[:, None]


# ----------------------------------------------------------------------------------- hand-computed


def test_ap_of_two_positives_by_hand():
    ranks = column(5, 3, 7, 1, 0, 2, 4, 6)  # positives 3 and 1 at 0-based positions 1 and 3
    mean_ap, aps, _, _ = compute_map(ranks, [{"ok": [3, 1]}])
    # j=0, r=1: (0/1 + 1/2) / 2 = 1/4;  j=1, r=3: (1/3 + 2/4) / 2 = 5/12;  AP = (1/4 + 5/12) / 2 = 1/3
    assert mean_ap == pytest.approx(1 / 3, abs=1e-15) and aps[0] == pytest.approx(1 / 3, abs=1e-15)


def test_first_positive_on_top_uses_precision_one():
    ranks = column(4, 0, 9, 1, 2)  # positives at 0 and 2
    # j=0, r=0: (1 + 1) / 2 = 1;  j=1, r=2: (1/2 + 2/3) / 2 = 7/12;  AP = (1 + 7/12) / 2 = 19/24
    assert compute_map(ranks, [{"ok": [4, 9]}])[0] == pytest.approx(19 / 24, abs=1e-15)


def test_junk_before_positives_is_removed():
    ranks = column(9, 5, 3, 8, 1)
    assert compute_map(ranks, [{"ok": [3], "junk": [9, 5]}])[0] == pytest.approx(1.0, abs=1e-15)
    # junk between positives: positions 0 and 3 become 0 and 2, as in the case above → 19/24
    ranks = column(4, 7, 1, 9, 2)
    assert compute_map(ranks, [{"ok": [4, 9], "junk": [7]}])[0] == pytest.approx(19 / 24, abs=1e-15)
    # junk after the last positive changes nothing: one positive at 1 → (0 + 1/2) / 2 = 1/4
    ranks = column(6, 3, 2, 0)
    assert compute_map(ranks, [{"ok": [3], "junk": [0, 2]}])[0] == pytest.approx(0.25, abs=1e-15)


def test_image_both_positive_and_junk_gives_tied_trapezoid_positions():
    # 7 is ok and junk: it stays a positive at 0 and shifts the positive after it down to 0 as well, so
    # the second trapezoid has r = 0 with j = 1: (1 + 2/1) / 2 = 3/2 → AP = (1 + 3/2) / 2 = 5/4 (revisitop)
    ranks = column(7, 4, 0)
    result = compute_map(ranks, [{"ok": [7, 4], "junk": [7]}])
    assert result[0] == pytest.approx(1.25, abs=1e-15)
    assert_same(result, reference_map(ranks, [{"ok": [7, 4], "junk": [7]}]))


def test_repeated_positive_in_ok_counts_in_the_recall_step():
    # revisitop divides by len(ok), repeats included: ok = [3, 3] with 3 on top → (1 + 1) / 2 / 2 = 1/2
    ranks = column(3, 0, 1, 2)
    mean_ap, aps, _, prs = compute_map(ranks, [{"ok": [3, 3]}], kappas=[1, 5])
    assert mean_ap == pytest.approx(0.5, abs=1e-15) and prs[0].tolist() == [1.0, 1.0]
    assert_same(compute_map(ranks, [{"ok": [3, 3]}], [1, 5]), reference_map(ranks, [{"ok": [3, 3]}], [1, 5]))


def test_mean_precision_at_k_with_the_protocols_min_rule():
    ranks = column(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    # positives at 1-based positions 2, 3, 7
    _, _, pr, prs = compute_map(ranks, [{"ok": [1, 2, 6]}], kappas=[1, 5, 10])
    np.testing.assert_allclose(prs[0], [0 / 1, 2 / 5, 3 / 7], rtol=1e-15)  # k=10 → kq = min(7, 10) = 7
    # all positives above k: kq = max position, so two positives on top give P@5 = 2/2, not 2/5
    _, _, pr, prs = compute_map(ranks, [{"ok": [0, 1]}], kappas=[1, 5])
    np.testing.assert_allclose(prs[0], [1.0, 1.0])
    # junk removal applies to P@k too: 9 junk images before the positive at 1-based position 10 → position 1
    _, _, _, prs = compute_map(ranks, [{"ok": [9], "junk": list(range(9))}], kappas=[1])
    assert prs[0, 0] == 1.0


def test_queries_without_positives_are_nan_and_left_out():
    ranks = np.tile(np.arange(6)[:, None], (1, 3))
    gnd = [{"ok": [0]}, {"ok": [], "junk": [1]}, {"ok": [1]}]  # AP 1, empty, AP (0 + 1/2) / 2 = 1/4
    mean_ap, aps, pr, prs = compute_map(ranks, gnd, kappas=[1])
    assert math.isnan(aps[1]) and math.isnan(prs[1, 0])
    assert mean_ap == pytest.approx((1 + 0.25) / 2, abs=1e-15)
    assert pr[0] == pytest.approx((1 + 0) / 2)
    mean_ap, aps, pr, prs = compute_map(ranks[:, :1], [{"ok": []}], kappas=[1, 5])
    assert math.isnan(mean_ap) and np.isnan(aps).all() and np.isnan(pr).all() and pr.shape == (2,)


def test_truncated_ranking_counts_unranked_positives_as_misses():
    full = np.arange(10)[:, None]
    gnd = [{"ok": [1, 8], "junk": [0]}]
    mean_ap, _, _, prs = compute_map(full[:5], gnd, kappas=[5])  # 8 is not ranked
    # positive 1 at 1, minus one junk before → 0: (1 + 1) / 2 / len(ok)=2 → 0.5
    assert mean_ap == pytest.approx(0.5, abs=1e-15) and prs[0, 0] == 1.0
    # no positive ranked at all: AP 0 and P@k 0 (revisitop cannot compute P@k here)
    mean_ap, aps, pr, prs = compute_map(full[:5], [{"ok": [8, 9]}], kappas=[1, 5])
    assert mean_ap == 0.0 and aps[0] == 0.0 and (prs == 0).all()


def test_padding_and_repeated_ranks_follow_isin_semantics():
    ranks = np.array([[-1, 3], [2, -1], [2, 99], [-1, 0]])  # FAISS pads with -1; 99 is past everything
    gnd = [{"ok": [2, 5]}, {"ok": [0], "junk": [3]}]
    result = compute_map(ranks, gnd, kappas=[1, 2])
    assert_same(result, reference_map(ranks, gnd, [1, 2]))
    # query 0: image 2 found twice (positions 1, 2) → (0 + 1/2)/2 + (1/2 + 2/3)/2, over len(ok) = 2
    assert result[1][0] == pytest.approx(((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)


def test_scores_ties_are_broken_by_lower_index_like_a_stable_sort():
    scores = np.array([[0.5], [0.9], [0.5], [0.5], [0.1]])
    # ranking 1, 0, 2, 3, 4: positive 2 is third although it ties with 0 and 3 → (0/2 + 1/3) / 2 = 1/6
    gnd = [{"ok": [2], "junk": [3]}]
    assert compute_map_from_scores(scores, gnd)[0] == pytest.approx(1 / 6, abs=1e-15)
    assert_same(compute_map_from_scores(scores, gnd, [1, 3]),
                compute_map(np.argsort(-scores, axis=0, kind="stable"), gnd, [1, 3]))
    # junk 0 ties with the positive and has the lower index: removed from before it → (0/1 + 1/2) / 2
    gnd = [{"ok": [2], "junk": [0]}]
    assert compute_map_from_scores(scores, gnd)[0] == pytest.approx(1 / 4, abs=1e-15)


# ------------------------------------------------------------------------- against the loop, random


def random_case(rng, n_db, n_queries, ties):
    if ties:
        scores = rng.integers(0, int(rng.integers(1, 6)), size=(n_db, n_queries)).astype(np.float64)
    else:
        scores = rng.standard_normal((n_db, n_queries))
    gnd = []
    for _ in range(n_queries):
        ok = rng.choice(n_db + 2, size=int(rng.integers(0, min(n_db, 8) + 1)), replace=False)
        junk = rng.choice(n_db + 2, size=int(rng.integers(0, min(n_db, 8) + 1)), replace=False)
        gnd.append({"ok": ok, "junk": junk})
    return scores, gnd


@pytest.mark.parametrize("ties", [False, True])
def test_compute_map_matches_the_loop_reference(ties):
    rng = np.random.default_rng(int(ties))
    for _ in range(60):
        n_db, n_queries = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        scores, gnd = random_case(rng, n_db, n_queries, ties)
        ranks = np.argsort(-scores, axis=0, kind="stable")
        kappas = [1, 2, 5, 10]
        expected = reference_map(ranks, gnd, kappas)
        assert_same(compute_map(ranks, gnd, kappas), expected)
        assert_same(compute_map(ranks.astype(np.int32), gnd, kappas), expected)
        assert_same(compute_map(np.asfortranarray(ranks), gnd, kappas), expected)  # e.g. FAISS's I.T
        assert_same(compute_map_from_scores(scores, gnd, kappas), expected)
        cut = max(1, n_db // 2)
        assert_same(compute_map(ranks[:cut], gnd, kappas), reference_map(ranks[:cut], gnd, kappas))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few elements, few cells, few queries per chunk: every boundary gets crossed."""
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 24)
    monkeypatch.setattr(metrics, "SCORE_CELLS", 5)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_scores_path_equals_stable_argsort_path(tiny_blocks, dtype, layout):
    rng = np.random.default_rng(7)
    for trial in range(40):
        n_db, n_queries = int(rng.integers(1, 80)), int(rng.integers(1, 6))
        scores, gnd = random_case(rng, n_db, n_queries, ties=trial % 2 == 0)
        scores = np.asarray(scores * rng.uniform(0.01, 100), dtype=dtype, order=layout)
        if trial % 5 == 0:  # infinities and NaN (NaN ranks last, after -inf)
            cells = rng.integers(0, n_db, 4), rng.integers(0, n_queries, 4)
            scores[cells] = rng.choice([np.nan, np.inf, -np.inf], 4)
        kappas = [1, 3, 10]
        expected = reference_map(np.argsort(-scores, axis=0, kind="stable"), gnd, kappas)
        assert_same(compute_map_from_scores(scores, gnd, kappas), expected)


def test_scores_path_with_many_ties_sorts_the_cells(tiny_blocks, monkeypatch):
    calls = []
    original = metrics._rank_in_cell_sorted
    monkeypatch.setattr(metrics, "_rank_in_cell_sorted", lambda *args: calls.append(1) or original(*args))
    rng = np.random.default_rng(3)
    scores = np.zeros((300, 3), dtype=np.float32)  # one value almost everywhere: order = database index
    scores[rng.integers(0, 300, 30), rng.integers(0, 3, 30)] = 1.0
    gnd = [{"ok": rng.choice(300, 40, replace=False), "junk": rng.choice(300, 20, replace=False)} for _ in range(3)]
    expected = reference_map(np.argsort(-scores, axis=0, kind="stable"), gnd, [1, 5])
    assert_same(compute_map_from_scores(scores, gnd, [1, 5]), expected)
    assert calls  # listed images sharing cells went through the sorting branch


def test_scores_path_places_nan_positives_last():
    scores = np.array([[0.3, 0.1], [np.nan, 0.2], [-np.inf, np.nan], [0.9, 0.4], [np.nan, 0.0]])
    gnd = [{"ok": [1, 2], "junk": [4]}, {"ok": [2], "junk": [0]}]
    # query 0: 3, 0, 2 (-inf), 1 (NaN), 4 (NaN); query 1: 3, 1, 0, 4, 2 (NaN)
    assert_same(compute_map_from_scores(scores, gnd, [1, 5]),
                reference_map(np.array([[3, 3], [0, 1], [2, 0], [1, 4], [4, 2]]), gnd, [1, 5]))


@pytest.mark.parametrize("member_table", [True, False])
@pytest.mark.parametrize("listed_range", [30, 400])
def test_ranks_path_across_blocks(tiny_blocks, monkeypatch, member_table, listed_range):
    """Listed images packed below 30 (flagged by a range test) or spread over 400 (by a lookup table)."""
    if not member_table:  # many queries x listed images: binary search instead of a lookup table
        monkeypatch.setattr(metrics, "MEMBER_TABLE_LIMIT", 0)
    rng = np.random.default_rng(11)
    ranks = np.stack([rng.permutation(400) for _ in range(7)], axis=1)
    ranks[rng.integers(0, 400, 5), rng.integers(0, 7, 5)] = -1  # padding
    gnd = [{"ok": rng.choice(listed_range, 6, replace=False), "junk": rng.choice(listed_range, 5, replace=False)}
           for _ in range(7)]
    assert_same(compute_map(ranks, gnd, [1, 5]), reference_map(ranks, gnd, [1, 5]))
    assert_same(compute_map(np.asfortranarray(ranks), gnd, [1, 5]), reference_map(ranks, gnd, [1, 5]))


# ------------------------------------------------------------------------------ evaluate_revisited


def revisited_case(seed=0, n_db=120, n_queries=6):
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(n_queries):
        chosen = rng.choice(n_db, size=18, replace=False)
        easy, hard, junk = chosen[:5], chosen[5:12], chosen[12:]
        gnd.append({"easy": easy, "hard": hard if q != 2 else np.zeros(0, np.int64), "junk": junk,
                    "bbx": np.array([0.0, 0.0, 10.0, 10.0])})
    return rng.standard_normal((n_db, n_queries)).astype(np.float32), gnd


def test_revisited_protocols_follow_revisitop():
    gnd = [{"easy": np.array([1, 2]), "hard": np.array([3]), "junk": np.array([4])}]
    setups = revisited_protocols(gnd)
    assert sorted(setups["easy"][0]["ok"]) == [1, 2] and sorted(setups["easy"][0]["junk"]) == [3, 4]
    assert sorted(setups["medium"][0]["ok"]) == [1, 2, 3] and sorted(setups["medium"][0]["junk"]) == [4]
    assert sorted(setups["hard"][0]["ok"]) == [3] and sorted(setups["hard"][0]["junk"]) == [1, 2, 4]


@pytest.mark.parametrize("kind", ["ranks", "scores"])
def test_evaluate_revisited_equals_compute_map_per_setup(kind):
    scores, gnd = revisited_case()
    ranks = np.argsort(-scores, axis=0, kind="stable")
    results = evaluate_revisited(ranks if kind == "ranks" else scores, gnd, per_query=True)
    assert set(results) == {"easy", "medium", "hard"}
    for name, setup in revisited_protocols(gnd).items():
        expected = reference_map(ranks, setup, [1, 5, 10])
        assert set(results[name]) == {"map", "mp@1", "mp@5", "mp@10", "aps", "prs"}
        assert results[name]["map"] == pytest.approx(expected[0], rel=1e-12)
        assert [results[name][f"mp@{k}"] for k in (1, 5, 10)] == pytest.approx(list(expected[2]), rel=1e-12)
        np.testing.assert_allclose(results[name]["aps"], expected[1], rtol=1e-12)
    assert math.isnan(results["hard"]["aps"][2])  # query 2 has no hard positives
    assert all(0 <= results[name]["map"] <= 1 for name in results)  # fractions, not %


def test_evaluate_revisited_kind_detection_and_errors():
    scores, gnd = revisited_case(n_queries=2)
    ranks = np.argsort(-scores, axis=0, kind="stable")
    assert evaluate_revisited(ranks, gnd) == evaluate_revisited(scores, gnd, kind="scores")
    with pytest.raises(ValueError, match="cannot tell ranks from scores"):
        evaluate_revisited(scores > 0, gnd)
    with pytest.raises(ValueError, match="integer database indices"):
        evaluate_revisited(scores, gnd, kind="ranks")
    with pytest.raises(ValueError, match="kind must be"):
        evaluate_revisited(scores, gnd, kind="sorted")
    with pytest.raises(ValueError, match="'easy'"):
        evaluate_revisited(scores, [{"ok": [1]}, {"ok": [2]}])


def test_format_revisited_table_prints_percentages():
    results = {"easy": {"map": 0.5, "mp@1": 1.0}, "medium": {"map": 0.25, "mp@1": 0.5},
               "hard": {"map": 0.125, "mp@1": 0.0}}
    table = format_revisited_table(results, "rsample").splitlines()
    assert table[0].split() == ["rsample", "E", "M", "H"]
    assert table[1].split() == ["mAP", "50.00", "25.00", "12.50"]
    assert table[2].split() == ["mP@1", "100.00", "50.00", "0.00"]


# ------------------------------------------------------------------------------------- bad input


def test_clear_errors_for_bad_input():
    ranks = np.arange(10).reshape(5, 2)
    with pytest.raises(ValueError, match=r"did you pass the \(n_queries, k\) FAISS layout"):
        compute_map(ranks.T, [{"ok": [1]}, {"ok": [2]}])
    with pytest.raises(ValueError, match="integer database indices"):
        compute_map(ranks.astype(float), [{"ok": [1]}, {"ok": [2]}])
    with pytest.raises(ValueError, match="must be floats"):
        compute_map_from_scores(ranks, [{"ok": [1]}, {"ok": [2]}])
    with pytest.raises(ValueError, match="negative database index"):
        compute_map(ranks, [{"ok": [-1]}, {"ok": [2]}])
    with pytest.raises(ValueError, match=r"gnd\[1\] has no 'ok'"):
        compute_map(ranks, [{"ok": [1]}, {"positives": [2]}])
    with pytest.raises(ValueError, match="integer database indices"):
        compute_map(ranks, [{"ok": [1.5]}, {"ok": [2]}])
    with pytest.raises(ValueError, match="kappas must be positive"):
        compute_map(ranks, [{"ok": [1]}, {"ok": [2]}], kappas=[0])
    # indices stored as integral floats (MATLAB-converted files) are accepted
    assert compute_map(ranks, [{"ok": [1.0]}, {"ok": np.array([2.0])}])[0] == pytest.approx(
        compute_map(ranks, [{"ok": [1]}, {"ok": [2]}])[0])


def test_bench_baseline_loop_agrees():
    from simret.bench.metrics import loop_map, medium_setup, synthetic_benchmark

    scores, revisited = synthetic_benchmark(3000, n_queries=5, landmark_images=800)
    gnd = medium_setup(revisited)
    ranks = np.argsort(-scores, axis=0, kind="stable")
    assert_same(loop_map(ranks, gnd, (1, 5, 10)), reference_map(ranks, gnd, (1, 5, 10)))
    assert_same(compute_map_from_scores(scores, gnd, (1, 5, 10)), reference_map(ranks, gnd, (1, 5, 10)))
