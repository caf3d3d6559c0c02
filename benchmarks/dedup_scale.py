"""The dedup pair search at scale: time and peak memory at 100k, 300k and 1M entries.

Each size runs in a fresh process (its peak RSS is the search's own). The entries are synthetic
128-dim codes and their sign hashes, as the hashing autoencoder makes them: random ones, planted
near-copies (codes within 1e-3, hashes 3 bits apart) and a block of "blank frames" (5 % of the set
with one code and hash, slightly perturbed), the degenerate bucket crawled data holds. Decoding and
hashing the images are per-image work that `dcgan data dedup` spreads over processes; what grows
with the set is this search, whose old all-pairs form needed members^2 x 128 bytes per bucket and
skipped any bucket over 20,000 members.

    python benchmarks/dedup_scale.py [--sizes 100000,300000,1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, write_result  # noqa: E402


def synthetic(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    rng = np.random.default_rng(seed)
    pairs, blank = n // 100, n // 20
    codes = rng.standard_normal((n, 128)).astype(np.float32)
    codes[n - blank:] = codes[0] + 1e-2 * rng.standard_normal((blank, 128))  # blank frames: one code, noise
    start = n - blank - pairs
    codes[start:start + pairs] = codes[1:1 + pairs] + 1e-3 * rng.standard_normal((pairs, 128))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    hashes = np.packbits(codes > 0, axis=1)
    hashes[n - blank:] = hashes[0]
    flips = rng.integers(0, 128, (pairs, 3))
    hashes[start:start + pairs] = hashes[1:1 + pairs]
    for j in range(3):
        hashes[start + np.arange(pairs), flips[:, j] // 8] ^= (1 << (flips[:, j] % 8)).astype(np.uint8)
    keys = [f"{i:08d}" for i in range(n)]
    planted = {keys[start + i]: keys[1 + i] for i in range(pairs)}
    return keys, hashes, codes.astype(np.float16), planted


def run_one(n: int) -> dict:
    """In this process: build the set, search it, report."""
    from dataclasses import asdict

    from data_shards.dedup import DedupOptions, SearchStats, group_duplicates

    keys, hashes, codes, planted = synthetic(n)
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = SearchStats()
    started = time.perf_counter()
    found = group_duplicates(keys, hashes, codes, DedupOptions(), stats)
    seconds = time.perf_counter() - started
    recall = sum(1 for copy, original in planted.items() if found.get(copy, copy) == found.get(original, original))
    return {"entries": n, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "input_rss_mib": built_rss / 2**20, "duplicates_found": len(found),
            "planted_recall": recall / len(planted), **asdict(stats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: search this size, print JSON
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dedup_scale.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        res = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{n:,}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    print_table("dedup pair search on synthetic codes (5 % blank frames, 1 % planted near-copies)",
                [("entries", "entries", ",d"), ("s", "seconds", ".1f"), ("peak RSS MiB", "peak_rss_mib", ".0f"),
                 ("largest bucket", "largest_bucket", ",d"), ("windowed buckets", "windowed_buckets", "d"),
                 ("pairs compared", "pairs_compared", ",d"), ("recall", "planted_recall", ".3f")], rows)
    write_result(args.out, "dedup_scale", settings={"sizes": args.sizes}, rows=rows)


if __name__ == "__main__":
    main()
