"""The one training loop (`fit`) used by every notebook.

One epoch: batches from a batch source (`helpers.data.loaders`), augmented on the device in whole
batches (`BatchAugment`), an objective (cross-entropy by default; metric losses plug in), one
optimizer step per batch with a per-step LR schedule. After each epoch: an optional evaluation
(held-out / test metrics), early stopping on the monitored held-out metric, and atomic
checkpoints `last.pt` (full state) and `best.pt` (best held-out weights).

Reproducible and resumable: data order and augmentation draws are fixed by (seed, epoch); the
checkpoint holds model, optimizer, schedule, epoch, step within the epoch, running sums, every RNG
state and the history, so a run stopped after epoch k (or interrupted mid-epoch with Ctrl-C) and
resumed ends with exactly the metrics of an uninterrupted run on the CPU.
A run has `epochs` epochs, exactly `max_steps` steps, or a time budget `budget_s`: then the loop
measures its own steps and plans its length (helpers.budget), and the schedule still anneals.
In the hot loop nothing is read back to the host except every `log_every` steps.

Under torchrun (helpers.distributed) the same loop runs on every rank: model and objective in one
DistributedDataParallel module (SyncBatchNorm with `sync_bn` on CUDA), each rank on its part of
every global batch, evaluation gathered over the ranks, a Ctrl-C / SIGTERM honoured by all ranks
at the same step (agreed after every step), and only rank 0 writing files; last.pt then
holds every rank's RNG and augmentation state, so a resumed run equals an uninterrupted one.

The optimizer, schedule and monitor live in helpers.optim, checkpoint files in helpers.checkpoint,
the progress display and the Ctrl-C deferral in helpers.console.
"""

from __future__ import annotations

