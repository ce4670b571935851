"""Objectives: what `fit` minimises, given the model, an augmented batch and its targets.

Each returns (loss, logits or None); logits give the training accuracy (None for pure metric
losses). Their own parameters (e.g. center-loss centers) are trained in their own parameter
group and saved in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.distributed import gather, gather_with_grad
from helpers.losses import CenterLoss


class CrossEntropyObjective(nn.Module):
    """loss = cross-entropy(model(x), targets) with label smoothing; targets are labels or soft (mixup)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), logits


class MetricObjective(nn.Module):
    """loss = metric_loss(model(x), labels) for an embedding model; no logits (no train accuracy).

    Under torchrun the loss (its miner, its cross-batch memory) sees the whole global batch: the
    embeddings of every rank, gathered with the local ones keeping their gradient."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        labels = _hard(targets, "a metric loss")
        return self.loss(gather_with_grad(model(images)), gather(labels)), None


class CenterLossObjective(nn.Module):
    """loss = cross-entropy + weight * center loss on the pooled features (Wen et al., 2016).

    The model must expose forward_features / forward_head; `centers` (num_classes, dim) live here.
    """

    def __init__(self, num_classes: int, dim: int, weight: float = 0.01, label_smoothing: float = 0.0):
        super().__init__()
        self.center = CenterLoss(num_classes, dim)
        self.weight = weight
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        labels = _hard(targets, "center loss")
        features = model.forward_features(images)
        logits = model.forward_head(features)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return ce + self.weight * self.center(features.float(), labels), logits


def _hard(targets: torch.Tensor, what: str) -> torch.Tensor:
    if targets.dim() != 1:
        raise ValueError(f"{what} needs integer class labels: turn mixup/cutmix off (mixup=0, cutmix=0)")
    return targets
