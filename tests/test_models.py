import pytest
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models import Discriminator, Generator, build_models, sample_z


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(resolution, channels):
    cfg = ModelConfig(resolution=resolution, channels=channels, ngf=8, ndf=8)
    g, d = build_models(cfg, seed=0)
    z = sample_z(5, cfg, torch.Generator().manual_seed(0))
    x = g(z)
    assert x.shape == (5, channels, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1  # Tanh output
    assert d(x).shape == (5,)


def test_parameter_counts_match_pytorch_examples():
    # pytorch/examples dcgan at 64x64x3, ngf = ndf = 64, nz = 100
    g, d = build_models(ModelConfig(resolution=64, channels=3, ngf=64, ndf=64), seed=0)
    assert count(g) == 3_576_704
    assert count(d) == 2_765_568


def test_paper_lsun_generator_widths():
    g = Generator(ModelConfig(resolution=64, channels=3, ngf=128))
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    # z -> 4x4x1024 -> 8x8x512 -> 16x16x256 -> 32x32x128 -> 64x64x3
    assert [c.out_channels for c in convs] == [1024, 512, 256, 128, 3]
    shapes, x = [], torch.zeros(2, 100)
    x = x.view(2, 100, 1, 1)
    for m in g.net:
        x = m(x)
        if isinstance(m, nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(1024, 4, 4), (512, 8, 8), (256, 16, 16), (128, 32, 32), (3, 64, 64)]


def test_architecture_guidelines():
    cfg = ModelConfig(resolution=64, channels=3)
    g, d = Generator(cfg), Discriminator(cfg)
    for net in (g, d):
        assert not any(isinstance(m, (nn.Linear, nn.MaxPool2d, nn.AvgPool2d)) for m in net.modules())
    g_layers = list(g.net)
    assert isinstance(g_layers[-2], nn.ConvTranspose2d) and isinstance(g_layers[-1], nn.Tanh)  # no BN on output
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 4
    assert isinstance(d.features[1], nn.LeakyReLU) and d.features[1].negative_slope == 0.2  # no BN on input
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert sum(isinstance(m, nn.ReLU) for m in g.modules()) == 4


def test_init_statistics():
    g, d = build_models(ModelConfig(resolution=64, channels=3), seed=1)
    for net in (g, d):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 10_000:
                assert abs(m.weight.mean().item()) < 0.002
                assert abs(m.weight.std().item() - 0.02) < 0.002
            if isinstance(m, nn.BatchNorm2d):
                assert abs(m.weight.mean().item() - 1) < 0.01
                assert 0.01 < m.weight.std().item() < 0.03
                assert torch.all(m.bias == 0)


def test_same_seed_same_weights_and_rng_untouched():
    before = torch.get_rng_state()
    g1, _ = build_models(ModelConfig(), seed=3)
    g2, _ = build_models(ModelConfig(), seed=3)
    assert torch.equal(before, torch.get_rng_state())
    for a, b in zip(g1.parameters(), g2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_latent_priors():
    gen = torch.Generator().manual_seed(0)
    u = sample_z(4000, ModelConfig(z_dist="uniform"), gen)
    assert u.min() >= -1 and u.max() <= 1 and abs(u.std().item() - 1 / 3**0.5) < 0.01
    n = sample_z(4000, ModelConfig(z_dist="normal"), gen)
    assert abs(n.std().item() - 1) < 0.01
