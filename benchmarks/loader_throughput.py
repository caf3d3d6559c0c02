"""Loader throughput: our WebDataset, DALI and device-resident loaders on shards stored at training
resolution, against a torchvision-style LSUN reader (map-style Dataset over the LMDB: get by key,
Pillow decode, resize + centre crop per item), on the same LSUN-format input and the same cores.

Every method delivers the same images, 64 x 64 x 3, in batches on the CPU, each in its own
contract (the "delivers" column reads it off the batches): the torchvision-style baseline float
N x 3 x 64 x 64 in [-1, 1], as its transforms end; our loaders uint8 N x 64 x 64 x 3, the loader
contract (data_shards/loaders.py), a quarter of the bytes, scaled to the compute dtype on the
training device in the same pass that casts them (`to_model_input`, not timed here).

The device loader ("device") reads and decodes its part of the set once, at construction (its
own row: the seconds and images/s of that), then serves every epoch from memory (the row
"batches() from memory": a permutation per epoch and a gather per batch, numpy's take on a
CPU, index_select on a GPU). `vs step` compares a row's rate with what a 64x64 training step
consumes (--step-img-per-s; by default the CPU dcgan-scale bf16 rate in
benchmarks/results/train_throughput.json): above 1, the loader keeps up.

    python benchmarks/loader_throughput.py [--images 10000] [--batch 128] [--workers 2]
                                           [--step-img-per-s N] [--out results.json]
"""

from __future__ import annotations

import argparse
import importlib
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

from benchmarks.report import print_table, settings_of, write_result  # noqa: E402
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


def delivers(images: torch.Tensor) -> str:
    """A batch's contract in a few words, read off the batch itself."""
    layout = "N x C x H x W" if images.shape[1] < images.shape[-1] else "N x H x W x C"
    return f"{str(images.dtype).removeprefix('torch.')} {layout}"


def measure(batches, limit: int) -> tuple[float, float, str]:
    """(images/s, seconds, what the batches are) over the first `limit` images of `batches`."""
    start, n, kind = time.perf_counter(), 0, "-"
    for batch_ in batches:
        images = batch_[0] if isinstance(batch_, (tuple, list)) else batch_
        kind = delivers(images)
        n += images.shape[0]
        if n >= limit:
            break
    wait_for_device()
    seconds = time.perf_counter() - start
    return n / seconds, seconds, kind


