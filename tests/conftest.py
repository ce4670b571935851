"""Shared fixtures: small generated datasets, and the real mini archives from ../shared/data when present."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers.data import synthetic
from helpers.runinfo import usable_cores


# the threads a test process and the processes it starts use: 2 at most (as CI's machine has), and a
# worker's share of the cores when pytest-xdist runs several (two workers on 2 cores with 2 threads
# each took 795 s instead of 570 s: twice the CPU time, spent waiting on each other's threads)
TEST_THREADS = max(1, min(2, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)

SHARED_DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A small generated Tiny ImageNet: 6 classes x 12 train, 4 val per class, 5 test."""
    out = tmp_path_factory.mktemp("gen")
    params = synthetic.TinyParams(
        num_classes=6, train_per_class=12, val_per_class=4, test_images=5, grayscale_fraction=0.1
    )
    return synthetic.generate("tiny", out, params)


@pytest.fixture(scope="session")
def cars_devkit_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    return synthetic.generate(
        "cars", out, synthetic.CarsParams(layout="devkit", images_per_class=2, min_width=40, max_width=64)
    )


@pytest.fixture(scope="session")
def cars_ml_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    return synthetic.generate(
        "cars", out, synthetic.CarsParams(layout="metric_learning", images_per_class=2, min_width=40, max_width=64)
    )


@pytest.fixture(scope="session")
def stl10_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    return synthetic.generate("stl10", out, synthetic.STL10Params(train_per_class=3, test_per_class=2, unlabeled=4))


def _extract_shared(tmp_path_factory, archive: str, top: str) -> Path:
    path = SHARED_DATA / archive
    if not path.is_file():
        pytest.skip(f"real mini archive {path} not present")
    out = tmp_path_factory.mktemp("real")
    with zipfile.ZipFile(path) as zf:
        zf.extractall(out)
    return out / top


@pytest.fixture(scope="session")
def real_tiny_root(tmp_path_factory) -> Path:
    return _extract_shared(tmp_path_factory, "tiny-imagenet-200-mini.zip", "tiny-imagenet-200")


@pytest.fixture(scope="session")
def real_tiny_10_root(tmp_path_factory) -> Path:
    """The first 10 classes of the real mini Tiny ImageNet (1,000 train, 500 val images), extracted:
    real images in a shape a learning test affords (the decode cache of the whole mini archive's
    30,000 images alone takes about 10 s on 2 cores)."""
    source = SHARED_DATA / "tiny-imagenet-200-mini.zip"
    if not source.is_file():
        pytest.skip(f"real mini archive {source} not present")
    out = tmp_path_factory.mktemp("real10")
    with zipfile.ZipFile(tiny_archive_cut(source, out / "tiny-imagenet-200-mini-10.zip", classes=10)) as zf:
        zf.extractall(out)
    return next(out.rglob("wnids.txt")).parent


@pytest.fixture(scope="session")
def real_cars_root(tmp_path_factory) -> Path:
    return _extract_shared(tmp_path_factory, "stanford-cars-mini.zip", "stanford_cars")


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory) -> Path:
    """The output folder of one smoke pipeline run (all six notebooks and the report) per test run.
    It is the folder nbval's notebook kernels use (see the root conftest), so `--nbval-lax notebooks`
    resumes these finished runs instead of training them again."""
    out = Path(os.environ.get("HELPERS_TEST_OUTPUTS") or tmp_path_factory.mktemp("smoke"))
    command = [sys.executable, "-m", "helpers.pipeline", "--profile", "smoke", "--out", str(out)]
    done = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def tiny_archive_cut(
    source: Path, target: Path, classes: int, train_per_class: int = 0, val_per_class: int = 0
) -> Path:
    """A zip of the real mini Tiny ImageNet archive's first `classes` classes, in the same layout
    (wnids.txt, train/, val/ with its annotations, no test/): real images in a shape tests can afford;
    with `train_per_class` / `val_per_class`, only the first that many images of each class."""
    with zipfile.ZipFile(source) as zin:
        names = zin.namelist()
        wnids_name = next(n for n in names if n.endswith("wnids.txt"))
        top = wnids_name[: -len("wnids.txt")]
        keep = zin.read(wnids_name).decode().split()[:classes]
        annotations_name = next(n for n in names if n.endswith("val/val_annotations.txt"))
        annotations, per_class = [], {}
        for line in zin.read(annotations_name).decode().splitlines():
            wnid = line.split("\t")[1] if line.split("\t")[1:2] else None
            if wnid in keep and (not val_per_class or per_class.get(wnid, 0) < val_per_class):
                per_class[wnid] = per_class.get(wnid, 0) + 1
                annotations.append(line)
        val_images = {line.split("\t")[0] for line in annotations}
        train_images = {}
        with zipfile.ZipFile(target, "w") as zout:
            for name in names:
                rel = name[len(top) :]
                parts = rel.split("/")
                if rel == "wnids.txt":
                    zout.writestr(name, "\n".join(keep) + "\n")
                elif rel == "val/val_annotations.txt":
                    zout.writestr(name, "\n".join(annotations) + "\n")
                elif parts[0] == "train" and len(parts) > 1 and parts[1] not in keep:
                    continue
                elif train_per_class and parts[0] == "train" and parts[-1].endswith(".JPEG"):
                    train_images[parts[1]] = train_images.get(parts[1], 0) + 1
                    if train_images[parts[1]] <= train_per_class:
                        zout.writestr(zin.getinfo(name), zin.read(name))
                elif parts[0] == "val" and parts[1:2] == ["images"] and parts[-1] and parts[-1] not in val_images:
                    continue
                elif parts[0] == "test":
                    continue
                else:
                    zout.writestr(zin.getinfo(name), zin.read(name))
    return target
