"""Generated stand-ins for Tiny ImageNet, Cars-196 and STL-10, written in their exact on-disk layouts.

Real JPEG files, real `.mat` files (scipy.io.savemat) and real STL-10 `.bin` files, so the dataset
classes read them exactly as they read the real data. Each class is a combination of a shape, a
colour and a texture (plus a weak preferred position); every image adds random scale, rotation,
position jitter, brightness, a cluttered background and pixel noise, so classes are learnable but
not trivial. Everything is deterministic in `seed` (one RNG stream per image).

    python -m helpers.data.synthetic --out data/generated            # all three, smoke sizes
    python -m helpers.data.synthetic --out data/generated --which tiny --tiny-classes 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.data.errors import DatasetError

GENERATOR_VERSION = 1
from helpers.data.images import STAMP  # noqa: E402,F401 (the marker file of a generated folder, read by the readers)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "star")
COLOURS = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 40),
    "magenta": (200, 45, 200),
    "cyan": (35, 200, 210),
    "orange": (245, 135, 25),
    "white": (238, 238, 238),
}
TEXTURES = ("plain", "stripes", "checker", "dots", "waves", "rings")


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    colour: str
    texture: str
    angle: float  # texture orientation (radians)
    frequency: float  # texture frequency (cycles per object radius)
    position: tuple[float, float]  # preferred object centre in [-1, 1]^2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def class_styles(num_classes: int, seed: int) -> list[ClassStyle]:
    """`num_classes` distinct (shape, colour, texture) combinations in a seeded order."""
    combos = list(product(SHAPES, COLOURS, TEXTURES))
    if num_classes > len(combos):
        raise ValueError(f"at most {len(combos)} generated classes (asked for {num_classes})")
    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(len(combos))[:num_classes]
    styles = []
    for k, i in enumerate(order):
        shape, colour, texture = combos[i]
        styles.append(
            ClassStyle(
                shape,
                colour,
                texture,
                angle=float(rng.uniform(0, np.pi)),
                frequency=float(rng.uniform(2.0, 4.0)),
                position=(0.2 * (k % 3 - 1), 0.2 * ((k // 3) % 3 - 1)),
            )
        )
    return styles


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in object coordinates (u, v)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r < 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.8
    if shape == "triangle":
        return (v < 0.75) & (v > 1.6 * abs(u) - 0.95)
    if shape == "diamond":
        return abs(u) + abs(v) < 1.05
    if shape == "cross":
        return ((abs(u) < 0.32) & (abs(v) < 1.0)) | ((abs(v) < 0.32) & (abs(u) < 1.0))
    if shape == "ring":
        return (r > 0.55) & (r < 1.0)
    if shape == "bar":
        return (abs(v) < 0.38) & (abs(u) < 1.05)
    if shape == "star":
        return r < 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u))
    raise ValueError(shape)


def texture_value(style: ClassStyle, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture intensity in [0, 1] over object coordinates."""
    f, a = style.frequency, style.angle
    along = u * np.cos(a) + v * np.sin(a)
    across = -u * np.sin(a) + v * np.cos(a)
    if style.texture == "plain":
        return np.ones_like(u)
    if style.texture == "stripes":
        return (np.sin(np.pi * f * along) > 0).astype(np.float32)
    if style.texture == "checker":
        return ((np.floor(f * along) + np.floor(f * across)) % 2).astype(np.float32)
    if style.texture == "dots":
        return ((((f * along) % 1 - 0.5) ** 2 + ((f * across) % 1 - 0.5) ** 2) > 0.09).astype(np.float32)
    if style.texture == "waves":
        return 0.5 + 0.5 * np.sin(np.pi * f * along + 2.0 * np.sin(np.pi * f * across))
    if style.texture == "rings":
        return (np.sin(np.pi * f * np.hypot(u, v) * 1.5) > 0).astype(np.float32)
    raise ValueError(style.texture)


