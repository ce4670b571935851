"""Class-balanced P x K batches for metric learning."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images each (K distinct images per class), seeded per epoch.

    Classes are visited in a fresh random order each epoch (cycling when more batches are asked
    for than classes allow); images within a class are drawn without replacement, starting a fresh
    pass when fewer than K are left. Call `set_epoch(e)` before iterating for a different, reproducible order.
    With `drop_small_classes=False` (default) a class with fewer than K images is an error.
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
            raise ValueError(f"P and K must be >= 1 (got P={p}, K={k})")
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        small = classes[counts < k]
        if len(small) and not drop_small_classes:
            worst = counts.min()
            raise ValueError(
                f"PKBatchSampler: K={k} images per class is impossible: {len(small)} classes have fewer "
                f"(the smallest has {worst}, e.g. class {small[0]}). Lower K to at most {worst} or pass "
                "drop_small_classes=True."
            )
        keep = counts >= k
        self.classes = classes[keep]
        if p > len(self.classes):
            raise ValueError(
                f"PKBatchSampler: P={p} classes per batch, but only {len(self.classes)} classes have at least "
                f"K={k} images. Lower P."
            )
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
