"""Transductive methods (BD-CSPN, TIM, LaplacianShot, PT-MAP) against easyfsl's modules, episode by episode.

easyfsl (a test-only dependency, ``pip install easyfsl``) runs one episode at a time on features: its
backbone is ``nn.Identity()``, so ``process_support_set(support)`` / ``forward(query)`` see exactly the
features simret's batched methods see. Predictions must agree exactly; scores to ``SCORE_TOL`` (absolute;
float32 rounding of batched vs. per-episode matrix products, accumulated over the iterations).
"""
import numpy as np
import pytest
import torch
from torch import nn

from simret.fewshot.methods import get_method, list_methods

easyfsl = pytest.importorskip("easyfsl.methods")

SCORE_TOL = {"bdcspn": 1e-6, "tim": 1e-5, "laplacianshot": 1e-5, "ptmap": 1e-5}
FAST = {"ptmap": {"steps": 3}}  # for the tests that are not about parity: Sinkhorn runs up to 1000 iterations


def make_episodes(n_episodes=3, n_way=5, n_shot=2, n_query=6, dim=12, seed=0, positive=False):
    """Clustered features, support labels in shuffled order: ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)``."""
    generator = torch.Generator().manual_seed(seed)
    supports, labels, queries = [], [], []
    for _ in range(n_episodes):
        centres = torch.randn(n_way, dim, generator=generator) * 1.5
        support_labels = torch.arange(n_way).repeat(n_shot)[torch.randperm(n_way * n_shot, generator=generator)]
        query_labels = torch.arange(n_way).repeat_interleave(n_query)
        support = centres[support_labels] + torch.randn(n_way * n_shot, dim, generator=generator)
        query = centres[query_labels] + torch.randn(n_way * n_query, dim, generator=generator)
        if positive:  # post-ReLU features, as PT-MAP's power transform expects
            support, query = support.abs(), query.abs()
        supports.append(support)
        labels.append(support_labels)
        queries.append(query)
    return torch.stack(supports), torch.stack(labels), torch.stack(queries)


def easyfsl_scores(module: nn.Module, support, labels, query) -> torch.Tensor:
    """easyfsl's method, one episode at a time: ``(E, Q, W)``."""
    out = []
    for episode in range(support.shape[0]):
        module.process_support_set(support[episode], labels[episode])
        out.append(module(query[episode]).detach())
    return torch.stack(out)


def easyfsl_norm(norm: str, base_mean=None) -> dict:
    """easyfsl's feature_centering/feature_normalization for simret's ``norm``."""
    return {"none": {}, "l2n": {"feature_normalization": 2},
            "cl2n": {"feature_centering": base_mean, "feature_normalization": 2}}[norm]


def assert_same(name, ours, theirs):
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    np.testing.assert_array_equal(ours.argmax(-1).numpy(), theirs.argmax(-1).numpy())
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=SCORE_TOL[name])


def test_registered_names():
    assert {"bdcspn", "tim", "laplacianshot", "ptmap"} <= set(list_methods())
    assert all(get_method(name).transductive for name in ("bdcspn", "tim", "laplacianshot", "ptmap"))


@pytest.mark.parametrize("norm", ["none", "l2n", "cl2n"])
@pytest.mark.parametrize("n_shot", [1, 5])
def test_bdcspn_matches_easyfsl(norm, n_shot):
    support, labels, query = make_episodes(n_shot=n_shot, seed=n_shot)
    base_mean = torch.randn(support.shape[-1], generator=torch.Generator().manual_seed(9))
    options = {"norm": norm, **({"base_mean": base_mean} if norm == "cl2n" else {})}
    ours = get_method("bdcspn", **options)(support, labels, query)
    theirs = easyfsl_scores(easyfsl.BDCSPN(nn.Identity(), **easyfsl_norm(norm, base_mean)), support, labels, query)
    assert_same("bdcspn", ours, theirs)


