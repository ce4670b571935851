"""A fully connected classifier on flattened images, built to be pretrained layer by layer (E2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

DEFAULT_HIDDEN = (1024, 1200, 728, 512, 128)


class MLP(nn.Module):
    """(B, in_dim) -> hidden Linear + ReLU layers (sizes `hidden`) -> Linear -> (B, num_classes) logits.

    `encode(x, depth)` is the code after the first `depth` hidden layers; `layers[i]` is the i-th
    hidden Linear (what greedy pretraining trains one at a time). Same timm-style interface as the
    CNNs: forward_features (the last hidden code), forward_head, num_features.
    """

    def __init__(
        self, in_dim: int = 96 * 96, hidden: Sequence[int] = DEFAULT_HIDDEN, num_classes: int = 10, dropout: float = 0.0
    ):
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one layer size")
        sizes = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden[-1], num_classes)
        self.in_dim, self.hidden, self.num_classes = in_dim, tuple(hidden), num_classes
        self.num_features = hidden[-1]

    def encode(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(B, in_dim) -> (B, hidden[depth - 1]): the code after `depth` hidden layers (all by default)."""
        for layer in self.layers[: len(self.layers) if depth is None else depth]:
            x = self.act(layer(x))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
