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
