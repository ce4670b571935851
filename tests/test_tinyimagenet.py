import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers.data import CachedTinyImageNet, DatasetError, TinyImageNet, ToUint8Tensor, stratified_split, synthetic


def read_val_annotations(root: Path) -> dict[str, str]:
    return {
        line.split("\t")[0]: line.split("\t")[1]
        for line in (root / "val" / "val_annotations.txt").read_text().splitlines()
    }


def test_train_split_reads_layout(tiny_root):
    ds = TinyImageNet(tiny_root, "train")
    wnids = (tiny_root / "wnids.txt").read_text().split()
    assert ds.classes == wnids
    words = dict(line.split("\t") for line in (tiny_root / "words.txt").read_text().splitlines())
    assert ds.class_names == [words[w] for w in wnids]
    assert len(ds) == 6 * 12
    for path, label in ds.samples:
        assert Path(path).parent.parent.name == wnids[label]
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert isinstance(label, int) and label == 0
    # natural order inside a class: _2 before _10
    names = [Path(p).name for p, l in ds.samples if l == 0]
    assert names[:3] == [f"{wnids[0]}_0.JPEG", f"{wnids[0]}_1.JPEG", f"{wnids[0]}_2.JPEG"] and names[10].endswith(
        "_10.JPEG"
    )


def test_grayscale_images_come_back_rgb(tiny_root):
    ds = TinyImageNet(tiny_root, "train")
    gray = [i for i, (p, _) in enumerate(ds.samples) if Image.open(p).mode == "L"]
    assert gray, "the fixture should hold grayscale JPEGs"
    image, _ = ds[gray[0]]
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all()


def test_val_labels_follow_val_annotations(tiny_root):
    ds = TinyImageNet(tiny_root, "val")
    truth = read_val_annotations(tiny_root)
    assert len(ds) == len(truth) == 6 * 4
    for path, label in ds.samples:
        assert ds.classes[label] == truth[Path(path).name]
    assert sorted(set(ds.targets)) == list(range(6))


def test_test_split_has_no_labels_and_transforms_apply(tiny_root):
    ds = TinyImageNet(tiny_root, "test", transform=ToUint8Tensor(), target_transform=lambda y: y * 10)
    assert len(ds) == 5 and set(ds.targets) == {-1}
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and label == -10


def test_per_item_loading_through_dataloader(tiny_root):
    ds = TinyImageNet(tiny_root, "train", transform=ToUint8Tensor())
    images, labels = next(iter(DataLoader(ds, batch_size=16, shuffle=True, num_workers=2)))
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_bad_split_lists_valid_ones(tiny_root):
    with pytest.raises(ValueError, match="train, val, test"):
        TinyImageNet(tiny_root, "validation")


@pytest.fixture
def tiny_copy(tiny_root, tmp_path) -> Path:
    root = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_root, root)
    return root


def test_missing_folder_error_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=r"not found: .*nowhere.*helpers\.data\.download"):
        TinyImageNet(tmp_path / "nowhere")


def test_missing_val_annotations_is_named(tiny_copy):
    (tiny_copy / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        TinyImageNet(tiny_copy, "val")


def test_missing_class_folder_is_named(tiny_copy):
    wnid = (tiny_copy / "wnids.txt").read_text().split()[2]
    shutil.rmtree(tiny_copy / "train" / wnid)
    with pytest.raises(DatasetError, match=f"1 of 6 class folders are missing.*{wnid}"):
        TinyImageNet(tiny_copy, "train")


def test_missing_wnids_is_named(tiny_copy):
    (tiny_copy / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="wnids.txt"):
        TinyImageNet(tiny_copy, "train")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tiny_copy, damage):
    ds = TinyImageNet(tiny_copy, "train")
    path = Path(ds.samples[3][0])
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError, match=path.name):
        ds[3]


@pytest.mark.parametrize("generated", [True, False])
def test_corrupt_image_advice_fits_generated_or_real_data(tiny_copy, generated):
    if not generated:
        (tiny_copy / synthetic.STAMP).unlink()
    ds = TinyImageNet(tiny_copy, "val")
    path = Path(ds.samples[1][0])
    path.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=re.escape(f"Cannot decode image {path}")) as failure:
        ds[1]
    message = str(failure.value)
    if generated:
        assert f"delete {tiny_copy} and it is regenerated on the next run" in message and "re-download" not in message
    else:
        assert "re-extracting or re-downloading the dataset" in message and "generated" not in message


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = np.repeat(np.arange(10), [40] * 9 + [1])
    train, held = stratified_split(labels, fraction=0.05, seed=3)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    counts = np.bincount(labels[held], minlength=10)
    assert (counts[:9] == 2).all() and counts[9] == 0  # 5 % of 40, and nothing from a 1-image class
    again = stratified_split(labels, fraction=0.05, seed=3)
    other = stratified_split(labels, fraction=0.05, seed=4)
    assert (again[1] == held).all() and not (other[1] == held).all()
    assert len(stratified_split(labels, fraction=0.0)[1]) == 0


def test_cache_matches_per_item_decode_and_is_reused(tiny_copy, tmp_path):
    cache_dir = tmp_path / "cache"
    cached = CachedTinyImageNet(tiny_copy, "val", cache_dir=cache_dir, num_workers=0)
    assert cached.built
    plain = TinyImageNet(tiny_copy, "val")
    assert cached.images.shape == (len(plain), 64, 64, 3) and cached.images.dtype == np.uint8
    assert cached.targets.tolist() == plain.targets
    for i in (0, 7, len(plain) - 1):
        assert np.array_equal(np.asarray(plain[i][0]), cached.images[i])
        assert np.array_equal(np.asarray(cached[i][0]), cached.images[i]) and cached[i][1] == plain.targets[i]
    again = CachedTinyImageNet(tiny_copy, "val", cache_dir=cache_dir)
    assert not again.built and again.images_path == cached.images_path


def test_cache_is_rebuilt_when_the_source_changes(tiny_copy, tmp_path):
    cache_dir = tmp_path / "cache"
    first = CachedTinyImageNet(tiny_copy, "val", cache_dir=cache_dir, num_workers=0)
    path = Path(first.samples[0][0])
    Image.new("RGB", (64, 64), (255, 0, 0)).save(path, format="JPEG")
    os.utime(path, ns=(1, 1))
    second = CachedTinyImageNet(tiny_copy, "val", cache_dir=cache_dir, num_workers=0)
    assert second.built and second.images_path != first.images_path
    assert second.images[0, 10, 10, 0] > 200 and second.images[0, 10, 10, 2] < 60
    assert not first.images_path.exists(), "the stale cache is removed"


@pytest.mark.realdata
def test_real_mini_tiny_imagenet(real_tiny_root):
    train = TinyImageNet(real_tiny_root, "train")
    val = TinyImageNet(real_tiny_root, "val")
    assert len(train.classes) == 200 and len(train) == 20_000 and len(val) == 10_000
    assert np.bincount(train.targets).tolist() == [100] * 200
    truth = read_val_annotations(real_tiny_root)
    assert len(truth) == 10_000
    assert all(val.classes[label] == truth[Path(path).name] for path, label in val.samples)
    assert train.class_names[train.classes.index("n02124075")] == "Egyptian cat"
    image, label = val[123]
    assert image.mode == "RGB" and image.size == (64, 64) and val.classes[label] == truth["val_123.JPEG"]
