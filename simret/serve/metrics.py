"""Prometheus text exposition (format 0.0.4) of the server's counters, written by hand: a few counters,
two histograms and gauges, labelled by route template (never the raw path), so cardinality stays bounded."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = Tuple[Tuple[str, str], ...]


class Histogram:
    """Cumulative-bucket histogram of one series."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: Labels) -> List[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f"{name}_bucket{_labels(labels + (('le', _number(bound)),))} {running}")
        out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {self.total}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.total}")
        return out


class Metrics:
    """The server's metrics; thread-safe; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Dict[Labels, int] = defaultdict(int)
        self.errors: Dict[Labels, int] = defaultdict(int)
        self.latency: Dict[Labels, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.gauges: Dict[str, Tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read when the metrics are rendered (queue depth, images, generation info …)."""
        self.gauges[name] = (help_text, read)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (("method", method), ("route", route), ("status", str(status)))
        with self._lock:
            self.requests[labels] += 1
            if status >= 400:
                self.errors[labels] += 1
            key = (("route", route),)
            if key not in self.latency:
                self.latency[key] = Histogram(LATENCY_BUCKETS)
            self.latency[key].observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP simret_requests_total HTTP requests answered, by method, route and status.",
                     "# TYPE simret_requests_total counter"]
            lines += [f"simret_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            lines += ["# HELP simret_request_errors_total HTTP requests answered with a 4xx or 5xx status.",
                      "# TYPE simret_request_errors_total counter"]
            lines += [f"simret_request_errors_total{_labels(k)} {v}" for k, v in sorted(self.errors.items())]
            lines += ["# HELP simret_request_seconds Time to answer a request, by route.",
                      "# TYPE simret_request_seconds histogram"]
            for key, histogram in sorted(self.latency.items()):
                lines += histogram.lines("simret_request_seconds", key)
            lines += ["# HELP simret_batch_size Query images described per forward pass of the model thread.",
                      "# TYPE simret_batch_size histogram"]
            lines += self.batches.lines("simret_batch_size", ())
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(float(read()))}"]
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))
