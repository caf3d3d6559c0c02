"""`dcgan data ...`: build, check and prepare shard sets (convert, dedup, sample-lsun, verify)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from common.arguments import (
    Checked,
    InputError,
    integer,
    non_negative_int,
    number,
    positive_int,
    readable_path,
    seed,
)

if TYPE_CHECKING:
    from data_shards.parts import PartRunner

ADDRESS_HELP = ("a Ray cluster's GCS address (HEAD:6379): its parts run as Ray tasks over the cluster's nodes, which "
                "all read --input and write --out at the same paths (default: RAY_ADDRESS, set inside `ray job "
                "submit`; without either, this machine's cores)")


def _parse_part(text: str) -> str:
    index, slash, count = text.partition("/")
    if not slash or not 0 <= int(index) < int(count):
        raise ValueError(text)
    return text


# `--part I/N`: the I-th of N key ranges, counted from 0
part_spec = Checked(_parse_part, "I/N with 0 <= I < N, e.g. 0/2", refused=("x", "1", "2/2", "-1/2", "1/x", ""))


def user_errors() -> tuple[type[BaseException], ...]:
    """What these commands raise for bad input: one line, not a traceback."""
    from common.ray_address import RayUnreachable
    from data_shards.convert import ConversionError
    from data_shards.idx import IdxError
    from data_shards.loader import WorkerDeaths
    from data_shards.manifest import ShardSetError
    from data_shards.parts import RayPartsError
    from data_shards.sources.fashion_mnist import DatasetMissing
    from data_shards.sources.lsun_lmdb import SourceMissing

    return (ConversionError, IdxError, ShardSetError, DatasetMissing, SourceMissing, RayPartsError, RayUnreachable,
            WorkerDeaths)


@contextmanager
def part_runner(args: argparse.Namespace) -> Iterator[PartRunner]:
    """Where the parts run: the Ray cluster of --address (or RAY_ADDRESS, as inside `ray job submit`), else
    this machine's cores."""
    from data_shards.parts import LocalParts, RayParts, ray_address

    address = ray_address(args.address)
    if address is None:
        yield LocalParts(args.workers)
        return
    with RayParts(address) as runner:
        yield runner
    nodes = runner.nodes_used
    print(f"on Ray at {address}: {sum(nodes.values())} parts ran on {len(nodes)} node(s)"
          + (f" ({', '.join(str(n) for n in sorted(nodes.values(), reverse=True))} parts each)" if nodes else ""))


def cmd_convert(args: argparse.Namespace) -> int:
    from data_shards.convert import ConversionError, ConvertOptions, convert, load_skip_keys
    from data_shards.parts import absolute_path, ray_address

    if ray_address(args.address):
        if args.part != "0/1":
            raise ConversionError("--part splits a conversion by hand over machines; on Ray the cluster splits it: "
                                  "drop --part")
        args.out = absolute_path(args.out, "--out")
        args.input = absolute_path(args.input, "--input") if args.input else None
    channels = args.channels or (1 if args.source == "fashion-mnist" else 3)
    part, _, parts = args.part.partition("/")
    opts = ConvertOptions(resolution=args.resolution, channels=channels, encoding=args.encoding,
                          quality=args.quality, shard_size=args.shard_size, keep_original=args.keep_original,
                          workers=args.workers, limit=args.limit, skip_keys=_skip_keys(load_skip_keys, args.skip_keys),
                          part=(int(part), int(parts)))
    with part_runner(args) as runner:
        manifest = convert(args.source, args.input, args.out, opts, split=args.split, overwrite=args.overwrite,
                           progress=not args.quiet, runner=runner)
    if manifest is None:
        print(f"{args.out}: part {args.part} done; the manifest is written when the last part finishes")
    else:
        print(f"{args.out}: {manifest.total} samples in {len(manifest.shards)} shards, "
              f"{len(manifest.skipped)} skipped")
    return 0


def _skip_keys(load: Callable[[str | None], dict[str, str]], path: str | None) -> dict[str, str]:
    """The duplicate list of --skip-keys, or one line saying why it is not one."""
    try:
        return load(path)
    except FileNotFoundError:
        raise InputError(f"--skip-keys {path} does not exist; write it with `dcgan data dedup --out`") from None
    except IsADirectoryError:
        raise InputError(f"--skip-keys {path} is a folder; give the JSON file `dcgan data dedup` wrote") from None
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or JSON of another shape
        raise InputError(f"--skip-keys {path} is not a duplicate list from `dcgan data dedup` "
                         f"({type(e).__name__}: {e})") from None


