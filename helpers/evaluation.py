"""Evaluation passes: logits or embeddings of a whole split, and the per-epoch evaluators `fit` calls."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.data.loaders import BatchSource
from helpers.distributed import gather_in_order, is_distributed, shard_positions, world_size
from helpers.data.transforms import BatchAugment
from helpers.metrics import (
    confusion_matrix,
    most_confused_pairs,
    nearest_class_mean_predict,
    per_class_accuracy,
    retrieval_metrics,
    topk_accuracy,
)
from helpers.runinfo import Runtime

CPU = Runtime("cpu")


@torch.no_grad()
def run_split(
    fn: Callable[[torch.Tensor], torch.Tensor],
    source: BatchSource,
    augment: BatchAugment,
    runtime: Runtime = CPU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `fn` (a model, or e.g. `model.forward_features`) to every batch of `source` in order,
    eval transform, under `runtime` (autocast, memory format).

    Returns (outputs float32 (N, ...), labels (N,)), both on the device. Under torchrun each rank
    runs its part of every batch and the parts are gathered back into the original order, so
    every rank returns the whole split.
    """
    positions = None
    if is_distributed():
        plan = source.global_plan(0)
        positions = shard_positions(plan)
        if source.num_samples and sum(len(b) // world_size() for b in plan) == 0:
            raise ValueError(
                f"an evaluation split of {source.num_samples} items in batches smaller than the {world_size()} GPUs leaves some GPU nothing to do; use fewer GPUs"
            )
    outputs, labels = [], []
    for images, y in source.epoch(0):
        x = runtime.prepare(augment.eval(images))
        with runtime.autocast():
            outputs.append(fn(x).float())
        labels.append(y)
    if positions is None:
        return torch.cat(outputs), torch.cat(labels)
    return gather_in_order(torch.cat(outputs), positions), gather_in_order(torch.cat(labels), positions)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 and mean cross-entropy of logits (N, C) against labels (N,)."""
    top = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": top[1], "top5": top[5], "loss": float(F.cross_entropy(logits.float(), labels))}


class ClassificationEvaluator:
    """Per-epoch evaluation for `fit`: {"<split>_top1", "<split>_top5", "<split>_loss"} for each split."""

    def __init__(self, splits: dict[str, BatchSource], augment: BatchAugment, runtime: Runtime = CPU):
        self.splits, self.augment, self.runtime = splits, augment, runtime

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for name, source in self.splits.items():
            logits, labels = run_split(model, source, self.augment, self.runtime)
            out.update({f"{name}_{k}": v for k, v in classification_metrics(logits, labels).items()})
        return out


class NearestClassMeanEvaluator:
    """Per-epoch evaluation of an embedding model as a classifier: class means of its embeddings over
    `reference` (a fixed part of train), then each split is classified by the nearest mean:
    {"<split>_top1", "<split>_top5"}. `predict(model)` returns the scores of every split."""

    def __init__(
        self,
        reference: BatchSource,
        splits: dict[str, BatchSource],
        augment: BatchAugment,
        num_classes: int,
        metric: str = "euclidean",
        runtime: Runtime = CPU,
    ):
        self.reference, self.splits, self.augment, self.num_classes, self.metric = (
            reference,
            splits,
            augment,
            num_classes,
            metric,
        )
        self.runtime = runtime

    def predict(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{split: (scores (N, C), labels (N,))} by nearest class mean."""
        ref, ref_labels = run_split(model, self.reference, self.augment, self.runtime)
        out = {}
        for name, source in self.splits.items():
            emb, labels = run_split(model, source, self.augment, self.runtime)
            _, scores = nearest_class_mean_predict(ref, ref_labels, emb, self.metric, self.num_classes)
            out[name] = (scores, labels)
        return out

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for name, (scores, labels) in self.predict(model).items():
            top = topk_accuracy(scores, labels, ks=(1, 5))
            out.update({f"{name}_top1": top[1], f"{name}_top5": top[5]})
        return out


class RetrievalEvaluator:
    """Per-epoch retrieval evaluation: Recall@K and MAP@R of `embed(x)` on each split
    (leave-one-out within the split, cosine similarity; queries whose class has no other item in
    the split are excluded, see `helpers.metrics`): {"<split>_recall@1", ..., "<split>_map@r"}.
    The query counts depend only on the labels, so they stay out of the per-epoch records; the
    final `retrieval_metrics` call of a run reports them."""

    def __init__(
        self,
        splits: dict[str, BatchSource],
        augment: BatchAugment,
        embed: Callable[[nn.Module], Callable] | None = None,
        ks: Sequence[int] = (1, 2, 4, 8),
        runtime: Runtime = CPU,
    ):
        self.splits, self.augment, self.embed, self.ks = splits, augment, embed, tuple(ks)
        self.runtime = runtime

    def __call__(self, model: nn.Module) -> dict[str, float]:
        fn = self.embed(model) if self.embed is not None else model
        out = {}
        for name, source in self.splits.items():
            emb, labels = run_split(fn, source, self.augment, self.runtime)
            metrics = retrieval_metrics(emb, labels, ks=self.ks)
            out.update({f"{name}_{k}": v for k, v in metrics.items() if k.startswith(("recall@", "map@"))})
        return out


def classification_report(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], n: int = 10, with_loss: bool = True
) -> dict:
    """Everything the notebooks show about a classifier on one split, as plain JSON-able values:
    top1/top5/loss, per-class accuracy, the n best and worst classes and the n most confused pairs.
    `logits` may be any scores (e.g. nearest-class-mean scores, then with_loss=False: no loss)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    confusion = confusion_matrix(logits.argmax(1), labels, num_classes)
    per_class = per_class_accuracy(confusion).numpy()
    order = np.argsort(-np.nan_to_num(per_class, nan=-1), kind="stable")
    present = [int(c) for c in order if not np.isnan(per_class[c])]
    named = lambda c: {"class": int(c), "name": class_names[c], "accuracy": float(per_class[c])}  # noqa: E731
    metrics = classification_metrics(logits, labels)
    if not with_loss:
        metrics["loss"] = None
    return {
        **metrics,
        "num_images": int(len(labels)),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "best_classes": [named(c) for c in present[:n]],
        "worst_classes": [named(c) for c in present[::-1][:n]],
        "most_confused": [
            {
                "true": int(t),
                "true_name": class_names[t],
                "predicted": int(p),
                "predicted_name": class_names[p],
                "count": int(k),
            }
            for t, p, k in most_confused_pairs(confusion, n)
        ],
        "confusion": confusion.tolist(),
    }
