"""`simret serve` through FastAPI's test client: parity with `simret search`, every error status, the token,
path traversal on /images, thumbnails, attention, metrics, micro-batching and hot reload after --append."""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the test client

from cli_run import run  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from simret.models import RandomWeightsWarning  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model", "test_resnet", "--weights", "none"]
QUERY = "query_chelsea_q0.jpg"




@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """36 real photographs (two landmarks and distractors) and escape.jpg, which becomes a symlink to a file
    outside the indexed folder once it is indexed (simret index refuses such links; a root can change later)."""
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea", "rocket"], image_size=64, extra_distractors=0)
    folder = root / "rsample" / "jpg"
    secret = root / "secret.jpg"
    shutil.copy(folder / "coins_0.jpg", secret)
    shutil.copy(folder / "coins_0.jpg", folder / "escape.jpg")
    return folder


@pytest.fixture(scope="module")
def index_dir(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    run("index", sample, "--out", out, *MODEL, "--max-size", "64", "--scales", "1,0.707", "-j", "0", "-b", "8")
    (sample / "escape.jpg").unlink()
    (sample / "escape.jpg").symlink_to(sample.parent.parent / "secret.jpg")
    return out


@pytest.fixture(scope="module")
def client(index_dir):
    from simret.serve import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        app = create_app(index_dir, reload_interval=0)  # the encoder from meta.json, as simret serve builds it
    with TestClient(app) as test_client:
        yield test_client


def upload(client, path, params=None, url="/search", name=None):
    with open(path, "rb") as handle:
        return client.post(url, params=params or {}, files={"image": (name or path.name, handle, "image/jpeg")})


def cli_search(index_dir, query, *options):
    result = run("search", index_dir, query, "--format", "jsonl", *options)
    return json.loads(result.stdout.splitlines()[0])


def png_bytes(width=40, height=30, color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ search


def test_health_names_the_generation_served(client, index_dir):
    meta = json.loads((index_dir / "meta.json").read_text())
    body = client.get("/health").json()
    assert body == {"status": "ok", "count": 37, "fingerprint": meta["fingerprint"],
                    "generation": meta["generation"], "attention": True, "classify": None}


@pytest.mark.parametrize("options", [
    {},
    {"bbox": "5,8,50,60"},
    {"qe": "2", "alpha": "1.5"},
    {"k": "100", "bbox": "0,0,30,40", "qe": "3"},
], ids=["plain", "bbox", "qe", "all-results-bbox-qe"])
def test_upload_search_equals_simret_search(client, index_dir, sample, options):
    query = sample / QUERY
    k = options.get("k", "10")
    flags = ["-k", k] + [f for name in ("bbox", "qe", "alpha") if name in options
                         for f in (f"--{name}", options[name])]
    expected = cli_search(index_dir, query, *flags)
    response = upload(client, query, {"k": k, **options})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"query", "ids", "scores"} and body["query"] == QUERY
    assert body["ids"] == expected["ids"]
    np.testing.assert_allclose(body["scores"], expected["scores"], atol=1e-5)
    assert len(body["ids"]) == min(int(k), 37)


def test_png_upload_equals_simret_search(client, index_dir, tmp_path):
    query = tmp_path / "odd size.png"
    image = Image.fromarray((np.random.RandomState(3).rand(45, 70, 3) * 255).astype(np.uint8))
    image.save(query)
    expected = cli_search(index_dir, query, "-k", "5")
    body = upload(client, query, {"k": 5}).json()
    assert body["ids"] == expected["ids"]
    np.testing.assert_allclose(body["scores"], expected["scores"], atol=1e-5)


def test_more_like_this_searches_with_the_stored_descriptor(client, index_dir):
    from simret.retrieval import IndexDir
    from simret.retrieval.store import read_store

    index = IndexDir(index_dir)
    row = index.ids.index("rocket_easy_1.jpg")
    scores, rows = index.search(read_store(index_dir / "descriptors.h5", rows=[row]).descriptors, 4, qe=2)
    body = client.get("/search", params={"id": "rocket_easy_1.jpg", "k": 4, "qe": 2}).json()
    assert body["query"] == "rocket_easy_1.jpg"
    assert body["ids"] == [index.ids[r] for r in rows[0]]
    np.testing.assert_allclose(body["scores"], scores[0], atol=1e-5)
    plain = client.get("/search", params={"id": "rocket_easy_1.jpg", "k": 3}).json()
    assert plain["ids"][0] == "rocket_easy_1.jpg" and plain["scores"][0] == pytest.approx(1.0, abs=1e-5)


def test_concurrent_uploads_get_their_own_answers(client, sample):
    """Several clients at once (micro-batched by the model thread): each answer is the one it gets alone."""
    names = ["query_chelsea_q0.jpg", "query_rocket_q0.jpg", "chelsea_easy_0.jpg", "rocket_hard_0.jpg",
             "moon_0.jpg", "query_rocket_q1.jpg"]
    alone = {name: upload(client, sample / name, {"k": 5}).json() for name in names}
    answers = {}

    def ask(name):
        answers[name] = upload(client, sample / name, {"k": 5}).json()

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in names:
        assert answers[name]["ids"] == alone[name]["ids"]
        np.testing.assert_allclose(answers[name]["scores"], alone[name]["scores"], atol=1e-5)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("params, needle", [
    ({"k": 0}, "k must be"),
    ({"k": 100000}, "k must be"),
    ({"k": "ten"}, "k:"),
    ({"qe": -1}, "qe must be"),
    ({"qe": 38}, "qe must be"),
    ({"alpha": "nan"}, "alpha must be"),
    ({"alpha": -1}, "alpha must be"),
    ({"bbox": "1,2,3"}, "bbox"),
    ({"bbox": "9,9,2,2"}, "x2 > x1"),
    ({"bbox": "500,500,900,900"}, "crop box"),  # well formed, but off the image
])
def test_bad_parameters_are_400(client, sample, params, needle):
    response = upload(client, sample / QUERY, params)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_missing_image_field_is_400(client):
    response = client.post("/search", files={"picture": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 400 and "image" in response.json()["error"]


@pytest.mark.parametrize("data", [b"", b"hello, not a picture", b"GIF89a" + b"\x00" * 3],
                         ids=["empty", "text", "broken-gif-header"])
def test_not_an_image_is_415(client, data):
    response = client.post("/search", files={"image": ("x.jpg", data, "image/jpeg")})
    assert response.status_code == 415, response.text
    assert "error" in response.json()


def test_truncated_image_is_415(client, sample):
    data = (sample / "chelsea_easy_0.jpg").read_bytes()
    response = client.post("/search", files={"image": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert response.status_code == 415 and "truncated" in response.json()["error"]


def _png_claiming(width, height):
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels (CRC fixed)."""
    data = bytearray(png_bytes(1, 1))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(header) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40000, 10000])  # past PIL's error limit; past its warning limit only
def test_decompression_bomb_is_413(client, side):
    response = client.post("/search", files={"image": ("bomb.png", _png_claiming(side, side), "image/png")})
    assert response.status_code == 413 and "too large" in response.json()["error"]


def test_upload_over_the_limit_is_413(index_dir, encoder, sample):
    from simret.serve import create_app

    app = create_app(index_dir, encoder=encoder, max_upload_mb=0.002, reload_interval=0)  # ~2 KB
    with TestClient(app) as small:
        response = upload(small, sample / QUERY)
        assert response.status_code == 413 and "limit" in response.json()["error"]
        tiny = small.post("/search", files={"image": ("a.png", png_bytes(8, 8), "image/png")})
        assert tiny.status_code == 200


@pytest.mark.parametrize("url", ["/search?id=nope.jpg", "/images/nope.jpg", "/thumbnails/nope.jpg",
                                 "/attention?id=nope.jpg", "/no/such/page"])
def test_unknown_things_are_404(client, url):
    response = client.get(url)
    assert response.status_code == 404 and "error" in response.json()


def test_a_real_bug_is_a_json_500_without_traceback(index_dir, encoder, monkeypatch):
    from simret.serve import create_app
    from simret.serve.state import LoadedIndex

    app = create_app(index_dir, encoder=encoder, reload_interval=0)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(LoadedIndex, "search", broken)
    with TestClient(app, raise_server_exceptions=False) as buggy:
        response = buggy.get("/search", params={"id": "moon_0.jpg"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (logged by the server)"}
    assert "Traceback" not in response.text and "ZeroDivision" not in response.text


# ------------------------------------------------------------------------------------------ files


def test_images_serves_indexed_files(client, sample):
    response = client.get("/images/chelsea_easy_0.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (sample / "chelsea_easy_0.jpg").read_bytes()


@pytest.mark.parametrize("path", [
    "/images/..%2Fidx%2Fmeta.json", "/images/%2e%2e/%2e%2e/secret.jpg", "/images/..%2F..%2Fsecret.jpg",
    "/images//etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/./chelsea_easy_0.jpg%00.txt",
    "/images/escape.jpg",  # an indexed symlink whose file lies outside the root
    "/thumbnails/escape.jpg", "/thumbnails/..%2F..%2Fsecret.jpg",
])
def test_traversal_attempts_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.headers["content-type"] == "application/json"


def test_indexed_symlink_is_listed_but_not_served(client, index_dir):
    from simret.retrieval import IndexDir

    assert "escape.jpg" in IndexDir(index_dir).ids  # so it is the root check that refuses it


def test_thumbnails_are_small_jpegs_and_cached(client):
    from simret.serve.app import SearchService

    service: SearchService = client.app.state.service
    first = client.get("/thumbnails/rocket_easy_0.jpg", params={"size": 32})
    hits = service.thumbnails.hits
    second = client.get("/thumbnails/rocket_easy_0.jpg", params={"size": 32})
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(first.content)).size) == 32
    assert second.content == first.content and service.thumbnails.hits == hits + 1
    assert client.get("/thumbnails/rocket_easy_0.jpg", params={"size": 5}).status_code == 400


def test_attention_overlays(client, sample):
    by_id = client.get("/attention", params={"id": "chelsea_easy_0.jpg"})
    assert by_id.status_code == 200 and by_id.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(by_id.content))
    width, height = Image.open(sample / "chelsea_easy_0.jpg").size
    assert max(overlay.size) == 64 and abs(overlay.size[1] / overlay.size[0] - height / width) < 0.05  # max_size 64
    uploaded = upload(client, sample / "chelsea_easy_0.jpg", url="/attention")
    assert uploaded.status_code == 200 and uploaded.content == by_id.content
    assert client.post("/attention", files={"image": ("t.txt", b"text", "text/plain")}).status_code == 415


# ------------------------------------------------------------------------------------------ token


def test_token_guards_everything_but_health(index_dir, encoder):
    from simret.serve import create_app

    app = create_app(index_dir, encoder=encoder, token="s3cret", reload_interval=0)
    with TestClient(app) as guarded:
        assert guarded.get("/health").status_code == 200
        for url in ["/", "/search?id=moon_0.jpg", "/images/moon_0.jpg", "/metrics", "/docs", "/openapi.json",
                    "/static/app.js", "/nowhere"]:
            refused = guarded.get(url)
            assert refused.status_code == 401, url
            assert "token" in refused.json()["error"] and refused.headers["www-authenticate"] == "Bearer"
        assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.post("/search", files={"image": ("a.png", png_bytes(), "image/png")}).status_code == 401
        ok = guarded.get("/search", params={"id": "moon_0.jpg"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["ids"][0] == "moon_0.jpg"
        # a browser: /?token=… once, then the cookie
        wrong = guarded.get("/", params={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 401
        opened = guarded.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        assert guarded.get("/").status_code == 200  # the client keeps the cookie
        assert guarded.get("/images/moon_0.jpg").status_code == 200


def test_no_cors_unless_asked(client, index_dir, encoder):
    from simret.serve import create_app

    asked = {"Origin": "https://example.org"}
    assert "access-control-allow-origin" not in client.get("/health", headers=asked).headers
    app = create_app(index_dir, encoder=encoder, cors=["https://example.org"], reload_interval=0)
    with TestClient(app) as open_client:
        assert open_client.get("/health", headers=asked).headers["access-control-allow-origin"] == "https://example.org"
        other = open_client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------ the rest


def test_metrics_are_prometheus_text(client, sample):
    upload(client, sample / QUERY, {"k": 3})
    client.get("/search", params={"id": "nope"})
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'simret_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'simret_request_errors_total{method="GET",route="/search",status="404"}' in text
    assert 'simret_request_seconds_bucket{route="/search",le="+Inf"}' in text
    assert "simret_batch_size_count" in text and "# TYPE simret_queue_depth gauge" in text
    assert "simret_index_images 37" in text


def test_page_docs_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert client.get("/static/").status_code == 404  # no directory listing
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/health", "/images/{image_id}", "/thumbnails/{image_id}", "/attention",
            "/metrics"} <= set(paths)


def test_micro_batcher_puts_waiting_queries_into_one_batch():
    from simret.retrieval.queries import QueryDescriptors
    from simret.serve.batcher import ImageRejected, MicroBatcher, QueueFull

    release = threading.Event()
    calls = []

    def describe(paths, boxes, meta):
        calls.append(list(paths))
        if len(calls) == 1:
            release.wait(10)  # the first query holds the model while the others queue
        kept = [i for i, p in enumerate(paths) if p != "bad"]
        return QueryDescriptors([paths[i] for i in kept], np.asarray([[float(p[1:])] for p in paths if p != "bad"],
                                np.float32), np.asarray(kept, np.int64), [("bad", "not an image")] * ("bad" in paths))

    meta = {"scales": [1.0], "max_size": 64}
    batcher = MicroBatcher(describe, max_batch=4, max_wait=0.0, max_queue=6)
    first = batcher.describe_image("q0", None, meta)
    while not calls:
        time.sleep(0.01)
    waiting = [batcher.describe_image(name, None, meta) for name in ["q1", "bad", "q3", "q4", "q5"]]
    with pytest.raises(QueueFull):
        for number in range(10):
            batcher.describe_image(f"q{6 + number}", None, meta)
    release.set()
    assert first.result(10)[0, 0] == 0.0
    assert waiting[0].result(10).tolist() == [[1.0]] and waiting[3].result(10).tolist() == [[4.0]]
    with pytest.raises(ImageRejected, match="not an image"):
        waiting[1].result(10)
    assert calls[1] == ["q1", "bad", "q3", "q4"]  # up to max_batch at once
    batcher.stop()


def test_reload_picks_up_an_append_without_failing_queries_in_flight(sample, encoder, tmp_path):
    from simret.serve import create_app

    root = tmp_path / "photos"
    root.mkdir()
    for path in sorted(sample.glob("*.jpg"))[:12]:
        if not path.is_symlink():
            shutil.copy(path, root / path.name)
    out = tmp_path / "idx"
    run("index", root, "--out", out, *MODEL, "--max-size", "64", "-j", "0")
    app = create_app(out, encoder=encoder, reload_interval=0.1)
    statuses, stop = [], threading.Event()
    with TestClient(app) as live:
        before = live.get("/health").json()
        first_id = sorted(p.name for p in root.iterdir())[0]

        def hammer():
            while not stop.is_set():
                statuses.append(live.get("/search", params={"id": first_id, "k": 3}).status_code)
                statuses.append(upload(live, sample / QUERY, {"k": 3}).status_code)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            shutil.copy(sample / "query_rocket_q1.jpg", root / "new_rocket.jpg")
            # another process, as in real use (in this one, the DataLoader of every query the model thread
            # describes draws from torch's global RNG while random-init weights would be drawn from it)
            subprocess.run([sys.executable, "-m", "simret", "-q", "index", str(root), "--out", str(out), "--append",
                            "-j", "0"], check=True, capture_output=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
            deadline = time.monotonic() + 30
            while live.get("/health").json()["generation"] == before["generation"] and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            worker.join()
        after = live.get("/health").json()
        assert after["count"] == before["count"] + 1 and after["generation"] != before["generation"]
        found = live.get("/search", params={"id": "new_rocket.jpg", "k": 1}).json()
        assert found["ids"] == ["new_rocket.jpg"]
        assert upload(live, sample / "query_rocket_q1.jpg", {"k": 1}).json()["ids"] == ["new_rocket.jpg"]
        assert statuses and set(statuses) == {200}


def test_a_failed_reload_keeps_serving_the_old_generation(index_dir, encoder, tmp_path, caplog):
    import os

    from simret.serve import create_app

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy, symlinks=True)
    app = create_app(copy, encoder=encoder, reload_interval=0)
    service = app.state.service
    with TestClient(app) as live:
        served = live.get("/health").json()["generation"]
        good = os.readlink(copy / "current")
        bad = copy / "generations" / "999999-badbadba"  # a generation whose meta.json names another store
        shutil.copytree(copy / good, bad)
        meta = json.loads((bad / "meta.json").read_text())
        (bad / "meta.json").write_text(json.dumps({**meta, "store_generation": "f" * 32}))
        (copy / "current").unlink()
        (copy / "current").symlink_to("generations/999999-badbadba")
        with caplog.at_level("WARNING", logger="simret.serve"):
            assert service.holder.reload() is False
        assert "reload" in caplog.text and "different runs" in caplog.text
        assert live.get("/health").json()["generation"] == served
        assert live.get("/search", params={"id": "moon_0.jpg", "k": 2}).status_code == 200
        (copy / "current").unlink()
        (copy / "current").symlink_to(good)
        assert service.holder.reload() is False  # the same generation again: nothing to do
