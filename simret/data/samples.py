"""Embedded demo and test data, built from real photographs that ship inside installed packages.

Nothing is downloaded: the photographs come from scikit-image's and scikit-learn's wheels
(``skimage/data/*.png|jpg``, ``sklearn/datasets/images/*.jpg``) and the labelled set from scikit-learn's
``load_digits``. Everything is deterministic for a given seed.

* ``write_revisited_sample(root)``: a small benchmark in exactly the Revisited Oxford/Paris layout
  (``root/<name>/gnd_<name>.pkl`` + ``jpg/``; plus ``root/revisitop1m/`` distractors). Every "landmark"
  is one photograph: queries are the photograph with a box around its subject; the database holds
  *easy* views (mild crops, scale and colour changes), *hard* views (small zoomed crops of the subject,
  rotation, strong colour change, blur, a real second viewpoint for the stereo motorcycle pair), *junk*
  views (slivers where the subject is barely visible) and distractors from other photographs.
* ``write_fewshot_sample(root)``: scikit-learn's handwritten digits as a few-shot split, folder-per-class
  (``train/`` base classes, ``test/`` novel classes) and/or miniImageNet CSV layout.
"""
from __future__ import annotations

import csv
import io
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# photographs and where they ship: (package, relative path)
PHOTOS: Dict[str, Tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "page": ("skimage", "data/page.png"),
}
# subject boxes as fractions (x1, y1, x2, y2) of each landmark photograph
LANDMARKS: Dict[str, Tuple[float, float, float, float]] = {
    "astronaut": (0.25, 0.05, 0.80, 0.80),
    "chelsea": (0.20, 0.05, 0.75, 0.95),
    "coffee": (0.15, 0.10, 0.80, 0.85),
    "rocket": (0.35, 0.10, 0.70, 0.95),
    "motorcycle": (0.10, 0.15, 0.90, 0.95),
    "china": (0.10, 0.20, 0.90, 0.90),
    "flower": (0.15, 0.10, 0.85, 0.90),
}
DISTRACTORS = ("hubble", "ihc", "retina", "camera", "coins", "moon", "brick", "grass", "gravel", "page")


def load_photo(name: str) -> Image.Image:
    """One of the packaged photographs, as an RGB image."""
    if name not in PHOTOS:
        raise KeyError(f"unknown sample photo {name!r}; known: {', '.join(PHOTOS)}")
    package, relative = PHOTOS[name]
    try:
        data = resources.files(package).joinpath(relative).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise FileNotFoundError(f"sample photo {name!r} needs the {package} package installed ({err})") from None
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------------------- transforms


def _resize(image: Image.Image, long_side: int) -> Image.Image:
    ratio = long_side / max(image.size)
    return image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.LANCZOS)


def _crop_fraction(image: Image.Image, box: Sequence[float]) -> Image.Image:
    w, h = image.size
    return image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


def _random_box(rng: np.random.RandomState, area: Tuple[float, float], inside: Sequence[float] = (0, 0, 1, 1),
                aspect: Tuple[float, float] = (0.75, 1.33)) -> Tuple[float, float, float, float]:
    """A random box (fractions) of a given relative area whose centre lies inside ``inside``."""
    frac = rng.uniform(*area)
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    bw, bh = min(1.0, np.sqrt(frac * ratio)), min(1.0, np.sqrt(frac / ratio))
    cx = rng.uniform(inside[0], inside[2])
    cy = rng.uniform(inside[1], inside[3])
    x1 = float(np.clip(cx - bw / 2, 0, 1 - bw))
    y1 = float(np.clip(cy - bh / 2, 0, 1 - bh))
    return x1, y1, x1 + bw, y1 + bh


def _colour(image: Image.Image, rng: np.random.RandomState, strength: float) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(1 + rng.uniform(-strength, strength)))
    return image


def easy_view(photo: Image.Image, rng: np.random.RandomState, size: int) -> Image.Image:
    """Most of the photograph, mildly cropped, rescaled and re-coloured."""
    view = _crop_fraction(photo, _random_box(rng, (0.70, 0.95), (0.4, 0.4, 0.6, 0.6)))
    view = _colour(view, rng, 0.15)
    return _resize(view, int(size * rng.uniform(0.8, 1.0)))


def hard_view(photo: Image.Image, rng: np.random.RandomState, size: int, subject: Sequence[float]) -> Image.Image:
    """A zoomed-in part of the subject, rotated, strongly re-coloured, sometimes blurred."""
    cx1, cy1, cx2, cy2 = subject
    inner = (cx1 + 0.25 * (cx2 - cx1), cy1 + 0.25 * (cy2 - cy1), cx2 - 0.25 * (cx2 - cx1), cy2 - 0.25 * (cy2 - cy1))
    view = _crop_fraction(photo, _random_box(rng, (0.20, 0.40), inner))
    view = view.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    view = _colour(view, rng, 0.45)
    if rng.rand() < 0.5:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 1.6))))
    return _resize(view, int(size * rng.uniform(0.7, 1.0)))


