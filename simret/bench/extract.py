"""Extraction throughput: ``simret.retrieval.extract`` on a folder of JPEGs vs the encoder's forward-only rate.

The baseline runs the same encoder on the same images already decoded, resized and batched in memory
(``encoder(batch)`` under inference_mode), so the ratio measures what loading, decoding, batching and
normalising cost when DataLoader workers overlap them with the model.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from simret.bench import Row, Section, interleaved_medians

TITLE = "Descriptor extraction: images/s of extract() vs the encoder's forward-only rate"
TARGET = 0.9


def write_jpegs(folder: Path, count: int, size: tuple) -> list:
    """``count`` JPEGs of ``size`` (width, height) cut from the packaged photographs."""
    from simret.data.samples import DISTRACTORS, LANDMARKS, load_photo

    names = list(LANDMARKS) + list(DISTRACTORS)
    photos = [load_photo(name) for name in names]
    ids = []
    for number in range(count):
        photo = photos[number % len(photos)]
        shift = (number // len(photos)) * 7
        width, height = photo.size
        box = (shift % max(1, width // 4), shift % max(1, height // 4), width - (shift % 9), height - (shift % 5))
        image = photo.crop(box).resize(size)
        name = f"{number:05d}.jpg"
        image.save(folder / name, quality=90)
        ids.append(name)
    return ids


def run(quick: bool = False) -> Section:
    import torch

    from simret.data.images import RetrievalTransform, load_image
    from simret.models import create_encoder
    from simret.retrieval.extraction import default_workers, extract

    section = Section("extract", TITLE, "python scripts/bench.py extract")
    arch, count, size, batch = ("test_resnet", 32, (96, 72), 8) if quick else ("resnet50", 96, (224, 168), 16)
    repeat = 2 if quick else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = create_encoder(arch, pool="simpool", gamma=2.0).eval()
    workers = default_workers(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="simret-bench-") as folder:
        root = Path(folder)
        ids = write_jpegs(root, count, size)
        config = encoder.data_config
        transform = RetrievalTransform(tuple(config["mean"]), tuple(config["std"]), max(size))
        tensors = torch.stack([transform(load_image(root / i)) for i in ids])
        batches = list(tensors.split(batch))

        def forward_only():
            with torch.inference_mode():
                for images in batches:
                    encoder(images)

        def full_extract(n_workers):
            def go():
                result = extract(encoder, root, ids, max_size=max(size), batch_size=batch, workers=n_workers,
                                 progress=False)
                assert len(result.ids) == count
            return go

        variants = {"extract": full_extract(workers), "forward": forward_only}
        if workers == 0:
            variants["one worker"] = full_extract(1)
        medians = interleaved_medians(variants, repeat=repeat, warmup=1)
    base = count / medians["forward"]
    label = f"{arch} + SimPool, {count} JPEGs {size[0]}x{size[1]}, batch {batch}"
    for name, what, target in (("extract", f"default workers ({workers})", True), ("one worker", "1 worker", False)):
        if name not in medians:
            continue
        rate = count / medians[name]
        ratio = rate / base
        section.rows.append(Row(f"{label}, {what}", rate, "img/s", baseline="forward pass only (pre-made tensors)",
                                baseline_value=base, ratio=ratio, target=f"≥ {TARGET} of forward-only" if target else None,
                                met=(ratio >= TARGET) if target and not quick else None))
    section.notes.append("extract() includes DataLoader start-up, JPEG decoding, resizing, same-size batching, "
                         "per-scale L2 normalisation and the copy back to numpy; the baseline only runs the "
                         "encoder on tensors already in memory.")
    section.notes.append(f"{repeat} interleaved runs after a warm-up; single scale; random weights. On a CPU the "
                         "model's threads already use every core, so default_workers() decodes in the main process "
                         "on ≤ 2 cores (a worker process only steals cycles there; the 1-worker row shows it); on "
                         "a GPU, workers overlap loading with the model.")
    return section
