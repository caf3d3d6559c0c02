"""Conversion throughput and memory: LSUN-format LMDB (WebP or JPEG, 256 px shorter side) ->
64x64 PNG shards, images per second per core, and peak RSS at two data-set sizes.

Each conversion runs as a user runs it (`dcgan data convert` in a fresh process); a sampler
sums the anonymous memory (heap and stacks: "Anonymous" in /proc/PID/smaps_rollup) of that
process and its workers every 100 ms. RSS and even USS also count the pages of the LMDB's
memory-mapped file that a process has read, which grow with the data read but are page cache
the kernel reclaims, not memory the converter holds. The input LMDBs are built once from
scikit-image's photos (`dcgan data sample-lsun`) and reused.

    python benchmarks/convert_throughput.py [--sizes 10000 100000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402


def dcgan(*args: str) -> list[str]:
    return [sys.executable, "-m", "dcgan", *args]


def ensure_lmdb(path: Path, n: int, image_format: str) -> None:
    if (path / "data.mdb").is_file():
        return
    subprocess.run(dcgan("data", "sample-lsun", "--out", str(path), "--n", str(n), "--format", image_format),
                   cwd=ROOT, check=True)


def anonymous_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def timed_convert(lmdb_path: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = dcgan("data", "convert", "--source", "lsun", "--input", str(lmdb_path), "--out", str(out),
                "--resolution", "64", "--workers", str(workers), "--quiet")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(anonymous_bytes(p.pid) for p in tree))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"conversion failed: {' '.join(cmd)}")
    total = json.loads((out / "manifest.json").read_text())["total"]
    return {"images": total, "seconds": elapsed, "img_per_s": total / elapsed,
            "img_per_s_per_core": total / elapsed / workers, "peak_anonymous_mib": peak / 2**20, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convert_throughput.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    small = min(args.sizes)
    for image_format in ("webp", "jpeg"):
        source = args.work / f"lsun-{image_format}-{small}"
        ensure_lmdb(source, small, image_format)
        for workers in sorted({1, cores}):
            rows.append({"input": image_format, **timed_convert(source, args.work / "out", workers)})
    for n in sorted(set(args.sizes) - {small}):  # memory against data-set size, all cores, JPEG input
        source = args.work / f"lsun-jpeg-{n}"
        ensure_lmdb(source, n, "jpeg")
        rows.append({"input": "jpeg", **timed_convert(source, args.work / "out", cores)})
    shutil.rmtree(args.work / "out", ignore_errors=True)

    print_table(f"LSUN-format LMDB (256 px shorter side) -> 64x64 PNG shards, {cores} cores",
                [("input", "input", "<6"), ("images", "images", "d"), ("workers", "workers", "d"),
                 ("img/s", "img_per_s", ".0f"), ("img/s/core", "img_per_s_per_core", ".0f"),
                 ("peak anon MiB", "peak_anonymous_mib", ".0f")], rows)
    write_result(args.out, "convert_throughput", rows=rows)


if __name__ == "__main__":
    main()
