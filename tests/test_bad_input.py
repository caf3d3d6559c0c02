"""Every bad input README's table lists, through the real command line (in this process: each
case fails before anything starts a rank): exit 2, one line that says what is wrong, no traceback.

Cases that need a rank or Ray to fail (a shard set too small for a batch, an unreachable Ray
address) are tested where those run (test_train, test_cluster)."""

from __future__ import annotations

import json
import os
import shutil

import lmdb
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from cluster.cli import main

PRESET = str(ROOT / "configs" / "fashion-mnist-32.toml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fashion_shards):
    """Damaged and misplaced inputs, each made with the real tools and then broken."""
    root = tmp_path_factory.mktemp("bad")
    (root / "good-shards").symlink_to(fashion_shards)
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "bad.toml").write_text("[optim\nlr = 1")
    (root / "flat.toml").write_text("lr = 1e-4\n")
    (root / "typo.toml").write_text("[optim]\nlearnig_rate = 1e-4\n")
    manifest = json.loads((fashion_shards / "manifest.json").read_text())

    def edited(name, change):
        folder = root / name
        shutil.copytree(fashion_shards, folder)
        data = json.loads(json.dumps(manifest))
        text = change(data)
        (folder / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(data))
        return folder

    edited("manifest-not-json", lambda d: "{\"format\": ")
    edited("manifest-wrong-format", lambda d: d.update(format="something-else"))
    edited("manifest-no-shards", lambda d: d.update(shards=[]))
    edited("manifest-missing-shard", lambda d: d["shards"].append({**d["shards"][0], "name": "shard-999999.tar"}))
    edited("manifest-wrong-field", lambda d: d["shards"][0].update(colour="blue"))
    edited("manifest-count-text", lambda d: d["shards"][0].update(count="many"))
    # an LMDB that is not LSUN's layout: values that are no images
    env = lmdb.open(str(root / "not-lsun"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(20):
            txn.put(f"key-{i}".encode(), json.dumps({"i": i}).encode())
    env.close()
    env = lmdb.open(str(root / "empty-lmdb"), map_size=1 << 20)
    env.close()
    (root / "folder-of-text" / "class-a").mkdir(parents=True)
    (root / "folder-of-text" / "class-a" / "notes.jpg").write_text("not an image")
    (root / "fmnist-garbage").mkdir()
    (root / "fmnist-garbage" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    (root / "fmnist-garbage" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "image.png")
    return root


def train(*extra: str) -> list[str]:
    """`dcgan train` on the good shard set (a later --set wins), run folder and all in the test's folder."""
    return ["train", "--config", PRESET, "--launcher", "torchrun", "--set", "logging.progress=false",
            "--set", "data.shards=good-shards", "--set", "logging.run_dir=run", *extra]


# (case, argv builder, what the one line must say)
CASES = [
    ("value above its range", lambda p: train("--set", "optim.lr=5"), "optim.lr = 5.0 is out of range"),
    ("value below its range", lambda p: train("--set", "optim.batch_size=0"), "optim.batch_size = 0 is out of range"),
    ("value at a range's open end", lambda p: train("--set", "optim.beta1=1.0"), "must be in [0, 1)"),
    ("value not among the choices", lambda p: train("--set", "model.resolution=48"), "one of 32, 64, 128"),
    ("dtype not known", lambda p: train("--set", "precision.dtype=fp8"), "precision.dtype = 'fp8' is out of range"),
    ("loader not known", lambda p: train("--set", "data.loader=ffcv"), "data.loader = 'ffcv' is out of range"),
    ("ZeRO stage 3", lambda p: train("--set", "precision.zero_stage=3"), "precision.zero_stage = 3 is out of range"),
    ("negative memory budget", lambda p: train("--set", "data.device_memory_gib=-1"), "is out of range"),
    ("port below 1024", lambda p: train("--set", "metrics.port=80"), "metrics.port = 80 is out of range"),
    ("text for a number", lambda p: train("--set", "optim.lr=fast"), "optim.lr must be float, got 'fast'"),
    ("fraction for an int", lambda p: train("--set", "optim.batch_size=1.5"), "optim.batch_size must be int"),
    ("number for a bool", lambda p: train("--set", "model.compile=1"), "model.compile must be bool"),
    ("bool for an int", lambda p: train("--set", "optim.max_steps=true"), "optim.max_steps must be int"),
    ("unknown key", lambda p: train("--set", "optim.learnig_rate=1"), "unknown config key 'optim.learnig_rate'"),
    ("unknown section", lambda p: train("--set", "optimiser.lr=1"), "unknown config key 'optimiser.lr'"),
    ("override without =", lambda p: train("--set", "optim.lr"), "must look like section.key=value"),
    ("missing config file", lambda p: ["train", "--config", str(p / "none.toml")], "config file not found"),
    ("config not TOML", lambda p: ["train", "--config", str(p / "bad.toml")], "not valid TOML"),
    ("config key outside a section", lambda p: ["train", "--config", str(p / "flat.toml")], "must be a [section]"),
    ("config key misspelt", lambda p: ["train", "--config", str(p / "typo.toml")], "valid keys: model.resolution"),
    ("a config folder", lambda p: ["train", "--config", str(p)], "is a folder; give a TOML file"),
    ("missing shard folder", lambda p: train("--set", f"data.shards={p / 'none'}"), "does not exist"),
    ("a file for the shard folder", lambda p: train("--set", f"data.shards={p / 'a-file'}"), "is a file"),
    ("empty shard folder", lambda p: train("--set", f"data.shards={p / 'empty'}"), "has no manifest.json"),
    ("manifest not JSON", lambda p: train("--set", f"data.shards={p / 'manifest-not-json'}"), "unreadable manifest"),
    ("manifest of another format", lambda p: train("--set", f"data.shards={p / 'manifest-wrong-format'}"),
     "format 'something-else'"),
    ("manifest without shards", lambda p: train("--set", f"data.shards={p / 'manifest-no-shards'}"),
     "holds no samples"),
    ("manifest naming a missing shard", lambda p: train("--set", f"data.shards={p / 'manifest-missing-shard'}"),
     "lacks 1 shard(s)"),
    ("manifest with an unknown field", lambda p: train("--set", f"data.shards={p / 'manifest-wrong-field'}"),
     "unreadable manifest"),
    ("manifest with a count that is text", lambda p: train("--set", f"data.shards={p / 'manifest-count-text'}"),
     "unreadable manifest"),
    ("shards of another resolution", lambda p: train("--set", "model.resolution=64"),
     "convert again with --resolution"),
    ("missing resume path", lambda p: train("--resume", str(p / "none")), "does not exist"),
    ("a resume path with no checkpoint", lambda p: train("--resume", str(p / "empty")), "no complete checkpoint"),
    ("sample from a missing checkpoint", lambda p: ["sample", "--checkpoint", str(p / "none")], "does not exist"),
    ("sample from a file", lambda p: ["sample", "--checkpoint", str(p / "a-file")], "checkpoint"),
    ("sample from an empty folder", lambda p: ["sample", "--checkpoint", str(p / "empty")], "no complete checkpoint"),
    ("convert a missing LMDB", lambda p: ["data", "convert", "--source", "lsun", "--input", str(p / "none"),
                                          "--out", str(p / "out-1")], "none"),
    ("convert an LMDB that is not LSUN's", lambda p: ["data", "convert", "--source", "lsun", "--input",
                                                      str(p / "not-lsun"), "--out", str(p / "out-2"), "--quiet"],
     "no image"),
    ("convert an empty LMDB", lambda p: ["data", "convert", "--source", "lsun", "--input", str(p / "empty-lmdb"),
                                         "--out", str(p / "out-3"), "--quiet"], "no "),
    ("convert a folder of no images", lambda p: ["data", "convert", "--source", "folder", "--input",
                                                 str(p / "folder-of-text"), "--out", str(p / "out-4"), "--quiet"],
     "no image"),
    ("convert an empty folder", lambda p: ["data", "convert", "--source", "folder", "--input", str(p / "empty"),
                                           "--out", str(p / "out-5"), "--quiet"], "no "),
    ("convert IDX files that are garbage", lambda p: ["data", "convert", "--source", "fashion-mnist", "--input",
                                                      str(p / "fmnist-garbage"), "--out", str(p / "out-6")],
     "fmnist-garbage"),
    ("convert into a file", lambda p: ["data", "convert", "--source", "folder", "--input", str(p / "folder-of-text"),
                                       "--out", str(p / "a-file")], "a-file"),
    ("convert to a resolution the model has not", lambda p: ["data", "convert", "--source", "fashion-mnist", "--out",
                                                             str(p / "out-7"), "--resolution", "0"], "resolution"),
    ("convert with a bad part", lambda p: ["data", "convert", "--source", "fashion-mnist", "--out", str(p / "out-8"),
                                           "--part", "3/2"], "part"),
    ("convert with shard size 0", lambda p: ["data", "convert", "--source", "fashion-mnist", "--out",
                                             str(p / "out-9"), "--shard-size", "0"], "shard"),
]


@pytest.mark.parametrize("case, argv, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, argv, says, inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs)  # anything a case writes by mistake lands in the test's folder
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RANK"})
    assert main(argv(inputs)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcgan: error: "), err
    assert says in lines[0], lines[0]
    if os.environ.get("DCGAN_BAD_INPUT_TABLE"):  # README's table is printed from these very runs
        with open(os.environ["DCGAN_BAD_INPUT_TABLE"], "a") as table:
            table.write(f"| {case} | `{lines[0].removeprefix('dcgan: error: ').replace(str(inputs) + '/', '')}` |\n")


ARG_CASES = [
    ("text for --nproc", ["train", "--nproc", "two"], "invalid int value: 'two'"),
    ("text for --workers", ["train", "--workers", "x"], "invalid int value: 'x'"),
    ("unknown launcher", ["train", "--launcher", "slurm"], "invalid choice: 'slurm'"),
    ("text for --n", ["sample", "--checkpoint", "x", "--n", "many"], "invalid int value: 'many'"),
    ("unknown encoding", ["data", "convert", "--out", "x", "--encoding", "webp"], "invalid choice: 'webp'"),
    ("text for --resolution", ["data", "convert", "--out", "x", "--resolution", "big"], "invalid int value"),
    ("convert without --out", ["data", "convert"], "the following arguments are required: --out"),
    ("unknown command", ["fly"], "invalid choice: 'fly'"),
    ("unknown option", ["train", "--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
]


@pytest.mark.parametrize("case, argv, says", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_arguments_get_usage_and_one_error_line(case, argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and says in err.splitlines()[-1], err