def wait_for_device() -> None:
    """A device loader's last batches may still be queued on a GPU: count them when they exist."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_epochs(loader, min_seconds: float = 1.0) -> tuple[float, float, str]:
    """Steady state of a loader that holds its set: whole epochs until `min_seconds` have passed
    (one epoch of a small set is over in milliseconds)."""
    start, n, epoch, kind = time.perf_counter(), 0, 0, "-"
    while epoch == 0 or time.perf_counter() - start < min_seconds:
        for images, _ in loader.batches(epoch):
            kind = delivers(images)
            n += images.shape[0]
        epoch += 1
        wait_for_device()
    seconds = time.perf_counter() - start
    return n / seconds, seconds, kind


def default_step_rate() -> float | None:
    """The CPU 64x64 step's images/s (dcgan-scale, bf16) from the train throughput benchmark."""
    path = ROOT / "benchmarks" / "results" / "train_throughput.json"
    try:
        return float(json.loads(path.read_text())["img_per_s_median"]["dcgan-scale bf16"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def encoding_rows(args: argparse.Namespace, source: Path, encoding: str, streaming: list[str], device: str
                  ) -> list[dict]:
    """The shard set stored as `encoding` (converted on first use), read by each loader."""
    rows = []
    shards = args.work / f"shards-{args.images}-{encoding}"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "dcgan", "data", "convert", "--source", "lsun", "--input",
                        str(source), "--out", str(shards), "--resolution", "64", "--encoding", encoding,
                        "--shard-size", str(max(1, min(5000, args.images // (2 * args.workers)))), "--quiet"],
                       cwd=ROOT, check=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    size = sum(s["bytes"] for s in manifest["shards"]) / manifest["total"]
    common = dict(rank=0, world_size=1, batch_size=args.batch, seed=0, channels=3, resolution=64,
                  num_workers=args.workers, shuffle_buffer=5000, device=device)
    for kind in streaming:
        loader = open_loader(kind, shards, **common)
        rate, seconds, delivered = measure(loader.batches(0), manifest["total"])
        rows.append({"method": f"{kind} loader, shards at 64x64", "encoding": encoding, "delivers": delivered,
                     "bytes_per_image": size, "img_per_s": rate, "seconds": seconds})
        del loader
    start = time.perf_counter()
    loader = open_loader("device", shards, **common)
    seconds = time.perf_counter() - start
    rows.append({"method": "device loader: read + decode once (setup)", "encoding": encoding,
                 "delivers": "held uint8 N x H x W x C", "bytes_per_image": size,
                 "img_per_s": len(loader.labels) / seconds, "seconds": seconds})
    rate, seconds, delivered = measure_epochs(loader)
    rows.append({"method": "device loader: batches() from memory", "encoding": encoding, "delivers": delivered,
                 "bytes_per_image": 64 * 64 * 3, "img_per_s": rate, "seconds": seconds})
    del loader
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--step-img-per-s", type=float, default=None,
                        help="what a 64x64 training step consumes; default: the CPU bf16 rate in "
                             "benchmarks/results/train_throughput.json")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader_throughput.json")
    args = parser.parse_args()
    step_rate = args.step_img_per_s if args.step_img_per_s is not None else default_step_rate()
    # on a GPU the loaders deliver there: DALI decodes on it ("mixed"), the device loader holds the set there
    device = "cuda" if torch.cuda.is_available() else "cpu"
    streaming = ["webdataset"]
    try:
        importlib.import_module("nvidia.dali")
        streaming.append("dali")
    except ImportError:
        print("dali: not installed here (the dali extra), its rows are left out")
    source = args.work / f"lsun-webp-{args.images}"
    if not (source / "data.mdb").is_file():
        subprocess.run([sys.executable, "-m", "dcgan", "data", "sample-lsun", "--out", str(source), "--n",
                        str(args.images)], cwd=ROOT, check=True)
    rows = []
    dataset = LsunLmdbDataset(source, 64)
    baseline_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                                  num_workers=args.workers, drop_last=True)
    baseline, seconds, kind = measure(baseline_loader, len(dataset))
    rows.append({"method": "LSUN LMDB map-style Dataset (torchvision way)", "encoding": "webp 256px",
                 "delivers": kind, "bytes_per_image": (source / "data.mdb").stat().st_size / len(dataset),
                 "img_per_s": baseline, "seconds": seconds})
    for encoding in ("png", "jpeg", "raw"):
        rows += encoding_rows(args, source, encoding, streaming, device)
    columns = [("method", "method", "<42"), ("stored as", "encoding", "<10"), ("delivers", "delivers", "<24"),
               ("bytes/img", "bytes_per_image", ".0f"), ("s", "seconds", ".2f"), ("img/s", "img_per_s", ".0f"),
               ("vs LMDB", "vs_lmdb", ".1f")]
    for row in rows:
        row["vs_lmdb"] = row["img_per_s"] / baseline
        if step_rate:
            row["vs_step"] = row["img_per_s"] / step_rate
    if step_rate:
        columns.append(("vs step", "vs_step", ".0f"))
    print_table(f"{args.images} LSUN-format images -> 64x64x3 batches of {args.batch}, "
                f"{args.workers} worker(s)/thread(s), delivered on {device}"
                + (f"; a 64x64 step consumes {step_rate:.0f} img/s (vs step)" if step_rate else ""),
                columns, rows)
    settings = settings_of(args)
    write_result(args.out, "loader_throughput", settings=settings,
                 step_img_per_s=step_rate, device=device, rows=rows)


if __name__ == "__main__":
    main()
