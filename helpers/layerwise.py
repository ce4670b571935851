"""Greedy layer-wise autoencoder pretraining of an MLP (E2), trained by the shared engine.

Truly greedy: hidden layer i is trained as a one-hidden-layer autoencoder (encoder = the MLP's
own `layers[i]` + ReLU, decoder = a fresh Linear back to layer i's input) on the codes of the
frozen layers below it; every other layer is frozen (requires_grad=False) while it trains. Then
the whole stack plus the classifier is fine-tuned with cross-entropy (helpers.experiment's
`train_classifier`). The configuration's "pretrain" and "train" stages give each its FitConfig.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.config import LayerwiseConfig
from helpers.data import STL10, stratified_split
from helpers.data.loaders import BatchSource
from helpers.data.transforms import FlatGray
from helpers.engine import FitResult
from helpers.experiment import (
    ClassificationData,
    batch_source,
    data_fingerprint,
    fit_stage,
    locate_data,
    resolve_data_path,
)
from helpers.models import MLP


class LayerReconstruction(nn.Module):
    """Objective of one greedy step: reconstruct layer i's input from its code.

    below = model.encode(x, i) (frozen, no gradient); code = relu(layers[i](below));
    loss = MSE(decoder(code), below). Layer 0 reconstructs pixels in [0, 1] through a sigmoid;
    deeper layers reconstruct non-negative ReLU codes through a ReLU.
    """

    def __init__(self, layer: int, code_dim: int, input_dim: int):
        super().__init__()
        self.layer = layer
        self.decoder = nn.Linear(code_dim, input_dim)
        self.output = torch.sigmoid if layer == 0 else F.relu

    def forward(self, model: MLP, x: torch.Tensor, targets: torch.Tensor):
        with torch.no_grad():
            below = model.encode(x, self.layer)
        code = model.act(model.layers[self.layer](below))
        return F.mse_loss(self.output(self.decoder(code)).float(), below.float()), None


def freeze_all_but(model: MLP, layer: int | None) -> None:
    """requires_grad only for hidden layer `layer` (None: every parameter trainable again)."""
    for i, module in enumerate(model.layers):
        module.requires_grad_(layer is None or i == layer)
    model.fc.requires_grad_(layer is None)


def greedy_pretrain(
    model: MLP, source: BatchSource, augment, cfg: LayerwiseConfig, name: str = "E2_pretrain", progress: bool = True
) -> list[FitResult]:
    """Pretrain model.layers[0], [1], ... one at a time (each a run of the "pretrain" stage of `cfg`);
    returns one FitResult per layer (its history holds the reconstruction loss). Checkpoints per
    layer under out_dir/checkpoints/<name>_layer<i>."""
    results = []
    try:
        for i, layer in enumerate(model.layers):
            freeze_all_but(model, i)
            objective = LayerReconstruction(i, layer.out_features, layer.in_features)
            results.append(
                fit_stage(
                    f"{name}_layer{i}", model, source, augment, cfg, "pretrain", objective=objective, progress=progress
                )
            )
    finally:
        freeze_all_but(model, None)
    return results


def build_stl10(cfg: LayerwiseConfig) -> tuple[ClassificationData, BatchSource]:
    """(ClassificationData, pretraining source): STL-10 train split into train / held-out
    (stratified, seeded), test = the test split; images held as uint8 arrays (on the GPU on CUDA),
    turned into flattened grayscale in [0, 1] on the device (FlatGray). The pretraining source is
    train (+ the unlabeled split when cfg.use_unlabeled)."""
    root, generated = locate_data(cfg.data_dir, "stl10")
    train_set, test = STL10(root, "train"), STL10(root, "test")
    train_idx, held_idx = stratified_split(train_set.targets, cfg.heldout_fraction, cfg.seed)
    train_images = train_set.read_images(np.arange(len(train_set)))
    test_images = test.read_images(np.arange(len(test)))
    path = resolve_data_path("auto", cfg.device)

    def source(images, labels, batch_size, shuffle=False):
        return batch_source(
            path,
            cfg.device,
            labels,
            batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(labels) > batch_size,
            seed=cfg.seed,
            images=images,
        )

    sources = {
        "train": source(train_images[train_idx], train_set.targets[train_idx], cfg.batch_size, shuffle=True),
        "heldout": source(train_images[held_idx], train_set.targets[held_idx], 512),
        "test": source(test_images, test.targets, 512),
    }
    pretrain = sources["train"]
    unlabeled_count = 0
    if cfg.use_unlabeled:
        unlabeled = STL10(root, "unlabeled")
        unlabeled_count = min(len(unlabeled), cfg.unlabeled_limit or len(unlabeled))
        images = np.concatenate([train_images[train_idx], unlabeled.read_images(np.arange(unlabeled_count))])
        labels = np.concatenate([train_set.targets[train_idx], np.full(unlabeled_count, -1)])
        pretrain = batch_source(
            path, cfg.device, labels, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, images=images
        )
    info = {
        "dataset": "STL-10" + (" (generated stand-in)" if generated else ""),
        "root": str(root),
        "train_images": len(train_idx),
        "heldout_images": len(held_idx),
        "test_images": len(test),
        "unlabeled_images_for_pretraining": unlabeled_count,
        "input": "96x96 grayscale, flattened to 9216 values in [0, 1]",
        "fingerprint": data_fingerprint(cfg),
    }
    data = ClassificationData(
        sources["train"], sources["heldout"], sources["test"], FlatGray(cfg.flip), 10, list(train_set.class_names), info
    )
    return data, pretrain


def build_mlp(cfg: LayerwiseConfig, num_classes: int = 10) -> MLP:
    """The E2 MLP, seeded by cfg.seed (the pretrained and the baseline model start from the same init)."""
    torch.manual_seed(cfg.seed)
    return MLP(96 * 96, cfg.hidden, num_classes, dropout=cfg.dropout)
