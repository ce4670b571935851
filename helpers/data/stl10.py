"""STL-10 (`stl10_binary/`) read from its binary files, memory-mapped (never loaded whole).

Each image is 3 planes of 96x96 uint8, every plane stored column-major, 27,648 bytes, no header;
labels are uint8 1..10 in `<split>_y.bin` (we return 0..9; -1 for "unlabeled").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from helpers.data.errors import DatasetError
from helpers.data.images import apply_transforms, repair_advice
from helpers.data.tinyimagenet import check_split

SPLITS = ("train", "test", "unlabeled")
SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE  # 27,648
DEFAULT_CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
GET_IT = (
    "Download it with `python -m helpers.data.download stl10 --data-dir data`, "
    "or generate a stand-in with `python -m helpers.data.synthetic --out data/generated`."
)


def decode_planes(raw: np.ndarray) -> np.ndarray:
    """(n, 27648) uint8 rows in STL-10 order -> (n, 96, 96, 3) images, correctly oriented."""
    planes = raw.reshape(-1, 3, SIZE, SIZE)  # (n, c, x, y): each plane is column-major
    return np.ascontiguousarray(planes.transpose(0, 3, 2, 1))  # -> (n, y, x, c)


def encode_planes(images: np.ndarray) -> np.ndarray:
    """Inverse of `decode_planes`: (n, 96, 96, 3) -> (n, 27648) bytes in STL-10 order."""
    return np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 2, 1)).reshape(
        len(images), IMAGE_BYTES
    )


class STL10(Dataset):
    """STL-10 split from `root` (the `stl10_binary` folder). `ds[i]` is (96x96 PIL RGB image, label 0..9).

    Attributes: `classes` (names), `class_names`, `targets` (np.int64 array), `folds` (for "train":
    the ten predefined index lists of `fold_indices.txt` when present). `read_images(idx)` returns
    (n, 96, 96, 3) uint8 for a batch of indices straight from the memory map.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        check_split(split, SPLITS)
        self.root, self.split = Path(root), split
        self.transform, self.target_transform = transform, target_transform
        if not self.root.is_dir():
            raise DatasetError(f"STL-10 folder not found: {self.root}. {GET_IT}")
        self.images_path = self.root / f"{split}_X.bin"
        if not self.images_path.is_file():
            raise DatasetError(f"STL-10 at {self.root} has no {self.images_path.name}. {GET_IT}")
        size = self.images_path.stat().st_size
        if size == 0 or size % IMAGE_BYTES:
            raise DatasetError(
                f"{self.images_path} has {size:,} bytes, not a positive multiple of {IMAGE_BYTES:,} "
                "(one 3x96x96 image): the file is truncated or not STL-10; "
                + repair_advice(self.images_path, "re-download or re-extract it.")
            )
        self.num_images = size // IMAGE_BYTES
        self.targets = self._read_labels()
        names_file = self.root / "class_names.txt"
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else []
        self.classes = self.class_names = names or list(DEFAULT_CLASS_NAMES)
        self.folds = self._read_folds() if split == "train" else None
        self._memmap: np.memmap | None = None

    def _read_labels(self) -> np.ndarray:
        if self.split == "unlabeled":
            return np.full(self.num_images, -1, dtype=np.int64)
        path = self.root / f"{self.split}_y.bin"
        if not path.is_file():
            raise DatasetError(
                f"STL-10 at {self.root} has {self.images_path.name} but no {path.name} (its labels). {GET_IT}"
            )
        labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
        if len(labels) != self.num_images:
            raise DatasetError(
                f"{path} holds {len(labels)} labels but {self.images_path.name} holds {self.num_images} images. "
                "One of them is truncated; " + repair_advice(path, "re-download or re-extract.")
            )
        if len(labels) and (labels.min() < 1 or labels.max() > 10):
            raise DatasetError(
                f"{path} holds labels outside 1..10 (found {labels.min()}..{labels.max()}): not STL-10 labels."
            )
        return labels - 1

    def _read_folds(self) -> list[np.ndarray] | None:
        path = self.root / "fold_indices.txt"
        if not path.is_file():
            return None
        return [np.array(line.split(), dtype=np.int64) for line in path.read_text().splitlines() if line.strip()]

    @property
    def memmap(self) -> np.memmap:
        """(N, 27648) uint8 view of the file, opened lazily (so DataLoader workers do not copy it)."""
        if self._memmap is None:
            self._memmap = np.memmap(self.images_path, dtype=np.uint8, mode="r", shape=(self.num_images, IMAGE_BYTES))
        return self._memmap

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memmap"] = None  # pickling a memmap would copy the whole file into the pickle
        return state

    def read_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at `indices` as (n, 96, 96, 3) uint8."""
        return decode_planes(self.memmap[np.asarray(indices, dtype=np.int64)])

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image = Image.fromarray(self.read_images([index % self.num_images])[0])
        label = int(self.targets[index])
        return apply_transforms(image, label, self.transform, self.target_transform)

    def __repr__(self) -> str:
        return f"STL10(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"
