"""Fine-tuning: data layouts, heads, schedule, optimizer groups, tiny trainings, checkpoints, exact resume."""
import json
import logging
import math
import os
import stat
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from simret.data.samples import write_fewshot_sample
from simret.models import RandomWeightsWarning, create_encoder, encoder_metadata, save_encoder
from simret.models.checkpoints import read_checkpoint
from simret.train import TrainConfig, train
from simret.train.checkpoint import load_checkpoint
from simret.train.data import list_labelled_images
from simret.train.heads import ArcFaceHead, LinearHead, create_head
from simret.train.schedule import WarmupCosine, warmup_cosine
from simret.train.trainer import Classifier, _Run, parameter_groups

TINY = dict(split="train", arch="test_resnet", weights=None, img_size=32, batch_size=8, workers=0, lr=3e-3)



@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """5 base classes × 8 real digit scans (32×32) in train/, 5 novel classes in test/."""
    root = tmp_path_factory.mktemp("digits")
    write_fewshot_sample(root, per_class=8)
    return root


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


# ------------------------------------------------------------------------------------------- data


def test_folder_split_and_class_tree_list_the_same_images(digits):
    split = list_labelled_images(digits, "train")
    assert split.classes == [f"digit_{d}" for d in range(5)]
    assert len(split) == 40 and split.class_counts() == {f"digit_{d}": 8 for d in range(5)}
    assert split.ids[0] == "digit_0/0000.png" and split.labels[:9].tolist() == [0] * 8 + [1]
    tree = list_labelled_images(digits / "train")
    assert (tree.root, tree.ids, tree.classes) == (split.root, split.ids, split.classes)
    assert tree.labels.tolist() == split.labels.tolist()
    with pytest.raises(ValueError, match="--split test"):  # a split root given as a class tree
        list_labelled_images(digits)


def test_miniimagenet_csv_layout(tmp_path):
    write_fewshot_sample(tmp_path, layout="miniimagenet", per_class=3)
    split = list_labelled_images(tmp_path, "test")
    assert split.classes == [f"digit_{d}" for d in range(5, 10)]
    assert split.root == (tmp_path / "images").resolve() and len(split) == 15
    assert split.ids[0] == "digit_5_0000.png" and split.labels[:4].tolist() == [0, 0, 0, 1]
    direct = list_labelled_images(tmp_path / "test.csv")
    assert direct.ids == split.ids and direct.labels.tolist() == split.labels.tolist()


def test_data_errors_are_clear(tmp_path):
    write_fewshot_sample(tmp_path / "fs", per_class=2)
    (tmp_path / "fs" / "train" / "digit_9").mkdir()
    with pytest.raises(ValueError, match="hold no images: digit_9"):
        list_labelled_images(tmp_path / "fs", "train")
    with pytest.raises(FileNotFoundError, match="expected val.csv or val/"):
        list_labelled_images(tmp_path / "fs", "val")
    with pytest.raises(FileNotFoundError):
        list_labelled_images(tmp_path / "nothing")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    (tmp_path / "fs" / "test" / "digit_5" / "0000.png").rename(one / "a.png")
    with pytest.raises(ValueError, match="at least two"):
        list_labelled_images(tmp_path / "one")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("name,class\na.png,x\n")
    with pytest.raises(ValueError, match="'filename' and 'label'"):
        list_labelled_images(tmp_path / "csv", "train")
    (tmp_path / "csv" / "train.csv").write_text("filename,label\na.png,x\nb.png,y\n")
    with pytest.raises(FileNotFoundError, match="2 of 2 listed image"):
        list_labelled_images(tmp_path / "csv", "train")


# ---------------------------------------------------------------------------------- heads, schedule


def test_linear_head_is_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    head = LinearHead(6, 4, label_smoothing=0.1)
    features, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    loss, logits = head.loss(features, labels)
    expected_logits = features @ head.fc.weight.T + head.fc.bias
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    log_p = torch.log_softmax(expected_logits, dim=1)
    smoothed = torch.full((5, 4), 0.1 / 4).scatter_add(1, labels[:, None], torch.full((5, 1), 0.9))
    assert torch.allclose(loss, -(smoothed * log_p).sum(1).mean(), atol=1e-6)


