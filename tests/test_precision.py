"""--precision: resolution per device, fidelity of the fast paths (tiny models), and the records that keep it."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from simret.cli import cli
from simret.models import create_encoder
from simret.models import precision as precision_module
from simret.models.precision import recorded_precision, resolve_precision
from simret.models.runtime import InferenceEncoder, auto_batch_size, parse_compile, prepare_for_inference

# ------------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512f", "amx_bf16"}, "bf16"),
                                             ({"avx2", "avx512_bf16"}, "bf16"),
                                             ({"avx2", "avx512f"}, "fp32")])
def test_auto_on_the_cpu_follows_its_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((6, 1), "fp16")])
def test_auto_on_gpus_bf16_from_ampere_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_explicit_precisions_are_kept_and_the_legacy_half_is_the_old_rule():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, "cpu") == name
        assert resolve_precision(name.upper(), "mps") == name
    assert resolve_precision("half", "cpu") == "bf16"
    assert resolve_precision("half", "mps") == "fp16"
    assert resolve_precision("auto", "mps") == "fp16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")


def test_recorded_precision_reads_new_and_legacy_records():
    assert recorded_precision({"precision": "bf16", "half": False}) == "bf16"
    assert recorded_precision({"half": True}) == "bf16"
    assert recorded_precision({"half": False}) == "fp32"
    assert recorded_precision({}) == "fp32"
    assert recorded_precision({"precision": b"fp16"}) == "fp16"


def test_same_index_settings_maps_legacy_half():
    from simret.retrieval.indexdir import IndexSettings
    from simret.retrieval.indexdir.searchable import same_index_settings

    legacy = {"index": {"requested": "auto", "requested_params": {}}, "whitening": {"kind": "none"}, "half": True}
    assert same_index_settings(legacy, IndexSettings(precision="bf16"))
    assert not same_index_settings(legacy, IndexSettings(precision="fp32"))
    assert same_index_settings({**legacy, "half": False}, IndexSettings(precision="fp32"))


def test_compile_and_batch_size_arguments():
    assert [parse_compile(v) for v in (True, False, None, "auto", "ON", "off")] == ["on", "off", "auto", "auto", "on",
                                                                                  "off"]
    with pytest.raises(ValueError):
        parse_compile("sometimes")
    cpu = torch.device("cpu")
    assert auto_batch_size(1024, cpu) == 1 and auto_batch_size(224, cpu, square=True) == 16
    assert auto_batch_size(224, cpu) > auto_batch_size(512, cpu) >= 1
    assert auto_batch_size(1024, torch.device("cuda")) > auto_batch_size(1024, cpu)


# --------------------------------------------------------------------------------------------- fidelity


def _photos(count=8, shift=0):
    """Real photographs (scikit-image) of varied shapes, normalised: list of (1, 3, H, W); ``shift`` crops that
    many pixels off the left and top first (a near-duplicate view of each)."""
    from simret.data.images import to_tensor
    from simret.data.samples import DISTRACTORS, LANDMARKS, load_photo

    names = (list(LANDMARKS) + list(DISTRACTORS))[:count]
    tensors = []
    for number, name in enumerate(names):
        image = load_photo(name).convert("RGB")
        image = image.crop((shift, shift, image.width, image.height))
        image = image.resize((64 + 8 * (number % 4), 48 + 16 * (number % 3)))
        tensors.append(to_tensor(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None])
    return tensors


def _reference(encoder, images):
    with torch.inference_mode():
        return torch.cat([F.normalize(encoder(x).float(), dim=-1) for x in images])


@pytest.fixture(scope="module")
def encoders():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"cnn": create_encoder("test_resnet", gamma=2.0), "vit": create_encoder("test_vit", gamma=1.25)}


@pytest.mark.parametrize("family", ["cnn", "vit"])
@pytest.mark.parametrize("precision, channels_last", [("fp32", True), ("bf16", False), ("bf16", True),
                                                      ("fp16", None)])
def test_fast_paths_keep_descriptors(encoders, family, precision, channels_last):
    encoder = encoders[family]
    images = _photos()
    reference = _reference(encoder, images)
    fast = prepare_for_inference(encoder, precision, "cpu", compile=False, channels_last=channels_last)
    assert fast.precision == precision
    with torch.inference_mode():
        described = torch.cat([F.normalize(fast(x), dim=-1) for x in images])
    assert described.dtype == torch.float32
    cosine = (described * reference).sum(-1)
    assert cosine.min().item() >= 0.999, cosine
    # the same nearest neighbour: queries are near-duplicate views (a few pixels cropped off), the database
    # the photographs described at fp32; fp32 queries find their own photograph, and so must fast ones
    views = _photos(shift=6)
    exact = _reference(encoder, views) @ reference.T
    with torch.inference_mode():
        quick = torch.cat([F.normalize(fast(x), dim=-1) for x in views]) @ reference.T
    assert exact.argmax(1).tolist() == list(range(len(views)))
    assert quick.argmax(1).tolist() == exact.argmax(1).tolist()
    prepare_for_inference(encoder, "fp32", "cpu", channels_last=False)  # the next test starts contiguous


def test_simpool_returns_float32_under_autocast(encoders):
    encoder = encoders["cnn"]
    features = torch.randn(2, encoder.dim, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = encoder.pool(features.to(torch.bfloat16))
        attention = encoder.pool.attention(features.to(torch.bfloat16))
    assert pooled.dtype == torch.float32 and attention.dtype == torch.float32
    exact = encoder.pool(features.to(torch.bfloat16).float())
    torch.testing.assert_close(pooled, exact, rtol=1e-5, atol=1e-5)  # nothing rounded to bf16 on the way out
    assert encoder.pool(features.to(torch.bfloat16)).dtype == torch.bfloat16  # no autocast: the input's dtype


def test_the_fingerprint_does_not_depend_on_precision_or_layout(encoders):
    encoder = encoders["cnn"]
    before = encoder.fingerprint
    for precision, layout in (("bf16", True), ("fp16", False), ("fp32", True)):
        fast = prepare_for_inference(encoder, precision, "cpu", channels_last=layout)
        assert fast.fingerprint == before
    prepare_for_inference(encoder, "fp32", "cpu", channels_last=False)


def test_the_fingerprint_is_hashed_once_per_set_of_weights(monkeypatch):
    import simret.models.encoder as encoder_module

    encoder = create_encoder("test_resnet")
    calls = []
    real = encoder_module.hashlib.blake2b

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_module.hashlib, "blake2b", counting)
    first = encoder.fingerprint
    fast = prepare_for_inference(encoder, "bf16", "cpu")
    fast(torch.randn(1, 3, 32, 32))
    assert encoder.fingerprint == fast.fingerprint == encoder.provenance()["fingerprint"] == first
    assert len(calls) == 1
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    second = encoder.fingerprint
    assert second != first and len(calls) == 2  # new weights, new digest
    pool = encoder.pool.wk  # a replaced parameter (a new tensor, version 0 like the old one)
    pool.weight = torch.nn.Parameter(pool.weight.detach() * 2)
    third = encoder.fingerprint
    assert third not in (first, second) and len(calls) == 3
    assert encoder.fingerprint == third and len(calls) == 3  # unchanged: not hashed again


def _a_replaced_or_reassigned_parameter_renews_the_copy(encoder, fast, image):
    """A replaced ``nn.Parameter`` (a new tensor, version 0 like the old one) makes the bf16 trunk copy stale;
    the encoder is left as it was."""
    from simret.models import runtime

    def current_copy():
        with torch.inference_mode():
            described = fast(image)
        copies = [v for k, v in runtime._compiled_cache(encoder).items() if k[0] == runtime._TRUNK_COPY]
        assert len(copies) == 1
        return copies[0], described

    before, first = current_copy()
    assert current_copy()[0] is before  # nothing changed: the same copy
    fc2 = encoder.trunk.blocks[0].mlp.fc2
    original = fc2.bias
    try:
        fc2.bias = torch.nn.Parameter(original.detach() + 0.5)
        replaced, second = current_copy()
        assert replaced is not before and not torch.allclose(second, first)
    finally:
        fc2.bias = original
    restored, third = current_copy()
    assert restored is not replaced and torch.equal(third, first)


def test_a_transformer_at_bf16_runs_a_copy_with_16_bit_weights_kept_current(encoders):
    """ViTs on a CPU at bf16 run a copy whose trunk holds bf16 weights (no cast per call); the encoder keeps
    its float32 weights and fingerprint, and the copy follows the encoder when its weights change."""
    from simret.models import runtime

    encoder = encoders["vit"]
    before = encoder.fingerprint
    fast = prepare_for_inference(encoder, "bf16", "cpu", compile=False)
    image = _photos()[0]
    with torch.inference_mode():
        first = fast(image)
    copies = [v for k, v in runtime._compiled_cache(encoder).items() if k[0] == runtime._TRUNK_COPY]
    assert len(copies) == 1 and copies[0] is not encoder
    assert fast.describe() == "bf16 (16-bit trunk weights), contiguous on cpu"
    assert {p.dtype for p in copies[0].trunk.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in copies[0].pool.parameters()} <= {torch.float32}
    assert {p.dtype for p in encoder.parameters()} == {torch.float32} and encoder.fingerprint == before
    with torch.inference_mode():
        assert torch.equal(fast(image), first)  # the same copy again
    with torch.no_grad():
        encoder.trunk.blocks[0].mlp.fc2.bias.add_(0.5)
    try:
        with torch.inference_mode():
            changed = fast(image)
        fresh = [v for k, v in runtime._compiled_cache(encoder).items() if k[0] == runtime._TRUNK_COPY]
        assert len(fresh) == 1 and fresh[0] is not copies[0]  # rebuilt from the new weights, the old one dropped
        assert not torch.allclose(changed, first)
        exact = F.normalize(encoder(image), dim=-1)
        assert (F.normalize(changed, dim=-1) * exact).sum().item() >= 0.999
    finally:
        with torch.no_grad():
            encoder.trunk.blocks[0].mlp.fc2.bias.sub_(0.5)
    _a_replaced_or_reassigned_parameter_renews_the_copy(encoder, fast, image)
    cnn = prepare_for_inference(encoders["cnn"], "bf16", "cpu", compile=False)
    assert not cnn._casts_trunk and not prepare_for_inference(encoder, "fp32", "cpu")._casts_trunk
    assert not prepare_for_inference(encoder, "fp16", "cpu")._casts_trunk  # fp16 on a CPU: autocast alone
    # the official SimPool ViTs norm the pooled descriptor (fc_norm): it keeps float32 weights for SimPool's output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normed = create_encoder("test_vit", gamma=1.25, fc_norm=True)
    fast = prepare_for_inference(normed, "bf16", "cpu", compile=False)
    with torch.inference_mode():
        described = F.normalize(fast(image), dim=-1)
        exact = F.normalize(normed(image), dim=-1)
    assert fast._casts_trunk and (described * exact).sum().item() >= 0.999
    prepare_for_inference(encoders["cnn"], "fp32", "cpu", channels_last=False)


def test_prepared_encoders_are_reused_when_they_run_as_asked(encoders):
    fast = prepare_for_inference(encoders["vit"], "bf16", "cpu")
    assert prepare_for_inference(fast, None, None, compile=None) is fast
    assert prepare_for_inference(fast, "bf16", "cpu", compile=False) is fast
    other = prepare_for_inference(fast, "fp32", "cpu")
    assert isinstance(other, InferenceEncoder) and other.precision == "fp32" and other.encoder is fast.encoder
    assert fast.dim == encoders["vit"].dim and fast.data_config == encoders["vit"].data_config


def test_attention_maps_at_reduced_precision(encoders):
    fast = prepare_for_inference(encoders["vit"], "bf16", "cpu")
    images = torch.randn(1, 3, 64, 48)
    maps = fast.attention(images)
    with torch.inference_mode():
        exact = encoders["vit"].attention(images)
    assert maps.dtype == torch.float32 and maps.shape == exact.shape
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(1), atol=1e-4, rtol=0)
    assert F.cosine_similarity(maps.flatten(1), exact.flatten(1)).item() > 0.999


def _compiled_matches(encoder, backend):
    fast = prepare_for_inference(encoder, "fp32", "cpu", compile=False)
    fast.compile_backend = backend
    images = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 80), torch.randn(2, 3, 64, 64)]
    reference = _reference(encoder, images)
    seconds = fast.compile(images[0])
    if not fast.compiled:
        pytest.skip("torch.compile is unusable here (see the warning logged)")
    assert seconds > 0
    with torch.inference_mode():
        described = torch.cat([F.normalize(fast(x), dim=-1) for x in images])
    assert ((described * reference).sum(-1) > 0.99999).all()
    return fast


def test_compiled_path_matches_eager_over_varied_sizes(encoders):
    """The dynamo path (capture, dynamic height and width, the freezing flag, the cache on the encoder) with
    dynamo's ``eager`` backend, which compiles nothing; inductor itself runs in the next test."""
    fast = _compiled_matches(encoders["cnn"], "eager")
    again = prepare_for_inference(encoders["cnn"], "fp32", "cpu", compile=False)
    again.compile_backend = "eager"
    again.compile()
    assert again.compiled and again._forward is fast._forward  # the compiled module is cached on the encoder


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SIMRET_TEST_INDUCTOR") != "1",
                    reason="inductor takes minutes to compile even a tiny CNN on a 2-core CPU (7 min measured on a "
                           "loaded one): set SIMRET_TEST_INDUCTOR=1 to run it; scripts/bench.py extract and "
                           "scripts/gpu_check.py --compile run inductor on real models")
