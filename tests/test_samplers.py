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
    with pytest.raises(
        ValueError,
        match=r"K=3 .*\(pk_images\) is impossible.*class 2 has 2.*Lower pk_images to at most 2, or pass drop_small_classes=True",
    ):
        PKBatchSampler(labels, p=2, k=3)
    sampler = PKBatchSampler(labels, p=2, k=3, drop_small_classes=True)
    assert 2 not in set(labels[np.concatenate(list(sampler))].tolist())
    with pytest.raises(
        ValueError, match=r"P=6 classes per batch \(pk_classes\) is more classes than there are: the data has 5 classes"
    ):
        PKBatchSampler(labels, p=6, k=2)


# The data of the message tests: 4 classes of 3, 5, 6 and 9 images.
SIZES = [3, 5, 6, 9]
DATA = "the data has 4 classes (the smallest of 3 images, the largest of 9), {} of them with >= K={} images"


def message(labels, **kwargs):
    with pytest.raises(ValueError) as error:
        PKBatchSampler(labels, **kwargs)
    return str(error.value)


@pytest.mark.parametrize("drop_small_classes", [False, True])
def test_k_larger_than_every_class_names_pk_images(drop_small_classes):
    labels = np.repeat(np.arange(4), SIZES)
    text = message(labels, p=2, k=10, drop_small_classes=drop_small_classes)
    assert "K=10 images per class (pk_images) is more than any class has" in text
    assert DATA.format(0, 10) in text
    if drop_small_classes:
        assert text.endswith("Lower pk_images to at most 6.")  # 2 classes have >= 6 images
    else:
        assert text.endswith("Lower pk_images to at most 3, or to at most 6 with drop_small_classes=True.")
    assert "pk_classes" not in text and "Lower P" not in text


def test_k_too_large_for_some_classes_without_dropping():
    labels = np.repeat(np.arange(4), SIZES)
    text = message(labels, p=2, k=6)
    assert text.startswith(
        "PKBatchSampler: K=6 images per class (pk_images) is impossible: 2 of the 4 classes have fewer (e.g. class 0 has 3); "
    )
    assert DATA.format(2, 6) in text
    assert text.endswith(
        "Lower pk_images to at most 3, or pass drop_small_classes=True to use only the 2 classes with >= K images."
    )
    # dropping would not leave P classes: only lowering K is offered, and to where P classes remain
    text = message(labels, p=3, k=6)
    assert text.endswith("Lower pk_images to at most 3, or to at most 5 with drop_small_classes=True.")


def test_p_larger_than_the_classes_with_k_images():
    labels = np.repeat(np.arange(4), SIZES)
    text = message(labels, p=3, k=6, drop_small_classes=True)
    assert text.startswith(
        "PKBatchSampler: P=3 classes per batch (pk_classes), but drop_small_classes=True left 2 of the 4 classes: "
    )
    assert DATA.format(2, 6) in text
    assert text.endswith("Lower pk_classes to at most 2, or pk_images to at most 5 (3 classes have >= 5 images).")
    assert "Lower P." not in text
    # the suggested settings both work
    assert len(PKBatchSampler(labels, p=2, k=6, drop_small_classes=True).classes) == 2
    assert len(PKBatchSampler(labels, p=3, k=5, drop_small_classes=True).classes) == 3


def test_p_larger_than_the_number_of_classes():
    labels = np.repeat(np.arange(4), SIZES)
    text = message(labels, p=5, k=2)
    assert (
        text
        == f"PKBatchSampler: P=5 classes per batch (pk_classes) is more classes than there are: {DATA.format(4, 2)}. Lower pk_classes to at most 4."
    )
    text = message(labels, p=5, k=4, drop_small_classes=True)
    assert text.endswith(f"{DATA.format(3, 4)}. Lower pk_classes to at most 3 (or to at most 4 with pk_images <= 3).")
    # K too large and P too large at once: both settings are named
    assert message(labels, p=5, k=10, drop_small_classes=True).endswith(
        "Lower pk_images to at most 3 and pk_classes to at most 4."
    )


def test_invalid_and_empty_inputs():
    assert (
        message(np.arange(4), p=0, k=2) == "PKBatchSampler: P (pk_classes) and K (pk_images) must be >= 1, got P=0, K=2"
    )
    assert "empty" in message(np.zeros(0, dtype=int), p=2, k=2)
    labels = np.repeat(np.arange(3), 4)
    assert "(all of 4 images)" in message(labels, p=4, k=2)
