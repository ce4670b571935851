import numpy as np
import torch

from helpers.data import LoaderBatches, PKBatchSampler, TensorBatches, TinyImageNet, ToUint8Tensor, epoch_plan
from helpers.data.cache import decode_all


def test_epoch_plan_is_seeded_and_complete():
    plan = epoch_plan(10, 4, shuffle=True, drop_last=False, seed=0, epoch=0)
    assert [len(b) for b in plan] == [4, 4, 2] and sorted(np.concatenate(plan).tolist()) == list(range(10))
    assert all((a == b).all() for a, b in zip(plan, epoch_plan(10, 4, True, False, 0, 0)))
    assert not all((a == b).all() for a, b in zip(plan, epoch_plan(10, 4, True, False, 0, 1)))
    assert [len(b) for b in epoch_plan(10, 4, True, True, 0, 0)] == [4, 4]
    assert np.concatenate(epoch_plan(10, 4, False, False, 0, 0)).tolist() == list(range(10))


def test_per_item_and_tensor_paths_yield_identical_batches(tiny_root):
    per_item = TinyImageNet(tiny_root, "train", transform=ToUint8Tensor())
    images = decode_all(per_item)
    tensor = TensorBatches(images, per_item.targets, batch_size=16, shuffle=True, seed=3)
    loader = LoaderBatches(per_item, batch_size=16, shuffle=True, seed=3, num_workers=2)
    assert len(tensor) == len(loader) == 5
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(tensor.epoch(epoch), loader.epoch(epoch), strict=True):
            assert xa.shape == (len(ya), 3, 64, 64) and xa.dtype == torch.uint8
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # tensor batches come channels_last in memory (gathered from NHWC)
    x, _ = next(tensor.epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_start_skips_batches_exactly(tiny_root):
    ds = TinyImageNet(tiny_root, "val", transform=ToUint8Tensor())
    tensor = TensorBatches(decode_all(ds), ds.targets, batch_size=5, shuffle=True, seed=1)
    full = list(tensor.epoch(2))
    tail = list(tensor.epoch(2, start=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
    loader = LoaderBatches(ds, batch_size=5, shuffle=True, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[3:], loader.epoch(2, start=3)))


def test_pk_batches_through_both_paths():
    labels = np.repeat(np.arange(6), 4)
    images = np.zeros((24, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(24)  # each image carries its index
    sampler = PKBatchSampler(labels, p=3, k=2, seed=0)
    tensor = TensorBatches(images, labels, batch_size=6, batch_sampler=sampler)
    assert len(tensor) == 4
    for x, y in tensor.epoch(0):
        index = x[:, 0, 0, 0].long().numpy()
        assert len(set(index.tolist())) == 6 and (labels[index] == y.numpy()).all()
        assert sorted(np.bincount(y.numpy())[np.bincount(y.numpy()) > 0].tolist()) == [2, 2, 2]