def render(
    style: ClassStyle, rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One image (height, width, 3) uint8 of a class and its object box (x0, y0, x1, y1), 0-based inclusive."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(height, width)
    # normalised coordinates: the shorter side spans [-1, 1]
    yy, xx = (2 * ys - height + 1) / side, (2 * xs - width + 1) / side
    # background: a random colour gradient with a few soft blobs of clutter
    base = rng.uniform(20, 200, size=3)
    tilt = rng.normal(0, 35, size=(2, 3))
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    for _ in range(rng.integers(1, 4)):
        cx, cy, rad = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.15, 0.45)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad**2))
        img = img + blob[..., None] * rng.uniform(-70, 70, size=3)
    # the object
    cx = np.clip(style.position[0] + rng.normal(0, 0.15), -0.45, 0.45)
    cy = np.clip(style.position[1] + rng.normal(0, 0.15), -0.45, 0.45)
    scale = rng.uniform(0.38, 0.6)
    theta = rng.uniform(-0.5, 0.5)
    du, dv = (xx - cx) / scale, (yy - cy) / scale
    u = du * np.cos(theta) + dv * np.sin(theta)
    v = -du * np.sin(theta) + dv * np.cos(theta)
    mask = shape_mask(style.shape, u, v)
    colour = np.clip(np.array(COLOURS[style.colour]) * rng.uniform(0.8, 1.15) + rng.normal(0, 12, size=3), 0, 255)
    obj = colour * (0.45 + 0.55 * texture_value(style, u, v))[..., None]
    img = np.where(mask[..., None], obj, img)
    img = img + rng.normal(0, rng.uniform(4, 14), size=img.shape)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])) if len(rows) else (0, 0, width - 1, height - 1)
    return np.clip(img, 0, 255).astype(np.uint8), box


def save_jpeg(path: Path, image: np.ndarray, grayscale: bool) -> None:
    pil = Image.fromarray(image)
    if grayscale:  # real Tiny ImageNet and Cars-196 hold some single-channel JPEGs
        pil = pil.convert("L")
    pil.save(path, format="JPEG", quality=90)


def image_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# --------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class TinyParams:
    num_classes: int = 20
    train_per_class: int = 60
    val_per_class: int = 10
    test_images: int = 40
    image_size: int = 64
    grayscale_fraction: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class CarsParams:
    layout: str = "devkit"  # or "metric_learning"
    images_per_class: int = 4
    min_width: int = 72
    max_width: int = 144
    grayscale_fraction: float = 0.03
    official_test_fraction: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class STL10Params:
    train_per_class: int = 40
    test_per_class: int = 20
    unlabeled: int = 0
    seed: int = 0


