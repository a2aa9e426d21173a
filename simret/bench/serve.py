"""``simret serve``: warm query latency against a cold ``simret search``, throughput under concurrent clients
with and without micro-batching, and the server's memory over a long run. Everything on loopback, against
real server processes (``python -m simret serve``), with a bounded number of queries and a time cap per run.
"""
from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from simret.bench import Row, Section

TITLE = "Serve: warm queries vs a cold simret search; micro-batching under concurrent clients"
CLIENTS = (1, 4, 16)
RUN_SECONDS_CAP = 180.0  # no single measured run lasts longer (counted, noted if reached)
REST_SECONDS = 3.0  # idle time before a memory reading (the server trims freed memory after 1 s idle)


class ServerProcess:
    """``python -m simret serve DIR --port 0 …`` in a subprocess; its port is read from the log line."""

    def __init__(self, index_dir: Path, *options: str, env: Optional[Dict[str, str]] = None) -> None:
        command = [sys.executable, "-m", "simret", "serve", str(index_dir), "--port", "0", "--reload-interval", "0",
                   *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: List[str] = []
        self.port: Optional[int] = None
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                found = re.search(r"serving .* on http://[^:]+:(\d+)/", line)
                if found:
                    self.port = int(found.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.port is None:
            self.process.kill()
            raise RuntimeError("simret serve did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc), MB."""
        from simret.bench.peak import process_status_bytes

        return process_status_bytes("VmRSS", self.process.pid) / (1 << 20)

    def rss_at_rest_mb(self, seconds: float = REST_SECONDS) -> float:
        """``rss_mb`` once the server has been idle for ``seconds`` (it hands freed memory back after 1 s)."""
        time.sleep(seconds)
        return self.rss_mb()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def post_query(client, url: str, name: str, data: bytes, k: int = 10) -> Tuple[int, dict]:
    response = client.post(f"{url}/search", params={"k": k}, files={"image": (name, data, "image/jpeg")})
    return response.status_code, (response.json() if response.status_code == 200 else {})


def sequential_latencies(url: str, queries: List[Tuple[str, bytes]], count: int) -> Tuple[List[float], int]:
    """Seconds per query, one client, one after another; and the number of non-200 answers."""
    import httpx

    times, errors = [], 0
    with httpx.Client(timeout=120) as client:
        for number in range(count):
            name, data = queries[number % len(queries)]
            start = time.perf_counter()
            status, _ = post_query(client, url, name, data)
            times.append(time.perf_counter() - start)
            errors += status != 200
    return times, errors


def concurrent_rate(url: str, queries: List[Tuple[str, bytes]], clients: int, total: int) -> Tuple[float, int, int]:
    """``clients`` threads (one keep-alive connection each) share ``total`` queries as fast as answered.

    Returns ``(queries per second, queries done, errors)``; stops early at ``RUN_SECONDS_CAP``.
    """
    import httpx

    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": 0}
    barrier = threading.Barrier(clients + 1)
    deadline: List[float] = []

    def work() -> None:
        with httpx.Client(timeout=300) as client:
            barrier.wait()
            while True:
                with lock:
                    number = state["next"]
                    if number >= total or time.perf_counter() > deadline[0]:
                        return
                    state["next"] += 1
                name, data = queries[number % len(queries)]
                try:
                    status, _ = post_query(client, url, name, data)
                except httpx.HTTPError:
                    status = 0
                with lock:
                    state["done"] += 1
                    state["errors"] += status != 200

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline.append(time.perf_counter() + RUN_SECONDS_CAP)
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return state["done"] / seconds, state["done"], state["errors"]


def cold_search_seconds(index_dir: Path, query: Path, env: Dict[str, str]) -> Tuple[float, List[str]]:
    """Wall time of ``simret search DIR QUERY --format jsonl`` (a fresh process) and the ids it returned."""
    import json

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "simret", "-q", "search", str(index_dir), str(query), "-k", "10",
                             "--format", "jsonl"], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - start, json.loads(result.stdout.splitlines()[0])["ids"]


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def write_jpegs(folder: Path, count: int, size: tuple) -> list:
    """``count`` JPEGs of ``size`` (width, height) cut from the packaged photographs (varied crops)."""
    from simret.data.samples import DISTRACTORS, LANDMARKS, load_photo

    photos = [load_photo(name) for name in list(LANDMARKS) + list(DISTRACTORS)]
    ids = []
    for number in range(count):
        photo = photos[number % len(photos)]
        shift = (number // len(photos)) * 7
        width, height = photo.size
        box = (shift % max(1, width // 4), shift % max(1, height // 4), width - (shift % 9), height - (shift % 5))
        name = f"{number:05d}.jpg"
        photo.crop(box).resize(size).save(folder / name, quality=90)
        ids.append(name)
    return ids


def run(quick: bool = False) -> Section:

    section = Section("serve", TITLE if not quick else "Serve (quick sizes)", "python scripts/bench.py serve")
    arch, n_database, size, gamma = ("test_resnet", 24, (96, 72), "2.0") if quick else ("resnet50", 120, (224, 168),
                                                                                           "2.0")
    n_latency, n_cold, rss_counts = (12, 1, (20, 60)) if quick else (100, 3, (100, 1000))
    per_run = {1: 12, 4: 24, 16: 48} if quick else {1: 24, 4: 48, 16: 96}
    repeats = 1 if quick else 2
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SIMRET_PROGRESS": "0"}
    root_of_package = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root_of_package + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="simret-bench-serve-") as folder:
        root = Path(folder)
        (root / "db").mkdir()
        (root / "queries").mkdir()
        write_jpegs(root / "db", n_database, size)
        query_ids = write_jpegs(root / "queries", 16, size)  # the same photographs, other crops than most db ones
        queries = [(name, (root / "queries" / name).read_bytes()) for name in query_ids]
        index_dir = root / "idx"
        subprocess.run([sys.executable, "-m", "simret", "-q", "index", str(root / "db"), "--out", str(index_dir),
                        "--model", arch, "--weights", "none", "--gamma", gamma, "--max-size", str(max(size)),
                        "-j", "0"],
                       check=True, env=env, capture_output=True)

        cold = [cold_search_seconds(index_dir, root / "queries" / query_ids[0], env) for _ in range(n_cold)]
        cold_seconds = statistics.median(seconds for seconds, _ in cold)

        batched = ServerProcess(index_dir, "--batch-size", "16", env=env)
        single = ServerProcess(index_dir, "--batch-size", "1", env=env)
        sent = {batched: 0, single: 0}
        errors = 0
        capped = []
        try:
            import httpx

            with httpx.Client(timeout=120) as client:  # warm-up, and the same answer as the cold search
                for server in (batched, single):
                    for name, data in queries[:4]:
                        post_query(client, server.url, name, data)
                        sent[server] += 1
                _, answer = post_query(client, batched.url, *queries[0])
                sent[batched] += 1
            assert answer["ids"] == cold[0][1], "the server and simret search disagree"

            # memory baseline: the batched server after ~100 queries, the first of them under 16 clients, so
            # its allocator has seen full batches before it is measured (the rest is compared with this)
            _, done, failed = concurrent_rate(batched.url, queries, 16, rss_counts[0] - sent[batched])
            sent[batched] += done
            errors += failed
            rss = {"first": (batched.rss_at_rest_mb(), sent[batched])}

            latencies, failed = sequential_latencies(batched.url, queries, n_latency)
            sent[batched] += n_latency
            errors += failed
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)

            rates: Dict[Tuple[int, str], List[float]] = {}
            for _ in range(repeats):
                for clients in CLIENTS:
                    for label, server in (("batched", batched), ("single", single)):
                        rate, done, failed = concurrent_rate(server.url, queries, clients, per_run[clients])
                        rates.setdefault((clients, label), []).append(rate)
                        sent[server] += done
                        errors += failed
                        if done < per_run[clients]:
                            capped.append(f"{clients} clients ({label}): {done} of {per_run[clients]} queries")
            batch_sizes = _mean_batch(batched.url)

            while sent[batched] < rss_counts[1]:  # then up to 1,000 queries in all (each run time-capped)
                _, done, failed = concurrent_rate(batched.url, queries, 16, rss_counts[1] - sent[batched])
                sent[batched] += done
                errors += failed
                if not done:
                    break
            rss["last"] = (batched.rss_at_rest_mb(), sent[batched])
        finally:
            exits = [batched.stop(), single.stop()]

    section.rows.append(Row("warm POST /search, 1 client, p50", p50 * 1000, "ms",
                            baseline="cold `simret search DIR IMAGE` (new process: imports, model, index, 1 query)",
                            baseline_value=cold_seconds * 1000, ratio=cold_seconds / p50, target="≥ 20x",
                            met=None if quick else cold_seconds / p50 >= 20))
    section.rows.append(Row("warm POST /search, 1 client, p99", p99 * 1000, "ms", baseline="cold `simret search`",
                            baseline_value=cold_seconds * 1000, ratio=cold_seconds / p99))
    for clients in CLIENTS:
        with_batching = statistics.median(rates[(clients, "batched")])
        without = statistics.median(rates[(clients, "single")])
        wanted = clients == 16
        section.rows.append(Row(f"{clients} concurrent client(s), micro-batching (--batch-size 16)", with_batching,
                                "queries/s", baseline="no micro-batching (--batch-size 1)", baseline_value=without,
                                ratio=with_batching / without, target="≥ 1.5x" if wanted else None,
                                met=(with_batching / without >= 1.5) if wanted and not quick else None))
    (rss_low, count_low), (rss_high, count_high) = rss["first"], rss["last"]
    section.rows.append(Row(f"server RSS after {count_high} queries", rss_high, "MB",
                            baseline=f"after {count_low} queries", baseline_value=rss_low, ratio=rss_high / rss_low,
                            target="≤ 1.05x", met=None if quick else rss_high / rss_low <= 1.05))
    total = sum(sent.values())
    section.rows.append(Row(f"failed requests of {total}", errors, "", target="0", met=errors == 0))
    section.notes.append(f"{arch} + SimPool (gamma {gamma}), random weights, on the CPU; index of {n_database} JPEGs "
                         f"{size[0]}x{size[1]} (flat), queries: 16 JPEGs of the same size (so micro-batches share "
                         f"forward passes), k=10. Two server processes on loopback, started with `simret serve "
                         f"--batch-size 16` (waits up to 5 ms for more queries) and `--batch-size 1`; clients are "
                         f"threads of the benchmark process, one keep-alive connection each.")
    section.notes.append(f"cold: median of {n_cold} runs of a fresh `simret search` process; warm: {n_latency} "
                         f"sequential uploads to the running server; throughput: median of {repeats} runs of "
                         f"{', '.join(f'{per_run[c]} queries at {c}' for c in CLIENTS)} clients, batched and "
                         f"unbatched runs interleaved. Mean batch size seen by the batched server over its whole "
                         f"run: {batch_sizes:.2f}.")
    section.notes.append(f"memory: VmRSS of the batched server after its first {count_low} queries (most of them "
                         f"from 16 clients, so full batches have been through the model) and after {count_high}, "
                         f"each read after {REST_SECONDS:.0f} s without queries (the server hands the memory freed "
                         f"by its forward passes back to the system once idle for 1 s).")
    section.notes.append(f"The warm answer's ids equal the cold search's. Servers stopped with SIGTERM: exit "
                         f"status {exits}.")
    if capped:
        section.notes.append(f"runs stopped by the {RUN_SECONDS_CAP:.0f} s cap: " + "; ".join(capped))
    section.notes.append("The machine is shared (2 cores); client threads, the server and other work compete for "
                         "them, so absolute rates move between runs; the ratios are measured in the same run.")
    return section


def _mean_batch(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = float(re.search(r"^simret_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^simret_batch_size_count (\S+)$", text, re.M).group(1))
    return total / count if count else 0.0
