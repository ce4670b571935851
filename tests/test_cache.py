import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.data import CachedTinyImageNet, DatasetError, TinyImageNet, ToUint8Tensor
from helpers.data.cache import decode_all, labels_checksum
from helpers.data.tinyimagenet import IMAGE_SIZE


@pytest.fixture
def tiny_copy(tiny_root, tmp_path) -> Path:
    root = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_root, root)
    return root


def build(root: Path, cache_dir: Path, split: str = "val") -> CachedTinyImageNet:
    return CachedTinyImageNet(root, split, cache_dir=cache_dir, num_workers=0)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def edit_sidecar(ds: CachedTinyImageNet, edit) -> None:
    meta = json.loads(ds.sidecar_path.read_text())
    edit(meta)
    ds.sidecar_path.write_text(json.dumps(meta))


def out_of_range_labels(ds: CachedTinyImageNet) -> None:
    """Labels that pass the checksum (the sidecar is updated to match) but name a class that does not exist."""
    labels = np.load(ds.labels_path)
    labels[3] = len(ds.classes)
    np.save(ds.labels_path, labels)
    edit_sidecar(ds, lambda meta: meta["labels"].update(sha1=labels_checksum(labels)))


DAMAGES = {
    "images truncated": (
        lambda ds: truncate(ds.images_path, ds.images_path.stat().st_size // 2),
        "images_path",
        r"truncated: .* bytes where its header needs",
    ),
    "images header": (lambda ds: overwrite(ds.images_path, 0, b"garbage!"), "images_path", "magic string"),
    "images extra bytes": (
        lambda ds: overwrite(ds.images_path, ds.images_path.stat().st_size, b"\0" * 7),
        "images_path",
        "bytes where its header needs",
    ),
    "labels truncated": (
        lambda ds: truncate(ds.labels_path, ds.labels_path.stat().st_size - 8),
        "labels_path",
        "truncated",
    ),
    "labels modified": (
        lambda ds: overwrite(ds.labels_path, ds.labels_path.stat().st_size - 8, np.int64(5).tobytes()),
        "labels_path",
        "checksum",
    ),
    "labels out of range": (out_of_range_labels, "labels_path", "labels 0..6 outside 0..5"),
    "labels deleted": (lambda ds: ds.labels_path.unlink(), "labels_path", "file missing"),
    "sidecar deleted": (lambda ds: ds.sidecar_path.unlink(), "sidecar_path", "no sidecar"),
    "sidecar garbled": (lambda ds: overwrite(ds.sidecar_path, 5, b"\xff{]"), "sidecar_path", "unreadable sidecar"),
    "sidecar of another source": (
        lambda ds: edit_sidecar(ds, lambda meta: meta.update(fingerprint="0" * 40)),
        "sidecar_path",
        "another source fingerprint",
    ),
    "sidecar of an older version": (
        lambda ds: ds.sidecar_path.write_text('{"root": "x", "split": "val", "images": 24}'),
        "sidecar_path",
        "another version",
    ),
    "sidecar of another shape": (
        lambda ds: edit_sidecar(ds, lambda meta: meta["images"].update(shape=[24, 32, 32, 3])),
        "images_path",
        "sidecar records",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_cache_is_rebuilt_with_a_one_line_notice(tiny_copy, tmp_path, capsys, damage):
    damage_file, attribute, reason = DAMAGES[damage]
    first = build(tiny_copy, tmp_path / "cache")
    assert first.built and capsys.readouterr().out == ""
    path = getattr(first, attribute)
    damage_file(first)
    del first  # drop the memory map of the file being damaged
    rebuilt = build(tiny_copy, tmp_path / "cache")
    notice = capsys.readouterr().out
    assert re.fullmatch(rf"cache {re.escape(str(path))} is damaged \(.*{reason}.*\); rebuilding it\n", notice), notice
    fresh = build(tiny_copy, tmp_path / "fresh")
    assert (
        rebuilt.built
        and np.array_equal(rebuilt.images, fresh.images)
        and np.array_equal(rebuilt.targets, fresh.targets)
    )
    again = build(tiny_copy, tmp_path / "cache")
    assert not again.built and capsys.readouterr().out == "", "a repaired cache is reused silently"


def test_sidecar_records_what_was_written(tiny_copy, tmp_path):
    ds = build(tiny_copy, tmp_path / "cache")
    meta = json.loads(ds.sidecar_path.read_text())
    assert meta["images"] == {"shape": [24, 64, 64, 3], "dtype": "uint8"}
    assert meta["labels"] == {"count": 24, "sha1": labels_checksum(ds.targets)}
    assert ds.sidecar_path.name.replace(".json", "") in ds.images_path.name
    assert meta["fingerprint"].startswith(ds.sidecar_path.stem.rsplit("-", 1)[1])


def test_stale_temporaries_are_removed_and_live_ones_kept(tiny_copy, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale = cache_dir / f".x.npy.tmp{finished.pid}"
    live = cache_dir / f".x.npy.tmp{os.getpid()}"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    build(tiny_copy, cache_dir)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("size", [(80, 60), (50, 70)])
def test_odd_sized_image_is_cached_as_the_lazy_path_decodes_it(tiny_copy, tmp_path, size):
    lazy = TinyImageNet(tiny_copy, "train", transform=ToUint8Tensor(crop=IMAGE_SIZE))  # as helpers.recognition reads it
    index = 5
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(lazy.samples[index][0], format="JPEG")
    cached = build(tiny_copy, tmp_path / "cache", "train")
    expected = decode_all(lazy)
    assert cached.images.shape == (72, 64, 64, 3) and np.array_equal(cached.images, expected)
    assert np.array_equal(cached.images[index], lazy[index][0].permute(1, 2, 0).numpy())


def test_corrupt_jpeg_while_building_names_the_file(tiny_copy, tmp_path):
    path = Path(TinyImageNet(tiny_copy, "val").samples[2][0])
    path.write_bytes(b"not a jpeg")
    with pytest.raises(
        DatasetError, match=rf"{re.escape(str(path))}.*delete {re.escape(str(tiny_copy))} and it is regenerated"
    ):
        build(tiny_copy, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.json"))


def test_disk_full_while_writing_leaves_no_sidecar_and_no_temporary(tiny_copy, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    save = np.save

    def save_then_fill_the_disk(handle, array, *args, **kwargs):
        if array.ndim == 4:  # the images, written after the labels
            handle.write(b"\x93NUMPY\x01")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fill_the_disk)
    with pytest.raises(OSError) as failure:
        build(tiny_copy, cache_dir)
    assert failure.value.errno == errno.ENOSPC
    assert re.search(
        rf"could not write {re.escape(str(cache_dir))}/tinyimagenet-val-\w+\.images\.npy", str(failure.value)
    )
    left = sorted(p.name for p in cache_dir.iterdir())
    assert len(left) == 1 and left[0].endswith(".labels.npy"), left
    monkeypatch.undo()
    rebuilt = build(tiny_copy, cache_dir)
    assert rebuilt.built and "no sidecar" in capsys.readouterr().out
    assert np.array_equal(rebuilt.images, build(tiny_copy, tmp_path / "fresh").images)