def junk_view(photo: Image.Image, rng: np.random.RandomState, size: int) -> Image.Image:
    """A sliver near the border where the subject is barely visible."""
    view = _crop_fraction(photo, _random_box(rng, (0.03, 0.06), (0.0, 0.0, 1.0, 1.0), aspect=(0.3, 3.0)))
    view = view.filter(ImageFilter.GaussianBlur(radius=1.5))
    return _resize(view, max(32, size // 3))


def distractor_view(photo: Image.Image, rng: np.random.RandomState, size: int) -> Image.Image:
    view = _crop_fraction(photo, _random_box(rng, (0.3, 0.9), (0.3, 0.3, 0.7, 0.7)))
    return _resize(_colour(view, rng, 0.2), int(size * rng.uniform(0.75, 1.0)))


# ---------------------------------------------------------------------------------- revisited sample


@dataclass
class RevisitedSample:
    """What ``write_revisited_sample`` wrote."""

    root: Path
    name: str
    dataset_dir: Path
    n_database: int
    n_queries: int
    distractors_dir: Optional[Path]
    n_distractors: int


def write_revisited_sample(
    root: str | Path,
    name: str = "rsample",
    *,
    image_size: int = 320,
    easy_per_landmark: int = 3,
    hard_per_landmark: int = 2,
    junk_per_landmark: int = 1,
    distractor_views: int = 2,
    extra_distractors: int = 20,
    landmarks: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> RevisitedSample:
    """Write a small Revisited-format benchmark of real photographs under ``root``.

    Layout (as ``roxford5k``/``rparis6k`` and ``revisitop1m``)::

        root/<name>/gnd_<name>.pkl   {"imlist": [...], "qimlist": [...],
                                      "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...],
                                               "junk": [...]}, ...]}   (indices into imlist)
        root/<name>/jpg/<id>.jpg     database and query images
        root/revisitop1m/revisitop1m.txt + jpg/   extra distractors (``extra_distractors`` > 0)

    Each landmark has two queries: the photograph, and its mirror image, each with a box around the
    subject. Ground truth comes from how each database image was made, so it is exact.
    """
    rng = np.random.RandomState(seed)
    root = Path(root)
    dataset_dir = root / name
    image_dir = dataset_dir / "jpg"
    image_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(landmarks) if landmarks is not None else list(LANDMARKS)
    unknown = [lm for lm in chosen if lm not in LANDMARKS]
    if unknown:
        raise KeyError(f"unknown landmarks {unknown}; known: {', '.join(LANDMARKS)}")

    database: List[Tuple[str, Image.Image]] = []
    labels: Dict[str, Dict[str, List[int]]] = {lm: {"easy": [], "hard": [], "junk": []} for lm in chosen}

    def add(image_id: str, image: Image.Image, landmark: Optional[str] = None, kind: Optional[str] = None) -> None:
        if landmark is not None:
            labels[landmark][kind].append(len(database))
        database.append((image_id, image))

    photos = {lm: _resize(load_photo(lm), image_size) for lm in chosen}
    for landmark in chosen:
        photo, subject = photos[landmark], LANDMARKS[landmark]
        for k in range(easy_per_landmark):
            add(f"{landmark}_easy_{k}", easy_view(photo, rng, image_size), landmark, "easy")
        for k in range(hard_per_landmark):
            if landmark == "motorcycle" and k == 0:  # a real second viewpoint from the stereo pair
                other = _resize(load_photo("motorcycle_right"), image_size)
                add(f"{landmark}_hard_{k}", _colour(other, rng, 0.3), landmark, "hard")
                continue
            add(f"{landmark}_hard_{k}", hard_view(photo, rng, image_size, subject), landmark, "hard")
        for k in range(junk_per_landmark):
            add(f"{landmark}_junk_{k}", junk_view(photo, rng, image_size), landmark, "junk")
    for distractor in DISTRACTORS:
        photo = _resize(load_photo(distractor), image_size)
        for k in range(distractor_views):
            add(f"{distractor}_{k}", distractor_view(photo, rng, image_size))

    order = rng.permutation(len(database))  # interleave, as real collections are
    position = {int(old): new for new, old in enumerate(order)}
    database = [database[int(i)] for i in order]
    for image_id, image in database:
        image.save(image_dir / f"{image_id}.jpg", quality=92)

    queries: List[str] = []
    gnd: List[dict] = []
    for landmark in chosen:
        photo, subject = photos[landmark], LANDMARKS[landmark]
        for variant, image in (("q0", photo), ("q1", photo.transpose(Image.FLIP_LEFT_RIGHT))):
            box = subject if variant == "q0" else (1 - subject[2], subject[1], 1 - subject[0], subject[3])
            w, h = image.size
            bbx = np.array([box[0] * w, box[1] * h, box[2] * w, box[3] * h], dtype=np.float64)
            query_id = f"query_{landmark}_{variant}"
            image.save(image_dir / f"{query_id}.jpg", quality=95)
            queries.append(query_id)
            gnd.append({
                "bbx": bbx,
                "easy": np.array(sorted(position[i] for i in labels[landmark]["easy"]), dtype=np.int64),
                "hard": np.array(sorted(position[i] for i in labels[landmark]["hard"]), dtype=np.int64),
                "junk": np.array(sorted(position[i] for i in labels[landmark]["junk"]), dtype=np.int64),
            })
    with open(dataset_dir / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump({"imlist": [image_id for image_id, _ in database], "qimlist": queries, "gnd": gnd}, handle,
                    protocol=2)

    distractors_dir = None
    if extra_distractors > 0:
        distractors_dir = root / "revisitop1m"
        (distractors_dir / "jpg").mkdir(parents=True, exist_ok=True)
        names = []
        for k in range(extra_distractors):
            source = DISTRACTORS[k % len(DISTRACTORS)]
            photo = _resize(load_photo(source), image_size)
            relative = f"{k % 4}/{source}_{k}.jpg"  # sub-folders, as the real 1M set has
            (distractors_dir / "jpg" / relative).parent.mkdir(parents=True, exist_ok=True)
            distractor_view(photo, rng, image_size).save(distractors_dir / "jpg" / relative, quality=90)
            names.append(relative)
        (distractors_dir / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    return RevisitedSample(root, name, dataset_dir, len(database), len(queries), distractors_dir, extra_distractors)


# ---------------------------------------------------------------------------------- few-shot sample


@dataclass
class FewShotSample:
    """What ``write_fewshot_sample`` wrote: split → class names, and the layout's root."""

    root: Path
    layout: str
    classes: Dict[str, List[str]]
    images_per_class: int


DIGIT_SPLITS = {"train": [0, 1, 2, 3, 4], "test": [5, 6, 7, 8, 9]}


def _digit_images(image_size: int, per_class: Optional[int]) -> Dict[int, List[Image.Image]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_class: Dict[int, List[Image.Image]] = {c: [] for c in range(10)}
    for pixels, label in zip(digits.images, digits.target):
        if per_class is not None and len(by_class[int(label)]) >= per_class:
            continue
        gray = Image.fromarray(np.uint8(255 - pixels * (255 / 16)))  # dark ink on white paper
        by_class[int(label)].append(gray.resize((image_size, image_size), Image.BICUBIC).convert("RGB"))
    return by_class


def write_fewshot_sample(root: str | Path, *, layout: str = "folders", image_size: int = 32,
                         per_class: Optional[int] = 60,
                         splits: Optional[Dict[str, List[int]]] = None) -> FewShotSample:
    """scikit-learn's handwritten digits (real scans, 8x8 upsampled) as a few-shot split.

    ``layout="folders"``: ``root/<split>/digit_<c>/<n>.png``. ``layout="miniimagenet"``: all images in
    ``root/images/`` and ``root/<split>.csv`` with ``filename,label`` rows, as Ravi & Larochelle's split.
    Default splits: base classes 0–4 in ``train``, novel classes 5–9 in ``test``.
    """
    if layout not in ("folders", "miniimagenet"):
        raise ValueError(f"layout must be 'folders' or 'miniimagenet', not {layout!r}")
    root = Path(root)
    splits = splits or DIGIT_SPLITS
    images = _digit_images(image_size, per_class)
    classes: Dict[str, List[str]] = {}
    for split, digits in splits.items():
        rows = []
        for digit in digits:
            label = f"digit_{digit}"
            for n, image in enumerate(images[digit]):
                if layout == "folders":
                    target = root / split / label / f"{n:04d}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                else:
                    target = root / "images" / f"{label}_{n:04d}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    rows.append((target.name, label))
                image.save(target)
        if layout == "miniimagenet":
            with open(root / f"{split}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["filename", "label"])
                writer.writerows(rows)
        classes[split] = [f"digit_{d}" for d in digits]
    count = min(len(v) for v in images.values())
    return FewShotSample(root, layout, classes, count)
