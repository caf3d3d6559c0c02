"""The JSON manifest that describes a shard set: counts, files, checksums, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
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
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ShardSetError(f"{path}: unreadable manifest ({e})") from None
    if not manifest.shards or manifest.total == 0:
        raise ShardSetError(f"shard folder {folder} holds no samples")
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
