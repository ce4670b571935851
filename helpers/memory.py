"""What to do when a batch does not fit in the accelerator's memory.

When a training step runs out of GPU memory, `fit` frees what the failed step held, measures one
forward + backward pass on a quarter of the batch, smaller again when that does not fit either
(memory before it: the model, optimizer state and the batch; its peak on top of that: activations
and gradients, the part that grows linearly with the batch) and raises `BatchDoesNotFit` with the measured numbers and a batch size that fits with 10 % to
spare. The learning rate in that advice is scaled linearly with the batch (lr x new / old, the
"linear scaling rule" of Goyal et al. 2017), which keeps the per-image step size of SGD-style
recipes; Adam-style recipes are less sensitive, so the advice is a starting point, not a promise.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

HEADROOM = 0.9  # plan for 90 % of the device's memory (the allocator's fragmentation, other kernels' workspaces)
MIB = 2**20


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is PyTorch running out of device memory (CUDA raises
    torch.cuda.OutOfMemoryError; MPS a RuntimeError saying "MPS backend out of memory")."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


class BatchDoesNotFit(MemoryError):
    """A training batch needed more accelerator memory than there is; the message says what fits."""


@dataclass(frozen=True)
class MemoryProbe:
    """One forward + backward pass on `batch` images: `static_mb` allocated before it (weights,
    optimizer state, the failed batch), `peak_mb` at its peak (activations and gradients on top);
    `total_mb` the device memory this process can have (free + what it holds)."""

    batch: int
    static_mb: float
    peak_mb: float
    total_mb: float

    @property
    def per_image_mb(self) -> float:
        return max(self.peak_mb - self.static_mb, 0.0) / max(1, self.batch)


def fitting_batch_size(
    probe: MemoryProbe, batch_size: int, headroom: float = HEADROOM, extra_static_mb: float = 0.0
) -> int:
    """The largest batch below `batch_size` whose predicted peak (static + per image x batch, plus
    `extra_static_mb` not yet allocated, e.g. optimizer state created by the first step) stays
    within `headroom` of the device: a multiple of 8 when that is at least 8; 0 when none fits."""
    room = probe.total_mb * headroom - probe.static_mb - extra_static_mb
    if room <= 0:
        return 0
    fits = int(room // probe.per_image_mb) if probe.per_image_mb > 0 else batch_size - 1
    fits = min(fits, batch_size - 1)  # it did not fit at batch_size, whatever the estimate says
    return fits - fits % 8 if fits >= 8 else max(fits, 0)


def advice(name: str, device: str, batch_size: int, lr: float, probe: MemoryProbe | None, fits: int) -> str:
    """The message of BatchDoesNotFit."""
    where = f"{name}: out of {device} memory at a batch of {batch_size} images"
    setting = "batch_size (or pk_classes x pk_images for P x K batches)"
    kept = "The checkpoints of finished epochs, if any, are kept."
    if probe is None:
        half = max(1, batch_size // 2)
        return (
            f"{where} (not measured on this device). Try {setting} = {half} with the learning rate scaled linearly "
            f"with the batch: {lr:.4g} x {half}/{batch_size} = {lr * half / batch_size:.4g}. {kept}"
        )
    measured = (
        f"This process can use {probe.total_mb / 1024:.1f} GiB; the model, optimizer state and batch take "
        f"{probe.static_mb / 1024:.2f} GiB and each image about {probe.per_image_mb:.1f} MiB more "
        f"(measured on {probe.batch} images: peak {probe.peak_mb / 1024:.2f} GiB)"
    )
    if fits < 1:
        return f"{where}. {measured}: not even one image fits. Lower image_size or use a smaller model."
    return (
        f"{where}. {measured}. A batch that fits: {setting} = {fits}, with the learning rate scaled linearly "
        f"with the batch: {lr:.4g} x {fits}/{batch_size} = {lr * fits / batch_size:.4g}. {kept}"
    )


class CudaMemory:
    """The CUDA allocator's counters in MiB (tests substitute a fake with the same methods)."""

    def __init__(self, device: torch.device):
        self.device = device

    def release(self) -> None:
        gc.collect()  # (reference cycles may still hold the failed step's tensors)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_mb(self) -> float:
        return torch.cuda.memory_allocated(self.device) / MIB

    def peak_mb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / MIB

    def total_mb(self) -> float:
        free, _ = torch.cuda.mem_get_info(self.device)  # (other processes and the CUDA context excluded)
        return (free + torch.cuda.memory_reserved(self.device)) / MIB


def device_memory(device: torch.device):
    """The memory counters of `device`, or None where PyTorch has none to read (CPU, MPS)."""
    return CudaMemory(device) if device.type == "cuda" else None


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Memory the optimizer's state will take once its first step creates it (0 once it exists):
    one buffer per parameter for SGD with momentum, two for Adam / AdamW."""
    if any(optimizer.state.values()):
        return 0.0
    buffers = (
        2
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        else 1
        if optimizer.defaults.get("momentum")
        else 0
    )
    params = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    return buffers * params / MIB