def _check_out_folder(out: str) -> None:
    """--out names a folder the command writes into: a file there would fail deep inside, with a traceback."""
    if os.path.isfile(out):
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")


def _check_out_file(out: str) -> None:
    """--out names the file dedup writes last: a wrong path must fail now, not after the hours of hashing."""
    if os.path.isdir(out):
        raise InputError(f"--out {out} is a folder; give the JSON file to write, e.g. {Path(out) / 'duplicates.json'}")
    parent = Path(out).parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: its folder {parent} does not exist" if not parent.exists() else
                         f"--out {out}: {parent} is a file, not a folder")


def cmd_dedup(args: argparse.Namespace) -> int:
    from data_shards.dedup import EXACT_LIMIT, WINDOW, DedupOptions, find_near_duplicates, write_duplicate_list
    from data_shards.parts import absolute_path, ray_address
    from data_shards.sources import open_source

    _check_out_file(args.out)
    if ray_address(args.address) and args.input:
        args.input = absolute_path(args.input, "--input")
    source = open_source(args.source, args.input)
    given = {name: getattr(args, name) for name in ("train_samples", "train_steps", "bands", "max_hamming",
                                                    "max_cosine", "workers", "part_size")}
    opts = DedupOptions(**{name: value for name, value in given.items() if value is not None})
    with part_runner(args) as runner:
        duplicates = find_near_duplicates(source, opts, progress=not args.quiet, runner=runner)
    write_duplicate_list(args.out, duplicates, source, opts)
    search = duplicates.search
    print(f"{args.out}: {len(duplicates)} near-duplicates; pass it to `dcgan data convert --skip-keys`")
    print(f"search: {search.pairs_compared:,} pairs compared, largest bucket {search.largest_bucket:,}"
          + (f"; {search.windowed_buckets} bucket(s) over {EXACT_LIMIT:,} ({search.windowed_members:,} members) "
             f"compared each member with its {WINDOW} nearest by hash, not with all" if search.windowed_buckets
             else "; every bucket searched in full"))
    print("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in duplicates.seconds.items()))
    return 0


def cmd_sample_lsun(args: argparse.Namespace) -> int:
    from data_shards.sample_lsun import build_sample_lsun

    if args.near_duplicates + args.exact_duplicates > args.n:
        raise InputError(f"--near-duplicates {args.near_duplicates} + --exact-duplicates {args.exact_duplicates} "
                         f"copies need as many originals, more than --n {args.n}")
    _check_out_folder(args.out)
    planted = build_sample_lsun(args.out, args.n, seed=args.seed, image_format=args.format.upper(),
                                near_duplicates=args.near_duplicates, exact_duplicates=args.exact_duplicates,
                                corrupt=args.corrupt, workers=args.workers, photos=args.photos)
    print(f"{args.out}: LSUN-format LMDB with {args.n} images, {len(planted.near_duplicates)} near-duplicates, "
          f"{len(planted.exact_duplicates)} exact duplicates, {len(planted.corrupt)} corrupt values")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
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


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build shard sets").add_subparsers(dest="data_command", required=True)
    _add_convert(data)
    _add_dedup(data)
    _add_sample_lsun(data)
    verify = data.add_parser("verify", help="check every shard's size and sha256 against the manifest "
                                            "(exit 1 when any differs)")
    verify.add_argument("shards", type=readable_path, help="a shard folder (with manifest.json)")
    verify.add_argument("--workers", type=non_negative_int(), default=0,
                        help="shards hashed at once (default: one per core)")
    verify.set_defaults(func=cmd_verify)


def _add_convert(data: argparse._SubParsersAction) -> None:
    conv = data.add_parser("convert", help="a source data set -> WebDataset shards + manifest")
    conv.add_argument("--source", default="fashion-mnist", choices=["lsun", "folder", "fashion-mnist"])
    conv.add_argument("--input", type=readable_path,
                      help="LSUN: the category's LMDB folder; folder: its root; fashion-mnist: the "
                           "IDX folder (default: where Debian's package puts it)")
    conv.add_argument("--out", required=True)
    conv.add_argument("--resolution", type=integer(8), default=64, help="stored side length (centre crop + resize)")
    conv.add_argument("--channels", type=positive_int(), default=None, choices=[1, 3],
                      help="default: 1 for fashion-mnist, 3 otherwise")
    conv.add_argument("--encoding", default="png", choices=["png", "jpeg", "raw"])
    conv.add_argument("--quality", type=integer(1, 100), default=95, help="JPEG quality")
    conv.add_argument("--keep-original", action="store_true", help="also store the source's encoded bytes")
    conv.add_argument("--shard-size", type=positive_int(), default=5000, help="samples per shard")
    conv.add_argument("--workers", type=non_negative_int(), default=0,
                      help="processes (default: one per core; on Ray, one "
                           "task per free core of the cluster)")
    conv.add_argument("--address", help=ADDRESS_HELP)
    conv.add_argument("--limit", type=non_negative_int(), default=0, help="convert only the first N source items "
                                                                          "(0: all)")
    conv.add_argument("--skip-keys", type=readable_path,
                      help="duplicate list from `dcgan data dedup`; those keys are skipped")
    conv.add_argument("--part", type=part_spec, default="0/1", help="I/N: convert the I-th of N contiguous key ranges "
                                                                    "(one per machine, same --out)")
    conv.add_argument("--split", default="train", choices=["train", "test"], help="fashion-mnist split")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)


