"""Batched, multi-scale global descriptor extraction (the cirtorch convention).

Per image: optional box crop, resize so the long side is ``max_size`` (never upscaled), then for each scale
``s`` resize by ``s`` (bilinear, as cirtorch's ``extract_ms``), run the encoder, L2-normalise; average the
scales and L2-normalise again. Images of equal size after preprocessing are batched together; nothing is
padded, so an image's descriptor does not depend on the others in its batch. DataLoader workers decode and
resize while the model runs. Unreadable images are reported, never fatal.

The encoder runs through ``simret.models.runtime.prepare_for_inference``: the ``precision`` asked for
(``fp32`` by default here, exact; the command line's default is ``auto``), channels-last for CNNs, and with
``compile`` a compiled graph whose height and width are dynamic (no recompilation per image size). When the
runtime runs passes side by side (OpenVINO on two or more threads: ``InferenceEncoder.runs_in_parallel``),
two batches are in flight: the next one is decoded and its scales started while the previous one runs
(1.38x per ``simret index`` pass, descriptors identical); a single image (a query) runs on the latency path.

``extract`` is a pure function of ``(encoder, ids)`` (no global state), so a distributed caller can give each
rank its own shard of ids and gather the results.
"""
from __future__ import annotations

import collections
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
Box = Sequence[float]
BatchSize = Union[int, str, None]  # a number, or "auto" (by image size and device)
DEFAULT_BATCH_SIZE = "auto"
BUFFER_BATCHES = 4  # images of different sizes wait at most this many batches' worth before running


@dataclass
class ExtractResult:
    """What ``extract`` produced.

    Attributes:
        descriptors: ``(n_ok, D)`` float32, L2-normalised rows, in input order.
        ids: the ids that succeeded (row ``i`` of ``descriptors`` is ``ids[i]``), in input order.
        failures: ``(id, reason)`` for every image that could not be used.
        positions: ``(n_ok,)`` int64 positions of ``ids`` in the input list.
    """

    descriptors: np.ndarray
    ids: List[str]
    failures: List[Tuple[str, str]] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class ExtractedBatch:
    """One step of ``iter_extract``: rows computed (``positions`` into the input ids) and failures."""

    positions: np.ndarray  # (b,) int64
    descriptors: np.ndarray  # (b, D) float32
    failures: List[Tuple[int, str]]  # (position, reason)


def default_workers(device: Any = None) -> int:
    """DataLoader workers for a model on ``device``: ``simret.utils.devices.default_loader_workers`` (up to 8
    beside an accelerator; on the CPU, whose cores the model uses, none on <= 2 cores)."""
    from simret.utils.devices import default_loader_workers

    return default_loader_workers(device)


def _keep(item: Any) -> Any:  # DataLoader collate for single items (picklable, unlike a lambda)
    return item


MAX_SCALE = 4.0


