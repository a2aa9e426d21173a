"""Supervised fine-tuning of an ``Encoder`` with a classification head, in one process or under torchrun.

``train(TrainConfig(...))`` does everything ``simret train`` does: list the labelled images, build the
encoder and head, AdamW with a per-step warm-up + cosine schedule, optional AMP (CUDA), one atomic checkpoint
per epoch, exact ``resume``, and DistributedDataParallel when started by ``torchrun``.

Batch size: ``batch_size`` is the **global** batch, split evenly over the ranks (each rank loads
``batch_size / world_size`` images per step), so the same command optimises the same way on 1 or N
processes; with a frozen trunk (no BatchNorm statistics involved) N processes compute the same steps as one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from simret.data.images import MAX_SIDE
from simret.models.encoder import encoder_metadata
from simret.train.checkpoint import (
    ENCODER_FILE,
    LAST,
    LOG_FILE,
    SKIPPED_FILE,
    append_log,
    capture_rng,
    keep_epoch_copy,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from simret.train.data import LabelledImages, describe, list_labelled_images
from simret.train.heads import create_head
from simret.train.schedule import WarmupCosine
from simret.utils.devices import default_loader_workers
from simret.utils.distributed import (
    DistributedContext,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed_session,
)
from simret.utils.logs import get_logger

log = get_logger(__name__)

DEFAULT_LR = 1e-4
DEFAULT_LR_FROZEN_TRUNK = 1e-3
# options that must match the checkpoint to resume it (others may change, with a warning)
RESUME_MUST_MATCH = ("loss", "freeze_trunk")
RESUME_SHOULD_MATCH = ("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "batch_size", "grad_clip",
                       "img_size", "augment", "seed", "margin", "scale", "label_smoothing", "amp", "precision")


@dataclass
class TrainConfig:
    """Everything one training run needs (the ``simret train`` options). Paths may be str."""

    data: str
    out: str
    split: Optional[str] = None
    arch: Optional[str] = None
    pool: str = "simpool"
    gamma: Optional[float] = None
    weights: Optional[str] = "timm"
    checkpoint_key: Optional[str] = None
    device: Optional[str] = None
    loss: str = "ce"
    margin: float = 0.5
    scale: float = 30.0
    label_smoothing: float = 0.0
    freeze_trunk: bool = False
    epochs: int = 10
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    batch_size: int = 64
    grad_clip: Optional[float] = None
    amp: bool = False  # legacy: on CUDA, --precision auto when --precision is fp32
    precision: str = "fp32"  # autocast of forward and backward: fp32, bf16, fp16 or auto (simret.models.precision)
    workers: Optional[int] = None  # None: default_train_workers(device)
    seed: int = 0
    img_size: Optional[int] = None
    augment: bool = True
    resume: bool = False
    overwrite: bool = False
    keep: int = 0
    deterministic: bool = False
    lock_timeout: Optional[float] = None  # seconds to wait for another run writing ``out`` (None: as long as it takes)

    def resolved(self) -> TrainConfig:
        """A copy with defaults filled in (lr by ``freeze_trunk``, ``none`` weights → None) and checked."""
        config = dataclasses.replace(self, data=str(self.data), out=str(self.out))
        if config.weights in ("none", "random"):
            config.weights = None
        if config.lr is None:
            config.lr = DEFAULT_LR_FROZEN_TRUNK if config.freeze_trunk else DEFAULT_LR
        checks = [
            (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
            (config.lr > 0, f"--lr must be positive, got {config.lr}"),
            (0 <= config.min_lr <= config.lr, f"--min-lr must be in [0, lr={config.lr}], got {config.min_lr}"),
            (config.warmup_epochs >= 0, f"--warmup-epochs must be non-negative, got {config.warmup_epochs}"),
            (config.weight_decay >= 0, f"--weight-decay must be non-negative, got {config.weight_decay}"),
            (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
            (config.grad_clip is None or config.grad_clip > 0, f"--grad-clip must be positive, got {config.grad_clip}"),
            (config.workers is None or config.workers >= 0, f"--workers must be non-negative, got {config.workers}"),
            (config.img_size is None or 8 <= config.img_size <= MAX_SIDE,
             f"--img-size must be from 8 to {MAX_SIDE} pixels, got {config.img_size}"),
            (config.keep >= 0, f"--keep must be non-negative, got {config.keep}"),
            (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {config.label_smoothing}"),
            (config.scale > 0, f"--scale (ArcFace) must be positive, got {config.scale}"),
            (not (config.resume and config.overwrite), "--resume and --overwrite exclude each other"),
            (config.lock_timeout is None or config.lock_timeout >= 0,
             f"--lock-timeout must be non-negative, got {config.lock_timeout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return config

    def plain(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """Where the run left its files, and one record per epoch trained (as in ``log.jsonl``)."""

    checkpoint: Path
    encoder_file: Path
    epochs: int
    classes: List[str]
    history: List[Dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""


class Classifier(nn.Module):
    """Encoder + head: ``(images (B, 3, H, W), labels (B,)) → (mean loss, prediction logits (B, C))``.

    With ``freeze_trunk`` the trunk's parameters do not train and the trunk stays in eval mode (BatchNorm
    statistics and dropout frozen) whatever ``train()`` is called with; pooling and head train.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, freeze_trunk: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze_trunk = freeze_trunk
        if freeze_trunk:
            encoder.trunk.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_trunk:
            self.encoder.trunk.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images)
        if features.device.type in ("cuda", "cpu"):  # the head and its loss in float32, even under autocast
            with torch.autocast(device_type=features.device.type, enabled=False):
                return self.head.loss(features.float(), labels)
        return self.head.loss(features.float(), labels)


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters in two AdamW groups: with weight decay (matrices, conv kernels) and without
    (biases, norms, any parameter of one dimension or less — SimPool's ``beta`` —, and what the timm
    trunk lists in ``no_weight_decay()``: position embeddings, class tokens …)."""
    skip = set()
    encoder = getattr(model, "encoder", None)
    trunk = getattr(encoder, "trunk", None)
    if trunk is not None and hasattr(trunk, "no_weight_decay"):
        skip = {f"encoder.trunk.{name}" for name in trunk.no_weight_decay()}
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def default_train_workers(device: torch.device, processes_here: int = 1) -> int:
    """DataLoader workers per rank when ``--workers`` is not given (``default_loader_workers``: up to 8 beside
    an accelerator with the cores shared among the ``processes_here`` ranks; 0 on a small CPU)."""
    return default_loader_workers(device, processes_here)


def unused_parameters(model: nn.Module, input_size: Tuple[int, int, int], device: torch.device) -> List[str]:
    """Names of trainable parameters that one forward/backward does not reach (DDP must be told). Runs
    in eval mode on two random images without touching the RNG, buffers or gradients."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *input_size, generator=generator).to(device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            loss, _ = model(images, labels)
            grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    finally:
        model.train(was_training)
    return [name for (name, _), grad in zip(trainable, grads) if grad is None]


