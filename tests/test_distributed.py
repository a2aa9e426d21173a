"""Distributed helpers, and real ``torchrun --nproc_per_node=2`` runs (gloo, CPU) of training and of the
sharded-extraction pattern the helpers exist for."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simret.data.samples import write_fewshot_sample
from simret.models import create_encoder
from simret.train import TrainConfig, train
from simret.train.checkpoint import load_checkpoint
from simret.utils import distributed as dist_utils
from simret.utils.distributed import shard_indices, shard_path

REPO = Path(__file__).resolve().parents[1]



def test_shard_indices_are_contiguous_balanced_and_cover_everything():
    for world in range(1, 6):
        for n in range(0, 23):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shard_indices(5, 0, 2) == range(0, 3) and shard_indices(5, 1, 2) == range(3, 5)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="world size"):
        shard_indices(4, 0, 0)
    assert shard_path("/x/descriptors.h5", 1, 4) == Path("/x/descriptors.rank-1-of-4.h5")


def test_helpers_answer_for_a_single_process_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = dist_utils.init_distributed(device="cpu")
    assert (context.rank, context.world_size, context.backend, context.distributed) == (0, 1, None, False)
    assert context.device == torch.device("cpu") and context.is_main
    assert not dist_utils.is_distributed() and dist_utils.world_size() == 1 and dist_utils.rank() == 0
    assert dist_utils.is_main_process() and dist_utils.local_rank() == 0
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist_utils.broadcast_object("x") == "x"
    total = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_sum(total) is total and total.tolist() == [1.0, 2.0]
    dist_utils.barrier()
    with dist_utils.distributed_session("cpu") as session:
        assert not session.distributed
    monkeypatch.setenv("RANK", "0")  # an incomplete launcher environment is not torchrun
    assert not dist_utils.launched_by_torchrun()


def test_quiet_unless_main_silences_other_ranks_only(monkeypatch):
    import logging

    from simret.utils import progress

    logger = logging.getLogger("simret")
    level, enabled = logger.level, progress.is_enabled()
    try:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
            monkeypatch.setenv(name, value)
        logger.setLevel(logging.INFO)
        assert dist_utils.quiet_unless_main() is False and logger.level == logging.INFO
        monkeypatch.setenv("RANK", "1")
        assert dist_utils.quiet_unless_main() is True
        assert logger.level == logging.WARNING and not progress.is_enabled()
    finally:
        logger.setLevel(level)
        progress.set_enabled(enabled)


def _torchrun(args, tmp_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SIMRET_OFFLINE": "1", "SIMRET_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.slow
def test_torchrun_training_matches_one_process(tmp_path):
    """2 ranks × 4 images per step == 1 process × 8 (frozen trunk: no BatchNorm statistics involved)."""
    data = tmp_path / "digits"
    write_fewshot_sample(data, per_class=8)
    options = ["--split", "train", "--model", "test_resnet", "--weights", "none", "--img-size", "32", "--epochs",
               "2", "--batch-size", "8", "--workers", "0", "--freeze-trunk", "--no-augment", "--device", "cpu"]
    done = _torchrun(["-m", "simret", "train", str(data), "--out", str(tmp_path / "ddp"), *options], tmp_path)
    assert "batch 8 (4 per rank × 2)" in done.stderr and done.stdout.count("trained 2 epoch(s)") == 1

    single = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), split="train", arch="test_resnet",
                               weights=None, img_size=32, epochs=2, batch_size=8, workers=0, freeze_trunk=True,
                               augment=False, device="cpu"), show_progress=False)
    ddp, one = load_checkpoint(tmp_path / "ddp" / "last.pth"), load_checkpoint(tmp_path / "one" / "last.pth")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and ddp["step"] == one["step"] == 10
    for part in ("state_dict", "head"):
        for key, value in one[part].items():
            assert torch.allclose(ddp[part][key].float(), value.float(), atol=1e-6), (part, key)
    trained_pool = [k for k in one["state_dict"] if k.startswith("pool.")]
    initial = create_encoder("test_resnet").state_dict()
    assert any(not torch.allclose(one["state_dict"][k], initial[k]) for k in trained_pool)  # it did train
    assert all(torch.equal(one["state_dict"][k], initial[k]) for k in one["state_dict"] if k.startswith("trunk."))
    encoder = create_encoder(None, weights=tmp_path / "ddp" / "encoder.safetensors")
    assert encoder.fingerprint == create_encoder(None, weights=tmp_path / "ddp" / "last.pth").fingerprint
    assert abs(single.history[-1]["loss"] - load_log_loss(tmp_path / "ddp")) < 1e-5
    assert not list((tmp_path / "ddp").glob(".*.tmp"))  # no temporary files left behind


INTERRUPT_AFTER_ONE_EPOCH = """
import sys
from simret.train.trainer import _Run
original = _Run._epoch
def epoch(self, number, *args, **kwargs):
    if number >= 1:
        raise SystemExit(3)  # every rank stops after its first epoch's checkpoint, as a killed job would
    return original(self, number, *args, **kwargs)