def _add_dedup(data: argparse._SubParsersAction) -> None:
    dedup = data.add_parser("dedup", help="the paper's near-duplicate pass: autoencoder semantic hashing")
    dedup.add_argument("--source", default="lsun", choices=["lsun", "folder", "fashion-mnist"])
    dedup.add_argument("--input", type=readable_path)
    dedup.add_argument("--out", required=True, help="JSON list of duplicate keys, for convert --skip-keys")
    # no defaults here: DedupOptions holds them, with the reasons
    dedup.add_argument("--train-samples", type=positive_int(), help="crops the autoencoder trains on (default 50,000)")
    dedup.add_argument("--train-steps", type=positive_int(), help="autoencoder Adam steps of 256 crops (default 3,000)")
    dedup.add_argument("--bands", type=positive_int(),
                       help="16-bit bands of the hash that bucket candidates (default 16)")
    dedup.add_argument("--max-hamming", type=integer(0, 128, why="the hash has 128 bits"),
                       help="most hash bits a duplicate differs in (default 16)")
    dedup.add_argument("--max-cosine", type=number(0, 2), help="largest cosine distance of a duplicate's codes "
                                                               "(default 0.04)")
    dedup.add_argument("--workers", type=non_negative_int(),
                       help="processes that hash (default: one per core; on Ray, one task "
                            "per free core of the cluster)")
    dedup.add_argument("--address", help=ADDRESS_HELP)
    dedup.add_argument("--part-size", type=positive_int(),
                       help="keys hashed per part, a process's or a Ray task's unit of "
                            "work (default 2,000)")
    dedup.add_argument("--quiet", action="store_true")
    dedup.set_defaults(func=cmd_dedup)


def _add_sample_lsun(data: argparse._SubParsersAction) -> None:
    sample_lsun = data.add_parser("sample-lsun", help="an LSUN-format LMDB from scikit-image's CC0 photos")
    sample_lsun.add_argument("--out", required=True)
    sample_lsun.add_argument("--n", type=positive_int(), default=1000, help="distinct images")
    sample_lsun.add_argument("--format", default="webp", choices=["webp", "jpeg"])
    sample_lsun.add_argument("--seed", type=seed(), default=0)
    sample_lsun.add_argument("--near-duplicates", type=non_negative_int(), default=0,
                             help="altered copies of the first images (with --exact-duplicates: at most --n)")
    sample_lsun.add_argument("--exact-duplicates", type=non_negative_int(), default=0)
    sample_lsun.add_argument("--corrupt", type=non_negative_int(), default=0)
    sample_lsun.add_argument("--workers", type=positive_int(), default=os.cpu_count() or 1)
    sample_lsun.add_argument("--photos", default="tuned", choices=["tuned", "held-out"],
                             help="the photographs to cut from: those the dedup thresholds were tuned on, or others")
    sample_lsun.set_defaults(func=cmd_sample_lsun)
