"""Ids with tabs or newlines never split a row of `simret search` output (escaped as PostgreSQL's text
format does), and a --bbox / query box larger than the image follows the PIL-crop rule up to the pixel
limit and is refused clearly beyond it (never PIL's decompression-bomb error)."""
import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from simret.cli import cli
from simret.commands.search import _write
from simret.data.images import Failed, ImageList, RetrievalTransform, crop_box, pixel_limit
from simret.utils.text import escape_field, unescape_field

MODEL = ["--model", "test_resnet", "--weights", "none"]
FAST = ["--max-size", "32", "-j", "0", "-b", "4"]
ODD_NAMES = ["tab\there.png", "new\nline.png", "back\\slash.png", "cr\rx.png", "plain.png", "é\u2028\x1b[31m.png"]


# ------------------------------------------------------------------------------------------- escaping


def test_escape_field_rules():
    assert escape_field("a\tb") == "a\\tb" and escape_field("a\nb") == "a\\nb" and escape_field("a\\b") == "a\\\\b"
    assert escape_field("a\rb") == "a\\rb" and escape_field("\x1b[31m") == "\\x1b[31m"
    assert escape_field("\x00\x7f\x85") == "\\x00\\x7f\\x85" and escape_field("\u2028") == "\\u2028"
    assert escape_field("photo é ü 東京.jpg") == "photo é ü 東京.jpg"  # printable text as it is
    assert escape_field("bad\udcff.jpg") == "bad\\udcff.jpg"  # undecodable file-name byte: printable now


@given(st.text())
def test_escape_round_trips_and_never_splits(text):
    escaped = escape_field(text)
    assert unescape_field(escaped) == text
    assert "\t" not in escaped and len(escaped.splitlines()) <= 1
    escaped.encode("utf-8")  # always printable to a UTF-8 terminal


def test_write_escapes_tsv_and_table(capsys):
    results = [("query\t1.jpg", ODD_NAMES, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])]
    _write(results, "tsv")
    lines = capsys.readouterr().out.split("\n")[:-1]
    assert lines[0] == "query\trank\tid\tscore" and len(lines) == 1 + len(ODD_NAMES)
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 4 for row in rows)
    assert [unescape_field(row[2]) for row in rows] == ODD_NAMES
    assert {unescape_field(row[0]) for row in rows} == {"query\t1.jpg"}
    _write(results, "table")
    table = capsys.readouterr().out.split("\n")[:-1]
    assert table[0] == "query: query\\t1.jpg" and len(table) == 2 + len(ODD_NAMES)
    assert [unescape_field(line.split("  ")[-1]) for line in table[2:]] == ODD_NAMES
    _write(results, "jsonl")
    record = json.loads(capsys.readouterr().out)
    assert record["ids"] == ODD_NAMES and record["query"] == "query\t1.jpg"


def test_search_cli_with_odd_file_names(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ODD_NAMES:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name)
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = runner.invoke(cli, ["index", str(folder), "--out", str(tmp_path / "idx"), *MODEL, *FAST])
        assert built.exit_code == 0, built.output
        query = folder / "plain.png"
        tsv = runner.invoke(cli, ["search", str(tmp_path / "idx"), str(query), "-k", "6", "--format", "tsv"])
        jsonl = runner.invoke(cli, ["search", str(tmp_path / "idx"), str(query), "-k", "6", "--format", "jsonl"])
    assert tsv.exit_code == 0 and jsonl.exit_code == 0
    rows = [line.split("\t") for line in tsv.stdout.split("\n")[1:-1]]
    assert len(rows) == 6 and all(len(row) == 4 for row in rows)
    assert [unescape_field(row[2]) for row in rows] == json.loads(jsonl.stdout)["ids"]
    assert sorted(json.loads(jsonl.stdout)["ids"]) == sorted(ODD_NAMES)


# -------------------------------------------------------------------------------------------- crops


