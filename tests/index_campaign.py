"""Shared pieces of the index fault campaign (tests/test_index_*.py): tiny image folders, CLI runs, byte flips,
and child processes forked from the test process (torch and simret already imported, so a child starts in
milliseconds; it is still a real process: its own locks, signals, exit status and crashes). Forking after
torch has run is safe here because tests/conftest.py keeps torch to one thread (OMP_NUM_THREADS=1): a forked
child would otherwise wait forever on the parent's thread pool."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from cli_run import run as cli_run

MODEL = ["--model", "test_resnet", "--weights", "none", "--max-size", "64", "-j", "0", "-b", "4"]
FORK = multiprocessing.get_context("fork")
DEADLINE_S = 120.0  # what any wait in these tests allows before failing (never reached when things work)


def make_images(folder: Path, n: int, *, seed: int = 0, size: int = 40, prefix: str = "img",
                suffix: str = ".png") -> Path:
    """``n`` noise images (distinct, so every image is its own nearest neighbour)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}{suffix}")
    return folder


def run(*args: object):
    """``simret ARGS`` in this process (stdout and stderr kept apart); any exit status."""
    return cli_run(*args, ok=False)


def ok(*args: object):
    """``simret ARGS`` in this process; a non-zero exit status fails the test."""
    return cli_run(*args)


def one_error(result, code: int = 1) -> str:
    """The single ``Error:`` line of a failed command (no traceback, nothing else that looks like one)."""
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a file (in place: the generation's own file, not a copy)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def generation(out: Path) -> Path:
    return (out / "current").resolve()


def committed(out: Path) -> Tuple[str, Dict[str, bytes]]:
    """Which generation is current, and the bytes of its files."""
    folder = generation(out)
    return folder.name, {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def copy_index(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def chunk_offsets(store: Path, dataset: str) -> List[int]:
    """Byte offsets in the file of every chunk of one dataset of an HDF5 store."""
    import h5py

    found: List[int] = []
    with h5py.File(store, "r") as handle:
        handle[dataset].id.chunk_iter(lambda info: found.append(info.byte_offset))
    return found


def queries(dim: int = 96, n: int = 3, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def answer(out: Path, raw: np.ndarray, k: int = 3) -> Tuple[int, List[List[str]]]:
    """``(images in the generation answering, top-k ids per query)``, checking the generation is whole."""
    from simret.retrieval.indexdir import IndexDir

    with IndexDir(out) as index_dir:
        _, rows = index_dir.search(raw, k=k)
        count = index_dir.meta["count"]
        assert len(index_dir.ids) == count == index_dir.index.ntotal
        return count, [[index_dir.ids[r] for r in row] for row in rows]


def temporaries(out: Path) -> List[str]:
    """What a killed writer leaves: ``.*.tmp`` anywhere, unfinished or superseded generations."""
    left = [str(p.relative_to(out)) for p in out.rglob(".*.tmp")]
    current = generation(out).name if (out / "current").exists() else None
    folder = out / "generations"
    left += [f"generations/{p.name}" for p in folder.iterdir() if p.name != current] if folder.is_dir() else []
    return sorted(set(left))


def write_format1(index_dir: Path, target: Path) -> Path:
    """``target``: ``index_dir`` as simret wrote it before generations existed (format 1: plain files in DIR,
    a contiguous store without checksums or file states, a meta.json without file checksums)."""
    import h5py

    source = generation(index_dir)
    target.mkdir(parents=True)
    meta = json.loads((source / "meta.json").read_text())
    with h5py.File(source / "descriptors.h5", "r") as old, h5py.File(target / "descriptors.h5", "w") as new:
        new.create_dataset("descriptors", data=old["descriptors"][()])
        new.create_dataset("ids", data=old["ids"].asstr()[()].astype(object), dtype=h5py.string_dtype("utf-8"))
        for key, value in old.attrs.items():
            if key != "store_format":
                new.attrs[key] = value
    for name in ("index.faiss", "whitening.npz", "skipped.tsv"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    files = {key: entry["name"] for key, entry in meta["files"].items()}
    for key in ("sequence", "sources", "store_generation"):
        meta.pop(key, None)
    meta.update(format_version=1, files=files)
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    return target


# ------------------------------------------------------------------------------------ child processes


def start(target: Callable[..., None], *args: object) -> multiprocessing.Process:
    """``target(*args)`` in a forked child; the child exits 0 when it returns, 1 on an exception."""
    process = FORK.Process(target=_child, args=(target, args))
    process.start()
    return process


def _child(target: Callable[..., None], args: Sequence[object]) -> None:
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # not pytest's capture buffers
    code = 0
    try:
        target(*args)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through the exit status and the stderr file
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def open_hdf5_files() -> int:
    """HDF5 files the library still holds open in this process (a write that failed badly leaves one, which
    HDF5 then tries to flush when the process exits, and crashed doing so)."""
    import h5py

    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


def simret_main(args: Sequence[str], stderr: Optional[Path] = None) -> None:
    """The ``simret`` entry point as a child runs it (its stderr into a file, so the test can read it)."""
    from simret.cli import main

    if stderr is not None:
        log_to(stderr)
    main([str(a) for a in args])


def log_to(path: Path) -> None:
    """In a child: stdout and stderr (the file descriptors and Python's streams, which pytest replaced) go to
    ``path``, line by line."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the child
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def wait_for(condition: Callable[[], bool], what: str, process: Optional[multiprocessing.Process] = None,
             deadline: float = DEADLINE_S) -> None:
    """Poll ``condition`` until it holds (fails after ``deadline`` seconds, or if ``process`` ended first)."""
    end = time.monotonic() + deadline
    while not condition():
        if process is not None and not process.is_alive():
            raise AssertionError(f"the child ended (exit {process.exitcode}) before: {what}")
        if time.monotonic() > end:
            raise AssertionError(f"still waiting after {deadline} s for: {what}")
        time.sleep(0.02)


def finish(process: multiprocessing.Process) -> int:
    process.join(DEADLINE_S)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        raise AssertionError("the child did not finish in time")
    return process.exitcode


def pause_at(module: object, name: str, when: Callable[..., bool], marker: Path, go: Path) -> None:
    """In a child: when ``when(*args)`` holds, ``module.name(*args)`` first touches ``marker``, then waits until
    ``go`` exists (the test signals the child meanwhile), then does its work."""
    real = getattr(module, name)

    def paused(*args, **kwargs):
        if when(*args):
            marker.touch()
            wait_for(go.exists, f"the test to let {name} go on")
        return real(*args, **kwargs)

    setattr(module, name, paused)


def trace_calls(log: Path, operations: Sequence[str] = ("rename", "replace", "symlink")) -> None:
    """In a child: append ``name target`` to ``log`` for every call of ``os.<operations>``."""
    for name in operations:
        real = getattr(os, name)

        def traced(*args, _real=real, _name=name, **kwargs):
            with open(log, "a") as handle:
                handle.write(f"{_name} {os.fspath(args[1])}\n")
            return _real(*args, **kwargs)

        setattr(os, name, traced)


def die_at_call(k: int, operations: Sequence[str] = ("rename", "replace", "symlink")) -> None:
    """In a child: SIGKILL itself at the ``k``-th call of any of ``os.<operations>``, before it acts."""
    calls = [0]
    for name in operations:
        real = getattr(os, name)

        def counted(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, counted)
