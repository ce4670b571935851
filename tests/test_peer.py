"""The peer loop of the benchmark and the proof: plain PIL + torchvision + fp32, but it must be correct."""

import numpy as np
import pytest
import torch
import torchvision

from helpers.data import TinyImageNet
from helpers.peer import (
    PeerConfig,
    PILImages,
    measure_peer_step,
    peer_evaluate,
    peer_loader,
    peer_resnet18,
    peer_train,
    peer_transforms,
)


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
    result = peer_train(
        model, loader, cfg, "cpu", total_steps=40, evaluate=lambda m: evals.append(1) or {"top1": 0.0}, eval_every=2
    )
    assert result["steps"] == 40 and result["images"] == 40 * 12
    assert len(loader) == 6 and [h["steps"] for h in result["history"]] == [6, 12, 18, 24, 30, 36, 40]
    assert len(evals) == 4  # epochs 2, 4, 6 and the last
    losses = [h["train_loss"] for h in result["history"]]
    assert np.mean(losses[-2:]) < losses[0]  # it learns the generated classes
    with pytest.raises(ValueError, match="amp"):
        PeerConfig(amp="int8")


def _lrs(trainer, steps):
    out = []
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    for _ in range(steps):
        out.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.step(x, y)
    return out


def test_peer_schedule_is_torch_onecycle_unless_replanned():
    from helpers.peer import PeerTrainer

    torch.manual_seed(0)
    trainer = PeerTrainer(torch.nn.Linear(3, 2), PeerConfig(), "cpu", total_steps=50)
    got = _lrs(trainer, 50)
    reference_model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=50, pct_start=0.1)
    expected = []
    for i in range(50):  # the loop a user writes: step the scheduler after each optimizer step
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if i < 49:
            scheduler.step()
    assert got == pytest.approx(expected, rel=1e-12)


def test_peer_replan_keeps_the_onecycle_progress():
    from helpers.peer import PeerTrainer

    trainer = PeerTrainer(torch.nn.Linear(3, 2), PeerConfig(), "cpu", total_steps=100)
    before = _lrs(trainer, 40)
    lr_at_40 = trainer.optimizer.param_groups[0]["lr"]
    trainer.replan(60)  # the budget turned out shorter: 20 steps left instead of 60
    assert trainer.optimizer.param_groups[0]["lr"] == lr_at_40
    after = _lrs(trainer, 20)
    assert abs(after[0] - before[-1]) < 0.1 * before[-1]  # no jump
    assert all(b < a for a, b in zip(after, after[1:]))  # still annealing
    assert trainer.optimizer.param_groups[0]["lr"] < 1e-3 * 0.05 * 25 and trainer.steps == 60
