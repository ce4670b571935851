"""Image decoding shared by the dataset classes: always RGB, always a clear error for a bad file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from helpers.data.errors import DatasetError

STAMP = ".generated.json"  # marks a folder written by helpers.data.synthetic (a generated stand-in)


def is_macos_metadata(name: str) -> bool:
    """True for the files macOS leaves beside real ones (AppleDouble `._*` resource forks, `.DS_Store`)
    when it copies to FAT/exFAT/network drives or packs a zip or tar: never dataset images."""
    return name.startswith("._") or name == ".DS_Store"


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as an RGB PIL image (grayscale/CMYK converted)."""
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode so truncated files fail here, not later
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(
            f"Image file not found: {path}. The dataset folder is incomplete; "
            + repair_advice(path, "re-extract or re-download it.")
        ) from None
    except (
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:  # the warning when warnings are errors
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
        size = (
            f"{int(found.group(1)):,} pixels, over PIL's limit of {int(found.group(2)):,}"
            if found
            else "over PIL's limit"
        )
        raise DatasetError(
            f"Image {path} is too large to decode safely ({size}; a decompression-bomb guard): "
            "it is not a normal dataset image; remove it or resize it."
        ) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"Cannot decode image {path} ({exc}). The file is corrupt or truncated; "
            + repair_advice(path, "replace it by re-extracting or re-downloading the dataset.")
        ) from None


def generated_root(path: str | Path) -> Path | None:
    """The generated stand-in dataset folder (the one holding the synthetic STAMP) that contains `path`, or None."""
    for folder in Path(path).absolute().parents:
        if (folder / STAMP).is_file():
            return folder
    return None


def repair_advice(path: str | Path, real_data_advice: str) -> str:
    """How to replace a damaged dataset file: `real_data_advice` for downloaded data; for generated
    data, delete the generated folder, which the next run writes again."""
    root = generated_root(path)
    if root is None:
        return real_data_advice
    return f"this is generated stand-in data: delete {root} and it is regenerated on the next run."


def apply_transforms(image, label: int, transform=None, target_transform=None):
    """(image, label) with the optional dataset transforms applied: what every dataset's __getitem__ returns."""
    if transform is not None:
        image = transform(image)
    if target_transform is not None:
        label = target_transform(label)
    return image, label


def pil_to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ToUint8Tensor:
    """Deterministic PIL -> uint8 (3, S, S) tensor: optional resize of the shorter side, optional centre crop.

    Random augmentation is not done here: it runs on whole batches on the device
    (`helpers.data.transforms`), so per-item and cached paths share it.
    """

    def __init__(self, resize: int | None = None, crop: int | None = None):
        self.resize = resize
        self.crop = crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.resize is not None:
            w, h = img.size
            scale = self.resize / min(w, h)
            new_size = (max(self.resize, round(w * scale)), max(self.resize, round(h * scale)))
            if new_size != (w, h):
                img = img.resize(new_size, Image.BILINEAR)
        if self.crop is not None:
            w, h = img.size
            if w < self.crop or h < self.crop:
                img = img.resize((max(w, self.crop), max(h, self.crop)), Image.BILINEAR)
                w, h = img.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        return pil_to_uint8_chw(img)

    def __repr__(self) -> str:
        return f"ToUint8Tensor(resize={self.resize}, crop={self.crop})"
