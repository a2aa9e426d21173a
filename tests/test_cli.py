"""The command-line skeleton: help without heavy imports, version, info, global options."""
import subprocess
import sys

from click.testing import CliRunner

from simret import __version__
from simret.cli import cli


def test_help_does_not_import_torch_timm_or_faiss():
    code = ("import sys\nfrom simret.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'faiss', 'numpy', 'h5py') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Commands:" in out and "info" in out


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
    import pytest

    from simret.utils.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
