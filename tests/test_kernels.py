"""The fused conv-transpose + BatchNorm + ReLU kernels against PyTorch's modules.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), compared in fp32
(the interpreter's bf16 casts truncate); bf16 accuracy is judged against an fp64 truth, beside
PyTorch's own bf16 error. With a GPU the same tests run compiled, plus bf16 at full batch.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import ROOT, child_env, tiny_train_args
from torch import nn

from evaluation.images import generate
from kernels.dispatch import block_unsupported, conv_transpose_bn_relu
from kernels.shapes import generator_blocks
from trainer.checkpoint_nets import load_generator
from trainer.config import ModelConfig
from trainer.models import Generator, build_models, fused_kernels_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 where these tests assert 1e-5: cuDNN's convolutions and the fused kernels'
    dots would otherwise take TF32 (10-bit mantissa) on a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _counted(counts: collections.Counter, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def counting(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return fn(*args, **kwargs)

    return counting


def _counted_run(counts: collections.Counter, run: Callable[..., Any]) -> Callable[..., Any]:
    def counting_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:  # a warm-up compiles and runs nothing
            counts[self.fn.__name__] += 1
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    return counting_run


def count_fused_blocks(counts: collections.Counter, patch: Callable[[object, str, Any], None]) -> None:
    """Count the blocks dispatch was given ("blocks") and every Triton kernel launch, by kernel name.

    The kernels are checked against PyTorch's modules, so a block, or its backward, that silently fell back
    to PyTorch would pass every comparison; the launches tell. `kernel[grid](...)` ends in the kernel object's
    `run`, the interpreter's under TRITON_INTERPRET=1 and the JIT's when compiled, whoever launches it, so
    patching both classes counts every launch that runs. dispatch asks block_unsupported once per fused-mode
    block.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import kernels.dispatch

    patch(kernels.dispatch, "block_unsupported", _counted(counts, "blocks", kernels.dispatch.block_unsupported))
    for kind in (InterpretedFunction, JITFunction):
        patch(kind, "run", _counted_run(counts, kind.run))


# the launches of one block: a training forward (GEMM with statistics, finalize, normalise + ReLU), its
# backward (two BN + ReLU passes, then the input- and weight-gradient GEMMs; no input gradient where the
# input needs none, as z in G's first block), and an eval-mode forward (one GEMM, BatchNorm folded in)
TRAIN_FORWARD = collections.Counter(["convt_phase_fwd_kernel", "bn_finalize_kernel", "bn_relu_apply_kernel"])
BACKWARD = collections.Counter(["bn_relu_grad_reduce_kernel", "bn_relu_grad_apply_kernel", "convt_input_grad_kernel",
                                "convt_weight_grad_kernel"])
BACKWARD_NO_INPUT_GRAD = BACKWARD - collections.Counter(["convt_input_grad_kernel"])
INFERENCE = collections.Counter(["convt_phase_fwd_kernel"])


def launches(blocks: int, *parts: tuple[int, collections.Counter]) -> dict[str, int]:
    """What the counts must be: `blocks` given to dispatch, and each (times, launches of one block)."""
    expected = collections.Counter({"blocks": blocks})
    for times, per_block in parts:
        for _ in range(times):
            expected.update(per_block)
    return dict(expected)


@pytest.fixture()
def fused(monkeypatch) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    count_fused_blocks(counts, monkeypatch.setattr)
    return counts


# every block of a (narrow) 64x64 generator, then odd sizes: channels that fill no tile, 1x1 and
# 3x3 inputs, padding 0
SHAPES = [(3, b.c_in, b.c_out, b.size_in, b.stride, b.padding) for b in generator_blocks(ngf=16)] + [
    (5, 30, 24, 1, 1, 0), (2, 7, 9, 3, 2, 1), (3, 12, 20, 5, 2, 1), (2, 6, 10, 3, 2, 0)]


