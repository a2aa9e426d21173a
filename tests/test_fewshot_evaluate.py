"""evaluate(): per-episode accuracies against a slow reference loop, chunking, CI formula, errors."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from simret.fewshot import FewShotResult, confidence_interval, evaluate, get_method, sample_episodes
from simret.fewshot.features import FeatureBank

N_CLASSES, PER_CLASS, D = 7, 30, 16


@pytest.fixture(scope="module")
def bank():
    """A float32 bank with some class structure (accuracies well inside (0, 1)), not centred at zero."""
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    centres = rng.randn(N_CLASSES, D) * 0.6
    features = (centres[labels] + rng.randn(labels.size, D) + 2.0).astype(np.float32)
    order = rng.permutation(labels.size)
    return features[order], labels[order]


@pytest.fixture(scope="module")
def episodes(bank):
    return sample_episodes(bank[1], n_way=5, n_shot=3, n_query=4, n_episodes=60, seed=0)


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_accuracies(features, episodes, name, base_mean=None):
    """One episode at a time, in float64, the way the methods are defined."""
    x = features.astype(np.float64)
    if name == "simpleshot":
        x = _l2n(x - base_mean)
    accuracies = []
    for e in range(len(episodes)):
        support, labels = x[episodes.support[e]], episodes.support_labels[e]
        prototypes = np.stack([support[labels == c].mean(0) for c in range(episodes.n_way)])
        correct = 0
        for index, label in zip(episodes.query[e], episodes.query_labels[e]):
            q = x[index]
            if name == "cosine":
                scores = [q @ p / np.linalg.norm(q) / np.linalg.norm(p) for p in prototypes]
            else:
                scores = [-np.sum((q - p) ** 2) for p in prototypes]
            correct += int(np.argmax(scores) == label)
        accuracies.append(correct / len(episodes.query[e]))
    return np.array(accuracies)


@pytest.mark.parametrize("name", ["protonet", "cosine", "simpleshot"])
def test_prototype_methods_match_the_per_episode_reference(bank, episodes, name):
    features, labels = bank
    base_mean = features[:50].mean(0) if name == "simpleshot" else None
    kwargs = {"base_mean": base_mean} if base_mean is not None else {}
    result = evaluate(features, episodes, name, **kwargs)
    expected = reference_accuracies(features, episodes, name, base_mean)
    assert 0.3 < expected.mean() < 0.95  # a real test: neither trivial nor hopeless
    np.testing.assert_array_equal(result.accuracies, expected)
    assert result.method == name and (result.n_way, result.n_shot, result.n_query) == (5, 3, 4)
    # the same from a float64 bank (torch path, no FAISS), from tensors, and through the generic path
    np.testing.assert_array_equal(evaluate(features.astype(np.float64), episodes, name, **kwargs).accuracies, expected)
    np.testing.assert_array_equal(evaluate(torch.from_numpy(features), episodes, name, **kwargs).accuracies, expected)
    generic = get_method(name, **kwargs).__call__  # a plain callable: gathered features, scores, argmax
    np.testing.assert_array_equal(evaluate(features, episodes, generic).accuracies, expected)


@pytest.mark.parametrize("name", ["protonet", "cosine"])
def test_support_in_any_order_and_any_chunking(bank, episodes, name):
    features, _ = bank
    expected = evaluate(features, episodes, name).accuracies
    rng = np.random.RandomState(3)
    order = np.stack([rng.permutation(episodes.support.shape[1]) for _ in range(len(episodes))])
    shuffled = dataclasses.replace(episodes, support=np.take_along_axis(episodes.support, order, 1),
                                   support_labels=np.take_along_axis(episodes.support_labels, order, 1))
    np.testing.assert_array_equal(evaluate(features, shuffled, name).accuracies, expected)
    for chunk in (1, 7, 1000):
        np.testing.assert_array_equal(evaluate(features, episodes, name, chunk_size=chunk).accuracies, expected)


def test_transductive_and_logreg_through_the_generic_path(bank, episodes):
    features, _ = bank
    few = episodes[:6]
    for name, kwargs in (("softkmeans", {}), ("logreg", {"n_jobs": 1})):
        method = get_method(name, **kwargs)
        expected = []
        for e in range(len(few)):  # one episode at a time
            scores = method(features[few.support[e]][None], few.support_labels[e][None], features[few.query[e]][None])
            expected.append((scores[0].argmax(-1) == few.query_labels[e]).mean())
        result = evaluate(features, few, name, chunk_size=4, **kwargs)
        np.testing.assert_array_equal(result.accuracies, np.array(expected))


def test_feature_bank_input(bank, episodes):
    features, labels = bank
    stored = FeatureBank(features, labels, [str(i) for i in range(len(labels))], [str(c) for c in range(N_CLASSES)])
    np.testing.assert_array_equal(evaluate(stored, episodes).accuracies, evaluate(features, episodes).accuracies)


def test_ci95_formula_on_a_hand_example():
    accuracies = np.array([0.5, 1.0, 0.75, 0.75])
    # mean 0.75; population std sqrt((0.0625 + 0.0625 + 0 + 0) / 4) = sqrt(0.03125); √E = 2
    expected = 1.96 * math.sqrt(0.03125) / 2
    assert confidence_interval(accuracies) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.17324116, rel=1e-7)
    result = FewShotResult(accuracies, "protonet", 5, 1, 15, seed=0)
    assert result.mean == 0.75 and result.std == pytest.approx(math.sqrt(0.03125), rel=1e-12)
    assert result.ci95 == pytest.approx(expected, rel=1e-12)
    assert result.format() == "75.00 ± 17.32" and result.format(percent=False) == "0.7500 ± 0.1732"
    summary = result.to_dict()
    assert summary["n_episodes"] == 4 and summary["ci95"] == pytest.approx(expected)
    assert confidence_interval([0.6, 0.6, 0.6]) == 0.0


def test_result_of_evaluate_is_consistent(bank, episodes):
    result = evaluate(bank[0], episodes, "protonet")
    assert result.accuracies.shape == (60,) and result.accuracies.dtype == np.float64
    assert result.mean == pytest.approx(result.accuracies.mean())
    assert result.ci95 == pytest.approx(1.96 * result.accuracies.std(ddof=0) / math.sqrt(60))
    assert set(np.unique(result.accuracies * 20)) <= set(range(21))  # multiples of 1/20 (20 queries)


def test_errors(bank, episodes):
    features, _ = bank
    with pytest.raises(ValueError, match="feature bank holds 100: episodes drawn from another split"):
        evaluate(features[:100], episodes)
    with pytest.raises(ValueError, match=r"features must be \(N, D\)"):
        evaluate(features[0], episodes)
    with pytest.raises(ValueError, match="only apply when the method is given by name"):
        evaluate(features, episodes, get_method("protonet"), base_mean=features.mean(0))
    with pytest.raises(ValueError, match="unknown few-shot method"):
        evaluate(features, episodes, "nearest")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        evaluate(features, episodes, chunk_size=0)
    with pytest.raises(ValueError, match="method returned scores of shape"):
        evaluate(features, episodes, lambda s, sl, q: torch.zeros(s.shape[0], 2, 5))


def test_import_is_light_and_names_are_the_public_ones():
    import subprocess
    import sys

    code = ("import sys, simret.fewshot as f\n"
            "heavy = [m for m in ('torch', 'sklearn', 'h5py', 'faiss') if m in sys.modules]\n"
            "import simret.fewshot.evaluation\n"
            "print(heavy, callable(f.evaluate), f.evaluate.__module__, callable(f.get_method), f.Episodes.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "simret.fewshot.evaluation", "True", "Episodes"]


def test_uneven_shots_per_class_and_missing_classes(bank):
    from simret.fewshot import Episodes

    features, labels = bank
    rng = np.random.RandomState(5)
    support, query = [], []
    for _ in range(30):  # 2-way episodes: class 0 has one shot, class 1 three
        a, b = rng.choice(N_CLASSES, 2, replace=False)
        pa, pb = rng.permutation(np.flatnonzero(labels == a)), rng.permutation(np.flatnonzero(labels == b))
        support.append([pb[0], pa[0], pb[1], pb[2]])
        query.append([pa[1], pa[2], pb[3], pb[4]])
    support_labels = np.tile([1, 0, 1, 1], (30, 1))
    episodes = Episodes(np.array(support), support_labels, np.array(query), np.tile([0, 0, 1, 1], (30, 1)),
                        np.zeros((30, 2), np.int64), n_way=2, n_shot=2, n_query=2)
    for name in ("protonet", "cosine"):
        expected = evaluate(features, episodes, get_method(name).__call__).accuracies
        np.testing.assert_array_equal(evaluate(features, episodes, name).accuracies, expected)
    broken = dataclasses.replace(episodes, support_labels=np.zeros((30, 4), np.int64))
    with pytest.raises(ValueError, match="episode 0 has no support example of class 1"):
        evaluate(features, broken, "protonet")


def test_progress_bar_counts_every_episode_and_changes_nothing(bank, episodes, monkeypatch):
    from simret.utils import progress as progress_module

    bars = []

    class Recorder:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.done = total, desc, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.done += n

    monkeypatch.setattr(progress_module, "progress", lambda total, desc, unit: Recorder(total, desc, unit))
    features, _ = bank
    for name, kwargs in (("protonet", {}), ("softkmeans", {})):
        quiet = evaluate(features, episodes, name, chunk_size=7, **kwargs).accuracies
        assert not bars  # no label, no bar
        shown = evaluate(features, episodes, name, chunk_size=7, progress=f"{name} 3-shot", **kwargs).accuracies
        np.testing.assert_array_equal(shown, quiet)
        bar = bars.pop()
        assert (bar.total, bar.desc, bar.done) == (60, f"{name} 3-shot", 60)


def test_accuracy_over_classes_decides_exactly_as_argmax():
    from simret.fewshot.evaluation import _accuracy_over_classes as accuracy_over_classes
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(40, 5, 7)).astype(np.float32)  # small integers: many ties
    scores[0, 2, 3] = np.nan  # NaN wins argmax
    scores[1, :, 0] = np.nan
    scores[2] = rng.standard_normal((5, 7))  # no ties at all
    labels = rng.integers(0, 5, size=(40, 7))
    expected = (scores.argmax(1) == labels).mean(1)
    np.testing.assert_array_equal(accuracy_over_classes(scores, labels), expected)
    ties = np.zeros((1, 3, 2), np.float32)  # every class ties: argmax says class 0
    np.testing.assert_array_equal(accuracy_over_classes(ties, np.array([[0, 1]])), [0.5])
