"""The pooling registry and its functional core."""
import pytest
import torch

from simret.models import ClsPool, GeMPool, SimPool, create_pool, list_pools
from simret.models.pooling import avg_pool, gem_pool, max_pool


def test_registry_lists_every_pooling():
    assert set(list_pools()) >= {"avg", "max", "gem", "cls", "simpool"}


@pytest.mark.parametrize("name", ["avg", "max", "gem", "simpool"])
@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (3, 20, 8)])
def test_every_pooling_maps_to_batch_by_channels(name, shape):
    pool = create_pool(name, 8)
    assert pool(torch.rand(shape)).shape == (3, 8)


def test_functional_core_values():
    x = torch.rand(2, 4, 3, 3) + 0.1
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(avg_pool(x), x.mean((2, 3)))
    torch.testing.assert_close(avg_pool(tokens), x.mean((2, 3)))
    torch.testing.assert_close(max_pool(x), x.amax((2, 3)))
    torch.testing.assert_close(gem_pool(x, 3.0), x.pow(3).mean((2, 3)).pow(1 / 3))
    torch.testing.assert_close(gem_pool(x, 1.0), x.mean((2, 3)))


def test_gem_has_learnable_p_and_takes_gamma_as_p():
    gem = create_pool("gem", 8, p=4.0)
    assert isinstance(gem, GeMPool) and gem.p.requires_grad and gem.p.item() == 4.0
    x = torch.rand(2, 8, 3, 3)
    gem(x).sum().backward()
    assert gem.p.grad is not None
    from simret.models import create_encoder

    assert create_encoder("test_resnet", pool="gem", gamma=5.0).pool.p.item() == 5.0


def test_cls_takes_first_token_and_refuses_feature_maps():
    pool = create_pool("cls", 8)
    assert isinstance(pool, ClsPool)
    tokens = torch.randn(2, 5, 8)
    torch.testing.assert_close(pool(tokens), tokens[:, 0])
    with pytest.raises(ValueError, match="ViT tokens"):
        pool(torch.randn(2, 8, 3, 3))


def test_simpool_kwargs_pass_through():
    pool = create_pool("simpool", 16, gamma=2.0, num_heads=4, use_beta=True)
    assert isinstance(pool, SimPool) and pool.gamma == 2.0 and pool.num_heads == 4 and hasattr(pool, "beta")


def test_unknown_pooling_and_wrong_kwargs():
    with pytest.raises(ValueError, match="unknown pooling 'mean'.*avg"):
        create_pool("mean", 8)
    with pytest.raises(TypeError, match="'avg' does not take"):
        create_pool("avg", 8, gamma=2.0)
