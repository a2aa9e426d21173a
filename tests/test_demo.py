"""The demo's steps, end to end, on the smallest sizes (``simret demo --small``)."""
import json

from click.testing import CliRunner

from simret.cli import cli


def test_demo_runs_every_step_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--small", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for step in range(1, 9):
        assert f"[{step}/8]" in result.stdout
    for command in ("$ simret index", "$ simret search", "$ simret eval", "$ simret fewshot", "$ simret train",
                    "$ simret attention"):
        assert command in result.stdout
    assert "RANDOMLY initialised" in result.stdout
    assert f"simret serve {out / 'index'}" in result.stdout  # the demo ends by saying how to serve its index
    assert (out / "index" / "descriptors.h5").is_file() and (out / "index" / "index.faiss").is_file()
    revisited = json.loads((out / "results" / "revisited.json").read_text())
    assert {"rsample", "rsample+R1M", "rsample+αQE2", "rsample+R1M+αQE2"} == set(revisited["results"])
    before = json.loads((out / "results" / "fewshot-before.json").read_text())
    after = json.loads((out / "results" / "fewshot-after.json").read_text())
    assert before["encoder"]["fingerprint"] != after["encoder"]["fingerprint"]  # the fine-tuned encoder was used
    assert (out / "checkpoints" / "encoder.safetensors").is_file()
    assert len(list((out / "attention").glob("*.png"))) == 3
    # each encoder keeps its own feature banks, and the summary sets the figures side by side
    assert {p.parent.name for p in (out / "features").glob("*/features-test.h5")} == {"random-init", "fine-tuned"}
    summary = result.stdout.split("demo finished")[1]
    row = next(line.split() for line in summary.splitlines() if line.split()[:2] == ["simpleshot", "1"])
    first = next(r for r in before["results"] if (r["method"], r["n_shot"]) == ("simpleshot", 1))
    tuned = next(r for r in after["results"] if (r["method"], r["n_shot"]) == ("simpleshot", 1))
    assert row == ["simpleshot", "1", f"{100 * first['mean']:.2f}", "±", f"{100 * first['ci95']:.2f}",
                   f"{100 * tuned['mean']:.2f}", "±", f"{100 * tuned['ci95']:.2f}"]
    medium = 100 * revisited["results"]["rsample"]["medium"]["map"]
    assert f"M {medium:5.2f}" in summary and "written under" in summary
    assert "chelsea" in result.stdout.split("$ simret search")[1].split("[4/8]")[0]
