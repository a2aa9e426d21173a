"""``run_fewshot``: the library orchestrator behind ``simret fewshot`` (same episodes, same results, same JSON)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.data.samples import write_fewshot_sample
from simret.fewshot import FewShotSettings, run_fewshot


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot") / "digits"
    write_fewshot_sample(root, per_class=12, image_size=24)
    return root


@pytest.fixture(scope="module")
def encoder():
    import warnings

    from simret.models import RandomWeightsWarning, create_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet")


def test_run_fewshot_is_evaluate_on_the_banks_and_matches_the_command(sample, encoder, tmp_path):
    from simret.fewshot import evaluate, load_feature_bank, sample_episodes

    settings = FewShotSettings(shots=(1, 3), n_query=4, n_episodes=12, methods=("protonet", "simpleshot"),
                               image_size=32, workers=0, features_dir=tmp_path, seed=2)
    report = run_fewshot(encoder, sample, settings)
    assert [(r.method, r.n_shot) for r in report.results] == [("protonet", 1), ("simpleshot", 1), ("protonet", 3),
                                                               ("simpleshot", 3)]
    bank = load_feature_bank(tmp_path / "features-test.h5")
    base_mean = load_feature_bank(tmp_path / "features-train.h5").mean()
    for shot in (1, 3):
        episodes = sample_episodes(bank.labels, 5, shot, 4, 12, 2)
        np.testing.assert_array_equal(report.result("protonet", shot).accuracies,
                                      evaluate(bank, episodes, "protonet").accuracies)
        np.testing.assert_array_equal(report.result("simpleshot", shot).accuracies,
                                      evaluate(bank, episodes, "simpleshot", base_mean=base_mean).accuracies)
    assert report.result("simpleshot", 1).details["protocol"] == "simpleshot: euclidean, norm=cl2n"
    with pytest.raises(KeyError, match="no result for logreg"):
        report.result("logreg", 1)

    text = report.format().splitlines()
    assert text[1].endswith("; base mean: train split (60 images)") and text[3] == ""
    assert text[4].split() == ["method", "1-shot", "3-shot"] and text[5].split()[0] == "protonet"
    assert report.result("protonet", 3).format() in text[5]

    out = tmp_path / "cli.json"
    result = CliRunner().invoke(cli, ["fewshot", str(sample), "--model", "test_resnet", "--weights", "none",
                                      "--img-size", "32", "-j", "0", "--device", "cpu", "--shot", "1,3",
                                      "--query", "4", "--episodes", "12", "--method", "protonet,simpleshot",
                                      "--seed", "2", "--features-dir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == text[1:]  # the first line names the root as given
    assert json.loads(out.read_text()) == json.loads(json.dumps({**report.to_json(), "split_root": str(sample)}))


@pytest.mark.parametrize("change, message", [
    ({"methods": ("protonet", "knn")}, r"unknown few-shot method\(s\) knn"),
    ({"shots": ()}, "shots must be integers >= 1"),
    ({"n_way": 6}, "6-way episodes need 6 classes"),
])
def test_bad_settings_fail_before_any_feature_is_extracted(sample, encoder, tmp_path, change, message):
    settings = FewShotSettings(image_size=32, workers=0, features_dir=tmp_path, n_query=2, **change)
    with pytest.raises(ValueError, match=message):
        run_fewshot(encoder, sample, settings)
    assert not list(tmp_path.iterdir())
