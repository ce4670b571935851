"""Heads on top of pooled backbone features: the classifier and the L2-normalised embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_classifier(in_features: int, num_classes: int) -> nn.Module:
    """Linear(in_features, num_classes), or nn.Identity when num_classes is 0 (features out)."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class EmbeddingHead(nn.Module):
    """Linear + L2 normalisation: (B, in_dim) -> (B, dim) unit vectors (float32, also under autocast)."""

    def __init__(self, in_dim: int, dim: int = 512) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(features).float(), dim=1)


class EmbeddingNet(nn.Module):
    """Backbone (anything with forward_features and num_features) + EmbeddingHead: (B, 3, H, W) -> (B, dim).

    The backbone's classifier is cropped (reset_classifier(0) when it has one) so that no unused
    parameter is left to the optimizer.
    """

    def __init__(self, backbone: nn.Module, dim: int = 512) -> None:
        super().__init__()
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.num_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))
