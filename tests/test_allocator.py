"""Which commands keep freed memory in the process (glibc's allocator setting of ``simret.utils.allocator``)."""
import contextlib

from simret import cli as cli_module
from simret.utils import allocator


def test_the_server_keeps_glibc_trimming(monkeypatch, capsys):
    """simret serve (long-running, many small queries) leaves glibc's allocator as it is; the other commands keep
    freed memory (what pays off for extraction over large images)."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or "kept")
    for argv, kept in ((["serve", "--help"], False), (["--device", "cpu", "serve", "--help"], False),
                       (["index", "--help"], True), (["-v", "info", "--help"], True)):
        calls.clear()
        with contextlib.suppress(SystemExit):
            cli_module.main(argv)
        assert bool(calls) == kept, argv
    assert "Usage" in capsys.readouterr().out


def test_release_freed_memory_gives_pages_back_to_the_system():
    """After a large freed allocation, ``malloc_trim`` reports memory released (glibc) and the process keeps
    working; where the C library is not glibc it says so by returning False."""
    import os
    import platform

    import pytest

    if any(name in os.environ.get("LD_PRELOAD", "") for name in allocator.OTHER_ALLOCATORS):
        pytest.skip("another allocator is preloaded: glibc's malloc_trim has nothing to release")
    if allocator._glibc() is None:
        assert allocator.release_freed_memory() is False
        return
    assert platform.system() == "Linux"
    blocks = [bytearray(1 << 16) for _ in range(2000)]  # ~128 MB of small heap blocks, then freed
    del blocks[::2]
    assert allocator.release_freed_memory() is True
    del blocks


def test_the_model_thread_hands_memory_back_only_when_idle(monkeypatch):
    """The serve batcher trims once its queue has been empty for ``trim_interval`` after work, never between
    queued queries, and not at all with ``trim_interval=None``."""
    import threading
    import time

    from simret.serve.batcher import MicroBatcher

    trimmed = []
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: trimmed.append(time.monotonic()) or True)
    done = threading.Event()
    batcher = MicroBatcher(lambda: None, trim_interval=0.05)
    batcher.call(lambda: done.set()).result(10)
    deadline = time.monotonic() + 10
    while not batcher.trims and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.trims == 1 and len(trimmed) == 1  # once after the work, not again while nothing happens
    time.sleep(0.2)
    assert batcher.trims == 1
    batcher.stop()

    never = MicroBatcher(lambda: None, trim_interval=None)
    never.call(lambda: None).result(10)
    time.sleep(0.2)
    assert never.trims == 0 and len(trimmed) == 1
    never.stop()