def make_block(c_in: int, c_out: int, stride: int, padding: int, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
    bn = nn.BatchNorm2d(c_out)
    nn.init.normal_(conv.weight, 0.0, 0.1)
    nn.init.normal_(bn.weight, 1.0, 0.3)  # away from the defaults, so every parameter matters
    nn.init.normal_(bn.bias, 0.0, 0.3)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return conv.to(DEVICE), bn.to(DEVICE)


def run_block(x, conv, bn, grad, fused: bool, dtype=None):
    """Output and every gradient of one training-mode step of the block."""
    x = x.detach().clone().requires_grad_()
    conv.zero_grad()
    bn.zero_grad()
    with torch.autocast(DEVICE.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = conv_transpose_bn_relu(x, conv, bn) if fused else torch.relu(bn(conv(x)))
    out.backward(grad.to(out.dtype))
    return {"out": out.double(), "dx": x.grad.double(), "dw": conv.weight.grad.double(),
            "dgamma": bn.weight.grad.double(), "dbeta": bn.bias.grad.double(),
            "running_mean": bn.running_mean.double(), "running_var": bn.running_var.double()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n, c_in, c_out, size, stride, padding", SHAPES)
def test_training_block_matches_pytorch_fp32(fused, n, c_in, c_out, size, stride, padding):
    conv, bn = make_block(c_in, c_out, stride, padding)
    conv_ref, bn_ref = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(n, c_in, size, size, device=DEVICE)
    assert block_unsupported(x, conv, bn) is None
    grad = torch.randn(n, c_out, conv_ref(x).shape[2], conv_ref(x).shape[3], device=DEVICE)
    ours, ref = run_block(x, conv, bn, grad, True), run_block(x, conv_ref, bn_ref, grad, False)
    # every kernel of the forward and the backward ran once, not the modules compared against
    assert fused == launches(1, (1, TRAIN_FORWARD), (1, BACKWARD))
    assert ours["out"].shape == ref["out"].shape
    for name in ref:
        assert rel_err(ours[name], ref[name]) < 1e-5, name
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 1


@pytest.mark.parametrize("n, c_in, c_out, size, stride, padding", SHAPES[:4] + SHAPES[-1:])
def test_inference_folds_batchnorm(fused, n, c_in, c_out, size, stride, padding):
    conv, bn = make_block(c_in, c_out, stride, padding)
    conv.eval()
    bn.eval()
    x = torch.randn(n, c_in, size, size, device=DEVICE)
    with torch.no_grad():
        ours, ref = conv_transpose_bn_relu(x, conv, bn), torch.relu(bn(conv(x)))
    assert rel_err(ours.double(), ref.double()) < 1e-5
    assert fused == launches(1, (1, INFERENCE))


@pytest.mark.parametrize("n, c_in, c_out, size, stride, padding", [SHAPES[0], SHAPES[2]])
def test_bf16_error_is_pytorchs_own(fused, n, c_in, c_out, size, stride, padding):
    """Judged against fp64: the fused block's bf16 error must be of the size of PyTorch's bf16 error."""
    conv, bn = make_block(c_in, c_out, stride, padding)
    x = torch.randn(n, c_in, size, size, device=DEVICE)
    grad = torch.randn_like(torch.relu(bn(conv(x))).detach())
    truth = run_block(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), grad.double(), False)
    ours = run_block(x, copy.deepcopy(conv), copy.deepcopy(bn), grad, True, torch.bfloat16)
    ref = run_block(x, copy.deepcopy(conv), copy.deepcopy(bn), grad, False, torch.bfloat16)
    assert fused == launches(1, (1, TRAIN_FORWARD), (1, BACKWARD))
    # the interpreter truncates fp32 -> bf16 where a GPU rounds: one more bit of error there
    slack = 1.5 if DEVICE.type == "cuda" else 2.5
    for name in ("out", "dx", "dw", "dgamma", "dbeta"):
        assert rel_err(ours[name], truth[name]) <= slack * rel_err(ref[name], truth[name]) + 2e-3, name


def test_unsupported_blocks_fall_back_to_the_modules(fused):
    conv = nn.ConvTranspose2d(4, 6, 3, 2, 1, bias=False)  # k=3, s=2: no even phase split
    bn = nn.BatchNorm2d(6)
    x = torch.randn(2, 4, 5, 5)
    assert "phase" in block_unsupported(x, conv, bn)
    with torch.no_grad():
        assert torch.equal(conv_transpose_bn_relu(x, conv, bn), torch.relu(bn(conv(x))))
    # eval mode with gradients wanted: PyTorch's autograd, by design
    conv_eval, bn_eval = make_block(8, 6, 2, 1)
    bn_eval.eval()
    conv_transpose_bn_relu(torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=True), conv_eval, bn_eval)
    assert fused == {"blocks": 2}  # both went to the modules: no kernel ran
    assert "CUDA" in fused_kernels_unavailable(ModelConfig(fused_kernels=True), torch.device("meta"), 0)
    assert "ZeRO" in fused_kernels_unavailable(ModelConfig(fused_kernels=True), DEVICE, 3)
    assert fused_kernels_unavailable(ModelConfig(fused_kernels=False), torch.device("meta"), 3) is None


def gan_steps(fused: bool, steps: int = 3) -> tuple[Generator, list[float]]:
    """A few real GAN steps (Adam, BCE) on a small 32x32 G and D, from the same seed either way."""
    cfg = ModelConfig(resolution=32, channels=1, ngf=8, ndf=8, fused_kernels=fused)
    generator, discriminator = (m.to(DEVICE) for m in build_models(cfg, seed=1))
    opt_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    data = torch.Generator().manual_seed(2)
    bce, losses = nn.BCEWithLogitsLoss(), []
    for _ in range(steps):
        real = torch.rand(16, 1, 32, 32, generator=data).to(DEVICE) * 2 - 1
        z = torch.rand(16, cfg.z_dim, generator=data).to(DEVICE) * 2 - 1
        fake = generator(z)
        loss_d = bce(discriminator(real), torch.ones(16, device=DEVICE)) + \
            bce(discriminator(fake.detach()), torch.zeros(16, device=DEVICE))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(discriminator(fake), torch.ones(16, device=DEVICE))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        losses += [loss_d.item(), loss_g.item()]
    return generator, losses


def test_training_steps_agree_and_checkpoints_move_between_paths(fused):
    counts = fused
    fused, losses_fused = gan_steps(True)
    # 3 blocks in a 32x32 G, each fused in each of the 3 steps' one forward and G's one backward (D's sees
    # fake.detach()); the first block's input is z, which wants no gradient
    in_training = [(3 * 3, TRAIN_FORWARD), (3 * 2, BACKWARD), (3 * 1, BACKWARD_NO_INPUT_GRAD)]
    assert counts == launches(9, *in_training)
    plain, losses_plain = gan_steps(False)
    assert losses_fused == pytest.approx(losses_plain, rel=1e-4)
    ours, ref = fused.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)  # same keys, same shapes: one checkpoint format
    for key in ref:
        assert rel_err(ours[key].double(), ref[key].double()) < 1e-3, key
    # a fused generator's weights load into a plain one and sample the same (eval: folded BN)
    reloaded = Generator(ModelConfig(resolution=32, channels=1, ngf=8, ndf=8)).to(DEVICE)
    reloaded.load_state_dict(ours)
    z = torch.rand(8, 100, device=DEVICE) * 2 - 1
    with torch.no_grad():
        assert rel_err(fused.eval()(z).double(), reloaded.eval()(z).double()) < 1e-5
    assert counts == launches(12, *in_training, (3, INFERENCE))  # the plain generators never reach dispatch


