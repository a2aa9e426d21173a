"""Micro-batching: one thread owns the model; concurrent queries share its forward passes.

Requests put jobs on a bounded queue. The worker takes the first job, then whatever else arrives within
``max_wait`` seconds, up to ``max_batch`` images, and describes them in one ``describe_queries`` call
(images of equal size after resizing share one forward pass; nothing is padded, so a descriptor never
depends on its batch-mates). Images to classify (``embed_image``) are batched the same way, described as
the support set's images are (``embed``, one fixed input size). Other model work (attention maps) runs
on the same thread, one job at a time, so the model is never used from two threads nor copied.

Once the queue has stayed empty for ``trim_interval`` seconds after some work, the thread hands the memory
freed by the forward passes back to the system: batches of every size from 1 to ``max_batch`` leave free
holes in glibc's arenas that would otherwise make the resident memory creep up over a long run. It never
runs while queries wait.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from simret.utils.logs import get_logger

log = get_logger(__name__)


class QueueFull(RuntimeError):
    """More queries are waiting than the server accepts (answer 503)."""


class ImageRejected(ValueError):
    """A query image that cannot be described; ``reason`` as ``extract`` reports it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DescribeJob:
    """Describe one image file with ``settings`` (the index's meta record); the future gets ``(1, D)``."""

    path: str
    box: Optional[Sequence[float]]
    meta: Dict[str, Any]
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> Hashable:
        return (tuple(self.meta["scales"]), self.meta["max_size"])


@dataclass
class EmbedJob:
    """Describe one image file as the support set's images are (``embed``); the future gets ``(1, D)``."""

    path: str
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> Hashable:
        return ("embed",)


@dataclass
class CallJob:
    """Run ``fn()`` on the model thread; the future gets its result."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """The model's thread and its queue.

    Args:
        describe: ``(paths, boxes, meta) → QueryDescriptors`` (``describe_queries`` bound to the encoder).
        embed: ``paths → (features (n, D), kept indices, [(index, reason)])`` (``embed_images`` bound to the
            encoder and the support set's preprocessing); None: ``embed_image`` is refused.
        max_batch: most images per call of ``describe`` (1: no batching).
        max_wait: seconds to wait for more jobs once one has arrived.
        max_queue: most jobs waiting; more are refused with ``QueueFull``.
        on_batch: called with the size of every batch described (metrics).
        trim_interval: seconds of idleness after which freed memory is handed back (None: never).
    """

    def __init__(self, describe: Callable[..., Any], *, embed: Optional[Callable[[List[str]], Any]] = None,
                 max_batch: int = 16, max_wait: float = 0.005, max_queue: int = 256,
                 on_batch: Optional[Callable[[int], None]] = None, trim_interval: Optional[float] = 1.0) -> None:
        if max_batch < 1:
            raise ValueError(f"batch size must be at least 1, got {max_batch}")
        self.describe = describe
        self.embed = embed
        self.max_batch = max_batch
        self.max_wait = max(0.0, float(max_wait))
        self.on_batch = on_batch
        self.trim_interval = trim_interval
        self.trims = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------------ public

    @property
    def depth(self) -> int:
        """Jobs waiting now."""
        return self._queue.qsize()

    def describe_image(self, path: str, box: Optional[Sequence[float]], meta: Dict[str, Any]) -> Future:
        """Queue one image; the future resolves to its raw descriptor ``(1, D)`` or raises ``ImageRejected``."""
        return self._put(DescribeJob(path, box, meta))

    def embed_image(self, path: str) -> Future:
        """Queue one image to classify; the future resolves to its feature ``(1, D)`` (as the support set's
        are described) or raises ``ImageRejected``."""
        if self.embed is None:
            raise RuntimeError("this batcher was made without an embed function")
        return self._put(EmbedJob(path))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the model thread (between batches)."""
        return self._put(CallJob(fn))

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="simret-serve-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs queued so far, then end the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    # ------------------------------------------------------------------ the model thread

    def _put(self, job: Any) -> Future:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} queries are waiting already; try again shortly") from None
        return job.future

    def _run(self) -> None:
        worked = False
        while True:
            try:
                job = self._queue.get(timeout=self.trim_interval if worked else None)
            except queue.Empty:  # idle for trim_interval after some work
                self._trim()
                worked = False
                continue
            worked = self.trim_interval is not None
            if job is _STOP:
                return
            if isinstance(job, CallJob):
                _settle(job.future, job.fn)
                continue
            batch, calls, stop = self._gather(job)
            self._describe(batch)
            for call in calls:
                _settle(call.future, call.fn)
            if stop:
                return

    def _trim(self) -> None:
        """Hand the memory freed by the model's work back to the system (the queue is empty)."""
        from simret.utils.allocator import release_freed_memory

        release_freed_memory()
        self.trims += 1

    def _gather(self, first: Any):
        """The first job and those arriving within ``max_wait``, up to ``max_batch`` (calls set aside)."""
        batch: List[Any] = [first]
        calls: List[CallJob] = []
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                return batch, calls, True
            if isinstance(job, CallJob):
                calls.append(job)
            else:
                batch.append(job)
        return batch, calls, False

    def _describe(self, batch: List[Any]) -> None:
        """Describe a batch of ``DescribeJob``s and ``EmbedJob``s: one call per group of equal settings."""
        groups: Dict[Hashable, List[Any]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for jobs in groups.values():
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                rows, reasons = self._rows(live)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
                log.exception("describing %d query image(s) failed", len(live))
                for job in live:
                    job.future.set_exception(err)
                continue
            for position, job in enumerate(live):
                if position in rows:
                    job.future.set_result(np.asarray(rows[position], np.float32)[None])
                else:
                    job.future.set_exception(ImageRejected(reasons.get(position, "the image could not be used")))

    def _rows(self, jobs: List[Any]) -> Tuple[Dict[int, np.ndarray], Dict[int, str]]:
        """One group's descriptors by position in ``jobs``, and why the others could not be described."""
        paths = [job.path for job in jobs]
        if isinstance(jobs[0], EmbedJob):
            features, kept, failures = self.embed(paths)
            return {int(i): row for i, row in zip(kept, features)}, {int(i): reason for i, reason in failures}
        described = self.describe(paths, [job.box for job in jobs], jobs[0].meta)
        rows = {int(p): row for p, row in zip(described.positions.tolist(), described.descriptors)}
        by_path = dict(described.failures)
        return rows, {i: by_path[path] for i, path in enumerate(paths) if path in by_path}


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as err:  # noqa: BLE001 - handed to the waiting request
        future.set_exception(err)
