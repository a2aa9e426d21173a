"""Few-shot methods: exact scores against slow per-episode references written plainly here."""
import numpy as np
import pytest
import torch

from simret.fewshot import MissingBaseMeanWarning, get_method, list_methods

E, W, K, Q, D = 4, 3, 2, 5, 6


@pytest.fixture
def episode_batch():
    """Small random episodes in float64, support in a shuffled (not class-major) order."""
    rng = np.random.RandomState(0)
    support = rng.randn(E, W * K, D) + 1.5
    query = rng.randn(E, Q, D) + 1.5
    labels = np.stack([rng.permutation(np.repeat(np.arange(W), K)) for _ in range(E)])
    base_mean = rng.randn(D) * 0.5 + 1.5
    return support, labels, query, base_mean


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _means(support, labels):
    return np.stack([support[labels == c].mean(0) for c in range(W)])


def reference_protonet(support, labels, query, squared=False):
    out = np.zeros((E, Q, W))
    for e in range(E):
        prototypes = _means(support[e], labels[e])
        for i in range(Q):
            for c in range(W):
                squared_distance = np.sum((query[e, i] - prototypes[c]) ** 2)
                out[e, i, c] = -(squared_distance if squared else np.sqrt(squared_distance))
    return out


def reference_cosine(support, labels, query):
    out = np.zeros((E, Q, W))
    for e in range(E):
        prototypes = _means(support[e], labels[e])
        for i in range(Q):
            for c in range(W):
                q, p = query[e, i], prototypes[c]
                out[e, i, c] = q @ p / (np.linalg.norm(q) * np.linalg.norm(p))
    return out


def reference_simpleshot(support, labels, query, base_mean):
    return reference_protonet(_l2n(support - base_mean), labels, _l2n(query - base_mean))


def reference_softkmeans(support, labels, query, steps, temperature):
    support, query = _l2n(support), _l2n(query)
    out = np.zeros((E, Q, W))
    for e in range(E):
        prototypes = _means(support[e], labels[e])
        for _ in range(steps):
            distances = np.array([[np.sum((q - p) ** 2) for p in prototypes] for q in query[e]])
            z = np.exp(-distances / temperature)
            z /= z.sum(1, keepdims=True)
            for c in range(W):
                members = support[e][labels[e] == c]
                prototypes[c] = (members.sum(0) + (z[:, c:c + 1] * query[e]).sum(0)) / (len(members) + z[:, c].sum())
        out[e] = [[-np.sum((q - p) ** 2) for p in prototypes] for q in query[e]]
    return out


def reference_logreg(support, labels, query):
    from sklearn.linear_model import LogisticRegression

    out = np.zeros((E, Q, W))
    for e in range(E):
        model = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(_l2n(support[e]), labels[e])
        out[e] = model.decision_function(_l2n(query[e]))
    return out


def test_protonet_is_minus_euclidean_to_class_means(episode_batch):
    support, labels, query, _ = episode_batch
    scores = get_method("protonet")(support, labels, query)
    assert isinstance(scores, np.ndarray) and scores.shape == (E, Q, W)
    np.testing.assert_allclose(scores, reference_protonet(support, labels, query), rtol=1e-10, atol=1e-10)


def test_protonet_squared_metric_is_the_papers_distance(episode_batch):
    support, labels, query, _ = episode_batch
    scores = get_method("protonet", metric="sqeuclidean")(support, labels, query)
    np.testing.assert_allclose(scores, reference_protonet(support, labels, query, squared=True), rtol=1e-10, atol=1e-10)
    # same ranking of the classes as the plain distance
    np.testing.assert_array_equal(scores.argmax(-1), get_method("protonet")(support, labels, query).argmax(-1))