def test_arcface_adds_the_angular_margin_to_the_target_only():
    torch.manual_seed(0)
    margin, scale = 0.4, 16.0
    head = ArcFaceHead(3, 4, margin=margin, scale=scale)
    features, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logits = head.loss(features, labels)
    total = 0.0
    for i in range(6):
        row = []
        for j in range(4):
            f, w = features[i].tolist(), head.weight[j].tolist()
            cos = sum(a * b for a, b in zip(f, w)) / math.sqrt(sum(a * a for a in f) * sum(b * b for b in w))
            if j == int(labels[i]):
                theta = math.acos(cos)
                cos = math.cos(theta + margin) if theta + margin < math.pi else cos - math.sin(margin) * margin
            row.append(scale * cos)
        total += math.log(sum(math.exp(v) for v in row)) - row[int(labels[i])]
        assert logits[i, labels[i]].item() > row[int(labels[i])]  # predictions carry no margin
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    assert torch.allclose(logits, scale * F.normalize(features) @ F.normalize(head.weight).T, atol=1e-5)
    with pytest.raises(ValueError, match="unknown head"):
        create_head("svm", 3, 4)


def test_warmup_cosine_per_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [], "lr": 0.5}], lr=1.0)
    schedule = WarmupCosine(optimizer, total_steps=10, warmup_steps=4, min_lr=0.1)
    seen = [schedule.step() for _ in range(10)]
    reference = [(t + 1) / 4 if t < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 6)) for t in range(10)]
    assert [round(a, 12) for a, _ in seen] == [round(r, 12) for r in reference]
    assert all(b == pytest.approx(a / 2) for a, b in seen)  # second group: its own peak, same shape
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference[-1])
    assert warmup_cosine(9, 10, 0, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    again = WarmupCosine(optimizer, 10, 4, 0.1)
    again.load_state_dict({"position": 6})
    assert again.step()[0] == pytest.approx(reference[6])


def test_weight_decay_groups_and_frozen_trunk():
    encoder = create_encoder("test_vit", gamma=1.25, pool_kwargs={"use_beta": True})
    model = Classifier(encoder, create_head("arcface", encoder.dim, 3))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in parameter_groups(model, 0.05))
    assert "head.weight" in decay and "encoder.pool.wq.weight" in decay
    assert {"encoder.pool.beta", "encoder.trunk.pos_embed", "encoder.trunk.cls_token",
            "encoder.pool.norm_patches.weight", "encoder.trunk.blocks.0.attn.qkv.bias"} <= no_decay
    frozen = Classifier(encoder, create_head("ce", encoder.dim, 3), freeze_trunk=True).train()
    trained = {names.get(id(p), "head") for g in parameter_groups(frozen, 0.05) for p in g["params"]}
    assert trained and all(not n.startswith("encoder.trunk") for n in trained)
    assert not frozen.encoder.trunk.training and frozen.encoder.pool.training


# ------------------------------------------------------------------------------------ tiny trainings


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """3 epochs of test_resnet on 40 digit images, all parts training, without augmentation."""
    out = tmp_path_factory.mktemp("run") / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = train(TrainConfig(data=str(digits), out=str(out), epochs=3, augment=False, keep=2, **TINY),
                       show_progress=False)
    torch.set_num_threads(threads)
    return out, result


def test_training_decreases_the_loss_and_logs_every_epoch(trained):
    out, result = trained
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history == result.history
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert [h["step"] for h in history] == [5, 10, 15] and all(h["images"] == 40 for h in history)
    assert history[0]["lr"] == pytest.approx(3e-3)  # end of the one-epoch warm-up
    assert sorted(p.name for p in out.glob("epoch-*.pth")) == ["epoch-002.pth", "epoch-003.pth"]
    assert oct(stat.S_IMODE(os.stat(out / "last.pth").st_mode)) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_loads_as_an_encoder(trained, digits):
    out, result = trained
    obj, meta = read_checkpoint(out / "last.pth")  # weights_only=True: nothing but plain data inside
    assert obj["epoch"] == 3 and obj["classes"] == [f"digit_{d}" for d in range(5)]
    assert meta["fingerprint"] == result.fingerprint and meta["data_config"]["input_size"] == [3, 32, 32]
    from_checkpoint = create_encoder(None, weights=out / "last.pth")
    from_file = create_encoder(None, weights=out / "encoder.safetensors")
    assert from_checkpoint.fingerprint == from_file.fingerprint == result.fingerprint
    assert from_file.data_config["input_size"] == (3, 32, 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_checkpoint(images), from_file(images))
    # the head still classifies the training images as well as the last epoch said
    head = create_head("ce", from_file.dim, 5)
    head.load_state_dict(obj["head"])
    assert set(obj) >= {"optimizer", "schedule", "scaler", "rng", "args", "state_dict"}


def test_encoder_metadata_is_what_save_encoder_writes(tmp_path):
    encoder = create_encoder("test_resnet", gamma=2.0)
    _, meta = read_checkpoint(save_encoder(encoder, tmp_path / "e.pth"))
    assert encoder_metadata(encoder) == meta


