import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers.data import Cars196, DatasetError


def mat_classes(path: Path, name_field: str) -> dict[str, int]:
    annos = scipy.io.loadmat(path)["annotations"].ravel()
    return {str(a[name_field].ravel()[0]): int(a["class"].ravel()[0]) for a in annos}


@pytest.mark.parametrize("fixture", ["cars_devkit_root", "cars_ml_root"])
def test_split_by_class_and_labels(fixture, request):
    root = request.getfixturevalue(fixture)
    train, test = Cars196(root, "train"), Cars196(root, "test")
    assert train.layout == ("devkit" if fixture == "cars_devkit_root" else "metric_learning")
    assert train.classes == list(range(98)) and test.classes == list(range(98, 196))
    assert len(train) == len(test) == 98 * 2  # every generated image, whatever its official split
    assert len(train.class_names) == 196
    if fixture == "cars_ml_root":
        truth = mat_classes(root / "cars_annos.mat", "relative_im_path")
        for path, label in train.samples + test.samples:
            assert label == truth[str(Path(path).relative_to(root))] - 1
    else:
        truth = {
            ("cars_train", k): v for k, v in mat_classes(root / "devkit" / "cars_train_annos.mat", "fname").items()
        }
        truth |= {("cars_test", k): v for k, v in mat_classes(root / "cars_test_annos_withlabels.mat", "fname").items()}
        folders = {Path(p).parent.name for p, _ in train.samples + test.samples}
        assert folders == {"cars_train", "cars_test"}, "the union of both official splits"
        for path, label in train.samples + test.samples:
            assert label == truth[(Path(path).parent.name, Path(path).name)] - 1
    image, label = test[0]
    assert image.mode == "RGB" and 98 <= label <= 195


def test_bbox_crop_uses_one_based_inclusive_boxes(cars_devkit_root):
    full, cropped = Cars196(cars_devkit_root, "train"), Cars196(cars_devkit_root, "train", bbox_crop=True)
    for i in (0, 5, 17):
        x1, y1, x2, y2 = full.boxes[i]
        assert cropped[i][0].size == (x2 - x1 + 1, y2 - y1 + 1)
        assert np.array_equal(np.asarray(cropped[i][0]), np.asarray(full[i][0])[y1 - 1 : y2, x1 - 1 : x2])


def test_grayscale_cars_come_back_rgb(tmp_path):
    from helpers.data import synthetic

    root = synthetic.generate(
        "cars", tmp_path, synthetic.CarsParams(images_per_class=1, min_width=32, max_width=40, grayscale_fraction=1.0)
    )
    ds = Cars196(root, "train")
    assert Image.open(ds.samples[0][0]).mode == "L" and ds[0][0].mode == "RGB"


@pytest.fixture
def devkit_copy(cars_devkit_root, tmp_path) -> Path:
    root = tmp_path / "stanford_cars"
    shutil.copytree(cars_devkit_root, root)
    return root


def test_only_one_official_split_present(devkit_copy):
    shutil.rmtree(devkit_copy / "cars_test")
    ds = Cars196(devkit_copy, "test")
    assert {Path(p).parent.name for p, _ in ds.samples} == {"cars_train"}


def test_missing_images_are_skipped_with_a_warning(devkit_copy):
    before = len(Cars196(devkit_copy, "train"))
    victim = Path(Cars196(devkit_copy, "train").samples[0][0])
    victim.unlink()
    with pytest.warns(UserWarning, match="1 of .* missing"):
        ds = Cars196(devkit_copy, "train")
    assert len(ds) == before - 1


def test_mat_without_expected_fields(devkit_copy):
    scipy.io.savemat(
        devkit_copy / "devkit" / "cars_train_annos.mat",
        {"annotations": np.zeros((1, 2), dtype=[("fname", object), ("bbox_x1", object)])},
    )
    with pytest.raises(DatasetError, match=r"lacks the field\(s\) .*class"):
        Cars196(devkit_copy, "train")


def test_corrupt_mat_is_named(devkit_copy):
    (devkit_copy / "devkit" / "cars_meta.mat").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DatasetError, match="cars_meta.mat"):
        Cars196(devkit_copy, "train")


def test_labels_file_missing_for_a_present_split(devkit_copy):
    (devkit_copy / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match="cars_test_annos_withlabels.mat"):
        Cars196(devkit_copy, "train")


def test_unknown_layout_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="No Cars-196 layout found"):
        Cars196(tmp_path, "train")
    with pytest.raises(DatasetError, match="not found"):
        Cars196(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="auto, metric_learning, devkit"):
        Cars196(tmp_path, "train", layout="kaggle")


@pytest.mark.realdata
def test_real_mini_cars(real_cars_root):
    train, test = Cars196(real_cars_root, "train"), Cars196(real_cars_root, "test")
    assert train.layout == "devkit"
    assert len(train) == len(test) == 980 and train.classes == list(range(98)) and test.classes == list(range(98, 196))
    truth = mat_classes(real_cars_root / "devkit" / "cars_train_annos.mat", "fname")
    assert all(label == truth[Path(p).name] - 1 for p, label in train.samples + test.samples)
    assert train.class_names[0] == "AM General Hummer SUV 2000"
    image, label = test[0]
    assert image.mode == "RGB" and label >= 98
