"""Several processes, one per GPU: torchrun + DistributedDataParallel (DDP).

`torchrun --nproc_per_node=N -m helpers.train TASK ...` starts N copies of the training; each
calls `setup(device)`, which joins the process group torchrun describes in its environment
(NCCL on CUDA, gloo on the CPU) and picks the rank's GPU. Everything else reads the group from
`torch.distributed` itself, so single-process code paths are unchanged:

* data: `shard(batch)` gives each rank its contiguous part of every global batch (a P x K batch
  of P % N == 0 classes: whole class groups), `shard_positions` where those items sit in the
  unsharded order;
* evaluation: `gather_in_order` puts the outputs of all ranks back in the original order
  (`all_gather` with padding for uneven last batches);
* metric losses: `gather_with_grad` concatenates the embeddings of all ranks, the local part
  keeping its gradient (scaled by N, so DDP's gradient average gives the single-process gradient);
* `launch` runs torchrun in a subprocess from a notebook or the pipeline, streams its output and
  passes Ctrl-C on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from helpers.errors import SettingsError

# tests run the several-process path on the CPU (gloo); users ask for GPUs
CPU_PROCESSES_SWITCH = "HELPERS_ALLOW_CPU_PROCESSES"
_HOST_GROUP = None  # a gloo group for host-side agreement (a stop request) that never waits for the GPU


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...)
    and return this rank's device: "cuda:<LOCAL_RANK>" for device "cuda", else `device`.
    Without torchrun's environment: nothing to join, `device` is returned."""
    if not launched_by_torchrun() or is_distributed():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise SettingsError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node but it has "
                f"{torch.cuda.device_count()} CUDA GPU(s): use --nproc_per_node={torch.cuda.device_count()} (gpus={torch.cuda.device_count()})"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        global _HOST_GROUP
        _HOST_GROUP = dist.new_group(backend="gloo")
        return f"cuda:{local}"
    if str(device) == "mps":
        raise SettingsError(
            "several processes need CUDA GPUs (NCCL) or the CPU (gloo); MPS has no distributed backend: use gpus=1"
        )
    dist.init_process_group("gloo")
    return device


def teardown() -> None:
    """Leave the process group, all ranks together (a rank destroying its gloo connections while
    another still writes its results was seen to abort once)."""
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # another rank is already gone (it failed): nothing to wait for
                pass
        dist.destroy_process_group()
    _HOST_GROUP = None


def barrier() -> None:
    """Every rank waits here until all have arrived (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def shard(batch: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of one global batch of indices (all of it in one process)."""
    if not is_distributed():
        return batch
    return np.array_split(batch, world_size())[rank()]


def shard_positions(plan: list[np.ndarray]) -> np.ndarray:
    """Where this rank's items (the `shard` of every batch of `plan`, in turn) sit in the
    flattened, unsharded order of `plan`."""
    positions, offset = [], 0
    for batch in plan:
        bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(len(batch)), world_size())])
        positions.append(offset + np.arange(bounds[rank()], bounds[rank() + 1]))
        offset += len(batch)
    return np.concatenate(positions) if positions else np.zeros(0, np.int64)


def check_shardable(batch_size: int, what: str = "batch_size", classes: int | None = None) -> None:
    """A training batch must split evenly over the ranks (equal local batches: DDP averages their
    gradients), and a P x K batch into whole classes (classes=P)."""
    n = world_size()
    if batch_size % n:
        raise SettingsError(
            f"{what}={batch_size} is the global batch and must split evenly over {n} GPUs; use a multiple of {n}"
        )
    if classes is not None and classes % n:
        raise SettingsError(
            f"pk_classes={classes}: every GPU gets whole classes of a P x K batch, so P must be a multiple of {n} GPUs"
        )


