"""Tiny ImageNet (`tiny-imagenet-200/`) read from its official layout.

The official "val" split (10,000 labelled images) is our TEST set; model selection uses a
held-out part of "train" (`helpers.data.splits.stratified_split`). Val labels come from
`val/val_annotations.txt` (ignoring that file is the classic 0.5 %-accuracy bug).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from helpers.data.errors import DatasetError
from helpers.data.images import apply_transforms, is_macos_metadata, load_rgb

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64  # every image is 64 x 64; a source file of another size is resized to it when decoded
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

GET_IT = (
    "Download it with `python -m helpers.data.download tiny-imagenet --data-dir data`, "
    "or generate a stand-in with `python -m helpers.data.synthetic --out data/generated`."
)


def natural_key(name: str) -> list:
    """Sort key that orders 'img_2' before 'img_10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[str]:
    """Image file names in `folder`, naturally sorted; macOS `._*` companions are not images."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and not is_macos_metadata(e.name)]
    return sorted(names, key=natural_key)


def check_split(split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"split={split!r} is not valid; choose one of {', '.join(valid)}")


class TinyImageNet(Dataset):
    """Tiny ImageNet from `root` (the `tiny-imagenet-200` folder), decoded image by image.

    Attributes: `classes` (wnids in `wnids.txt` order), `class_names` (from `words.txt`),
    `samples` (list of (path, label)), `targets` (list of labels; -1 for "test").
    `ds[i]` is `(PIL RGB image, int label)`, or the transformed pair.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        check_split(split, SPLITS)
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        if not self.root.is_dir():
            raise DatasetError(f"Tiny ImageNet folder not found: {self.root}. {GET_IT}")
        self.classes = read_wnids(self.root)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.class_names = read_class_names(self.root, self.classes)
        self.samples = {"train": self._train_samples, "val": self._val_samples, "test": self._test_samples}[split]()
        self.targets = [label for _, label in self.samples]

    def _train_samples(self) -> list[tuple[str, int]]:
        train = self.root / "train"
        missing = [w for w in self.classes if not (train / w / "images").is_dir()]
        if missing:
            shown = ", ".join(str(train / w / "images") for w in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetError(
                f"Tiny ImageNet at {self.root} is incomplete: {len(missing)} of {len(self.classes)} "
                f"class folders are missing ({shown}{more}). Re-extract the archive. {GET_IT}"
            )
        samples = []
        for label, wnid in enumerate(self.classes):
            folder = train / wnid / "images"
            names = list_images(folder)
            if not names:
                raise DatasetError(f"Tiny ImageNet class folder {folder} holds no images. Re-extract the archive.")
            samples += [(str(folder / n), label) for n in names]
        return samples

    def _val_samples(self) -> list[tuple[str, int]]:
        annotations = self.root / "val" / "val_annotations.txt"
        images = self.root / "val" / "images"
        if not annotations.is_file():
            raise DatasetError(
                f"Tiny ImageNet at {self.root} has no {annotations}: the val labels live there "
                f"(file, wnid, box per line). Re-extract the archive. {GET_IT}"
            )
        if not images.is_dir():
            raise DatasetError(f"Tiny ImageNet at {self.root} has no folder {images}. Re-extract the archive.")
        present = set(list_images(images))
        samples = []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in self.class_to_idx:
                raise DatasetError(
                    f"{annotations} line {number} is malformed or names a wnid not in wnids.txt: {line!r}. "
                    "Re-extract the archive."
                )
            if fields[0] not in present:
                raise DatasetError(
                    f"{annotations} line {number} names {images / fields[0]}, which is missing. Re-extract the archive."
                )
            samples.append((str(images / fields[0]), self.class_to_idx[fields[1]]))
        if not samples:
            raise DatasetError(f"{annotations} lists no images. Re-extract the archive.")
        return samples

    def _test_samples(self) -> list[tuple[str, int]]:
        images = self.root / "test" / "images"
        if not images.is_dir():
            raise DatasetError(f"Tiny ImageNet at {self.root} has no folder {images}. Re-extract the archive.")
        return [(str(images / n), -1) for n in list_images(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        return apply_transforms(image, label, self.transform, self.target_transform)

    def __repr__(self) -> str:
        return f"TinyImageNet(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, classes={len(self.classes)})"


def read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise DatasetError(f"Tiny ImageNet at {root} has no wnids.txt (the class list). {GET_IT}")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DatasetError(f"{path} is empty. Re-extract the archive.")
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{path} lists a wnid twice. Re-extract the archive.")
    return wnids


def read_class_names(root: Path, wnids: list[str]) -> list[str]:
    """Human-readable names from `words.txt` (tab separated: wnid, comma-separated synonyms)."""
    path = root / "words.txt"
    if not path.is_file():
        raise DatasetError(f"Tiny ImageNet at {root} has no words.txt (the class names). Re-extract the archive.")
    wanted = set(wnids)
    names = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            wnid, _, words = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                names[wnid] = words.strip()
    return [names.get(w, w) for w in wnids]
