"""Fetch, verify and install the datasets into ``data/``: Tiny ImageNet, STL-10 and Cars-196.

Downloads stream to a ``.part`` file and are checked (size, MD5) before they take their final name;
archives are extracted into a hidden temporary folder next to the target and renamed into place
only once complete, so an interrupted run never leaves a folder that looks finished.

Command line::

    python -m helpers.data.download tiny-imagenet [--data-dir data] [--url URL] [--md5 MD5]
    python -m helpers.data.download stl10 [--data-dir data]
    python -m helpers.data.download cars196 --source PATH [--data-dir data]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from helpers.data.errors import DatasetError
from helpers.data.images import is_macos_metadata

__all__ = [
    "CARS_DEVKIT_DIR",
    "CARS_LAYOUT_DEVKIT",
    "CARS_LAYOUT_METRIC",
    "CARS_METRIC_DIR",
    "STL10_COUNTS",
    "STL10_DIR",
    "STL10_IMAGE_BYTES",
    "STL10_MD5",
    "STL10_URL",
    "TINY_IMAGENET_COUNTS",
    "TINY_IMAGENET_DIR",
    "TINY_IMAGENET_MD5",
    "TINY_IMAGENET_URL",
    "Stl10Counts",
    "TinyImageNetCounts",
    "download_file",
    "download_stl10",
    "download_tiny_imagenet",
    "extract_archive",
    "main",
    "prepare_cars196",
    "verify_cars196",
    "verify_stl10",
    "verify_tiny_imagenet",
]

_log = logging.getLogger(__name__)

# Tiny ImageNet (CS231n): 200 classes, 64x64 JPEGs; the zip holds one folder, tiny-imagenet-200/.
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_DIR = "tiny-imagenet-200"

# STL-10 (Coates et al.), binary release: the tar.gz holds one folder, stl10_binary/.
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
STL10_DIR = "stl10_binary"
# One STL-10 image: 3 planes of 96x96 uint8, no header.
STL10_IMAGE_BYTES = 3 * 96 * 96

# Cars-196 has no stable official URL any more: it is installed from a user-supplied archive or folder.
CARS_DEVKIT_DIR = "stanford_cars"  # devkit release: cars_train/, cars_test/, devkit/*.mat
CARS_METRIC_DIR = "cars196"  # metric-learning release: cars_annos.mat + car_ims/
CARS_LAYOUT_DEVKIT = "devkit"  # layout names returned by verify_cars196
CARS_LAYOUT_METRIC = "metric_learning"

_CLI = "python -m helpers.data.download"
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "helpers-dataset-download/0.1 (Python urllib)"
_MAX_LISTED_PROBLEMS = 8
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
_TAR_FILTER_ERRORS = getattr(tarfile, "FilterError", ())  # tarfile's own unsafe-member errors, if any


@dataclass(frozen=True)
class TinyImageNetCounts:
    """How many classes and images a complete Tiny ImageNet folder holds."""

    classes: int = 200
    train_per_class: int = 500
    val: int = 10_000
    test: int = 10_000


@dataclass(frozen=True)
class Stl10Counts:
    """How many images each STL-10 split holds; ``unlabeled=None`` makes unlabeled_X.bin optional."""

    train: int = 5_000
    test: int = 8_000
    unlabeled: int | None = 100_000


TINY_IMAGENET_COUNTS = TinyImageNetCounts()
STL10_COUNTS = Stl10Counts()

_CARS_HELP = (
    "Cars-196 has no stable official download any more: supply an archive (.zip, .tar, .tar.gz/.tgz) "
    "or a folder in one of two layouts, (a) the metric-learning release: cars_annos.mat + car_ims/*.jpg "
    "(car_ims.tgz and cars_annos.mat from the original Stanford Cars page or its mirrors; pass "
    "car_ims.tgz with cars_annos.mat beside it, or both in one folder or archive), or "
    "(b) the devkit release: cars_train/*.jpg + devkit/cars_train_annos.mat + devkit/cars_meta.mat, "
    "and/or cars_test/*.jpg + cars_test_annos_withlabels.mat (e.g. the Kaggle mirrors of the devkit "
    "release; the test labels come separately as cars_test_annos_withlabels.mat); one wrapping folder "
    f"such as stanford_cars/ is fine. Then run `{_CLI} cars196 --source PATH`."
)


# --------------------------------------------------------------------------------------------------
# Downloading one file


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    expected_size: int | None = None,
    timeout: float = 60,
    progress: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` and check its size and MD5; an existing matching ``dest`` is reused."""
    dest = Path(dest)
    md5 = md5.strip().lower() if md5 else None
    if dest.is_file():
        if _file_matches(dest, md5, expected_size):
            return dest
        _log.info("%s does not match the expected size/MD5; downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    retry = _retry_hint(url, dest)
    try:
        received, declared, actual_md5 = _stream_to_file(url, part, dest, timeout, progress)
        if declared is not None and received != declared:
            raise DatasetError(f"Download of {url} stopped early: got {received:,} of {declared:,} bytes. {retry}")
        if expected_size is not None and received != expected_size:
            raise DatasetError(
                f"{url} gave {received:,} bytes, expected {expected_size:,}: the file is truncated "
                f"or a different version. {retry}"
            )
        if md5 and actual_md5 != md5:
            raise DatasetError(
                f"{url} has MD5 {actual_md5}, expected {md5}: the file is damaged or a different version. {retry}"
            )
    except BaseException:
        part.unlink(missing_ok=True)  # never leave a partial file behind, even on Ctrl-C
        raise
    os.replace(part, dest)
    return dest


def _retry_hint(url: str, dest: Path) -> str:
    """What to do when a download fails."""
    return f"Retry, or download {url} by hand (browser, wget) and save it as {dest}."


def _stream_to_file(url: str, part: Path, dest: Path, timeout: float, progress: bool) -> tuple[int, int | None, str]:
    """Write the body of ``url`` to ``part``; return (bytes received, Content-Length or None, MD5)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            declared = _content_length(response)
            if declared is not None:
                _require_free_space(part.parent, declared, url)
            with _progress_bar(declared, dest.name, "B", progress) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DatasetError(
            f"{url} answered HTTP {exc.code} {exc.reason}: check the URL, or download the file by "
            f"hand and save it as {dest}."
        ) from exc
    except http.client.IncompleteRead as exc:
        got = received + len(exc.partial)
        raise DatasetError(f"Download of {url} stopped early after {got:,} bytes. {_retry_hint(url, dest)}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"Could not download {url}: {reason}. Check the network connection and free disk "
            f"space. {_retry_hint(url, dest)}"
        ) from exc
    return received, declared, digest.hexdigest()


def _content_length(response: http.client.HTTPResponse) -> int | None:
    """The Content-Length header as an int, or None when absent or not a number."""
    value = response.headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _require_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise DatasetError when ``directory`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DatasetError(
            f"Not enough disk space in {directory} for {what}: needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free. Free some space or choose another --data-dir."
        )


def _file_matches(path: Path, md5: str | None, expected_size: int | None) -> bool:
    """True when ``path`` has the expected size and MD5 (each checked only when given)."""
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    return md5 is None or _md5_of(path) == md5


def _md5_of(path: Path) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _NoProgress:
    """Stand-in for a tqdm bar when progress is off or tqdm is not installed."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress_bar(total: int | None, desc: str, unit: str, enabled: bool):
    """A tqdm bar (used as a context manager) when enabled and available, else a no-op."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)
    return _NoProgress()


# --------------------------------------------------------------------------------------------------
# Extracting archives


def extract_archive(archive: str | Path, dest_dir: str | Path, expected_top: str, progress: bool = False) -> Path:
    """Extract a zip or tar(.gz) whose top folder is ``expected_top`` into ``dest_dir/expected_top``.

    Members with absolute paths or '..' are refused. An existing ``dest_dir/expected_top`` is
    replaced, in one rename, only once the new one is completely extracted.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    final = dest_dir / expected_top
    with _extracted(archive, dest_dir, expected_top, progress) as staging:
        _move_into_place(_top_folder(staging, expected_top, archive), final, staging)
    return final


@contextmanager
def _staging_dir(parent: Path, label: str) -> Iterator[Path]:
    """A hidden temporary folder inside ``parent`` (same filesystem, so renames are atomic), removed after."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{label}-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _extracted(archive: Path, parent: Path, label: str, progress: bool, remedy: str | None = None) -> Iterator[Path]:
    """Extract ``archive`` into a staging folder inside ``parent``; yield it; remove it afterwards.

    ``remedy`` ends the message for a damaged archive (default: delete it and download it again).
    """
    if not archive.is_file():
        raise DatasetError(f"Archive {archive} does not exist: check the path.")
    with _staging_dir(parent, label) as staging:
        _extract_all(archive, staging, progress, remedy or f"Delete {archive} and download it again")
        yield staging


def _extract_all(archive: Path, target: Path, progress: bool, redo: str) -> None:
    """Extract every member of a zip or tar archive into ``target``, refusing unsafe members."""
    try:
        # tar first: a plain tar whose last member is a .zip can pass zipfile's end-of-file check.
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, target, progress)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, target, progress)
        else:
            raise DatasetError(
                f"{archive} is not a readable zip or tar archive (it may be truncated or corrupt). {redo}."
            )
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{archive} is corrupt or truncated ({exc}). {redo}.") from exc
    except OSError as exc:
        raise DatasetError(
            f"Could not extract {archive} into {target.parent}: {exc}. Check free disk space and write permission."
        ) from exc


def _extract_zip(archive: Path, target: Path, progress: bool) -> None:
    """Extract a zip member by member; zipfile checks each member's CRC as it is read."""
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            _refuse_unsafe_name(member.filename, archive)
        with _progress_bar(len(members), f"extract {archive.name}", "file", progress) as bar:
            for member in members:
                zf.extract(member, target)
                bar.update()


def _extract_tar(archive: Path, target: Path, progress: bool) -> None:
    """Extract a (compressed) tar in one forward pass, then check that nothing but padding follows."""
    # The "data" filter (Python >= 3.11.4 / 3.12) is a second guard on top of our own member checks.
    safe_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive, "r:*") as tf:
        with _progress_bar(None, f"extract {archive.name}", "file", progress) as bar:
            for member in tf:
                _refuse_unsafe_tar_member(member, archive)
                try:
                    tf.extract(member, target, **safe_filter)
                except _TAR_FILTER_ERRORS as exc:
                    raise DatasetError(
                        f"{archive} is unsafe: {exc}. Nothing was installed; get the archive from a trusted source."
                    ) from exc
                bar.update()
        _require_clean_tar_end(tf)


