"""The paper's near-duplicate pass on planted near-duplicates, and conversion skipping them."""

import json
import tracemalloc

import numpy as np
from conftest import run_dcgan

from data_shards.convert import ConvertOptions, convert, load_skip_keys
from data_shards.dedup import (
    DedupOptions,
    SearchStats,
    find_near_duplicates,
    group_duplicates,
    recall_and_false_positive_rate,
)
from data_shards.sources import open_source


def _quality(path, planted) -> tuple[float, float]:
    """(recall of the planted near-duplicates, false-positive rate) of the dedup pass over the LMDB at `path`."""
    source = open_source("lsun", path)
    found = find_near_duplicates(source, DedupOptions(train_samples=700, train_steps=300, workers=2))
    keys = list(source.scan_keys())
    recall, _ = recall_and_false_positive_rate(found, planted.near_duplicates, keys)
    # exact duplicates are near-duplicates too: leave them out of the false-positive count
    _, fpr = recall_and_false_positive_rate(found, {**planted.near_duplicates, **planted.exact_duplicates}, keys)
    print(f"near-duplicate recall {recall:.3f}, false-positive rate {fpr:.4f}")
    return recall, fpr


def test_semantic_hashing_finds_planted_near_duplicates(lsun_lmdb):
    recall, fpr = _quality(*lsun_lmdb)
    assert recall >= 0.9 and fpr <= 0.02


def test_the_thresholds_hold_on_photographs_they_were_not_tuned_on(tmp_path):
    from data_shards.sample_lsun import build_sample_lsun

    planted = build_sample_lsun(tmp_path / "held_out_lmdb", 600, near_duplicates=60, exact_duplicates=6, workers=2,
                                photos="held-out")
    recall, fpr = _quality(tmp_path / "held_out_lmdb", planted)
    assert recall >= 0.85 and fpr <= 0.02


def test_group_keeps_the_first_key_of_each_group():
    keys = ["a", "b", "c", "d"]
    codes = np.eye(4, 128, dtype=np.float16)
    codes[2] = codes[0]
    hashes = np.packbits(codes > 0.5, axis=1)
    assert group_duplicates(keys, hashes, codes, DedupOptions()) == {"c": "a"}


def test_dedup_cli_then_convert_skips_the_list(lsun_lmdb, tmp_path):
    path, planted = lsun_lmdb
    dups = tmp_path / "dups.json"
    res = run_dcgan("data", "dedup", "--source", "lsun", "--input", str(path), "--out", str(dups),
                    "--train-samples", "700", "--train-steps", "300", "--workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    listed = json.loads(dups.read_text())["duplicates"]
    assert listed and all(d["method"] == "semantic-hash" for d in listed)
    search = json.loads(dups.read_text())["search"]
    assert search["largest_bucket"] > 1 and search["windowed_buckets"] == 0
    assert f"largest bucket {search['largest_bucket']:,}; every bucket searched in full" in res.stdout
    m = convert("lsun", path, tmp_path / "out", ConvertOptions(resolution=32, shard_size=300, workers=2,
                                                               skip_keys=load_skip_keys(dups)), progress=False)
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert all(reasons[d["key"]].startswith(f"near-duplicate of {d['of']}") for d in listed
               if d["key"] not in planted.corrupt)
    assert m.total == 672 - len(planted.corrupt) - len(reasons.keys() - set(planted.corrupt))


def _planted_codes(n: int, pairs: int, seed: int = 0, flips: dict[int, int] | None = None
                   ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    """n random unit codes and their sign hashes; the last `pairs` items are near-copies of the first ones:
    codes within 1e-3, hashes apart in the bits of `flips` (byte -> mask; default two bits)."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n, 128)).astype(np.float32)
    codes[n - pairs:] = codes[:pairs] + 1e-3 * rng.standard_normal((pairs, 128))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    hashes = np.packbits(codes > 0, axis=1)
    hashes[n - pairs:] = hashes[:pairs]
    for byte, mask in (flips or {4: 0b00100000, 9: 0b00000100}).items():
        hashes[n - pairs:, byte] ^= mask
    keys = [f"{i:06d}" for i in range(n)]
    return keys, hashes, codes.astype(np.float16), {keys[n - pairs + i]: keys[i] for i in range(pairs)}


def test_a_bucket_larger_than_a_block_is_searched_in_full_and_matches_all_pairs():
    keys, hashes, codes, planted = _planted_codes(3000, 40)
    hashes[:, :2] = 0  # every item in one bucket of band 0: 3,000 members, three blocks a side
    stats = SearchStats()
    found = group_duplicates(keys, hashes, codes, DedupOptions(), stats)
    assert found == planted and stats.largest_bucket == 3000 and stats.windowed_buckets == 0


def test_a_degenerate_bucket_is_searched_by_neighbours_in_flat_memory_never_skipped():
    """25,000 images agreeing on a whole band (blank frames do): once skipped without a word, so their
    duplicates were kept; now searched in blocks, reported, and the planted copies found."""
    # each copy differs from its original in one bit of every other band: band 0, the degenerate one, is
    # the only bucket that holds both
    keys, hashes, codes, planted = _planted_codes(25_000, 60, seed=1, flips={b: 1 for b in range(2, 16, 2)})
    hashes[:, :2] = 0
    stats = SearchStats()
    tracemalloc.start()
    found = group_duplicates(keys, hashes, codes, DedupOptions(), stats)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert found == planted
    assert stats.largest_bucket == 25_000 and stats.windowed_buckets == 1 and stats.windowed_members == 25_000
    # all pairs of one 25,000-member bucket at once would take 25,000^2 x 16 bytes = 10 GB
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_a_bucket_already_one_group_is_not_searched_again_in_later_bands():
    """Blank frames share every band: searched in the first, one group from then on, skipped in the other 15."""
    rng = np.random.default_rng(2)
    n = 3_000
    codes = (np.ones((n, 128)) + 1e-3 * rng.standard_normal((n, 128))).astype(np.float32)
    codes = (codes / np.linalg.norm(codes, axis=1, keepdims=True)).astype(np.float16)
    hashes = np.zeros((n, 16), np.uint8)
    keys = [f"{i:05d}" for i in range(n)]
    stats = SearchStats()
    found = group_duplicates(keys, hashes, codes, DedupOptions(), stats)
    assert found == {k: keys[0] for k in keys[1:]}
    assert stats.joined_buckets_skipped == DedupOptions().bands - 1
    assert stats.pairs_compared < 2 * n * n  # one band's blocks (1,024 x 1,024 each), not sixteen
