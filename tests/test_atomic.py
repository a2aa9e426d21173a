"""Atomic writes leave the old file intact when the writer fails."""
import pytest

from simret.utils.atomic import atomic_path, write_json_atomic


def test_success_replaces_and_failure_keeps_previous(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half written")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_interrupts_wait_for_the_end_of_a_deferred_block(tmp_path):
    import signal

    from simret.utils.atomic import deferred_interrupts

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the block …
            done.append("rest of the block")  # … does not stop it
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
