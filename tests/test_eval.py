"""``simret eval`` and ``evaluate_encoder`` on the embedded Revisited-format sample."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.models import create_encoder
from simret.retrieval.evaluation import EvalSettings, evaluate_encoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("revisited")
    write_revisited_sample(root, landmarks=["chelsea", "rocket", "coffee"], image_size=96, extra_distractors=6)
    return root


def test_evaluate_encoder_equals_metrics_on_extracted_descriptors(data, tmp_path):
    from simret.data.revisited import load_revisited
    from simret.retrieval.extraction import extract
    from simret.retrieval.metrics import evaluate_revisited

    encoder = create_encoder("test_resnet", gamma=2.0)
    settings = EvalSettings(max_size=96, workers=0, cache_dir=tmp_path / "cache")
    report = evaluate_encoder(encoder, data, "rsample", settings)
    assert list(report.results) == ["rsample"]
    dataset = load_revisited(data, "rsample")
    database = extract(encoder, dataset.image_dir, dataset.image_ids, max_size=96, workers=0).descriptors
    queries = extract(encoder, dataset.image_dir, dataset.query_ids, boxes=dataset.query_boxes, max_size=96,
                      workers=0).descriptors
    expected = evaluate_revisited(database @ queries.T, dataset.gnd)
    for setup in ("easy", "medium", "hard"):
        for metric, value in expected[setup].items():
            assert report.results["rsample"][setup][metric] == pytest.approx(float(value), abs=1e-6)
    assert report.counts == {"database": len(dataset.imlist), "queries": len(dataset.qimlist), "distractors": 0}


def test_queries_are_extracted_cropped_to_their_boxes(data, tmp_path, monkeypatch):
    import simret.retrieval.extraction as extract_module
    from simret.data.revisited import load_revisited

    calls = []
    original = extract_module.extract

    def recording(encoder, root, ids, **kwargs):
        calls.append((list(ids), kwargs.get("boxes")))
        return original(encoder, root, ids, **kwargs)

    monkeypatch.setattr(extract_module, "extract", recording)
    encoder = create_encoder("test_resnet")
    evaluate_encoder(encoder, data, "rsample", EvalSettings(max_size=64, workers=0, cache_dir=tmp_path / "cache"))
    dataset = load_revisited(data, "rsample")
    assert calls == [(dataset.query_ids, dataset.query_boxes)]  # the queries, each with its bbx


def test_distractors_qe_and_dba_configurations(data, tmp_path):
    encoder = create_encoder("test_resnet", gamma=2.0)
    settings = EvalSettings(max_size=96, workers=0, cache_dir=tmp_path / "cache", distractors="revisitop1m",
                            qe=2, dba=2)
    report = evaluate_encoder(encoder, data, "rsample", settings)
    assert list(report.results) == ["rsample", "rsample+αQE2", "rsample+αDBA2", "rsample+αDBA2+αQE2",
                                    "rsample+R1M", "rsample+R1M+αQE2", "rsample+R1M+αDBA2", "rsample+R1M+αDBA2+αQE2"]
    assert report.counts["distractors"] == 6
    for result in report.results.values():
        assert set(result) == {"easy", "medium", "hard"}
        assert all(0.0 <= v <= 1.0 for setup in result.values() for v in setup.values())
    plain = evaluate_encoder(encoder, data, "rsample", EvalSettings(max_size=96, workers=0,
                                                                    cache_dir=tmp_path / "cache",
                                                                    distractors="revisitop1m"))
    for setup in ("easy", "medium", "hard"):  # without DBA, distractors can only push positives down
        assert plain.results["rsample+R1M"][setup]["map"] <= plain.results["rsample"][setup]["map"] + 1e-9
    for name in ("rsample", "rsample+R1M"):  # --dba adds its tables; the plain ones stay what they are
        assert report.results[name] == plain.results[name]
    assert report.results["rsample+αDBA2"] != report.results["rsample"]


def test_eval_command_prints_tables_writes_json_and_reuses_descriptors(data, tmp_path):
    args = ["eval", "rsample", "--data-root", str(data), "--model", "test_resnet", "--weights", "none",
            "--max-size", "96", "-j", "0", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"),
            "--distractors", "r1m"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "rsample+R1M" in first.stdout and "mAP" in first.stdout and "mP@10" in first.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["dataset"] == "rsample" and saved["encoder"]["arch"] == "test_resnet"
    assert set(saved["results"]) == {"rsample", "rsample+R1M"}
    store = next((tmp_path / "cache" / "rsample").glob("*/index/descriptors.h5"))
    assert not list((tmp_path / "cache").rglob("index.faiss"))  # the cache keeps descriptors only
    stamp = store.stat().st_mtime_ns
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert store.stat().st_mtime_ns == stamp  # the database descriptors were reused, not recomputed
    assert json.loads((tmp_path / "r.json").read_text())["results"] == saved["results"]


def test_missing_dataset_names_the_expected_path(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "roxford5k", "--data-root", str(tmp_path), "--model", "test_resnet",
                                      "--weights", "none"])
    assert result.exit_code == 1
    assert "roxford5k" in result.output and str(tmp_path) in result.output


def test_missing_dataset_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import simret.commands.options as options

    monkeypatch.setattr(options, "build_encoder", lambda *a, **k: pytest.fail("model built before the data check"))
    result = CliRunner().invoke(cli, ["eval", "roxford5k", "--data-root", str(tmp_path), "--model", "resnet50",
                                      "--weights", "timm"])
    assert result.exit_code == 1 and "gnd_roxford5k.pkl" in result.output


def test_more_qe_neighbours_than_images_is_a_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match="--qe 1000 asks for more neighbours than the .* images of rsample"):
        evaluate_encoder(create_encoder("test_resnet"), data, "rsample",
                         EvalSettings(max_size=64, workers=0, qe=1000, cache_dir=tmp_path / "c"))


def test_unreadable_database_image_is_an_error(data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data / "rsample", copy / "rsample")
    victim = sorted((copy / "rsample" / "jpg").glob("chelsea_easy_*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    encoder = create_encoder("test_resnet")
    with pytest.raises(ValueError, match="could not be read.*protocol needs"):
        evaluate_encoder(encoder, copy, "rsample", EvalSettings(max_size=64, workers=0, cache_dir=tmp_path / "c"))


def test_script_wrapper_shows_help():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_revisited.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--distractors" in out and "Revisited" in out
