"""Class-balanced P x K batches for metric learning."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from helpers.errors import SettingsError
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images each (K distinct images per class), seeded per epoch.

    Classes are visited in a fresh random order each epoch (cycling when more batches are asked
    for than classes allow); images within a class are drawn without replacement, starting a fresh
    pass when fewer than K are left. Call `set_epoch(e)` before iterating for a different, reproducible order.
    With `drop_small_classes=False` (default) a class with fewer than K images is an error; with
    True such classes are left out. Every error says what the labels hold (number of classes, how
    many have >= K images, the smallest and largest class) and which setting to change: P is
    `pk_classes`, K is `pk_images` in the configurations and notebooks.
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        num_batches: int | None = None,
        seed: int = 0,
        drop_small_classes: bool = False,
    ):
        if p < 1 or k < 1:
            raise SettingsError(f"PKBatchSampler: P (pk_classes) and K (pk_images) must be >= 1, got P={p}, K={k}")
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) == 0:
            raise SettingsError("PKBatchSampler: no labels: the training split is empty")
        keep = counts >= k
        self.classes = classes[keep]
        _check_pk(counts, p, k, drop_small_classes, example=classes[counts.argmin()])
        self.members = {int(c): np.flatnonzero(labels == c) for c in self.classes}
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        usable = int(sum(len(m) for m in self.members.values()))
        self.num_batches = num_batches if num_batches is not None else max(1, usable // (p * k))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = {c: list(rng.permutation(m)) for c, m in self.members.items()}
        class_queue: list[int] = []
        for _ in range(self.num_batches):
            if len(class_queue) < self.p:
                class_queue += [int(c) for c in rng.permutation(self.classes)]
            chosen, class_queue = class_queue[: self.p], class_queue[self.p :]
            if len(set(chosen)) < self.p:  # the refill put a class twice within one batch: redraw it
                chosen = [int(c) for c in rng.choice(self.classes, size=self.p, replace=False)]
            batch = []
            for c in chosen:
                if len(pools[c]) < self.k:  # a fresh pass over the class keeps the K images distinct
                    pools[c] = list(rng.permutation(self.members[c]))
                batch += [int(i) for i in pools[c][: self.k]]
                pools[c] = pools[c][self.k :]
            yield batch


def _check_pk(counts: np.ndarray, p: int, k: int, drop_small_classes: bool, example) -> None:
    """Raise a ValueError naming the data and the setting to change (pk_classes for P, pk_images
    for K) when P x K batches cannot be drawn. counts (C,) images per class (C >= 1); example:
    the label of a smallest class."""
    num_classes, smallest, largest = len(counts), int(counts.min()), int(counts.max())
    qualifying = int((counts >= k).sum())
    data = (
        f"the data has {num_classes} classes ("
        + (
            f"all of {smallest} images"
            if smallest == largest
            else f"the smallest of {smallest} images, the largest of {largest}"
        )
        + f"), {qualifying} of them with >= K={k} images"
    )
    # The largest K for which min(P, C) classes have >= K images: what drop_small_classes=True can use.
    k_fit = int(np.sort(counts)[::-1][min(p, num_classes) - 1])
    lower_p_too = f" and pk_classes to at most {num_classes}" if p > num_classes else ""
    if qualifying < num_classes and not drop_small_classes:
        problem = (
            "is more than any class has"
            if qualifying == 0
            else (
                f"is impossible: {num_classes - qualifying} of the {num_classes} classes have fewer (e.g. class {example} has {smallest})"
            )
        )
        drop_hint = (
            f", or pass drop_small_classes=True to use only the {qualifying} classes with >= K images"
            if qualifying >= p
            else f", or to at most {k_fit}{lower_p_too} with drop_small_classes=True"
            if k_fit > smallest
            else ""
        )
        raise SettingsError(
            f"PKBatchSampler: K={k} images per class (pk_images) {problem}; {data}. "
            f"Lower pk_images to at most {smallest}{lower_p_too}{drop_hint}."
        )
    if qualifying == 0:
        raise SettingsError(
            f"PKBatchSampler: K={k} images per class (pk_images) is more than any class has; {data}. "
            f"Lower pk_images to at most {k_fit}{lower_p_too}."
        )
    if p > num_classes:
        raise SettingsError(
            f"PKBatchSampler: P={p} classes per batch (pk_classes) is more classes than there are: {data}. "
            f"Lower pk_classes to at most {qualifying}"
            + (f" (or to at most {num_classes} with pk_images <= {smallest})." if qualifying < num_classes else ".")
        )
    if p > qualifying:
        raise SettingsError(
            f"PKBatchSampler: P={p} classes per batch (pk_classes), but drop_small_classes=True left {qualifying} "
            f"of the {num_classes} classes: {data}. Lower pk_classes to at most {qualifying}, or pk_images to at most {k_fit} "
            f"({int((counts >= k_fit).sum())} classes have >= {k_fit} images)."
        )
