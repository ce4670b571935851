"""Faults of real data folders: a read-only data folder (the decode cache goes elsewhere), macOS
`._*` companions beside the images, decompression bombs, and a --data-dir that cannot be used."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from helpers.data import CachedTinyImageNet, Cars196, DatasetError, TinyImageNet, cache, load_rgb
from helpers.data import download as dl
from helpers.data.cache import cache_subfolder, default_cache_dir, resolve_cache_dir
from helpers.data.download import TinyImageNetCounts, main

ROOT_READ_ONLY_SKIP = (
    "running as root, which chmod does not stop, and a read-only bind mount (unshare -m) is not permitted here"
)


@pytest.fixture
def tiny_copy(tiny_root, tmp_path) -> Path:
    """A private copy of the generated Tiny ImageNet in tmp_path/data/ (the session fixture is shared)."""
    root = tmp_path / "data" / "tiny-imagenet-200"
    shutil.copytree(tiny_root, root)
    return root


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    """No $HELPERS_CACHE_DIR, and $XDG_CACHE_HOME in tmp_path (returned): the user cache of these tests."""
    monkeypatch.delenv("HELPERS_CACHE_DIR", raising=False)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    return xdg


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: ")]


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("tinyimagenet-*")) if folder.is_dir() else []


# --------------------------------------------------------------------------------------------------
# A read-only folder, really: chmod for a normal user; for root (whom chmod does not stop) a
# read-only bind mount in a private mount namespace. The command runs in a fresh interpreter.


def can_write(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def bind_read_only_command(folder: Path) -> list[str]:
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"',
        str(folder),
    ]


@contextmanager
def read_only(folder: Path):
    """Yield the command prefix that runs a command with `folder` read-only; skip where that cannot be had."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            if can_write(folder):
                pytest.skip(f"{folder} stays writable after chmod 0o555 (this user bypasses file permissions)")
            yield []
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("unshare") is None:
        pytest.skip(ROOT_READ_ONLY_SKIP)
    probe = subprocess.run(
        [*bind_read_only_command(folder), "sh", "-c", '! touch "$0/.probe" 2>/dev/null', str(folder)],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(ROOT_READ_ONLY_SKIP)
    yield bind_read_only_command(folder)


def run_python(prefix: list[str], code: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )


BUILD_BOTH_SPLITS = """
import json, sys
from helpers.data import CachedTinyImageNet
built = [CachedTinyImageNet(sys.argv[1], split, num_workers=0) for split in ("val", "train")]
print(json.dumps([[str(ds.images_path), len(ds), int(ds.images.sum())] for ds in built]))
"""


@pytest.mark.slow  # a fresh interpreter imports torch
def test_read_only_data_folder_puts_the_cache_in_the_user_cache_with_one_notice(tiny_copy, cache_env, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_env), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HELPERS_CACHE_DIR", None)
    with read_only(tiny_copy.parent) as prefix:
        result = run_python(prefix, BUILD_BOTH_SPLITS, str(tiny_copy), env=env)
    assert result.returncode == 0, result.stderr
    expected = cache_env / "helpers" / cache_subfolder(tiny_copy)
    built = json.loads(result.stdout)
    assert [Path(path).parent for path, _, _ in built] == [expected, expected]
    assert len(cache_files(expected)) == 6, "images, labels and sidecar of both splits"
    assert not default_cache_dir(tiny_copy).exists()
    lines = notes(result.stderr)
    assert (
        len(lines) == 1 and "read-only" in lines[0] and str(tiny_copy.parent) in lines[0] and str(expected) in lines[0]
    ), result.stderr
    reference = [
        CachedTinyImageNet(tiny_copy, split, cache_dir=tmp_path / "ref", num_workers=0) for split in ("val", "train")
    ]
    assert [[n, s] for _, n, s in built] == [[len(ds), int(ds.images.sum())] for ds in reference]


def probe_refusing(*refused: Path):
    """The real writability probe, except that it reports `refused` folders as read-only."""
    real = cache.is_writable_dir

    def probe(folder: Path) -> bool:
        return False if Path(folder) in refused else real(folder)

    return probe


def test_unwritable_data_folder_falls_back_to_the_user_cache(tiny_copy, cache_env, monkeypatch, capsys):
    beside = default_cache_dir(tiny_copy)
    monkeypatch.setattr(cache, "is_writable_dir", probe_refusing(beside))
    val = CachedTinyImageNet(tiny_copy, "val", num_workers=0)
    train = CachedTinyImageNet(tiny_copy, "train", num_workers=0)
    expected = cache_env / "helpers" / cache_subfolder(tiny_copy)
    assert val.images_path.parent == train.images_path.parent == expected and val.built and train.built
    assert len(cache_files(expected)) == 6 and not beside.exists()
    lines = notes(capsys.readouterr().err)
    assert lines == [
        f"note: the data folder {tiny_copy.parent} is read-only, so the decode cache of tiny-imagenet-200 goes to {expected} (set HELPERS_CACHE_DIR to choose the place)"
    ]
    assert not CachedTinyImageNet(tiny_copy, "val", num_workers=0).built, "the fallback cache is reused"


def test_home_cache_without_xdg(tiny_copy, monkeypatch):
    monkeypatch.delenv("HELPERS_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tiny_copy.parent.parent / "home"))
    monkeypatch.setattr(cache, "is_writable_dir", probe_refusing(default_cache_dir(tiny_copy)))
    assert resolve_cache_dir(tiny_copy) == tiny_copy.parent.parent / "home" / ".cache" / "helpers" / cache_subfolder(
        tiny_copy
    )


def test_no_writable_cache_folder_is_one_line_naming_both_and_the_variable(tiny_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("HELPERS_CACHE_DIR", raising=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the user cache should be")  # mkdir below it fails, for root too
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    beside = default_cache_dir(tiny_copy)
    monkeypatch.setattr(cache, "is_writable_dir", probe_refusing(beside))
    with pytest.raises(DatasetError) as failure:
        CachedTinyImageNet(tiny_copy, "val", num_workers=0)
    message = str(failure.value)
    assert (
        "\n" not in message
        and str(beside) in message
        and str(blocker / "helpers") in message
        and "HELPERS_CACHE_DIR" in message
    )


def test_writable_data_folder_keeps_the_cache_beside_the_data(tiny_copy, cache_env, capsys):
    ds = CachedTinyImageNet(tiny_copy, "val", num_workers=0)
    assert ds.images_path.parent == tiny_copy.parent / "tiny-imagenet-200-cache"
    assert not cache_env.exists() and notes(capsys.readouterr().err) == []
    assert not list(ds.images_path.parent.glob(".write-test-*")), "the probe file is removed"


def test_helpers_cache_dir_relative_to_the_working_directory_keeps_datasets_apart(
    tiny_root, tmp_path, monkeypatch, capsys
):
    first, second = tmp_path / "a" / "tiny-imagenet-200", tmp_path / "b" / "tiny-imagenet-200"
    shutil.copytree(tiny_root, first)
    shutil.copytree(tiny_root, second)
    (second / "val" / "val_annotations.txt").write_text(
        "\n".join((second / "val" / "val_annotations.txt").read_text().splitlines()[:10])
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HELPERS_CACHE_DIR", "caches")
    a, b = (CachedTinyImageNet(root, "val", num_workers=0) for root in (first, second))
    assert a.images_path.parent == tmp_path / "caches" / cache_subfolder(first)
    assert b.images_path.parent == tmp_path / "caches" / cache_subfolder(second)
    assert a.images_path.parent != b.images_path.parent and (len(a), len(b)) == (24, 10)
    assert re.fullmatch(r"tiny-imagenet-200-[0-9a-f]{10}", a.images_path.parent.name)
    assert not default_cache_dir(first).exists() and notes(capsys.readouterr().err) == []
    assert (
        CachedTinyImageNet(first, "val", cache_dir=tmp_path / "explicit").images_path.parent == tmp_path / "explicit"
    ), "the argument wins"


def test_helpers_cache_dir_that_cannot_be_created_is_one_line(tiny_copy, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("HELPERS_CACHE_DIR", str(blocker / "caches"))
    with pytest.raises(
        DatasetError, match=rf"^Cannot create the cache folder {re.escape(str(blocker / 'caches'))}/.*HELPERS_CACHE_DIR"
    ):
        CachedTinyImageNet(tiny_copy, "val", num_workers=0)


# --------------------------------------------------------------------------------------------------
# macOS `._*` companions and .DS_Store beside real images

JUNK = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the AppleDouble header a Mac writes


def add_macos_companions(folder: Path, pattern: str) -> int:
    images = sorted(folder.glob(pattern))
    for image in images:
        (folder / f"._{image.name}").write_bytes(JUNK)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return len(images)


def test_tiny_imagenet_ignores_macos_companions(tiny_copy, tmp_path):
    before = {split: TinyImageNet(tiny_copy, split).samples for split in ("train", "val", "test")}
    problems = dl._tiny_imagenet_problems(tiny_copy, TinyImageNetCounts(classes=6, train_per_class=12, val=24, test=5))
    folders = [tiny_copy / "train" / w / "images" for w in (tiny_copy / "wnids.txt").read_text().split()]
    added = sum(
        add_macos_companions(folder, "*.JPEG")
        for folder in [*folders, tiny_copy / "val" / "images", tiny_copy / "test" / "images"]
    )
    assert added == 6 * 12 + 24 + 5
    for split, samples in before.items():
        ds = TinyImageNet(tiny_copy, split)
        assert ds.samples == samples
        assert all(ds[i][0].size == (64, 64) for i in range(len(ds)))
    assert CachedTinyImageNet(tiny_copy, "train", cache_dir=tmp_path / "cache", num_workers=0).images.shape == (
        72,
        64,
        64,
        3,
    )
    assert (
        dl._tiny_imagenet_problems(tiny_copy, TinyImageNetCounts(classes=6, train_per_class=12, val=24, test=5))
        == problems
    )


def test_cars196_ignores_macos_companions(cars_devkit_root, tmp_path):
    root = tmp_path / "stanford_cars"
    shutil.copytree(cars_devkit_root, root)
    before = {split: Cars196(root, split).samples for split in ("train", "test")}
    for folder in ("cars_train", "cars_test"):
        assert add_macos_companions(root / folder, "*.jpg") > 0
    assert dl._count_images(root / "cars_train") == len(list((root / "cars_train").glob("[!.]*.jpg")))
    assert dl.verify_cars196(root) == "devkit"
    for split, samples in before.items():
        ds = Cars196(root, split)
        assert ds.samples == samples and ds[0][0].mode == "RGB" and ds[len(ds) - 1][0].mode == "RGB"


# --------------------------------------------------------------------------------------------------
# Decompression bombs


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A real PNG whose header declares width x height 1-bit pixels (PIL judges the size from it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\0" * ((width + 7) // 8)
    idat = zlib.compress(row * 64)  # the first rows only: PIL refuses at the header, before decoding
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def test_huge_image_is_one_line_naming_the_file_and_its_pixels(tiny_copy):
    ds = TinyImageNet(tiny_copy, "val")
    path = Path(ds.samples[3][0])
    png_declaring(path, 14_000, 14_000)  # 196 megapixels, over PIL's default limit of 2 x 89.5 M
    with pytest.raises(DatasetError) as failure:
        ds[3]
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"Image {path} is too large")
    assert "196,000,000 pixels" in message and "remove it or resize it" in message


def test_pixel_limit_is_enforced_on_a_real_image(tiny_copy, monkeypatch):
    ds = TinyImageNet(tiny_copy, "train")
    path = ds.samples[0][0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4,096 > 2 x 1,000: PIL's DecompressionBombError
    with pytest.raises(
        DatasetError, match=rf"^Image {re.escape(path)} is too large .*4,096 pixels, over PIL's limit of 2,000"
    ):
        ds[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4,096 > 3,000: only a DecompressionBombWarning ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert load_rgb(path).size == (64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # ... unless warnings are errors
        with pytest.raises(DatasetError, match=r"4,096 pixels, over PIL's limit of 3,000"):
            load_rgb(path)


# --------------------------------------------------------------------------------------------------
# python -m helpers.data.download with a --data-dir it cannot use


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("dataset", ["tiny-imagenet", "stl10", "cars196"])
def test_data_dir_that_is_a_file_is_one_line_with_status_2(tmp_path, capsys, dataset):
    data_file = tmp_path / "data"
    data_file.write_text("not a folder")
    source = ["--source", str(tmp_path)] if dataset == "cars196" else []
    assert main([dataset, "--data-dir", str(data_file), *source, "--quiet"]) == 2
    assert f"The data folder {data_file} is a file, not a folder" in one_error_line(capsys)
    assert data_file.read_text() == "not a folder"


def test_data_dir_below_a_file_is_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["tiny-imagenet", "--data-dir", str(tmp_path / "file" / "data"), "--quiet"]) == 2
    assert f"Cannot write to the data folder {tmp_path / 'file' / 'data'}" in one_error_line(capsys)


DOWNLOAD = "import sys; from helpers.data.download import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow  # a fresh interpreter imports the whole helpers.data package (torch)
def test_read_only_data_dir_is_one_line_with_status_2(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with read_only(data_dir) as prefix:
        result = run_python(
            prefix,
            DOWNLOAD,
            "tiny-imagenet",
            "--data-dir",
            str(data_dir),
            "--url",
            "http://127.0.0.1:9/x.zip",
            "--quiet",
            env=env,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"error: Cannot write to the data folder {data_dir} ("
    ), result.stderr
    assert list(data_dir.iterdir()) == []
