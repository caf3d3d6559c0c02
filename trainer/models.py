"""The DCGAN generator and discriminator, built by the paper's guidelines (section 3).

- strided convolutions in D, fractionally-strided (transposed) ones in G, no pooling;
- BatchNorm everywhere except G's output layer and D's input layer;
- no fully connected hidden layers: z is projected to 4x4 by a 4x4 transposed convolution
  (a linear map followed by a reshape) and D ends in a 4x4 convolution to one logit;
- ReLU in G with a Tanh output, LeakyReLU(0.2) in D.

Convolutions followed by BatchNorm carry no bias (BN's shift makes it redundant), as in
pytorch/examples, so parameter counts match that reference. D returns a logit rather than a
sigmoid so the loss can use the numerically stable BCE-with-logits under mixed precision.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.dispatch import conv_transpose_bn_relu, fused_available
from trainer.config import ModelConfig


def num_scale_layers(resolution: int) -> int:
    """Stride-2 layers between 4x4 and `resolution` (3 for 32, 4 for 64, 5 for 128)."""
    layers = int(math.log2(resolution)) - 2
    if 2 ** (layers + 2) != resolution or layers < 1:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return layers


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers = num_scale_layers(cfg.resolution)
        width = cfg.ngf * 2 ** (layers - 1)
        self.z_dim = cfg.z_dim
        blocks: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.z_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(layers - 1):
            blocks += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        blocks += [nn.ConvTranspose2d(width, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*blocks)
        self.fused_kernels = cfg.fused_kernels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.view(z.shape[0], self.z_dim, 1, 1)
        if not self.fused_kernels:
            return self.net(x)
        # the same modules, parameters and state_dict; each conv-transpose + BN + ReLU triple runs
        # as one fused block (kernels/ falls back to the modules wherever the kernels cannot run)
        modules = list(self.net)
        for i in range(0, len(modules) - 2, 3):
            x = conv_transpose_bn_relu(x, modules[i], modules[i + 1])
        return modules[-1](modules[-2](x))


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers = num_scale_layers(cfg.resolution)
        width = cfg.ndf
        blocks: list[nn.Module] = [
            nn.Conv2d(cfg.channels, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(layers - 1):
            blocks += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, 1, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten()


def fused_kernels_unavailable(cfg: ModelConfig, device: torch.device, zero_stage: int) -> str | None:
    """Why `model.fused_kernels = true` cannot take effect here (None: it does, or was not asked for)."""
    if not cfg.fused_kernels:
        return None
    if cfg.sync_batchnorm:
        return "model.sync_batchnorm: the fused blocks compute each rank's own BatchNorm statistics"
    if zero_stage == 3:
        # ZeRO-3 gathers a module's partitioned parameters in that module's forward hooks, which
        # the fused blocks (reading the parameters directly) never trigger
        return "ZeRO stage 3 partitions the parameters the fused blocks read"
    return fused_available(device)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The paper's initialisation: conv weights N(0, std); BN weight N(1, std), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def build_models(cfg: ModelConfig, seed: int) -> tuple[Generator, Discriminator]:
    """Both nets initialised from `seed`, so every rank starts from the same weights."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generator, discriminator = Generator(cfg), Discriminator(cfg)
        init_weights(generator, cfg.init_std)
        init_weights(discriminator, cfg.init_std)
    return generator, discriminator


def sample_z(n: int, cfg: ModelConfig, generator: torch.Generator, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """Latent codes from the configured prior, drawn where `generator` lives, then moved to `device`.

    A CPU generator gives the same z on any machine (sample grids, evaluation); the training
    step draws from a generator on the training device, so z costs no host work or copy.
    """
    if cfg.z_dist == "uniform":
        z = torch.rand(n, cfg.z_dim, generator=generator, device=generator.device).mul_(2).sub_(1)
    else:
        z = torch.randn(n, cfg.z_dim, generator=generator, device=generator.device)
    return z.to(device, non_blocking=True)