def test_box_past_the_border_is_black_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    assert pixel_limit() == 10_000
    white = Image.new("RGB", (10, 10), "white")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning from PIL on the way
        crop = crop_box(white, (-45, -45, 55, 55))  # exactly the limit: 100 x 100
    assert crop.size == (100, 100) and crop.getpixel((0, 0)) == (0, 0, 0) and crop.getpixel((50, 50)) == (255,) * 3
    with pytest.raises(ValueError, match=r"would make a 101x100 picture .* more than the 10,000 pixels"):
        crop_box(white, (-45, -45, 56, 55))


@pytest.mark.parametrize("box", [(0, 0, 1e9, 1e9), (-1e6, -1e6, 5, 5), (0, 0, 200_000, 500)])
def test_huge_box_is_refused_not_allocated(box):
    with pytest.raises(ValueError, match="more than the .* pixels simret handles"):
        crop_box(Image.new("RGB", (20, 20)), box)


@pytest.mark.parametrize("box", [(0, 0, float("nan"), 5), (0, 0, float("inf"), 5), (1, 2, 3)])
def test_box_must_be_four_finite_numbers(box):
    with pytest.raises(ValueError, match="4 finite numbers"):
        crop_box(Image.new("RGB", (20, 20)), box)


def test_query_boxes_too_large_become_failures_not_crashes(tmp_path):
    Image.new("RGB", (16, 16), "white").save(tmp_path / "q.png")
    transform = RetrievalTransform((0.5,) * 3, (0.5,) * 3, max_size=32)
    dataset = ImageList(tmp_path, ["q.png", "q.png"], transform, boxes=[(-8, -8, 24, 24), (0, 0, 1e6, 1e6)])
    tensor, index = dataset[0]
    assert index == 0 and tensor.shape == (3, 32, 32) and tensor[:, 0, 0].tolist() == [-1.0] * 3  # black corner
    failed = dataset[1]
    assert isinstance(failed, Failed) and "more than the" in failed.reason


def test_search_cli_with_a_huge_bbox(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for value in (10, 200):
        Image.new("RGB", (24, 24), (value, value, value)).save(folder / f"{value}.png")
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert runner.invoke(cli, ["index", str(folder), "--out", str(tmp_path / "idx"), *MODEL, *FAST]).exit_code == 0
        result = runner.invoke(cli, ["search", str(tmp_path / "idx"), str(folder / "10.png"), "--bbox",
                                     "0,0,100000,100000"])
        inside = runner.invoke(cli, ["search", str(tmp_path / "idx"), str(folder / "10.png"), "--bbox", "-4,-4,30,30",
                                     "--format", "jsonl"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "more than the" in result.output and "no query image could be used" in result.output
    assert inside.exit_code == 0 and len(json.loads(inside.stdout)["ids"]) == 2


# ------------------------------------------------------------------------------ other row-wise outputs


def test_attention_table_escapes_names(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (90, 20, 200)).save(folder / "a\tb.png")
    result = CliRunner().invoke(cli, ["attention", str(folder / "a\tb.png"), *MODEL, "-o", str(tmp_path / "maps"),
                                      "--max-size", "32"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 2 and lines[1].startswith("a\\tb.png ") and "\t" not in result.stdout


def test_train_skipped_list_escapes_names(tmp_path):
    from simret.data.samples import write_fewshot_sample
    from simret.train import TrainConfig, train

    root = tmp_path / "digits"
    write_fewshot_sample(root, per_class=8)
    data = root / "train"
    (data / "digit_1" / "0000.png").unlink()
    (data / "digit_0" / "bro\tken\n.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = dict(data=str(data), out=str(tmp_path / "out"), split=None, arch="test_resnet", weights=None,
                  img_size=32, batch_size=8, workers=0, lr=3e-3, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(**config), show_progress=False)
    lines = (tmp_path / "out" / "skipped.tsv").read_text().split("\n")
    assert lines[0] == "id\treason" and lines[2] == "" and len(lines) == 3  # the one skipped-list format
    name, reason = lines[1].split("\t")
    assert unescape_field(name) == "digit_0/bro\tken\n.png" and reason