def test_protonet_exact_values_on_a_hand_made_episode():
    support = np.array([[[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])  # class 0: (0,0),(2,0) → mean (1,0); class 1: (0,3)
    labels = np.array([[0, 0, 1]])
    query = np.array([[[4.0, 4.0]]])  # distances: √(9+16)=5 to (1,0), √(16+1)=√17 to (0,3)
    scores = get_method("protonet")(support, labels, query)
    np.testing.assert_allclose(scores, [[[-5.0, -np.sqrt(17.0)]]], rtol=1e-12)


def test_cosine_uses_means_of_raw_support(episode_batch):
    support, labels, query, _ = episode_batch
    np.testing.assert_allclose(get_method("cosine")(support, labels, query),
                               reference_cosine(support, labels, query), rtol=1e-10, atol=1e-12)


def test_simpleshot_cl2n(episode_batch):
    support, labels, query, base_mean = episode_batch
    scores = get_method("simpleshot", base_mean=base_mean)(support, labels, query)
    np.testing.assert_allclose(scores, reference_simpleshot(support, labels, query, base_mean), rtol=1e-10, atol=1e-12)
    # not the same as without centring: the base mean matters
    assert not np.allclose(scores, reference_simpleshot(support, labels, query, np.zeros(D)))


def test_simpleshot_without_base_mean_warns_and_uses_l2n(episode_batch):
    support, labels, query, _ = episode_batch
    with pytest.warns(MissingBaseMeanWarning, match="base-split mean"):
        method = get_method("simpleshot")
    assert method.norm == "l2n"
    np.testing.assert_allclose(method(support, labels, query),
                               reference_simpleshot(support, labels, query, np.zeros(D)), rtol=1e-10, atol=1e-12)
    unnormalised = get_method("simpleshot", norm="un")
    np.testing.assert_allclose(unnormalised(support, labels, query), reference_protonet(support, labels, query))


def test_softkmeans_refines_prototypes_with_queries(episode_batch):
    support, labels, query, _ = episode_batch
    for steps, temperature in ((1, 0.1), (3, 0.5)):
        scores = get_method("softkmeans", steps=steps, temperature=temperature)(support, labels, query)
        np.testing.assert_allclose(scores, reference_softkmeans(support, labels, query, steps, temperature),
                                   rtol=1e-9, atol=1e-12)
    zero_steps = get_method("softkmeans", steps=0)(support, labels, query)
    np.testing.assert_allclose(zero_steps, reference_softkmeans(support, labels, query, 0, 1.0), rtol=1e-10)


def test_softkmeans_is_transductive(episode_batch):
    support, labels, query, _ = episode_batch
    method = get_method("softkmeans")
    assert method.transductive
    full = method(support, labels, query)
    alone = method(support, labels, query[:, :2])
    assert not np.allclose(full[:, :2], alone)  # a query's scores depend on the other queries


def test_logreg_matches_sklearn_per_episode(episode_batch):
    support, labels, query, _ = episode_batch
    scores = get_method("logreg", n_jobs=1)(support, labels, query)
    np.testing.assert_allclose(scores, reference_logreg(support, labels, query), rtol=1e-6, atol=1e-8)


def test_logreg_is_deterministic_across_worker_counts(episode_batch):
    support, labels, query, _ = episode_batch
    one = get_method("logreg", n_jobs=1)(support, labels, query)
    two = get_method("logreg", n_jobs=2)(support, labels, query)
    np.testing.assert_array_equal(one, two)


def test_logreg_two_way_logits(episode_batch):
    from sklearn.linear_model import LogisticRegression

    support, labels, query, _ = episode_batch
    labels2 = labels % 2
    scores = get_method("logreg", n_jobs=1)(support, labels2, query)
    assert scores.shape == (E, Q, 2)
    for e in range(E):
        model = LogisticRegression(max_iter=1000, random_state=0).fit(_l2n(support[e]), labels2[e])
        np.testing.assert_allclose(scores[e, :, 1] - scores[e, :, 0], model.decision_function(_l2n(query[e])),
                                   rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(scores[e].argmax(1), model.predict(_l2n(query[e])))


@pytest.mark.parametrize("name", ["protonet", "cosine", "simpleshot", "softkmeans", "logreg"])
def test_support_order_does_not_matter(episode_batch, name):
    support, labels, query, base_mean = episode_batch
    kwargs = {"base_mean": base_mean} if name in ("simpleshot", "softkmeans") else {}
    if name == "logreg":
        kwargs["n_jobs"] = 1
    method = get_method(name, **kwargs)
    rng = np.random.RandomState(1)
    order = np.stack([rng.permutation(W * K) for _ in range(E)])
    permuted = method(np.take_along_axis(support, order[:, :, None], 1), np.take_along_axis(labels, order, 1), query)
    np.testing.assert_allclose(permuted, method(support, labels, query), rtol=1e-6, atol=1e-8)


def test_torch_in_torch_out_float32(episode_batch):
    support, labels, query, base_mean = episode_batch
    method = get_method("simpleshot", base_mean=torch.tensor(base_mean, dtype=torch.float32))
    scores = method(torch.tensor(support, dtype=torch.float32), torch.tensor(labels), torch.tensor(query).float())
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (E, Q, W)
    np.testing.assert_allclose(scores.numpy(), reference_simpleshot(support, labels, query, base_mean), atol=1e-5)


def test_registry_and_bad_inputs(episode_batch):
    support, labels, query, _ = episode_batch
    assert list_methods() == ["protonet", "cosine", "simpleshot", "logreg", "softkmeans", "bdcspn", "tim",
                              "laplacianshot", "ptmap"]
    with pytest.raises(ValueError, match="unknown few-shot method 'knn'; known: protonet"):
        get_method("knn")
    with pytest.raises(ValueError, match="method 'protonet' does not take base_mean"):
        get_method("protonet", base_mean=np.zeros(D))
    method = get_method("protonet")
    with pytest.raises(ValueError, match=r"expected support \(E, S, D\)"):
        method(support[0], labels, query)
    with pytest.raises(ValueError, match="shapes do not match"):
        method(support, labels, query[:, :, :3])
    with pytest.raises(ValueError, match="episode 0 has no support example of class 3"):
        method(support, labels, query, n_way=4)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.1"):
        method(support, labels, query, n_way=2)
    with pytest.raises(ValueError, match="must be integers"):
        method(support, labels.astype(float), query)


def test_logreg_minimises_the_l2_penalised_multinomial_loss(episode_batch):
    """Independent of scikit-learn: the objective written out, C·Σ cross-entropy + ½‖W‖² (bias not penalised),
    minimised by SciPy on each episode's L2-normalised support; the log-probabilities of the queries agree."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    support, labels, query, _ = episode_batch
    scores = get_method("logreg", tol=1e-10, n_jobs=1)(support, labels, query)
    for e in range(E):
        xs, xq, ys = _l2n(support[e]), _l2n(query[e]), labels[e]

        def loss(params, xs=xs, ys=ys):
            weights, bias = params[:W * D].reshape(W, D), params[W * D:]
            logits = xs @ weights.T + bias
            return -log_softmax(logits, 1)[np.arange(len(ys)), ys].sum() + 0.5 * (weights ** 2).sum()

        best = minimize(loss, np.zeros(W * D + W), method="L-BFGS-B",
                        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}).x
        expected = log_softmax(xq @ best[:W * D].reshape(W, D).T + best[W * D:], 1)
        np.testing.assert_allclose(log_softmax(scores[e], 1), expected, atol=1e-5)