def _require_clean_tar_end(tf: tarfile.TarFile) -> None:
    """Read what follows the last member: tarfile stops silently at a damaged header, and reading
    to the end makes gzip/bz2/xz verify their checksums."""
    while chunk := tf.fileobj.read(_CHUNK_BYTES):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError("damaged member header or data after the end of the archive")


def _refuse_unsafe_name(name: str, archive: Path) -> None:
    """Raise DatasetError for a member name that is absolute or climbs out with '..'."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        reason = "an absolute path"
    elif ".." in PurePosixPath(normalized).parts:
        reason = "'..' in its path"
    else:
        return
    raise DatasetError(
        f"{archive} is unsafe: member {name!r} has {reason} and would be written outside the target "
        "folder. Nothing was installed; get the archive from a trusted source."
    )


def _refuse_unsafe_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse unsafe names, links that point outside the archive, and device files."""
    _refuse_unsafe_name(member.name, archive)
    if member.issym() or member.islnk():
        base = posixpath.dirname(member.name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise DatasetError(
                f"{archive} is unsafe: link {member.name!r} points outside the archive "
                f"({member.linkname!r}). Nothing was installed; get the archive from a trusted source."
            )
    elif not (member.isfile() or member.isdir()):
        raise DatasetError(
            f"{archive} holds a special file {member.name!r} (device or pipe), which a dataset never "
            "needs. Nothing was installed; get the archive from a trusted source."
        )


def _top_folder(staging: Path, expected_top: str, archive: Path) -> Path:
    """The extracted ``expected_top`` folder, or DatasetError saying what the archive holds instead."""
    top = staging / expected_top
    if top.is_dir():
        return top
    found = sorted(p.name for p in staging.iterdir())[:5]
    raise DatasetError(
        f"{archive} has no top-level folder {expected_top}/ (it holds: {', '.join(found) or 'nothing'}): "
        "it is not the expected archive. Delete it and download it again."
    )


def _move_into_place(source: Path, final: Path, staging: Path) -> None:
    """Rename ``source`` to ``final``; an existing ``final`` goes into ``staging`` (removed with it)."""
    if final.exists() or final.is_symlink():
        os.replace(final, staging / f".replaced-{final.name}")
    os.replace(source, final)


# --------------------------------------------------------------------------------------------------
# Verification


def verify_tiny_imagenet(root: str | Path, expected: TinyImageNetCounts = TINY_IMAGENET_COUNTS) -> None:
    """Raise DatasetError listing what is missing when ``root`` is not a complete Tiny ImageNet."""
    root = Path(root)
    how_to_get = (
        f"run `{_CLI} tiny-imagenet --data-dir {root.parent}`, or download {TINY_IMAGENET_URL} "
        f"by hand and unzip it into {root.parent}"
    )
    _raise_if_problems(root, "Tiny ImageNet", _tiny_imagenet_problems(root, expected), how_to_get)


def verify_stl10(root: str | Path, expected: Stl10Counts = STL10_COUNTS) -> None:
    """Raise DatasetError listing missing or wrongly sized files when ``root`` is not a complete STL-10."""
    root = Path(root)
    how_to_get = (
        f"run `{_CLI} stl10 --data-dir {root.parent}`, or download {STL10_URL} by hand and "
        f"extract it into {root.parent}"
    )
    _raise_if_problems(root, "STL-10", _stl10_problems(root, expected), how_to_get)


def verify_cars196(root: str | Path) -> str:
    """Check an installed Cars-196 folder; return its layout ("metric_learning" or "devkit").

    The layout names are the ones helpers.data.cars196 uses.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Cars-196 not found at {root}. {_CARS_HELP}")
    layout, problems = _cars_layout(root)
    if layout is None:
        summary = _summarize(problems) if problems else "neither layout was found"
        raise DatasetError(f"{root} is not a usable Cars-196 folder: {summary}. {_CARS_HELP}")
    return layout


def _raise_if_problems(root: Path, title: str, problems: list[str], how_to_get: str) -> None:
    """Raise one DatasetError naming ``root``, the problems and how to get the data."""
    if not root.is_dir():
        raise DatasetError(f"{title} not found at {root}. To get it, {how_to_get}.")
    if problems:
        raise DatasetError(f"{root} is not a complete {title}: {_summarize(problems)}. To fix it, {how_to_get}.")


def _summarize(problems: list[str]) -> str:
    """The first few problems joined on one line, with a count of the rest."""
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    rest = len(problems) - _MAX_LISTED_PROBLEMS
    return f"{shown}; and {rest} more" if rest > 0 else shown


def _tiny_imagenet_problems(root: Path, expected: TinyImageNetCounts) -> list[str]:
    """What a Tiny ImageNet folder lacks, as short phrases relative to ``root`` (empty when complete)."""
    if not root.is_dir():
        return [f"{root} is not a folder"]
    problems = [f"{name} is missing" for name in ("wnids.txt", "words.txt") if not (root / name).is_file()]
    wnids = _nonempty_lines(root / "wnids.txt")
    if (root / "wnids.txt").is_file() and len(wnids) != expected.classes:
        problems.append(f"wnids.txt lists {len(wnids)} classes, expected {expected.classes}")
    if not (root / "train").is_dir():
        problems.append("train/ is missing")
    else:
        for wnid in wnids:
            problems += _tiny_class_problems(root / "train" / wnid, wnid, expected.train_per_class)
    problems += _image_count_problems(root / "val" / "images", "val/images", expected.val)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        problems.append("val/val_annotations.txt is missing")
    elif (lines := len(_nonempty_lines(annotations))) != expected.val:
        problems.append(f"val/val_annotations.txt has {lines} lines, expected {expected.val}")
    problems += _image_count_problems(root / "test" / "images", "test/images", expected.test)
    return problems


def _tiny_class_problems(class_dir: Path, wnid: str, expected_images: int) -> list[str]:
    """What one train/<wnid>/ folder lacks."""
    if not class_dir.is_dir():
        return [f"train/{wnid}/ is missing"]
    problems = _image_count_problems(class_dir / "images", f"train/{wnid}/images", expected_images)
    if not (class_dir / f"{wnid}_boxes.txt").is_file():
        problems.append(f"train/{wnid}/{wnid}_boxes.txt is missing")
    return problems


def _image_count_problems(folder: Path, label: str, expected: int) -> list[str]:
    """A one-item list when ``folder`` is missing or holds a number of images other than ``expected``."""
    if not folder.is_dir():
        return [f"{label}/ is missing"]
    found = _count_images(folder)
    return [] if found == expected else [f"{label}/ holds {found} images, expected {expected}"]


def _count_images(folder: Path) -> int:
    """Number of .jpg/.jpeg files (any case) directly inside ``folder``; macOS ``._*`` companions are not images."""
    with os.scandir(folder) as entries:
        return sum(
            1
            for e in entries
            if e.name.lower().endswith(_IMAGE_SUFFIXES) and not is_macos_metadata(e.name) and e.is_file()
        )


def _nonempty_lines(path: Path) -> list[str]:
    """Stripped non-empty lines of a text file, or [] when it does not exist."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.strip() for line in handle if line.strip()]


def _stl10_problems(root: Path, expected: Stl10Counts) -> list[str]:
    """What an STL-10 folder lacks, or which files have the wrong byte size (empty when complete)."""
    if not root.is_dir():
        return [f"{root} is not a folder"]
    sizes = {
        "train_X.bin": (expected.train * STL10_IMAGE_BYTES, expected.train),
        "train_y.bin": (expected.train, expected.train),
        "test_X.bin": (expected.test * STL10_IMAGE_BYTES, expected.test),
        "test_y.bin": (expected.test, expected.test),
    }
    if expected.unlabeled is not None:
        sizes["unlabeled_X.bin"] = (expected.unlabeled * STL10_IMAGE_BYTES, expected.unlabeled)
    problems = []
    for name, (size, images) in sizes.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{name} has {actual:,} bytes, expected {size:,} ({images:,} images)")
    for name in ("class_names.txt", "fold_indices.txt"):
        if not (root / name).is_file():
            problems.append(f"{name} is missing")
    return problems


# --------------------------------------------------------------------------------------------------
# Tiny ImageNet and STL-10: download, extract, verify


def download_tiny_imagenet(
    data_dir: str | Path = "data",
    url: str = TINY_IMAGENET_URL,
    md5: str | None = TINY_IMAGENET_MD5,
    expected: TinyImageNetCounts = TINY_IMAGENET_COUNTS,
    keep_archive: bool = False,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Make sure ``data_dir/tiny-imagenet-200`` is complete (downloading it if needed); return it."""
    source = _Source(
        "Tiny ImageNet",
        TINY_IMAGENET_DIR,
        "tiny-imagenet",
        lambda root: _tiny_imagenet_problems(root, expected),
    )
    return _fetch_dataset(source, Path(data_dir), url, md5, keep_archive, progress, timeout)


def download_stl10(
    data_dir: str | Path = "data",
    url: str = STL10_URL,
    md5: str | None = STL10_MD5,
    expected: Stl10Counts = STL10_COUNTS,
    keep_archive: bool = False,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Make sure ``data_dir/stl10_binary`` is complete (downloading it if needed); return it."""
    source = _Source("STL-10", STL10_DIR, "stl10", lambda root: _stl10_problems(root, expected))
    return _fetch_dataset(source, Path(data_dir), url, md5, keep_archive, progress, timeout)


@dataclass(frozen=True)
class _Source:
    """A downloadable dataset: its display name, extracted folder, CLI name and completeness check."""

    title: str
    folder: str
    cli_name: str
    problems: Callable[[Path], list[str]]


def _fetch_dataset(
    source: _Source,
    data_dir: Path,
    url: str,
    md5: str | None,
    keep_archive: bool,
    progress: bool,
    timeout: float,
) -> Path:
    """Return the verified ``data_dir/<folder>``, downloading and extracting the archive when needed."""
    root = data_dir / source.folder
    if root.is_dir():
        problems = source.problems(root)
        if not problems:
            return root
        _log.info("%s is incomplete (%s); it will be replaced", root, _summarize(problems))
    _check_data_dir(data_dir, write=True)
    archive = data_dir / _archive_name(url, source.folder)
    downloaded_now = not archive.exists()
    download_file(url, archive, md5=md5, timeout=timeout, progress=progress)
    try:
        _install_verified(archive, source, data_dir, url, progress)
    except DatasetError:
        if downloaded_now:  # a broken file we fetched ourselves is useless; a hand-placed one is the user's
            archive.unlink(missing_ok=True)
        raise
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return root


def _check_data_dir(data_dir: Path, write: bool = False) -> None:
    """DatasetError when ``data_dir`` is a file, or (``write``) when it cannot be created or written to."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(
            f"The data folder {data_dir} is a file, not a folder: pass a folder as --data-dir "
            "(it is created when missing)."
        )
    if not write:
        return
    try:  # a real write: os.access misjudges read-only mounts, ACLs and network drives
        data_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=data_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise DatasetError(
            f"Cannot write to the data folder {data_dir} ({exc.strerror or exc}): pass a writable folder as --data-dir."
        ) from exc


def _install_verified(archive: Path, source: _Source, data_dir: Path, url: str, progress: bool) -> None:
    """Extract ``archive`` into staging, check the tree there, and only then rename it into place."""
    with _extracted(archive, data_dir, source.folder, progress) as staging:
        extracted = _top_folder(staging, source.folder, archive)
        problems = source.problems(extracted)
        if problems:
            raise DatasetError(
                f"{archive} (from {url}) does not hold a complete {source.title}: {_summarize(problems)}. "
                f"Get the official archive: run `{_CLI} {source.cli_name} --data-dir {data_dir}` again "
                "(delete the archive first if it is still there; with --url, check that the mirror "
                "serves the official file)."
            )
        _move_into_place(extracted, data_dir / source.folder, staging)


def _archive_name(url: str, folder: str) -> str:
    """File name for the downloaded archive: the last part of the URL path, or ``<folder>.download``."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name or f"{folder}.download"


# --------------------------------------------------------------------------------------------------
# Cars-196: install a user-supplied archive or folder

_CARS_ENTRIES = {
    CARS_LAYOUT_METRIC: ("cars_annos.mat", "car_ims"),
    # The .mat files may sit in devkit/ or at the top (the dataset reader looks in both places).
    CARS_LAYOUT_DEVKIT: (
        "devkit",
        "cars_train",
        "cars_test",
        "cars_meta.mat",
        "cars_train_annos.mat",
        "cars_test_annos_withlabels.mat",
    ),
}
_CARS_FOLDERS = {CARS_LAYOUT_METRIC: CARS_METRIC_DIR, CARS_LAYOUT_DEVKIT: CARS_DEVKIT_DIR}
_IGNORED_TOP_ENTRIES = {"__MACOSX"}


def prepare_cars196(
    source: str | Path | None = None,
    data_dir: str | Path = "data",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Install Cars-196 from an archive or folder into ``data_dir/cars196`` (metric-learning layout)
    or ``data_dir/stanford_cars`` (devkit layout) and return that folder.

    A usable installed copy is returned at once unless ``overwrite``; with ``source=None`` that copy is
    required.
    """
    data_dir = Path(data_dir)
    _check_data_dir(data_dir)
    if not overwrite and (installed := _installed_cars(data_dir)) is not None:
        if source is not None:
            _log.info("Cars-196 is already installed at %s; pass overwrite=True to replace it", installed)
        return installed
    if source is None:
        raise DatasetError(
            f"Cars-196 not found in {data_dir} (looked for {CARS_METRIC_DIR}/ and {CARS_DEVKIT_DIR}/). {_CARS_HELP}"
        )
    source = Path(source).expanduser()
    if not source.exists():
        raise DatasetError(f"Cars-196 source {source} does not exist. {_CARS_HELP}")
    _check_data_dir(data_dir, write=True)
    if source.is_dir():
        layout, base = _find_cars_layout(source, source)
        return _install_cars(base, layout, data_dir, move=False)
    remedy = f"Check that {source} is the Cars-196 archive, or extract it yourself and pass the folder"
    with _extracted(source, data_dir, "cars196-source", progress, remedy) as staging:
        _add_sibling_annotations(staging, source)
        layout, base = _find_cars_layout(staging, source)
        return _install_cars(base, layout, data_dir, move=True)


def _add_sibling_annotations(extracted: Path, archive: Path) -> None:
    """The metric-learning release ships car_ims.tgz and cars_annos.mat side by side: join them."""
    sibling = archive.with_name("cars_annos.mat")
    if (extracted / "car_ims").is_dir() and not (extracted / "cars_annos.mat").exists() and sibling.is_file():
        shutil.copy2(sibling, extracted / "cars_annos.mat")


def _installed_cars(data_dir: Path) -> Path | None:
    """An already installed, usable Cars-196 folder in ``data_dir``, or None."""
    for layout, folder in _CARS_FOLDERS.items():
        root = data_dir / folder
        if root.is_dir() and not _cars_problems(root, layout):
            return root
    return None


def _find_cars_layout(folder: Path, shown_as: Path, depth: int = 2) -> tuple[str, Path]:
    """(layout, base folder) of a Cars-196 tree at ``folder`` or inside single wrapping folders."""
    layout, problems = _cars_layout(folder)
    if layout is not None:
        return layout, folder
    if problems:  # it looks like Cars-196, but something is missing: say what
        raise DatasetError(f"{shown_as} is not a usable Cars-196 source: {_summarize(problems)}. {_CARS_HELP}")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in _IGNORED_TOP_ENTRIES]
    subfolders = [p for p in entries if p.is_dir()]
    if depth > 0 and len(subfolders) == 1:
        return _find_cars_layout(subfolders[0], shown_as, depth - 1)
    found = ", ".join(sorted(p.name for p in entries)[:6]) or "nothing"
    raise DatasetError(f"No Cars-196 layout found in {shown_as} (it holds: {found}). {_CARS_HELP}")


def _cars_layout(folder: Path) -> tuple[str | None, list[str]]:
    """(the first layout ``folder`` satisfies, []) or (None, problems of the layouts it resembles)."""
    problems: list[str] = []
    for layout, entries in _CARS_ENTRIES.items():
        if not any((folder / name).exists() for name in entries):
            continue
        layout_problems = _cars_problems(folder, layout)
        if not layout_problems:
            return layout, []
        problems += [f"{layout} layout: {p}" for p in layout_problems]
    return None, problems


def _cars_problems(folder: Path, layout: str) -> list[str]:
    """What ``folder`` lacks to be a usable Cars-196 tree in ``layout`` (empty when usable)."""
    if layout == CARS_LAYOUT_METRIC:
        return _mat_problems(folder, "cars_annos.mat", "annotations") + _image_folder_problems(folder, "car_ims")
    problems = _mat_problems(folder, _devkit_mat(folder, "cars_meta.mat"), "class_names")
    has_train = _count_images_if_dir(folder / "cars_train") > 0
    has_test = _count_images_if_dir(folder / "cars_test") > 0
    test_labels = _devkit_mat(folder, "cars_test_annos_withlabels.mat")
    has_test_labels = (folder / test_labels).is_file()
    if has_train:
        problems += _mat_problems(folder, _devkit_mat(folder, "cars_train_annos.mat"), "annotations")
    if has_test and has_test_labels:
        problems += _mat_problems(folder, test_labels, "annotations")
    if not has_train and not (has_test and has_test_labels):
        problems.append(
            "no complete split: needs cars_train/*.jpg with devkit/cars_train_annos.mat, or "
            "cars_test/*.jpg with cars_test_annos_withlabels.mat"
        )
    return problems


def _devkit_mat(folder: Path, name: str) -> str:
    """Where a devkit .mat file is, relative to ``folder``: devkit/<name>, else <name> at the top,
    else (missing) devkit/<name>."""
    for relative in (f"devkit/{name}", name):
        if (folder / relative).is_file():
            return relative
    return f"devkit/{name}"


def _image_folder_problems(folder: Path, name: str) -> list[str]:
    """A one-item list when ``folder/name`` is missing or holds no .jpg images."""
    if not (folder / name).is_dir():
        return [f"{name}/ is missing"]
    return [] if _count_images(folder / name) else [f"{name}/ holds no .jpg images"]


def _count_images_if_dir(folder: Path) -> int:
    """Number of images in ``folder``, 0 when it is not a folder."""
    return _count_images(folder) if folder.is_dir() else 0


def _mat_problems(folder: Path, relative: str, variable: str) -> list[str]:
    """A one-item list when ``folder/relative`` is missing, unreadable, or lacks ``variable``."""
    path = folder / relative
    if not path.is_file():
        return [f"{relative} is missing"]
    try:
        import scipy.io
    except ImportError:  # without scipy only existence and a non-empty file can be checked
        return [] if path.stat().st_size > 0 else [f"{relative} is empty"]
    try:
        contents = scipy.io.loadmat(path, variable_names=[variable])
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, NotImplementedError...
        return [f"{relative} is not a readable .mat file ({type(exc).__name__}: {exc})"]
    return [] if variable in contents else [f"{relative} has no '{variable}' variable"]


def _install_cars(base: Path, layout: str, data_dir: Path, move: bool) -> Path:
    """Copy (or move) the entries of ``layout`` from ``base`` into ``data_dir/<folder>`` atomically."""
    final = data_dir / _CARS_FOLDERS[layout]
    if final.exists() and base.resolve() == final.resolve():
        return final
    with _staging_dir(data_dir, _CARS_FOLDERS[layout]) as staging:
        target = staging / _CARS_FOLDERS[layout]
        target.mkdir()
        for name in _CARS_ENTRIES[layout]:
            if (base / name).exists():
                _transfer(base / name, target / name, move)
        _move_into_place(target, final, staging)
    return final


def _transfer(source: Path, target: Path, move: bool) -> None:
    """Move (same filesystem, a rename) or copy a file or folder."""
    if move:
        os.replace(source, target)
    elif source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


# --------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; incompatible options end with argparse's usage error (status 2)."""
    parser = argparse.ArgumentParser(
        prog=_CLI, description="Download, verify and install a dataset into the data folder."
    )
    parser.add_argument("dataset", choices=["tiny-imagenet", "stl10", "cars196"])
    parser.add_argument("--data-dir", default="data", help="where datasets live (default: data)")
    parser.add_argument("--source", help="cars196 only: archive (.zip/.tar/.tar.gz) or folder to install")
    parser.add_argument("--url", help="download from this URL instead of the official one")
    parser.add_argument("--md5", help="expected MD5 of the archive; an empty string skips the check")
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive")
    parser.add_argument("--overwrite", action="store_true", help="cars196: replace an installed copy")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    args = parser.parse_args(argv)
    if args.dataset == "cars196" and (args.url or args.md5 is not None):
        parser.error("cars196 has no download URL: pass --source PATH instead of --url/--md5")
    if args.dataset != "cars196" and (args.source or args.overwrite):
        parser.error(f"--source/--overwrite are for cars196 only; {args.dataset} is downloaded (see --url)")
    return args


def _run(args: argparse.Namespace) -> Path:
    """Do what the parsed command line asks; return where the data is."""
    progress = not args.quiet
    if args.dataset == "cars196":
        return prepare_cars196(args.source, args.data_dir, overwrite=args.overwrite, progress=progress)
    download = download_tiny_imagenet if args.dataset == "tiny-imagenet" else download_stl10
    options: dict[str, object] = {"keep_archive": args.keep_archive, "progress": progress}
    if args.url:
        options["url"] = args.url
    if args.md5 is not None:
        options["md5"] = args.md5 or None
    return download(args.data_dir, **options)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 2 (with a one-line message, no traceback) on a data error."""
    args = _parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # no-op if logging is set up
    try:
        path = _run(args)
    except DatasetError as exc:
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing partial was left in place; run the command again", file=sys.stderr)
        return 130
    print(f"{args.dataset} ready in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