def write_tiny_imagenet(root: Path, p: TinyParams) -> None:
    styles = class_styles(p.num_classes, p.seed)
    wnids = [f"n{90000000 + k:08d}" for k in range(p.num_classes)]
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    distractors = [f"n{80000000 + k:08d}\tunused synset {k}\n" for k in range(5)]
    (root / "words.txt").write_text("".join(distractors) + "".join(f"{w}\t{s.name}\n" for w, s in zip(wnids, styles)))
    size = p.image_size
    for k, (wnid, style) in enumerate(zip(wnids, styles)):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        boxes = []
        for i in range(p.train_per_class):
            rng = image_rng(p.seed, 1, k, i)
            image, box = render(style, rng, size, size)
            name = f"{wnid}_{i}.JPEG"
            save_jpeg(folder / name, image, rng.random() < p.grayscale_fraction)
            boxes.append(f"{name}\t" + "\t".join(map(str, box)) + "\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    # val: classes interleaved in a seeded order, labels only in val_annotations.txt
    val_images = root / "val" / "images"
    val_images.mkdir(parents=True)
    val_labels = np.random.default_rng([p.seed, 2]).permutation(np.repeat(np.arange(p.num_classes), p.val_per_class))
    lines = []
    for i, k in enumerate(val_labels):
        rng = image_rng(p.seed, 3, i)
        image, box = render(styles[k], rng, size, size)
        save_jpeg(val_images / f"val_{i}.JPEG", image, rng.random() < p.grayscale_fraction)
        lines.append(f"val_{i}.JPEG\t{wnids[k]}\t" + "\t".join(map(str, box)) + "\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    test_images = root / "test" / "images"
    test_images.mkdir(parents=True)
    for i in range(p.test_images):
        rng = image_rng(p.seed, 4, i)
        image, _ = render(styles[rng.integers(p.num_classes)], rng, size, size)
        save_jpeg(test_images / f"test_{i}.JPEG", image, False)


def car_records(p: CarsParams) -> tuple[list[dict], list[str]]:
    """One record per generated car image (class 1..196, official split flag, image, box) and the class names."""
    styles = class_styles(196, p.seed + 1)
    records = []
    for cls in range(1, 197):
        for i in range(p.images_per_class):
            rng = image_rng(p.seed, 5, cls, i)
            width = int(rng.integers(p.min_width, p.max_width + 1))
            height = int(width / rng.uniform(1.3, 2.0))
            image, (x0, y0, x1, y1) = render(styles[cls - 1], rng, height, width)
            records.append(
                dict(
                    cls=cls,
                    test=int(rng.random() < p.official_test_fraction),
                    image=image,
                    gray=bool(rng.random() < p.grayscale_fraction),
                    box=(x0 + 1, y0 + 1, x1 + 1, y1 + 1),  # MATLAB boxes are 1-based inclusive
                )
            )
    return records, [f"Synthetic {s.name} 20{10 + k % 13:02d}" for k, s in enumerate(styles)]


def annotation_struct(rows: list[dict], fields: tuple[str, ...]) -> np.ndarray:
    """A MATLAB struct array (1, n) as scipy.io.savemat writes it."""
    dtype = [(f, object) for f in fields]
    struct = np.zeros((1, len(rows)), dtype=dtype)
    for i, row in enumerate(rows):
        for f in fields:
            value = row[f]
            struct[0, i][f] = np.array([value]) if isinstance(value, str) else np.array([[value]], dtype=np.uint16)
    return struct


def write_cars196(root: Path, p: CarsParams) -> None:
    import scipy.io

    records, names = car_records(p)
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [np.array([n]) for n in names]
    box_fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")

    def row(r: dict, **extra) -> dict:
        return dict(zip(box_fields, r["box"]), **{"class": r["cls"]}, **extra)

    if p.layout == "metric_learning":
        (root / "car_ims").mkdir(parents=True)
        rows = []
        for i, r in enumerate(records, start=1):
            name = f"car_ims/{i:06d}.jpg"
            save_jpeg(root / name, r["image"], r["gray"])
            rows.append(row(r, relative_im_path=name, test=r["test"]))
        fields = ("relative_im_path",) + box_fields + ("class", "test")
        scipy.io.savemat(
            root / "cars_annos.mat", {"annotations": annotation_struct(rows, fields), "class_names": class_names}
        )
    elif p.layout == "devkit":
        (root / "devkit").mkdir(parents=True)
        scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})
        fields = box_fields + ("class", "fname")
        for split, folder, annos in (
            (0, "cars_train", root / "devkit" / "cars_train_annos.mat"),
            (1, "cars_test", root / "cars_test_annos_withlabels.mat"),
        ):
            (root / folder).mkdir()
            rows = []
            for i, r in enumerate((r for r in records if r["test"] == split), start=1):
                save_jpeg(root / folder / f"{i:05d}.jpg", r["image"], r["gray"])
                rows.append(row(r, fname=f"{i:05d}.jpg"))
            scipy.io.savemat(annos, {"annotations": annotation_struct(rows, fields)})
    else:
        raise ValueError(f"layout={p.layout!r} is not valid; choose one of devkit, metric_learning")


def write_stl10(root: Path, p: STL10Params) -> None:
    from helpers.data.stl10 import encode_planes

    styles = class_styles(10, p.seed + 2)
    (root / "class_names.txt").write_text("".join(s.name + "\n" for s in styles))

    def write_split(split: str, labels: np.ndarray, stream: int) -> None:
        images = np.stack([render(styles[k], image_rng(p.seed, stream, i), 96, 96)[0] for i, k in enumerate(labels)])
        encode_planes(images).tofile(root / f"{split}_X.bin")
        if split != "unlabeled":
            (labels.astype(np.uint8) + 1).tofile(root / f"{split}_y.bin")

    for split, per_class, stream in (("train", p.train_per_class, 6), ("test", p.test_per_class, 7)):
        labels = np.random.default_rng([p.seed, stream]).permutation(np.repeat(np.arange(10), per_class))
        write_split(split, labels, stream)
        if split == "train":
            folds = np.random.default_rng([p.seed, 9]).permutation(len(labels)).reshape(10, -1)
            (root / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + "\n" for f in folds))
    if p.unlabeled:
        write_split("unlabeled", np.random.default_rng([p.seed, 8]).integers(0, 10, p.unlabeled), 8)


WRITERS = {
    "tiny": (write_tiny_imagenet, TinyParams),
    "cars": (write_cars196, CarsParams),
    "stl10": (write_stl10, STL10Params),
}
FOLDERS = {"tiny": "tiny-imagenet-200", "cars": "stanford_cars", "stl10": "stl10_binary"}


def folder_name(which: str, params) -> str:
    if which == "cars" and params.layout == "metric_learning":
        return "cars196"
    return FOLDERS[which]


