"""Download helper tests, against a local HTTP server on 127.0.0.1 serving small generated archives."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers.data import download as dl
from helpers.data.download import (
    STL10_IMAGE_BYTES,
    Stl10Counts,
    TinyImageNetCounts,
    download_file,
    download_stl10,
    download_tiny_imagenet,
    extract_archive,
    main,
    prepare_cars196,
    verify_cars196,
    verify_stl10,
    verify_tiny_imagenet,
)
from helpers.data.errors import DatasetError

SMALL_TINY = TinyImageNetCounts(classes=3, train_per_class=4, val=6, test=2)
SMALL_STL = Stl10Counts(train=6, test=4, unlabeled=2)
WNIDS = ["n01443537", "n01629819", "n01641577"]
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamps keep the generated archives byte-identical
SHARED_DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------------------------------
# Generated dataset trees ({archive member name: bytes}) and archives


def jpeg_bytes(shade: int) -> bytes:
    """A tiny real JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade % 256, 80, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def tiny_imagenet_files(counts: TinyImageNetCounts = SMALL_TINY) -> dict[str, bytes]:
    """A Tiny ImageNet tree in the official layout, under tiny-imagenet-200/."""
    wnids = WNIDS[: counts.classes]
    files = {
        "wnids.txt": "\n".join(wnids).encode() + b"\n",
        "words.txt": "".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)).encode(),
    }
    for c, wnid in enumerate(wnids):
        boxes = []
        for i in range(counts.train_per_class):
            files[f"train/{wnid}/images/{wnid}_{i}.JPEG"] = jpeg_bytes(40 * c + i)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
    annotations = []
    for i in range(counts.val):
        files[f"val/images/val_{i}.JPEG"] = jpeg_bytes(7 * i)
        annotations.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63\n")
    files["val/val_annotations.txt"] = "".join(annotations).encode()
    for i in range(counts.test):
        files[f"test/images/test_{i}.JPEG"] = jpeg_bytes(11 * i)
    return {f"tiny-imagenet-200/{name}": data for name, data in files.items()}


def stl10_files(counts: Stl10Counts = SMALL_STL) -> dict[str, bytes]:
    """An STL-10 binary tree with correct byte sizes (random pixels), under stl10_binary/."""
    rng = np.random.default_rng(0)

    def images(n: int) -> bytes:
        return rng.integers(0, 256, size=n * STL10_IMAGE_BYTES, dtype=np.uint8).tobytes()

    def labels(n: int) -> bytes:
        return bytes(1 + i % 10 for i in range(n))

    files = {
        "train_X.bin": images(counts.train),
        "train_y.bin": labels(counts.train),
        "test_X.bin": images(counts.test),
        "test_y.bin": labels(counts.test),
        "unlabeled_X.bin": images(counts.unlabeled or 0),
        "class_names.txt": b"airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n",
        "fold_indices.txt": b"0 1 2\n3 4 5\n",
    }
    return {f"stl10_binary/{name}": data for name, data in files.items()}


