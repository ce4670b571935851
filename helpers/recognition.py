"""T1-T3 and E1 on Tiny ImageNet: batch sources for a configuration, models by name, the E1 metric
losses, and T3's model selection. Built on the shared layer (helpers.experiment); the notebooks
call these plus that layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from helpers.config import RecognitionConfig, batch_for
from helpers.data import (
    BatchAugment,
    CachedTinyImageNet,
    PKBatchSampler,
    TinyImageNet,
    ToUint8Tensor,
    stratified_split,
    subset_indices,
)
from helpers.data.loaders import BatchSource
from helpers.data.tinyimagenet import IMAGE_SIZE
from helpers.evaluation import NearestClassMeanEvaluator, classification_report
from helpers.experiment import (
    ClassificationData,
    RunSummary,
    T3Selection,
    batch_source,
    data_fingerprint,
    describe_model,
    locate_data,
    resolve_data_path,
    fit_stage,
    train_classifier,
)
from helpers.losses import TripletLoss
from helpers.metrics import topk_accuracy
from helpers.models import CustomCNN, EmbeddingNet, resnet18
from helpers.objectives import CenterLossObjective, MetricObjective
from helpers.runinfo import Runtime
from helpers.errors import SettingsError


def check_subset_fits(cfg: RecognitionConfig, train_labels: np.ndarray, root: Path) -> None:
    """`classes` and `train_per_class` against what the data has; a ValueError that states it."""
    counts = np.bincount(train_labels)
    if cfg.classes > len(counts):
        raise SettingsError(
            f"classes={cfg.classes} is not valid: the data at {root} has {len(counts)} classes; use 1 to {len(counts)} (0 = all)"
        )
    most = counts[: cfg.classes or len(counts)].max()
    if cfg.train_per_class > most:
        raise SettingsError(
            f"train_per_class={cfg.train_per_class} is not valid: the data at {root} has at most {most} training images per class; use 1 to {most} (0 = all)"
        )


def split_indices(train_labels: np.ndarray, test_labels: np.ndarray, cfg: RecognitionConfig) -> dict[str, np.ndarray]:
    """Indices of the train / held-out split of official train and of the test (official val) split,
    after the `classes` and `train_per_class` subsets; fixed by cfg.seed."""
    keep = subset_indices(train_labels, classes=cfg.classes, per_class=cfg.train_per_class)
    test_keep = subset_indices(test_labels, classes=cfg.classes)
    train_rel, held_rel = stratified_split(train_labels[keep], cfg.heldout_fraction, cfg.seed)
    return {"train": keep[train_rel], "heldout": keep[held_rel], "test": test_keep}


def build_tiny_imagenet(cfg: RecognitionConfig) -> ClassificationData:
    """Train / held-out / test batch sources of Tiny ImageNet for a (resolved) `cfg`.

    Held-out = a stratified `heldout_fraction` of train (seeded); test = the official val split.
    data_path "gpu": the decoded uint8 arrays live on the GPU; "cached": in CPU RAM; "lazy": JPEGs
    are decoded per item by DataLoader workers; "auto": gpu on CUDA, else cached.
    """
    root, generated = locate_data(cfg.data_dir, "tiny")
    # checked on the file lists (nothing decoded yet): the subset, and E1's P x K batches on what is left
    train_labels, test_labels = (np.asarray(TinyImageNet(root, split).targets) for split in ("train", "val"))
    check_subset_fits(cfg, train_labels, root)
    splits = split_indices(train_labels, test_labels, cfg)
    if cfg.task == "E1":
        PKBatchSampler(train_labels[splits["train"]], cfg.pk_classes, cfg.pk_images, drop_small_classes=True)
    path = resolve_data_path(cfg.data_path, cfg.device)
    if path == "lazy":
        train_set = TinyImageNet(root, "train", transform=ToUint8Tensor(crop=IMAGE_SIZE))
        test_set = TinyImageNet(root, "val", transform=ToUint8Tensor(crop=IMAGE_SIZE))
    else:
        train_set = CachedTinyImageNet(root, "train", num_workers=cfg.num_workers)
        test_set = CachedTinyImageNet(root, "val", num_workers=cfg.num_workers)
    sources = {}
    train_batch = cfg.batch_size or batch_for(len(splits["train"]))
    for name, idx in splits.items():
        dataset, labels = (train_set, train_labels) if name != "test" else (test_set, test_labels)
        shuffle = name == "train"
        batch_size = train_batch if shuffle else max(train_batch, 256)
        images = None
        if path != "lazy":  # read in sorted order, then put back in idx order
            images = (
                np.asarray(dataset.images[np.sort(idx)])[np.argsort(np.argsort(idx))]
                if len(idx)
                else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            )
        sources[name] = batch_source(
            path,
            cfg.device,
            labels[idx],
            batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(idx) > train_batch,
            seed=cfg.seed,
            images=images,
            dataset=Subset(dataset, idx),
            num_workers=cfg.num_workers,
        )
    num_classes = cfg.classes or len(train_set.classes)
    resize_to = cfg.image_size if cfg.image_size != IMAGE_SIZE else None
    augment = BatchAugment(
        crop=cfg.crop,
        size=cfg.image_size,
        resize_to=resize_to,
        padding=cfg.padding,
        scale=(cfg.rrc_scale_min, 1.0),
        flip=cfg.flip,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        mix_prob=cfg.mix_prob,
        num_classes=num_classes,
    )
    info = {
        "dataset": "Tiny ImageNet" + (" (generated stand-in)" if generated else ""),
        "root": str(root),
        "generated": generated,
        "data_path": path,
        "num_classes": num_classes,
        "train_images": len(splits["train"]),
        "heldout_images": len(splits["heldout"]),
        "test_images": len(splits["test"]),
        "image_size": cfg.image_size,
        "batch_size": train_batch,
        "fingerprint": data_fingerprint(cfg),
    }
    return ClassificationData(
        sources["train"],
        sources["heldout"],
        sources["test"],
        augment,
        num_classes,
        list(train_set.class_names[:num_classes]),
        info,
    )


def build_model(kind: str, cfg: RecognitionConfig, num_classes: int, **options) -> nn.Module:
    """ "custom_cnn" or "resnet18" (options: cubs, cubs_variant), seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    if kind == "custom_cnn":
        return CustomCNN(num_classes, width=cfg.width)
    if kind == "resnet18":
        if options.get("cubs"):
            options.setdefault("cubs_width", cfg.cubs_width or None)
        return resnet18(num_classes, stem=cfg.stem, width=cfg.resnet_width, **options)
    raise SettingsError(f"model kind {kind!r} is not valid; choose one of custom_cnn, resnet18")