@pytest.mark.parametrize("options, theirs_options", [
    ({"norm": "none"}, {}),  # easyfsl's defaults: 50 steps, lr 1e-4, T=10, weights 1 / 1 / 0.1
    ({"norm": "l2n", "steps": 30, "lr": 1e-2, "temperature": 15.0, "ce_weight": 0.1, "conditional_weight": 0.3},
     {"feature_normalization": 2, "fine_tuning_steps": 30, "fine_tuning_lr": 1e-2, "temperature": 15.0,
      "cross_entropy_weight": 0.1, "conditional_entropy_weight": 0.3}),
])
def test_tim_matches_easyfsl(options, theirs_options):
    support, labels, query = make_episodes(n_shot=1, seed=3)
    ours = get_method("tim", **options)(support, labels, query)
    theirs = easyfsl_scores(easyfsl.TIM(nn.Identity(), **theirs_options), support, labels, query)
    assert_same("tim", ours, theirs)
    # the fine-tuning moved the prototypes: the scores are not the class means' cosines any more
    plain = get_method("tim", steps=0, norm=options["norm"])(support, labels, query)
    assert not torch.allclose(ours, plain, atol=1e-6)


@pytest.mark.parametrize("options, theirs_options, n_query", [
    ({"norm": "none"}, {}, 6),
    ({"norm": "l2n", "knn": 5, "lam": 1.2, "steps": 30}, {"feature_normalization": 2, "knn": 5,
                                                          "lambda_regularization": 1.2, "inference_steps": 30}, 6),
    ({"norm": "l2n"}, {"feature_normalization": 2}, 3),  # 15 queries: torch.cdist's direct (not mm) path
])
def test_laplacianshot_matches_easyfsl(options, theirs_options, n_query):
    support, labels, query = make_episodes(n_shot=2, n_query=n_query, seed=4, n_episodes=4)
    ours = get_method("laplacianshot", **options)(support, labels, query)
    theirs = easyfsl_scores(easyfsl.LaplacianShot(nn.Identity(), **theirs_options), support, labels, query)
    assert_same("laplacianshot", ours, theirs)
    np.testing.assert_allclose(ours.sum(-1).numpy(), 1.0, atol=1e-5)


def test_laplacianshot_defaults_follow_the_paper_cl2n():
    base_mean = np.ones(12, dtype=np.float32)
    assert get_method("laplacianshot").norm == "l2n"
    assert get_method("laplacianshot", base_mean=base_mean).norm == "cl2n"
    with pytest.raises(ValueError, match="base_mean is only used with norm='cl2n'"):
        get_method("laplacianshot", norm="none", base_mean=base_mean)


class PaperPTMAP(easyfsl.PTMAP):
    """easyfsl's PTMAP with the PT-MAP paper's preprocessing after the power transform (transcribed from
    github.com/yhu01/PT-MAP test_standard.py: ``scaleEachUnitaryDatas`` then ``centerDatas``, support and
    queries each centred on their own mean). easyfsl computes support and query features separately, so
    the per-set centring falls out of overriding ``compute_features``."""

    def compute_features(self, images):
        features = super().compute_features(images)
        features = features / features.norm(dim=1, keepdim=True)
        features = features - features.mean(0, keepdim=True)
        return features / features.norm(dim=1, keepdim=True)


def test_ptmap_matches_easyfsl():
    # easyfsl's PTMAP exactly (its defaults: 10 steps, no post-normalisation) on small-norm features
    support, labels, query = make_episodes(n_shot=1, seed=5, positive=True)
    scale = 0.1
    ours = get_method("ptmap", steps=10, post_norm=False)(support * scale, labels, query * scale)
    theirs = easyfsl_scores(easyfsl.PTMAP(nn.Identity()), support * scale, labels, query * scale)
    assert_same("ptmap", ours, theirs)
    # simret's defaults: the paper's 20 steps and post-normalisation
    support, labels, query = make_episodes(n_shot=5, seed=5, positive=True)
    ours = get_method("ptmap")(support, labels, query)
    theirs = easyfsl_scores(PaperPTMAP(nn.Identity(), fine_tuning_steps=20), support, labels, query)
    assert_same("ptmap", ours, theirs)
    np.testing.assert_allclose(ours.sum(-1).numpy(), 1.0, atol=1e-3)  # Sinkhorn stops at a tolerance


