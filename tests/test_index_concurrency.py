"""One writer at a time, readers never blocked nor mixed (issue 11, item 1), with real processes: two
`simret index --append` runs into one directory, a writer that keeps the lock (--lock-timeout), one killed
while holding it, and readers searching while another process commits generation after generation."""
import os
import signal

import numpy as np
import pytest
from index_campaign import (
    MODEL,
    answer,
    committed,
    finish,
    make_images,
    ok,
    one_error,
    queries,
    run,
    simret_main,
    start,
    wait_for,
)


def hold_lock(out, held, release):
    from simret.utils.locking import writer_lock

    with writer_lock(out):
        held.touch()
        wait_for(release.exists, "the test to release the lock")


def describe_slowly(args, stderr, inside, go):
    """``simret ARGS`` whose first forward pass (so: with the writer lock held) waits until ``go`` exists."""
    from simret.models.encoder import Encoder

    forward = Encoder.forward

    def waiting(self, images):
        inside.touch()
        wait_for(go.exists, "the test to let this writer go on")
        Encoder.forward = forward
        return forward(self, images)

    Encoder.forward = waiting
    simret_main(args, stderr)


def test_two_concurrent_appends_both_end_in_the_index(tmp_path):
    base, first, second = (make_images(tmp_path / name, 3, seed=seed, prefix=name)
                           for name, seed in (("base", 0), ("first", 1), ("second", 2)))
    out = tmp_path / "idx"
    ok("index", base, "--out", out, *MODEL)
    inside, go = tmp_path / "inside", tmp_path / "go"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    writer = start(describe_slowly, ["index", first, "--out", out, "--append", "-j", "0"], logs[0], inside, go)
    wait_for(inside.exists, "the first writer to describe (holding the lock)", writer)
    other = start(simret_main, ["index", second, "--out", out, "--append", "-j", "0"], logs[1])
    wait_for(lambda: logs[1].exists() and "waiting for" in logs[1].read_text(), "the second writer to wait", other)
    assert f"waiting for {out}: another simret process is writing it (pid {writer.pid}" in logs[1].read_text()
    go.touch()
    assert (finish(writer), finish(other)) == (0, 0), [log.read_text() for log in logs]
    assert "indexed 6 images" in logs[0].read_text() and "indexed 9 images" in logs[1].read_text()
    count, (ranked, *_) = answer(out, queries(), k=9)
    assert count == 9 and {p.name for p in (base, first, second) for p in p.glob("*.png")} == \
        {os.path.basename(i) for i in ranked}
    assert ok("check", out).stdout.startswith(f"{out}: OK")


@pytest.mark.parametrize("timeout", ["0", "0.2"])
def test_a_held_lock_refuses_writers_after_the_timeout_and_never_readers(tmp_path, timeout):
    images = make_images(tmp_path / "images", 3)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    before = committed(out)
    held, release = tmp_path / "held", tmp_path / "release"
    holder = start(hold_lock, out, held, release)
    try:
        wait_for(held.exists, "the holder to take the lock", holder)
        more = make_images(tmp_path / "more", 2, seed=4)
        for args in (("index", more, "--out", out, "--append", "-j", "0"), ("check", out, "--repair"),
                     ("index", "--from-descriptors", out / "descriptors.h5", "--out", out)):
            result = run(*args, "--lock-timeout", timeout)
            line = one_error(result)
            assert f"{out} is being written by another simret process (pid {holder.pid}" in line
            assert f"still after {float(timeout):g} s" in line and "--lock-timeout" in line
            assert f"waiting for {out}: another simret process is writing it" in result.stderr
        assert committed(out) == before
        assert ok("search", out, images / "img001.png", "-k", "1").stdout.split()[-1] == "img001.png"
        assert ok("check", out).stdout.startswith(f"{out}: OK")
    finally:
        release.touch()
        assert finish(holder) == 0


