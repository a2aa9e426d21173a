"""Benchmarks behind ``scripts/bench.py``: each section module measures one claim against its baseline.

A section module exposes ``TITLE`` and ``run(quick: bool) -> Section``. Results are kept as JSON in
``benchmarks/<section>.json`` and assembled into ``BENCHMARKS.md`` (machine, command, medians, ratios).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

# order in BENCHMARKS.md
SECTIONS = ["encoder", "extract", "search", "scale", "integrity", "metrics", "fewshot", "serve"]


@dataclass
class Row:
    """One measured line: ``value`` (median) of ``what``, against a baseline, with the target it must meet."""

    what: str
    value: float
    unit: str
    baseline: Optional[str] = None
    baseline_value: Optional[float] = None
    ratio: Optional[float] = None
    target: Optional[str] = None
    met: Optional[bool] = None


@dataclass
class Section:
    name: str
    title: str
    command: str
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    machine: Dict[str, str] = field(default_factory=dict)
    date: str = ""


def machine_info() -> Dict[str, str]:
    """CPU model, cores, OS, Python, torch and thread count of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "os": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover
        pass
    return info


def median_time(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, runs interleaved (a, b, a, b …) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def save_section(section: Section, directory: Path) -> Path:
    section.machine = section.machine or machine_info()
    section.date = section.date or time.strftime("%Y-%m-%d")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{section.name}.json"
    path.write_text(json.dumps(asdict(section), indent=2) + "\n")
    return path


def load_sections(directory: Path) -> List[Section]:
    sections = []
    for name in SECTIONS:
        path = directory / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            data["rows"] = [Row(**row) for row in data.get("rows", [])]
            sections.append(Section(**data))
    return sections


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    if value == 0 or 0.01 <= abs(value) < 100000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def render_markdown(sections: List[Section]) -> str:
    lines = ["# Benchmarks", "",
             "Written by `scripts/bench.py` (`make bench`); each section lists the machine and command it was "
             "measured with. Times are medians of repeated runs; a ratio is baseline time / simret time "
             "(or simret rate / baseline rate), so above 1 means simret is faster.", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        machine = section.machine
        lines.append(f"- machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
                     f"GPU: {machine.get('gpu', 'none')}; "
                     f"torch {machine.get('torch', '?')}; Python {machine.get('python', '?')}")
        lines.append(f"- command: `{section.command}`  (measured {section.date})")
        lines += ["", "| measurement | median | baseline | baseline median | ratio | target | met |",
                  "|---|---|---|---|---|---|---|"]
        for row in section.rows:
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            lines.append(f"| {row.what} | {_fmt(row.value)} {row.unit} | {row.baseline or ''} | "
                         f"{_fmt(row.baseline_value)}{' ' + row.unit if row.baseline_value is not None else ''} | "
                         f"{_fmt(row.ratio) + 'x' if row.ratio is not None else ''} | {row.target or ''} | {met} |")
        if section.notes:
            lines.append("")
            lines += [f"- {note}" for note in section.notes]
        lines.append("")
    return "\n".join(lines)