def _interrupt_after_first_epoch(monkeypatch):
    original = _Run._epoch

    def epoch(self, number, *args, **kwargs):
        if number >= 1:
            raise KeyboardInterrupt
        return original(self, number, *args, **kwargs)

    monkeypatch.setattr(_Run, "_epoch", epoch)


def test_resume_continues_exactly(digits, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, a stop, and --resume: same weights, head, optimizer, schedule, RNG."""
    config = dict(data=str(digits), epochs=2, loss="arcface", augment=True, **TINY)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **config), show_progress=False)
    with monkeypatch.context() as patch:
        _interrupt_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "b"), **config), show_progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.pth")["epoch"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **config), show_progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    for part in ("state_dict", "head"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][index]["exp_avg_sq"])
    assert a["schedule"] == b["schedule"] and a["step"] == b["step"] == 10
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert straight.fingerprint == resumed.fingerprint
    assert [h["epoch"] for h in resumed.history] == [2]
    assert [json.loads(line)["loss"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == \
           [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]


def test_resume_refuses_a_different_configuration(trained, digits, tmp_path):
    out, _ = trained
    config = dict(data=str(digits), out=str(out), epochs=3, **TINY)
    with pytest.raises(ValueError, match=r"--gamma 2.0 \(checkpoint: None\)"):
        train(TrainConfig(resume=True, gamma=2.0, **config), show_progress=False)
    with pytest.raises(ValueError, match=r"--model test_vit.*--loss arcface"):
        train(TrainConfig(resume=True, **{**config, "arch": "test_vit", "loss": "arcface"}), show_progress=False)
    with pytest.raises(ValueError, match="classes"):
        train(TrainConfig(resume=True, **{**config, "split": "test"}), show_progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(**config), show_progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(resume=True, **{**config, "out": str(tmp_path / "new")}), show_progress=False)
    # everything already trained: resuming just says so and rewrites the encoder file
    again = train(TrainConfig(resume=True, **config), show_progress=False)
    assert again.history == [] and (out / "encoder.safetensors").is_file()


def test_unreadable_images_are_skipped_and_listed(digits, tmp_path, messages):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits / "train", data)
    (data / "digit_1" / "0000.png").unlink()
    (data / "digit_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # 40 files: 5 full batches
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, amp=True,
                               **{**TINY, "split": None}), show_progress=False)
    assert (result.history[0]["skipped"], result.history[0]["images"]) == (1, 39)
    lines = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "id\treason" and lines[1].startswith("digit_0/broken.png\t") and len(lines) == 2
    assert any("1 unreadable image(s) skipped" in m for m in messages)
    assert any("--amp applies to CUDA devices only" in m for m in messages)
    assert (tmp_path / "out" / "encoder.safetensors").is_file()


def test_cli_trains_and_says_how_to_use_the_result(digits, tmp_path):
    out = tmp_path / "ckpt"
    args = ["train", str(digits), "--split", "train", "--out", str(out), "--model", "test_resnet", "--weights",
            "none", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--freeze-trunk", "--loss", "arcface", "--device", "cpu"]
    from simret.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained 1 epoch(s) on 5 classes" in result.output
    assert f"--weights {out / 'encoder.safetensors'}" in result.output
    saved = load_checkpoint(out / "last.pth")
    assert saved["args"]["freeze_trunk"] is True and saved["args"]["lr"] == 1e-3  # the frozen-trunk default
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--resume" in again.output
    too_big = CliRunner().invoke(cli, [*args[:-2], "--overwrite", "--batch-size", "64"])
    assert too_big.exit_code == 1 and "fewer than one batch" in too_big.output
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "torchrun --nproc_per_node" in help_text and "--freeze-trunk" in help_text


def test_head_runs_in_float32_under_autocast():
    encoder = create_encoder("test_resnet")
    model = Classifier(encoder, create_head("arcface", encoder.dim, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert loss.dtype == logits.dtype == torch.float32 and logits.shape == (2, 3)


def test_default_workers_share_the_cores_and_are_saved(digits, tmp_path, monkeypatch):
    from simret.train.trainer import default_train_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: no GPU is touched
    expected = {(cpu, 2, 1): 0, (cpu, 16, 1): 4, (cpu, 16, 2): 3, (gpu, 16, 1): 8, (gpu, 16, 4): 3, (gpu, 1, 1): 0}
    for (device, cores, processes), workers in expected.items():
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)), raising=False)
        assert default_train_workers(device, processes) == workers, (device, cores, processes)
    monkeypatch.undo()
    config = {**TINY, "workers": None}
    train(TrainConfig(data=str(digits), out=str(tmp_path / "c"), epochs=1, **config), show_progress=False)
    saved = load_checkpoint(tmp_path / "c" / "last.pth")["args"]["workers"]
    assert saved == default_train_workers(torch.device("cpu"))  # the number used, so --resume can compare it
