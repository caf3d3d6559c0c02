"""Source -> shard set: planned, parallel over cores, resumable, split-able across machines.

1. Plan: one pass over the source's keys (no values) fixes each shard's first key and count,
   saved as .progress/plan.json. Shard i is a contiguous range of source keys, so machine j of
   n can convert shards [j*S/n, (j+1)*S/n) of the same plan (`part=(j, n)`).
2. Shards: worker processes each take whole shards: read the key range, decode, drop what is
   corrupt or a duplicate (counted, with the reason), centre-crop + resize, encode, and write
   the tar atomically, then a sidecar .progress/shard-XXXXXX.json. A shard whose sidecar exists
   is done: an interrupted conversion redoes only shards without one. On a Ray cluster each
   shard is a Ray task instead (data_shards/parts.py), on whichever node has a free core.
3. Finalize: once every shard has its sidecar, exact duplicates across shards (equal decoded
   pixels, found from the 64-bit pixel hashes in the sidecars) are removed from the later
   shards, and manifest.json is written last: a shard set without a manifest is incomplete.

A disk (or quota) that fills up stops the conversion with one line saying which file did not
fit and about how much the rest needs; the other workers are stopped, temp files removed, and
finished shards kept, so the same command resumes once there is room. Temp files of shards that a
killed run left behind are removed when those shards are redone.

Memory stays flat while converting (each worker holds one shard's images at most, the main
process one summary per shard); finalize holds one 8-byte hash per image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_write_bytes, out_of_space
from data_shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    read_manifest,
    write_manifest,
)
from data_shards.parts import LocalParts, PartRunner
from data_shards.sources import Source, open_source, paths_of
from data_shards.transform import (
    ENCODINGS,
    EXTENSIONS,
    UndecodableImage,
    center_crop_resize,
    decode_image,
    encode,
    pixel_hash,
)
from data_shards.writer import read_shard, shard_temp_files, write_shard

PROGRESS = ".progress"


class ConversionError(ValueError):
    """Options or an output folder that a conversion cannot proceed with."""


@dataclass
class ConvertOptions:
    resolution: int = 64
    channels: int = 3
    encoding: str = "png"
    quality: int = 95
    shard_size: int = 5000
    keep_original: bool = False
    workers: int = 0  # 0: one per core
    limit: int = 0  # > 0: only the first `limit` source keys
    skip_keys: dict[str, str] = field(default_factory=dict)  # key -> reason (from the dedup pass)
    part: tuple[int, int] = (0, 1)

    def check(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ConversionError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.resolution < 8 or self.channels not in (1, 3) or self.shard_size < 1:
            raise ConversionError("need resolution >= 8, channels 1 or 3, shard size >= 1")
        if not 0 <= self.part[0] < self.part[1]:
            raise ConversionError(f"part must be i/n with 0 <= i < n, got {self.part[0]}/{self.part[1]}")

    def transform(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "channels": self.channels, "crop": "center", "resize": "bicubic",
                "encoding": self.encoding, "quality": self.quality if self.encoding == "jpeg" else None,
                "keep_original": self.keep_original}


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _sidecar(out: Path, index: int) -> Path:
    return out / PROGRESS / f"shard-{index:06d}.json"


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data).encode())


def make_plan(source: Source, out: Path, opts: ConvertOptions) -> list[dict]:
    """Shard boundaries, computed once and reused by every resume and every machine."""
    path = out / PROGRESS / "plan.json"
    settings = {"source": source.describe(), "shard_size": opts.shard_size, "limit": opts.limit,
                "transform": opts.transform()}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            raise ConversionError(f"{out} holds a conversion with other settings ({path}); "
                             "convert into a new folder or pass --overwrite")
        return saved["shards"]
    shards: list[dict] = []
    for i, key in enumerate(source.scan_keys()):
        if opts.limit and i >= opts.limit:
            break
        if i % opts.shard_size == 0:
            shards.append({"first_key": key, "count": 0})
        shards[-1]["count"] += 1
    if not shards:
        described = settings["source"]
        raise ConversionError(f"the {described.get('kind', '')} source {described.get('path', '')} holds no items")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"settings": settings, "shards": shards})
    return shards


# --- a part: one shard, in a worker process or a Ray task -----------------------------------
def _original_extension(data: bytes) -> str:
    signatures = {b"\xff\xd8": "orig.jpg", b"\x89PNG": "orig.png", b"RIFF": "orig.webp", b"GIF8": "orig.gif"}
    return next((ext for sig, ext in signatures.items() if data.startswith(sig)), "orig.bin")


def _with_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """H x W or H x W x C uint8 -> H x W x `channels` (grey repeated, or colour averaged)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    return pixels.mean(axis=2, keepdims=True).round().astype(np.uint8)


