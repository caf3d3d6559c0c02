"""Loader throughput: our WebDataset and DALI loaders on shards stored at training resolution,
against a torchvision-style LSUN reader (map-style Dataset over the LMDB: get by key, Pillow
decode, resize + centre crop per item), on the same LSUN-format input and the same cores.

Every method delivers the same thing: float N x 3 x 64 x 64 batches in [-1, 1] on the CPU.

    python benchmarks/loader_throughput.py [--images 10000] [--batch 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402
from data_shards.loaders import open_loader  # noqa: E402


class LsunLmdbDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.LSUN + Resize(64) + CenterCrop(64) + Normalize do per item."""

    def __init__(self, path: Path, resolution: int):
        self.path, self.resolution, self.env = str(path), resolution, None
        env = lmdb.open(self.path, readonly=True, lock=False)
        with env.begin() as txn:
            self.keys = [k for k, _ in txn.cursor()]  # torchvision builds (and caches) this key list too
        env.close()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.env is None:  # one handle per worker process
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin() as txn:
            image = Image.open(io.BytesIO(txn.get(self.keys[i]))).convert("RGB")
        w, h = image.size
        scale = self.resolution / min(w, h)
        image = image.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))),
                             Image.Resampling.BILINEAR)
        w, h = image.size
        left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1)


def measure(batches, batch: int, limit: int) -> float:
    start, n = time.perf_counter(), 0
    for batch_ in batches:
        images = batch_[0] if isinstance(batch_, (tuple, list)) else batch_
        n += images.shape[0]
        if n >= limit:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader_throughput.json")
    args = parser.parse_args()
    source = args.work / f"lsun-webp-{args.images}"
    if not (source / "data.mdb").is_file():
        subprocess.run([sys.executable, "-m", "cluster.cli", "data", "sample-lsun", "--out", str(source), "--n",
                        str(args.images)], cwd=ROOT, check=True)
    rows = []
    dataset = LsunLmdbDataset(source, 64)
    baseline_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                                  num_workers=args.workers, drop_last=True)
    baseline = measure(baseline_loader, args.batch, len(dataset))
    rows.append({"method": "LSUN LMDB map-style Dataset (torchvision way)", "encoding": "webp 256px",
                 "bytes_per_image": (source / "data.mdb").stat().st_size / len(dataset), "img_per_s": baseline})
    for encoding in ("png", "jpeg", "raw"):
        shards = args.work / f"shards-{args.images}-{encoding}"
        if not (shards / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "cluster.cli", "data", "convert", "--source", "lsun", "--input",
                            str(source), "--out", str(shards), "--resolution", "64", "--encoding", encoding,
                            "--shard-size", str(max(1, min(5000, args.images // (2 * args.workers)))), "--quiet"],
                           cwd=ROOT, check=True)
        manifest = json.loads((shards / "manifest.json").read_text())
        size = sum(s["bytes"] for s in manifest["shards"]) / manifest["total"]
        for kind in ("webdataset", "dali"):
            loader = open_loader(kind, shards, rank=0, world_size=1, batch_size=args.batch, seed=0, channels=3,
                                 resolution=64, num_workers=args.workers, shuffle_buffer=5000, device="cpu")
            rate = measure(loader.batches(0), args.batch, manifest["total"])
            rows.append({"method": f"{kind} loader, shards at 64x64", "encoding": encoding, "bytes_per_image": size,
                         "img_per_s": rate})
    for row in rows:
        row["vs_lmdb"] = row["img_per_s"] / baseline
    print_table(f"{args.images} LSUN-format images -> float 3x64x64 batches of {args.batch}, "
                f"{args.workers} worker(s)/thread(s), CPU",
                [("method", "method", "<46"), ("stored as", "encoding", "<10"), ("bytes/img", "bytes_per_image", ".0f"),
                 ("img/s", "img_per_s", ".0f"), ("vs LMDB", "vs_lmdb", ".1f")], rows)
    write_result(args.out, "loader_throughput", settings={k: str(v) for k, v in vars(args).items()}, rows=rows)


if __name__ == "__main__":
    main()
