"""dcgan: train DCGANs (Ray or torchrun), build shard sets, sample and evaluate checkpoints.

This module only assembles the commands each package registers and runs one: data_shards
registers `data`, evaluation `sample` and `eval` (reading checkpoints through the trainer's
reader, handed over here), cluster `train` and `monitor`; `bench` runs a script of benchmarks/
(a source checkout's folder, not a package) as a file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster import commands as cluster_commands
from cluster.stop_signals import stop_signals_unwind, stopped_by
from common.arguments import InputError, non_negative_int
from data_shards import commands as data_commands
from evaluation import commands as evaluation_commands

# `make run` installs only what training needs; the rest comes with these extras (pyproject.toml)
OPTIONAL_MODULES = {"sklearn": "eval", "scipy": "eval", "matplotlib": "eval", "triton": "kernels", "nvidia": "dali",
                    "skimage": "sample-data"}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # beside the packages in a checkout


def _checkpoint_nets() -> evaluation_commands.CheckpointNets:
    from trainer.checkpoint_nets import CheckpointNets  # torch: only when a command reads a checkpoint

    return CheckpointNets()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by input (config, files, data) that deserve one line, not a traceback."""
    return (InputError, *cluster_commands.user_errors(), *data_commands.user_errors(),
            *evaluation_commands.user_errors())


def _denied(error: PermissionError) -> str:
    """A folder or file the user's account may not use: a fact about the input, not about the program."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
    return f"{where}: permission denied" if where else f"permission denied ({error})"


def _benchmark_names() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_") and p.stem != "report")


def cmd_bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS / f"{args.name}.py"
    if not script.is_file():
        where = f"one of: {', '.join(_benchmark_names())}" if BENCHMARKS.is_dir() else \
            "dcgan bench runs from a source checkout (its benchmarks/ folder)"
        print(f"dcgan: error: no benchmark {args.name!r}; {where}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def _register_bench(sub: argparse._SubParsersAction) -> None:
    # no -h of its own: `dcgan bench kernels --help` is the benchmark's help
    bench = sub.add_parser("bench", add_help=False, help="run benchmarks/NAME.py with its own options "
                                                         "(dcgan bench kernels --help)")
    bench.add_argument("name", help="kernels, train_throughput, loader_throughput, ... (benchmarks/*.py)")
    bench.set_defaults(func=cmd_bench)


def _every_command(parser: argparse.ArgumentParser, prefix: str = "dcgan") -> list[tuple[str, str]]:
    """(`dcgan data convert`, its help) for every command, sub-commands spelled out."""
    # argparse has no public way to walk its sub-commands; _SubParsersAction has been stable since 3.2
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found += _every_command(sub, f"{prefix} {name}") or [(f"{prefix} {name}", helps.get(name) or "")]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan", usage="dcgan [-h] COMMAND ...", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank before the sub-command; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=non_negative_int(), default=None, help=argparse.SUPPRESS)
    # the epilog lists every command, sub-commands included; argparse's own list would stop at `data`
    # prog: without it each command's usage would start with the custom usage above, `dcgan [-h] COMMAND ... train`
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="dcgan")
    cluster_commands.register(sub)
    evaluation_commands.register(sub, _checkpoint_nets)
    cluster_commands.register_monitor(sub)
    data_commands.register(sub)
    _register_bench(sub)
    width = max(len(name) for name, _ in _every_command(parser))
    parser.epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in _every_command(parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # a benchmark's own options pass through to it untouched
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    args.argv = argv
    try:
        with stop_signals_unwind():
            return args.func(args)
    except PermissionError as e:  # first: the user errors' classes import torch, seconds a one-liner need not wait
        print(f"dcgan: error: {_denied(e)}", file=sys.stderr)
        return 2
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