def test_kernels_compile_for_sm90():
    """Every launch of the paper's blocks at batch 128 in bf16 compiles to an sm_90 cubin (no GPU
    needed): checks tl.dot shapes and dtypes and shared memory, which the interpreter does not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--ngf", "64"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "32 launches compiled for sm_90 (bf16, batch 128); 0 failed" in res.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at full batch needs a GPU (the CPU interpreter "
                                                           "would take minutes); the bf16 test above covers CPU")
@pytest.mark.parametrize("block", generator_blocks(ngf=64), ids=lambda b: b.name)
def test_bf16_full_batch_on_gpu(block):
    conv, bn = make_block(block.c_in, block.c_out, block.stride, block.padding)
    x = torch.randn(128, block.c_in, block.size_in, block.size_in, device=DEVICE)
    grad = torch.randn(128, block.c_out, block.size_out, block.size_out, device=DEVICE)
    truth = run_block(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), grad.double(), False)
    ours = run_block(x, copy.deepcopy(conv), copy.deepcopy(bn), grad, True, torch.bfloat16)
    ref = run_block(x, copy.deepcopy(conv), copy.deepcopy(bn), grad, False, torch.bfloat16)
    for name in ("out", "dx", "dw", "dgamma", "dbeta"):
        assert rel_err(ours[name], truth[name]) <= 1.5 * rel_err(ref[name], truth[name]) + 2e-3, name


# `dcgan train` in a fresh interpreter, as run_dcgan runs it, with the blocks counted and the counts left in a file
COUNTING_DCGAN = """
import collections, json, sys
sys.path.insert(0, sys.argv[1])
from test_kernels import count_fused_blocks
from dcgan.cli import main
counts = collections.Counter()
count_fused_blocks(counts, setattr)
code = main(sys.argv[3:])
with open(sys.argv[2], "w") as f:
    json.dump(counts, f)
