"""The command-line skeleton: help without heavy imports, version, info, global options."""
import logging
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from simret import __version__
from simret.cli import cli


@pytest.mark.parametrize("argv", [["--help"], ["index", "--help"], ["fewshot", "--help"], ["info", "--help"]])
def test_help_does_not_import_torch_timm_or_faiss(argv):
    code = (f"import sys\nfrom simret.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'faiss', 'numpy', 'h5py') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Usage:" in out
    if argv == ["--help"]:
        assert "Commands:" in out and "info" in out and "--device" in out and "--quiet" in out


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "simret", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_info_reports_versions_and_faiss_gpu_support():
    result = CliRunner().invoke(cli, ["info", "--checkpoints"])
    assert result.exit_code == 0, result.output
    for needle in ("simret", "torch", "timm", "faiss", "GPU:", "cuda", "vits-dino-simpool-ep300"):
        assert needle in result.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_resolve_device_rejects_nonsense():
    from simret.utils.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


def test_global_device_option_is_checked_and_reported():
    result = CliRunner().invoke(cli, ["--device", "gpu0", "info"])
    assert result.exit_code == 2 and "'gpu0' is not a device" in result.output
    result = CliRunner().invoke(cli, ["--device", "cpu", "info"])
    assert result.exit_code == 0 and "cpu -> cpu" in result.output
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0 and "auto -> " in result.output


def test_command_device_option_is_checked():
    result = CliRunner().invoke(cli, ["fewshot", "some/dir", "--device", "tpu"])
    assert result.exit_code == 2 and "'tpu' is not a device" in result.output


def test_global_device_reaches_build_encoder(monkeypatch):
    """A command building its encoder with build_encoder runs it on simret --device."""
    from simret.commands import options

    seen = {}

    @click.command("probe")
    @options.model_options
    def probe(model_spec):
        _, device = options.build_encoder({**model_spec, "arch": "test_resnet", "weights": "none"})
        seen["device"] = str(device)

    cli.add_command(probe)
    try:
        result = CliRunner().invoke(cli, ["--device", "cpu", "probe"])
    finally:
        cli.commands.pop("probe")
    assert result.exit_code == 0, result.output
    assert seen["device"] == "cpu"


@pytest.fixture
def failing_command():
    @click.command("fail")
    def fail():
        logging.getLogger("simret.test").debug("a debug line")
        logging.getLogger("simret.test").info("an info line")
        raise ValueError("bad input, said clearly")

    cli.add_command(fail)
    yield
    cli.commands.pop("fail")


def test_verbosity_flags(failing_command):
    plain = CliRunner().invoke(cli, ["fail"])
    assert plain.exit_code == 1 and "Error: bad input, said clearly" in plain.output
    assert "an info line" in plain.output and "a debug line" not in plain.output
    assert "Traceback" not in plain.output
    quiet = CliRunner().invoke(cli, ["-q", "fail"])
    assert quiet.exit_code == 1 and "an info line" not in quiet.output
    verbose = CliRunner().invoke(cli, ["-v", "fail"])
    assert "a debug line" in verbose.output
    assert isinstance(verbose.exception, ValueError)  # -v lets the traceback through


def test_model_defaults_import_without_torch():
    """The command line reads simret.models.defaults (DEFAULT_ARCH) without importing torch."""
    code = ("import sys\nimport simret.commands.options, simret.models, simret.models.defaults\n"
            "print('HEAVY', [m for m in ('torch', 'timm', 'faiss', 'numpy', 'PIL') if m in sys.modules])\n"
            "print('ARCH', simret.models.DEFAULT_ARCH)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "ARCH resnet50" in out


def test_command_device_prefers_the_command_option():
    from types import SimpleNamespace

    from simret.commands.options import command_device

    ctx = click.Context(cli, obj=SimpleNamespace(device="cpu"))
    assert command_device({"device": "cuda:1"}, ctx) == "cuda:1"
    assert command_device({"device": None}, ctx) == "cpu"
    assert command_device(ctx=ctx) == "cpu"
    assert command_device({}, click.Context(cli)) is None  # outside the simret group: nobody asked
    with click.Context(cli, obj=SimpleNamespace(device="mps")):  # the current context by default
        assert command_device({}) == "mps"


@pytest.mark.parametrize("command, ranges", [
    ("index", ["--batch-size INTEGER RANGE", "x>=1", "0<=x<=20000", "--workers INTEGER RANGE"]),
    ("search", ["--alpha FLOAT RANGE", "--top-k INTEGER RANGE"]),
    ("fewshot", ["8<=x<=20000", "0<x<=1", "x>=2"]),
    ("demo", ["64<=x<=20000"]),
])
def test_help_shows_option_ranges(command, ranges):
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for text in ranges:
        assert text in flat, (text, result.output)