import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from helpers.atomic import atomic_write_json, remove_stale_temporaries
from helpers.board import Board, open_board
from helpers.budget import BudgetClock
from helpers.checkpoint import (
    BEST,
    HISTORY,
    LAST,
    check_same_run,
    claim_run,
    drop_previous,
    slim_finished,
    has_checkpoint,
    load_best,
    load_best_weights,
    load_last,
    new_run_id,
    rng_state,
    save_best,
    save_last,
    set_rng_state,
)
from helpers.lock import FolderLock
from helpers.console import ProgressBar, StopRequest, epoch_line, interrupted_message, postfix
from helpers.data.loaders import BatchSource
from helpers import budget as budget_clock, distributed, precision
from helpers.data.transforms import AugmentRNG, BatchAugment
from helpers.objectives import CrossEntropyObjective
from helpers.memory import (
    BatchDoesNotFit,
    MemoryProbe,
    advice,
    device_memory,
    fitting_batch_size,
    is_out_of_memory,
    optimizer_state_mb,
)
from helpers.fit_config import FitConfig, check_choice  # noqa: F401 (FitConfig and check_choice are also imported from here)
from helpers.optim import UNPLANNED, EpochMonitor, LRSchedule, build_optimizer, parameter_groups
from helpers.errors import SettingsError
from helpers.runinfo import Runtime, notice


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a training after its state was saved; `.result` holds the
    partial run, `.signum` the signal (exit status 128 + it).

    A KeyboardInterrupt, so nothing after the training runs (a notebook stops at this cell, a script
    exits) and no partial result can be reported as a finished one."""

    def __init__(self, message: str, result: "FitResult", signum: int = signal.SIGINT):
        super().__init__(message)
        self.result, self.signum = result, signum


@dataclass
class FitResult:
    history: list[dict]
    monitor: str
    best_epoch: int | None = None
    best_value: float | None = None
    interrupted: bool = False
    stopped_early: bool = False
    planned_epochs: int = 0  # the run's length (a budget run: as planned at its end)
    resumed_from: dict | None = None  # {"epoch", "step"} of the checkpoint this call continued, else None
    out_dir: Path | None = None
    run_id: str = (
        ""  # the run's identity: made when it starts afresh, kept by every resume (in last.pt, best.pt, run.json)
    )
    train_seconds: float = 0.0  # time in the training loops only
    wall_seconds: float = 0.0  # the whole call (this session's part of it when resumed)
    eval_seconds: float = 0.0  # evaluation passes within the wall time
    precision: dict | None = None  # precision "auto" on the CPU: {"used", "channels_last", "reason", "timings"}
    crop_dropped: bool = False  # planned under crop_min_epochs: trained without the pad crop's translation

    def record(self) -> dict:
        """What the metrics files say about how complete this training is."""
        return {
            "epochs_planned": self.planned_epochs,
            "epochs_done": len(self.history),
            "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "complete": not self.interrupted and (self.stopped_early or len(self.history) >= self.planned_epochs),
            "run_id": self.run_id,
            "run_dir": str(self.out_dir) if self.out_dir is not None else None,
            "precision": self.precision,
            "crop_dropped": self.crop_dropped,
        }

    @property
    def images_per_s(self) -> float:
        rates = [h["images_per_s"] for h in self.history if h.get("images_per_s")]
        return float(np.median(rates)) if rates else float("nan")


def fit(
    model: nn.Module,
    train: BatchSource,
    augment: BatchAugment,
    cfg: FitConfig,
    *,
    objective: nn.Module | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
    objective_lr: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    name: str = "",
    run_key: dict | None = None,
    on_interrupt: str = "raise",
    board_dir: str | Path | None = None,
) -> FitResult:
    """Train `model` on `train` for `cfg.epochs` epochs (or exactly `cfg.max_steps` optimizer steps);
    returns the history and the best epoch.

    `evaluate(model) -> {"heldout_top1": ..., "test_top1": ...}` runs after every epoch (model in
    eval mode); `cfg.monitor` names the metric that picks the best checkpoint, drives early stopping
    and the plateau schedule (held-out only: never the test split). With `out_dir`, checkpoints
    `last.pt` / `best.pt` and `history.json` are written there and an existing `last.pt` is resumed
    (unless `resume=False`); a checkpoint of another length (`epochs`, `max_steps`) or format is refused.
    Ctrl-C or SIGTERM saves `last.pt` and raises TrainingInterrupted (`on_interrupt="return"`: returns the
    partial result with `result.interrupted` set). The run holds a lock on `out_dir` while it runs: a
    second run into the same folder is refused (FolderInUse) instead of mixing its files with this one's. `on_step(epoch, step)` is called after every step.
    `run_key` (e.g. the notebook's whole configuration and its data's fingerprint) is stored in the
    checkpoint; a checkpoint written under another key (other data, model or settings) is never
    resumed silently. An unreadable last.pt falls back to last.prev.pt; other damage is a CheckpointError.
    `board_dir`: TensorBoard curves of the run go there (helpers.board; rank 0, when tensorboard is installed).
    """
    check_choice("on_interrupt", on_interrupt, ("raise", "return"))
    called_at = time.perf_counter()
    with run_lock(out_dir):  # (rank 0 of several: the others share its folder)
        run = _prepare(model, train, augment, cfg, objective, device, out_dir, objective_lr, run_key)
        run.call.started, run.call.board_dir = called_at, board_dir
        if run.out is not None and resume and has_checkpoint(run.out):
            _resume(run)
        _choose_cpu_precision(run)
        run.at.run_id = distributed.broadcast_object(run.at.run_id)  # (every rank names the run as rank 0 does)
        if run.out is not None and distributed.is_main():
            claim_run(run.out, run.at.run_id)
        return _train(run, cfg, model, evaluate, on_step, progress, name, on_interrupt, called_at)


def load_finished_run(
    model: nn.Module,
    train: BatchSource,
    augment: BatchAugment,
    cfg: FitConfig,
    *,
    out_dir: str | Path,
    objective: nn.Module | None = None,
    device: str | torch.device = "cpu",
    objective_lr: float | None = None,
    run_key: dict | None = None,
) -> FitResult:
    """The result of a run another process trained to its end (torchrun, helpers.distributed.launch):
    its last.pt, best weights and history loaded into `model` as after `fit`; nothing is trained. A
    RuntimeError when the run did not finish (its output says why)."""
    with run_lock(out_dir):
        run = _prepare(model, train, augment, cfg, objective, device, out_dir, objective_lr, run_key)
        if has_checkpoint(run.out):
            _resume(run)
        return _loaded_result(run)


def run_lock(out_dir) -> FolderLock | nullcontext:
    """The lock a run holds on its checkpoint folder while it trains (none without one, and on ranks other than 0)."""
    if out_dir is None or not distributed.is_main():
        return nullcontext()
    return FolderLock(out_dir, what="run", remedy="pass another out_dir (each run folder holds one run)")


def _train(
    run: "_RunState", cfg: FitConfig, model, evaluate, on_step, progress, name, on_interrupt, called_at
) -> FitResult:
    """The epochs of a prepared (and maybe resumed) run, Ctrl-C / SIGTERM handling, the best weights restored."""
    _start_call(run)
    stop_request = StopRequest(distributed.is_distributed())
    interrupted = False
    try:
        while not run.at.stopped_early and run.at.epoch < run.num_epochs():
            _train_epoch(run, on_step, stop_request, progress, name)
            stop = _end_epoch(run, evaluate, progress, name)
            if distributed.agree(stop_request.pending):
                raise KeyboardInterrupt
            run.at.stopped_early = stop
    except KeyboardInterrupt:
        interrupted = True
        # A first Ctrl-C is deferred to the end of the current step (see StopRequest), so the
        # state here is consistent; a second, forced one may land mid-step: keep the last checkpoint.
        if run.out is not None and not run.call.at_boundary and not stop_request.forced:
            _save_last(run, _checkpoint(run))
            run.call.at_boundary = run.at.step == 0  # (an epoch's end whose last.pt the cadence had skipped)
    finally:
        stop_request.release()
        if run.call.board is not None:
            run.call.board.close()
    result = _result(run, interrupted, wall_seconds=time.perf_counter() - called_at)
    if interrupted:
        message = interrupted_message(
            name,
            run.at.epoch,
            run.at.step,
            run.call.at_boundary,
            result.planned_epochs,
            len(run.at.history),
            run.out,
            stop_request.forced,
        )
        if on_interrupt == "raise":
            raise TrainingInterrupted(message, result, stop_request.signum or signal.SIGINT)
        print(message, flush=True)
        return result
    distributed.barrier()  # rank 0's best.pt is complete before any rank reads it
    if cfg.restore_best and run.out is not None and run.monitor.best_epoch is not None:
        model.load_state_dict(load_best_weights(run.out, run.device, run.at.run_id))
    if run.out is not None and distributed.is_main() and result.record()["complete"]:
        drop_previous(run.out)
        best = run.monitor.best_epoch
        slim_finished(run.out, weights_in_best=best is not None and (cfg.restore_best or best == len(run.at.history)))
    return result


# ------------------------------------------------------------------------------------ its pieces


@dataclass
class _EpochSums:
    """Running sums of one epoch, kept on the device until read."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    scored: int = 0  # samples with logits (accuracy is undefined for pure metric losses)
    nonfinite: torch.Tensor | None = None
    seconds: float = 0.0

    @classmethod
    def zeros(cls, device) -> "_EpochSums":
        z = torch.zeros((), device=device, dtype=torch.float64)
        return cls(z.clone(), z.clone(), nonfinite=torch.zeros((), device=device, dtype=torch.bool))

    def add(self, loss: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> None:
        """One batch: its mean loss (0-d), logits (B, C) or None (metric losses), labels (B,)."""
        n = labels.shape[0]
        detached = loss.detach()
        self.loss_sum += detached.double() * n
        self.nonfinite |= ~torch.isfinite(detached)
        if logits is not None:
            self.correct += (logits.detach().argmax(1) == labels).sum()
            self.scored += n
        self.seen += n

    def over_ranks(self, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(loss sum, correct, seen, scored) of the epoch over every rank (in one process: its own)."""
        counts = torch.tensor([self.seen, self.scored], dtype=torch.float64, device=device)
        totals = distributed.all_reduce_sum(torch.stack([self.loss_sum, self.correct.double(), *counts]))
        return totals[0], totals[1], int(totals[2]), int(totals[3])

    def state(self) -> dict:
        return {
            "loss_sum": float(self.loss_sum),
            "correct": float(self.correct),
            "seen": self.seen,
            "scored": self.scored,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict, device) -> "_EpochSums":
        p = cls.zeros(device)
        p.loss_sum += state["loss_sum"]
        p.correct += state["correct"]
        p.seen, p.scored, p.seconds = state["seen"], state["scored"], state["seconds"]
        return p


@dataclass(eq=False)
class _Position:
    """Where a run stands: with the weights, optimizer, schedule and monitor, what last.pt holds."""

    run_id: str = field(default_factory=new_run_id)  # a resumed run keeps its checkpoint's
    epoch: int = 0
    step: int = 0  # steps done within `epoch`
    history: list[dict] = field(default_factory=list)
    sums: _EpochSums | None = None  # the running sums of `epoch`
    aug_rng: AugmentRNG | None = None  # and its augmentation draws
    stopped_early: bool = False
    budget_spent: float = 0.0  # training seconds of the sessions before this one
    precision_choice: dict | None = None  # precision "auto" on the CPU: what was measured and chosen
    crop_dropped: bool = False  # a budget run planned under crop_min_epochs: no random translation
    resumed_from: dict | None = None  # {"epoch", "step"} of the checkpoint this call continued
    last_session: dict | None = None  # a loaded run: what last.pt says of the session that wrote it


@dataclass(eq=False)
class _Call:
    """What this `fit` call adds to a run (`_start_call`, once resumed)."""

    started: float = 0.0  # perf_counter() when the call began
    board_dir: str | Path | None = None  # TensorBoard: where its curves go (rank 0 writes them)
    run_model: nn.Module | None = None  # the model as called in training and evaluation (compiled or not)
    train_step: Callable | None = None  # (x, targets) -> (loss, logits) on run_model, in DDP under torchrun
    budget: BudgetClock | None = None
    board: Board | None = None
    board_mark: tuple[float, int] = (0.0, 0)  # (loss sum, images) of the epoch at the last point written
    at_boundary: bool = True  # last.pt already describes the current state
    eval_seconds: float = 0.0
    saved_at: float = 0.0  # perf_counter() when last.pt was last written (0: not yet in this call)
    save_seconds: float = 0.0  # what that write took (rank 0)
    probe_seconds: float = 0.0  # the CPU precision measurement of this call: part of a budget run's time


@dataclass(eq=False)
class _RunState:
    """One `fit` call: its fixed set-up, where the run stands (`at`) and what the call adds (`call`)."""

    cfg: FitConfig
    model: nn.Module
    objective: nn.Module
    train: BatchSource
    augment: BatchAugment
    device: torch.device
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # of the parameter groups; the schedule multiplies them
    schedule: LRSchedule
    monitor: EpochMonitor  # of cfg.monitor: best checkpoint, early stopping, plateau schedule
    steps_per_epoch: int
    out: Path | None
    run_key: dict | None
    runtime: Runtime  # precision (autocast) and memory format of the training steps
    scaler: torch.amp.GradScaler | None  # fp16 only: its loss scale is part of the state
    at: _Position = field(default_factory=_Position)
    call: _Call = field(default_factory=_Call)

    def num_epochs(self) -> int:  # a budget run's length changes as it is planned
        return -(-self.schedule.total // max(1, self.steps_per_epoch))

    def epochs_label(self) -> str:
        return "?" if self.schedule.total == UNPLANNED else str(self.num_epochs())


# a budget run's total is fixed at this step (within a long warm-up too: a budget shorter than 4
# warm-ups shortens it, LRSchedule.replan), then corrected at epoch ends
FIRST_PLAN_STEP = 12
# automatic checkpoint cadence: last.pt once the time since the last write is this many times what
# that write took (at most 2 % of the training time spent writing it)
CHECKPOINT_COST_RATIO = 50


def _start_call(run: _RunState) -> None:
    """What this call adds once resumed: the model as trained, the budget clock (counting the earlier sessions), TensorBoard."""
    cfg, call = run.cfg, run.call
    call.run_model = torch.compile(run.model, mode=cfg.compile_mode) if wants_compile(cfg, run.device) else run.model
    call.train_step = _TrainingStep(run.model, run.objective, call.run_model)
    if distributed.is_distributed():
        # (CPU batches are channels_last views, the CPU model is not: DDP only warns of slower bucket copies)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        call.train_step = nn.parallel.DistributedDataParallel(
            call.train_step, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    spent = run.at.budget_spent + call.probe_seconds
    call.budget = BudgetClock(cfg.budget_s, spent_s=spent) if cfg.budget_s > 0 else None
    if (
        distributed.is_main()
        and call.board_dir is not None
        and not run.at.stopped_early
        and run.at.epoch < run.num_epochs()
    ):
        # (a resumed run drops what a killed session wrote after the step it resumes from)
        call.board = open_board(Path(call.board_dir), purge_step=run.at.epoch * run.steps_per_epoch + run.at.step + 1)


def _checkpoint(run: _RunState, epoch_done: bool = False) -> dict:
    """The whole state after `step` steps of `epoch` (with the epoch's running sums and
    augmentation draws), or, when `epoch_done`, at the start of the next epoch."""
    at = run.at
    own = {  # several processes: every rank's own part (rank 0's is also at the top level)
        "running": None if epoch_done else at.sums.state(),
        "augment_rng": None if epoch_done else at.aug_rng.state(),
        "rng": rng_state(),
    }
    return own | {
        "model": run.model.state_dict(),
        "objective": run.objective.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "epoch": at.epoch + 1 if epoch_done else at.epoch,
        "step": 0 if epoch_done else at.step,
        "history": at.history,
        "monitor": run.monitor.state_dict(),
        "world_size": distributed.world_size(),
        "ranks": distributed.gather_objects(own) if distributed.is_distributed() else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "precision": run.runtime.precision,
        "precision_choice": at.precision_choice,
        "crop_dropped": at.crop_dropped,
        "config": asdict(run.cfg),
        "run_key": run.run_key,
        "run_id": at.run_id,
        "budget_elapsed": run.call.budget.elapsed() if run.call.budget is not None else None,
        "session": {
            "resumed_from": at.resumed_from,
            "wall_seconds": time.perf_counter() - run.call.started,
            "eval_seconds": run.call.eval_seconds,
        },
    }


def _result(run: _RunState, interrupted: bool, wall_seconds: float) -> FitResult:
    at = run.at
    return FitResult(
        history=at.history,
        monitor=run.cfg.monitor,
        best_epoch=run.monitor.best_epoch,
        best_value=run.monitor.best,
        interrupted=interrupted,
        stopped_early=at.stopped_early,
        planned_epochs=run.num_epochs() if run.schedule.total != UNPLANNED else run.cfg.epochs,
        resumed_from=at.resumed_from,
        out_dir=run.out,
        run_id=at.run_id,
        train_seconds=sum(h["train_seconds"] for h in at.history),
        wall_seconds=wall_seconds,
        eval_seconds=run.call.eval_seconds,
        precision=at.precision_choice,
        crop_dropped=at.crop_dropped,
    )


def wants_compile(cfg: FitConfig, device: torch.device) -> bool:
    """cfg.compile, except on MPS (torch.compile's Metal backend is a prototype): a notice there."""
    if cfg.compile and device.type == "mps":
        notice("compile=True: torch.compile is not used on MPS (its Metal backend is a prototype); training uncompiled")
        return False
    return cfg.compile


class _TrainingStep(nn.Module):
    """objective(model, x, targets) as one module: DistributedDataParallel wraps it, so the model's
    and the objective's parameters (e.g. center-loss centers) are averaged over the ranks alike,
    whatever methods of the model the objective calls."""

    def __init__(self, model: nn.Module, objective: nn.Module, run_model: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective
        self.__dict__["run_model"] = run_model  # (the compiled model: the same parameters, not a second submodule)

    def forward(self, x: torch.Tensor, targets: torch.Tensor):
        return self.objective(self.run_model, x, targets)


def _prepare(model, train, augment, cfg, objective, device, out_dir, objective_lr, run_key) -> _RunState:
    """Model and objective on `device`, the optimizer, schedule and monitor of a fresh run, and out_dir."""
    device = torch.device(device)
    objective = objective if objective is not None else CrossEntropyObjective(cfg.label_smoothing)
    if distributed.is_distributed():
        _check_distributed(cfg, train, device)
        if cfg.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (in place below the root module)
    model.to(device)
    objective.to(device)
    runtime = Runtime.resolve(device, cfg.precision, cfg.channels_last)
    runtime.prepare_model(model)
    groups = parameter_groups(model, objective, cfg.weight_decay, objective_lr)
    optimizer = build_optimizer(groups, cfg, device, scaled=runtime.precision == "fp16")
    steps_per_epoch = len(train)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, recursive=False)  # left by a run killed mid-write
    distributed.barrier()
    return _RunState(
        cfg,
        model,
        objective,
        train,
        augment,
        device,
        optimizer,
        [g["lr"] for g in optimizer.param_groups],
        LRSchedule(cfg, steps_per_epoch),
        EpochMonitor.for_metric(cfg.monitor),
        steps_per_epoch,
        out,
        run_key,
        runtime,
        runtime.grad_scaler(),
    )


def _choose_cpu_precision(run: _RunState) -> None:
    """precision="auto" on the CPU, one process: a resumed run keeps the precision its checkpoint
    chose; a fresh run long enough to pay for it times fp32 and, where the CPU has a bf16 path
    (precision.no_fast_bf16), bf16 autocast, each with and without channels_last (helpers.precision),
    on its first batch and trains in the fastest; a short one, or one with nothing to choose
    between, stays in fp32."""
    if run.device.type != "cpu" or run.cfg.precision != "auto" or distributed.is_distributed():
        return
    choice = run.at.precision_choice
    if choice is None:
        tic = budget_clock.now()  # (the budget's clock: tests drive it)
        total = run.cfg.total_steps(run.steps_per_epoch)
        worth = precision.worth_measuring(total, run.cfg.budget_s)
        no_bf16 = precision.no_fast_bf16() if worth else ""
        batch = next(iter(run.train.epoch(0)), None) if worth else None
        options = precision.candidates(run.cfg.channels_last, batch[0].dim() == 4) if batch is not None else []
        if len(options) < 2:  # a run too short to pay for the measurement, nothing to choose between, no batch
            why = "no training batch" if worth and batch is None else no_bf16 or "nothing to choose between"
            why = why if worth else f"a {total}-step run is too short to measure"
            choice = {"used": "fp32", "channels_last": False, "reason": f"auto: fp32 on cpu ({why})", "timings": {}}
        else:
            images, labels = batch
            x, targets = run.augment.eval(images.to(run.device)), labels.to(run.device)
            timings = precision.measure(
                run.model, run.objective, x, targets, channels_last=run.cfg.channels_last, budget_s=run.cfg.budget_s
            )
            used, channels_last, reason = precision.choose(timings, no_bf16, run.cfg.budget_s)
            choice = {"used": used, "channels_last": channels_last, "reason": reason, "timings": timings}
            # a budget counts the measurement as training time: a 120 s run at 64 px spent 5-8 s of
            # measuring on top of its budget before
            run.call.probe_seconds = budget_clock.now() - tic
        run.at.precision_choice = choice
    run.runtime = Runtime(
        str(run.device), choice["used"], choice["channels_last"], cpu_channels_last=choice["channels_last"]
    )
    precision.set_layout(run.model, choice["channels_last"])  # (a copy of a channels_last model is one too)


def _loaded_result(run: _RunState) -> FitResult:
    """The result of a finished run trained by another process (load_finished_run), with the
    best weights restored as after training."""
    finished = (
        run.out is not None and has_checkpoint(run.out) and (run.at.stopped_early or run.at.epoch >= run.num_epochs())
    )
    if not finished:
        where = run.out / LAST if run.out is not None else "(no out_dir)"
        raise RuntimeError(
            f"{where}: the run trained by torchrun did not finish (epoch {run.at.epoch} of {run.num_epochs()}); its output above says why"
        )
    session = run.at.last_session or {}
    run.at.resumed_from = session.get("resumed_from")
    if run.cfg.restore_best and run.monitor.best_epoch is not None:
        run.model.load_state_dict(load_best_weights(run.out, run.device, run.at.run_id))
    result = _result(run, False, wall_seconds=session.get("wall_seconds", 0.0))
    result.eval_seconds = session.get("eval_seconds", 0.0)
    return result


def _check_distributed(cfg: FitConfig, train: BatchSource, device: torch.device) -> None:
    """What several processes need: equal local batches, and no budget run (its plan is per process)."""
    if cfg.budget_s > 0:
        raise SettingsError(
            f"budget_s={cfg.budget_s}: a time budget is planned from one process's step times; with several GPUs give epochs (or max_steps) instead"
        )
    sampler = getattr(train, "batch_sampler", None)
    if sampler is not None and hasattr(sampler, "p"):
        distributed.check_shardable(sampler.p * sampler.k, "the P x K batch", classes=sampler.p)
    elif getattr(train, "drop_last", False):
        distributed.check_shardable(train.batch_size)
    else:
        raise SettingsError(
            "with several GPUs the training batches must all be full (drop_last), so every GPU gets as many images"
        )
    if cfg.sync_bn and device.type != "cuda":
        notice(
            "sync_bn=True: SyncBatchNorm needs CUDA; on the CPU each process normalises with its own batch statistics"
        )


def _save_last(run: _RunState, state: dict) -> None:
    """Rank 0 writes last.pt (every rank has taken part in `_checkpoint(run)`), timed."""
    tic = time.perf_counter()
    if distributed.is_main():
        save_last(run.out, state)
    run.call.saved_at = time.perf_counter()
    run.call.save_seconds = run.call.saved_at - tic


def _checkpoint_due(run: _RunState, last: bool) -> bool:
    """Whether this epoch's end writes last.pt: the last epoch always, else once cfg.checkpoint_every_s
    seconds have passed since the last write (automatic: CHECKPOINT_COST_RATIO x that write's
    seconds, so writing costs at most 1/CHECKPOINT_COST_RATIO of the time; on short epochs of a
    large model a write per epoch cost 20-40 % of a CPU budget run). Rank 0 decides for every rank."""
    every = run.cfg.checkpoint_every_s
    interval = CHECKPOINT_COST_RATIO * run.call.save_seconds if every < 0 else every
    due = last or not run.call.saved_at or time.perf_counter() - run.call.saved_at >= interval
    return distributed.agree(due and distributed.is_main())


def _rank_state(ckpt: dict) -> dict:
    """This rank's RNG, augmentation draws and running sums from a checkpoint."""
    ranks = ckpt.get("ranks")
    return ranks[distributed.rank()] if ranks and len(ranks) == distributed.world_size() else ckpt


def _resume(run: _RunState) -> None:
    """Continue from out/last.pt: refuse another format, configuration, run key, length or model,
    then restore model, objective, optimizer, schedule, monitor, position and RNG states."""
    ckpt = load_last(run.out, run.device)
    check_same_run(ckpt, run.out / LAST, run.cfg, run.run_key, run.steps_per_epoch)
    try:  # (a finished run's slim last.pt keeps its weights in best.pt only: checkpoint.slim_finished)
        run.model.load_state_dict(
            ckpt["model"] if ckpt["model"] is not None else load_best_weights(run.out, "cpu", ckpt.get("run_id"))
        )
        run.objective.load_state_dict(ckpt["objective"])
    except RuntimeError as exc:
        raise SettingsError(
            f"{run.out / LAST} holds a different model ({str(exc).splitlines()[0]}). "
            "Pass resume=False or use another out_dir to start afresh."
        ) from None
    run.at.run_id = ckpt.get("run_id") or run.at.run_id
    if run.cfg.restore_best and ckpt["monitor"].get("best_epoch") is not None and distributed.is_main():
        load_best(
            run.out / BEST, "cpu", run.at.run_id
        )  # (now, not after the training: its best weights must still be there)
    if ckpt["optimizer"] is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["schedule"])
    run.monitor.load_state_dict(ckpt["monitor"])
    run.at.epoch, run.at.step, run.at.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
    run.at.resumed_from = {"epoch": run.at.epoch, "step": run.at.step}
    run.at.budget_spent = ckpt["budget_elapsed"] or 0.0
    run.at.last_session = ckpt.get("session")
    run.at.stopped_early = any(h.get("stopped_early") for h in run.at.history)  # a finished run is not continued
    saved_world, world = ckpt.get("world_size", 1), distributed.world_size()
    finished = run.at.stopped_early or run.at.epoch >= run.num_epochs()
    if saved_world != world and not finished:
        if run.at.step > 0:
            raise SettingsError(
                f"{run.out / LAST} was stopped within epoch {run.at.epoch + 1} of a run on {saved_world} process(es); every process "
                f"saved its own position and random state, so it can only continue on {saved_world} (gpus={saved_world}). "
                "Or pass resume=False / another out_dir to start afresh."
            )
        notice(
            f"{run.out / LAST} was trained on {saved_world} process(es) and continues on {world}: the batches are the same, "
            "but batch-norm statistics and augmentation draws are not, so it will not equal an uninterrupted run exactly"
        )
    own = _rank_state(ckpt)
    set_rng_state(own["rng"])
    run.at.precision_choice = ckpt.get("precision_choice")
    run.at.crop_dropped = bool(ckpt.get("crop_dropped"))
    if run.at.crop_dropped:
        run.augment = run.augment.without_translation()
    if run.at.precision_choice is None and ckpt.get("precision", run.runtime.precision) != run.runtime.precision:
        notice(
            f"{run.out / LAST} was trained in {ckpt['precision']} and continues in {run.runtime.precision} "
            "(precision 'auto' on another GPU): the resumed run will not equal an uninterrupted one exactly"
        )
    if run.scaler is not None and ckpt.get(
        "scaler"
    ):  # (a checkpoint of another precision has none: the scaler starts afresh)
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.at.step > 0:  # within an epoch: its sums and augmentation draws so far
        run.at.aug_rng = AugmentRNG(_augment_seed(run.cfg.seed, run.at.epoch), run.device)
        run.at.aug_rng.load_state(own["augment_rng"])
        run.at.sums = _EpochSums.from_state(own["running"], run.device)


def _augment_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch (each rank of several draws its own numbers)."""
    return (seed * 1_000_003 + epoch * 7919 + 17 + distributed.rank() * 104_729) % (2**62)


def _train_epoch(run: _RunState, on_step, stop_request: StopRequest, progress: bool, name: str) -> None:
    """The steps of epoch `run.at.epoch` from `run.at.step` on, to its end or the run's: one optimizer
    step per batch at the scheduled LR, the loss and accuracy summed on the device in `run.at.sums`."""
    at, schedule, epoch = run.at, run.schedule, run.at.epoch
    first = epoch * run.steps_per_epoch  # the run's index of the epoch's first step
    epoch_steps = min(run.steps_per_epoch, schedule.total - first)  # the last may be short
    if at.step == 0:  # (a run resumed within this epoch continues its sums and draws)
        at.aug_rng, at.sums = AugmentRNG(_augment_seed(run.cfg.seed, epoch), run.device), _EpochSums.zeros(run.device)
    run.model.train()
    run.objective.train()
    label = f"{name} epoch {epoch + 1}/{run.epochs_label()}".strip()
    bar = ProgressBar(epoch_steps, at.step, label) if progress and distributed.is_main() else None
    tic, seen_at_tic = time.perf_counter(), at.sums.seen
    run.call.at_boundary = False
    if run.call.board is not None:
        run.call.board_mark = (float(at.sums.loss_sum), at.sums.seen)
    for images, labels in run.train.epoch(epoch, start=at.step) if first + at.step < schedule.total else ():
        lr = _set_lr(run, first + at.step)
        try:
            loss, logits = _step(run, images, labels, name)
        except BatchDoesNotFit:
            images = loss = logits = None  # (a notebook keeps the traceback's frames: hold no batch there)
            raise
        at.sums.add(loss, logits, labels)
        at.step += 1
        _plan_budget(run, first + at.step)
        if at.step % run.cfg.log_every == 0 or at.step == epoch_steps:
            _check_finite(run, lr)
            if bar is not None:
                bar.update_to(at.step, postfix(at.sums, at.sums.seen - seen_at_tic, time.perf_counter() - tic))
            if run.call.board is not None:
                _board_steps(run, first + at.step, lr)
        if on_step is not None:
            on_step(epoch, at.step)
        if distributed.agree(stop_request.pending):  # every rank stops after the same step (one process: the flag)
            raise KeyboardInterrupt
        if first + at.step >= schedule.total:  # a max_steps or budget run ends inside its last epoch
            break
    _check_finite(run, run.optimizer.param_groups[0]["lr"])
    at.sums.seconds += time.perf_counter() - tic
    if bar is not None:
        bar.close()


def _set_lr(run: _RunState, global_step: int) -> float:
    """The scheduled LR of the run's step `global_step` on every parameter group; returns the first group's."""
    factor = run.schedule.factor(global_step)
    for group, base in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base * factor
    return run.base_lrs[0] * factor


def _step(run: _RunState, images: torch.Tensor, labels: torch.Tensor, name: str):
    """One optimizer step on a batch, augmented on the device: (loss, logits or None). A step that
    runs out of device memory raises BatchDoesNotFit with a batch size that fits."""
    x, targets = run.augment.train(images, labels, run.at.aug_rng)
    x = run.runtime.prepare(x)
    loss = logits = None
    try:
        with run.runtime.autocast():
            loss, logits = run.call.train_step(x, targets)
        _optimizer_step(run, loss)
        return loss, logits
    except RuntimeError as exc:  # CUDA: torch.cuda.OutOfMemoryError; MPS: a RuntimeError saying so
        if not is_out_of_memory(exc):
            raise
    # (handled outside the except: its traceback holds the failed step's tensors)
    loss = logits = images = labels = None
    error = _batch_does_not_fit(run, x, targets, name)
    x = targets = None  # (a notebook keeps the traceback's frames: hold no batch there)
    raise error from None


def _plan_budget(run: _RunState, steps_done: int) -> None:
    """A budget run counts its steps and, from FIRST_PLAN_STEP on, fixes its total as soon as it can."""
    budget, schedule = run.call.budget, run.schedule
    if budget is None:
        return
    budget.step_done(steps_done)
    if steps_done >= FIRST_PLAN_STEP and schedule.total == UNPLANNED and (total := budget.plan(steps_done)) is not None:
        _replan(run, steps_done, total)


def _replan(run: _RunState, steps_done: int, total: int) -> None:
    """Set the budget run's length to `total` steps; when this is its first plan and it is under
    crop_min_epochs, train on without the pad crop's translation (a notice says so)."""
    first = run.schedule.total == UNPLANNED
    run.schedule.replan(steps_done, total)
    epochs = total / run.steps_per_epoch
    if first and epochs < run.cfg.crop_min_epochs and run.augment.translates:
        notice(
            f"a {epochs:.2g}-epoch budget run (under crop_min_epochs={run.cfg.crop_min_epochs:g}): "
            f"training without the {run.augment.padding} px random crop from step {steps_done + 1} (flips kept)"
        )
        run.at.crop_dropped = True
        run.augment = run.augment.without_translation()  # (a copy: the caller's augmentation is left alone)


def _check_finite(run: _RunState, lr: float) -> None:
    """TrainingDiverged when a loss of the epoch so far was NaN or infinite (on any rank: the ranks stop together)."""
    if distributed.any_rank(run.at.sums.nonfinite, device=run.device)[0]:
        raise _diverged(run.at.epoch, run.at.step, lr)


def _optimizer_step(run: _RunState, loss: torch.Tensor) -> None:
    """Backward and one optimizer step; with fp16 through the gradient scaler (gradients unscaled
    before clipping; a step whose gradients overflowed is skipped and the scale lowered)."""
    optimizer, clip = run.optimizer, run.cfg.grad_clip
    optimizer.zero_grad(set_to_none=True)
    if run.scaler is None:
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        optimizer.step()
        return
    run.scaler.scale(loss).backward()
    if clip > 0:
        run.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    run.scaler.step(optimizer)
    run.scaler.update()


def _batch_does_not_fit(run: _RunState, x: torch.Tensor, targets: torch.Tensor, name: str) -> BatchDoesNotFit:
    """The error for a step that ran out of device memory: on CUDA, after measuring one forward +
    backward pass on a quarter of the batch (a sixteenth, ... when that does not fit either;
    helpers.memory), with a batch size that fits."""
    batch, memory, probe = x.shape[0], device_memory(run.device), None
    n = batch
    while memory is not None and probe is None and n > 1:
        n = max(1, n // 4)
        run.optimizer.zero_grad(set_to_none=True)
        memory.release()
        static = memory.allocated_mb()
        try:
            with run.runtime.autocast():
                loss, _ = run.objective(run.call.run_model, x[:n], targets[:n])
            loss.backward()
            probe = MemoryProbe(n, static, memory.peak_mb(), memory.total_mb())
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
        loss = None
    if memory is not None:
        run.optimizer.zero_grad(set_to_none=True)
        memory.release()
    fits = fitting_batch_size(probe, batch, extra_static_mb=optimizer_state_mb(run.optimizer)) if probe else 0
    where = f"{name or 'training'} (epoch {run.at.epoch + 1}, step {run.at.step + 1})"
    return BatchDoesNotFit(advice(where, run.device.type.upper(), batch, run.base_lrs[0], probe, fits))


def _end_epoch(run: _RunState, evaluate, progress: bool, name: str) -> bool:
    """Record the epoch just trained, evaluate it (every eval_every epochs and the last), keep the
    best weights, cut a plateau's LR, write last.pt and history.json; True to stop early."""
    cfg, schedule, sums, epoch = run.cfg, run.schedule, run.at.sums, run.at.epoch
    steps_done = epoch * run.steps_per_epoch + run.at.step
    loss_sum, correct, seen, scored = sums.over_ranks(run.device)
    record = {
        "epoch": epoch + 1,
        "lr": run.base_lrs[0] * schedule.factor(max(0, steps_done - 1)),
        "steps": steps_done,
        "train_loss": float(loss_sum) / max(1, seen),
        "train_top1": float(correct) / scored if scored else None,
        "train_seconds": sums.seconds,
        "images_per_s": seen / sums.seconds if sums.seconds > 0 else None,
    }
    if run.call.budget is not None and (total := run.call.budget.plan(steps_done)) is not None:
        if steps_done < schedule.total:  # (a finished run stays finished)
            _replan(run, steps_done, total)
    distributed.broadcast_buffers(run.model)  # (every rank evaluates and saves rank 0's model)
    evaluating = evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == run.num_epochs())
    if evaluating:
        run.model.eval()
        run.objective.eval()
        tic = time.perf_counter()
        with torch.no_grad(), run.call.budget.paused() if run.call.budget is not None else nullcontext():
            record.update(evaluate(run.call.run_model))
        record["eval_seconds"] = time.perf_counter() - tic
        run.call.eval_seconds += record["eval_seconds"]
    value = record.get(cfg.monitor) if cfg.monitor else None
    if cfg.monitor and evaluating and value is None:
        raise SettingsError(f"monitor={cfg.monitor!r} is not among the evaluated metrics {sorted(record)}")
    if run.monitor.update(value, epoch + 1) and run.out is not None and distributed.is_main():
        save_best(run.out, run.model, epoch + 1, cfg.monitor, value, asdict(cfg), run.at.run_id, run.run_key)
    schedule.epoch_end(run.monitor)
    stop = run.monitor.stalled(cfg.patience) and epoch + 1 < run.num_epochs()
    record["best_epoch"] = run.monitor.best_epoch
    if stop:
        record["stopped_early"] = True
    run.at.history.append(record)
    if run.call.board is not None:
        run.call.board.epoch(steps_done, record)
    if progress and distributed.is_main():
        print(epoch_line(name, record, run.epochs_label()), flush=True)
    saved = run.out is None  # (nothing to write)
    if run.out is not None:
        if saved := _checkpoint_due(run, last=stop or epoch + 1 >= run.num_epochs()):
            _save_last(run, _checkpoint(run, epoch_done=True))
        if distributed.is_main():
            atomic_write_json(run.at.history, run.out / HISTORY)
    # (not saved: a Ctrl-C / SIGTERM before the next step writes last.pt at this boundary)
    run.at.epoch, run.at.step, run.call.at_boundary = epoch + 1, 0, saved
    return stop


def _board_steps(run: _RunState, step: int, lr: float) -> None:
    """TensorBoard: the mean training loss of the steps since the last point, and the LR."""
    loss_sum, seen = float(run.at.sums.loss_sum), run.at.sums.seen
    mark_loss, mark_seen = run.call.board_mark
    if seen > mark_seen:
        run.call.board.steps(step, (loss_sum - mark_loss) / (seen - mark_seen), lr)
    run.call.board_mark = (loss_sum, seen)


def _diverged(epoch: int, step: int, lr: float) -> TrainingDiverged:
    return TrainingDiverged(
        f"The training loss became NaN or infinite in epoch {epoch + 1} (by step {step}) at lr={lr:.3g}. "
        "Lower the learning rate or the warm-up's end point, set grad_clip (e.g. 1.0), or check the data for "
        "corrupt images. The last good checkpoint (if any) was not overwritten."
    )
