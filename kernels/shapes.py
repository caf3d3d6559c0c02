"""The conv-transpose + BatchNorm + ReLU blocks of a DCGAN generator, for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockShape:
    name: str
    c_in: int
    c_out: int
    size_in: int  # input height = width
    stride: int
    padding: int
    ksize: int = 4

    @property
    def size_out(self) -> int:
        return (self.size_in - 1) * self.stride - 2 * self.padding + self.ksize

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the conv-transpose alone (every input pixel meets k*k taps)."""
        return 2 * batch * self.size_in ** 2 * self.c_in * self.c_out * self.ksize ** 2


def generator_blocks(ngf: int = 128, z_dim: int = 100, resolution: int = 64) -> list[BlockShape]:
    """The paper's 64x64 generator (ngf=128: 4x4x1024 -> 8x8x512 -> 16x16x256 -> 32x32x128); ngf=64 is
    pytorch/examples' half-width one. The output layer (to RGB, Tanh, no BatchNorm) is not a block."""
    layers = resolution.bit_length() - 3  # 4 for 64x64
    width = ngf * 2 ** (layers - 1)
    blocks = [BlockShape(f"z{z_dim}->{width}x4x4", z_dim, width, 1, 1, 0)]
    size = 4
    for _ in range(layers - 1):
        blocks.append(BlockShape(f"{width}x{size}->{width // 2}x{size * 2}", width, width // 2, size, 2, 1))
        width //= 2
        size *= 2
    return blocks