def test_inductor_compiled_path_matches_eager(encoders):
    _compiled_matches(encoders["cnn"], "inductor")


def test_auto_compile_waits_until_the_run_repays_it():
    from simret.models.runtime import CompilePolicy

    policy = CompilePolicy(expected_seconds=60, speedup=2.5, margin=1.5)
    assert not policy.should_compile(1, 0.5, 10_000)  # too few observations
    assert not policy.should_compile(10, 3.0, 100)  # 100 x 0.3 s x 0.6 = 18 s saved < 90 s
    assert policy.should_compile(10, 3.0, 1000)  # 180 s saved


# ----------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    from simret.data.samples import DISTRACTORS, LANDMARKS, load_photo

    folder = tmp_path_factory.mktemp("photos")
    for number, name in enumerate(list(LANDMARKS) + list(DISTRACTORS)[:3]):
        image = load_photo(name).convert("RGB")
        image.thumbnail((96 - 8 * (number % 3), 96))
        image.save(folder / f"{name}.jpg", quality=92)
    return folder


MODEL = ["-m", "test_resnet", "-w", "none", "--max-size", "96"]


def _index(folder, out, *extra):
    result = CliRunner().invoke(cli, ["index", str(folder), "--out", str(out), *MODEL, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "meta.json").read_text())


