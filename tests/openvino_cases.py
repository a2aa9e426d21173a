"""The OpenVINO backend of the compiled path: descriptors equal to eager PyTorch over varied sizes and batches,
the IR cache on disk (reuse, damage, versions), the backend choice and its failures, and simret index with it.
Run by tests/test_openvino_backend.py in a process of its own (see there why)."""
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("openvino")

from cli_run import run  # noqa: E402

from simret.models import create_encoder, runtime  # noqa: E402
from simret.models.openvino_backend import INSTALL_HINT, OpenVinoForward, cached_model_dir  # noqa: E402
from simret.models.runtime import CompilePolicy, prepare_for_inference  # noqa: E402

SIZES = [(1, 64, 64), (1, 64, 80), (2, 48, 96), (1, 97, 61)]
SAME = {"rtol": 1e-5, "atol": 1e-6}  # one compiled IR run on different thread counts


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test converts into its own cache (never the user's)."""
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(runtime.BACKEND_ENV, raising=False)
    monkeypatch.delenv(runtime.COMPILE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def cnn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_encoder("test_resnet", gamma=2.0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(b, 3, h, w, generator=generator) for b, h, w in SIZES]


def _eager(encoder, images):
    with torch.inference_mode():
        return [F.normalize(encoder(x).float(), dim=-1) for x in images]


def _cosines(fast, encoder, images):
    """Cosine of each image's descriptor on the fast path to its eager fp32 one, ``(N,)``."""
    reference = torch.cat(_eager(encoder, images))
    with torch.inference_mode():
        described = torch.cat([F.normalize(fast(x), dim=-1) for x in images])
    assert described.dtype == torch.float32 and described.shape == reference.shape
    return (described * reference).sum(-1)


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-6), ("bf16", 2e-3)])
def test_one_compiled_model_serves_every_size_and_batch(cnn, images, precision, bound):
    fast = prepare_for_inference(cnn, precision, "cpu", compile="openvino")
    assert fast.compiled and fast.compile_backend == "openvino" and fast.compile_seconds > 0
    assert "compiled (openvino" in fast.describe()
    cosines = _cosines(fast, cnn, images)
    assert (1 - cosines).max().item() <= bound, cosines
    assert isinstance(fast._forward, OpenVinoForward)  # nothing fell back to eager
    # OpenVINO reads NCHW arrays: inputs are not laid out channels-last for it (an eager CNN's are)
    assert fast.channels_last and fast.prepare_images(images[0]).is_contiguous()
    eager = prepare_for_inference(cnn, precision, "cpu", compile=False)
    assert eager.prepare_images(images[0]).is_contiguous(memory_format=torch.channels_last)


