#!/usr/bin/env python
"""Check simret's GPU code paths on a CUDA machine (issue 13): one short run, a PASS/FAIL line per check.

    python scripts/gpu_check.py              # about 1-3 minutes on one GPU
    python scripts/gpu_check.py --compile    # also torch.compile on the GPU (adds about a minute)

Checks (random weights, nothing downloaded):
  precision      --precision auto resolves to bf16 (compute capability >= 8) or fp16 (older GPUs)
  fp16 / bf16    autocast descriptors vs fp32: min cosine >= 0.999, same top-1 neighbour; images/s of each
  channels_last  CNN weights and inputs NHWC on the GPU; images/s vs contiguous
  pinned         batches are stacked into page-locked memory and copied with non_blocking=True
  extract        simret's extract() on JPEG files end to end on the GPU; images/s, GPU utilisation
  decode_jpeg    torchvision.io.decode_jpeg(device="cuda") vs PIL: same pixels (+-3 levels mean), images/s
  faiss-gpu      (if faiss has GPUs) an index moved to the GPU returns the CPU's neighbours
  compile        (--compile) torch.compile on the GPU with dynamic sizes: same descriptors, compile time

Exit status 0 when every check that ran passed. ``--device cpu --quick`` runs the same code as a CPU
stand-in (GPU-only checks skipped, small sizes), to check the script itself where no GPU is lent.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = []
SMALL = {"batch": 32, "side": 224, "large": (768, 1024), "jpegs": 48}


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<14} {detail}", flush=True)


def skip(name: str, detail: str) -> None:
    print(f"SKIP  {name:<14} {detail}", flush=True)


def rate(fn, count: int, repeat: int = 3) -> float:
    """images/s of ``fn()`` (which processes ``count`` images), best of ``repeat`` after a warm-up."""

    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return count / best


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def descriptors(runtime, batches):
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        return torch.cat([F.normalize(runtime(b), dim=-1) for b in batches])


def check_precisions(encoder, device) -> None:
    import torch

    from simret.models.precision import resolve_precision
    from simret.models.runtime import prepare_for_inference

    auto = resolve_precision("auto", device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        report("precision", auto == ("bf16" if major >= 8 else "fp16"),
               f"auto -> {auto} on compute capability {major}.{minor}")
    torch.manual_seed(0)
    batch, side = SMALL["batch"], SMALL["side"]
    batches = [torch.randn(batch, 3, side, side) for _ in range(4)]
    large = [torch.randn(4, 3, *SMALL["large"]) for _ in range(2)]
    exact = prepare_for_inference(encoder, "fp32", device, channels_last=False)
    reference = descriptors(exact, batches)
    fp32_rate = rate(lambda: descriptors(exact, batches), 4 * batch)
    for precision in ("fp16", "bf16"):
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            skip(precision, "this GPU has no bf16")
            continue
        fast = prepare_for_inference(encoder, precision, device)
        described = descriptors(fast, batches)
        cosine = (described * reference).sum(-1)
        same_top1 = torch.equal((described @ reference.T).argmax(1), (reference @ reference.T).argmax(1))
        speed = rate(lambda fast=fast: descriptors(fast, batches), 4 * batch)
        speed_large = rate(lambda fast=fast: descriptors(fast, large), 8)
        report(precision, cosine.min().item() >= 0.999 and same_top1 and torch.isfinite(described).all().item(),
               f"min cos {cosine.min().item():.6f}, same top-1 {same_top1}; {speed:.0f} img/s at {side} px "
               f"(fp32 {fp32_rate:.0f}, {speed / fp32_rate:.1f}x), {speed_large:.1f} img/s at {SMALL['large']}")
    plain = prepare_for_inference(encoder, auto, device, channels_last=False)
    contiguous = rate(lambda: descriptors(plain, batches), 4 * batch)
    nhwc = prepare_for_inference(encoder, auto, device, channels_last=True)
    weight = next(m.weight for m in encoder.modules() if getattr(getattr(m, "weight", None), "ndim", 0) == 4)
    laid_out = weight.is_contiguous(memory_format=torch.channels_last) and \
        nhwc.prepare_images(batches[0]).is_contiguous(memory_format=torch.channels_last)
    fast_rate = rate(lambda: descriptors(nhwc, batches), 4 * batch)
    report("channels_last", laid_out, f"{auto}: {fast_rate:.0f} img/s NHWC vs {contiguous:.0f} contiguous "
                                      f"({fast_rate / contiguous:.2f}x)")


def check_pinned(device) -> None:
    import torch

    if device.type != "cuda":
        skip("pinned", "needs CUDA")
        return
    from simret.retrieval.extraction import _stack

    tensors = [torch.randn(3, 768, 1024) for _ in range(8)]
    batch = _stack(tensors, device)
    pinned = batch.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        start = time.perf_counter()
        on_gpu = batch.to(device, non_blocking=True)
        queued = time.perf_counter() - start
    stream.synchronize()
    copied = time.perf_counter() - start
    same = torch.equal(on_gpu.cpu(), torch.stack(tensors))
    report("pinned", pinned and same, f"stacked batch pinned: {pinned}; non_blocking copy returned after "
                                      f"{1000 * queued:.2f} ms, done after {1000 * copied:.1f} ms "
                                      f"({batch.numel() * 4 / copied / 1e9:.1f} GB/s)")


def write_jpegs(folder: Path, count: int) -> list:
    from PIL import Image

    from simret.data.samples import DISTRACTORS, LANDMARKS, load_photo

    names = list(LANDMARKS) + list(DISTRACTORS)
    ids = []
    for number in range(count):
        photo = load_photo(names[number % len(names)]).convert("RGB")
        size = SMALL["large"][::-1] if number % 2 else SMALL["large"]
        photo.resize(size, Image.BICUBIC).save(folder / f"{number:04d}.jpg", quality=92)
        ids.append(f"{number:04d}.jpg")
    return ids


def gpu_utilisation() -> str:
    import torch

    try:
        return f"{torch.cuda.utilization()}%"
    except Exception as err:  # noqa: BLE001 - needs pynvml
        return f"n/a ({type(err).__name__})"


def check_extract(encoder, device, folder: Path, ids: list) -> None:

    from simret.models.runtime import prepare_for_inference
    from simret.retrieval.extraction import extract

    runtime = prepare_for_inference(encoder, "auto", device)
    extract(runtime, folder, ids[:4], scales=(1, 0.707, 0.5), progress=False)  # warm-up
    sync()
    start = time.perf_counter()
    result = extract(runtime, folder, ids, scales=(1, 0.707, 0.5), progress=False)
    seconds = time.perf_counter() - start
    utilisation = gpu_utilisation() if device.type == "cuda" else "n/a (CPU)"
    exact = extract(encoder, folder, ids[:8], scales=(1, 0.707, 0.5), precision="fp32", progress=False)
    cosine = float((result.descriptors[:8] * exact.descriptors).sum(1).min())
    report("extract", len(result.ids) == len(ids) and cosine >= 0.999,
           f"{len(ids) / seconds:.1f} img/s ({len(ids)} JPEGs {SMALL['large']}, 3 scales, {runtime.describe()}, "
           f"workers default); min cos to fp32 {cosine:.6f}; GPU utilisation at the end {utilisation}")


def check_decode(device, folder: Path, ids: list) -> None:
    import numpy as np
    import torch

    if device.type != "cuda":
        skip("decode_jpeg", "needs CUDA")
        return
    try:
        from torchvision.io import decode_jpeg
    except ImportError as err:
        skip("decode_jpeg", f"torchvision missing ({err})")
        return
    from PIL import Image

    data = [torch.frombuffer(bytearray((folder / i).read_bytes()), dtype=torch.uint8) for i in ids]
    try:
        decoded = decode_jpeg(data, device=device)
    except Exception as err:  # noqa: BLE001 - a torchvision built without nvjpeg
        report("decode_jpeg", False, f"decode_jpeg(device='cuda') failed: {err}")
        return
    reference = np.asarray(Image.open(io.BytesIO(bytes(data[0].numpy()))).convert("RGB")).transpose(2, 0, 1)
    difference = float(np.abs(decoded[0].cpu().numpy().astype(np.int16) - reference).mean())
    gpu_rate = rate(lambda: decode_jpeg(data, device=device), len(data))
    start = time.perf_counter()
    for item in data:
        Image.open(io.BytesIO(bytes(item.numpy()))).convert("RGB").load()
    pil_rate = len(data) / (time.perf_counter() - start)
    report("decode_jpeg", decoded[0].is_cuda and difference <= 3.0,
           f"{gpu_rate:.0f} img/s on the GPU vs {pil_rate:.0f} img/s PIL (one core); mean |difference| "
           f"{difference:.2f} levels")


def check_faiss(device) -> None:
    if device.type != "cuda":
        skip("faiss-gpu", "needs CUDA")
        return
    try:
        import faiss
    except ImportError:
        skip("faiss-gpu", "faiss is not installed")
        return
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus:
        skip("faiss-gpu", f"faiss {getattr(faiss, '__version__', '?')} has no GPU support (faiss-cpu)")
        return
    import numpy as np

    from simret.retrieval.index import Index

    rng = np.random.default_rng(0)
    data = rng.standard_normal((20000, 256)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:100] + 0.01 * rng.standard_normal((100, 256)).astype(np.float32)
    index = Index.create(256, "flat")
    index.add(data)
    cpu_scores, cpu_rows = index.search(queries, 10)
    index.to_gpu(device.index or 0)
    start = time.perf_counter()
    gpu_scores, gpu_rows = index.search(queries, 10)
    seconds = time.perf_counter() - start
    same = float((cpu_rows == gpu_rows).mean())
    report("faiss-gpu", same >= 0.99, f"{gpus} GPU(s); flat search of 100 queries over 20k in {1000 * seconds:.1f} ms; "
                                      f"{100 * same:.1f}% of neighbours as on the CPU")


def check_compile(encoder, device) -> None:
    import torch

    from simret.models.runtime import prepare_for_inference

    runtime = prepare_for_inference(encoder, "auto", device, compile=False)
    torch.manual_seed(1)
    sizes = [(480, 640), (512, 384), (600, 800), (1024, 768)]
    batches = [torch.randn(2, 3, h, w) for h, w in sizes]
    eager = descriptors(runtime, batches)
    seconds = runtime.compile(torch.randn(1, 3, 512, 384))
    if not runtime.compiled:
        report("compile", False, "torch.compile failed (see the warning above)")
        return
    compiled = descriptors(runtime, batches)
    cosine = float((compiled * eager).sum(-1).min())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    speed = rate(lambda: descriptors(runtime, batches), 8)
    report("compile", cosine >= 0.999 and graphs <= 3,
           f"compiled in {seconds:.0f} s; {graphs} graph(s) for {len(sizes)} sizes; {speed:.1f} img/s; "
           f"min cos to eager {cosine:.6f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also check torch.compile on the GPU")
    parser.add_argument("--model", default="resnet50", help="timm CNN to check with (random weights)")
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a stand-in run of the script")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU stand-in)")
    args = parser.parse_args()
    if args.quick:
        SMALL.update(batch=2, side=64, large=(96, 128), jpegs=6)
    from simret.utils.allocator import keep_freed_memory

    keep_freed_memory()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL  cuda           torch sees no CUDA device: nothing to check (--device cpu runs a stand-in)")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU stand-in"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    from simret.models import create_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = create_encoder(args.model, gamma=2.0).to(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="simret-gpu-check-") as tmp:
        folder = Path(tmp)
        ids = write_jpegs(folder, SMALL["jpegs"])
        steps = [("precisions", lambda: check_precisions(encoder, device)), ("pinned", lambda: check_pinned(device)),
                 ("extract", lambda: check_extract(encoder, device, folder, ids)),
                 ("decode_jpeg", lambda: check_decode(device, folder, ids)), ("faiss-gpu", lambda: check_faiss(device))]
        if args.compile:
            steps.append(("compile", lambda: check_compile(encoder, device)))
        for name, step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
                report(name, False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    print(f"{sum(RESULTS)} passed, {len(RESULTS) - sum(RESULTS)} failed in {time.perf_counter() - started:.0f} s")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