def describe_cubs(model: nn.Module, cfg: RecognitionConfig, fashion: str, variant: str) -> dict:
    """What T3's summaries say about a ResNet-18 + CUBS model (`variant` "plain" or "scaled")."""
    return describe_model(model, stem=cfg.stem, cubs=fashion, cubs_variant=variant, cubs_width=cfg.cubs_width or "C")


def reference_source(data: ClassificationData, per_class: int) -> BatchSource:
    """A fixed part of train (at most `per_class` images per class) for nearest-class-mean evaluation."""
    labels = data.train.labels
    keep = subset_indices(labels, per_class=per_class)
    sampler = _FixedBatches([keep[i : i + 256] for i in range(0, len(keep), 256)])
    source = data.train.rebatched(sampler)
    source.num_samples, source.labels = len(keep), labels[keep]
    return source


class _FixedBatches:
    """A batch sampler that always yields the same batches (an evaluation pass over chosen indices)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train_triplet(
    name: str, data: ClassificationData, cfg: RecognitionConfig, progress: bool = True
) -> tuple[nn.Module, RunSummary]:
    """E1 (b): ResNet-18 + an L2-normalised embedding trained with the batch-hard triplet loss on
    P x K batches; classified by the nearest class mean of train embeddings. Returns (net, summary)."""
    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(resnet18(data.num_classes, stem=cfg.stem, width=cfg.resnet_width), cfg.embedding_dim)
    sampler = PKBatchSampler(data.train.labels, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, drop_small_classes=True)
    train_pk = data.train.rebatched(sampler)
    evaluator = NearestClassMeanEvaluator(
        reference_source(data, cfg.ncm_per_class),
        {"heldout": data.heldout, "test": data.test},
        data.augment,
        data.num_classes,
        "euclidean",
        Runtime.of(cfg),
    )
    result = fit_stage(
        name,
        net,
        train_pk,
        data.augment,
        cfg,
        "triplet",
        progress=progress,
        objective=MetricObjective(TripletLoss(cfg.triplet_margin)),
        evaluate=evaluator,
    )
    net.eval()
    predictions = evaluator.predict(net)
    heldout = topk_accuracy(*predictions["heldout"], ks=(1, 5))
    test = classification_report(*predictions["test"], data.class_names, with_loss=False)
    describe = describe_model(
        net,
        stem=cfg.stem,
        embedding_dim=cfg.embedding_dim,
        loss=f"batch-hard triplet (margin {cfg.triplet_margin})",
        classifier="nearest class mean",
    )
    heldout = {"top1": heldout[1], "top5": heldout[5], "loss": None}
    budget_s = cfg.fit_config("triplet").budget_s
    return net, RunSummary.of(name, describe, result, cfg.out_dir, heldout, test, budget_s=budget_s)


def train_center_loss(
    name: str, data: ClassificationData, cfg: RecognitionConfig, progress: bool = True
) -> tuple[nn.Module, RunSummary]:
    """E1 (c): ResNet-18 trained with cross-entropy + center_weight * center loss on the pooled
    512-d (8 x resnet_width) features; the centers have their own learning rate. Returns (model, summary)."""
    model = build_model("resnet18", cfg, data.num_classes)
    objective = CenterLossObjective(data.num_classes, model.num_features, cfg.center_weight, cfg.label_smoothing)
    describe = describe_model(model, stem=cfg.stem, loss=f"cross-entropy + {cfg.center_weight} x center loss")
    return model, train_classifier(
        name, model, data, cfg, describe, progress, stage="center", objective=objective, objective_lr=cfg.center_lr
    )


def select_best(runs: dict[str, RunSummary], key: str = "top1") -> str:
    """The name of the run with the highest held-out `key` (never the test split); ties: first."""
    return max(runs, key=lambda name: runs[name].heldout[key])


def select_t3(runs: dict[str, RunSummary], cfg: RecognitionConfig) -> T3Selection:
    """T3's choice among its CUBS runs (held-out top-1), as T4 and the report read it."""
    best = runs[select_best(runs)]
    return T3Selection(
        criterion="held-out top-1",
        best=best.name,
        fashion=best.architecture["cubs"],
        checkpoint=best.checkpoint,
        stem=cfg.stem,
        run_id=best.training.get("run_id") or "",
    )


