"""Index subsets of a labelled set: the first classes / the first images of each class, and the
seeded, stratified held-out split of a training set (model selection never looks at the test set)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def stratified_split(labels: Sequence[int], fraction: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, held_out), taking `fraction` of every class (rounded, at least one
    image from each class that has two or more; none from a class with a single image).

    Deterministic in `seed`; both index arrays are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_held = (
            0 if fraction == 0 or len(members) < 2 else min(len(members) - 1, max(1, round(fraction * len(members))))
        )
        held.append(rng.permutation(members)[:n_held])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask), held_out.astype(np.int64)


def subset_indices(labels: Sequence[int], classes: int = 0, per_class: int = 0) -> np.ndarray:
    """Indices (sorted) of the items of the first `classes` classes (labels < classes; 0 = all),
    keeping at most the first `per_class` items of each class (0 = all). labels (N,)."""
    labels = np.asarray(labels)
    keep = np.arange(len(labels))
    if classes:
        keep = keep[labels[keep] < classes]
    if per_class:
        rank = np.zeros(len(keep), dtype=np.int64)
        for c in np.unique(labels[keep]):  # per class, not per image
            members = labels[keep] == c
            rank[members] = np.arange(members.sum())
        keep = keep[rank < per_class]
    return keep
