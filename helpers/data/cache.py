"""Decode-once uint8 cache of Tiny ImageNet: an (N, H, W, 3) `.npy` array plus labels.

The cache file name carries a fingerprint of the source files (relative path, size, mtime), so it
is reused while the source is unchanged and rebuilt when anything changes. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from helpers.data.images import ToUint8Tensor, apply_transforms
from helpers.data.tinyimagenet import TinyImageNet


def source_fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    """sha1 over every sample's relative path, size, mtime and label."""
    digest = hashlib.sha1()
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def default_cache_dir(root: Path) -> Path:
    return root.parent / f"{root.name}-cache"


def decode_all(dataset: Dataset, num_workers: int = 0, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Decode every image of a dataset returning uint8 (3, H, W) tensors into one (N, H, W, 3) array."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = None
    start = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="decoding", unit="batch")
    for images, _ in batches:
        if out is None:
            out = np.empty((len(dataset), images.shape[2], images.shape[3], 3), dtype=np.uint8)
        out[start : start + len(images)] = images.permute(0, 2, 3, 1).numpy()
        start += len(images)
    return out


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CachedTinyImageNet(Dataset):
    """Tiny ImageNet served from a uint8 cache (built on first use, reused while the source is unchanged).

    `images` is the (N, H, W, 3) uint8 array (memory-mapped), `targets` the int64 labels; the other
    attributes match `TinyImageNet`. `ds[i]` is (PIL RGB image, label), or the transformed pair.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        cache_dir: str | Path | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        num_workers: int | None = None,
        progress: bool = False,
    ):
        source = TinyImageNet(root, split)
        self.root, self.split = source.root, split
        self.classes, self.class_names, self.samples = source.classes, source.class_names, source.samples
        self.transform, self.target_transform = transform, target_transform
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = source_fingerprint(self.root, source.samples)[:16]
        stem = f"tinyimagenet-{split}-{fingerprint}"
        self.images_path = cache_dir / f"{stem}.images.npy"
        labels_path = cache_dir / f"{stem}.labels.npy"
        self.built = not (self.images_path.is_file() and labels_path.is_file())
        if self.built:
            source.transform = ToUint8Tensor()
            workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
            images = decode_all(source, num_workers=workers, progress=progress)
            atomic_save_npy(labels_path, np.asarray(source.targets, dtype=np.int64))
            atomic_save_npy(self.images_path, images)  # written last: its presence marks a complete cache
            (cache_dir / f"{stem}.json").write_text(json.dumps({"root": str(self.root), "split": split, "images": len(images)}))
            for old in cache_dir.glob(f"tinyimagenet-{split}-*"):
                if not old.name.startswith(stem):
                    old.unlink(missing_ok=True)
        self.images = np.load(self.images_path, mmap_mode="r")
        self.targets = np.load(labels_path)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(np.asarray(self.images[index]))
        label = int(self.targets[index])
        return apply_transforms(image, label, self.transform, self.target_transform)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (uint8 (N, H, W, 3), int64 (N,)) CPU tensors (loads the array into memory)."""
        return torch.from_numpy(np.array(self.images)), torch.from_numpy(self.targets)

    def __repr__(self) -> str:
        return f"CachedTinyImageNet(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, cache={str(self.images_path)!r})"
