"""`simret serve` as a command: a real server process (bind, warning, SIGHUP, graceful SIGTERM), usage errors,
import hygiene, and the shared query description (simret.retrieval.queries) it and `simret search` use."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_run import run

from simret.models import RandomWeightsWarning

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model", "test_resnet", "--weights", "none"]




@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea"], image_size=64, extra_distractors=0)
    return root / "rsample" / "jpg"


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    run("index", photos, "--out", out, *MODEL, "--max-size", "64", "-j", "0")
    return out


def test_help_imports_no_server_or_model_stack():
    code = ("import sys\nfrom simret.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('fastapi', 'uvicorn', 'starlette', 'torch', 'multipart') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "serve" in result.stdout and "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_serve_help_teaches():
    result = run("serve", "--help")
    for text in ("--token", "--port", "--cors", "--batch-size", "--max-upload-mb", "POST /search", "curl -F"):
        assert text in result.output


def test_busy_port_is_a_one_line_error(index_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run("serve", index_dir, "--port", taken.getsockname()[1], ok=False)
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output and "--port" in result.output
    assert "Traceback" not in result.output


def test_another_model_is_refused(index_dir):
    result = run("serve", index_dir, "--model", "test_vit", "--weights", "none", ok=False)
    assert result.exit_code == 1 and "test_vit" in result.output and "Traceback" not in result.output


def test_a_store_only_index_is_served_by_an_exact_scan(photos, tmp_path):
    from fastapi.testclient import TestClient

    from simret.serve import create_app

    out = tmp_path / "cache"
    run("index", photos, "--out", out, *MODEL, "--max-size", "64", "-j", "0", "--index", "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        app = create_app(out, reload_interval=0)
    with TestClient(app) as live:
        found = live.get("/search", params={"id": "moon_0.jpg", "k": 3}).json()
    expected = json.loads(run("search", out, photos / "moon_0.jpg", "-k", "3", "--format", "jsonl").stdout)
    assert found["ids"] == expected["ids"] and found["ids"][0] == "moon_0.jpg"


def test_server_process_answers_warns_reloads_and_stops_gracefully(index_dir, photos):
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMRET_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "simret", "-v", "serve", str(index_dir), "--host", "0.0.0.0",
                                "--port", "0", "--reload-interval", "0"], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines, port = [], None
    ready = threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if "serving" in line and re.search(r":(\d+)/", line):
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "".join(lines)
        port = int(re.search(r":(\d+)/", next(x for x in lines if "serving" in x)).group(1))
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["status"] == "ok"
        assert health["count"] == json.loads((index_dir / "meta.json").read_text())["count"]
        with open(photos / "query_chelsea_q0.jpg", "rb") as handle:
            found = httpx.post(f"{base}/search", params={"k": 2}, files={"image": ("q.jpg", handle)}, timeout=60).json()
        assert len(found["ids"]) == 2
        process.send_signal(signal.SIGHUP)  # reload now: same generation, nothing to do, still serving
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5)
    output = "".join(lines)
    assert "Warning: listening on 0.0.0.0 without --token" in output
    assert '"POST /search" 200' in output and '"GET /health" 200' in output  # one line per request at -v
    assert "Traceback" not in output and "stopped" in output


# ------------------------------------------------------------------------------ simret.retrieval.queries


def test_parse_box():
    from simret.retrieval.queries import parse_box

    assert parse_box(None) is None and parse_box(" ") is None
    assert parse_box("1, 2,30.5,40") == (1.0, 2.0, 30.5, 40.0)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,inf", "5,5,1,9", "nan,1,2,3"):
        with pytest.raises(ValueError, match="bbox"):
            parse_box(bad)


def test_describe_queries_keeps_names_failures_and_batch_independence(index_dir, photos, tmp_path):
    from simret.models import create_encoder
    from simret.retrieval import IndexDir
    from simret.retrieval.queries import describe_queries

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        encoder = create_encoder("test_resnet", weights=None)
    meta = IndexDir(index_dir).meta
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    names = [photos / "chelsea_easy_0.jpg", broken, photos / "query_chelsea_q0.jpg", photos / "chelsea_easy_0.jpg"]
    together = describe_queries(encoder, meta, names, batch_size=8)
    assert together.names == [str(names[0]), str(names[2]), str(names[3])]
    assert together.positions.tolist() == [0, 2, 3]
    assert together.failures[0][0] == str(broken) and "not an image" in together.failures[0][1]
    alone = np.concatenate([describe_queries(encoder, meta, [n]).descriptors for n in (names[0], names[2])])
    np.testing.assert_allclose(together.descriptors[:2], alone, atol=1e-5)
    np.testing.assert_allclose(together.descriptors[0], together.descriptors[2], atol=1e-6)
    boxed = describe_queries(encoder, meta, names[:1], boxes=[(0, 0, 20, 20)])
    assert not np.allclose(boxed.descriptors, together.descriptors[:1], atol=1e-3)
    # the stored descriptors of the index were made the same way
    stored = IndexDir(index_dir).database_vectors([IndexDir(index_dir).ids.index("chelsea_easy_0.jpg")])
    np.testing.assert_allclose(IndexDir(index_dir).prepare(together.descriptors[:1]), stored, atol=1e-5)