def all_gather_padded(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `x` (n_r, ...) (n_r may differ: padded to the largest for the collective)."""
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, counts)]


def gather_in_order(x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """The outputs (N, ...) of the whole split from each rank's part `x` (n_r, ...), whose items
    sit at `positions` (n_r,) of the unsharded order. The identity in one process."""
    if not is_distributed():
        return x
    parts = all_gather_padded(x)
    where = all_gather_padded(torch.as_tensor(positions, dtype=torch.int64, device=x.device))
    out = torch.empty((sum(p.shape[0] for p in parts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[torch.cat(where)] = torch.cat(parts)
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same loss of the same global batch; each back-propagates only
        # through its own rows. DDP then averages over the N ranks, so scale by N here.
        lo = ctx.rank * ctx.size
        return grad[lo : lo + ctx.size] * world_size()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N * B, ...) rows of all ranks, in rank order, from each rank's `x` (B, ...) (B equal on every
    rank); gradients flow to the local rows only, scaled so that DDP's average over ranks equals
    the single-process gradient of a loss over the whole global batch. The identity in one process."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """(N * B, ...) rows of all ranks, in rank order, without gradient (e.g. labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


def any_rank(*flags: torch.Tensor | bool, device="cpu") -> list[bool]:
    """Each flag, true when it is true on some rank (one collective for all of them); in one process, the flags."""
    if not is_distributed():
        return [bool(f) for f in flags]
    values = torch.stack([torch.as_tensor(f, device=device).to(torch.int32).reshape(()) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def agree(flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank: a host-side collective (gloo), so
    calling it after every step costs no GPU synchronisation."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(value[0])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's last training
    forward updated its own from its part of the batch, and evaluation and checkpoints must all
    describe rank 0's model."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------ launching


class LaunchFailed(RuntimeError):
    """torchrun (or one of its processes) ended with an error; its output says which."""


def check_gpus(gpus: int, device: str) -> None:
    """gpus > 1 needs that many CUDA GPUs (the CPU only with the test switch)."""
    if gpus <= 1:
        return
    if str(device) == "cpu" and os.environ.get(CPU_PROCESSES_SWITCH) == "1":
        return
    have = torch.cuda.device_count()
    if not str(device).startswith(("cuda", "auto")) or have == 0:
        raise SettingsError(f"gpus={gpus} needs CUDA GPUs (device {device!r}, {have} CUDA GPU(s) here); use gpus=1")
    if gpus > have:
        raise SettingsError(f"gpus={gpus}, but this machine has {have} CUDA GPU(s); use gpus={have} or fewer")


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """The torchrun command (as `python -m torch.distributed.run`, so it is this interpreter's) for
    one node with `nproc` processes running `python -m helpers.train <module_args>`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "helpers.train",
        *module_args,
    ]


def launch(nproc: int, module_args: list[str], cwd: str | Path | None = None) -> None:
    """Run helpers.train under torchrun in a subprocess and stream its output to this process's
    stdout (a notebook shows it). Ctrl-C (KeyboardInterrupt) here is passed on to torchrun, which
    passes it to every rank: they stop together after saving their checkpoint; then the
    KeyboardInterrupt is raised here. Raises LaunchFailed when torchrun ends with an error."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = torchrun_command(nproc, module_args)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
    )
    interrupted = False
    while True:
        try:
            chunk = process.stdout.read1(65536)
            if not chunk:
                break
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        except KeyboardInterrupt:
            if interrupted:  # a second Ctrl-C: stop waiting for the checkpoint
                process.kill()
                raise
            interrupted = True
            print("\nCtrl-C: asking every rank to stop after its current step and save...", flush=True)
            process.send_signal(signal.SIGINT)
    code = process.wait()
    if interrupted:
        raise KeyboardInterrupt(
            "The several-GPU training was interrupted; its checkpoints are saved (see above): rerun with resume=True to continue."
        )
    if code != 0:
        raise LaunchFailed(f"torchrun exited with code {code} ({' '.join(command[1:])}); the error is printed above.")
