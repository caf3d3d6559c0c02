"""LSUN at scale: `dcgan data dedup` then `dcgan data convert` on LSUN-format LMDBs of 100k to 1M
entries, with wall time, peak memory of every process, bytes per image on disk and the largest
bucket searched; and conversion on a local Ray cluster beside the same conversion in processes.

The LMDBs are made by `dcgan data sample-lsun` with small images (64 px shorter side, JPEG, about
2 KB): what is measured is the key count (planning, the hashing parts, the pair search, the
manifest), not LSUN's 256 px decode, whose per-core rate `convert_throughput.py` measures. N/100
planted near-duplicates give the recall at each size.

Memory is sampled every 0.2 s over the command's process tree: anonymous memory (RSS less the
file-backed pages, of which the memory-mapped LMDB is most) and RSS. A forked worker's pages
shared with its parent count in both, so the tree's total is an upper bound.

    python benchmarks/lsun_scale.py [--sizes 100000,1000000] [--ray-size 100000] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, settings_of, write_result  # noqa: E402


class TreeMemory(threading.Thread):
    """Peak memory of a process and each of its descendants, sampled until the process ends: RSS, and
    anonymous memory (RSS less file-backed pages). The LMDB is memory-mapped: pages of it that were read
    count in RSS, though the kernel drops them under pressure; anonymous memory is what can run out."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peak: dict[int, tuple[int, int]] = {}  # pid -> (peak RSS, peak anonymous) in bytes
        self.peak_total = 0  # anonymous, all processes at one moment

    def run(self) -> None:
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            total = 0
            for p in [self.root, *self._children()]:
                try:
                    info = p.memory_info()
                except psutil.Error:
                    continue
                anonymous = info.rss - info.shared
                total += anonymous
                rss, anon = self.peak.get(p.pid, (0, 0))
                self.peak[p.pid] = (max(rss, info.rss), max(anon, anonymous))
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.interval_s)

    def _children(self) -> list[psutil.Process]:
        try:
            return self.root.children(recursive=True)
        except psutil.Error:
            return []

    def summary(self) -> dict[str, float]:
        driver_rss, driver_anon = self.peak.get(self.root.pid, (0, 0))
        others = [peaks for pid, peaks in self.peak.items() if pid != self.root.pid]
        return {"driver_peak_mib": driver_anon / 2**20, "driver_peak_rss_mib": driver_rss / 2**20,
                "worker_peak_mib": max((anon for _, anon in others), default=0) / 2**20,
                "worker_peak_rss_mib": max((rss for rss, _ in others), default=0) / 2**20,
                "processes": len(self.peak), "tree_peak_mib": self.peak_total / 2**20}