def gap_to_t2(best: RunSummary, t2_metrics: dict | None, cfg: RecognitionConfig) -> dict:
    """Test top-1 of the selected CUBS model minus T2's, with a note when the two runs differ in data
    or recipe (then the gap is not a like-for-like comparison)."""
    if t2_metrics is None:
        return {
            "available": False,
            "summary": "T2's metrics are not in this output folder yet (run T2 first); no gap computed.",
        }
    t2_run = RunSummary.from_dict(next(iter(t2_metrics["models"].values())))
    gap = best.test["top1"] - t2_run.test["top1"]
    keys = (
        "profile",
        "data_dir",
        "classes",
        "train_per_class",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "stem",
        "seed",
    )
    differs = [k for k in keys if t2_metrics["config"].get(k) != getattr(cfg, k)]
    verdict = "within" if gap >= -0.02 else "outside"
    summary = (
        f"T2 ResNet-18 test top-1 {100 * t2_run.test['top1']:.1f} %, selected CUBS model ({best.name}) "
        f"{100 * best.test['top1']:.1f} %: gap {100 * gap:+.1f} points, {verdict} the allowed 2-point drop."
    )
    if differs:
        summary += f" Note: T2 ran with different {', '.join(differs)}, so this is not a like-for-like comparison."
    return {
        "available": True,
        "t2_test_top1": t2_run.test["top1"],
        "cubs_test_top1": best.test["top1"],
        "gap": gap,
        "within_2_points": gap >= -0.02,
        "config_differences": differs,
        "summary": summary,
    }
