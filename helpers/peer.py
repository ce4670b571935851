"""The peer: the training a user writes in an afternoon, kept plain on purpose.

torchvision's `resnet18` (with a 3x3 stride-1 stem and no max-pool for the "small" stem), a PIL
`Dataset` with torchvision transforms, a `DataLoader` (workers, pinned memory on CUDA), SGD with
Nesterov momentum and OneCycle, label smoothing, a plain fp32 loop that reads `loss.item()` every
step as tutorials do; on CUDA optionally the standard `torch.autocast` loop (bf16, or fp16 with a
`GradScaler`). `helpers.bench` and `helpers.proof` measure the project against it on the same
images, device and budget. Nothing here is used by the project's own training.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from helpers.errors import SettingsError
from helpers.budget import measure_seconds_per_step, plan_steps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PEER_AMP = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class PeerConfig:
    """The peer's recipe: the settings of the issue's plain loop."""

    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, as `SGD(model.parameters(), weight_decay=...)` does
    label_smoothing: float = 0.1
    pct_start: float = 0.1  # OneCycle warm-up fraction
    padding: int = 4
    num_workers: int = 2
    amp: str = "none"  # "none": fp32; "bf16" / "fp16" (with a GradScaler): torch.autocast on CUDA

    def __post_init__(self):
        if self.amp not in PEER_AMP:
            raise SettingsError(f"amp={self.amp!r} is not valid; choose one of {', '.join(PEER_AMP)}")


class PILImages(Dataset):
    """(path, label) pairs read with PIL and converted to RGB, then `transform`."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def peer_transforms(image_size: int, train: bool, padding: int = 4, native: int = 64) -> T.Compose:
    """Resize (when not native), random crop with padding and flip for training; ToTensor, Normalize."""
    steps: list = [T.Resize(image_size)] if image_size != native else []
    if train:
        steps += [T.RandomCrop(image_size, padding=padding), T.RandomHorizontalFlip()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def peer_loader(
    samples, image_size: int, train: bool, cfg: PeerConfig, device: torch.device | str, seed: int = 0
) -> DataLoader:
    """The DataLoader a user writes: shuffled training batches, drop_last, workers, pinned memory on CUDA."""
    dataset = PILImages(samples, peer_transforms(image_size, train, cfg.padding))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else max(cfg.batch_size, 256),
        shuffle=train,
        drop_last=train,
        num_workers=cfg.num_workers,
        pin_memory=torch.device(device).type == "cuda",
        generator=generator,
    )


def peer_resnet18(num_classes: int, stem: str = "imagenet") -> nn.Module:
    """torchvision's resnet18; "small": conv1 3x3 stride 1 and no max-pool (the usual CIFAR/Tiny edit)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if stem == "small":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise SettingsError(f"stem={stem!r} is not valid; choose one of imagenet, small")
    return model


def _autocast(cfg: PeerConfig, device: torch.device):
    enabled = cfg.amp != "none" and device.type == "cuda"
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


class PeerTrainer:
    """One plain training run: optimizer, OneCycle over `total_steps`, loss, optional GradScaler.

    `replan(total)` (used only by budget runs of `peer_train`) changes the run's length while
    torch's OneCycleLR keeps its own `total_steps`: real steps are mapped onto its steps so the
    progress reached is kept and the rest is stretched or squeezed (no jump in LR or momentum).
    Without a replan the mapping is the identity and the loop is exactly the plain one.
    """

    def __init__(self, model: nn.Module, cfg: PeerConfig, device: torch.device | str, total_steps: int):
        self.device = torch.device(device)
        self.cfg = cfg
        self.model = model.to(self.device)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.pct_start
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        self.steps, self.total_steps, self.nominal = 0, total_steps, total_steps
        self.anchor = (0, 0.0)  # (real step, OneCycle step) where the current mapping starts

    def scheduler_step(self, real_step: int) -> int:
        """OneCycleLR's step for a real step (the identity until the first replan)."""
        s0, v0 = self.anchor
        v = v0 + (real_step - s0) * (self.nominal - v0) / max(1, self.total_steps - s0)
        return min(self.nominal - 1, round(v))

    def replan(self, total_steps: int) -> None:
        total_steps = max(total_steps, self.steps)
        self.anchor = (self.steps, float(self.scheduler_step(self.steps)))
        self.total_steps = total_steps

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with _autocast(self.cfg, self.device):
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        if self.steps < self.total_steps:
            self.scheduler.last_epoch = self.scheduler_step(self.steps) - 1
            self.scheduler.step()
        return loss.item()


def peer_train(
    model: nn.Module,
    loader: DataLoader,
    cfg: PeerConfig,
    device: torch.device | str,
    total_steps: int,
    evaluate: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 1,
    budget_s: float = 0.0,
) -> dict:
    """Train for exactly `total_steps` steps (epochs over `loader`, the last one cut short).

    With `budget_s`, `total_steps` is the first plan and the length is corrected at every epoch end
    from the step time measured so far (epoch restarts of the workers included), so the run ends
    on its budget however the machine's speed drifts. `evaluate(model)` runs after every
    `eval_every` epochs and after the last; its time is not counted in `train_seconds`.
    Returns {"train_seconds", "steps", "images", "epochs", "history"}."""
    trainer = PeerTrainer(model, cfg, device, total_steps)
    history, images, train_seconds, epoch = [], 0, 0.0, 0
    while trainer.steps < trainer.total_steps:
        model.train()
        tic = time.perf_counter()
        running_loss, epoch_steps = 0.0, 0
        for x, y in loader:
            running_loss += trainer.step(x, y)
            images += len(y)
            epoch_steps += 1
            if trainer.steps >= trainer.total_steps:
                break
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        train_seconds += time.perf_counter() - tic
        epoch += 1
        if budget_s > 0 and trainer.steps < trainer.total_steps:
            trainer.replan(
                trainer.steps
                + plan_steps(budget_s, train_seconds / trainer.steps, train_seconds, margin=0.99, minimum=0)
            )
        record = {
            "epoch": epoch,
            "steps": trainer.steps,
            "train_seconds": train_seconds,
            "train_loss": running_loss / max(1, epoch_steps),
        }
        if evaluate is not None and (epoch % eval_every == 0 or trainer.steps >= trainer.total_steps):
            model.eval()
            record.update(evaluate(model))
        history.append(record)
    return {
        "train_seconds": train_seconds,
        "steps": trainer.steps,
        "images": images,
        "epochs": images / max(1, len(loader.dataset)),
        "history": history,
    }


@torch.no_grad()
def peer_evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | str, cfg: PeerConfig | None = None
) -> dict:
    """top1 and top5 accuracy of `model` over `loader`."""
    device = torch.device(device)
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(cfg or PeerConfig(), device):
            logits = model(x)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(1).sum().item()
        total += len(y)
    return {"top1": correct1 / max(1, total), "top5": correct5 / max(1, total)}


def measure_peer_step(
    model: nn.Module,
    loader: DataLoader,
    cfg: PeerConfig,
    device: torch.device | str,
    warmup: int = 5,
    steps: int = 15,
    max_seconds: float = 0.0,
) -> float:
    """Seconds per training step of the peer loop (data loading, and the workers' start at every
    epoch, included), on a copy of `model`; `max_seconds` as in `measure_seconds_per_step`."""
    trainer = PeerTrainer(copy.deepcopy(model), cfg, device, warmup + steps + 1)
    trainer.model.train()
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())  # epoch after epoch
    return measure_seconds_per_step(lambda: trainer.step(*next(batches)), warmup, steps, device, max_seconds)
