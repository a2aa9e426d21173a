"""Linear probe: the optimiser is torch's SGD + CosineAnnealingLR, the sweep, normalisations, determinism."""
import math

import numpy as np
import pytest
import torch

from simret.probe.linear import LEARNING_RATES, linear_probe, normalise_pair, train_linear


def _blobs(n_classes=4, n=200, dim=6, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n) % n_classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_each_classifier_follows_torch_sgd_with_cosine_annealing():
    x, y = _blobs()
    rates, epochs, batch = [0.05, 0.5], 3, 64
    weight, bias = train_linear(x, y, 4, rates, epochs=epochs, batch_size=batch, seed=7)

    # the reference: one nn.Linear per rate, DINO's optimiser and schedule, the same random draws
    g = torch.Generator().manual_seed(7)
    init = torch.empty(len(rates), 4, x.shape[1]).normal_(0.0, 0.01, generator=g)
    orders = [torch.randperm(len(x), generator=g) for _ in range(epochs)]
    for head, rate in enumerate(rates):
        layer = torch.nn.Linear(x.shape[1], 4)
        with torch.no_grad():
            layer.weight.copy_(init[head])
            layer.bias.zero_()
        optimizer = torch.optim.SGD(layer.parameters(), rate, momentum=0.9, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(len(x) / batch), eta_min=0)
        for order in orders:
            for begin in range(0, len(x), batch):
                rows = order[begin:begin + batch]
                loss = torch.nn.CrossEntropyLoss()(layer(x[rows]), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        torch.testing.assert_close(weight[head], layer.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias[head], layer.bias.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weight[0], weight[1], atol=1e-3)  # the two rates really trained differently


def test_probe_on_separable_features_and_its_sweep():
    x, y = _blobs(n=240)
    xtrain, ytrain, xtest, ytest = x[:160], y[:160], x[160:], y[160:]
    result = linear_probe(xtrain.numpy(), ytrain.numpy(), xtest.numpy(), ytest.numpy(), epochs=20, batch_size=32)
    assert result.top1 == 1.0 and result.top5 == 1.0  # well-separated blobs
    assert [r["learning_rate"] for r in result.sweep] == list(LEARNING_RATES)
    assert all(r["scaled_learning_rate"] == pytest.approx(r["learning_rate"] * 32 / 256) for r in result.sweep)
    best = max(result.sweep, key=lambda r: r["top1"])
    assert result.top1 == best["top1"]
    assert result.learning_rate == result.sweep[result.sweep.index(best)]["learning_rate"]
    assert min(r["top1"] for r in result.sweep) < 1.0  # the smallest rates barely move in 20 epochs: a real sweep
    report = result.to_dict()
    assert report["method"] == "linear" and report["norm"] == "bn" and report["epochs"] == 20


def test_same_seed_same_result_other_seed_other_weights():
    x, y = _blobs(n_classes=6, n=120, spread=2.5)
    a = linear_probe(x[:80], y[:80], x[80:], y[80:], learning_rates=[0.01, 0.1], epochs=5, batch_size=16, seed=3)
    b = linear_probe(x[:80], y[:80], x[80:], y[80:], learning_rates=[0.01, 0.1], epochs=5, batch_size=16, seed=3)
    assert a == b
    w3, _ = train_linear(x, y, 6, [0.1], epochs=2, batch_size=16, seed=3)
    w4, _ = train_linear(x, y, 6, [0.1], epochs=2, batch_size=16, seed=4)
    assert not torch.allclose(w3, w4)


def test_normalisations():
    x, _ = _blobs(n=50)
    train, test = x[:40] * 100 + 7, x[40:] * 100 + 7
    bn_train, bn_test = normalise_pair(train, test, "bn")
    torch.testing.assert_close(bn_train.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(bn_train.var(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=1e-4)
    expected = (test - train.mean(0)) / torch.sqrt(train.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(bn_test, expected, rtol=1e-4, atol=1e-4)  # the train split's statistics
    l2_train, _ = normalise_pair(train, test, "l2n")
    torch.testing.assert_close(l2_train.norm(dim=1), torch.ones(40))
    assert normalise_pair(train, test, "none")[0] is train


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rates": [0.0]}, "learning rates must be finite numbers > 0"),
    ({"learning_rates": []}, "learning rates must be finite numbers > 0"),
    ({"epochs": 0}, "epochs and batch size must be at least 1"),
    ({"norm": "zca"}, "unknown feature normalisation 'zca'"),
])
def test_bad_options_are_named(kwargs, message):
    x, y = _blobs(n=20)
    with pytest.raises(ValueError, match=message):
        linear_probe(x, y, x, y, **kwargs)


def test_bad_inputs_are_named():
    x, y = _blobs(n=20)
    with pytest.raises(ValueError, match="test features are 3-d, train features 6-d"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="test_labels must lie in 0..3"):
        linear_probe(x, y, x, np.full(20, 9))
