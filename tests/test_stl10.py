import pickle
import re
import shutil

import numpy as np
import pytest

from helpers.data import STL10, DatasetError
from helpers.data.stl10 import IMAGE_BYTES, SIZE


def write_fixture(root, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (n, 96, 96, 3) the way STL-10 stores them, with explicit loops: plane by plane,
    each plane column by column (column-major)."""
    root.mkdir(parents=True, exist_ok=True)
    raw = bytearray()
    for image in images:
        for channel in range(3):
            for col in range(SIZE):
                for row in range(SIZE):
                    raw.append(int(image[row, col, channel]))
    (root / "train_X.bin").write_bytes(bytes(raw))
    (root / "train_y.bin").write_bytes(bytes((labels + 1).astype(np.uint8)))


def test_orientation_is_not_transposed(tmp_path):
    # pixel (row, col) = (row, col, 200 on an L-shaped mark): any transposition or flip shows
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    image[..., 0], image[..., 1] = rows, cols
    image[5:60, 10:14, 2] = 200  # the vertical stroke of an "L"
    image[56:60, 10:40, 2] = 200  # its foot
    second = np.zeros_like(image)
    second[0, SIZE - 1] = (255, 1, 2)  # top-right corner only
    write_fixture(tmp_path / "stl10_binary", np.stack([image, second]), np.array([3, 9]))
    ds = STL10(tmp_path / "stl10_binary", "train")
    got, label = ds[0]
    assert got.size == (96, 96) and got.mode == "RGB" and label == 3
    assert np.array_equal(np.asarray(got), image)
    corner = np.asarray(ds[1][0])
    assert tuple(corner[0, SIZE - 1]) == (255, 1, 2) and corner.sum() == 258
    assert ds.targets.tolist() == [3, 9]
    assert np.array_equal(ds.read_images([1, 0]), np.stack([second, image]))


def test_generated_splits_and_names(stl10_root):
    train, test, unlabeled = STL10(stl10_root, "train"), STL10(stl10_root, "test"), STL10(stl10_root, "unlabeled")
    assert len(train) == 30 and len(test) == 20 and len(unlabeled) == 4
    assert sorted(set(train.targets.tolist())) == list(range(10)) and set(unlabeled.targets.tolist()) == {-1}
    assert len(train.class_names) == 10 and train.folds is not None and len(train.folds) == 10
    assert np.array_equal(np.sort(np.concatenate(train.folds)), np.arange(30))


def test_memory_mapped_never_copied_whole(stl10_root):
    ds = STL10(stl10_root, "train")
    ds[0]
    assert isinstance(ds.memmap, np.memmap)
    assert len(pickle.dumps(ds)) < IMAGE_BYTES, "pickling for DataLoader workers must not carry the images"


def test_size_not_a_multiple_of_one_image(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    (root / "train_X.bin").write_bytes(b"\0" * (IMAGE_BYTES * 2 + 5))
    (root / "train_y.bin").write_bytes(b"\1\1")
    with pytest.raises(DatasetError, match="not a positive multiple of 27,648.*re-download or re-extract it"):
        STL10(root, "train")


def test_label_count_mismatch_and_missing_files(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    (root / "train_X.bin").write_bytes(b"\0" * IMAGE_BYTES * 2)
    with pytest.raises(DatasetError, match="train_y.bin"):
        STL10(root, "train")
    (root / "train_y.bin").write_bytes(b"\1")
    with pytest.raises(DatasetError, match="1 labels but train_X.bin holds 2.*re-download or re-extract"):
        STL10(root, "train")
    with pytest.raises(DatasetError, match="test_X.bin"):
        STL10(root, "test")


def test_truncated_generated_files_say_to_delete_the_generated_folder(stl10_root, tmp_path):
    root = tmp_path / "stl10_binary"
    shutil.copytree(stl10_root, root)
    advice = re.escape(f"delete {root} and it is regenerated on the next run")
    with open(root / "train_X.bin", "r+b") as handle:
        handle.truncate(IMAGE_BYTES * 2 + 5)
    with pytest.raises(DatasetError, match=f"train_X.bin has .*not a positive multiple.*{advice}"):
        STL10(root, "train")
    with open(root / "train_X.bin", "r+b") as handle:
        handle.truncate(IMAGE_BYTES * 2)
    with pytest.raises(DatasetError, match=f"30 labels but train_X.bin holds 2 images.*{advice}") as failure:
        STL10(root, "train")
    assert "re-download" not in str(failure.value)
