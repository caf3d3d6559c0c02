"""Damaged data at read and write time: shards cut short or changed after conversion, a sample that
no longer decodes, a disk that fills up during conversion, a conversion killed mid-write."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, ArraySource, run_dcgan, tiny_train_args

from data_shards.convert import PROGRESS, ConversionError, ConvertOptions, convert_source
from data_shards.device_loader import DeviceLoader
from data_shards.loader import WORKER_RESTARTS, ShardLoader, WorkerDeaths
from data_shards.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_shards
from dcgan.cli import main

N, SHARD = 300, 50  # 6 shards of 50 grey 32x32 PNGs; a sample's label is its index
BATCH = 10


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 28, 28, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine")
    convert_source(ArraySource(images(N)), out, ConvertOptions(resolution=32, channels=1, shard_size=SHARD, workers=2),
                   progress=False)
    return out


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A copy of the set for one test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def cut_inside_image_of(path: Path, sample: int) -> None:
    """Truncate the shard in the middle of the image bytes of its `sample`-th sample."""
    image = [m for m in members(path) if m.name.endswith(".png")][sample]
    os.truncate(path, image.offset_data + image.size // 2)


def whole_samples(path: Path, pristine_path: Path) -> set[str]:
    """The keys of `path` whose every member can be read in full, by tarfile alone (no WebDataset)."""
    wanted: dict[str, set[str]] = {}
    for m in members(pristine_path):
        key, ext = m.name.split(".", 1)
        wanted.setdefault(key, set()).add(ext)
    read: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for m in tar:
                data = tar.extractfile(m).read()
                if len(data) == m.size:
                    key, ext = m.name.split(".", 1)
                    read.setdefault(key, set()).add(ext)
    except tarfile.TarError:
        pass  # where the cut is
    return {key for key, exts in read.items() if exts == wanted.get(key)}


def label(key: str) -> int:
    return int(key.lstrip("k"))


def shard_loader(folder: Path, workers: int = 0, **kw) -> ShardLoader:
    return ShardLoader(folder, rank=0, world_size=1, batch_size=BATCH, seed=0, channels=1, resolution=32,
                       num_workers=workers, shuffle_buffer=64, **kw)


def device_loader(folder: Path) -> DeviceLoader:
    return DeviceLoader(folder, rank=0, world_size=1, batch_size=BATCH, seed=0, channels=1, resolution=32,
                        num_workers=0, device="cpu")


def labels_of(batches) -> list[int]:
    return [int(v) for _, labels in batches for v in labels]


# --- 1. a shard cut short: the samples it lost are counted, every other one is trained on ---------------------
@pytest.fixture
def cut(shards, pristine) -> tuple[Path, set[int]]:
    """Shard 2 cut inside the image of its sample 30: returns the folder and the labels it lost, as
    tarfile reads the cut file against the manifest."""
    name = "shard-000002.tar"
    cut_inside_image_of(shards / name, 30)
    manifest = read_manifest(shards)
    before = {m.name.split(".", 1)[0] for m in members(pristine / name)}
    whole = whole_samples(shards / name, pristine / name)
    count = next(s.count for s in manifest.shards if s.name == name)
    assert len(before) == count == SHARD and len(whole) == 30
    return shards, {label(k) for k in before - whole}


def test_webdataset_loader_counts_the_samples_a_cut_shard_lost(cut, caplog):
    folder, lost = cut
    everything_else = set(range(N)) - lost
    with caplog.at_level(logging.WARNING, logger="data_shards.loader"):
        ld = shard_loader(folder, workers=2)
    assert "shard-000002.tar: size" in caplog.text and "dcgan data verify" in caplog.text
    batches = list(ld.batches(0))
    assert len(batches) == ld.steps_per_epoch(0) == N // BATCH  # a worker short of batches tops up
    assert ld.skipped == len(lost) == 20
    assert set(labels_of(batches)) == everything_else
    # resuming drops the first 7 batches before decoding them: they are read, not lost
    resumed = shard_loader(folder)
    tail = list(resumed.batches(0, start_step=7))
    assert len(tail) == N // BATCH - 7 and resumed.skipped == len(lost)
    again = shard_loader(folder)
    list(again.batches(0))
    list(again.batches(1))
    assert again.skipped == 2 * len(lost)  # counted once per epoch, whatever the top-up re-read
    ranks = [ShardLoader(folder, rank=r, world_size=2, batch_size=BATCH, seed=0, channels=1, resolution=32,
                         num_workers=1, shuffle_buffer=64) for r in range(2)]
    assert [len(list(ld.batches(0))) for ld in ranks] == [N // BATCH // 2] * 2
    assert sorted(ld.skipped for ld in ranks) == [0, len(lost)]  # the rank that holds the shard counts it


def test_dcgan_train_goes_on_over_a_cut_shard_and_logs_the_samples_it_lost(cut, tmp_path):
    """The real command (torchrun launcher, fp32) over the cut set: one epoch of 9 steps, of which the cut leaves
    8 batches and a top-up gives the 9th, so the stream has read every shard to its end by the last record."""
    folder, lost = cut
    run = tmp_path / "run"
    res = run_dcgan(*tiny_train_args(folder, run, "optim.max_steps=9", "logging.log_every=3",
                                     "precision.dtype=fp32", "metrics.enabled=false"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(f"{folder / 'shard-000002.tar'}: size") == 1  # named once, at start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9] and all(math.isfinite(r["loss_g"]) for r in records)
    skipped = [r["skipped_samples"] for r in records]
    assert skipped == sorted(skipped) and skipped[-1] == len(lost) == 20  # counted once, exactly what was lost
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())


def test_device_loader_counts_the_samples_a_cut_shard_lost(cut, caplog):
    folder, lost = cut
    with caplog.at_level(logging.WARNING, logger="data_shards.device_loader"):
        ld = device_loader(folder)
    assert "shard-000002.tar: size" in caplog.text
    assert ld.skipped == len(lost) and set(ld.labels.tolist()) == set(range(N)) - lost
    assert len(list(ld.batches(0))) == ld.steps_per_epoch(0) == N // BATCH


def test_a_killed_dataloader_worker_costs_time_not_data(pristine, caplog):
    """SIGKILL from outside to one of the rank's DataLoader workers mid-epoch: the stream is rebuilt where
    it was, so every batch is the one an undisturbed epoch delivers; in the main thread, as a rank runs."""
    reference = list(shard_loader(pristine, workers=2).batches(0))
    loader, ours = shard_loader(pristine, workers=2), psutil.Process()
    before = {p.pid for p in ours.children()}
    batches = []
    with caplog.at_level(logging.WARNING, logger="data_shards.loader"):
        for images_, labels in loader.batches(0):
            batches.append((images_, labels))
            if len(batches) == 5:
                workers = [p for p in ours.children() if p.pid not in before]
                assert len(workers) == 2
                workers[1].kill()  # not reaped here: its parent, the loader, is the one to find it dead
    assert len(batches) == len(reference) == N // BATCH
    for (a, la), (b, lb) in zip(batches, reference, strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)
    assert loader.worker_restarts == 1 and loader.skipped == 0
    # torch notices the death itself, or it cuts the connection a batch's tensor was being handed over on
    assert f"pid(s) {workers[1].pid}) exited unexpectedly" in caplog.text
    assert "its stream restarts at batch" in caplog.text


def live_children(process: psutil.Process) -> list[psutil.Process]:
    alive = []
    for child in process.children():
        with contextlib.suppress(psutil.NoSuchProcess):  # one just reaped
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


def epoch_killing_workers(loader: ShardLoader, kills: int) -> tuple[list, list[int], WorkerDeaths | None]:
    """Epoch 0 of `loader` (2 workers) in the main thread, as a rank runs it; SIGKILL from outside to one worker
    of each stream as soon as it delivers, `kills` times: (the batches, the pids killed, the error if one came)."""
    ours = psutil.Process()
    seen = {p.pid for p in live_children(ours)}
    batches: list = []
    killed: list[int] = []
    try:
        for images_, labels in loader.batches(0):
            batches.append((images_, labels))
            if len(killed) < kills and loader.worker_restarts == len(killed):  # the last death was recovered from
                workers = [p for p in live_children(ours) if p.pid not in seen]
                if len(workers) == 2:  # both workers of the stream now running
                    seen.update(p.pid for p in workers)
                    # with its prefetched batches queued, the death shows when the next is taken, not at
                    # torch's 5 s poll of its workers: the test is faster, what it checks the same
                    time.sleep(0.3)
                    victim = workers[len(killed) % 2]
                    subprocess.run(["kill", "-KILL", str(victim.pid)], check=True)
                    killed.append(victim.pid)
    except WorkerDeaths as e:
        return batches, killed, e
    return batches, killed, None


@pytest.mark.parametrize("kills", [WORKER_RESTARTS, WORKER_RESTARTS + 1])
def test_a_stream_restarts_at_most_worker_restarts_times_then_stops_in_one_line(pristine, caplog, kills):
    """Up to the limit every death costs time, not data; the death after it stops the rank's stream with one
    line naming the worker, after the batches an undisturbed epoch starts with."""
    reference = list(shard_loader(pristine, workers=2).batches(0))
    loader = shard_loader(pristine, workers=2)
    with caplog.at_level(logging.WARNING, logger="data_shards.loader"):
        batches, killed, error = epoch_killing_workers(loader, kills)
    assert len(killed) == kills and loader.worker_restarts == WORKER_RESTARTS and loader.skipped == 0
    restarts = [r.getMessage() for r in caplog.records if "its stream restarts" in r.getMessage()]
    assert len(restarts) == WORKER_RESTARTS  # one warning line a death, naming the worker killed
    for i, (line, pid) in enumerate(zip(restarts, killed, strict=False)):
        assert f"pid(s) {pid}) exited unexpectedly" in line and f"(restart {i + 1} of {WORKER_RESTARTS})" in line
    if kills == WORKER_RESTARTS:
        assert error is None and len(batches) == len(reference) == N // BATCH
    else:
        message = str(error)
        assert "\n" not in message and f"DataLoader worker (pid(s) {killed[-1]}) exited unexpectedly" in message
        assert f"has restarted {WORKER_RESTARTS} times already, the most allowed" in message
        assert 0 < len(batches) < len(reference)
    for (a, la), (b, lb) in zip(batches, reference[:len(batches)], strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_dali_leaves_out_a_shard_whose_size_changed_and_says_why(cut, caplog):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is installed with the dev extra")
    from data_shards.dali_loader import DaliLoader

    folder, _ = cut
    with caplog.at_level(logging.WARNING, logger="data_shards.dali_loader"):
        ld = DaliLoader(folder, rank=0, world_size=1, batch_size=BATCH, seed=0, channels=1, resolution=32,
                        num_workers=1, shuffle_buffer=64, device="cpu")
    assert ld.skipped == SHARD  # the whole shard: DALI's index would send its reader past the cut
    assert "shard-000002.tar: size" in caplog.text and "left out" in caplog.text
    seen = labels_of(ld.batches(0))
    assert len(seen) == (N - SHARD) // BATCH * BATCH and not set(seen) & set(range(100, 150))


# --- 2. bytes changed after conversion --------------------------------------------------------------------------
def test_verify_names_each_damaged_shard(shards, capsys):
    flipped = shards / "shard-000001.tar"
    image = [m for m in members(flipped) if m.name.endswith(".png")][10]
    with open(flipped, "r+b") as f:  # same size, other bytes
        f.seek(image.offset_data + 20)
        f.write(bytes(b ^ 0xFF for b in f.read(8))[::-1])
    os.truncate(shards / "shard-000003.tar", 5000)
    size = read_manifest(shards).shards[3].bytes
    (shards / "shard-000005.tar").unlink()
    assert main(["data", "verify", str(shards)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"{shards / 'shard-000001.tar'}: sha256 mismatch",
                         f"{shards / 'shard-000003.tar'}: size 5000 != {size}",
                         f"{shards / 'shard-000005.tar'}: missing"]
    assert len(lines) == 4 and "3 of 6 shards differ from the manifest (150 of 300 samples)" in lines[3]


def test_verify_passes_an_intact_set_and_refuses_a_folder_without_manifest(pristine, tmp_path, capsys):
    assert main(["data", "verify", str(pristine), "--workers", "2"]) == 0
    assert capsys.readouterr().out == f"{pristine}: all 6 shards match the manifest (size and sha256, 300 samples)\n"
    assert main(["data", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.splitlines()) == 1


@pytest.fixture
def garbled(shards) -> Path:
    """The image bytes of sample 217 replaced by as many random ones: the tar stays valid, the size too."""
    name = "shard-000004.tar"
    image = [m for m in members(shards / name) if m.name.endswith(".png")][17]
    with open(shards / name, "r+b") as f:
        f.seek(image.offset_data)
        f.write(np.random.default_rng(0).bytes(image.size))
    return shards


def test_a_sample_that_no_longer_decodes_is_skipped_once(garbled):
    _, problems = verify_shards(garbled)
    assert [(s.name, p) for s, p in problems] == [("shard-000004.tar", "sha256 mismatch")]
    for workers in (0, 2):
        ld = shard_loader(garbled, workers=workers)
        seen = labels_of(ld.batches(0))
        # every step is taken (one from the top-up); each worker's last partial batch waits, as always
        assert ld.skipped == 1 and len(seen) == N and 217 not in seen and len(set(seen)) > N - 2 * BATCH
    ld = device_loader(garbled)
    assert ld.skipped == 1 and 217 not in ld.labels.tolist()
    assert len(list(ld.batches(0))) == N // BATCH


def test_dali_stops_on_a_sample_that_no_longer_decodes_in_one_line(garbled):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is installed with the dev extra")
    from data_shards.dali_loader import DaliLoader
    from data_shards.manifest import ShardSetError

    ld = DaliLoader(garbled, rank=0, world_size=1, batch_size=BATCH, seed=0, channels=1, resolution=32,
                    num_workers=1, shuffle_buffer=64, device="cpu")
    assert ld.skipped == 0  # same size: only hashing tells
    with pytest.raises(ShardSetError) as e:
        list(ld.batches(0))
    assert "\n" not in str(e.value) and f"dcgan data verify {garbled}" in str(e.value)


# --- 3. the disk fills up during conversion ---------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs; yields (folder, remount(size))."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip() or mounted.returncode}")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    try:
        yield folder, remount
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_stops_conversion_in_one_line_and_the_same_command_finishes(small_disk, tmp_path):
    out, remount = small_disk
    source = ArraySource(images(400, seed=1))
    opts = dict(resolution=32, channels=1, shard_size=SHARD, encoding="raw", workers=2)
    reference = convert_source(source, tmp_path / "reference", ConvertOptions(**opts), progress=False)
    assert reference.total == 400 and sum(s.bytes for s in reference.shards) > 1 << 20  # twice the disk
    with pytest.raises(ConversionError) as e:
        convert_source(source, out, ConvertOptions(**opts), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(out)) and "No space left on device" in message
    assert "not yet converted need about" in message and "run the same command again" in message, message
    assert not (out / MANIFEST_NAME).exists()
    finished = sorted(out.glob("shard-*.tar"))
    assert 0 < len(finished) < len(reference.shards)
    by_name = {s.name: s.sha256 for s in reference.shards}
    assert all(sha256_file(p) == by_name[p.name] for p in finished)  # what has a final name is whole
    assert not list(out.glob(".*.tmp")) and not list((out / PROGRESS).glob(".*.tmp"))  # the space is free again
    remount("4m")
    resumed = convert_source(source, out, ConvertOptions(**opts), progress=False)
    assert resumed.total == reference.total
    assert [(s.name, s.count, s.sha256) for s in resumed.shards] == [(s.name, s.count, s.sha256)
                                                                     for s in reference.shards]


# --- 4. a conversion killed mid-write -----------------------------------------------------------------------------
CONVERT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from data_shards.convert import ConvertOptions, convert_source

    from conftest import ArraySource

    class SlowSource(ArraySource):  # slowed down so that the kill lands mid-conversion
        def read(self, first_key, count):
            for item in super().read(first_key, count):
                time.sleep(float(os.environ["DELAY_S"]))
                yield item

    if os.environ.get("KILL_AT_MANIFEST"):  # die between writing the manifest's temp file and its rename
        replace = os.replace

        def dying_replace(src, dst):
            if str(dst).endswith("manifest.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)

        os.replace = dying_replace
    n, seed, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    images = np.random.default_rng(seed).integers(0, 255, (n, 28, 28, 1), dtype=np.uint8)
    convert_source(SlowSource(images), out, ConvertOptions(resolution=32, channels=1, shard_size=25, workers=2),
                   progress=False)
""")