# ------------------------------------------------------------------------------------------ train


def train(config: TrainConfig, *, show_progress: bool = True) -> TrainResult:
    """Train as ``config`` says, in this process or, under ``torchrun``, as one rank of the group.

    Raises:
        FileExistsError: ``out`` holds a checkpoint and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: data missing, or ``resume`` without a checkpoint.
        ValueError: bad options, data layout problems, a checkpoint that does not match the command.
    """
    config = config.resolved()
    with distributed_session(config.device) as context:
        return _Run(config, context, show_progress).run()


class _Run:
    """One training run (one rank of it)."""

    def __init__(self, config: TrainConfig, context: DistributedContext, show_progress: bool) -> None:
        self.config = config
        self.context = context
        self.device = context.device
        self.main = context.is_main
        self.show_progress = show_progress and self.main
        self.out = Path(config.out).expanduser()
        self.last = self.out / LAST
        self.saved_epoch: Optional[int] = None  # the epoch last.pth holds (None: unknown, or none written)

    def say(self, message: str, *args: Any) -> None:
        if self.main:
            log.info(message, *args)

    def warn(self, message: str, *args: Any) -> None:
        if self.main:
            log.warning(message, *args)

    # ----------------------------------------------------------------------------------- set-up

    def run(self) -> TrainResult:
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} exists and is not a folder")
        if self.config.resume and not self.last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to continue at {self.last} "
                                    f"(train without --resume to start one)")
        with self._exclusive_output():
            return self._train()

    @contextlib.contextmanager
    def _exclusive_output(self) -> Iterator[None]:
        """Hold the writer lock of the checkpoint folder for the run (rank 0 holds it for every rank: the others
        start once it does, or fail with it), after removing the temporaries of a killed run."""
        from simret.utils.atomic import remove_temporaries
        from simret.utils.locking import LockTimeoutError, writer_lock

        with contextlib.ExitStack() as stack:
            failure: Optional[BaseException] = None
            if self.main:
                try:
                    stack.enter_context(writer_lock(self.out, timeout=self.config.lock_timeout,
                                                    what=f"the checkpoint folder {self.out}"))
                except LockTimeoutError as err:
                    failure = err
            shared = broadcast_object(None if failure is None else str(failure))
            if shared is not None:
                raise failure if failure is not None else LockTimeoutError(shared)
            if self.main:
                remove_temporaries(self.out)
            yield

    def _train(self) -> TrainResult:
        if self.config.workers is None:
            processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.context.distributed else 1
            self.config = dataclasses.replace(self.config,
                                              workers=default_train_workers(self.device, processes_here))
        config = self.config
        self._prepare_output()
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = not config.deterministic
            torch.backends.cudnn.deterministic = config.deterministic
        seed_everything(config.seed + self.context.rank)

        data = list_labelled_images(config.data, config.split)
        self.say("data: %s", describe(data))
        saved = load_checkpoint(self.last) if config.resume else None
        if saved is not None:
            self._check_resumable(saved, data)
        encoder = self._build_encoder(saved)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = create_head(config.loss, encoder.dim, len(data.classes), margin=config.margin,
                               scale=config.scale, label_smoothing=config.label_smoothing)
        model = Classifier(encoder, head, config.freeze_trunk).to(self.device)
        if config.freeze_trunk and not any(p.requires_grad for p in encoder.pool.parameters()):
            self.warn("--freeze-trunk with %r pooling: the pooling has no parameters, only the head trains and "
                      "the saved encoder equals the starting one", encoder.config["pool"])
        groups = parameter_groups(model, config.weight_decay)
        if not groups:
            raise ValueError("nothing to train: no parameter requires gradients")
        trainable = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)

        loader, sampler, labels = self._loader(data, encoder)
        steps_per_epoch = len(loader)
        total = config.epochs * steps_per_epoch
        warmup = min(total, int(round(config.warmup_epochs * steps_per_epoch)))
        schedule = WarmupCosine(optimizer, total, warmup, config.min_lr)
        amp_dtype, scaler = self._amp()

        start_epoch = 0
        if saved is not None:
            start_epoch = self._restore(saved, model, optimizer, schedule, scaler, total)
        network: nn.Module = model
        if self.context.distributed:
            network = self._wrap_ddp(model, encoder)
        trained = sum(p.numel() for p in trainable)
        self.say("training %s (%s pooling%s) + %s head for %d epoch(s) × %d step(s): %s trainable parameters, "
                 "batch %d (%d per rank × %d), lr %.3g, %s", encoder.config["arch"], encoder.config["pool"],
                 "" if encoder.config.get("gamma") is None else f", gamma {encoder.config['gamma']}",
                 "linear" if config.loss == "ce" else "ArcFace", config.epochs, steps_per_epoch, f"{trained:,}",
                 config.batch_size, config.batch_size // self.context.world_size, self.context.world_size,
                 config.lr, self.device)
        if saved is not None:
            restore_rng(self._rank_rng(saved), self.device)
        history = []
        for epoch in range(start_epoch, config.epochs):
            record = self._epoch(epoch, network, model, sampler, loader, labels, optimizer, schedule, scaler,
                                 amp_dtype, trainable, data)
            history.append(record)
        if start_epoch >= config.epochs:
            self.say("nothing to train: %s already holds %d epoch(s) of %d", self.last, start_epoch, config.epochs)
        encoder_file = self.out / ENCODER_FILE
        if self.main:
            from simret.models import save_encoder

            with self._writing(encoder_file):
                save_encoder(encoder, encoder_file, extra={"training": {
                    "epochs": config.epochs, "loss": config.loss, "classes": len(data.classes),
                    "freeze_trunk": config.freeze_trunk, "data": str(Path(config.data).expanduser().resolve()),
                    "split": config.split}})
        barrier()
        return TrainResult(self.last, encoder_file, config.epochs, list(data.classes), history, encoder.fingerprint)

    def _prepare_output(self) -> None:
        config = self.config
        if config.resume:
            if not self.last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint to continue at {self.last} "
                                        f"(train without --resume to start one)")
            return
        if self.last.exists() and not config.overwrite:
            raise FileExistsError(f"{self.out} already holds a training checkpoint ({LAST}): pass --resume to "
                                  f"continue it, --overwrite to start afresh, or another --out")
        barrier()  # every rank has looked before rank 0 deletes anything
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            stale = [self.last, self.out / ENCODER_FILE, self.out / LOG_FILE, self.out / SKIPPED_FILE,
                     *self.out.glob("epoch-[0-9][0-9][0-9]*.pth")]
            for path in stale:
                if path.exists():
                    path.unlink()
        barrier()

    def _build_encoder(self, saved: Optional[Dict[str, Any]]):
        from simret.models import arch_or_default, create_encoder

        config = self.config
        if saved is not None:  # the checkpoint carries the architecture and the weights; no network needed
            encoder = create_encoder(None, weights=self.last, seed=config.seed)
        else:
            arch = arch_or_default(config.arch, config.weights)
            encoder = create_encoder(arch, pool=config.pool, gamma=config.gamma, weights=config.weights,
                                     checkpoint_key=config.checkpoint_key, seed=config.seed)
        if config.img_size:
            # saved with the encoder: later use preprocesses alike
            encoder.set_data_config(input_size=(3, config.img_size, config.img_size))
        return encoder

    def _loader(self, data: LabelledImages, encoder):
        from torch.utils.data import DataLoader, DistributedSampler

        from simret.data.images import ImageList, classification_transform, collate_skip_failed

        config, world = self.config, self.context.world_size
        if config.batch_size % world:
            raise ValueError(f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                             f"{world} processes (e.g. {max(world, config.batch_size // world * world)})")
        per_rank = config.batch_size // world
        transform = classification_transform(encoder.data_config, train=config.augment)
        dataset = ImageList(data.root, data.ids, transform)
        # one sampler for 1 or N ranks: the order of epoch e depends on (seed, e) only, so resume is exact
        sampler = DistributedSampler(dataset, num_replicas=world, rank=self.context.rank, shuffle=True,
                                     seed=config.seed, drop_last=False)
        if len(sampler) < per_rank:
            raise ValueError(f"{len(data)} images are fewer than one batch of {config.batch_size}"
                             f"{f' ({per_rank} per process)' if world > 1 else ''}: lower --batch-size")
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=config.workers,
                            collate_fn=collate_skip_failed, drop_last=True, pin_memory=self.device.type == "cuda")
        left_out = len(dataset) - len(loader) * config.batch_size
        if left_out > 0:
            self.say("%d image(s) per epoch do not fill a last batch and are left out (different ones each epoch)",
                     left_out)
        return loader, sampler, torch.tensor(data.labels, dtype=torch.long)

    def _amp(self):
        """``(autocast dtype or None, gradient scaler)`` of ``--precision`` (fp16 gets a scaler; bf16 has
        float32's range and needs none)."""
        from simret.models.precision import resolve_precision, torch_dtype

        precision = resolve_precision(self.config.precision, self.device)
        if self.config.amp and precision == "fp32":
            if self.device.type != "cuda":
                self.warn("--amp applies to CUDA devices only: it is ignored on %s (use --precision)", self.device)
            else:
                precision = resolve_precision("auto", self.device)
        if precision == "fp32":
            return None, torch.amp.GradScaler("cuda", enabled=False)
        dtype = torch_dtype(precision)
        scaled = dtype == torch.float16 and self.device.type in ("cuda", "cpu")
        self.say("mixed precision: autocast to %s%s", precision, " with a gradient scaler" if scaled else "")
        return dtype, torch.amp.GradScaler(self.device.type if scaled else "cuda", enabled=scaled)

    def _wrap_ddp(self, model: nn.Module, encoder) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        unused = unused_parameters(model, tuple(encoder.data_config["input_size"]), self.device)
        if unused:
            self.say("%d trainable parameter(s) do not take part in the loss (e.g. %s): DDP looks for unused "
                     "parameters every step", len(unused), unused[0])
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=bool(unused))

    # ------------------------------------------------------------------------------------- resume

    def _check_resumable(self, saved: Dict[str, Any], data: LabelledImages) -> None:
        config = self.config
        meta = saved["simret_encoder"]
        args = dict(saved.get("args") or {})
        problems = []
        if config.arch is not None and config.arch.split(".")[0] != str(meta.get("arch", "")).split(".")[0]:
            problems.append(f"--model {config.arch} (checkpoint: {meta.get('arch')})")
        if config.pool != meta.get("pool"):
            problems.append(f"--pool {config.pool} (checkpoint: {meta.get('pool')})")
        if config.gamma != meta.get("gamma"):
            problems.append(f"--gamma {config.gamma} (checkpoint: {meta.get('gamma')})")
        saved_classes = list(saved.get("classes") or [])
        if saved_classes != list(data.classes):
            problems.append(f"the data's {len(data.classes)} classes ({', '.join(data.classes[:4])} …) differ from "
                            f"the checkpoint's {len(saved_classes)} ({', '.join(saved_classes[:4])} …)")
        for key in RESUME_MUST_MATCH:
            if key in args and args[key] != getattr(config, key):
                problems.append(f"{_flag(key)} {getattr(config, key)} (checkpoint: {args[key]})")
        if problems:
            raise ValueError(f"cannot resume {self.last}: the command differs from the checkpoint's training: "
                             + "; ".join(problems) + ". Give the options it was trained with, or start afresh "
                             "with --overwrite (or another --out).")
        should_match = RESUME_SHOULD_MATCH + (("workers",) if config.augment else ())  # workers seed augmentations
        changed = [f"{_flag(k)} {getattr(config, k)} (was {args[k]})" for k in should_match
                   if k in args and args[k] is not None and args[k] != getattr(config, k)]
        if saved.get("world_size", 1) != self.context.world_size:
            changed.append(f"{self.context.world_size} process(es) (was {saved.get('world_size', 1)})")
        if changed:
            self.warn("resuming with changed settings, so the run will not match an uninterrupted one: %s",
                      "; ".join(changed))

    def _restore(self, saved, model: Classifier, optimizer, schedule: WarmupCosine, scaler, total: int) -> int:
        model.head.load_state_dict(saved["head"])
        fresh = [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"])
        for group, (base, decay) in zip(optimizer.param_groups, fresh):
            # the command's lr and weight decay win (with a warning when they changed)
            group["initial_lr"], group["weight_decay"] = base, decay
        schedule.load_state_dict(saved["schedule"])
        if int(saved["schedule"].get("total_steps", total)) != total:
            self.warn("the schedule now spans %d steps (was %d): the cosine continues from step %d on the new "
                      "length", total, saved["schedule"]["total_steps"], schedule.position)
        if saved.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        epoch = int(saved["epoch"])
        self.saved_epoch = epoch
        self.say("resuming %s after epoch %d (step %d)", self.last, epoch, schedule.position)
        return epoch

    def _rank_rng(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        states = list(saved.get("rng") or [])
        if len(states) == self.context.world_size:
            return states[self.context.rank]
        self.warn("the checkpoint holds RNG states for %d process(es), this run has %d: augmentations are reseeded",
                  len(states), self.context.world_size)
        seed_everything(self.config.seed + self.context.rank + 1_000_003 * int(saved["epoch"]))
        return capture_rng(self.device)

    # -------------------------------------------------------------------------------------- epoch

    def _epoch(self, epoch: int, network: nn.Module, model: Classifier, sampler, loader, labels: torch.Tensor,
               optimizer, schedule: WarmupCosine, scaler, amp_dtype, trainable, data: LabelledImages) -> Dict[str, Any]:
        from simret.utils.progress import progress

        config, device = self.config, self.device
        network.train()
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        # loss·n, correct, n, skipped (float64 where the device has it: MPS has not)
        totals = torch.zeros(4, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        failures: Dict[str, str] = {}
        batches = progress(loader, desc=f"epoch {epoch + 1}/{config.epochs}", total=len(loader), unit="batch") \
            if self.show_progress else loader
        input_size = tuple(model.encoder.data_config["input_size"])
        autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None \
            else contextlib.nullcontext()
        for number, (images, indices, failed) in enumerate(batches):
            for item in failed:
                failures[item.path] = item.reason
            totals[3] += len(failed)
            rates = schedule.step()
            if images is None:
                if not self.context.distributed:
                    continue  # nothing readable in this batch: no step (the schedule moves on)
                # every rank must take part in the gradient all-reduce: a zero-weight step on a dummy batch
                images = torch.zeros(2, *input_size)
                indices, weight = torch.zeros(2, dtype=torch.long), 0.0
            else:
                weight = 1.0
            images = images.to(device, non_blocking=True)
            targets = labels[indices].to(device, non_blocking=True)
            with autocast:
                loss, logits = network(images, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * weight).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if weight:
                count = targets.numel()
                totals[0] += loss.detach().to(totals.dtype) * count
                totals[1] += (logits.detach().argmax(1) == targets).sum()
                totals[2] += count
            if (number + 1) % 20 == 0 or number + 1 == len(loader):
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1}, step {number + 1} "
                                             f"(lr {rates[0]:.3g}): lower --lr, or use --grad-clip")
                if self.show_progress:
                    batches.set_postfix(loss=f"{float(totals[0] / max(1.0, float(totals[2]))):.4f}",
                                        lr=f"{rates[0]:.2e}")
        if self.show_progress:
            batches.close()
        all_reduce_sum(totals)
        loss_sum, correct, seen, skipped = (float(v) for v in totals.cpu())
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": schedule.position, "loss": loss_sum / max(1.0, seen),
                  "accuracy": correct / max(1.0, seen), "lr": schedule.last_lr, "images": int(seen),
                  "skipped": int(skipped), "time_s": round(seconds, 3),
                  "images_per_s": round(seen / seconds, 2) if seconds > 0 else None}
        rng_states = all_gather_object(capture_rng(device))
        failure_lists = all_gather_object(failures)
        if not seen:  # every rank sees the same totals: all stop, and no checkpoint is overwritten
            if self.main:
                with self._writing(self.out / SKIPPED_FILE):
                    self._write_skipped(failure_lists)
            raise ValueError(f"epoch {epoch + 1}: no image of {config.data} could be read ({int(skipped)} "
                             f"unreadable, listed in {self.out / SKIPPED_FILE}): fix or remove them")
        if self.main:
            state = {
                "simret_encoder": encoder_metadata(model.encoder),
                "state_dict": {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()},
                "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                "head_kind": config.loss,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "step": schedule.position,
                "rng": rng_states,
                "classes": list(data.classes),
                "world_size": self.context.world_size,
                "args": config.plain(),
            }
            self._save_epoch(state, record, failure_lists)
            note = f", {int(skipped)} unreadable image(s) skipped (see {SKIPPED_FILE})" if skipped else ""
            log.info("epoch %d/%d  loss %.4f  acc %.1f%%  lr %.2e  %.1f s (%.0f img/s)%s  → %s", epoch + 1,
                     config.epochs, record["loss"], 100 * record["accuracy"], record["lr"], seconds,
                     record["images_per_s"] or 0, note, self.last)
        barrier()
        return record

    def _save_epoch(self, state: Dict[str, Any], record: Dict[str, Any], failure_lists: List[Dict[str, str]]) -> None:
        """Write the epoch's checkpoint, its epoch copy, log line and skipped list, as one step: Ctrl-C or
        SIGTERM arriving meanwhile is delivered once they are all written."""
        from simret.utils.atomic import deferred_interrupts

        epoch = int(record["epoch"])
        with deferred_interrupts():
            with self._writing(self.last):
                save_checkpoint(self.last, state)
            self.saved_epoch = epoch
            with self._writing(self.out / f"epoch-{epoch:03d}.pth"):
                keep_epoch_copy(self.out, epoch, self.config.keep)
            with self._writing(self.out / LOG_FILE):
                append_log(self.out, record)
            with self._writing(self.out / SKIPPED_FILE):
                self._write_skipped(failure_lists)

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """An OSError while writing ``path`` (disk full, no permission …) becomes one clear ``DiskWriteError``
        saying what is left intact."""
        from simret.utils.atomic import DiskWriteError, write_failure

        try:
            yield
        except (DiskWriteError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as err:
            if self.last.is_file():
                saved = f" (epoch {self.saved_epoch})" if self.saved_epoch else ""
                intact = (f"the previous checkpoint {self.last}{saved} is intact: free some space, then continue with "
                          f"the same command and --resume")
            else:
                intact = "no checkpoint was written yet: free some space, then run the same command again"
            raise write_failure(path, err, intact) from None

    def _write_skipped(self, failure_lists: List[Dict[str, str]]) -> None:
        """Add this epoch's unreadable images to ``skipped.tsv`` (``simret.utils.skipped``: ``id<TAB>reason``;
        a file of an older simret, ``path<TAB>reason``, is read as well)."""
        from simret.utils.skipped import read_skipped, write_skipped

        merged: Dict[str, str] = {}
        for failures in failure_lists:
            merged.update(failures)
        if merged:
            path = self.out / SKIPPED_FILE
            entries = read_skipped(path)
            entries.update(merged)
            write_skipped(path, sorted(entries.items()))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")
