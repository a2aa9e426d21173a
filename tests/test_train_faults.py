"""``simret train`` under faults: one run per checkpoint folder, SIGTERM, a full disk, killed runs' temporaries,
one skipped.tsv format."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from simret.cli import cli
from simret.data.samples import write_fewshot_sample
from simret.train import TrainConfig, train
from simret.train.checkpoint import load_checkpoint, read_log
from simret.utils.atomic import DiskWriteError
from simret.utils.locking import LockTimeoutError, writer_lock
from simret.utils.skipped import read_skipped

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(split="train", arch="test_resnet", weights=None, img_size=32, batch_size=8, workers=0, lr=3e-3)
CLI_TINY = ["--split", "train", "--model", "test_resnet", "--weights", "none", "--img-size", "32", "--batch-size", "8",
            "--workers", "0", "--lr", "3e-3"]
# a `simret` whose training stops at the first step after epoch 1 was logged (touching $HOLD_MARKER) until
# the file named by $HOLD_RELEASE exists: lets a test act while a run is provably inside epoch 2
HOLDING_SIMRET = """
import os, pathlib, sys, time
import simret.train.trainer as trainer

marker, release = pathlib.Path(os.environ["HOLD_MARKER"]), pathlib.Path(os.environ["HOLD_RELEASE"])
log_epoch, forward = trainer.append_log, trainer.Classifier.forward

def log_then_mark(out, record):
    log_epoch(out, record)
    marker.touch()

def hold_in_epoch_2(self, images, labels):
    deadline = time.monotonic() + 300
    while marker.exists() and not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return forward(self, images, labels)

trainer.append_log, trainer.Classifier.forward = log_then_mark, hold_in_epoch_2
from simret.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """5 base classes × 8 real digit scans (32×32) in train/, 5 novel classes in test/."""
    root = tmp_path_factory.mktemp("digits")
    write_fewshot_sample(root, per_class=8)
    return root


def temporaries(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def start(tmp_path, name, args, hold):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMRET_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "HOLD_MARKER": str(tmp_path / f"{name}.held"), "HOLD_RELEASE": str(tmp_path / f"{name}.release")}
    command = [sys.executable, "-c", HOLDING_SIMRET, *args] if hold else [sys.executable, "-m", "simret", *args]
    with open(tmp_path / f"{name}.err", "w") as err:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)


def wait_for(condition, process, what, limit=300):
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"the process ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ one writer


def test_a_second_run_into_the_same_folder_fails_after_the_lock_timeout(digits, tmp_path):
    out = tmp_path / "ckpt"
    with writer_lock(out):  # another run writes the folder
        with pytest.raises(LockTimeoutError, match="the checkpoint folder .*ckpt is being written by another simret"):
            train(TrainConfig(data=str(digits), out=str(out), epochs=1, lock_timeout=0, **TINY), show_progress=False)
        result = CliRunner().invoke(cli, ["train", str(digits), "--out", str(out), *CLI_TINY, "--epochs", "1",
                                          "--lock-timeout", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "still after 0 s" in errors[0] and "--lock-timeout" in errors[0]
    assert not (out / "last.pth").exists()


def test_a_second_run_waits_for_the_first_then_continues_its_checkpoint(digits, tmp_path):
    out = tmp_path / "ckpt"
    train(TrainConfig(data=str(digits), out=str(out), epochs=1, **TINY), show_progress=False)
    with writer_lock(out):  # a run that still writes the folder
        second = start(tmp_path, "second", ["train", str(digits), "--out", str(out), *CLI_TINY, "--epochs", "2",
                                            "--resume"], hold=False)
        try:
            wait_for(lambda: "waiting for" in (tmp_path / "second.err").read_text(), second, "the second run waiting")
        except BaseException:
            second.kill()
            raise
    assert second.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()
    assert "another simret process is writing it" in (tmp_path / "second.err").read_text()
    assert load_checkpoint(out / "last.pth")["epoch"] == 2 and [r["epoch"] for r in read_log(out)] == [1, 2]


# ---------------------------------------------------------------------------------------- signals


def test_sigterm_keeps_the_last_checkpoint_and_the_next_run_removes_temporaries(digits, tmp_path):
    out = tmp_path / "ckpt"
    process = start(tmp_path, "run", ["train", str(digits), "--out", str(out), *CLI_TINY, "--epochs", "3"], hold=True)
    try:
        wait_for((tmp_path / "run.held").exists, process, "the end of epoch 1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        process.kill()
    assert "terminated" in (tmp_path / "run.err").read_text()
    assert temporaries(out) == []
    assert load_checkpoint(out / "last.pth")["epoch"] == 1 and [r["epoch"] for r in read_log(out)] == [1]
    (out / ".last.pth.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what kill -9 inside torch.save leaves
    result = train(TrainConfig(data=str(digits), out=str(out), epochs=3, resume=True, **TINY), show_progress=False)
    assert [r["epoch"] for r in result.history] == [2, 3]
    assert temporaries(out) == [] and load_checkpoint(out / "last.pth")["epoch"] == 3


# ------------------------------------------------------------------------------------- full disk


def test_a_full_disk_at_torch_save_is_one_error_line_and_the_previous_checkpoint_stays(digits, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "ckpt"
    save, calls = torch.save, []

    def full_at_the_second_save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            target.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_the_second_save)
    result = CliRunner().invoke(cli, ["train", str(digits), "--out", str(out), *CLI_TINY, "--epochs", "2"])
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.output and len(calls) == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert f"could not write {out / 'last.pth'} (No space left on device" in errors[0]
    assert f"the previous checkpoint {out / 'last.pth'} (epoch 1) is intact" in errors[0] and "--resume" in errors[0]
    assert load_checkpoint(out / "last.pth")["epoch"] == 1 and temporaries(out) == []
    resumed = train(TrainConfig(data=str(digits), out=str(out), epochs=2, resume=True, **TINY), show_progress=False)
    assert [r["epoch"] for r in resumed.history] == [2]


def test_disk_full_before_any_checkpoint_says_so(digits, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskWriteError, match="no checkpoint was written yet"):
        train(TrainConfig(data=str(digits), out=str(tmp_path / "ckpt"), epochs=1, **TINY), show_progress=False)
    assert temporaries(tmp_path / "ckpt") == []


# ------------------------------------------------------------------------------------ skipped.tsv


def test_skipped_list_has_one_format_and_reads_the_old_one(digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits / "train", data)
    (data / "digit_1" / "0000.png").unlink()
    (data / "digit_0" / "tab\there.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # 40 files: 5 full batches
    out = tmp_path / "out"
    config = dict(TINY, split=None)
    train(TrainConfig(data=str(data), out=str(out), epochs=1, **config), show_progress=False)
    skipped = out / "skipped.tsv"
    lines = skipped.read_text().splitlines()
    assert lines == ["id\treason", lines[1]] and lines[1].startswith("digit_0/tab\\there.png\t")
    assert list(read_skipped(skipped)) == ["digit_0/tab\there.png"]
    skipped.write_text("path\treason\nold/gone.png\tnot an image\n")  # as an older simret wrote it
    train(TrainConfig(data=str(data), out=str(out), epochs=2, resume=True, **config), show_progress=False)
    assert skipped.read_text().splitlines()[0] == "id\treason"
    assert sorted(read_skipped(skipped)) == ["digit_0/tab\there.png", "old/gone.png"]
