"""Every bad input README's table lists, through the real command line: exit 2, one line that says
what is wrong, no traceback. Besides the table's cases, every option and positional of every
command, found by walking the parser `dcgan` builds, is fed a value of the wrong type, one out of
its range and one outside its choices.

Each table row's quoted line is checked against what its case prints now, so the README cannot
drift from the code. Most cases run in this process (each fails before anything starts a rank);
unreadable folders run the real command in a subprocess without the capabilities that let root
read anything. Cases that need a rank or Ray to fail (a shard set too small for a batch, an
unreachable Ray address) are tested where those run (test_train, test_cluster)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import ROOT, child_env
from PIL import Image

from common.arguments import Checked
from dcgan.cli import build_parser, main

PRESET = str(ROOT / "configs" / "fashion-mnist-32.toml")
# chmod 000 in the inputs folder
LOCKED = ("locked-images", "locked-out", "locked-shards", "locked-run", "images-with-a-locked-class/b")


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
    (root / "not-json.json").write_text("duplicates: none\n")
    (root / "other-json.json").write_text(json.dumps({"keys": []}))
    _edited_manifests(root, fashion_shards)
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
    (root / "locked-images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "locked-images" / "image.png")
    shutil.copytree(fashion_shards, root / "locked-shards")
    (root / "locked-out").mkdir()
    (root / "locked-run").mkdir()
    for name in ("a", "b"):  # a class folder that cannot be listed must not vanish from the set unnoticed
        (root / "images-with-a-locked-class" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images-with-a-locked-class" / name / "image.png")
    for name in LOCKED:
        (root / name).chmod(0)
    yield root
    for name in LOCKED:
        (root / name).chmod(0o700)


def _edited_manifests(root: Path, shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())

    def edited(name, change):
        folder = root / name
        shutil.copytree(shards, folder)
        data = json.loads(json.dumps(manifest))
        text = change(data)
        (folder / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(data))

    edited("manifest-not-json", lambda d: "{\"format\": ")
    edited("manifest-wrong-format", lambda d: d.update(format="something-else"))
    edited("manifest-no-shards", lambda d: d.update(shards=[]))
    edited("manifest-missing-shard", lambda d: d["shards"].append({**d["shards"][0], "name": "shard-999999.tar"}))
    edited("manifest-wrong-field", lambda d: d["shards"][0].update(colour="blue"))
    edited("manifest-count-text", lambda d: d["shards"][0].update(count="many"))


def train(*extra: str) -> list[str]:
    """`dcgan train` on the good shard set (a later --set wins), run folder and all in the test's folder."""
    return ["train", "--config", PRESET, "--launcher", "torchrun", "--set", "logging.progress=false",
            "--set", "data.shards=good-shards", "--set", "logging.run_dir=run", *extra]


def convert(*extra: str) -> list[str]:
    return ["data", "convert", "--quiet", *extra]


def dedup(*extra: str) -> list[str]:
    return ["data", "dedup", "--quiet", *extra]


# --- README's table: each row's line must be what its case prints now ----------------------------
ROW = re.compile(r"^\| (?P<case>[^|]+?) \| `` (?P<line>.*) `` \|$")


def readme_rows() -> dict[str, str]:
    """README's bad-input table: case -> the line it quotes."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Bad input"):]
    section = section[:section.find("\n## ")]
    rows = {}
    for line in section.splitlines():
        if match := ROW.match(line):
            assert match["case"] not in rows, f"README's bad-input table lists {match['case']!r} twice"
            rows[match["case"]] = match["line"].replace("\\|", "|")
    return rows


README_ROWS = readme_rows()


def shown(line: str, folder: Path) -> str:
    """The line as README shows it: without `dcgan CMD: error: `, paths relative to the test's folder."""
    line = re.sub(r"^dcgan[\w -]*: error: ", "", line)
    return line.replace(f"{folder}/", "").replace(str(folder), ".")


def quoted_line_matches(row: str, line: str) -> bool:
    """README's line equals the printed one, where `...` in README stands for any text left out."""
    pieces = row.split("...")
    if not (line.startswith(pieces[0]) and line.endswith(pieces[-1])):
        return False
    at = 0
    for piece in pieces:
        found = line.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return len(pieces) > 1 or row == line


