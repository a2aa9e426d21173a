"""Bad input ends in a one-line ``Error: ...`` naming the culprit (exit 1, or 2 for usage), never a traceback,
a crash or a lost index."""
import warnings

import pytest
from click.testing import CliRunner

from simret.cli import cli

MODEL = ["--model", "test_resnet", "--weights", "none"]
FAST = ["--max-size", "64", "-j", "0", "-b", "4"]


def run(*args, code=1):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    return error_lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea"], image_size=48, extra_distractors=0, distractor_views=1)
    return root / "rsample" / "jpg"


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory):
    from simret.models import RandomWeightsWarning

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings():  # module-scoped fixtures run outside conftest's filter
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(cli, ["index", str(photos), "--out", str(out), *MODEL, *FAST])
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------ index


def test_index_a_single_image_file_is_not_read_as_a_list(photos, tmp_path):
    line = run("index", photos / "chelsea_easy_0.jpg", "--out", tmp_path / "o", *MODEL, *FAST)
    assert "is an image file, not a folder or a list" in line


def test_index_a_binary_list_file(tmp_path):
    listing = tmp_path / "list.bin"
    listing.write_bytes(b"\x00\xff\xfe\x80 binary")
    line = run("index", listing, "--out", tmp_path / "o", *MODEL, *FAST)
    assert "list.bin is not a text list of image paths" in line


@pytest.mark.parametrize("param, message", [
    ("nlist=0", "nlist must be at least 1"), ("m=0", "m must be at least 1"), ("nbits=0", "nbits must be at least 1"),
    ("nbits=30", "nbits must be at most 16"), ("nbits=12", "needs at least 2^12 = 4096 training vectors"),
])
def test_index_bad_ivfpq_parameters_never_crash_faiss(photos, index_dir, param, message):
    before = (index_dir / "meta.json").read_text()
    line = run("index", photos, "--out", index_dir, *MODEL, *FAST, "--index", "ivfpq", "--index-param", param)
    assert message in line
    assert (index_dir / "meta.json").read_text() == before  # the previous index is untouched
