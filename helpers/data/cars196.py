"""Stanford Cars-196 for retrieval, read from either published layout.

Retrieval protocol: classes 1..98 train, 99..196 test, whatever the official train/test flag
says; the label is `class - 1`, so test labels are 98..195. Layouts:

* "metric_learning": `cars_annos.mat` (struct `annotations`: relative_im_path, bbox_x1, bbox_y1,
  bbox_x2, bbox_y2, class, test; plus `class_names`) and `car_ims/*.jpg`.
* "devkit": `cars_train/`, `cars_test/`, `devkit/cars_train_annos.mat`, `devkit/cars_meta.mat`,
  `cars_test_annos_withlabels.mat` (fields bbox_x1..bbox_y2, class, fname), in `root` or
  `root/devkit`. Whichever of the two official splits is present is used (their union).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from helpers.data.errors import DatasetError
from helpers.data.images import apply_transforms, load_rgb
from helpers.data.tinyimagenet import check_split

SPLITS = ("train", "test")
LAYOUTS = ("auto", "metric_learning", "devkit")
NUM_CLASSES = 196
TRAIN_CLASSES = range(1, 99)  # 1..98 (1-based class ids, as in the .mat files)

GET_IT = (
    "Cars-196 has no stable official download any more: get the devkit release (cars_train/, "
    "cars_test/, devkit/, cars_test_annos_withlabels.mat; e.g. from a Kaggle mirror of "
    "'Stanford Cars') or the metric-learning release (car_ims.tgz + cars_annos.mat), then run "
    "`python -m helpers.data.download cars196 --source <archive or folder> --data-dir data`."
)
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@dataclass(frozen=True)
class CarRecord:
    path: str
    cls: int  # 1..196
    box: tuple[int, int, int, int]  # 1-based inclusive x1, y1, x2, y2 as in the .mat files


def detect_layout(root: Path) -> str:
    if (root / "cars_annos.mat").is_file():
        return "metric_learning"
    if (root / "devkit").is_dir() or any((root / d).is_dir() for d in ("cars_train", "cars_test")):
        return "devkit"
    raise DatasetError(
        f"No Cars-196 layout found in {root}: expected either cars_annos.mat + car_ims/ "
        f"(metric-learning release) or devkit/ + cars_train/ and/or cars_test/ (devkit release). {GET_IT}"
    )


def load_mat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DatasetError(f"Missing annotation file {path}. {GET_IT}") from None
    except Exception as exc:  # scipy raises several types for a damaged file
        raise DatasetError(
            f"Cannot read {path} as a MATLAB .mat file ({exc}). Replace it with an intact copy."
        ) from None


def struct_fields(mat: dict, path: Path, name: str, fields: tuple[str, ...]) -> dict[str, list]:
    """Flatten a MATLAB struct array `name` into {field: [value per element]}, checking the fields."""
    if name not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise DatasetError(
            f"{path} has no variable '{name}' (found: {found}). It is not the expected Cars-196 annotation file."
        )
    records = mat[name].ravel()
    present = records.dtype.names or ()
    missing = [f for f in fields if f not in present]
    if missing:
        raise DatasetError(
            f"{path}: struct '{name}' lacks the field(s) {', '.join(missing)} (has: {', '.join(present)}). "
            "It is not the expected Cars-196 annotation file; use the official one."
        )
    return {f: [np.asarray(v).ravel()[0] for v in records[f]] for f in fields}


def class_names_from(mat: dict, path: Path) -> list[str]:
    if "class_names" not in mat:
        raise DatasetError(f"{path} has no variable 'class_names'. Use the official file.")
    return [str(np.asarray(v).ravel()[0]) for v in mat["class_names"].ravel()]


def read_metric_learning(root: Path) -> tuple[list[CarRecord], list[str]]:
    path = root / "cars_annos.mat"
    mat = load_mat(path)
    fields = struct_fields(mat, path, "annotations", ("relative_im_path", "class") + BOX_FIELDS)
    records = [
        CarRecord(str(root / str(rel)), int(c), tuple(int(fields[b][i]) for b in BOX_FIELDS))
        for i, (rel, c) in enumerate(zip(fields["relative_im_path"], fields["class"]))
    ]
    return records, class_names_from(mat, path)


def read_devkit(root: Path) -> tuple[list[CarRecord], list[str]]:
    def find(name: str) -> Path | None:
        return next((p for p in (root / "devkit" / name, root / name) if p.is_file()), None)

    meta = find("cars_meta.mat")
    if meta is None:
        raise DatasetError(f"Cars-196 devkit layout at {root} lacks devkit/cars_meta.mat (the class names). {GET_IT}")
    names = class_names_from(load_mat(meta), meta)
    records: list[CarRecord] = []
    splits = (("cars_train", "cars_train_annos.mat"), ("cars_test", "cars_test_annos_withlabels.mat"))
    for folder, annos_name in splits:
        if not (root / folder).is_dir():
            continue
        annos = find(annos_name)
        if annos is None:
            raise DatasetError(
                f"Cars-196 at {root} has {folder}/ but no {annos_name} with its labels "
                f"(looked in {root / 'devkit'} and {root}). {GET_IT}"
            )
        fields = struct_fields(load_mat(annos), annos, "annotations", ("fname", "class") + BOX_FIELDS)
        images = root / folder
        if (images / folder).is_dir():  # some mirrors nest cars_train/cars_train/
            images = images / folder
        records += [
            CarRecord(str(images / str(f)), int(c), tuple(int(fields[b][i]) for b in BOX_FIELDS))
            for i, (f, c) in enumerate(zip(fields["fname"], fields["class"]))
        ]
    if not records:
        raise DatasetError(f"Cars-196 devkit layout at {root} has neither cars_train/ nor cars_test/. {GET_IT}")
    return records, names


def partial_note(root: Path, layout: str, split: str) -> str:
    """ "" for a complete devkit release; else what is missing (e.g. the mini archive, or a download
    without cars_test/, holds half the images: both retrieval halves then come from cars_train/)."""
    if layout != "devkit":
        return ""
    missing = [folder for folder in ("cars_train", "cars_test") if not (root / folder).is_dir()]
    if not missing:
        return ""
    present = "cars_test" if missing == ["cars_train"] else "cars_train"
    return f"partial Cars-196: {' and '.join(m + '/' for m in missing)} missing at {root}; the {split} classes come from {present}/ alone"


class Cars196(Dataset):
    """Cars-196 retrieval split: "train" = classes 1..98, "test" = classes 99..196; label = class - 1.

    Attributes: `samples` (list of (path, label)), `targets`, `boxes` (1-based x1, y1, x2, y2),
    `class_names` (all 196, indexed by label), `classes` (the labels of this split), `layout`.
    Annotated images missing on disk are skipped with a warning (every image present is used).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        layout: str = "auto",
        bbox_crop: bool = False,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        check_split(split, SPLITS)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not valid; choose one of {', '.join(LAYOUTS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"Cars-196 folder not found: {self.root}. {GET_IT}")
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        self.split, self.bbox_crop = split, bbox_crop
        self.transform, self.target_transform = transform, target_transform
        records, self.class_names = (read_metric_learning if self.layout == "metric_learning" else read_devkit)(
            self.root
        )
        if len(self.class_names) != NUM_CLASSES:
            raise DatasetError(
                f"Cars-196 at {self.root} names {len(self.class_names)} classes, expected {NUM_CLASSES}."
            )
        bad = [r.cls for r in records if not 1 <= r.cls <= NUM_CLASSES]
        if bad:
            raise DatasetError(f"Cars-196 annotations at {self.root} hold class ids outside 1..196 (e.g. {bad[0]}).")
        wanted = (lambda c: c in TRAIN_CLASSES) if split == "train" else (lambda c: c not in TRAIN_CLASSES)
        records = [r for r in records if wanted(r.cls)]
        present = [r for r in records if Path(r.path).is_file()]
        if len(present) < len(records):
            warnings.warn(
                f"Cars-196 at {self.root}: {len(records) - len(present)} of {len(records)} annotated {split} images "
                f"are missing on disk (e.g. {next(r.path for r in records if not Path(r.path).is_file())}); using the "
                f"{len(present)} present.",
                stacklevel=2,
            )
        if not present:
            raise DatasetError(
                f"Cars-196 at {self.root} holds no {split} images (classes {'1..98' if split == 'train' else '99..196'}). {GET_IT}"
            )
        self.partial = partial_note(self.root, self.layout, split)
        self.samples = [(r.path, r.cls - 1) for r in present]
        self.boxes = [r.box for r in present]
        self.targets = [label for _, label in self.samples]
        self.classes = sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.bbox_crop:
            x1, y1, x2, y2 = self.boxes[index]
            w, h = image.size
            left, top = max(0, x1 - 1), max(0, y1 - 1)
            right, bottom = min(w, max(x2, left + 1)), min(h, max(y2, top + 1))
            image = image.crop((left, top, right, bottom))
        return apply_transforms(image, label, self.transform, self.target_transform)

    def __repr__(self) -> str:
        return (
            f"Cars196(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, "
            f"images={len(self)}, classes={len(self.classes)})"
        )