def test_a_writer_killed_while_holding_the_lock_leaves_no_lock_behind(tmp_path):
    images = make_images(tmp_path / "images", 3)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    held, release = tmp_path / "held", tmp_path / "never"
    holder = start(hold_lock, out, held, release)
    wait_for(held.exists, "the holder to take the lock", holder)
    os.kill(holder.pid, signal.SIGKILL)
    assert finish(holder) == -signal.SIGKILL
    more = make_images(tmp_path / "more", 2, seed=4)
    result = ok("index", more, "--out", out, "--append", "-j", "0", "--lock-timeout", "10")
    assert "indexed 5 images" in result.stdout


def append_each(out, folders):
    from simret.models import create_encoder
    from simret.retrieval.indexdir import IndexSettings, build_index

    encoder = create_encoder("test_resnet", weights=None)
    for folder in folders:
        build_index(folder, out, encoder, IndexSettings(max_size=64, batch_size=4, workers=0), append=True,
                    progress=False)


def test_readers_during_commits_answer_from_the_old_or_the_new_generation(tmp_path):
    from simret.retrieval.indexdir import IndexDir
    from simret.retrieval.store import read_store, store_attrs, write_store

    folders = [make_images(tmp_path / f"part{i}", 2, seed=10 + i, prefix=f"p{i}-") for i in range(8)]
    out = tmp_path / "idx"
    ok("index", folders[0], "--out", out, *MODEL)
    raw = queries()
    with IndexDir(out) as first:
        query_store = tmp_path / "queries.h5"
        write_store(query_store, raw, ["q0", "q1", "q2"], store_attrs({"fingerprint": first.fingerprint,
                    "arch": "test_resnet", "pool": "simpool", "gamma": None, "dim": 96, "simret_version": "0"},
                    scales=[1.0], max_size=64))
    writer = start(append_each, out, folders[1:])
    seen, errors, rounds = {}, [], 0
    while writer.is_alive() or rounds == 0:
        rounds += 1
        try:
            count, ranked = answer(out, raw, k=3)
            seen.setdefault(count, set()).add(tuple(map(tuple, ranked)))
            if rounds % 7 == 0:
                result = run("search", out, "--descriptors", query_store, "-k", "3", "--format", "jsonl")
                assert result.exit_code == 0 and result.stdout.count("\n") == 3, result.output
        except Exception as err:  # noqa: BLE001 - every failure is collected and reported
            errors.append(f"{type(err).__name__}: {err}")
    assert finish(writer) == 0
    assert not errors, errors[:3]
    assert len(seen) >= 2, seen  # the reader did overlap the commits
    final = read_store(generation_store(out))
    database = final.descriptors / np.linalg.norm(final.descriptors, axis=1, keepdims=True)
    normalised = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    for count, answers in seen.items():  # appends add rows at the end: generation `count` is its first rows
        assert count % 2 == 0 and 2 <= count <= 16
        expected = np.argsort(-(normalised @ database[:count].T), axis=1, kind="stable")[:, :3]
        assert answers == {tuple(tuple(final.ids[i] for i in row) for row in expected)}, count


def generation_store(out):
    return (out / "current").resolve() / "descriptors.h5"


def test_a_reader_keeps_its_generation_after_commits_remove_it(tmp_path):
    from simret.retrieval.indexdir import IndexDir

    images = make_images(tmp_path / "images", 4)
    out = tmp_path / "idx"
    ok("index", images, "--out", out, *MODEL)
    raw = queries()
    expected = answer(out, raw)
    with IndexDir(out) as reader:  # opened, index not loaded yet
        old = reader.generation
        for seed in (1, 2):
            ok("index", make_images(tmp_path / f"more{seed}", 2, seed=seed, prefix=f"m{seed}-"), "--out", out,
               "--append", "-j", "0")
        assert not (out / "generations" / old).exists()
        _, rows = reader.search(raw, k=3)
        assert (reader.meta["count"], [[reader.ids[r] for r in row] for row in rows]) == expected
    assert answer(out, raw)[0] == 8