def check_against_readme(case: str, line: str, folder: Path) -> None:
    text = shown(line, folder)
    if os.environ.get("DCGAN_BAD_INPUT_TABLE"):  # README's table is printed from these very runs
        with open(os.environ["DCGAN_BAD_INPUT_TABLE"], "a") as table:
            table.write(f"| {case} | `` {text.replace('|', chr(92) + '|')} `` |\n")
    assert case in README_ROWS, f"README's bad-input table has no row {case!r}; this case prints: {text}"
    assert quoted_line_matches(README_ROWS[case], text), \
        f"README's row {case!r} quotes\n  {README_ROWS[case]}\nbut the command prints\n  {text}"


# --- bad input the command finds: `dcgan: error: ...`, exit 2 ---------------------------------------
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
    ("a config folder", lambda p: ["train", "--config", str(p / "empty")], "is a folder; give a TOML file"),
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
    ("sample arithmetic without --c", lambda p: ["sample", "arithmetic", "--checkpoint", str(p / "empty"),
                                                 "--a", "1", "--b", "2"], "needs --a, --b and --c"),
    ("eval fid from an empty folder", lambda p: ["eval", "fid", "--checkpoint", str(p / "empty"), "--shards",
                                                 str(p / "good-shards")], "no complete checkpoint"),
    ("eval fid against an empty shard folder", lambda p: ["eval", "fid", "--checkpoint", str(p / "empty"),
                                                          "--shards", str(p / "empty")], "has no manifest.json"),
    ("eval fid of one image", lambda p: ["eval", "fid", "--checkpoint", str(p / "empty"), "--shards",
                                         str(p / "empty"), "--n", "1"], "too small for KID subsets"),
    ("eval features from an empty folder", lambda p: ["eval", "features", "--checkpoint", str(p / "empty")],
     "no complete checkpoint"),
    ("eval features from a file", lambda p: ["eval", "features", "--checkpoint", str(p / "a-file")],
     "no complete checkpoint"),
    ("monitor with a missing config", lambda p: ["monitor", "--config", str(p / "none.toml")], "config file not found"),
    ("monitor with a config folder", lambda p: ["monitor", "--config", str(p / "empty")], "is a folder"),
    ("verify a missing folder", lambda p: ["data", "verify", str(p / "none")], "does not exist"),
    ("verify a file", lambda p: ["data", "verify", str(p / "a-file")], "is a file"),
    ("verify an empty folder", lambda p: ["data", "verify", str(p / "empty")], "has no manifest.json"),
    ("verify a manifest that is not JSON", lambda p: ["data", "verify", str(p / "manifest-not-json")],
     "unreadable manifest"),
    ("convert a missing LMDB", lambda p: convert("--source", "lsun", "--input", str(p / "none"),
                                                 "--out", str(p / "out-1")), "none"),
    ("convert an LMDB that is not LSUN's", lambda p: convert("--source", "lsun", "--input", str(p / "not-lsun"),
                                                             "--out", str(p / "out-2")), "no image"),
    ("convert an empty LMDB", lambda p: convert("--source", "lsun", "--input", str(p / "empty-lmdb"),
                                                "--out", str(p / "out-3")), "holds no items"),
    ("convert a folder of no images", lambda p: convert("--source", "folder", "--input", str(p / "folder-of-text"),
                                                        "--out", str(p / "out-4")), "no image"),
    ("convert an empty folder", lambda p: convert("--source", "folder", "--input", str(p / "empty"),
                                                  "--out", str(p / "out-5")), "holds no items"),
    ("convert IDX files that are garbage", lambda p: convert("--source", "fashion-mnist", "--input",
                                                             str(p / "fmnist-garbage"), "--out", str(p / "out-6")),
     "fmnist-garbage"),
    ("convert into a file", lambda p: convert("--source", "folder", "--input", str(p / "folder-of-text"),
                                              "--out", str(p / "a-file")), "a-file"),
    ("convert with a missing duplicate list", lambda p: convert("--out", str(p / "out-7"), "--skip-keys",
                                                                str(p / "none.json")), "does not exist"),
    ("convert with a duplicate list that is not JSON", lambda p: convert("--out", str(p / "out-8"), "--skip-keys",
                                                                         str(p / "not-json.json")),
     "not a duplicate list"),
    ("convert with a duplicate list of another shape", lambda p: convert("--out", str(p / "out-9"), "--skip-keys",
                                                                         str(p / "other-json.json")),
     "not a duplicate list"),
    ("convert with a folder for the duplicate list", lambda p: convert("--out", str(p / "out-10"), "--skip-keys",
                                                                       str(p / "empty")), "is a folder"),
    ("dedup an empty folder", lambda p: dedup("--source", "folder", "--input", str(p / "empty"),
                                              "--out", str(p / "dups-1.json")), "holds no items"),
    ("dedup an empty LMDB", lambda p: dedup("--source", "lsun", "--input", str(p / "empty-lmdb"),
                                            "--out", str(p / "dups-2.json")), "holds no items"),
    ("dedup a missing LMDB", lambda p: dedup("--source", "lsun", "--input", str(p / "none"),
                                             "--out", str(p / "dups-3.json")), "not an LMDB folder"),
    ("dedup into a folder", lambda p: dedup("--source", "lsun", "--input", str(p / "empty-lmdb"),
                                            "--out", str(p / "empty")), "is a folder"),
    ("dedup into a missing folder", lambda p: dedup("--source", "lsun", "--input", str(p / "empty-lmdb"),
                                                    "--out", str(p / "none" / "dups.json")), "does not exist"),
    ("sample-lsun into a file", lambda p: ["data", "sample-lsun", "--out", str(p / "a-file"), "--n", "2"],
     "is a file"),
    ("sample-lsun with more copies than images", lambda p: ["data", "sample-lsun", "--out", str(p / "lmdb-1"),
                                                            "--n", "2", "--near-duplicates", "2",
                                                            "--exact-duplicates", "1"], "more than --n 2"),
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
    check_against_readme(case, lines[0], inputs)


