"""The paper's near-duplicate pass on planted near-duplicates, and conversion skipping them."""

import json

import numpy as np
from conftest import run_dcgan

from data_shards.convert import ConvertOptions, convert, load_skip_keys
from data_shards.dedup import DedupOptions, find_near_duplicates, group_duplicates, recall_and_false_positive_rate
from data_shards.sources import open_source


def test_semantic_hashing_finds_planted_near_duplicates(lsun_lmdb, tmp_path):
    path, planted = lsun_lmdb
    source = open_source("lsun", path)
    found = find_near_duplicates(source, DedupOptions(train_samples=700, train_steps=300, workers=2))
    keys = list(source.scan_keys())
    recall, _ = recall_and_false_positive_rate(found, planted.near_duplicates, keys)
    # exact duplicates are near-duplicates too: leave them out of the false-positive count
    _, fpr = recall_and_false_positive_rate(found, {**planted.near_duplicates, **planted.exact_duplicates}, keys)
    print(f"near-duplicate recall {recall:.3f}, false-positive rate {fpr:.4f}")
    assert recall >= 0.9 and fpr <= 0.02


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
    m = convert("lsun", path, tmp_path / "out", ConvertOptions(resolution=32, shard_size=300, workers=2,
                                                               skip_keys=load_skip_keys(dups)), progress=False)
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert all(reasons[d["key"]].startswith(f"near-duplicate of {d['of']}") for d in listed
               if d["key"] not in planted.corrupt)
    assert m.total == 672 - len(planted.corrupt) - len(reasons.keys() - set(planted.corrupt))