def mat_bytes(variables: dict) -> bytes:
    """A real MATLAB v5 .mat file."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


def cars_annotations(n: int) -> dict:
    """An 'annotations' struct array like the Cars-196 ones."""
    return {"annotations": [{"fname": f"{i + 1:05d}.jpg", "class": 1 + i % 196} for i in range(n)]}


def cars_metric_files(prefix: str = "") -> dict[str, bytes]:
    """Cars-196, metric-learning release: cars_annos.mat + car_ims/."""
    files = {f"car_ims/{i + 1:06d}.jpg": jpeg_bytes(i) for i in range(3)}
    files["cars_annos.mat"] = mat_bytes(cars_annotations(3))
    return {prefix + name: data for name, data in files.items()}


def cars_devkit_files(prefix: str = "", train: bool = True, test: bool = True) -> dict[str, bytes]:
    """Cars-196, devkit release, with the train and/or test split."""
    files = {"devkit/cars_meta.mat": mat_bytes({"class_names": np.array(["AM General Hummer"], dtype=object)})}
    if train:
        files |= {f"cars_train/{i + 1:05d}.jpg": jpeg_bytes(i) for i in range(2)}
        files["devkit/cars_train_annos.mat"] = mat_bytes(cars_annotations(2))
    if test:
        files |= {f"cars_test/{i + 1:05d}.jpg": jpeg_bytes(50 + i) for i in range(2)}
        files["cars_test_annos_withlabels.mat"] = mat_bytes(cars_annotations(2))
    return {prefix + name: data for name, data in files.items()}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deflated zip of ``files``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, ZIP_DATE), data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], level: int | None = 9, links: dict[str, str] | None = None) -> bytes:
    """A tar of ``files`` plus symlinks {name: target}, gzipped at ``level`` (None: not compressed)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return raw.getvalue() if level is None else gzip.compress(raw.getvalue(), level, mtime=0)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` under ``root``; return ``root``."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def flip_middle_bytes(data: bytes, count: int = 8) -> bytes:
    """``data`` with ``count`` bytes in the middle inverted (a damaged transfer)."""
    damaged = bytearray(data)
    middle = len(damaged) // 2
    for i in range(middle, middle + count):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial entries a failed run must not leave behind."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-") or p.name.endswith(".part"))


@pytest.fixture(scope="module")
def tiny_zip() -> bytes:
    return zip_bytes(tiny_imagenet_files())


@pytest.fixture(scope="module")
def stl_targz() -> bytes:
    return tar_bytes(stl10_files())


# --------------------------------------------------------------------------------------------------
# Local HTTP server


@dataclass
class LocalServer:
    """Files served by the test server, the Content-Length it claims for each, and the paths requested."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    claimed_sizes: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def serve(self, name: str, body: bytes, claimed_size: int | None = None) -> str:
        """Serve ``body`` at /name (claiming ``claimed_size`` bytes if given); return its URL."""
        self.files[f"/{name}"] = body
        if claimed_size is not None:
            self.claimed_sizes[f"/{name}"] = claimed_size
        return f"{self.base_url}/{name}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """A ThreadingHTTPServer on 127.0.0.1 (random port) in a background thread."""
    for variable in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a configured proxy
        monkeypatch.setenv(variable, "127.0.0.1,localhost")
    state = LocalServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(state.claimed_sizes.get(self.path, len(body))))
            self.end_headers()
            self.wfile.write(body)  # HTTP/1.0: the connection closes after this, even if short

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def fetch_tiny(data_dir: Path, url: str, md5: str | None, **options) -> Path:
    """download_tiny_imagenet with the small fixture counts and no progress bar."""
    return download_tiny_imagenet(data_dir, url=url, md5=md5, expected=SMALL_TINY, progress=False, **options)


def fetch_stl(data_dir: Path, url: str, md5: str | None, **options) -> Path:
    """download_stl10 with the small fixture counts and no progress bar."""
    return download_stl10(data_dir, url=url, md5=md5, expected=SMALL_STL, progress=False, **options)


# --------------------------------------------------------------------------------------------------
# Successful downloads and idempotence


def test_tiny_imagenet_is_downloaded_extracted_and_verified(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", tiny_zip)
    data_dir = tmp_path / "data"

    root = fetch_tiny(data_dir, url, md5_of(tiny_zip))

    assert root == data_dir / "tiny-imagenet-200"
    assert (root / "wnids.txt").read_text().split() == WNIDS
    assert len(list((root / "train").glob("*/images/*.JPEG"))) == 12
    assert len(list((root / "val" / "images").glob("*.JPEG"))) == 6
    assert len((root / "val" / "val_annotations.txt").read_text().splitlines()) == 6
    verify_tiny_imagenet(root, SMALL_TINY)
    assert not (data_dir / "tiny-imagenet-200.zip").exists()  # keep_archive=False by default
    assert leftovers(data_dir) == []


def test_stl10_is_downloaded_extracted_and_verified(server, tmp_path, stl_targz):
    url = server.serve("stl10_binary.tar.gz", stl_targz)

    root = fetch_stl(tmp_path, url, md5_of(stl_targz))

    assert root == tmp_path / "stl10_binary"
    assert (root / "train_X.bin").stat().st_size == 6 * STL10_IMAGE_BYTES
    assert (root / "test_y.bin").read_bytes() == bytes([1, 2, 3, 4])
    verify_stl10(root, SMALL_STL)
    assert leftovers(tmp_path) == []


def test_second_call_returns_existing_folder_without_a_request(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", tiny_zip)
    first = fetch_tiny(tmp_path, url, md5_of(tiny_zip))

    second = fetch_tiny(tmp_path, url, md5_of(tiny_zip))

    assert second == first
    assert server.requests == ["/tiny-imagenet-200.zip"]


def test_kept_archive_is_reused_without_a_request(server, tmp_path, stl_targz):
    url = server.serve("stl10_binary.tar.gz", stl_targz)
    root = fetch_stl(tmp_path, url, md5_of(stl_targz), keep_archive=True)
    assert (tmp_path / "stl10_binary.tar.gz").read_bytes() == stl_targz
    shutil.rmtree(root)

    fetch_stl(tmp_path, url, md5_of(stl_targz), keep_archive=True)

    verify_stl10(root, SMALL_STL)
    assert len(server.requests) == 1


def test_incomplete_existing_folder_is_downloaded_again(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", tiny_zip)
    root = fetch_tiny(tmp_path, url, md5_of(tiny_zip))
    (root / "val" / "images" / "val_0.JPEG").unlink()

    fetch_tiny(tmp_path, url, md5_of(tiny_zip))

    assert (root / "val" / "images" / "val_0.JPEG").is_file()
    assert len(server.requests) == 2
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Failed downloads leave nothing that looks complete


def assert_nothing_installed(data_dir: Path, folder: str, archive: str) -> None:
    assert not (data_dir / folder).exists()
    assert not (data_dir / archive).exists()
    assert leftovers(data_dir) == []


def test_connection_closed_before_content_length_raises(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", tiny_zip, claimed_size=len(tiny_zip) + 5000)

    with pytest.raises(DatasetError, match="stopped early") as error:
        fetch_tiny(tmp_path, url, md5=None)

    assert url in str(error.value) and str(tmp_path / "tiny-imagenet-200.zip") in str(error.value)
    assert_nothing_installed(tmp_path, "tiny-imagenet-200", "tiny-imagenet-200.zip")


def test_half_a_file_fails_the_md5_of_the_whole_file(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", tiny_zip[: len(tiny_zip) // 2])

    with pytest.raises(DatasetError, match="has MD5"):
        fetch_tiny(tmp_path, url, md5_of(tiny_zip))

    assert_nothing_installed(tmp_path, "tiny-imagenet-200", "tiny-imagenet-200.zip")


def test_wrong_md5_raises_and_names_both_checksums(server, tmp_path, stl_targz):
    url = server.serve("stl10_binary.tar.gz", stl_targz)

    with pytest.raises(DatasetError, match="0" * 32) as error:
        fetch_stl(tmp_path, url, md5="0" * 32)

    assert md5_of(stl_targz) in str(error.value)
    assert_nothing_installed(tmp_path, "stl10_binary", "stl10_binary.tar.gz")


def test_http_404_gives_a_clear_error(server, tmp_path):
    url = f"{server.base_url}/missing.zip"

    with pytest.raises(DatasetError, match="HTTP 404") as error:
        fetch_tiny(tmp_path, url, md5=None)

    assert url in str(error.value)
    assert_nothing_installed(tmp_path, "tiny-imagenet-200", "missing.zip")


def test_unreachable_server_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    idle = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = idle.server_address[1]
    idle.server_close()  # nothing listens on this port any more

    with pytest.raises(DatasetError, match="Could not download"):
        download_file(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", timeout=5)

    assert leftovers(tmp_path) == [] and not (tmp_path / "x.zip").exists()


def test_corrupt_zip_without_md5_raises_and_installs_nothing(server, tmp_path, tiny_zip):
    url = server.serve("tiny-imagenet-200.zip", flip_middle_bytes(tiny_zip))

    with pytest.raises(DatasetError, match=r"is corrupt or truncated|is not a readable zip or tar"):
        fetch_tiny(tmp_path, url, md5=None)

    assert_nothing_installed(tmp_path, "tiny-imagenet-200", "tiny-imagenet-200.zip")


def test_corrupt_tar_gz_without_md5_raises_and_installs_nothing(server, tmp_path):
    # gzip level 0 stores the pixels as they are: the damage is visible only to gzip's final CRC check.
    url = server.serve("stl10_binary.tar.gz", flip_middle_bytes(tar_bytes(stl10_files(), level=0)))

    with pytest.raises(DatasetError, match="is corrupt or truncated"):
        fetch_stl(tmp_path, url, md5=None)

    assert_nothing_installed(tmp_path, "stl10_binary", "stl10_binary.tar.gz")


def test_archive_with_too_few_images_is_not_installed(server, tmp_path):
    short = zip_bytes(tiny_imagenet_files(TinyImageNetCounts(classes=3, train_per_class=3, val=6, test=2)))
    url = server.serve("tiny-imagenet-200.zip", short)

    with pytest.raises(DatasetError, match="holds 3 images, expected 4"):
        fetch_tiny(tmp_path, url, md5=None)

    assert_nothing_installed(tmp_path, "tiny-imagenet-200", "tiny-imagenet-200.zip")


def test_download_file_reuses_a_matching_file(server, tmp_path):
    url = server.serve("file.bin", b"payload")
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"payload")

    assert download_file(url, dest, md5=md5_of(b"payload"), expected_size=7) == dest
    assert server.requests == []


def test_download_file_replaces_a_mismatching_file(server, tmp_path):
    url = server.serve("file.bin", b"payload")
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")

    download_file(url, dest, md5=md5_of(b"payload"))

    assert dest.read_bytes() == b"payload" and len(server.requests) == 1


def test_download_file_checks_expected_size(server, tmp_path):
    url = server.serve("file.bin", b"payload")

    with pytest.raises(DatasetError, match="expected 100"):
        download_file(url, tmp_path / "file.bin", expected_size=100)

    assert list(tmp_path.iterdir()) == []


def test_download_file_refuses_when_disk_is_too_small(server, tmp_path, monkeypatch):
    url = server.serve("file.bin", b"payload")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))

    with pytest.raises(DatasetError, match="Not enough disk space"):
        download_file(url, tmp_path / "file.bin")

    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# extract_archive


@pytest.mark.parametrize(
    "archive_name, archive",
    [
        ("dotdot.zip", zip_bytes({"top/ok.txt": b"ok", "../evil.txt": b"evil"})),
        ("absolute.zip", zip_bytes({"top/ok.txt": b"ok", "/tmp/evil.txt": b"evil"})),
        ("dotdot.tar.gz", tar_bytes({"top/ok.txt": b"ok", "top/../../evil.txt": b"evil"})),
        ("symlink.tar", tar_bytes({"top/ok.txt": b"ok"}, level=None, links={"top/link": "../../.."})),
    ],
)
def test_unsafe_members_are_refused(tmp_path, archive_name, archive):
    path = tmp_path / archive_name
    path.write_bytes(archive)
    dest_dir = tmp_path / "out" / "data"

    with pytest.raises(DatasetError, match="is unsafe"):
        extract_archive(path, dest_dir, "top")

    assert not (dest_dir / "top").exists()
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert leftovers(dest_dir) == []


@pytest.mark.parametrize("packer", [zip_bytes, tar_bytes], ids=["zip", "tar.gz"])
def test_extract_archive_replaces_an_existing_folder(tmp_path, packer):
    archive = tmp_path / "archive"
    archive.write_bytes(packer({"top/a.txt": b"new", "top/sub/b.txt": b"b"}))
    write_tree(tmp_path / "data" / "top", {"old.txt": b"old"})

    top = extract_archive(archive, tmp_path / "data", "top")

    assert top == tmp_path / "data" / "top"
    assert sorted(p.relative_to(top).as_posix() for p in top.rglob("*.txt")) == ["a.txt", "sub/b.txt"]
    assert leftovers(tmp_path / "data") == []


def test_archive_without_the_expected_top_folder_is_refused(tmp_path):
    archive = tmp_path / "other.zip"
    archive.write_bytes(zip_bytes({"something-else/a.txt": b"a"}))

    with pytest.raises(DatasetError, match="no top-level folder top/"):
        extract_archive(archive, tmp_path / "data", "top")

    assert list((tmp_path / "data").iterdir()) == []


def test_not_an_archive_is_refused(tmp_path):
    archive = tmp_path / "notes.zip"
    archive.write_bytes(b"this is not an archive" * 100)

    with pytest.raises(DatasetError, match="not a readable zip or tar"):
        extract_archive(archive, tmp_path / "data", "top")


def test_interrupted_extraction_leaves_the_old_folder_and_no_temporary_one(tmp_path, monkeypatch, tiny_zip):
    archive = tmp_path / "tiny.zip"
    archive.write_bytes(tiny_zip)
    data_dir = tmp_path / "data"
    write_tree(data_dir / "tiny-imagenet-200", {"old.txt": b"old"})
    real_extract, calls = zipfile.ZipFile.extract, []

    def extract_then_interrupt(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_interrupt)

    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, data_dir, "tiny-imagenet-200")

    assert [p.name for p in (data_dir / "tiny-imagenet-200").iterdir()] == ["old.txt"]
    assert leftovers(data_dir) == []


# --------------------------------------------------------------------------------------------------
# Verification


@pytest.fixture
def small_tiny_root(tmp_path) -> Path:
    return write_tree(tmp_path, tiny_imagenet_files()) / "tiny-imagenet-200"


def test_verify_tiny_imagenet_accepts_a_complete_tree(small_tiny_root):
    verify_tiny_imagenet(small_tiny_root, SMALL_TINY)


def test_verify_tiny_imagenet_names_a_missing_class_folder(small_tiny_root):
    shutil.rmtree(small_tiny_root / "train" / WNIDS[1])

    with pytest.raises(DatasetError, match=f"train/{WNIDS[1]}/ is missing") as error:
        verify_tiny_imagenet(small_tiny_root, SMALL_TINY)

    assert str(small_tiny_root) in str(error.value) and "tiny-imagenet" in str(error.value)


def test_verify_tiny_imagenet_reports_wrong_counts(small_tiny_root):
    (small_tiny_root / "val" / "images" / "val_3.JPEG").unlink()
    (small_tiny_root / "train" / WNIDS[0] / f"{WNIDS[0]}_boxes.txt").unlink()

    with pytest.raises(DatasetError) as error:
        verify_tiny_imagenet(small_tiny_root, SMALL_TINY)

    message = str(error.value)
    assert "val/images/ holds 5 images, expected 6" in message
    assert f"{WNIDS[0]}_boxes.txt is missing" in message


def test_verify_tiny_imagenet_with_the_official_counts_rejects_a_small_tree(small_tiny_root):
    with pytest.raises(DatasetError, match=re.escape("wnids.txt lists 3 classes, expected 200")):
        verify_tiny_imagenet(small_tiny_root)


def test_verify_tiny_imagenet_on_a_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="Tiny ImageNet not found at") as error:
        verify_tiny_imagenet(tmp_path / "tiny-imagenet-200", SMALL_TINY)

    assert "python -m helpers.data.download tiny-imagenet" in str(error.value)


def test_verify_stl10_reports_wrong_sizes_and_missing_files(tmp_path):
    root = write_tree(tmp_path, stl10_files()) / "stl10_binary"
    verify_stl10(root, SMALL_STL)
    (root / "train_X.bin").write_bytes(b"\0" * (5 * STL10_IMAGE_BYTES))
    (root / "fold_indices.txt").unlink()

    with pytest.raises(DatasetError) as error:
        verify_stl10(root, SMALL_STL)

    message = str(error.value)
    assert f"train_X.bin has {5 * STL10_IMAGE_BYTES:,} bytes, expected {6 * STL10_IMAGE_BYTES:,}" in message
    assert "fold_indices.txt is missing" in message


def test_verify_stl10_unlabeled_is_optional_only_when_asked(tmp_path):
    root = write_tree(tmp_path, stl10_files()) / "stl10_binary"
    (root / "unlabeled_X.bin").unlink()

    verify_stl10(root, Stl10Counts(train=6, test=4, unlabeled=None))
    with pytest.raises(DatasetError, match=re.escape("unlabeled_X.bin is missing")):
        verify_stl10(root, SMALL_STL)


# --------------------------------------------------------------------------------------------------
# Cars-196 from a folder or an archive, in either layout


def cars_source(tmp_path: Path, files: dict[str, bytes], packaging: str) -> Path:
    """``files`` as a folder, a .zip or a .tar.gz under tmp_path/source."""
    if packaging == "folder":
        return write_tree(tmp_path / "source", files)
    path = tmp_path / f"source.{packaging}"
    path.write_bytes(zip_bytes(files) if packaging == "zip" else tar_bytes(files))
    return path


@pytest.mark.parametrize(
    "layout, wrapper, packaging",
    [
        ("metric_learning", "", "folder"),
        ("devkit", "", "folder"),
        ("devkit", "stanford_cars/", "folder"),
        ("metric_learning", "CARS_196/", "zip"),
        ("devkit", "stanford_cars/", "zip"),
        ("metric_learning", "", "tar.gz"),
        ("devkit", "CARS_196/", "tar.gz"),
    ],
)
def test_prepare_cars196_installs_either_layout(tmp_path, layout, wrapper, packaging):
    files = cars_metric_files(wrapper) if layout == "metric_learning" else cars_devkit_files(wrapper)
    source = cars_source(tmp_path, files, packaging)
    data_dir = tmp_path / "data"

    root = prepare_cars196(source, data_dir, progress=False)

    if layout == "metric_learning":
        assert root == data_dir / "cars196"
        assert len(list((root / "car_ims").glob("*.jpg"))) == 3
        assert "annotations" in scipy.io.loadmat(root / "cars_annos.mat")
    else:
        assert root == data_dir / "stanford_cars"
        assert len(list((root / "cars_train").glob("*.jpg"))) == 2
        assert len(list((root / "cars_test").glob("*.jpg"))) == 2
        assert (root / "devkit" / "cars_train_annos.mat").is_file()
        assert (root / "cars_test_annos_withlabels.mat").is_file()
    assert verify_cars196(root) == layout
    assert leftovers(data_dir) == []
    assert source.exists()  # the user's copy is left alone


def test_prepare_cars196_accepts_only_the_test_split(tmp_path):
    source = cars_source(tmp_path, cars_devkit_files(train=False), "folder")

    root = prepare_cars196(source, tmp_path / "data", progress=False)

    assert not (root / "cars_train").exists() and (root / "cars_test" / "00001.jpg").is_file()


def test_prepare_cars196_accepts_devkit_mat_files_at_the_top_and_ignores_macos_folders(tmp_path):
    files = {name.replace("devkit/", ""): data for name, data in cars_devkit_files("stanford_cars/").items()}
    files["__MACOSX/stanford_cars/._00001.jpg"] = b"resource fork"
    source = cars_source(tmp_path, files, "zip")

    root = prepare_cars196(source, tmp_path / "data", progress=False)

    assert (root / "cars_meta.mat").is_file() and (root / "cars_train_annos.mat").is_file()
    assert verify_cars196(root) == "devkit"


def test_prepare_cars196_joins_car_ims_tgz_with_the_cars_annos_mat_beside_it(tmp_path):
    files = cars_metric_files()
    (tmp_path / "cars_annos.mat").write_bytes(files.pop("cars_annos.mat"))
    (tmp_path / "car_ims.tgz").write_bytes(tar_bytes(files))

    root = prepare_cars196(tmp_path / "car_ims.tgz", tmp_path / "data", progress=False)

    assert verify_cars196(root) == "metric_learning" and (root / "cars_annos.mat").is_file()


def test_prepare_cars196_says_to_check_a_source_that_is_not_an_archive(tmp_path):
    source = tmp_path / "cars_annos.mat"
    source.write_bytes(mat_bytes(cars_annotations(2)))

    with pytest.raises(DatasetError, match="not a readable zip or tar archive") as error:
        prepare_cars196(source, tmp_path / "data")

    assert f"Check that {source} is the Cars-196 archive" in str(error.value)
    assert source.is_file()


def test_prepare_cars196_overwrite_replaces_an_installed_copy(tmp_path):
    data_dir = tmp_path / "data"
    root = prepare_cars196(cars_source(tmp_path, cars_metric_files(), "folder"), data_dir, progress=False)
    files = cars_metric_files()
    files["car_ims/999999.jpg"] = jpeg_bytes(9)
    newer = write_tree(tmp_path / "newer", files)

    assert prepare_cars196(newer, data_dir, progress=False) == root  # installed copy kept
    assert not (root / "car_ims" / "999999.jpg").exists()
    prepare_cars196(newer, data_dir, overwrite=True, progress=False)
    assert (root / "car_ims" / "999999.jpg").is_file()
    assert leftovers(data_dir) == []


@pytest.mark.realdata
def test_prepare_cars196_installs_the_real_devkit_mini_archive(tmp_path):
    archive = SHARED_DATA / "stanford-cars-mini.zip"
    if not archive.is_file():
        pytest.skip(f"real mini archive {archive} not present")

    root = prepare_cars196(archive, tmp_path / "data", progress=False)

    assert root == tmp_path / "data" / "stanford_cars" and verify_cars196(root) == "devkit"
    assert len(list((root / "cars_train").glob("*.jpg"))) == 1960


def test_prepare_cars196_returns_an_installed_copy_without_a_source(tmp_path):
    installed = prepare_cars196(cars_source(tmp_path, cars_metric_files(), "zip"), tmp_path / "data", progress=False)

    assert prepare_cars196(None, tmp_path / "data") == installed


def test_prepare_cars196_names_what_is_missing_and_both_layouts(tmp_path):
    files = cars_metric_files()
    del files["cars_annos.mat"]
    source = cars_source(tmp_path, files, "folder")

    with pytest.raises(DatasetError, match=re.escape("cars_annos.mat is missing")) as error:
        prepare_cars196(source, tmp_path / "data")

    message = str(error.value)
    assert str(source) in message and "devkit" in message and "Kaggle" in message
    assert "cars_test_annos_withlabels.mat" in message
    assert not (tmp_path / "data" / "cars196").exists()


def test_prepare_cars196_refuses_an_unreadable_mat_file(tmp_path):
    files = cars_devkit_files(test=False)
    files["devkit/cars_meta.mat"] = b"not a mat file at all" * 10
    source = cars_source(tmp_path, files, "tar.gz")

    with pytest.raises(DatasetError, match=re.escape("cars_meta.mat is not a readable .mat file")):
        prepare_cars196(source, tmp_path / "data")

    assert not (tmp_path / "data" / "stanford_cars").exists()
    assert leftovers(tmp_path / "data") == []


def test_prepare_cars196_explains_both_layouts_when_nothing_matches(tmp_path):
    source = cars_source(tmp_path, {"photos/a.jpg": jpeg_bytes(1), "readme.txt": b"hi"}, "zip")

    with pytest.raises(DatasetError, match="No Cars-196 layout found") as error:
        prepare_cars196(source, tmp_path / "data")

    message = str(error.value)
    assert "cars_annos.mat + car_ims" in message and "devkit/cars_train_annos.mat" in message


def test_prepare_cars196_without_source_or_installed_copy_explains(tmp_path):
    with pytest.raises(DatasetError, match="Cars-196 not found"):
        prepare_cars196(None, tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_prints_where_the_data_went(server, tmp_path, capsys, monkeypatch, stl_targz):
    url = server.serve("stl10_binary.tar.gz", stl_targz)
    monkeypatch.setattr(dl, "download_stl10", functools.partial(download_stl10, expected=SMALL_STL))

    status = main(["stl10", "--data-dir", str(tmp_path), "--url", url, "--md5", md5_of(stl_targz), "--quiet"])

    assert status == 0
    assert str(tmp_path / "stl10_binary") in capsys.readouterr().out
    verify_stl10(tmp_path / "stl10_binary", SMALL_STL)


def test_cli_error_is_one_line_with_status_2(tmp_path, capsys):
    status = main(["cars196", "--data-dir", str(tmp_path), "--source", str(tmp_path / "nowhere.zip")])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "nowhere.zip" in captured.err


def test_cli_rejects_source_for_a_downloadable_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-imagenet", "--data-dir", str(tmp_path), "--source", "x.zip"])

    assert exit_info.value.code == 2 and "cars196 only" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports the whole helpers.data package (torch)
def test_cli_as_a_module_exits_2_without_traceback(server, tmp_path):
    url = f"{server.base_url}/missing.zip"
    command = [sys.executable, "-m", "helpers.data.download", "tiny-imagenet", "--data-dir", str(tmp_path)]

    result = subprocess.run(
        [*command, "--url", url, "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "no_proxy": "127.0.0.1"},
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "HTTP 404" in error_lines[0] and url in error_lines[0]
