"""Decode-once uint8 cache of Tiny ImageNet: an (N, H, W, 3) `.npy` array plus labels.

The cache file name carries a fingerprint of the source files (relative path, size, mtime), so it
is reused while the source is unchanged and rebuilt when anything changes. Each file is written
atomically and the `<stem>.json` sidecar last, so its presence marks a complete cache; on open
every file is checked against the sidecar and a damaged cache is rebuilt with a one-line notice.
The cache lives beside the data (`<root>-cache`) unless `cache_dir` or $HELPERS_CACHE_DIR names
another place, or the data folder is read-only: then in the user cache (`resolve_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from helpers.atomic import atomic_save_npy, atomic_write_json, remove_stale_temporaries
from helpers.data.errors import DatasetError
from helpers.data.images import ToUint8Tensor, apply_transforms
from helpers.data.tinyimagenet import IMAGE_SIZE, TinyImageNet
from helpers.runinfo import live_progress, notice

CACHE_ENV = "HELPERS_CACHE_DIR"  # where decode caches go instead of beside the data
CACHE_FORMAT = 2  # sidecar layout version: a cache written by another version is rebuilt
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def source_fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    """sha1 over every sample's relative path, size, mtime and label."""
    digest = hashlib.sha1()
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def default_cache_dir(root: Path) -> Path:
    """The cache folder beside the data: `<root.parent>/<root.name>-cache`."""
    return root.parent / f"{root.name}-cache"


def cache_subfolder(root: Path) -> str:
    """One dataset's folder inside a shared cache: `<root name>-<hash of its absolute path>`, so two
    datasets of the same name never share (and overwrite) one cache."""
    resolved = Path(root).resolve()
    return f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"


def user_cache_dir() -> Path:
    """This user's cache folder: `$XDG_CACHE_HOME/helpers`, else `~/.cache/helpers`."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "helpers"


def is_writable_dir(folder: Path) -> bool:
    """Whether `folder` can be created and written to, found by doing it (a probe file): os.access
    misjudges read-only mounts and network drives, and says yes to root on any of them."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError:
        return False
    return True


def resolve_cache_dir(root: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The (created) folder for the decode cache of the dataset at `root`: `cache_dir` when given;
    else `$HELPERS_CACHE_DIR/<cache_subfolder>`; else `default_cache_dir` beside the data when it can
    be written; else `user_cache_dir()/<cache_subfolder>`, with a one-line notice."""
    root = Path(root).absolute()
    if cache_dir is not None:
        return created_cache_dir(Path(cache_dir), "the cache_dir argument")
    if os.environ.get(CACHE_ENV):
        chosen = Path(os.environ[CACHE_ENV]).expanduser().resolve() / cache_subfolder(root)
        return created_cache_dir(chosen, CACHE_ENV)
    beside = default_cache_dir(root)
    if is_writable_dir(beside):
        return beside
    fallback = user_cache_dir() / cache_subfolder(root)
    if not is_writable_dir(fallback):
        raise DatasetError(
            f"Cannot write the decode cache of {root}: neither {beside} (beside the data) nor {fallback} "
            f"(the user cache) is writable. Set {CACHE_ENV} to a writable folder."
        )
    notice(
        f"the data folder {root.parent} is read-only, so the decode cache of {root.name} goes to "
        f"{fallback} (set {CACHE_ENV} to choose the place)"
    )
    return fallback


def created_cache_dir(folder: Path, chosen_by: str) -> Path:
    """`folder`, created; DatasetError naming it when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"Cannot create the cache folder {folder} (set by {chosen_by}): {exc.strerror or exc}. Choose a writable folder."
        ) from None
    return folder


def decode_all(dataset: Dataset, num_workers: int = 0, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Decode every image of a dataset returning uint8 (3, H, W) tensors into one (N, H, W, 3) array."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = None
    start = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="decoding", unit="batch", disable=not live_progress())
    for images, _ in batches:
        if out is None:
            out = np.empty((len(dataset), images.shape[2], images.shape[3], 3), dtype=np.uint8)
        out[start : start + len(images)] = images.permute(0, 2, 3, 1).numpy()
        start += len(images)
    return out


