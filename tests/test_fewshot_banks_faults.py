"""Feature banks under faults: one writer at a time, changed images, damage, kill -9, SIGTERM, a full disk."""
import errno
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from simret.cli import cli
from simret.data.samples import write_fewshot_sample
from simret.data.splits import load_split
from simret.fewshot import bankfile
from simret.fewshot.bankfile import BankDamagedError
from simret.fewshot.features import bank_path, extract_features, feature_bank, load_feature_bank
from simret.models import RandomWeightsWarning, create_encoder
from simret.utils.locking import LockTimeoutError, writer_lock

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
# a `simret` whose bank writer stops after its first batch until the file named by $HOLD_RELEASE exists
# (touching $HOLD_MARKER when it gets there): lets a test act while a writer is provably mid-extraction
HOLDING_SIMRET = """
import os, pathlib, sys, time
import simret.fewshot.bankfile as bankfile

marker, release = pathlib.Path(os.environ["HOLD_MARKER"]), pathlib.Path(os.environ["HOLD_RELEASE"])
original = bankfile.write_rows

def write_then_hold(*args):
    original(*args)
    if not marker.exists():
        marker.touch()
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

bankfile.write_rows = write_then_hold
from simret.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet")


@pytest.fixture
def data(tmp_path):
    write_fewshot_sample(tmp_path / "data", per_class=4, image_size=24)  # test split: 5 classes × 4 images
    return tmp_path / "data"


@pytest.fixture
def split(data):
    return load_split(data, "test")


@pytest.fixture
def messages():
    """Log records of the simret logger (which does not propagate to the root logger)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("simret")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def counting(encoder):
    """Images that go through ``encoder`` (a list of batch sizes) and the hook to remove."""
    calls = []
    return calls, encoder.register_forward_hook(lambda module, inputs, output: calls.append(int(inputs[0].shape[0])))


def described(encoder, split, directory, **kwargs):
    """``(bank, images described)`` of one ``feature_bank`` call."""
    calls, hook = counting(encoder)
    try:
        bank = feature_bank(encoder, split, directory, image_size=SIZE, batch_size=4, **kwargs)
    finally:
        hook.remove()
    return bank, sum(calls)


def replace_in_place(target: Path, source: Path) -> None:
    """``target`` gets ``source``'s bytes (same path, a later modification time)."""
    before = target.stat().st_mtime_ns
    target.write_bytes(source.read_bytes())
    os.utime(target, ns=(before + 10**9, before + 10**9))


# ------------------------------------------------------------------------------------ file states


def test_bank_records_file_states_and_checksums(encoder, split, tmp_path):
    bank = extract_features(encoder, split, tmp_path / "features-test.h5", batch_size=8, image_size=SIZE,
                            verify_content=True)
    first = split.root / split.ids[0]
    with h5py.File(bank.path, "r") as handle:  # plain h5py: the datasets next to features/ids
        for name in ("features", "labels", "sizes", "mtimes", "digests", "done"):
            assert handle[name].fletcher32 and handle[name].chunks, name
        assert handle["sizes"][0] == first.stat().st_size and handle["mtimes"][0] == first.stat().st_mtime_ns
        assert handle["digests"][0].decode() == hashlib.sha256(first.read_bytes()).hexdigest()
        assert handle.attrs["bank_format"] == 2 and handle["done"][()].all()
    assert bank.described == 20 and bank.redescribed == 0


def test_an_image_replaced_in_place_is_described_again_and_only_it(encoder, split, tmp_path, messages):
    first, count = described(encoder, split, tmp_path)
    assert count == 20
    replace_in_place(split.root / split.ids[3], split.root / split.ids[9])
    again, count = described(encoder, split, tmp_path)
    assert count == 1 and (again.described, again.redescribed) == (1, 1)
    assert any("1 image(s) changed since their features were computed" in m for m in messages)
    assert any("(1 of them again: their files changed)" in m for m in messages)
    np.testing.assert_allclose(again.features[3], first.features[9], rtol=1e-5, atol=1e-6)  # the new bytes' features
    keep = [i for i in range(20) if i != 3]
    np.testing.assert_array_equal(again.features[keep], first.features[keep])
    _, count = described(encoder, split, tmp_path)
    assert count == 0  # up to date now


def _save_uncompressed(path: Path, image: Image.Image) -> None:
    """PNG without compression: the file's size depends on the image's dimensions only."""
    image.save(path, format="PNG", compress_level=0)


