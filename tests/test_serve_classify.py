"""`simret serve --support DIR`: POST /classify through FastAPI's test client (parity with `simret classify`,
errors, token, health, metrics), micro-batching of images to classify, and the command's options."""
import io
import json
import threading
import time
import warnings

import numpy as np
import pytest
from digit_folders import support_and_queries
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the test client

from cli_run import run  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from simret.models import RandomWeightsWarning  # noqa: E402

MODEL = ["--model", "test_resnet", "--weights", "none"]


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    """A cache of this module's own: the server and `simret classify` keep the support features in its default
    place (``$SIMRET_CACHE/classify/...``)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMRET_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """``support/digit_{0..4}/`` (5 examples each) and ``queries/digit_{0..4}/`` (3 each), real digit scans;
    the queries are also the indexed images."""
    return support_and_queries(tmp_path_factory.mktemp("digits"), classes=range(5), per_class=8, n_support=5,
                               image_size=24)


@pytest.fixture(scope="module")
def index_dir(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    run("index", digits / "queries", "--out", out, *MODEL, "--max-size", "64", "-j", "0")
    return out


def make_app(index_dir, **options):
    from simret.serve import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_app(index_dir, reload_interval=0, **options)


@pytest.fixture(scope="module")
def client(index_dir, digits):
    app = make_app(index_dir, support=digits / "support")  # the encoder from meta.json, as simret serve builds it
    with TestClient(app) as test_client:
        yield test_client


def queries(digits):
    return [digits / "queries" / f"digit_{d}" / f"{n:04d}.png" for d, n in ((0, 5), (3, 6), (4, 7))]


def upload(client, path, params=None, name=None):
    with open(path, "rb") as handle:
        return client.post("/classify", params=params or {},
                           files={"image": (name or path.name, handle, "image/png")})


def png_bytes(width=40, height=30, color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same_prediction(body, expected, name):
    assert set(body) == {"image", "class", "score", "top", "method"} and body["image"] == name
    assert body["class"] == expected["class"] and body["method"] == expected["method"]
    assert [t["class"] for t in body["top"]] == [t["class"] for t in expected["top"]]
    np.testing.assert_allclose([t["score"] for t in body["top"]], [t["score"] for t in expected["top"]], atol=1e-5)
    assert body["score"] == pytest.approx(expected["score"], abs=1e-5) and body["score"] == body["top"][0]["score"]


# ------------------------------------------------------------------------------------------ answers


def test_health_and_page_say_classification_is_on(client):
    body = client.get("/health").json()
    assert body["classify"] == {"classes": 5, "method": "protonet"} and body["count"] == 15
    assert "/classify" in client.get("/openapi.json").json()["paths"]
    assert "/classify" in client.get("/static/app.js").text and 'id="query-class"' in client.get("/").text


def test_classify_equals_simret_classify(client, digits, cache_root):
    paths = queries(digits)
    expected = [json.loads(line) for line in
                run("classify", digits / "support", *paths, *MODEL, "--format", "jsonl").stdout.splitlines()]
    for path, row in zip(paths, expected):
        response = upload(client, path)
        assert response.status_code == 200, response.text
        assert_same_prediction(response.json(), row, path.name)
        assert len(response.json()["top"]) == 3  # simret classify's default --top
    banks = list((cache_root / "classify").glob("support-*/*/features-support.h5"))
    assert len(banks) == 1  # one bank, where simret classify keeps it, shared by both


@pytest.mark.parametrize("method", ["cosine", "simpleshot", "simpleshot+mean", "logreg"])
def test_every_method_equals_simret_classify(index_dir, digits, encoder, method, tmp_path):
    name, _, with_mean = method.partition("+")
    options, flags = {"support_method": name}, ["--method", name]
    if with_mean:
        mean = np.random.RandomState(0).rand(encoder.dim).astype(np.float32)
        np.save(tmp_path / "mean.npy", mean)
        options["base_mean"], flags = tmp_path / "mean.npy", flags + ["--base-mean", tmp_path / "mean.npy"]
    path = queries(digits)[1]
    expected = json.loads(run("classify", digits / "support", path, *MODEL, "--format", "jsonl", "--top", "5",
                              *flags).stdout)
    with TestClient(make_app(index_dir, encoder=encoder, support=digits / "support", **options)) as live:
        assert live.get("/health").json()["classify"] == {"classes": 5, "method": name}
        body = upload(live, path, {"top": 5}).json()
    assert_same_prediction(body, expected, path.name)
    assert len(body["top"]) == 5


def test_top_lists_the_best_classes(client, digits):
    path = queries(digits)[0]
    one = upload(client, path, {"top": 1}).json()
    every = upload(client, path, {"top": 50}).json()  # more than there are classes: all of them
    assert len(one["top"]) == 1 and len(every["top"]) == 5
    assert one["top"][0] == every["top"][0] and one["class"] == every["class"]
    scores = [t["score"] for t in every["top"]]
    assert scores == sorted(scores, reverse=True) and sorted(t["class"] for t in every["top"]) == [
        f"digit_{d}" for d in range(5)]


def test_a_support_classifier_from_python(index_dir, digits, encoder):
    from simret.classify import SupportClassifier

    classifier = SupportClassifier(encoder, digits / "support", "cosine", image_size=32, top=4)
    path = queries(digits)[2]
    (expected,) = classifier.classify([str(path)], names=[path.name])
    with TestClient(make_app(index_dir, encoder=encoder, support=classifier)) as live:
        body = upload(live, path, {"top": 4}).json()
    assert_same_prediction(body, expected.to_dict(), path.name)


@pytest.mark.parametrize("method", ["protonet", "cosine", "simpleshot"])
def test_scores_do_not_depend_on_the_other_images(digits, encoder, method):
    """The server scores one image per request, simret classify all its images at once: the same numbers."""
    from simret.classify import SupportClassifier

    classifier = SupportClassifier(encoder, digits / "support", method, image_size=32)
    features = np.random.RandomState(1).rand(7, encoder.dim).astype(np.float32) * 10
    together = classifier.classify_features(features, list("abcdefg"), top=5)
    for row, prediction in zip(features, together):
        (alone,) = classifier.classify_features(row[None], ["x"], top=5)
        assert [c for c, _ in alone.top] == [c for c, _ in prediction.top]
        np.testing.assert_allclose([s for _, s in alone.top], [s for _, s in prediction.top], rtol=0, atol=1e-9)


def test_concurrent_uploads_get_their_own_answers(client, digits):
    paths = queries(digits) * 3
    alone = {path.name: upload(client, path).json() for path in paths[:3]}
    answers, searches = {}, []

    def ask(index, path):
        answers[index] = upload(client, path).json()
        with open(path, "rb") as handle:  # a search in the same batches: described separately
            searches.append(client.post("/search", params={"k": 2}, files={"image": (path.name, handle)}).status_code)

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(paths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(searches) == {200} and len(answers) == len(paths)
    for index, path in enumerate(paths):
        assert answers[index]["class"] == alone[path.name]["class"]
        assert answers[index]["score"] == pytest.approx(alone[path.name]["score"], abs=1e-5)


def test_micro_batcher_batches_images_to_classify_apart_from_searches():
    from simret.retrieval.queries import QueryDescriptors
    from simret.serve.batcher import ImageRejected, MicroBatcher

    release = threading.Event()
    calls = []

    def describe(paths, boxes, meta):
        calls.append(("describe", list(paths)))
        if len(calls) == 1:
            release.wait(10)  # the first query holds the model while the others queue
        return QueryDescriptors(list(paths), np.zeros((len(paths), 1), np.float32),
                                np.arange(len(paths), dtype=np.int64), [])

    def embed(paths):
        calls.append(("embed", list(paths)))
        kept = [i for i, p in enumerate(paths) if p != "bad"]
        return (np.asarray([[float(paths[i][1:])] for i in kept], np.float32), kept,
                [(i, "not an image") for i, p in enumerate(paths) if p == "bad"])

    batcher = MicroBatcher(describe, embed=embed, max_batch=8, max_wait=0.0)
    first = batcher.describe_image("s0", None, {"scales": [1.0], "max_size": 64})
    while not calls:
        time.sleep(0.01)
    waiting = [batcher.embed_image("e1"), batcher.describe_image("s2", None, {"scales": [1.0], "max_size": 64}),
               batcher.embed_image("bad"), batcher.embed_image("e3")]
    release.set()
    assert first.result(10).shape == (1, 1)
    assert waiting[0].result(10).tolist() == [[1.0]] and waiting[3].result(10).tolist() == [[3.0]]
    assert waiting[1].result(10).shape == (1, 1)
    with pytest.raises(ImageRejected, match="not an image"):
        waiting[2].result(10)
    assert sorted(calls[1:]) == [("describe", ["s2"]), ("embed", ["e1", "bad", "e3"])]  # one batch, two calls
    batcher.stop()
    with pytest.raises(RuntimeError, match="embed"):
        MicroBatcher(describe).embed_image("e1")


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("params, needle", [({"top": 0}, "top must be"), ({"top": 100000}, "top must be"),
                                            ({"top": "three"}, "top:")])
def test_bad_parameters_are_400(client, digits, params, needle):
    response = upload(client, queries(digits)[0], params)
    assert response.status_code == 400 and needle in response.json()["error"]


def test_missing_image_field_is_400(client):
    response = client.post("/classify", files={"picture": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 400 and "image" in response.json()["error"]


@pytest.mark.parametrize("data", [b"", b"hello, not a picture"], ids=["empty", "text"])
def test_not_an_image_is_415(client, data):
    response = client.post("/classify", files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 415 and "error" in response.json()


def test_truncated_image_is_415(client, digits):
    data = queries(digits)[0].read_bytes()
    response = client.post("/classify", files={"image": ("cut.png", data[: len(data) // 2], "image/png")})
    assert response.status_code == 415 and "cannot be used" in response.json()["error"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_413(client):
    import struct
    import zlib

    data = bytearray(png_bytes(1, 1))
    header = b"IHDR" + struct.pack(">II", 40000, 40000) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(header) & 0xFFFFFFFF)
    response = client.post("/classify", files={"image": ("bomb.png", bytes(data), "image/png")})
    assert response.status_code == 413 and "too large" in response.json()["error"]


def test_upload_over_the_limit_is_413(index_dir, digits, encoder):
    app = make_app(index_dir, encoder=encoder, support=digits / "support", max_upload_mb=0.002)  # ~2 KB
    with TestClient(app) as small:
        big = small.post("/classify", files={"image": ("big.png", png_bytes(300, 300) + b"\0" * 4096, "image/png")})
        assert big.status_code == 413 and "limit" in big.json()["error"]
        assert upload(small, queries(digits)[0]).status_code == 200


def test_classify_without_support_is_404_saying_how_to_enable_it(index_dir, encoder, digits):
    with TestClient(make_app(index_dir, encoder=encoder)) as plain:
        assert plain.get("/health").json()["classify"] is None
        for response in (upload(plain, queries(digits)[0]), plain.post("/classify"), plain.get("/classify")):
            assert response.status_code == 404 and "--support" in response.json()["error"]
        assert "/classify" not in plain.get("/openapi.json").json()["paths"]
        assert "simret_classify_classes 0" in plain.get("/metrics").text


def test_token_guards_classify(index_dir, encoder, digits):
    app = make_app(index_dir, encoder=encoder, support=digits / "support", token="s3cret")
    with TestClient(app) as guarded:
        refused = upload(guarded, queries(digits)[0])
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        with open(queries(digits)[0], "rb") as handle:
            ok = guarded.post("/classify", files={"image": ("q.png", handle, "image/png")},
                              headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["class"].startswith("digit_")


def test_metrics_count_classify(client, digits):
    upload(client, queries(digits)[0])
    client.post("/classify", params={"top": 0}, files={"image": ("a.png", png_bytes(), "image/png")})
    text = client.get("/metrics").text
    assert 'simret_requests_total{method="POST",route="/classify",status="200"}' in text
    assert 'simret_request_errors_total{method="POST",route="/classify",status="400"}' in text
    assert "simret_classify_classes 5" in text


@pytest.mark.parametrize("options, error", [
    ({"support_method": "cosine"}, "need a support set"),
    ({"support": "nowhere"}, "no such support folder"),
    ({"support": "SUPPORT", "support_method": "tim"}, "transductive"),
    ({"support": "SUPPORT", "support_method": "protonet", "base_mean": np.zeros(4, np.float32)}, "base mean"),
])
def test_create_app_refuses_bad_support_options(index_dir, encoder, digits, options, error):
    if options.get("support") == "SUPPORT":
        options = {**options, "support": digits / "support"}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        make_app(index_dir, encoder=encoder, **options)


# ------------------------------------------------------------------------------------------ the command


def test_serve_help_teaches_support():
    output = run("serve", "--help").output
    for text in ("--support", "--support-method", "--base-mean", "POST /classify"):
        assert text in output


@pytest.mark.parametrize("args, needle", [
    (["--support-method", "logreg"], "add --support"),
    (["--base-mean", "mean.npy"], "add --support"),
    (["--support", "nowhere"], "no such support folder"),
    (["--support", "SUPPORT", "--support-method", "nonsense"], "unknown method"),
    (["--support", "SUPPORT", "--support-method", "protonet", "--base-mean", "nowhere.npy"], "base mean applies"),
    (["--support", "SUPPORT", "--support-method", "simpleshot", "--base-mean", "nowhere.npy"], "no such base-mean"),
])
def test_bad_support_options_are_one_line_errors(index_dir, digits, args, needle):
    args = [str(digits / "support") if a == "SUPPORT" else a for a in args]
    result = run("serve", index_dir, "--port", "0", *args, ok=False)
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and needle in lines[0], result.output
