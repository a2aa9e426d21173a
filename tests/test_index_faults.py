"""Signals and faults while `simret index` writes (issue 11, item 5), in real child processes: SIGKILL at every
rename, replace and symlink of a write, SIGTERM and SIGINT at several moments, a write limit that fails the
disk writes of HDF5, and disk-full errors from each writer (HDF5, FAISS, numpy, JSON). Afterwards the directory
answers from the old or the new generation, whole; `simret check` finds no problem; the next run removes what
was left and completes, reusing the descriptors already computed."""
import errno
import os
import resource
import signal
from pathlib import Path

import pytest
from index_campaign import (
    MODEL,
    answer,
    committed,
    copy_index,
    die_at_call,
    finish,
    make_images,
    ok,
    one_error,
    open_hdf5_files,
    pause_at,
    queries,
    run,
    simret_main,
    start,
    temporaries,
    trace_calls,
    wait_for,
    write_format1,
)

BASE, MORE = 6, 5  # images in the index, images an --append adds
APPEND = ["--append", "-j", "0", "-b", "4", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    base, more = make_images(root / "base", BASE), make_images(root / "more", MORE, seed=1, prefix="more")
    out = root / "idx"
    ok("index", base, "--out", out, *MODEL, "--whiten", "pca")
    return base, more, out


def check_clean(out):
    """`simret check` finds no problem (notes about leftovers are allowed)."""
    from simret.retrieval.indexdir.check import check_index_dir

    report = check_index_dir(out)
    assert report.ok, report.format()
    return report


def append_after_a_crash(more, out, *, total=BASE + MORE):
    """The next --append completes (or finds the index up to date); returns how many descriptors it computed."""
    result = ok("index", more, "--out", out, *APPEND)
    assert f"indexed {total} images" in result.stdout or f"up to date ({total} images" in result.stdout, result.output
    assert temporaries(out) == [] and not (out / ".partial").exists()
    assert len(list((out / "generations").iterdir())) == 1
    assert ok("check", out).stdout.startswith(f"{out}: OK")
    return 0 if "up to date" in result.stdout else int(result.stdout.split("(")[1].split()[0])


def killed_append(k, more, out, trace=None):
    if trace is not None:
        trace_calls(trace)
    else:
        die_at_call(k)
    simret_main(["index", more, "--out", out, *APPEND], out.parent / f"log-{k}")


def test_sigkill_at_every_rename_of_an_append(collection, tmp_path):
    base, more, reference = collection
    old = answer(reference, queries())
    trace = tmp_path / "calls"
    dry = copy_index(reference, tmp_path / "dry")
    assert finish(start(killed_append, 0, more, dry, trace)) == 0
    calls = trace.read_text().splitlines()
    new = answer(dry, queries())
    assert [c.split()[0] for c in calls][-3:] == ["rename", "symlink", "replace"]  # generation, then `current`
    checkpoints = sum("/.partial/" in c for c in calls)
    assert checkpoints == 2  # 4 + 1 descriptors
    for k in range(1, len(calls) + 1):
        out = copy_index(reference, tmp_path / f"k{k}")
        assert finish(start(killed_append, k, more, out)) == -signal.SIGKILL
        assert answer(out, queries()) in (old, new), (k, calls[k - 1])
        check_clean(out)
        computed = append_after_a_crash(more, out)
        assert answer(out, queries()) == new
        assert computed == (MORE if k == 1 else 1 if k == 2 else 0), (k, calls[k - 1])  # checkpoints reused


def killed_migration(k, images, out, trace=None):
    if trace is not None:
        trace_calls(trace)
    else:
        die_at_call(k)
    simret_main(["index", images, "--out", out, *MODEL, "--whiten", "pca"], out.parent / f"log-{k}")


def test_sigkill_at_every_rename_of_a_format_1_migration(collection, tmp_path):
    base, _, reference = collection
    expected = answer(reference, queries())
    trace = tmp_path / "calls"
    assert finish(start(killed_migration, 0, base, write_format1(reference, tmp_path / "dry"), trace)) == 0
    calls = trace.read_text().splitlines()
    assert sum(c.startswith("replace") and not c.endswith("current") for c in calls) >= 4  # plain files → links
    for k in range(1, len(calls) + 1):
        out = write_format1(reference, tmp_path / f"k{k}")
        assert finish(start(killed_migration, k, base, out)) == -signal.SIGKILL
        assert answer(out, queries()) == expected, (k, calls[k - 1])
        check_clean(out)
        result = ok("index", base, "--out", out, *MODEL, "--whiten", "pca")
        assert "(0 computed" in result.stdout or "up to date" in result.stdout, result.output
        assert temporaries(out) == [] and answer(out, queries()) == expected
        assert all((out / name).is_symlink() for name in ("meta.json", "descriptors.h5", "index.faiss",
                                                           "whitening.npz", "skipped.tsv"))
        assert ok("check", out).stdout.startswith(f"{out}: OK")


# ---------------------------------------------------------------------------------------- signals


def paused_append(moment, more, out, marker, go):
    if moment == "extraction":  # the second forward pass: the first 4 descriptors are checkpointed by then
        from simret.models.encoder import Encoder

        calls = []
        pause_at(Encoder, "forward", lambda *args: calls.append(1) or len(calls) == 2, marker, go)
    elif moment == "generation rename":
        pause_at(os, "rename", lambda source, target: "/generations/" in os.fspath(target), marker, go)
    else:  # the swap of `current`: the commit itself
        pause_at(os, "replace", lambda source, target: os.fspath(target).endswith("/current"), marker, go)
    simret_main(["index", more, "--out", out, "--append", "-j", "0", "-b", "4", "--checkpoint-every", "4"],
                out.parent / "log")


@pytest.mark.parametrize("number, status, said", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("moment, committed_anyway, computed_next", [
    ("extraction", False, 1), ("generation rename", False, 0), ("swap of current", True, 0)])
def test_signals_at_several_moments(collection, tmp_path, number, status, said, moment, committed_anyway,
                                    computed_next):
    _, more, reference = collection
    out = copy_index(reference, tmp_path / "idx")
    marker, go = tmp_path / "marker", tmp_path / "go"
    child = start(paused_append, moment, more, out, marker, go)
    wait_for(marker.exists, f"the writer to reach the {moment}", child)
    os.kill(child.pid, number)
    go.touch()
    assert finish(child) == status
    log = (tmp_path / "log").read_text()
    assert log.rstrip().endswith(said) and "Traceback" not in log, log
    count, _ = answer(out, queries())
    assert count == (BASE + MORE if committed_anyway else BASE)  # the old or the new generation, whole
    check_clean(out)
    assert append_after_a_crash(more, out) == computed_next


# ---------------------------------------------------------------------------------------- full disks


def limited_append(limit, more, out):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        simret_main(["index", more, "--out", out, *APPEND], out.parent / "log")
    finally:
        if open_hdf5_files():
            os._exit(3)


@pytest.mark.parametrize("stage", ["checkpoint", "generation store"])
def test_a_failing_hdf5_write_is_one_error_and_no_crash(collection, tmp_path, monkeypatch, stage):
    from simret.retrieval.index import Index

    _, more, reference = collection
    out = copy_index(reference, tmp_path / "idx")
    before = committed(out)
    if stage == "generation store":  # checkpoints already written by a run that failed later
        monkeypatch.setattr(Index, "save", lambda self, path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        one_error(run("index", more, "--out", out, *APPEND))
        monkeypatch.undo()
    assert finish(start(limited_append, 64 << 10, more, out)) == 1  # an error, not a crash
    log = (tmp_path / "log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in log and "Exception ignored" not in log, log
    where = ".partial/part-" if stage == "checkpoint" else "descriptors.h5"
    assert f"Error: could not write {out}/" in errors[0] and where in errors[0] and "File too large" in errors[0]
    assert ("is unchanged" if stage == "checkpoint" else "the previous index in") in errors[0]
    assert committed(out) == before
    check_clean(out)
    assert append_after_a_crash(more, out) == (MORE if stage == "checkpoint" else 0)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _faiss_full(*args, **kwargs):  # what FAISS raises when fwrite fails
    raise RuntimeError("Error in faiss::FileIOWriter::operator()(...): fwrite failed (No space left on device)")


def _text_full(name):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            _no_space()
        return real(self, *args, **kwargs)
    return write_text


@pytest.mark.parametrize("writer, patch, named", [
    ("FAISS", lambda m: m.setattr("faiss.write_index", _faiss_full), "index.faiss"),
    ("numpy", lambda m: m.setattr("numpy.savez", _no_space), "whitening"),
    ("skipped list", lambda m: m.setattr(Path, "write_text", _text_full("skipped.tsv")), "skipped.tsv"),
    ("meta.json", lambda m: m.setattr(Path, "write_text", _text_full("meta.json")), "meta.json"),
    ("checkpoint", lambda m: m.setattr("simret.retrieval.indexdir.checkpoints.write_store", _no_space),
     ".partial/part-"),
])
def test_disk_full_in_each_writer_is_one_error_naming_the_path(collection, tmp_path, monkeypatch, writer, patch,
                                                                named):
    _, more, reference = collection
    out = copy_index(reference, tmp_path / "idx")
    before = committed(out)
    args = ("index", more, "--out", out, *APPEND)
    if writer == "numpy":  # a whitening learned anew (--append keeps the index's own)
        args = ("index", more, "--out", out, *MODEL, "--whiten", "pca", "--overwrite")
    patch(monkeypatch)
    line = one_error(run(*args))
    monkeypatch.undo()
    assert f"could not write {out}" in line and named in line and "No space left on device" in line, line
    assert "intact" in line or "unchanged" in line
    assert committed(out) == before and temporaries(out) == []
    check_clean(out)
    assert answer(out, queries())[0] == BASE


def test_an_oserror_at_every_rename_leaves_a_usable_directory(collection, tmp_path, monkeypatch):
    _, more, reference = collection
    old = answer(reference, queries())
    clean = copy_index(reference, tmp_path / "clean")
    ok("index", more, "--out", clean, *APPEND)
    new, k = answer(clean, queries()), 0
    while True:
        k += 1
        out = copy_index(reference, tmp_path / f"k{k}")
        calls = [0]
        for name in ("rename", "replace", "symlink"):
            def failing(*args, _real=getattr(os, name), _calls=calls, _k=k, **kwargs):
                _calls[0] += 1
                if _calls[0] == _k:
                    _no_space()
                return _real(*args, **kwargs)
            monkeypatch.setattr(os, name, failing)
        result = run("index", more, "--out", out, *APPEND)
        monkeypatch.undo()
        if calls[0] < k:  # no call left to fail: the run went through
            assert result.exit_code == 0 and answer(out, queries()) == new
            break
        if result.exit_code == 0:  # only a public name failed, after the commit: it is linked by the next write
            assert answer(out, queries()) == new and "public names could not all be linked" in result.output
        else:
            line = one_error(result)
            assert "No space left on device" in line and f"could not write {out}" in line
            assert answer(out, queries()) in (old, new)
        check_clean(out)
        append_after_a_crash(more, out)
        assert answer(out, queries()) == new
    assert k > 5
