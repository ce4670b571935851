"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU): the several-process
side of the single-vs-distributed comparisons. Rank 0 saves what it found to argv[1]; every
rank's weights, metrics and gradients are gathered so that the test can also check the ranks agree.

The single-process side is computed by the test itself with the same functions (`case_*`)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn

from helpers import distributed
from helpers.data import BatchAugment, TensorBatches
from helpers.engine import FitConfig, _TrainingStep, fit
from helpers.evaluation import ClassificationEvaluator, RetrievalEvaluator, run_split
from helpers.losses import CrossBatchMemory, MultiSimilarityLoss
from helpers.miners import get_miner
from helpers.objectives import MetricObjective


def images_and_labels(n: int, classes: int, seed: int, side: int = 8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8), rng.integers(0, classes, size=n)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )


def initial_weights() -> dict:
    return small_model().state_dict()


def case_train() -> dict:
    """(a) A small model without BatchNorm, 3 epochs of SGD (momentum, weight decay) on global
    batches of 16: its final weights."""
    images, labels = images_and_labels(96, 5, seed=1)
    model = small_model()
    source = TensorBatches(images, labels, batch_size=16, shuffle=True, drop_last=True, seed=3)
    cfg = FitConfig(epochs=3, lr=0.2, monitor="", precision="fp32", channels_last=False, warmup_epochs=0.5, log_every=2)
    result = fit(model, source, BatchAugment(crop="none", flip=False), cfg, progress=False)
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "train_loss": [h["train_loss"] for h in result.history],
    }


def case_batchnorm() -> dict:
    """(b) A model with BatchNorm trained 2 epochs and evaluated after each: its last held-out
    metrics as recorded during training, and its final weights (rank 0's, as checkpointed)."""
    images, labels = images_and_labels(96, 5, seed=6)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).double()
    source = TensorBatches(images, labels, batch_size=16, shuffle=True, drop_last=True, seed=3)
    heldout = TensorBatches(images[:37], labels[:37], batch_size=8)
    augment = BatchAugment(crop="none", flip=False)
    cfg = FitConfig(epochs=2, lr=0.2, monitor="", precision="fp32", channels_last=False)
    evaluate = ClassificationEvaluator({"heldout": heldout}, augment)
    result = fit(nn.Sequential(_Double(), model), source, augment, cfg, progress=False, evaluate=evaluate)
    return {
        "record": {k: v for k, v in result.history[-1].items() if k.startswith("heldout")},
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


class _Double(nn.Module):
    def forward(self, x):
        return x.double()


def batchnorm_model_evaluation(weights: dict) -> dict:
    """The single-process evaluation of case_batchnorm's model with `weights`."""
    images, labels = images_and_labels(96, 5, seed=6)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).double()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return ClassificationEvaluator(
            {"heldout": TensorBatches(images[:37], labels[:37], batch_size=8)}, BatchAugment(crop="none", flip=False)
        )(nn.Sequential(_Double(), model))


def case_evaluate() -> dict:
    """(b) Per-epoch evaluators on 101 items in batches of 16 (uneven last batch), one source
    shuffled: their metrics and the raw outputs of run_split."""
    images, labels = images_and_labels(101, 6, seed=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 12)).double()
    fn = lambda x: net(x.double())  # noqa: E731 (float64: each item's output does not depend on its batch)
    augment = BatchAugment(crop="none", flip=False)
    plain = TensorBatches(images, labels, batch_size=16)
    shuffled = TensorBatches(images, labels, batch_size=16, shuffle=True, seed=5)
    with torch.no_grad():
        return {
            "classification": ClassificationEvaluator({"a": plain, "b": shuffled}, augment)(fn),
            "retrieval": RetrievalEvaluator({"a": plain}, augment)(fn),
            "outputs": run_split(fn, shuffled, augment)[0],
            "labels": run_split(fn, shuffled, augment)[1],
        }


def case_metric_loss() -> dict:
    """(c) The multi-similarity loss with the MS miner, and with a cross-batch memory, on a global
    P x K batch of 16 (8 per rank: whole classes): the gradient of a linear embedding after one
    step, and the memory after three."""
    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.normal(size=(3, 16, 10)))
    labels = torch.arange(4).repeat_interleave(4)  # P=4 classes x K=4, in rank order
    out = {}
    for name, loss in (
        ("ms", MultiSimilarityLoss(miner=get_miner("ms", epsilon=0.1))),
        ("xbm", CrossBatchMemory(MultiSimilarityLoss(miner=get_miner("ms", epsilon=0.1)), 8, memory_size=24)),
    ):
        torch.manual_seed(0)
        model = nn.Linear(10, 8).double()
        objective = MetricObjective(loss)
        step = _TrainingStep(model, objective, model)
        if distributed.is_distributed():
            step = nn.parallel.DistributedDataParallel(step)
        lo, hi = (
            distributed.rank() * 16 // distributed.world_size(),
            (distributed.rank() + 1) * 16 // distributed.world_size(),
        )
        grads, losses = [], []
        for i in range(3):
            model.zero_grad()
            value, _ = step(x[i, lo:hi], labels[lo:hi])
            value.backward()
            grads.append(model.weight.grad.clone())
            losses.append(float(value.detach()))
        out[name] = {"grads": grads, "losses": losses}
        if name == "xbm":
            out[name]["memory"] = loss.memory_embeddings.clone()
            out[name]["memory_labels"] = loss.memory_labels.clone()
    return out


CASES = {"train": case_train, "evaluate": case_evaluate, "batchnorm": case_batchnorm, "metric_loss": case_metric_loss}


def train_and_interrupt(at_step: int, argv: list[str]) -> int:
    """helpers.train with `argv`, where rank 0 sends Ctrl-C (SIGINT) to torchrun, as a terminal
    would, right after its optimizer step number `at_step` (counted over the whole run)."""
    import os
    import signal

    from helpers import engine
    from helpers.train import main as train_main

    step, steps = engine._optimizer_step, [0]

    def counting(run, loss):
        step(run, loss)
        steps[0] += 1
        if steps[0] == at_step and distributed.is_main():
            os.kill(os.getppid(), signal.SIGINT)

    engine._optimizer_step = counting
    return train_main(argv)


def main(path: str) -> None:
    distributed.setup("cpu")
    try:
        found = {name: distributed.gather_objects(case()) for name, case in CASES.items()}
        if distributed.is_main():
            torch.save({"world_size": distributed.world_size(), **found}, path)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    if sys.argv[1] == "--interrupt-at":
        sys.exit(train_and_interrupt(int(sys.argv[2]), sys.argv[3:]))
    main(sys.argv[1])