def test_verify_content_finds_a_replacement_that_keeps_size_and_time(encoder, split, tmp_path):
    victim = split.root / split.ids[5]
    with Image.open(victim) as image:
        pixels = image.convert("RGB")
    _save_uncompressed(victim, pixels)
    _, count = described(encoder, split, tmp_path, verify_content=True)
    assert count == 20
    stamp, size = victim.stat().st_mtime_ns, victim.stat().st_size
    _save_uncompressed(victim, Image.eval(pixels, lambda v: 255 - v))  # other bytes, the same size …
    os.utime(victim, ns=(stamp, stamp))  # … and the same time (like rsync -t)
    assert victim.stat().st_size == size
    _, count = described(encoder, split, tmp_path)
    assert count == 0  # sizes and times alone cannot tell
    _, count = described(encoder, split, tmp_path, verify_content=True)
    assert count == 1


def test_bank_of_an_older_simret_gets_file_states_without_extracting(encoder, split, tmp_path):
    reference, _ = described(encoder, split, tmp_path / "reference")
    path = bank_path(tmp_path / "old", "test")
    path.parent.mkdir()
    with h5py.File(path, "w") as handle:  # format 1: contiguous, no checksums, no file states
        strings = h5py.string_dtype("utf-8")
        handle["features"] = reference.features
        handle["labels"] = reference.labels
        handle.create_dataset("ids", data=np.array(reference.ids, dtype=object), dtype=strings)
        handle.create_dataset("classes", data=np.array(reference.classes, dtype=object), dtype=strings)
        handle["done"] = np.ones(20, bool)
        for key, value in reference.attrs.items():
            if key not in ("bank_format",):
                handle.attrs[key] = value
    assert load_feature_bank(path).features.shape == (20, encoder.dim)  # still read as it is
    bank, count = described(encoder, split, tmp_path / "old")
    assert count == 0
    np.testing.assert_array_equal(bank.features, reference.features)
    with h5py.File(path, "r") as handle:
        assert handle.attrs["bank_format"] == 2 and handle["features"].fletcher32
        assert (handle["sizes"][()] > 0).all()


# ----------------------------------------------------------------------------------------- damage


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


def test_a_damaged_bank_is_detected_and_its_damaged_rows_described_again(encoder, split, tmp_path, messages,
                                                                         monkeypatch):
    import simret.utils.h5checked as h5checked

    monkeypatch.setattr(h5checked, "CHUNK_BYTES", 4 * encoder.dim * 4)  # 4 feature rows per chunk
    first, _ = described(encoder, split, tmp_path)
    with h5py.File(first.path, "r") as handle:
        assert handle["features"].chunks == (4, encoder.dim)
        offset = handle["features"].id.get_chunk_info(1).byte_offset  # rows 4-7
    flip_byte(first.path, offset + 100)
    with pytest.raises(BankDamagedError, match=r"features-test\.h5 is damaged \(feature rows 4-7 fail their checksums"):
        load_feature_bank(first.path)
    repaired, count = described(encoder, split, tmp_path)
    assert count == 4 and repaired.described == 4
    assert any("is damaged (rows 4-7 fail their checksums): describing those images again" in m for m in messages)
    np.testing.assert_allclose(repaired.features, first.features, rtol=1e-5, atol=1e-6)
    assert load_feature_bank(first.path).features.shape == (20, encoder.dim)


def test_a_bank_that_is_no_hdf5_file_is_described_again(encoder, split, tmp_path, messages):
    bank_path(tmp_path, "test").write_bytes(b"garbage, not HDF5")
    bank, count = described(encoder, split, tmp_path)
    assert count == 20 and len(bank) == 20
    assert any("is unreadable" in m and "describing every image again" in m for m in messages)


# ------------------------------------------------------------------------------------ one writer


