"""Greedy layer-wise autoencoder pretraining of an MLP (E2), trained by the shared engine.

Truly greedy: hidden layer i is trained as a one-hidden-layer autoencoder (encoder = the MLP's
own `layers[i]` + ReLU, decoder = a fresh Linear back to layer i's input) on the codes of the
frozen layers below it; every other layer is frozen (requires_grad=False) while it trains. Then
the whole stack plus the classifier is fine-tuned with cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.data.loaders import BatchSource
from helpers.engine import FitConfig, FitResult, fit
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


def greedy_pretrain(model: MLP, source: BatchSource, augment, cfg: FitConfig, out_dir: str | Path | None, device="cpu", progress: bool = True, name: str = "E2_pretrain", resume: bool = True) -> list[FitResult]:
    """Pretrain model.layers[0], [1], ... one at a time (each with `cfg`); returns one FitResult per
    layer (its history holds the reconstruction loss). Checkpoints per layer under out_dir/<name>_layer<i>."""
    results = []
    try:
        for i, layer in enumerate(model.layers):
            freeze_all_but(model, i)
            objective = LayerReconstruction(i, layer.out_features, layer.in_features)
            layer_dir = Path(out_dir) / f"{name}_layer{i}" if out_dir is not None else None
            results.append(fit(model, source, augment, cfg, objective=objective, out_dir=layer_dir, device=device, progress=progress, name=f"{name} layer {i}", resume=resume))
    finally:
        freeze_all_but(model, None)
    return results


def stl10_root(cfg) -> Path:
    """The stl10_binary folder for a (resolved) E2 config; the generated one is created on first use."""
    from helpers.data import synthetic
    from helpers.runinfo import generated_data_dir

    data_dir = Path(cfg.data_dir)
    if data_dir == generated_data_dir():
        return synthetic.generate("stl10", data_dir, synthetic.STL10Params(seed=0))
    return data_dir if (data_dir / "train_X.bin").is_file() else data_dir / "stl10_binary"


def build_stl10(cfg):
    """(ClassificationData, pretraining source): STL-10 train split into train / held-out
    (stratified, seeded), test = the test split; images held as uint8 arrays, turned into
    flattened grayscale in [0, 1] on the device (FlatGray). The pretraining source is train
    (+ the unlabeled split when cfg.use_unlabeled)."""
    import numpy as np

    from helpers.data import STL10, TensorBatches, stratified_split, synthetic
    from helpers.data.transforms import FlatGray
    from helpers.recognition import ClassificationData

    root = stl10_root(cfg)
    train, test = STL10(root, "train"), STL10(root, "test")
    train_idx, held_idx = stratified_split(train.targets, cfg.heldout_fraction, cfg.seed)
    train_images = train.read_images(np.arange(len(train)))
    test_images = test.read_images(np.arange(len(test)))
    storage = cfg.device
    common = dict(seed=cfg.seed, device=storage)
    sources = {
        "train": TensorBatches(train_images[train_idx], train.targets[train_idx], cfg.batch_size, shuffle=True, drop_last=len(train_idx) > cfg.batch_size, **common),
        "heldout": TensorBatches(train_images[held_idx], train.targets[held_idx], 512, **common),
        "test": TensorBatches(test_images, test.targets, 512, **common),
    }
    pretrain = sources["train"]
    unlabeled_count = 0
    if cfg.use_unlabeled:
        unlabeled = STL10(root, "unlabeled")
        count = min(len(unlabeled), cfg.unlabeled_limit or len(unlabeled))
        images = np.concatenate([train_images[train_idx], unlabeled.read_images(np.arange(count))])
        labels = np.concatenate([train.targets[train_idx], np.full(count, -1)])
        pretrain = TensorBatches(images, labels, cfg.batch_size, shuffle=True, drop_last=True, **common)
        unlabeled_count = count
    info = {
        "dataset": "STL-10" + (" (generated stand-in)" if (root / synthetic.STAMP).is_file() else ""),
        "root": str(root),
        "train_images": len(train_idx),
        "heldout_images": len(held_idx),
        "test_images": len(test),
        "unlabeled_images_for_pretraining": unlabeled_count,
        "input": "96x96 grayscale, flattened to 9216 values in [0, 1]",
    }
    data = ClassificationData(sources["train"], sources["heldout"], sources["test"], FlatGray(cfg.flip), 10, list(train.class_names), info)
    return data, pretrain


def build_mlp(cfg, num_classes: int = 10) -> MLP:
    """The E2 MLP, seeded by cfg.seed (the pretrained and the baseline model start from the same init)."""
    torch.manual_seed(cfg.seed)
    return MLP(96 * 96, cfg.hidden, num_classes, dropout=cfg.dropout)
