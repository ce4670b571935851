from collections import Counter

import numpy as np
import pytest

from helpers.data import PKBatchSampler


def test_every_batch_is_p_classes_by_k_distinct_images():
    labels = np.repeat(np.arange(12), [5, 6, 7, 8, 5, 9, 10, 5, 6, 7, 8, 20])
    sampler = PKBatchSampler(labels, p=4, k=3, num_batches=40, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
    seen = Counter(labels[np.concatenate(batches)].tolist())
    assert set(seen) == set(range(12)), "every class is visited"


def test_seeded_per_epoch():
    labels = np.repeat(np.arange(8), 6)
    a, b = PKBatchSampler(labels, 2, 3, seed=5), PKBatchSampler(labels, 2, 3, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert len(a) == 48 // 6


def test_impossible_settings_are_explained():
    labels = np.repeat(np.arange(5), [4, 4, 2, 4, 4])
    with pytest.raises(ValueError, match=r"K=3 .*impossible.*smallest has 2.*class 2"):
        PKBatchSampler(labels, p=2, k=3)
    sampler = PKBatchSampler(labels, p=2, k=3, drop_small_classes=True)
    assert 2 not in set(labels[np.concatenate(list(sampler))].tolist())
    with pytest.raises(ValueError, match="P=6 classes per batch, but only 5"):
        PKBatchSampler(labels, p=6, k=2)