def convert_shard(context: tuple[Source, Path, ConvertOptions], job: tuple[int, str, int]) -> dict:
    """Shard `index` of the plan: its tar, then its sidecar, each written atomically."""
    source, out, opts = context
    index, first_key, count = job
    skipped: list[dict[str, str]] = []
    keys: list[str] = []
    hashes: list[int] = []
    seen: dict[int, str] = {}
    ext = EXTENSIONS[opts.encoding]

    def samples():
        for key, value, label in source.read(first_key, count):
            if key in opts.skip_keys:
                skipped.append({"key": key, "reason": opts.skip_keys[key]})
                continue
            try:
                pixels = value if isinstance(value, np.ndarray) else decode_image(value, opts.channels,
                                                                                     opts.resolution)
            except UndecodableImage as e:
                skipped.append({"key": key, "reason": str(e)})
                continue
            pixels = _with_channels(pixels, opts.channels)
            digest = pixel_hash(pixels)
            if digest in seen:
                skipped.append({"key": key, "reason": f"exact duplicate of {seen[digest]}"})
                continue
            seen[digest] = key
            keys.append(key)
            hashes.append(digest)
            record = {ext: encode(center_crop_resize(pixels, opts.resolution), opts.encoding, opts.quality)}
            if label >= 0:  # unlabelled sources (LSUN) store no class member: one tar header less to parse
                record["cls"] = str(label).encode()
            if opts.keep_original and isinstance(value, bytes):
                record[_original_extension(value)] = value
            yield key, record

    info = write_shard(out / _shard_name(index), samples())
    summary = {"index": index, "shard": asdict(info), "skipped": skipped, "keys": keys, "hashes": hashes}
    _write_json(_sidecar(out, index), summary)
    return {"index": index, "count": info.count, "skipped": len(skipped)}


# --- main side ---------------------------------------------------------------------------------
def _remove_exact_duplicates_across_shards(out: Path, sidecars: list[dict]) -> None:
    """Keep the first occurrence (in shard order) of each pixel hash; rewrite later shards."""
    hashes = np.concatenate([np.asarray(s["hashes"], dtype=np.int64) for s in sidecars] or [np.zeros(0, np.int64)])
    owner = np.concatenate([np.full(len(s["hashes"]), i, dtype=np.int32) for i, s in enumerate(sidecars)]
                           or [np.zeros(0, np.int32)])
    position = np.concatenate([np.arange(len(s["hashes"]), dtype=np.int32) for s in sidecars]
                              or [np.zeros(0, np.int32)])
    _, first = np.unique(hashes, return_index=True)
    is_dup = np.ones(len(hashes), dtype=bool)
    is_dup[first] = False
    first_of = dict(zip(hashes[first].tolist(), first.tolist(), strict=True))
    for shard in np.unique(owner[is_dup]).tolist():
        car = sidecars[shard]
        drop: dict[str, str] = {}
        for pos in position[is_dup & (owner == shard)].tolist():
            original = first_of[car["hashes"][pos]]
            drop[car["keys"][pos]] = sidecars[owner[original]]["keys"][position[original]]
        path = out / car["shard"]["name"]
        kept = [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"})
                for s in read_shard(path) if s["__key__"] not in drop]
        car["shard"] = asdict(write_shard(path, kept))
        car["skipped"] += [{"key": k, "reason": f"exact duplicate of {v}"} for k, v in drop.items()]
        keep = [i for i, k in enumerate(car["keys"]) if k not in drop]
        car["keys"] = [car["keys"][i] for i in keep]
        car["hashes"] = [car["hashes"][i] for i in keep]
        _write_json(_sidecar(out, car["index"]), car)


def finalize(out: Path, source: Source, opts: ConvertOptions, num_shards: int) -> Manifest:
    sidecars = [json.loads(_sidecar(out, i).read_text()) for i in range(num_shards)]
    _remove_exact_duplicates_across_shards(out, sidecars)
    if not any(s["shard"]["count"] for s in sidecars):
        skipped = [item for s in sidecars for item in s["skipped"]]
        example = f" (e.g. {skipped[0]['key']}: {skipped[0]['reason']})" if skipped else ""
        raise ConversionError(f"no image could be converted into {out}: all {len(skipped)} items were "
                              f"skipped{example}")
    manifest = Manifest(
        source=source.describe(),
        transform=opts.transform(),
        encoding=opts.encoding,
        shards=[ShardInfo(**s["shard"]) for s in sidecars if s["shard"]["count"] > 0],
        skipped=[item for s in sidecars for item in s["skipped"]],
        classes=list(source.classes),
    )
    for s in sidecars:  # a shard emptied by dedup is not part of the set
        if s["shard"]["count"] == 0:
            for path in (out / s["shard"]["name"], (out / s["shard"]["name"]).with_suffix(".idx")):
                path.unlink(missing_ok=True)
    for stale in out.glob(f".{MANIFEST_NAME}.*.tmp"):  # a finalize killed before its rename
        stale.unlink(missing_ok=True)
    write_manifest(out, manifest)
    return manifest