# --- bad arguments argparse refuses: the command's usage, then one error line, exit 2 ----------------
ARG_CASES = [
    ("text for --nproc", ["train", "--nproc", "two"], "argument --nproc: must be an integer >= 1, got 'two'"),
    ("text for --workers", ["train", "--workers", "x"], "argument --workers: must be an integer >= 0"),
    ("unknown launcher", ["train", "--launcher", "slurm"], "invalid choice: 'slurm'"),
    ("sample --n -1", ["sample", "--checkpoint", "x", "--n", "-1"], "argument --n: must be an integer >= 1"),
    ("text for sample --n", ["sample", "--checkpoint", "x", "--n", "many"], "argument --n: must be an integer"),
    ("a seed beyond 2**32 - 1", ["sample", "--checkpoint", "x", "--seed", str(2**32)], "argument --seed"),
    ("an interpolation of one step", ["sample", "interpolate", "--checkpoint", "x", "--steps", "1"],
     "argument --steps: must be an integer >= 2"),
    ("unknown sample mode", ["sample", "--checkpoint", "x", "walk"], "argument mode: invalid choice: 'walk'"),
    ("unknown feature source", ["eval", "features", "--checkpoint", "x", "--sources", "trained,gan"],
     "argument --sources"),
    ("one cross-validation fold", ["eval", "features", "--checkpoint", "x", "--folds", "1"], "argument --folds"),
    ("eval fid --n 0", ["eval", "fid", "--checkpoint", "x", "--shards", "y", "--n", "0"], "argument --n"),
    ("convert --workers -2", ["data", "convert", "--out", "x", "--workers", "-2"], "argument --workers"),
    ("convert --quality 500", ["data", "convert", "--out", "x", "--quality", "500"], "argument --quality"),
    ("convert --limit -5", ["data", "convert", "--out", "x", "--limit", "-5"], "argument --limit"),
    ("convert to a resolution below 8", ["data", "convert", "--out", "x", "--resolution", "0"],
     "argument --resolution"),
    ("convert with shard size 0", ["data", "convert", "--out", "x", "--shard-size", "0"], "argument --shard-size"),
    ("convert with a part past the last", ["data", "convert", "--out", "x", "--part", "3/2"], "argument --part"),
    ("convert with a part that is no fraction", ["data", "convert", "--out", "x", "--part", "half"],
     "argument --part"),
    ("convert to 2 channels", ["data", "convert", "--out", "x", "--channels", "2"], "invalid choice: 2"),
    ("unknown encoding", ["data", "convert", "--out", "x", "--encoding", "webp"], "invalid choice: 'webp'"),
    ("text for --resolution", ["data", "convert", "--out", "x", "--resolution", "big"], "argument --resolution"),
    ("dedup --max-cosine nan", ["data", "dedup", "--out", "x", "--max-cosine", "nan"], "argument --max-cosine"),
    ("dedup --max-hamming beyond the hash", ["data", "dedup", "--out", "x", "--max-hamming", "129"],
     "argument --max-hamming"),
    ("sample-lsun --n -1", ["data", "sample-lsun", "--out", "x", "--n", "-1"], "argument --n"),
    ("verify --workers -1", ["data", "verify", "x", "--workers", "-1"], "argument --workers"),
    ("monitor --scrape-interval without a unit", ["monitor", "--scrape-interval", "5"], "argument --scrape-interval"),
    ("monitor --port beyond the last", ["monitor", "--port", "65500"], "argument --port"),
    ("convert without --out", ["data", "convert"], "the following arguments are required: --out"),
    ("unknown command", ["fly"], "invalid choice: 'fly'"),
    ("unknown option", ["train", "--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
]


def assert_usage_and_one_error_line(err: str, command: str, says: str) -> str:
    """argparse's refusal: the command's usage, one `error:` line (the last), no traceback; returns that line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: {command} ") or lines[0] == f"usage: {command}", err
    errors = [line for line in lines if ": error: " in line]
    assert errors == [lines[-1]] and lines[-1].startswith(f"{command}: error: "), err
    assert says in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("case, argv, says", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_arguments_get_usage_and_one_error_line(case, argv, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    # the usage and the error name the sub-command; an option no command knows is `dcgan`'s own error
    command = "dcgan" if case == "unknown option" else " ".join(("dcgan", *command_path(argv)))
    check_against_readme(case, assert_usage_and_one_error_line(err, command, says), tmp_path)


# --- every argument of every command, found by walking the parser ------------------------------------
def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                       argparse.ArgumentParser]]:
    """(path, parser) of `dcgan` and every command under it, sub-commands included."""
    found = [(path, parser)]
    for action in parser._actions:  # argparse has no public walk; these attributes have been stable since 3.2
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    return found


PARSER = build_parser()  # parsing changes nothing in it: one serves every case
COMMANDS = commands(PARSER)


def command_path(argv: list[str]) -> tuple[str, ...]:
    """The words of argv that name a command: ("data", "convert") of `data convert --out x`."""
    known, path = {path for path, _ in COMMANDS}, ()
    for word in argv:
        if (*path, word) not in known:
            break
        path = (*path, word)
    return path


def option_name(action: argparse.Action) -> str:
    """How argparse names the argument in its errors."""
    return "/".join(action.option_strings) or action.metavar or action.dest


def filler(parser: argparse.ArgumentParser, skip: argparse.Action) -> list[str]:
    """Values for the command's required arguments, so that the one bad value is the only thing wrong."""
    argv = []
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._SubParsersAction) or not action.required:
            continue
        argv += [f"{action.option_strings[0]}=x"] if action.option_strings else ["x"]
    return argv


def bad_values(action: argparse.Action) -> list[tuple[str, str]]:
    """(text, what the error must say) for every wrong value the argument's type and choices imply."""
    bad = []
    if isinstance(action.type, Checked):
        bad += [(text, f"must be {action.type.wants}, got {text!r}") for text in action.type.refused]
    if action.choices is not None:
        ints = [c for c in action.choices if isinstance(c, int)]
        text = str(max(ints) + 1) if ints else "bogus"
        bad.append((text, f"invalid choice: {int(text) if ints else repr(text)}"))
    return bad


ARGUMENT_CASES = [
    (path, parser, action, text, says)
    for path, parser in COMMANDS for action in parser._actions for text, says in bad_values(action)]


@pytest.mark.parametrize("path, parser, action, text, says", ARGUMENT_CASES,
                         ids=[f"{' '.join(('dcgan', *c[0]))} {option_name(c[2])}={c[3]!r}" for c in ARGUMENT_CASES])
def test_every_argument_refuses_wrong_values(path, parser, action, text, says, capsys):
    value = [f"{action.option_strings[0]}={text}"] if action.option_strings else [text]
    rest = [] if isinstance(action, argparse._SubParsersAction) else filler(parser, action)
    with pytest.raises(SystemExit) as stop:
        PARSER.parse_known_args([*path, *value, *rest])  # parse only: a value let through runs nothing
    assert stop.value.code == 2
    command = " ".join(("dcgan", *path))
    assert_usage_and_one_error_line(capsys.readouterr().err, command, f"argument {option_name(action)}: {says}")


def in_range(kind: Checked, default: object) -> bool:
    if not isinstance(default, str):  # argparse passes only a text default through the type
        return kind.accepts(default)
    try:
        kind(default)
    except argparse.ArgumentTypeError:
        return False
    return True


def test_every_typed_argument_checks_its_range():
    """A plain int or float would take -1 or nan into the run; every default must lie in its own range."""
    unchecked, bad_defaults = [], []
    for path, parser in COMMANDS:
        for action in parser._actions:
            where = f"{' '.join(('dcgan', *path))} {option_name(action)}"
            if action.type is not None and not isinstance(action.type, Checked):
                unchecked.append(f"{where} (type={action.type!r})")
            elif isinstance(action.type, Checked) and action.default not in (None, argparse.SUPPRESS):
                if not in_range(action.type, action.default):
                    bad_defaults.append(f"{where} (default {action.default!r})")
    assert not unchecked, "arguments without a common.arguments type: " + ", ".join(unchecked)
    assert not bad_defaults, "defaults out of their own range: " + ", ".join(bad_defaults)
    assert len(ARGUMENT_CASES) > 100  # the walk found the commands' arguments


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS if path[:1] != ("bench",)],
                         ids=lambda path: " ".join(("dcgan", *path)))