_Run._epoch = epoch
from simret.cli import cli
cli.main(args=sys.argv[1:], prog_name="simret")
"""


@pytest.mark.slow
def test_torchrun_resume_continues_exactly(tmp_path):
    """2 ranks, whole network training, augmentations and a loading worker each: 2 epochs straight equal
    1 epoch, a stop, and ``--resume`` (weights, head, every rank's RNG), bit for bit."""
    data = tmp_path / "digits"
    write_fewshot_sample(data, per_class=8)
    options = ["--split", "train", "--model", "test_resnet", "--weights", "none", "--img-size", "32", "--epochs",
               "2", "--batch-size", "8", "--workers", "1", "--loss", "arcface", "--lr", "3e-3", "--device", "cpu"]
    _torchrun(["-m", "simret", "train", str(data), "--out", str(tmp_path / "a"), *options], tmp_path)
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_AFTER_ONE_EPOCH)
    with pytest.raises(AssertionError, match="torchrun failed"):
        _torchrun([str(script), "train", str(data), "--out", str(tmp_path / "b"), *options], tmp_path)
    assert load_checkpoint(tmp_path / "b" / "last.pth")["epoch"] == 1
    _torchrun(["-m", "simret", "train", str(data), "--out", str(tmp_path / "b"), *options, "--resume"], tmp_path)
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == b["world_size"] == 2
    for part in ("state_dict", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"])) and len(a["rng"]) == 2
    assert load_log_loss(tmp_path / "a") == load_log_loss(tmp_path / "b")


def load_log_loss(folder):
    import json

    return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])["loss"]


@pytest.mark.slow
def test_torchrun_index_merges_shards_into_the_single_process_store(tmp_path):
    """``torchrun --nproc_per_node=2 -m simret index``: each rank describes its share, rank 0 merges them into
    one store whose ids and descriptors equal a single-process run's; a corrupt file is skipped once."""
    from click.testing import CliRunner

    from simret.cli import cli
    from simret.retrieval.store import read_store

    data = tmp_path / "digits"
    write_fewshot_sample(data, per_class=7)  # 35 test images (+ 1 corrupt): shards of 18 and 18
    (data / "test" / "digit_5" / "broken.png").write_bytes(b"not a png")
    options = ["--model", "test_resnet", "--weights", "none", "--gamma", "2", "--max-size", "32", "-j", "0",
               "--device", "cpu", "--scales", "1,0.707"]
    done = _torchrun(["-m", "simret", "index", str(data / "test"), "--out", str(tmp_path / "ddp"), *options],
                     tmp_path)
    assert done.stdout.count("indexed 35 images") == 1 and "1 skipped" in done.stdout  # rank 0 speaks once
    single = CliRunner().invoke(cli, ["index", str(data / "test"), "--out", str(tmp_path / "one"), *options])
    assert single.exit_code == 0, single.output
    merged, expected = read_store(tmp_path / "ddp" / "descriptors.h5"), read_store(tmp_path / "one" / "descriptors.h5")
    assert merged.ids == expected.ids and len(merged.ids) == 35
    np.testing.assert_allclose(merged.descriptors, expected.descriptors, rtol=1e-5, atol=1e-6)
    assert merged.fingerprint == expected.fingerprint
    assert not (tmp_path / "ddp" / ".partial").exists()  # the shards were merged and removed
    assert (tmp_path / "ddp" / "skipped.tsv").read_text().count("broken.png") == 1
