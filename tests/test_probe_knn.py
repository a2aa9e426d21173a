"""DINO's weighted k-NN: hand-computed votes, parity with DINO's knn_classifier, chunking and errors."""
import math

import numpy as np
import pytest
import torch

from simret.probe.knn import knn_accuracy, knn_classify, knn_votes

# four unit train vectors in 2-D and two queries (all already L2-normalised)
TRAIN = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
TRAIN_Y = np.array([0, 1, 1, 2])
QUERIES = np.array([[0.96, 0.28], [0.0, 1.0]], dtype=np.float32)
QUERY_Y = np.array([1, 2])
# cosine similarities of the queries to the train vectors, worked out by hand
#   query 0: 0.96, 0.936 (= .768 + .168), 0.8 (= .576 + .224), 0.28
#   query 1: 0.0,  0.6,                    0.8,                 1.0


def test_votes_are_sums_of_exp_similarity_over_temperature():
    votes = knn_votes(TRAIN, TRAIN_Y, QUERIES, k=2, temperature=0.07)
    expected = np.array([[math.exp(0.96 / 0.07), math.exp(0.936 / 0.07), 0.0],   # neighbours 0 and 1
                         [0.0, math.exp(0.8 / 0.07), math.exp(1.0 / 0.07)]])      # neighbours 3 and 2
    np.testing.assert_allclose(votes, expected, rtol=1e-5)
    # T = 0.07: query 0 goes to class 0 (wrong), query 1 to class 2 (right); both labels are in the top-2
    assert knn_classify(TRAIN, TRAIN_Y, QUERIES, QUERY_Y, k=2) == (0.5, 1.0)


def test_a_softer_temperature_lets_two_neighbours_outvote_one():
    votes = knn_votes(TRAIN, TRAIN_Y, QUERIES, k=3, temperature=1.0)
    expected = np.array([[math.exp(0.96), math.exp(0.936) + math.exp(0.8), 0.0],
                         [0.0, math.exp(0.8) + math.exp(0.6), math.exp(1.0)]])
    np.testing.assert_allclose(votes, expected, rtol=1e-5)
    # class 1 now wins both queries: e^.936 + e^.8 = 4.78 > e^.96 = 2.61 and e^.8 + e^.6 = 4.05 > e = 2.72
    assert knn_classify(TRAIN, TRAIN_Y, QUERIES, QUERY_Y, k=3, temperature=1.0) == (0.5, 1.0)
    assert votes.argmax(1).tolist() == [1, 1]


def test_features_are_l2_normalised_first():
    scaled = TRAIN * np.array([[5.0], [0.1], [2.0], [7.0]], dtype=np.float32)
    np.testing.assert_allclose(knn_votes(scaled, TRAIN_Y, QUERIES * 3, k=2), knn_votes(TRAIN, TRAIN_Y, QUERIES, k=2),
                               rtol=1e-5)
    raw = knn_votes(scaled, TRAIN_Y, QUERIES, k=2, normalize=False)
    assert not np.allclose(raw, knn_votes(TRAIN, TRAIN_Y, QUERIES, k=2))


def test_top5_counts_the_first_min_5_k_classes():
    # one query, k = 1: only its single nearest class counts, even for "top-5"
    assert knn_classify(TRAIN, TRAIN_Y, QUERIES[:1], QUERY_Y[:1], k=1) == (0.0, 0.0)


# ---------------------------------------------------------------------------------- DINO parity


