"""The peer loop of the benchmark and the proof: plain PIL + torchvision + fp32, but it must be correct."""

import numpy as np
import pytest
import torch
import torchvision

from helpers.data import TinyImageNet
from helpers.peer import PeerConfig, PILImages, measure_peer_step, peer_evaluate, peer_loader, peer_resnet18, peer_train, peer_transforms


def test_pil_dataset_reads_rgb_and_labels(tiny_root):
    samples = TinyImageNet(tiny_root, "train").samples
    ds = PILImages(samples, peer_transforms(32, train=False))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == samples[0][1]
    # grayscale files come back as three channels too
    assert all(ds[i][0].shape[0] == 3 for i in range(len(ds)))


def test_peer_models_match_torchvision():
    tv = torchvision.models.resnet18(num_classes=10)
    big = peer_resnet18(10, "imagenet")
    small = peer_resnet18(10, "small")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) == count(tv)
    assert count(small) == count(tv) - 64 * 3 * (49 - 9)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="stem"):
        peer_resnet18(10, "tiny")


def test_peer_evaluate_equals_a_loop_reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 7)
    images, labels = torch.randn(50, 12), torch.randint(0, 7, (50,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    got = peer_evaluate(model, loader, "cpu")
    logits = model(images).detach().double()
    top1 = top5 = 0
    for row, y in zip(logits, labels):
        ranked = sorted(range(7), key=lambda c: -row[c].item())
        top1 += ranked[0] == y.item()
        top5 += y.item() in ranked[:5]
    assert got == {"top1": top1 / 50, "top5": top5 / 50}


def test_peer_train_runs_exactly_the_planned_steps_and_learns(tiny_root):
    samples = TinyImageNet(tiny_root, "train").samples
    cfg = PeerConfig(batch_size=12, lr=0.05, num_workers=0)
    loader = peer_loader(samples, 16, True, cfg, "cpu", seed=0)
    torch.manual_seed(0)
    model = peer_resnet18(6, "small")
    seconds = measure_peer_step(model, loader, cfg, "cpu", warmup=1, steps=2)
    assert seconds > 0
    evals = []
    result = peer_train(model, loader, cfg, "cpu", total_steps=40, evaluate=lambda m: evals.append(1) or {"top1": 0.0}, eval_every=2)
    assert result["steps"] == 40 and result["images"] == 40 * 12
    assert len(loader) == 6 and [h["steps"] for h in result["history"]] == [6, 12, 18, 24, 30, 36, 40]
    assert len(evals) == 4  # epochs 2, 4, 6 and the last
    losses = [h["train_loss"] for h in result["history"]]
    assert np.mean(losses[-2:]) < losses[0]  # it learns the generated classes
    with pytest.raises(ValueError, match="amp"):
        PeerConfig(amp="int8")
