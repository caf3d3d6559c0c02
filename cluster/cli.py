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
from evaluation import commands as evaluation_commands

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
    from trainer.step import NonFiniteLoss

    return (ConfigError, ShardSetError, CheckpointError, DatasetMissing, IdxError, NonFiniteLoss, ConversionError,
            SourceMissing, ClusterError, MonitorError, *evaluation_commands.user_errors())


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
    evaluation_commands.register(sub, ("sample",))

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

    evaluation_commands.register(sub, ("eval",))
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