@torch.no_grad()
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """The algorithm of DINO's ``knn_classifier`` (facebookresearch/dino, eval_knn.py), restated operation by
    operation: 100 test chunks, ``topk`` of ``test @ train.T``, neighbour labels one-hot encoded and weighted by
    ``exp(s / T)``, summed over the neighbours, classes ranked by ``sort(1, True)``, top-1 and the first
    ``min(5, k)`` ranks; percentages. Features are expected L2-normalised, as DINO's pipeline leaves them."""
    n_test = test_labels.shape[0]
    step = n_test // 100
    hits1 = hits5 = 0.0
    for start in range(0, n_test, step):
        stop = min(start + step, n_test)
        chunk, targets = test_features[start:stop], test_labels[start:stop]
        rows = targets.shape[0]
        sims, idx = torch.mm(chunk, train_features.t()).topk(k, largest=True, sorted=True)
        neighbour_labels = torch.gather(train_labels.view(1, -1).expand(rows, -1), 1, idx)
        one_hot = torch.zeros(rows * k, num_classes).scatter_(1, neighbour_labels.view(-1, 1), 1)
        weights = sims.clone().div_(T).exp_()
        probs = torch.sum(one_hot.view(rows, -1, num_classes) * weights.view(rows, -1, 1), 1)
        ranking = probs.sort(1, True)[1]
        correct = ranking.eq(targets.view(-1, 1))
        hits1 += correct.narrow(1, 0, 1).sum().item()
        hits5 += correct.narrow(1, 0, min(5, k)).sum().item()
    return hits1 * 100.0 / n_test, hits5 * 100.0 / n_test


@pytest.mark.parametrize("n_classes", [5, 12, 40])
def test_equal_to_dino_knn_classifier(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    centres = torch.randn(n_classes, 16, generator=g)
    train_y = torch.randint(0, n_classes, (500,), generator=g)
    test_y = torch.randint(0, n_classes, (230,), generator=g)
    train = centres[train_y] + 1.5 * torch.randn(500, 16, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(230, 16, generator=g)
    ks = (1, 3, 10, 20, 100, 200)
    ours = knn_accuracy(train.numpy(), train_y.numpy(), test.numpy(), test_y.numpy(), ks=ks, n_classes=n_classes,
                        chunk_size=17)
    unit_train = torch.nn.functional.normalize(train, dim=1, p=2)
    unit_test = torch.nn.functional.normalize(test, dim=1, p=2)
    for k in ks:
        top1, top5 = dino_knn_classifier(unit_train, train_y, unit_test, test_y, k, 0.07, num_classes=n_classes)
        # same counts of hits (compared as counts: the percentages are computed differently)
        assert round(ours[k][0] * 230) == round(top1 * 2.3) and round(ours[k][1] * 230) == round(top5 * 2.3), k
    assert ours[20][0] > 1.5 / n_classes  # far better than chance: the test checks something real


def test_results_do_not_depend_on_chunks_or_on_the_other_ks():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(90, 8)).astype(np.float32)
    train_y, test_y = rng.integers(0, 6, 300), rng.integers(0, 6, 90)
    together = knn_accuracy(train, train_y, test, test_y, ks=(5, 20, 50))
    for k in (5, 20, 50):
        assert knn_accuracy(train, train_y, test, test_y, ks=(k,), chunk_size=1)[k] == together[k]
    np.testing.assert_array_equal(knn_votes(train, train_y, test, k=20, chunk_size=7),
                                  knn_votes(train, train_y, test, k=20))


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 5}, "k=5 is more than the 4 training images"),
    ({"k": 0}, "k must be at least 1"),
    ({"k": 2, "temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"k": 2, "temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"k": 2, "n_classes": 2}, "train_labels must lie in 0..1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn_classify(TRAIN, TRAIN_Y, QUERIES, QUERY_Y, **kwargs)


def test_bad_shapes_and_labels_are_named():
    with pytest.raises(ValueError, match="test features are 3-d, train features 2-d"):
        knn_classify(TRAIN, TRAIN_Y, np.ones((2, 3), np.float32), QUERY_Y, k=2)
    with pytest.raises(ValueError, match=r"test_labels must be \(2,\)"):
        knn_classify(TRAIN, TRAIN_Y, QUERIES, [1], k=2)
    with pytest.raises(ValueError, match="test_labels must lie in 0..2"):
        knn_classify(TRAIN, TRAIN_Y, QUERIES, [1, 3], k=2)
    with pytest.raises(ValueError, match="NaN"):
        knn_classify(np.full((4, 2), np.nan, np.float32), TRAIN_Y, QUERIES, QUERY_Y, k=2)