def test_descriptors_do_not_depend_on_batch_mates(cnn, images):
    fast = prepare_for_inference(cnn, "fp32", "cpu", compile="openvino")
    pair = images[2]  # (2, 3, 48, 96)
    with torch.inference_mode():
        together = fast(pair)
        alone = torch.cat([fast(pair[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_the_converted_model_is_cached_and_reused(cnn, images, cache):
    first = OpenVinoForward(cnn, "fp32", images[0])
    folder = cached_model_dir(cnn)
    assert not first.from_cache and (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    assert folder.parent == cache / "openvino" and folder.name.startswith(cnn.fingerprint)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # the staging folder is gone
    second = OpenVinoForward(cnn, "fp32", images[0])
    assert second.from_cache
    with torch.inference_mode():
        np.testing.assert_allclose(first(images[1]).numpy(), second(images[1]).numpy(), rtol=1e-6, atol=1e-6)


def test_a_damaged_cache_entry_is_converted_again(cnn, images, caplog):
    OpenVinoForward(cnn, "fp32", images[0])
    xml = cached_model_dir(cnn) / "model.xml"
    xml.write_text("<net>not a model")
    with caplog.at_level("WARNING"):
        again = OpenVinoForward(cnn, "fp32", images[0])
    assert not again.from_cache and "converting again" in caplog.text
    assert xml.read_text().startswith("<?xml")


def test_other_weights_get_another_cache_entry(images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = create_encoder("test_resnet"), create_encoder("test_resnet")
    with torch.no_grad():
        next(second.parameters()).add_(0.5)
    assert cached_model_dir(first) != cached_model_dir(second)


def test_the_backend_choice(cnn, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = create_encoder("test_vit")
    assert runtime.default_compile_backend(cnn, torch.device("cpu")) == "openvino"
    assert runtime.default_compile_backend(vit, torch.device("cpu")) == "inductor"  # one graph per patch grid
    assert runtime.default_compile_backend(cnn, torch.device("cuda", 0)) == "inductor"
    monkeypatch.setenv(runtime.BACKEND_ENV, "inductor")
    assert runtime.default_compile_backend(cnn, torch.device("cpu")) == "inductor"
    monkeypatch.setenv(runtime.BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match="openvino or inductor"):
        runtime.default_compile_backend(cnn, torch.device("cpu"))
    assert runtime.parse_compile("openvino") == "on" and runtime.parse_compile("INDUCTOR") == "on"
    assert runtime.requested_backend("openvino") == "openvino" and runtime.requested_backend(True) is None


def test_a_prepared_encoder_is_prepared_again_for_another_backend(cnn):
    first = prepare_for_inference(cnn, "fp32", "cpu", compile="off")
    assert prepare_for_inference(first, None, None, compile=None) is first
    other = prepare_for_inference(first, None, None, compile="openvino")
    assert other is not first and other.compiled and other.compile_backend == "openvino"


def test_auto_compile_counts_the_cheaper_conversion():
    fresh, cached = CompilePolicy.for_backend("openvino"), CompilePolicy.for_backend("openvino", cached=True)
    assert cached.expected_seconds < fresh.expected_seconds < CompilePolicy.for_backend("inductor").expected_seconds
    assert not fresh.should_compile(10, 1.0, 20)  # 20 x 0.1 s x 0.63 = 1.3 s saved < 22.5 s
    assert fresh.should_compile(10, 10.0, 40)  # 25 s saved
    assert cached.should_compile(10, 1.0, 100)  # 6.3 s saved > 4.5 s


def test_without_openvino_the_error_says_how_to_install(images, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnn = create_encoder("test_resnet")  # its own: compiled models are cached on the encoder
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match="simret\\[openvino\\]"):
        OpenVinoForward(cnn, "fp32", images[0])
    assert "pip install" in INSTALL_HINT
    fast = prepare_for_inference(cnn, "fp32", "cpu", compile=False)
    fast.compile_backend = "openvino"
    fast.compile(images[0])  # a failed compilation keeps the eager path
    assert not fast.compiled
    with torch.inference_mode():
        assert fast(images[0]).shape == (1, cnn.dim)


def test_the_openvino_backend_refuses_other_devices(images, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnn = create_encoder("test_resnet")
    fast = prepare_for_inference(cnn, "fp32", "cpu", compile=False)
    fast.compile_backend = "openvino"
    fast.device = torch.device("meta")
    with caplog.at_level("WARNING"):
        fast.compile(images[0])
    assert not fast.compiled and "runs on the CPU" in caplog.text


def test_transformers_are_not_converted(images, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = create_encoder("test_vit")
    with caplog.at_level("WARNING"):
        fast = prepare_for_inference(vit, "fp32", "cpu", compile="openvino")
    assert not fast.compiled and "CNN encoders only" in caplog.text


def test_simret_index_with_openvino_stores_the_eager_descriptors(tmp_path):
    from simret.data.samples import write_revisited_sample
    from simret.retrieval.store import read_store

    write_revisited_sample(tmp_path, landmarks=["chelsea", "rocket"], image_size=96, extra_distractors=0)
    photos = tmp_path / "rsample" / "jpg"  # real photographs of varied shapes
    model = ["--model", "test_resnet", "--weights", "none", "--precision", "fp32", "-j", "0", "-b", "3"]
    eager = run("index", photos, "--out", tmp_path / "eager", *model, "--compile", "off")
    fast = run("index", photos, "--out", tmp_path / "fast", *model, "--compile", "openvino")
    assert "indexed" in eager.output and "indexed" in fast.output
    a, b = read_store(tmp_path / "eager" / "descriptors.h5"), read_store(tmp_path / "fast" / "descriptors.h5")
    assert list(a.ids) == list(b.ids) and len(a.ids) > 10
    cosines = (a.descriptors * b.descriptors).sum(1) / np.linalg.norm(a.descriptors, axis=1) / np.linalg.norm(
        b.descriptors, axis=1)
    assert (1 - cosines).max() < 1e-5


def test_passes_started_side_by_side_equal_the_latency_path(cnn, images):
    forward = OpenVinoForward(cnn, "fp32", images[0], threads=2)
    assert forward.streams == 2 and forward.parallel is not None
    with torch.inference_mode():
        one_by_one = [forward(x) for x in images]
        running = [forward.start(x) for x in images]  # all four in flight at once (one is a batch of two)
        side_by_side = [wait() for wait in running]
        again = [wait() for wait in [forward.start(x) for x in images]]
    for expected, got, second in zip(one_by_one, side_by_side, again):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        # the same IR on one thread per stream instead of two: equal here to the bit; float rounding allowed
        # elsewhere (another CPU may split a reduction across threads)
        torch.testing.assert_close(got, expected, **SAME)
        torch.testing.assert_close(second, expected, **SAME)
    assert len(forward._idle) == len(images)  # requests are reused, not created per pass


def test_a_pass_is_collected_once_and_a_failed_stream_compile_keeps_the_latency_model(cnn, images, caplog):
    from simret.models import openvino_backend

    forward = OpenVinoForward(cnn, "fp32", images[0], threads=2)
    with torch.inference_mode():
        running = forward.start(images[0])
        running()
        with pytest.raises(RuntimeError, match="already collected"):
            running()  # its request is back in the pool: its output would be another pass's

    class Refusing:
        def compile_model(self, *args):
            raise RuntimeError("no streams here")

    with caplog.at_level("WARNING"):
        assert openvino_backend._compile_streams(Refusing(), None, {}, 2) is None
    assert "could not compile 2 streams (no streams here)" in caplog.text


def test_a_started_pass_dropped_unread_finishes_before_its_input_is_freed(cnn, images):
    import gc

    forward = OpenVinoForward(cnn, "fp32", images[0], threads=2)
    with torch.inference_mode():
        running = forward.start(images[1].clone())
    del running
    gc.collect()
    assert len(forward._idle) == 1  # waited for and handed back
    with torch.inference_mode():
        torch.testing.assert_close(forward.start(images[1])(), forward(images[1]), **SAME)


def test_one_thread_runs_started_passes_at_once(cnn, images):
    forward = OpenVinoForward(cnn, "fp32", images[0], threads=1)
    assert forward.streams == 1 and forward.parallel is None
    with torch.inference_mode():
        torch.testing.assert_close(forward.start(images[3])(), forward(images[3]), rtol=0, atol=0)  # one model


@pytest.fixture
def two_threads():
    """torch on two threads (the tests run on one): OpenVINO takes torch's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_extraction_keeps_two_batches_in_flight_in_order(two_threads, tmp_path, monkeypatch):
    from PIL import Image

    from simret.retrieval import extraction
    from simret.retrieval.extraction import extract, iter_extract

    rng = np.random.default_rng(0)
    sizes = [(64, 48), (40, 72), (64, 48), (6, 5), (56, 56), (33, 90)]  # (6, 5) is too small for OpenVINO
    ids = []
    for number, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{number}.png")
        ids.append(f"{number}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnn = create_encoder("test_resnet", gamma=2.0)  # its own: compiled models are cached on the encoder
    fast = prepare_for_inference(cnn, "fp32", "cpu", compile="openvino")
    assert fast.runs_in_parallel and fast._forward.streams == 2
    depths = []
    push = extraction._InFlight.push
    monkeypatch.setattr(extraction._InFlight, "push", lambda self, items: (depths.append(len(self.batches) + 1),
                                                                           push(self, items))[1])
    options = dict(scales=(1.0, 0.707), max_size=None, batch_size=1, workers=0, progress=False)
    side_by_side = extract(fast, tmp_path, ids, **options)
    assert max(depths) == 2  # the next batch was started before the previous one was collected
    assert len(fast._forward._idle) >= 2  # passes ran on the two-stream model's requests
    order = [batch.positions.tolist() for batch in iter_extract(fast, tmp_path, ids, **options)]
    depths.clear()
    two_streams = fast._forward.parallel
    monkeypatch.setattr(fast._forward, "parallel", None)  # one pass at a time, on the latency model
    assert not fast.runs_in_parallel
    one_by_one = extract(fast, tmp_path, ids, **options)
    assert max(depths) == 1
    assert side_by_side.ids == one_by_one.ids == [i for i in ids if i != "3.png"]
    np.testing.assert_allclose(side_by_side.descriptors, one_by_one.descriptors, **SAME)
    assert [i for i, _ in side_by_side.failures] == ["3.png"] and "cannot process" in side_by_side.failures[0][1]
    assert order == [batch.positions.tolist() for batch in iter_extract(fast, tmp_path, ids, **options)]
    monkeypatch.setattr(fast._forward, "parallel", two_streams)
    depths.clear()
    single = extract(fast, tmp_path, ids[:1], **options)  # one image (a query): the latency model, nothing queued
    np.testing.assert_array_equal(single.descriptors, one_by_one.descriptors[:1])  # both on the latency model
    assert depths == [1]
    depths.clear()
    same_size = [ids[0], ids[2]]  # one batch at one scale: every thread on it, nothing side by side
    extract(fast, tmp_path, same_size, **{**options, "scales": (1.0,), "batch_size": 4})
    assert depths == [1]