def generate(which: str, out_dir: str | Path, params=None, force: bool = False) -> Path:
    """Write one generated dataset under `out_dir` (atomically) unless an identical one is there.

    `which` is "tiny", "cars" or "stl10"; `params` the matching *Params (defaults: smoke sizes).
    Returns the dataset root (e.g. out_dir/tiny-imagenet-200).
    """
    if which not in WRITERS:
        raise ValueError(f"which={which!r} is not valid; choose one of {', '.join(WRITERS)}")
    writer, params_type = WRITERS[which]
    params = params if params is not None else params_type()
    out_dir = Path(out_dir)
    root = out_dir / folder_name(which, params)
    stamp = {"generator_version": GENERATOR_VERSION, "dataset": which, "params": asdict(params)}
    if root.exists():
        existing = root / STAMP
        if not existing.is_file():
            raise DatasetError(
                f"{root} exists and is not generated data (no {STAMP}); refusing to overwrite it. Choose another --out."
            )
        if not force and json.loads(existing.read_text()) == stamp:
            return root
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=out_dir))
    try:
        writer(tmp, params)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
        # another process (two notebooks started at once) may have written the same data meanwhile:
        # it is kept, since removing it would pull the files from under that process's readers
        if not force and _stamp_of(root) == stamp:
            return root
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:  # (ENOTEMPTY: it appeared between the check and the rename)
            if _stamp_of(root) != stamp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stamp_of(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def generate_all(out_dir: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """The default generated data (smoke sizes) for every notebook: {"tiny", "cars", "stl10"} -> root."""
    return {
        "tiny": generate("tiny", out_dir, TinyParams(seed=seed), force),
        "cars": generate("cars", out_dir, CarsParams(seed=seed), force),
        "stl10": generate("stl10", out_dir, STL10Params(seed=seed), force),
    }


def summary(which: str, root: Path) -> str:
    """A few lines describing a dataset as the dataset classes read it."""
    from collections import Counter

    if which == "tiny":
        from helpers.data.tinyimagenet import TinyImageNet

        splits = {s: TinyImageNet(root, s) for s in ("train", "val", "test")}
        train = splits["train"]
        lines = [
            f"Tiny ImageNet layout at {root}: {len(train.classes)} classes ({', '.join(train.class_names[:3])}, ...)"
        ]
        lines += [f"  {s}: {len(ds)} images" for s, ds in splits.items()]
    elif which == "cars":
        from helpers.data.cars196 import Cars196

        splits = {s: Cars196(root, s) for s in ("train", "test")}
        lines = [f"Cars-196 layout ({splits['train'].layout}) at {root}"]
        lines += [
            f"  {s}: {len(ds)} images, {len(ds.classes)} classes (labels {min(ds.classes)}..{max(ds.classes)})"
            for s, ds in splits.items()
        ]
    else:
        from helpers.data.stl10 import STL10

        splits = {s: STL10(root, s) for s in ("train", "test")}
        lines = [f"STL-10 layout at {root}: classes {', '.join(splits['train'].class_names)}"]
        lines += [
            f"  {s}: {len(ds)} images, per class {sorted(Counter(ds.targets.tolist()).values())[0]}+"
            for s, ds in splits.items()
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/generated", help="folder to write the datasets into")
    parser.add_argument("--which", default="tiny,cars,stl10", help="comma-separated subset of tiny,cars,stl10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-classes", type=int, default=TinyParams.num_classes)
    parser.add_argument("--tiny-train-per-class", type=int, default=TinyParams.train_per_class)
    parser.add_argument("--tiny-val-per-class", type=int, default=TinyParams.val_per_class)
    parser.add_argument("--cars-layout", default=CarsParams.layout, choices=("devkit", "metric_learning"))
    parser.add_argument("--cars-per-class", type=int, default=CarsParams.images_per_class)
    parser.add_argument("--stl10-train-per-class", type=int, default=STL10Params.train_per_class)
    parser.add_argument("--stl10-test-per-class", type=int, default=STL10Params.test_per_class)
    parser.add_argument("--stl10-unlabeled", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if identical data is present")
    args = parser.parse_args(argv)
    params = {
        "tiny": TinyParams(args.tiny_classes, args.tiny_train_per_class, args.tiny_val_per_class, seed=args.seed),
        "cars": CarsParams(layout=args.cars_layout, images_per_class=args.cars_per_class, seed=args.seed),
        "stl10": STL10Params(
            args.stl10_train_per_class, args.stl10_test_per_class, args.stl10_unlabeled, seed=args.seed
        ),
    }
    try:
        for which in [w.strip() for w in args.which.split(",") if w.strip()]:
            if which not in params:
                parser.error(f"--which: {which!r} is not one of tiny, cars, stl10")
            root = generate(which, args.out, params[which], force=args.force)
            print(summary(which, root))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