def check_scales(scales: Sequence[float]) -> Tuple[float, ...]:
    values = tuple(float(s) for s in scales)
    if not values or any(not np.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    if max(values) > MAX_SCALE:  # each scale multiplies the sides of the max-size image: 1e9 would never end
        raise ValueError(f"scales must be at most {MAX_SCALE:g}, got {max(values):g}")
    return values


def parse_scales(text: str) -> Tuple[float, ...]:
    """``"1,0.707,0.5"`` → ``(1.0, 0.707, 0.5)``; also accepts ``1/sqrt(2)`` style via plain floats only."""
    try:
        return check_scales([float(part) for part in text.replace(" ", "").split(",") if part])
    except ValueError as err:
        raise ValueError(f"--scales takes comma-separated positive numbers like 1,0.707,0.5 ({err})") from None


def iter_extract(encoder: Any, root: PathLike, ids: Sequence[str], *, boxes: Optional[Sequence[Optional[Box]]] = None,
                 scales: Sequence[float] = (1.0,), max_size: Optional[int] = 1024,
                 batch_size: BatchSize = DEFAULT_BATCH_SIZE, workers: Optional[int] = None, device: Any = None,
                 precision: Optional[str] = None, compile: Any = None, half: bool = False,
                 progress: bool = True) -> Iterator[ExtractedBatch]:
    """Like ``extract``, but yields results as they are computed (out of order across image sizes)."""
    from torch.utils.data import DataLoader

    from simret.data.images import Failed, ImageList, RetrievalTransform
    from simret.models.runtime import InferenceEncoder, prepare_for_inference
    from simret.utils.progress import progress as progress_bar

    scales = check_scales(scales)
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be a positive number of pixels, got {max_size}")
    precision = _precision_argument(precision, half, prepared=isinstance(encoder, InferenceEncoder))
    base = encoder.encoder if isinstance(encoder, InferenceEncoder) else encoder
    was_training = base.training
    runtime = prepare_for_inference(encoder, precision, device, compile=compile)
    device = runtime.device
    batch_size = resolve_batch_size(batch_size, max_size, device)
    config = runtime.data_config
    transform = RetrievalTransform(tuple(config["mean"]), tuple(config["std"]), max_size)
    dataset = ImageList(root, ids, transform, boxes=boxes)
    workers = default_workers(device) if workers is None else int(workers)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_keep,
                        persistent_workers=False,
                        **({"prefetch_factor": max(2, 2 * batch_size // max(workers, 1))} if workers else {}))
    # side by side only when two passes can overlap: one batch at one scale keeps all the threads on it
    overlaps = len(dataset) > 1 and (len(dataset) > batch_size or len(scales) > 1)
    runner = _BatchRunner(runtime, scales, len(dataset), parallel=overlaps)
    log.debug("extracting %d images: %s, batch size %d", len(dataset), runtime.describe(), batch_size)
    running = _InFlight(runner)
    buckets: Dict[Tuple[int, ...], List[Tuple[Any, int]]] = {}
    buffered = 0
    bar = progress_bar(total=len(dataset), desc="extract", unit="img") if progress else _NoBar()
    try:
        for item in loader:
            if isinstance(item, Failed):
                bar.update(1)
                yield ExtractedBatch(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), [(item.index, item.reason)])
                continue
            tensor, position = item
            bucket = buckets.setdefault(tuple(tensor.shape), [])
            bucket.append((tensor, position))
            buffered += 1
            if len(bucket) >= batch_size:
                full = buckets.pop(tuple(tensor.shape))
            elif buffered >= BUFFER_BATCHES * batch_size:
                full = buckets.pop(max(buckets, key=lambda key: len(buckets[key])))
            else:
                continue
            buffered -= len(full)
            yield from _counted(running.push(full), bar)
        for key in list(buckets):
            yield from _counted(running.push(buckets.pop(key)), bar)
        yield from _counted(running.drain(), bar)
    finally:
        running.abandon()
        bar.close()
        if was_training:
            base.train()


class _InFlight:
    """Batches started on ``runner`` and not yet returned, oldest first: with a runtime that runs passes side
    by side, one batch runs while the next is decoded and started (two in flight); otherwise one at a time."""

    def __init__(self, runner: _BatchRunner) -> None:
        self.runner = runner
        self.batches: Deque[Callable[[], ExtractedBatch]] = collections.deque()

    @property
    def depth(self) -> int:
        """Batches kept in flight (asked each time: ``compile="auto"`` may compile in the middle of a run)."""
        return 2 if self.runner.parallel and self.runner.runtime.runs_in_parallel else 1

    def push(self, items: List[Tuple[Any, int]]) -> List[ExtractedBatch]:
        """Start ``items``; returns the batches that finish to keep at most ``depth`` in flight (in order)."""
        self.batches.append(self.runner.start(items))
        finished = []
        while len(self.batches) >= self.depth:
            finished.append(self.batches.popleft()())
        return finished

    def drain(self) -> List[ExtractedBatch]:
        """Every batch still in flight, finished, in order."""
        return [self.batches.popleft()() for _ in range(len(self.batches))]

    def abandon(self) -> None:
        """Drop what is in flight (the consumer stopped early or failed): each pass finishes before its
        input is freed (``OpenVinoForward``'s requests wait for that), nothing is returned."""
        self.batches.clear()


def _counted(batches: List[ExtractedBatch], bar: Any) -> Iterator[ExtractedBatch]:
    for batch in batches:
        bar.update(len(batch.positions) + len(batch.failures))
        yield batch


def extract(encoder: Any, root: PathLike, ids: Sequence[str], *, boxes: Optional[Sequence[Optional[Box]]] = None,
            scales: Sequence[float] = (1.0,), max_size: Optional[int] = 1024,
            batch_size: BatchSize = DEFAULT_BATCH_SIZE, workers: Optional[int] = None, device: Any = None,
            precision: Optional[str] = None, compile: Any = None, half: bool = False,
            progress: bool = True) -> ExtractResult:
    """Global descriptors of the images ``root/<id>``.

    Args:
        encoder: a ``simret.models.Encoder`` (or any module ``images (B,3,H,W) → (B,D)`` with ``data_config``),
            or an ``InferenceEncoder`` (``prepare_for_inference``), used as it was prepared unless
            ``precision``/``compile`` say otherwise.
        root: folder the ids are relative to (absolute ids are used as they are).
        ids: image ids.
        boxes: optional ``(x1, y1, x2, y2)`` per image (None for whole images), cropped before resizing
            (Revisited queries).
        scales: e.g. ``(1, 1/√2, 1/2)``; each is applied to the ``max_size`` image.
        max_size: long side after the first resize (None: keep the image size).
        batch_size: images per forward pass (only same-size images share one); ``"auto"``: by image size
            and device (``simret.models.runtime.auto_batch_size``).
        workers: DataLoader worker processes that decode and resize while the model runs (default:
            ``default_workers(device)``; 0 loads in this process).
        device: where the encoder runs (default: where its parameters are; the encoder is moved there).
        precision: ``fp32`` (default for an ``Encoder``: exact), ``bf16``, ``fp16`` or ``auto``
            (``simret.models.precision``); descriptors are float32 whatever it is.
        compile: ``torch.compile`` the encoder: False (default for an ``Encoder``), True, or ``"auto"`` (once
            the run is long enough to repay the compile time; ``simret.models.runtime``).
        half: deprecated, ``precision="half"`` (bf16 on the CPU, fp16 on accelerators).
        progress: show a progress bar on stderr (unless progress bars are switched off globally).

    Returns:
        ``ExtractResult`` with ``descriptors (n_ok, D)`` float32 L2-normalised rows in input order, the
        ``ids`` that succeeded, and ``failures`` ``[(id, reason)]``.
    """
    ids = list(ids)
    from simret.models.runtime import InferenceEncoder

    precision = _precision_argument(precision, half, prepared=isinstance(encoder, InferenceEncoder))
    positions: List[np.ndarray] = []
    rows: List[np.ndarray] = []
    failed: List[Tuple[int, str]] = []
    for batch in iter_extract(encoder, root, ids, boxes=boxes, scales=scales, max_size=max_size,
                              batch_size=batch_size, workers=workers, device=device, precision=precision,
                              compile=compile, progress=progress):
        if len(batch.positions):
            positions.append(batch.positions)
            rows.append(batch.descriptors)
        failed.extend(batch.failures)
    dim = rows[0].shape[1] if rows else int(getattr(encoder, "dim", 0))
    if not positions:
        return ExtractResult(np.zeros((0, dim), np.float32), [], _failures(ids, failed), np.zeros(0, np.int64))
    order_positions = np.concatenate(positions)
    order = np.argsort(order_positions, kind="stable")
    descriptors = np.concatenate(rows)[order]
    kept = order_positions[order]
    return ExtractResult(np.ascontiguousarray(descriptors), [ids[i] for i in kept.tolist()],
                         _failures(ids, failed), kept)


def _failures(ids: Sequence[str], failed: List[Tuple[int, str]]) -> List[Tuple[str, str]]:
    return [(ids[position], reason) for position, reason in sorted(failed)]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _BatchRunner:
    """Runs the prepared encoder on lists of same-size ``(tensor (3,H,W), position)`` items, all scales;
    with ``compile="auto"`` it decides, from the eager time per image so far, whether compiling pays off.
    ``start`` returns at once when the runtime runs passes side by side (``parallel``); calling what it
    returns gives the ``ExtractedBatch``."""

    def __init__(self, runtime: Any, scales: Tuple[float, ...], total: int, parallel: bool = False) -> None:
        self.runtime = runtime
        self.scales = scales
        self.total = total
        self.parallel = parallel
        self.done = 0
        self.eager_images = 0
        self.eager_seconds = 0.0

    def descriptors(self, images):
        """images ``(B, 3, H, W)`` → ``(B, D)`` float32: per scale L2N(encoder), mean, L2N."""
        return self._combine(self._start_scales(images, parallel=False))

    def _start_scales(self, images, parallel: bool) -> List[Callable[[], Any]]:
        """The forward pass of every scale of images ``(B, 3, H, W)``, started (see ``InferenceEncoder.start``)."""
        import torch
        import torch.nn.functional as F

        images = self.runtime.prepare_images(images)
        running = []
        with torch.inference_mode():
            for scale in self.scales:
                batch = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                                  align_corners=False)
                running.append(self.runtime.start(batch, side_by_side=parallel))
        return running

    def _combine(self, running: List[Callable[[], Any]]):
        """Per-scale outputs ``(B, D)`` (waited for in order) → L2N(mean of L2N) ``(B, D)`` float32."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            total = None
            for wait in running:
                out = F.normalize(wait(), dim=-1)
                total = out if total is None else total + out
            return F.normalize(total / len(running), dim=-1)

    def __call__(self, items: List[Tuple[Any, int]]) -> ExtractedBatch:
        return self.start(items)()

    def start(self, items: List[Tuple[Any, int]]) -> Callable[[], ExtractedBatch]:
        """Start ``items``' forward passes; the returned function waits for them and gives their batch."""
        positions = np.asarray([position for _, position in items], dtype=np.int64)
        images = _stack([tensor for tensor, _ in items], self.runtime.device)
        started = time.perf_counter()
        compiled = self.runtime.compiled
        try:
            running = self._start_scales(images, self.parallel)
        except RuntimeError as err:  # e.g. an image too small for the trunk at some scale
            failed = self._failed(images, positions, err)
            return lambda: failed
        return lambda: self._finish(images, positions, running, started, compiled)

    def _finish(self, images, positions: np.ndarray, running: List[Callable[[], Any]], started: float,
                compiled: bool) -> ExtractedBatch:
        try:
            result = ExtractedBatch(positions, self._combine(running).cpu().numpy(), [])
        except RuntimeError as err:
            return self._failed(images, positions, err)
        self.done += len(positions)
        if not compiled and self.runtime.compile_mode == "auto":
            self.eager_images += len(positions)
            self.eager_seconds += time.perf_counter() - started
            self.runtime.maybe_compile(self.eager_images, self.eager_seconds, self.total - self.done)
        return result

    def _failed(self, images, positions: np.ndarray, err: RuntimeError) -> ExtractedBatch:
        """A batch whose forward pass failed: image by image when there are several, else the failure."""
        if len(positions) > 1:
            return self._one_by_one(images, positions)
        return ExtractedBatch(np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                              [(int(positions[0]), _model_error(err, tuple(images.shape[-2:])))])

    def _one_by_one(self, images, positions: np.ndarray) -> ExtractedBatch:
        kept, rows, failures = [], [], []
        for image, position in zip(images, positions.tolist()):
            try:
                rows.append(self.descriptors(image[None]).cpu().numpy())
                kept.append(position)
            except RuntimeError as err:
                failures.append((position, _model_error(err, tuple(image.shape[-2:]))))
        descriptors = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        return ExtractedBatch(np.asarray(kept, dtype=np.int64), descriptors, failures)


def _stack(tensors: List[Any], device: Any):
    """One batch ``(B, 3, H, W)``; in page-locked memory when it goes to a CUDA device, so the copy there is
    asynchronous (``non_blocking``) and overlaps the previous batch's work."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)  # one image: a view, no copy
    pinned = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(tensors, out=pinned)


def _precision_argument(precision: Optional[str], half: bool, prepared: bool = False) -> Optional[str]:
    """The precision asked for: ``precision``, else the deprecated ``half`` flag's, else ``fp32`` (None for
    an ``InferenceEncoder``: the precision it was prepared with)."""
    if half and precision is None:
        warnings.warn("half=True is deprecated: pass precision='bf16', 'fp16' or 'auto'", DeprecationWarning,
                      stacklevel=3)
        return "half"
    return precision or (None if prepared else "fp32")


def resolve_batch_size(batch_size: BatchSize, max_size: Optional[int], device: Any) -> int:
    """An ``int`` batch size (``"auto"``/None: ``auto_batch_size(max_size, device)``); ValueError below 1."""
    if batch_size is None or str(batch_size).strip().lower() == "auto":
        from simret.models.runtime import auto_batch_size

        return auto_batch_size(max_size, device)
    value = int(batch_size)
    if value < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return value


def _model_error(err: BaseException, size: Tuple[int, int]) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "out of memory" in message.lower():
        raise err
    return f"the model cannot process this image at {size[1]}x{size[0]} pixels ({message[:160]})"