def test_index_records_precision_and_fp32_queries_search_a_bf16_index(photo_folder, tmp_path):
    import h5py

    from simret.retrieval.indexdir import STORE, current

    meta = _index(photo_folder, tmp_path / "idx", "--precision", "bf16")
    assert meta["precision"] == "bf16" and "half" not in meta and meta["store_dtype"] == "float16"
    with h5py.File(current(tmp_path / "idx").file(STORE), "r") as store:
        assert store.attrs["precision"] == "bf16"
    query = photo_folder / "chelsea.jpg"
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "idx"), str(query), "--precision", "fp32",
                                      "--format", "jsonl", "-k", "3"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["ids"][0] == "chelsea.jpg" and found["scores"][0] > 0.999


def test_fp32_index_stores_float32_and_append_keeps_the_index_precision(photo_folder, tmp_path):
    out = tmp_path / "idx"
    assert _index(photo_folder, out, "--precision", "fp32")["store_dtype"] == "float32"
    meta = _index(photo_folder, out, "--append")
    assert meta["precision"] == "fp32"


def test_the_deprecated_half_flag_still_works(photo_folder, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        meta = _index(photo_folder, tmp_path / "idx", "--half")
    assert meta["precision"] == "bf16"  # on the CPU, what --half always meant
    assert any("--half is deprecated" in r.getMessage() for r in caplog.records)


def test_every_encoder_command_takes_precision():
    for name in ("index", "search", "eval", "fewshot", "probe", "classify", "train", "attention"):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "--precision [auto|fp32|bf16|fp16]" in result.output, name
        assert "--half" not in result.output  # hidden, deprecated
    bad = CliRunner().invoke(cli, ["index", "x", "--out", "y", "--precision", "int8"])
    assert bad.exit_code == 2 and "int8" in bad.output


def test_extract_with_precision_and_auto_batch(photo_folder):
    from simret.retrieval.extraction import extract

    encoder = create_encoder("test_resnet", gamma=2.0)
    ids = sorted(p.name for p in photo_folder.iterdir())
    exact = extract(encoder, photo_folder, ids, max_size=96, batch_size=1, workers=0, progress=False)
    fast = extract(encoder, photo_folder, ids, max_size=96, batch_size="auto", workers=0, precision="bf16",
                   progress=False, scales=(1, 0.707))
    exact_ms = extract(encoder, photo_folder, ids, max_size=96, workers=0, progress=False, scales=(1, 0.707))
    assert fast.ids == exact.ids == exact_ms.ids
    assert (np.sum(fast.descriptors * exact_ms.descriptors, axis=1) >= 0.999).all()


def test_commands_default_to_auto(photo_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("SIMRET_PRECISION", raising=False)
    assert _index(photo_folder, tmp_path / "idx")["precision"] == resolve_precision("auto", "cpu")
    monkeypatch.setenv("SIMRET_PRECISION", "fp16")
    assert _index(photo_folder, tmp_path / "other")["precision"] == "fp16"
