import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.data import DatasetError, TinyImageNet, ToUint8Tensor, synthetic
from helpers.data.cache import decode_all


def tree_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_deterministic_by_seed(tmp_path):
    params = synthetic.TinyParams(num_classes=3, train_per_class=3, val_per_class=2, test_images=2)
    a = synthetic.generate("tiny", tmp_path / "a", params)
    b = synthetic.generate("tiny", tmp_path / "b", params)
    c = synthetic.generate(
        "tiny",
        tmp_path / "c",
        synthetic.TinyParams(num_classes=3, train_per_class=3, val_per_class=2, test_images=2, seed=1),
    )
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_reuse_regenerate_and_refuse_foreign_folders(tmp_path):
    params = synthetic.STL10Params(train_per_class=1, test_per_class=1)
    root = synthetic.generate("stl10", tmp_path, params)
    stamp = (root / "train_X.bin").stat().st_mtime_ns
    assert synthetic.generate("stl10", tmp_path, params) == root
    assert (root / "train_X.bin").stat().st_mtime_ns == stamp, "identical parameters reuse the data"
    synthetic.generate("stl10", tmp_path, synthetic.STL10Params(train_per_class=2, test_per_class=1))
    assert (root / "train_X.bin").stat().st_size == 20 * 27648, "new parameters regenerate"
    foreign = tmp_path / "other" / "tiny-imagenet-200"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not generated data"):
        synthetic.generate("tiny", tmp_path / "other")
    assert (foreign / "mine.txt").exists()
    assert not list(tmp_path.glob(".tmp-*")), "no temporary folder left behind"


def test_data_another_process_generated_meanwhile_is_kept_not_pulled_from_under_its_readers(tmp_path, monkeypatch):
    """Two notebooks started at once on a fresh machine both generate the same data. The second to
    finish used to remove the first one's folder while that notebook read it; now it keeps it."""
    params = synthetic.STL10Params(train_per_class=1, test_per_class=1)
    writer, params_type = synthetic.WRITERS["stl10"]
    opened = {}

    def racing_writer(tmp, p):  # the other process finishes first, and its reader opens a file
        writer(tmp, p)
        monkeypatch.setitem(synthetic.WRITERS, "stl10", (writer, params_type))
        other = synthetic.generate("stl10", tmp_path, p)
        opened["inode"] = (other / "train_X.bin").stat().st_ino
        monkeypatch.setitem(synthetic.WRITERS, "stl10", (racing_writer, params_type))

    monkeypatch.setitem(synthetic.WRITERS, "stl10", (racing_writer, params_type))
    root = synthetic.generate("stl10", tmp_path, params)
    assert (root / "train_X.bin").stat().st_ino == opened["inode"], "the first process's files stay in place"
    assert not list(tmp_path.glob(".tmp-*")), "no temporary folder left behind"


def test_command_line_prints_a_summary(tmp_path, capsys):
    code = synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--which",
            "tiny,stl10",
            "--tiny-classes",
            "3",
            "--tiny-train-per-class",
            "2",
            "--tiny-val-per-class",
            "1",
            "--stl10-train-per-class",
            "1",
            "--stl10-test-per-class",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Tiny ImageNet layout" in out and "train: 6 images" in out and "STL-10 layout" in out


def test_classes_are_distinct():
    styles = synthetic.class_styles(196, seed=0)
    assert len({(s.shape, s.colour, s.texture) for s in styles}) == 196


def test_a_tiny_model_learns_the_generated_data_far_above_chance(tmp_path):
    torch.manual_seed(0)
    root = synthetic.generate(
        "tiny", tmp_path, synthetic.TinyParams(num_classes=10, train_per_class=30, val_per_class=10, test_images=0)
    )
    prep = ToUint8Tensor(resize=32)
    x_train = (
        torch.from_numpy(decode_all(TinyImageNet(root, "train", transform=prep))).permute(0, 3, 1, 2).float() / 255
    )
    y_train = torch.tensor(TinyImageNet(root, "train").targets)
    x_val = torch.from_numpy(decode_all(TinyImageNet(root, "val", transform=prep))).permute(0, 3, 1, 2).float() / 255
    y_val = torch.tensor(TinyImageNet(root, "val").targets)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for idx in torch.randperm(len(x_train)).split(32):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"held-out accuracy {accuracy:.2f}")
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.2f} (chance 0.10)"
