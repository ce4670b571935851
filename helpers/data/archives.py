"""Datasets given as archives: a data folder that holds `tiny-imagenet-200.zip` (or the mini
archives, e.g. `stanford-cars-mini.zip`) instead of the extracted folders is used as it is.

The archive whose top folder is the dataset's folder is extracted once, beside itself when the
data folder can be written, else into this user's cache folder, and the extracted folder is used
from then on (the next run finds it and extracts nothing).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from helpers.data.cache import cache_subfolder, is_writable_dir, user_cache_dir

SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def top_folder(archive: Path) -> str | None:
    """The first path component of the archive's first member (None when unreadable)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        else:
            with tarfile.open(archive) as tf:
                first = tf.next()
                names = [first.name] if first is not None else []
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError):
        return None
    return names[0].lstrip("./").split("/")[0] if names else None


def archives_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIXES) and not p.name.startswith(".")
    )


def extraction_dir(data_dir: Path) -> Path:
    """Where archives of `data_dir` are extracted: `data_dir` itself when writable, else the user cache."""
    return data_dir if is_writable_dir(data_dir) else user_cache_dir() / "extracted" / cache_subfolder(data_dir)


def extracted_from_archive(data_dir: Path, folders: tuple[str, ...], is_dataset, log=print) -> Path | None:
    """The dataset folder made from an archive in `data_dir` whose top folder is one of `folders`
    (`is_dataset(path)` tells a complete one), extracting it on first use; None without one."""
    from helpers.data.download import extract_archive

    target_dir = extraction_dir(data_dir)
    for name in folders:
        if is_dataset(target_dir / name):  # extracted by an earlier run
            return target_dir / name
    for archive in archives_in(data_dir):
        top = top_folder(archive)
        if top in folders:
            log(f"[data] extracting {archive} into {target_dir} (once; later runs use the extracted folder)")
            root = extract_archive(archive, target_dir, top)
            if is_dataset(root):
                return root
    return None