def labels_checksum(labels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a `.npy` file's header; ValueError when the header is unreadable or the
    file's size is not the header's size plus the array's bytes (a truncated or overgrown file)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = HEADER_READERS[version](handle)
        expected = handle.tell() + int(np.prod(shape)) * dtype.itemsize
        size = os.fstat(handle.fileno()).st_size
    if fortran_order:
        raise ValueError("array stored in Fortran order")
    if size != expected:
        raise ValueError(
            f"{'truncated: ' if size < expected else ''}{size:,} bytes where its header needs {expected:,}"
        )
    return tuple(shape), dtype


def cache_damage(
    sidecar_path: Path, images_path: Path, labels_path: Path, fingerprint: str, label_range: tuple[int, int]
) -> tuple[Path, str] | None:
    """(file at fault, reason) when the cache is incomplete or does not match its sidecar, else None.

    Reads the `.npy` headers and the labels, never the images."""
    if not sidecar_path.is_file():
        return sidecar_path, "no sidecar: its build did not finish"
    try:
        meta = json.loads(sidecar_path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            return (
                sidecar_path,
                f"written by another version of this code: sidecar format {meta.get('format')}, expected {CACHE_FORMAT}",
            )
        recorded = {
            images_path: (tuple(meta["images"]["shape"]), np.dtype(meta["images"]["dtype"])),
            labels_path: ((meta["labels"]["count"],), np.dtype(np.int64)),
        }
        recorded_fingerprint, recorded_checksum = meta["fingerprint"], meta["labels"]["sha1"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return sidecar_path, f"unreadable sidecar: {type(exc).__name__}: {exc}"
    if recorded_fingerprint != fingerprint:
        return sidecar_path, "sidecar records another source fingerprint"
    for path, (shape, dtype) in recorded.items():
        if not path.is_file():
            return path, "file missing"
        try:
            found = npy_layout(path)
        except (OSError, ValueError) as exc:
            return path, str(exc)
        if found != (shape, dtype):
            return path, f"holds {found[1]} {found[0]}, its sidecar records {dtype} {shape}"
    labels = np.load(labels_path)
    if labels_checksum(labels) != recorded_checksum:
        return labels_path, "labels checksum differs from the sidecar's"
    low, high = label_range
    if len(labels) and (labels.min() < low or labels.max() >= high):
        return labels_path, f"labels {labels.min()}..{labels.max()} outside {low}..{high - 1}"
    return None


class CachedTinyImageNet(Dataset):
    """Tiny ImageNet served from a uint8 cache (built on first use, reused while the source is unchanged).

    `images` is the (N, 64, 64, 3) uint8 array (memory-mapped), `targets` the int64 labels; the other
    attributes match `TinyImageNet`. `ds[i]` is (PIL RGB image, label), or the transformed pair.
    Images are decoded with `ToUint8Tensor(crop=64)`, exactly as the lazy path decodes them.
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
        cache_dir = resolve_cache_dir(self.root, cache_dir)
        remove_stale_temporaries(cache_dir, recursive=False)
        fingerprint = source_fingerprint(self.root, source.samples)
        stem = f"tinyimagenet-{split}-{fingerprint[:16]}"
        self.images_path = cache_dir / f"{stem}.images.npy"
        self.labels_path = cache_dir / f"{stem}.labels.npy"
        self.sidecar_path = cache_dir / f"{stem}.json"
        self.built = not self._cache_is_usable(fingerprint)
        if self.built:
            workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
            self._build(source, fingerprint, workers, progress)
            for old in cache_dir.glob(f"tinyimagenet-{split}-*"):
                if not old.name.startswith(stem):
                    old.unlink(missing_ok=True)
        self.images = np.load(self.images_path, mmap_mode="r")
        self.targets = np.load(self.labels_path)

    def _cache_is_usable(self, fingerprint: str) -> bool:
        """True when the cache files are complete and intact; prints a one-line notice when they exist but are not."""
        files = (self.sidecar_path, self.images_path, self.labels_path)
        if not any(path.exists() for path in files):
            return False
        label_range = (-1, 0) if self.split == "test" else (0, len(self.classes))
        damage = cache_damage(*files, fingerprint, label_range)
        if damage is not None:
            path, reason = damage
            print(f"cache {path} is damaged ({reason}); rebuilding it", flush=True)
        return damage is None

    def _build(self, source: TinyImageNet, fingerprint: str, num_workers: int, progress: bool) -> None:
        self.sidecar_path.unlink(missing_ok=True)  # the cache counts as incomplete until the new sidecar is in place
        source.transform = ToUint8Tensor(crop=IMAGE_SIZE)
        images = decode_all(source, num_workers=num_workers, progress=progress)
        labels = np.asarray(source.targets, dtype=np.int64)
        atomic_save_npy(self.labels_path, labels)
        atomic_save_npy(self.images_path, images)
        sidecar = {
            "format": CACHE_FORMAT,
            "root": str(self.root),
            "split": self.split,
            "fingerprint": fingerprint,
            "images": {"shape": list(images.shape), "dtype": str(images.dtype)},
            "labels": {"count": len(labels), "sha1": labels_checksum(labels)},
        }
        atomic_write_json(sidecar, self.sidecar_path)  # written last: its presence marks a complete cache

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
