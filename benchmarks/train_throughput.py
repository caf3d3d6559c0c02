"""Training-step throughput: our DeepSpeed GAN step against the plain PyTorch loop, side by side.

The plain loop is pytorch/examples' dcgan/main.py (one process, two torch.optim.Adam, the D
step on real then fake, the G step through D), on the very same networks, in fp32 and with
bf16 autocast. Methods run interleaved in rounds, so a noisy machine slows them alike; the
figure per method is the median over rounds.

Arms (`--methods`): plain (that loop), eager (our step), compiled (our step under
model.compile) and, on a GPU, fused (the generator's fused Triton blocks), each in every
`--precisions`. Each row also gives the achieved TFLOP/s, from the step's FLOPs as PyTorch's
FlopCounterMode counts them.

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
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402
from trainer.compiled import compile_step  # noqa: E402
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


def our_step(cfg: Config, ctx, precision_name: str, fused: bool = False, compiled: bool = False
             ) -> Callable[[torch.Tensor], None]:
    cfg = copy.deepcopy(cfg)
    cfg.precision.dtype = precision_name
    cfg.model.fused_kernels = fused
    precision = Precision(precision_name, ctx.device)
    G, D = build_models(cfg.model, seed=0)
    engines = build_engines(G.to(ctx.device), D.to(ctx.device), cfg, ctx.world_size, precision)
    if compiled:
        compile_step(engines, ctx.device)
    step_fn = GanStep(engines, precision, cfg.model, ctx, torch.Generator(ctx.device).manual_seed(1), "stop")
    counter = iter(range(1, 10**9))
    return lambda images: step_fn(images, next(counter))


def step_flops(cfg: Config, device: torch.device, real: torch.Tensor) -> int:
    """FLOPs of one step (G forward, three D forwards, both backwards), counted by PyTorch's
    FlopCounterMode on the plain fp32 loop: the same arithmetic as ours."""
    step = plain_pytorch_step(cfg, None, device)
    with FlopCounterMode(display=False) as counter:
        step(real)
    return counter.get_total_flops()


METHODS = ("plain", "eager", "compiled", "fused")
LABELS = {"plain": "plain PyTorch", "eager": "dcgan-scale", "compiled": "dcgan-scale compiled",
          "fused": "dcgan-scale fused kernels"}


def build_arms(cfg: Config, ctx, methods: list[str], precisions: list[str]
               ) -> dict[tuple[str, str], Callable[[torch.Tensor], None]]:
    """One step function per (method, precision)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    arms: dict[tuple[str, str], Callable[[torch.Tensor], None]] = {}
    for precision in precisions:
        for method in methods:
            if method == "plain":
                arms[method, precision] = plain_pytorch_step(cfg, dtypes[precision], ctx.device)
            else:
                arms[method, precision] = our_step(cfg, ctx, precision, fused=method == "fused",
                                                   compiled=method == "compiled")
    return arms


def time_arms(arms: dict[tuple[str, str], Callable[[torch.Tensor], None]], images: torch.Tensor,
              real: torch.Tensor, rounds: int, steps: int, device: torch.device) -> dict[tuple[str, str], list[float]]:
    """Seconds per step of each arm, per round; the arms take turns, so noise hits them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for (method, _), fn in arms.items():  # warm-up: allocator, kernel choice, compilation
        for _ in range(3 if method == "compiled" else 1):
            fn(real if method == "plain" else images)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in arms}
    for _ in range(rounds):
        for (method, precision), fn in arms.items():
            batch = real if method == "plain" else images
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(batch)
            sync()
            seconds[method, precision].append((time.perf_counter() - t0) / steps)
    return seconds


def summarise(seconds: dict[tuple[str, str], list[float]], batch: int, flops: float) -> list[dict]:
    rows = []
    for (method, precision), times in seconds.items():
        per_step = statistics.median(times)
        plain = seconds.get(("plain", precision))
        rows.append({"method": method, "precision": precision, "label": f"{LABELS[method]} {precision}",
                     "batch": batch, "img_per_s": batch / per_step, "ms_per_step": 1000 * per_step,
                     "vs_plain": statistics.median(plain) / per_step if plain else float("nan"),
                     "tflops": flops / per_step / 1e12})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--methods", default="plain,eager,compiled",
                        help=f"comma list of {', '.join(METHODS)} (fused: CUDA only)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = parser.parse_args()

    ctx = init_distributed()
    cfg = Config()
    cfg.model.resolution, cfg.model.channels = args.resolution, args.channels
    cfg.model.ngf = cfg.model.ndf = args.width
    cfg.optim.batch_size = args.batch
    methods = [m for m in args.methods.split(",") if m != "fused" or ctx.device.type == "cuda"]
    arms = build_arms(cfg, ctx, methods, args.precisions.split(","))
    # the plain loop reads float NCHW in [-1, 1], as pytorch/examples' loader hands it; ours reads
    # the loaders' uint8 NHWC bytes and converts them inside the step (counted against us)
    images = torch.randint(0, 256, (args.batch, args.resolution, args.resolution, args.channels),
                           dtype=torch.uint8, device=ctx.device)
    real = images.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
    flops = step_flops(cfg, ctx.device, real)
    seconds = time_arms(arms, images, real, args.rounds, args.steps, ctx.device)
    rows = summarise(seconds, args.batch, flops)
    print_table(f"{args.resolution}x{args.resolution}x{args.channels}, ngf=ndf={args.width}, batch {args.batch}, "
                f"{torch.get_num_threads()} threads, {ctx.device}, {flops / 1e9:.2f} GFLOP/step, "
                f"median of {args.rounds} rounds of {args.steps} steps",
                [("method", "label", "<32"), ("img/s", "img_per_s", ".1f"), ("ms/step", "ms_per_step", ".2f"),
                 ("speed vs plain", "vs_plain", ".2f"), ("TFLOP/s", "tflops", ".3f")], rows)
    write_result(
        args.out, "train_throughput",
        device={"threads": torch.get_num_threads(), "device": str(ctx.device),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        settings=vars(args) | {"out": str(args.out.name)},
        flops_per_step=flops, rows=rows,
        img_per_s_median={row["label"]: row["img_per_s"] for row in rows},
        ms_per_step_rounds={f"{LABELS[m]} {p}": [1000 * t for t in ts] for (m, p), ts in seconds.items()})


if __name__ == "__main__":
    main()
