"""Dedup quality: recall of planted near-duplicates and false-positive rate, on the photographs the
thresholds were tuned on and on held-out ones, for one band table (the old search) and two (today's),
across thresholds.

For each photo set it builds an LSUN-format LMDB of N images (random views of the photographs) with
N/10 planted near-duplicates (cropped 2-5 %, rescaled, re-encoded as JPEG) and 6 exact ones, trains
the hashing autoencoder once and hashes every image once (`hash_source`, as `dcgan data dedup` does),
then runs the pair search for every setting on the same hashes.

    python benchmarks/dedup_quality.py [--n 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table, settings_of, write_result  # noqa: E402

# (bands, max_hamming, max_cosine): the old default (one table), today's, and looser thresholds
SETTINGS = [(8, 16, 0.04), (16, 16, 0.04), (16, 18, 0.05), (16, 20, 0.06), (16, 24, 0.08)]


def measure(photos: str, n: int, folder: Path) -> list[dict]:
    from data_shards.dedup import DedupOptions, group_duplicates, hash_source, recall_and_false_positive_rate
    from data_shards.sample_lsun import build_sample_lsun
    from data_shards.sources import open_source

    planted = build_sample_lsun(folder / photos, n, near_duplicates=n // 10, exact_duplicates=6, workers=2,
                                photos=photos)
    started = time.perf_counter()
    hashed = hash_source(open_source("lsun", folder / photos), DedupOptions())
    hashing_s = time.perf_counter() - started
    rows = []
    for bands, max_hamming, max_cosine in SETTINGS:
        opts = DedupOptions(bands=bands, max_hamming=max_hamming, max_cosine=max_cosine)
        found = group_duplicates(hashed.keys, hashed.hashes, hashed.codes, opts)
        recall, _ = recall_and_false_positive_rate(found, planted.near_duplicates, hashed.keys)
        # exact duplicates are near-duplicates too: left out of the false-positive count
        _, fpr = recall_and_false_positive_rate(found, {**planted.near_duplicates, **planted.exact_duplicates},
                                                hashed.keys)
        default = (bands, max_hamming, max_cosine) == (DedupOptions.bands, DedupOptions.max_hamming,
                                                       DedupOptions.max_cosine)
        rows.append({"photos": photos, "images": len(hashed.keys), "bands": bands, "max_hamming": max_hamming,
                     "max_cosine": max_cosine, "recall": recall, "false_positive_rate": fpr,
                     "default": "yes" if default else "", "train_and_hash_s": hashing_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="distinct images per photo set")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dedup_quality.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for photos in ("tuned", "held-out"):
            rows += measure(photos, args.n, Path(folder))
            print(f"{photos}: done in {rows[-1]['train_and_hash_s']:.0f} s of training and hashing", flush=True)
    print_table(f"near-duplicate search on {args.n:,} sample images per photo set (N/10 planted near-duplicates)",
                [("photos", "photos", "<8"), ("bands", "bands", "d"), ("max hamming", "max_hamming", "d"),
                 ("max cosine", "max_cosine", ".2f"), ("recall", "recall", ".3f"),
                 ("false positives", "false_positive_rate", ".4f"), ("default", "default", "<7")], rows)
    write_result(args.out, "dedup_quality", settings=settings_of(args), rows=rows)


if __name__ == "__main__":
    main()
