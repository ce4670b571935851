"""Batch sources: the one data interface of the training engine.

A batch source yields `(images uint8 (B, 3, H, W), labels int64 (B,))` already on the training
device, in an order fixed by (seed, epoch), and can start an epoch at batch `start` (exact resume):

* `TensorBatches`: the whole split as one uint8 tensor, on the CPU (the decode-once cache) or on
  the GPU (GPU-resident data: batches are index gathers on the device).
* `LoaderBatches`: per-item decoding through a `DataLoader` (workers, pinned memory, persistent
  workers, prefetch), for data that does not fit or is not cached.

Both draw batch indices from the same `epoch_plan`, so for one seed they visit the same images in
the same order. Under torchrun each rank yields its contiguous part of every batch
(`helpers.distributed.shard`): `batch_size` is the global batch.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from helpers.distributed import shard


class BatchSource(Protocol):
    num_samples: int
    labels: np.ndarray

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def epoch_plan(
    num_samples: int,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epoch: int,
    batch_sampler=None,
) -> list[np.ndarray]:
    """The index arrays of one epoch's batches, fixed by (seed, epoch)."""
    if batch_sampler is not None:
        batch_sampler.set_epoch(epoch)
        return [np.asarray(b, dtype=np.int64) for b in batch_sampler]
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    stop = num_samples - num_samples % batch_size if drop_last else num_samples
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def num_batches(num_samples: int, batch_size: int, drop_last: bool, batch_sampler=None) -> int:
    if batch_sampler is not None:
        return len(batch_sampler)
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


class _PlannedBatches:
    """What both batch sources share: the epoch's global plan and this rank's part of it."""

    def global_plan(self, epoch: int) -> list[np.ndarray]:
        """The index arrays of the epoch's (global, unsharded) batches."""
        return epoch_plan(
            self.num_samples, self.batch_size, self.shuffle, self.drop_last, self.seed, epoch, self.batch_sampler
        )

    def local_plan(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """This rank's part of every batch from batch `start` on (all of it in one process); a
        rank's empty part of a short last batch is left out."""
        return [b for b in map(shard, self.global_plan(epoch)[start:]) if len(b)]


class TensorBatches(_PlannedBatches):
    """Batches gathered from an in-memory uint8 array (N, H, W, 3) held on `device`.

    The array stays NHWC; a gathered batch is returned as a (B, 3, H, W) view, which is already
    channels_last in memory. With `output_device` different from `device` (the array in CPU RAM,
    training on the GPU), each gathered batch is pinned and copied asynchronously.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_sampler=None,
        output_device: str | torch.device | None = None,
    ):
        images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3); got {tuple(images.shape)} {images.dtype}")
        self.device = torch.device(device)
        self.output_device = torch.device(output_device) if output_device is not None else self.device
        self.images = images.to(self.device)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.labels_tensor = torch.as_tensor(self.labels, device=self.device)
        self.num_samples = len(self.labels)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last, self.batch_sampler)

    def rebatched(self, batch_sampler) -> "TensorBatches":
        """The same data (not copied) in the batches of `batch_sampler` (e.g. a PKBatchSampler)."""
        return TensorBatches(
            self.images,
            self.labels,
            self.batch_size,
            True,
            True,
            self.seed,
            self.device,
            batch_sampler,
            self.output_device,
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        copy = self.output_device != self.device
        pin = copy and self.output_device.type == "cuda"
        plan = self.local_plan(epoch, start)
        if not plan:
            return
        # one upload of the epoch's order, then slices: no per-batch host-to-device copy
        order = torch.from_numpy(np.concatenate(plan)).to(self.device)
        bounds = np.cumsum([0] + [len(b) for b in plan])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            index = order[lo:hi]
            images, labels = self.images[index], self.labels_tensor[index]
            if copy:
                if pin:
                    images, labels = images.pin_memory(), labels.pin_memory()
                images = images.to(self.output_device, non_blocking=True)
                labels = labels.to(self.output_device, non_blocking=True)
            yield images.permute(0, 3, 1, 2), labels


class _PlanSampler:
    """A batch sampler whose batches are set before each epoch (keeps persistent workers alive)."""

    def __init__(self):
        self.plan: list[np.ndarray] = []

    def __iter__(self):
        return (b.tolist() for b in self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class LoaderBatches(_PlannedBatches):
    """Batches decoded item by item by a `DataLoader` over `dataset`, whose items are
    (uint8 tensor (3, H, W), label): use `ToUint8Tensor` as the dataset transform."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        batch_sampler=None,
        labels: Sequence[int] | None = None,
    ):
        self.dataset = dataset
        self.device = torch.device(device)
        self.labels = np.asarray(labels if labels is not None else dataset.targets, dtype=np.int64)
        self.num_samples = len(self.labels)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.batch_sampler = batch_sampler
        self._plan = _PlanSampler()
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        extra = {}
        if num_workers > 0:
            extra["persistent_workers"] = True if persistent_workers is None else persistent_workers
            extra["prefetch_factor"] = prefetch_factor or 4
        self.loader = DataLoader(
            dataset,
            batch_sampler=self._plan,
            num_workers=num_workers,
            pin_memory=pin,
            generator=torch.Generator(),
            **extra,
        )
        self._options = dict(
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
        )

    def rebatched(self, batch_sampler) -> "LoaderBatches":
        """The same dataset in the batches of `batch_sampler` (e.g. a PKBatchSampler)."""
        return LoaderBatches(
            self.dataset,
            self.batch_size,
            True,
            True,
            self.seed,
            self.device,
            batch_sampler=batch_sampler,
            labels=self.labels,
            **self._options,
        )

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last, self.batch_sampler)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._plan.plan = self.local_plan(epoch, start)  # (a rank's part of a short last batch may be empty)
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