def _remove_temp_files(out: Path, indices: list[int]) -> None:
    """What a killed or failed run left of these shards under temp names: each takes disk space
    until it is overwritten. Only this run's own shards: other parts may be writing theirs."""
    for i in indices:
        for tmp in shard_temp_files(out / _shard_name(i)):
            tmp.unlink(missing_ok=True)
        for tmp in (out / PROGRESS).glob(f".{_sidecar(out, i).name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _convert_pending(source: Source, out: Path, opts: ConvertOptions, pending: list[tuple[int, str, int]],
                     bar: tqdm, runner: PartRunner) -> None:
    planned = {index: count for index, _, count in pending}
    results = runner.run(convert_shard, (source, out, opts), pending)
    try:
        for _, result in results:
            bar.update(planned[result["index"]])
    except BaseException:
        results.close()  # stops the parts still running before their temp files are removed
        _remove_temp_files(out, [job[0] for job in pending])
        raise


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _out_of_space_message(out: Path, error: OSError, shards: list[dict], mine: range) -> str:
    """One line: which file did not fit, what is free, and what the rest of the conversion needs."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    head = f"{error.filename or out}: {error.strerror} ({_size(shutil.disk_usage(existing).free)} free there)"
    done = [json.loads(_sidecar(out, i).read_text())["shard"] for i in mine if _sidecar(out, i).is_file()]
    left = sum(shards[i]["count"] for i in mine if not _sidecar(out, i).is_file())
    samples_done = sum(d["count"] for d in done)
    if not shards:
        need = "not even the conversion's plan fit"
    elif samples_done and left:
        per_sample = sum(d["bytes"] for d in done) / samples_done
        need = (f"the {left} samples not yet converted need about {_size(left * per_sample)} more "
                f"({_size(per_sample)} each in the {len(done)} finished shards, which are kept)")
    elif left:
        need = f"the {left} samples to convert need more than that (no shard was finished)"
    else:
        need = "the shards are written; finishing the set needs a little more (the manifest, at most a rewritten shard)"
    return f"{head}: {need}; free some space or convert elsewhere, then run the same command again"


def convert_source(source: Source, out: str | Path, opts: ConvertOptions, overwrite: bool = False,
                   progress: bool = True, runner: PartRunner | None = None) -> Manifest | None:
    """Convert (or finish converting) `source` into `out`. Returns the manifest, or None when
    this was one part of a multi-machine conversion and other parts are still missing. A full
    disk is a ConversionError of one line; what was finished is kept for the next run. The
    shards are converted by `runner`: this machine's cores (`opts.workers`), or a Ray cluster."""
    opts.check()
    runner = runner or LocalParts(opts.workers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; conversion writes a folder of shards")
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        return read_manifest(out)  # already converted: conversion is idempotent
    shards: list[dict] = []
    mine = range(0)
    try:
        if overwrite:
            for path in [*out.glob("shard-*"), *out.glob(f"{PROGRESS}/*"), out / MANIFEST_NAME]:
                path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        runner.check_paths(paths_of(source), out)
        shards = make_plan(source, out, opts)
        part, parts = opts.part
        mine = range(part * len(shards) // parts, (part + 1) * len(shards) // parts)
        pending = [(i, shards[i]["first_key"], shards[i]["count"]) for i in mine if not _sidecar(out, i).is_file()]
        _remove_temp_files(out, [job[0] for job in pending])
        with tqdm(total=sum(s["count"] for s in shards[mine.start:mine.stop]), unit="img", disable=not progress,
                  initial=sum(shards[i]["count"] for i in mine) - sum(job[2] for job in pending)) as bar:
            _convert_pending(source, out, opts, pending, bar, runner)
        if not all(_sidecar(out, i).is_file() for i in range(len(shards))):
            return None
        return finalize(out, source, opts, len(shards))
    except OSError as e:
        if not out_of_space(e):
            raise
        raise ConversionError(_out_of_space_message(out, e, shards, mine)) from None


def load_skip_keys(path: str | Path | None) -> dict[str, str]:
    """The duplicate list written by `dcgan data dedup`: key -> reason."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return {d["key"]: f"near-duplicate of {d['of']} ({d['method']})" for d in data["duplicates"]}


def convert(source: str, input_path: str | Path | None, out_dir: str | Path, opts: ConvertOptions, *,
            split: str = "train", overwrite: bool = False, progress: bool = True,
            runner: PartRunner | None = None) -> Manifest | None:
    return convert_source(open_source(source, input_path, split), out_dir, opts, overwrite, progress, runner)
