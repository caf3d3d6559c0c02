"""The JSON manifest that describes a shard set: counts, files, checksums, provenance."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "dcgan-shards/1"


class ShardSetError(FileNotFoundError):
    """A shard folder that is missing, empty or inconsistent with its manifest."""


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    source: dict[str, Any]
    transform: dict[str, Any]
    encoding: str
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    format: str = FORMAT

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["total"] = self.total
        return json.dumps(data, indent=1)


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(folder: str | Path, require_shards: bool = True) -> Manifest:
    """The folder's manifest; with `require_shards`, also that every shard it names is there."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if folder.is_file():
        raise ShardSetError(f"{folder} is a file; a shard set is a folder made by `dcgan data convert`")
    if not folder.is_dir():
        raise ShardSetError(f"shard folder {folder} does not exist; create it with `dcgan data convert`")
    if not path.is_file():
        raise ShardSetError(f"shard folder {folder} has no {MANIFEST_NAME}; create it with `dcgan data convert`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ShardSetError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        data.pop("total", None)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        manifest = Manifest(**data)
        for shard in manifest.shards:  # a hand-edited manifest must fail here, not mid-training
            if not (isinstance(shard.name, str) and isinstance(shard.sha256, str)
                    and all(type(v) is int and v >= 0 for v in (shard.count, shard.bytes))):
                raise TypeError(f"shard entry {asdict(shard)} needs a name, counts >= 0 and a sha256")
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ShardSetError(f"{path}: unreadable manifest ({e})") from None
    if not manifest.shards or manifest.total == 0:
        raise ShardSetError(f"shard folder {folder} holds no samples")
    if not require_shards:
        return manifest
    missing = [s.name for s in manifest.shards if not (folder / s.name).is_file()]
    if missing:
        raise ShardSetError(f"shard folder {folder} lacks {len(missing)} shard(s) named in its manifest, "
                            f"e.g. {missing[0]}")
    return manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_problem(folder: Path, shard: ShardInfo, hash_contents: bool = True) -> str | None:
    """What is wrong with one shard's file against its manifest entry, in a few words; None if nothing.
    The size is one stat; the sha256 reads the whole file."""
    path = folder / shard.name
    try:
        size = path.stat().st_size
        if size != shard.bytes:
            return f"size {size} != {shard.bytes}"
        if hash_contents and sha256_file(path) != shard.sha256:
            return "sha256 mismatch"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def verify_shards(folder: str | Path, workers: int = 0) -> tuple[Manifest, list[tuple[ShardInfo, str]]]:
    """Every shard's size and sha256 against the manifest: (manifest, [(shard, problem)]) in manifest
    order. Shards are hashed in parallel threads: hashlib and file reads release the GIL, so this runs
    at disk speed or `workers` cores (0: one per core), whichever is less."""
    folder = Path(folder)
    manifest = read_manifest(folder, require_shards=False)
    threads = max(1, min(workers or os.cpu_count() or 1, len(manifest.shards)))
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda shard: shard_problem(folder, shard), manifest.shards))
    return manifest, [(shard, problem) for shard, problem in zip(manifest.shards, problems, strict=True) if problem]


def size_mismatches(folder: Path, shards: list[ShardInfo]) -> list[tuple[ShardInfo, str]]:
    """The shards whose file is missing or not the manifest's size, a stat each: what a loader can
    afford to check at every start (contents are hashed on demand, by `dcgan data verify`)."""
    found = ((shard, shard_problem(folder, shard, hash_contents=False)) for shard in shards)
    return [(shard, problem) for shard, problem in found if problem]


def read_manifest_for(folder: str | Path, resolution: int, channels: int) -> Manifest:
    """The manifest of a shard set that a model of this resolution and channel count can train on."""
    manifest = read_manifest(folder)
    stored = manifest.transform.get("resolution")
    if stored != resolution:
        raise ShardSetError(f"shards in {folder} are {stored}x{stored}, the model wants "
                            f"{resolution}x{resolution}; convert again with --resolution {resolution}")
    stored_channels = manifest.transform.get("channels", channels)
    if manifest.encoding == "raw" and stored_channels != channels:
        raise ShardSetError(f"raw shards in {folder} have {stored_channels} channel(s), the model "
                            f"wants {channels}; convert again with --channels {channels}")
    return manifest