def timed(args: list[str], env: dict | None = None) -> tuple[float, dict, str]:
    """Run `dcgan ARGS`: (seconds, memory summary, stdout); a failure ends the benchmark with its output."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dcgan", *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    memory = TreeMemory(process.pid)
    memory.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    memory.join(timeout=5)
    if process.returncode != 0:
        sys.exit(f"dcgan {' '.join(args)} failed ({process.returncode}):\n{err[-3000:]}")
    return seconds, memory.summary(), out


def build(folder: Path, n: int) -> tuple[Path, float, dict[str, str]]:
    """The LMDB of `n` images in `folder` and its planted near-duplicates; one built before (--keep) is reused."""
    from data_shards.sample_lsun import build_sample_lsun, planted_near_duplicates

    started = time.perf_counter()
    lmdb = folder / f"lsun-{n}"
    if (lmdb / "data.mdb").is_file():
        return lmdb, 0.0, planted_near_duplicates(n, n // 100)
    planted = build_sample_lsun(lmdb, n, image_format="JPEG", short_side=64, near_duplicates=n // 100,
                                exact_duplicates=n // 1000, workers=psutil.cpu_count() or 1)
    return lmdb, time.perf_counter() - started, planted.near_duplicates


def measure_size(folder: Path, lmdb: Path, build_s: float, near: dict[str, str]) -> dict:
    from data_shards.dedup import recall_and_false_positive_rate
    from data_shards.manifest import read_manifest
    from data_shards.sources import open_source

    n = int(lmdb.name.rpartition("-")[2])
    entries = open_source("lsun", lmdb).describe()["entries"]
    print(f"{entries:,} entries" + (f" built in {build_s:.0f} s" if build_s else ", built before"), flush=True)
    dups = folder / f"dups-{n}.json"
    dedup_s, dedup_mem, _ = timed(["data", "dedup", "--input", str(lmdb), "--out", str(dups), "--quiet"])
    listed = json.loads(dups.read_text())
    found = {d["key"]: d["of"] for d in listed["duplicates"]}
    recall, _ = recall_and_false_positive_rate(found, near, [])
    print(f"dedup: {dedup_s:.0f} s, driver peak {dedup_mem['driver_peak_mib']:.0f} MiB anonymous", flush=True)
    shards = folder / f"shards-{n}"
    convert_s, convert_mem, _ = timed(["data", "convert", "--source", "lsun", "--input", str(lmdb), "--out",
                                       str(shards), "--resolution", "64", "--encoding", "jpeg", "--skip-keys",
                                       str(dups), "--quiet"])
    manifest = read_manifest(shards)
    stored = sum(s.bytes for s in manifest.shards)
    print(f"convert: {convert_s:.0f} s, {manifest.total:,} samples", flush=True)
    shutil.rmtree(shards)
    lmdb_bytes = sum(p.stat().st_size for p in lmdb.iterdir())
    return {"date": date.today().isoformat(), "entries": entries, "dedup_seconds_by_stage": listed["seconds"],
            "build_s": build_s, "lmdb_bytes_per_image": lmdb_bytes / entries,
            "dedup_s": dedup_s, **{f"dedup_{k}": v for k, v in dedup_mem.items()},
            "largest_bucket": listed["search"]["largest_bucket"], "pairs_compared": listed["search"]["pairs_compared"],
            "windowed_buckets": listed["search"]["windowed_buckets"], "near_duplicates_found": len(found),
            "planted_recall": recall, "convert_s": convert_s,
            **{f"convert_{k}": v for k, v in convert_mem.items()}, "samples": manifest.total,
            "shards": len(manifest.shards), "shard_bytes_per_image": stored / manifest.total,
            "convert_img_per_s_per_core": entries / convert_s / (psutil.cpu_count() or 1)}


def measure_ray(folder: Path, lmdb: Path) -> list[dict]:
    """The same conversion in this machine's processes and as Ray tasks on a local Ray cluster of its cores."""
    from cluster.testing.local_head import LocalRayHead

    n = int(lmdb.name.rpartition("-")[2])
    cores = psutil.cpu_count() or 1
    rows = []
    with LocalRayHead(num_cpus=cores) as head:
        for where, extra in (("processes", []), ("Ray tasks", ["--address", head.gcs_address])):
            out = folder / f"ray-{where.split()[0]}"
            seconds, memory, _ = timed(["data", "convert", "--source", "lsun", "--input", str(lmdb), "--out", str(out),
                                        "--resolution", "64", "--encoding", "jpeg", "--quiet", *extra], env=head.env)
            rows.append({"date": date.today().isoformat(), "where": where, "entries": n, "seconds": seconds,
                         "img_per_s_per_core": n / seconds / cores,
                         **memory})
            print(f"convert in {where}: {seconds:.0f} s", flush=True)
            shutil.rmtree(out)
    rows[1]["relative"] = rows[1]["img_per_s_per_core"] / rows[0]["img_per_s_per_core"]
    rows[0]["relative"] = 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--ray-size", type=int, default=100_000, help="entries converted both ways (0: skip)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of sizes not measured now")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep the LMDBs, or reuse those found "
                                                  "there (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lsun_scale.json",
                        help="the sizes' JSON; the Ray comparison goes beside it, as NAME_ray.json")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="lsun-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows, ray_rows = [], []
    try:
        for n in sorted({int(n) for n in args.sizes.split(",") if n} | ({args.ray_size} if args.ray_size else set())):
            lmdb, build_s, near = build(folder, n)
            if n == args.ray_size:
                ray_rows = measure_ray(folder, lmdb)
            if str(n) in args.sizes.split(","):
                rows.append(measure_size(folder, lmdb, build_s, near))
            if not args.keep:
                shutil.rmtree(lmdb)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.merge and args.out.is_file():  # sizes measured before (each row has its date) and not now
        earlier = json.loads(args.out.read_text())
        rows += [{"date": earlier["date"], **row} for row in earlier["rows"]
                 if row["entries"] not in {r["entries"] for r in rows}]
        rows.sort(key=lambda row: row["entries"])
    if rows:
        print_table("dedup + convert of an LSUN-format LMDB (64 px JPEG entries; memory: peak anonymous, RSS beside)",
                    [("entries", "entries", ",d"), ("dedup s", "dedup_s", ".0f"),
                     ("dedup driver MiB", "dedup_driver_peak_mib", ".0f"),
                     ("(RSS)", "dedup_driver_peak_rss_mib", ".0f"),
                     ("dedup worker MiB", "dedup_worker_peak_mib", ".0f"),
                     ("largest bucket", "largest_bucket", ",d"), ("recall", "planted_recall", ".3f"),
                     ("convert s", "convert_s", ".0f"), ("convert driver MiB", "convert_driver_peak_mib", ".0f"),
                     ("convert worker MiB", "convert_worker_peak_mib", ".0f"),
                     ("bytes/image", "shard_bytes_per_image", ".0f"),
                     ("img/s/core", "convert_img_per_s_per_core", ".0f")], rows)
    if ray_rows:
        print_table(f"conversion of {args.ray_size:,} entries: processes vs Ray tasks on a local Ray cluster",
                    [("where", "where", "<10"), ("s", "seconds", ".1f"), ("img/s/core", "img_per_s_per_core", ".0f"),
                     ("relative", "relative", ".2f"), ("driver MiB", "driver_peak_mib", ".0f")], ray_rows)
    if rows:
        write_result(args.out, "lsun_scale", settings=settings_of(args), rows=rows)
    if ray_rows:
        write_result(args.out.with_name(f"{args.out.stem}_ray.json"), "lsun_scale_ray", settings=settings_of(args),
                     rows=ray_rows)


if __name__ == "__main__":
    main()
