"""Training-step throughput: our DeepSpeed GAN step against the plain PyTorch loop, side by side.

The plain loop is pytorch/examples' dcgan/main.py (one process, two torch.optim.Adam, the D
step on real then fake, the G step through D), on the very same networks, in fp32 and with
bf16 autocast. Methods run interleaved in rounds, so a noisy machine slows them alike; the
figure per method is the median over rounds.

On a GPU a fifth arm runs our step with the generator's fused Triton blocks (model.fused_kernels).

    python benchmarks/train_throughput.py [--resolution 64] [--batch 128] [--rounds 5]

Host overhead, the regime a GPU step lives in (computation negligible, so the figure is the
per-step cost of dispatch, DeepSpeed and synchronisation):

    python benchmarks/train_throughput.py --resolution 32 --channels 1 --width 8 --batch 16 --steps 50 \
        --out benchmarks/results/train_host_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.distributed import init_distributed  # noqa: E402
from trainer.engines import build_engines  # noqa: E402
from trainer.models import build_models, sample_z  # noqa: E402
from trainer.precision import Precision  # noqa: E402
from trainer.step import GanStep, bce  # noqa: E402


def plain_pytorch_step(cfg: Config, dtype: torch.dtype | None, device: torch.device) -> Callable[[torch.Tensor], None]:
    """pytorch/examples' training step (BCE on logits instead of Sigmoid + BCELoss: same math)."""
    G, D = build_models(cfg.model, seed=0)
    G, D = G.to(device), D.to(device)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=betas)
    noise = torch.Generator().manual_seed(1)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step(real: torch.Tensor) -> None:
        z = sample_z(real.shape[0], cfg.model, noise, device)
        opt_d.zero_grad(set_to_none=True)
        with autocast():
            fake = G(z)
            loss_d = bce(D(real), 1.0) + bce(D(fake.detach()), 0.0)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            loss_g = bce(D(fake), 1.0)
        loss_g.backward()
        opt_g.step()

    return step


def our_step(cfg: Config, ctx, precision_name: str, fused: bool = False) -> Callable[[torch.Tensor], None]:
    cfg = copy.deepcopy(cfg)
    cfg.precision.dtype = precision_name
    cfg.model.fused_kernels = fused
    precision = Precision(precision_name, ctx.device)
    G, D = build_models(cfg.model, seed=0)
    engines = build_engines(G.to(ctx.device), D.to(ctx.device), cfg, ctx.world_size, precision)
    step_fn = GanStep(engines, precision, cfg.model, ctx, torch.Generator().manual_seed(1), "stop")
    counter = iter(range(1, 10**9))
    return lambda real: step_fn(real, next(counter))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = parser.parse_args()

    ctx = init_distributed()
    cfg = Config()
    cfg.model.resolution, cfg.model.channels = args.resolution, args.channels
    cfg.model.ngf = cfg.model.ndf = args.width
    cfg.optim.batch_size = args.batch
    bf16 = torch.bfloat16
    methods: dict[str, Callable[[torch.Tensor], None]] = {
        "plain PyTorch fp32": plain_pytorch_step(cfg, None, ctx.device),
        "plain PyTorch bf16 autocast": plain_pytorch_step(cfg, bf16, ctx.device),
        "dcgan-scale fp32": our_step(cfg, ctx, "fp32"),
        "dcgan-scale bf16": our_step(cfg, ctx, "bf16"),
    }
    if ctx.device.type == "cuda":  # Triton's CPU interpreter would measure nothing about speed
        methods["dcgan-scale bf16 fused kernels"] = our_step(cfg, ctx, "bf16", fused=True)
    real = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=ctx.device) * 2 - 1

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    for fn in methods.values():  # warm-up: allocator, oneDNN / cuDNN kernel choice
        fn(real)
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(real)
            sync()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))

    median = {name: statistics.median(r) for name, r in rates.items()}
    base_fp32, base_bf16 = median["plain PyTorch fp32"], median["plain PyTorch bf16 autocast"]
    rows = [{"method": name, "img_per_s": v, "ms_per_step": 1000 * args.batch / v, "vs_plain_fp32": v / base_fp32,
             "vs_plain_bf16": v / base_bf16} for name, v in median.items()]
    print_table(f"{args.resolution}x{args.resolution}x{args.channels}, ngf=ndf={args.width}, batch {args.batch}, "
                f"{torch.get_num_threads()} threads, {ctx.device}, median of {args.rounds} rounds",
                [("method", "method", "<32"), ("img/s", "img_per_s", ".1f"), ("ms/step", "ms_per_step", ".2f"),
                 ("vs plain fp32", "vs_plain_fp32", ".2f"), ("vs plain bf16", "vs_plain_bf16", ".2f")], rows)
    write_result(
        args.out, "train_throughput",
        device={"threads": torch.get_num_threads(), "device": str(ctx.device),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        settings=vars(args) | {"out": str(args.out.name)},
        img_per_s_median=median, img_per_s_rounds=rates,
        ratios={"ours_bf16_vs_plain_fp32": median["dcgan-scale bf16"] / base_fp32,
                "ours_bf16_vs_plain_bf16": median["dcgan-scale bf16"] / base_bf16,
                "ours_fp32_vs_plain_fp32": median["dcgan-scale fp32"] / base_fp32,
                "fused_vs_unfused_bf16": median.get("dcgan-scale bf16 fused kernels", float("nan"))
                / median["dcgan-scale bf16"]})


if __name__ == "__main__":
    main()