def test_a_killed_conversion_leaves_whole_shards_and_no_manifest_and_resumes_to_the_same_set(tmp_path):
    n, seed = 300, 2
    source = ArraySource(images(n, seed))
    opts = ConvertOptions(resolution=32, channels=1, shard_size=25, workers=2)
    reference = convert_source(source, tmp_path / "reference", opts, progress=False)
    script, out = tmp_path / "convert.py", tmp_path / "out"
    script.write_text(CONVERT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "DELAY_S": "0.01"}
    command = [sys.executable, str(script), str(n), str(seed), str(out)]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # the kill lands while a shard is being written: two done, and a shard's temp file open
        while (len(list((out / PROGRESS).glob("shard-*.json"))) < 2 or not list(out.glob(".shard-*.tar.tmp"))) \
                and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its workers, as a machine that dies
        proc.wait()
    done = len(list((out / PROGRESS).glob("shard-*.json")))
    assert 2 <= done < len(reference.shards) and not (out / MANIFEST_NAME).exists()
    assert list(out.glob(".shard-*.tar.tmp"))  # the half-written shard, under its temporary name only
    by_name = {s.name: s.sha256 for s in reference.shards}
    assert all(sha256_file(p) == by_name[p.name] for p in out.glob("shard-*.tar"))  # no partial shard by name

    # finish the shards, then die in the manifest's write: its temp file may stay, manifest.json may not
    res = subprocess.run(command, env={**env, "DELAY_S": "0", "KILL_AT_MANIFEST": "1"}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not (out / MANIFEST_NAME).exists() and list(out.glob(f".{MANIFEST_NAME}.*.tmp"))

    resumed = convert_source(source, out, opts, progress=False)
    assert [(s.name, s.count, s.sha256) for s in resumed.shards] == [(s.name, s.count, s.sha256)
                                                                     for s in reference.shards]
    assert read_manifest(out).total == n
    assert not list(out.glob(".*.tmp")) and not list((out / PROGRESS).glob(".*.tmp"))