def test_ptmap_options_reach_easyfsl():
    support, labels, query = make_episodes(n_shot=2, seed=6, positive=True)
    options = {"steps": 5, "lr": 0.5, "lam": 5.0, "power": 0.7, "norm": "l2n"}
    ours = get_method("ptmap", **options)(support, labels, query)
    theirs = easyfsl_scores(PaperPTMAP(nn.Identity(), fine_tuning_steps=5, fine_tuning_lr=0.5,
                                       lambda_regularization=5.0, power_factor=0.7, feature_normalization=2),
                            support, labels, query)
    assert_same("ptmap", ours, theirs)


@pytest.mark.parametrize("name", ["bdcspn", "tim", "laplacianshot", "ptmap"])
def test_episodes_are_independent_and_numpy_in_numpy_out(name):
    """An episode's scores do not depend on the other episodes of the batch; NumPy in, NumPy out."""
    support, labels, query = make_episodes(n_episodes=3, seed=7, positive=True)
    method = get_method(name, **FAST.get(name, {}))
    together = method(support.numpy(), labels.numpy(), query.numpy())
    assert isinstance(together, np.ndarray) and together.shape == (3, query.shape[1], 5)
    alone = method(support[1:2].numpy(), labels[1:2].numpy(), query[1:2].numpy())
    np.testing.assert_allclose(together[1:2], alone, rtol=0, atol=1e-5)
    assert (together.argmax(-1) == np.arange(5).repeat(6)).mean() > 0.5  # clustered data: mostly right


@pytest.mark.parametrize("name", ["bdcspn", "tim", "laplacianshot", "ptmap"])
def test_transductive_queries_change_each_other(name):
    support, labels, query = make_episodes(n_episodes=1, seed=8, positive=True)
    method = get_method(name, **FAST.get(name, {}))
    full = method(support, labels, query)
    fewer = method(support, labels, query[:, :10])
    assert not torch.allclose(full[:, :10], fewer, atol=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="does not take"):
        get_method("bdcspn", steps=3)
    with pytest.raises(ValueError, match="needs base_mean"):
        get_method("tim", norm="cl2n")
    with pytest.raises(ValueError, match="knn >= 1"):
        get_method("laplacianshot", knn=0)
    with pytest.raises(ValueError, match="0 < lr <= 1"):
        get_method("ptmap", lr=2.0)


def test_half_precision_is_computed_in_float32():
    support, labels, query = make_episodes(n_episodes=2, seed=9, positive=True)
    for name in ("tim", "ptmap"):
        half = get_method(name, **FAST.get(name, {}))(support.half(), labels, query.half())
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_fewshot_command_runs_the_transductive_methods(tmp_path):
    from click.testing import CliRunner

    from simret.cli import cli
    from simret.data.samples import write_fewshot_sample

    write_fewshot_sample(tmp_path / "digits", per_class=8, image_size=16)
    result = CliRunner().invoke(cli, [
        "fewshot", str(tmp_path / "digits"), "--model", "test_resnet", "--weights", "none", "--img-size", "32",
        "-j", "0", "--device", "cpu", "--shot", "1", "--query", "3", "--episodes", "4",
        "--method", "bdcspn,tim,laplacianshot,ptmap", "--features-dir", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[5:]}
    assert set(rows) == {"bdcspn", "tim", "laplacianshot", "ptmap"}
    assert "base mean: train split" in result.stdout  # laplacianshot gets CL2N, as in the paper