sys.exit(code)
"""


def test_dcgan_train_with_fused_kernels(fused, fashion_shards, tmp_path):
    """The real command, bf16 autocast through G's DeepSpeed engine, the blocks in Triton (interpreted on CPU);
    its checkpoint samples the same from a plain generator."""
    run, counts = tmp_path / "fused", tmp_path / "counts.json"
    args = tiny_train_args(fashion_shards, run, "optim.max_steps=4", "checkpoint.every_steps=4",
                           "model.fused_kernels=true", "precision.dtype=bf16", "logging.log_every=2")
    res = subprocess.run([sys.executable, "-c", COUNTING_DCGAN, str(ROOT / "tests"), str(counts), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fused_kernels" not in res.stdout  # no fallback note: the kernels ran
    # every block of G (3 at 32x32) ran its kernels, forward and backward, none fell back: one training forward
    # and one backward per step (the first block's input, z, wants no gradient), and the sample grids at steps
    # 0 and 4 in eval mode
    assert json.loads(counts.read_text()) == launches(3 * 4 + 3 * 2, (3 * 4, TRAIN_FORWARD), (2 * 4, BACKWARD),
                                                      (1 * 4, BACKWARD_NO_INPUT_GRAD), (3 * 2, INFERENCE))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and all(math.isfinite(r["loss_g"]) for r in records)
    cfg, generator = load_generator(run)
    fused_cfg, plain_cfg = cfg.model, copy.deepcopy(cfg.model)
    plain_cfg.fused_kernels = False
    plain = Generator(plain_cfg)
    plain.load_state_dict(generator.state_dict())
    z = torch.rand(8, fused_cfg.z_dim) * 2 - 1
    assert fused_cfg.fused_kernels
    assert rel_err(generate(generator, z).double(), generate(plain, z).double()) < 1e-5
    assert fused == launches(3, (3, INFERENCE))


def test_statistics_merge_across_chunks_without_cancellation():
    """The finalize kernel merges per-tile (sum, M2) in chunks; with a mean of 1000 and unit variance,
    fp32 E[x^2] - E[x]^2 would lose the variance entirely (1e6 vs 1); the merge must not."""
    import triton

    from kernels.bn_relu import bn_finalize_kernel
    from kernels.launch import launch

    phases, rows_per_phase, tile_rows, channels = 4, 50, 8, 5
    m_tiles = triton.cdiv(rows_per_phase, tile_rows)
    data = (1000 + torch.randn(phases, rows_per_phase, channels, dtype=torch.float64)).to(DEVICE)
    psum = torch.zeros(phases * m_tiles, channels, dtype=torch.float64, device=DEVICE)
    pm2 = torch.zeros_like(psum)
    for ph in range(phases):
        for t in range(m_tiles):
            tile = data[ph, t * tile_rows:(t + 1) * tile_rows]
            psum[ph * m_tiles + t] = tile.sum(0)
            pm2[ph * m_tiles + t] = ((tile - tile.mean(0)) ** 2).sum(0)
    gamma, beta = torch.rand(channels, device=DEVICE) + 0.5, torch.randn(channels, device=DEVICE)
    running_mean, running_var = torch.zeros(channels, device=DEVICE), torch.ones(channels, device=DEVICE)
    mean, rstd, scale, shift = (torch.empty(channels, device=DEVICE) for _ in range(4))
    launch(bn_finalize_kernel, (1,), [psum.float(), pm2.float(), gamma, beta, running_mean, running_var, mean, rstd,
                                      scale, shift, channels, phases, m_tiles, rows_per_phase, tile_rows, 0.1, 1e-5],
           dict(UPDATE_RUNNING=True, BLOCK_P=16, BLOCK_C=8), 4, 1)  # 28 tiles: two chunks, the last one partial
    flat = data.reshape(-1, channels)
    var = flat.var(0, unbiased=False)
    assert torch.allclose(mean.double(), flat.mean(0), rtol=1e-6)
    assert torch.allclose(rstd.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-3)
    assert torch.allclose(running_var.double(), 0.9 + 0.1 * flat.var(0, unbiased=True), rtol=1e-3)
    assert torch.allclose(scale.double(), gamma.double() * rstd.double(), rtol=1e-6)