def test_help_usage_names_the_command(path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*path, "--help"])
    assert stop.value.code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"usage: {' '.join(('dcgan', *path))} [-h]"), first


def test_readme_lists_every_case_and_no_other():
    cases = {c[0] for c in CASES} | {c[0] for c in ARG_CASES} | {c[0] for c in UNREADABLE_CASES}
    assert set(README_ROWS) == cases, (f"cases without a README row: {sorted(cases - set(README_ROWS))}; "
                                       f"README rows without a case: {sorted(set(README_ROWS) - cases)}")


# --- unreadable folders: the real command, without root's power to read anything --------------------
UNREADABLE_CASES = [
    ("convert an unreadable folder", convert("--source", "folder", "--input", "locked-images", "--out", "out-u1"),
     "cannot read locked-images: permission denied"),
    ("convert into an unreadable folder", convert("--source", "folder", "--input", "folder-of-text",
                                                  "--out", "locked-out"),
     "locked-out/manifest.json: permission denied"),
    ("train on an unreadable shard folder", train("--set", "data.shards=locked-shards"),
     "locked-shards/manifest.json: permission denied"),
    ("train into an unreadable run folder", train("--set", "logging.run_dir=locked-run"),
     "locked-run/checkpoints: permission denied"),
    ("convert a folder with an unreadable class folder",
     convert("--source", "folder", "--input", "images-with-a-locked-class", "--out", "out-u2"),
     "images-with-a-locked-class/b: permission denied"),
    ("verify an unreadable shard folder", ["data", "verify", "locked-shards"],
     "cannot read locked-shards: permission denied"),
]
# root reads any folder while it holds these capabilities; the runs drop them (util-linux's setpriv)
DROP_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def without_dac(folder: Path) -> list[str] | None:
    """The prefix that runs a command unable to read a chmod 000 folder, or None where there is none."""
    prefix = DROP_DAC if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        return None
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                            str(folder / "locked-out")], capture_output=True, text=True, timeout=60)
    return prefix if "PermissionError" in probe.stderr else None


@pytest.fixture(scope="module")
def unreadable_runs(inputs):
    """Every unreadable-folder case at once (each is a fresh interpreter: seconds of imports)."""
    prefix = without_dac(inputs)
    if prefix is None:
        pytest.skip("no way to run without reading every folder here: running as root and setpriv cannot drop "
                    "CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH")
    env = {k: v for k, v in child_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    started = {case: subprocess.Popen([*prefix, sys.executable, "-m", "dcgan", *argv], cwd=inputs, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for case, argv, _ in UNREADABLE_CASES}
    finished = {case: process.communicate(timeout=300)[1] for case, process in started.items()}
    return {case: (started[case].returncode, err) for case, err in finished.items()}


@pytest.mark.parametrize("case, argv, says", UNREADABLE_CASES, ids=[c[0] for c in UNREADABLE_CASES])
def test_unreadable_folder_is_one_line(case, argv, says, unreadable_runs, inputs):
    code, err = unreadable_runs[case]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert says in errors[0], errors[0]
    check_against_readme(case, errors[0], inputs)