def test_a_writer_waits_for_the_lock_and_fails_after_the_timeout(encoder, split, tmp_path, data):
    with writer_lock(tmp_path):  # another writer of the folder
        with pytest.raises(LockTimeoutError, match="is being written by another simret process.*0 s"):
            feature_bank(encoder, split, tmp_path, image_size=SIZE, lock_timeout=0)
        result = CliRunner().invoke(cli, ["fewshot", str(data), "--method", "protonet", "--shot", "1", "--query", "2",
                                          "--episodes", "3", "--model", "test_resnet", "--weights", "none",
                                          "--img-size", str(SIZE), "-j", "0", "--features-dir", str(tmp_path),
                                          "--lock-timeout", "0"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "still after 0 s" in errors[0] and "Traceback" not in result.output
    assert not bank_path(tmp_path, "test").exists()


def simret_process(tmp_path, name, args, hold=True):
    """Start ``simret ARGS`` (holding after its first batch when ``hold``); stdout/stderr go to files."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMRET_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "HOLD_MARKER": str(tmp_path / f"{name}.held"), "HOLD_RELEASE": str(tmp_path / f"{name}.release")}
    command = [sys.executable, "-c", HOLDING_SIMRET, *args] if hold else [sys.executable, "-m", "simret", *args]
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err)
    out.close()
    err.close()
    return process


def wait_for(condition, process, what, limit=300):
    """Poll ``condition`` until it holds (fails the test if ``process`` ends first or it never does)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"the process ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def fewshot_args(data, features):
    return ["fewshot", str(data), "--method", "protonet", "--shot", "1", "--query", "2", "--episodes", "5",
            "--model", "test_resnet", "--weights", "none", "--img-size", str(SIZE), "-b", "4", "-j", "0",
            "--features-dir", str(features)]


def test_two_processes_on_one_bank_folder_the_second_waits_then_reuses(encoder, split, data, tmp_path):
    features = tmp_path / "banks"
    first = simret_process(tmp_path, "first", fewshot_args(data, features))
    try:
        wait_for((tmp_path / "first.held").exists, first, "the first writer's first batch")
        second = simret_process(tmp_path, "second", fewshot_args(data, features), hold=False)
        try:
            wait_for(lambda: "waiting for" in (tmp_path / "second.err").read_text(), second, "the second one waiting")
            (tmp_path / "first.release").touch()
            assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()
            assert second.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()
        finally:
            second.kill()
    finally:
        first.kill()
    waited = (tmp_path / "second.err").read_text()
    assert "another simret process is writing it" in waited and f"pid {first.pid}" in waited
    assert "reusing" in waited and "wrote" not in waited  # the bank the first one wrote
    assert (tmp_path / "first.out").read_text() == (tmp_path / "second.out").read_text()  # same episodes, same bank
    bank = load_feature_bank(bank_path(features, "test"))
    clean = extract_features(encoder, split, tmp_path / "clean" / "features-test.h5", batch_size=20, image_size=SIZE)
    np.testing.assert_allclose(bank.features, clean.features, rtol=1e-5, atol=1e-6)
    assert not [p.name for p in features.iterdir() if p.name.endswith((".tmp", ".partial"))]


# ---------------------------------------------------------------------------------------- signals


def partial_rows_done(features: Path) -> int:
    with h5py.File(bankfile.partial_path(bank_path(features, "test")), "r") as handle:
        return int(handle["done"][()].sum())


def test_a_killed_extraction_resumes_and_its_temporaries_go(encoder, split, data, tmp_path):
    features = tmp_path / "banks"
    process = simret_process(tmp_path, "killed", fewshot_args(data, features))
    try:
        wait_for((tmp_path / "killed.held").exists, process, "the first batch")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    done = partial_rows_done(features)
    assert done == 4 and not bank_path(features, "test").exists()
    left = features / ".features-test.h5.partial.x1y2z3.h5.tmp"  # what a kill inside new_partial leaves
    left.write_bytes(b"half a file")
    bank, count = described(encoder, split, features)
    assert count == 20 - done and len(bank) == 20 and not left.exists()
    clean = extract_features(encoder, split, tmp_path / "clean" / "features-test.h5", batch_size=20, image_size=SIZE)
    np.testing.assert_allclose(bank.features, clean.features, rtol=1e-5, atol=1e-6)


def test_sigterm_keeps_the_computed_rows_and_leaves_no_temporary(encoder, split, data, tmp_path):
    features = tmp_path / "banks"
    process = simret_process(tmp_path, "stopped", fewshot_args(data, features))
    try:
        wait_for((tmp_path / "stopped.held").exists, process, "the first batch")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        process.kill()
    assert "terminated" in (tmp_path / "stopped.err").read_text()
    assert not [p.name for p in features.iterdir() if p.name.endswith(".tmp")]
    done = partial_rows_done(features)
    assert done == 4 and not bank_path(features, "test").exists()
    bank, count = described(encoder, split, features)
    assert count == 20 - done and bank.described == 20 - done


# ------------------------------------------------------------------------------------- full disk


def test_a_full_disk_is_one_error_line_and_the_previous_bank_stays(encoder, split, data, tmp_path, monkeypatch):
    features = tmp_path / "banks"
    described(encoder, split, features)
    path = bank_path(features, "test")
    before = path.read_bytes()
    replace_in_place(split.root / split.ids[0], split.root / split.ids[1])  # the bank must be brought up to date

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bankfile, "write_rows", disk_full)
    result = CliRunner().invoke(cli, fewshot_args(data, features))
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert f"could not write {bankfile.partial_path(path)} (No space left on device" in errors[0]
    assert f"the previous bank {path} is intact" in errors[0]
    assert path.read_bytes() == before
    monkeypatch.undo()
    bank, count = described(encoder, split, features)
    assert count == 1 and bank.redescribed == 1
