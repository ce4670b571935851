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
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from helpers.atomic import atomic_torch_save, atomic_write_json, remove_stale_temporaries
from helpers.budget import BudgetClock
from helpers.data.loaders import BatchSource
from helpers.data.transforms import AugmentRNG, BatchAugment
from helpers.objectives import CrossEntropyObjective

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "plateau", "constant")
CHECKPOINT_FORMAT = 1


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a training after its state was saved; `.result` holds the partial run.

    A KeyboardInterrupt, so nothing after the training runs (a notebook stops at this cell, a script
    exits) and no partial result can be reported as a finished one."""

    def __init__(self, message: str, result: "FitResult"):
        super().__init__(message)
        self.result = result


def check_choice(name: str, value, valid) -> None:
    """Raise ValueError naming the valid values when `value` is not one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class FitConfig:
    """Everything `fit` needs to know besides the model and the data."""

    epochs: int = 10
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | step | plateau | constant (all after the warm-up)
    warmup_epochs: float = 0.0  # linear warm-up from lr / 25 (onecycle: 30 % of training when 0)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    step_epochs: int = 30  # "step": multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    plateau_patience: int = 2  # "plateau": epochs without held-out improvement before cutting the LR
    plateau_factor: float = 0.2
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    monitor: str = "heldout_top1"  # metric for best checkpoint / early stopping / plateau; "" = none
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    restore_best: bool = True  # load the best held-out weights into the model at the end
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # (CUDA only)
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    fused: bool = True  # fused optimizer kernels (CUDA only)
    log_every: int = 25  # steps between host reads of the running loss (progress bar, NaN check)
    seed: int = 0
    max_steps: int = 0  # > 0: train exactly this many steps (the schedule spans them; epochs is then derived)
    budget_s: float = 0.0  # > 0: train for this many seconds (evaluation excluded); steps planned from measured step times
    eval_every: int = 1  # run `evaluate` every N epochs (and always after the last one)

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1")
        if self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps} must be >= 0 (0 = epochs x steps per epoch)")
        if self.budget_s < 0 or (self.budget_s > 0 and self.max_steps > 0):
            raise ValueError(f"budget_s={self.budget_s} must be >= 0, and cannot be combined with max_steps={self.max_steps}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: max_steps when set, else epochs x steps_per_epoch."""
        return self.max_steps or self.epochs * steps_per_epoch

    def num_epochs(self, steps_per_epoch: int) -> int:
        """Epochs the loop runs (the last one may stop early when max_steps is set)."""
        return -(-self.total_steps(steps_per_epoch) // max(1, steps_per_epoch))


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
    train_seconds: float = 0.0  # time in the training loops only
    wall_seconds: float = 0.0  # the whole call (this session's part of it when resumed)
    eval_seconds: float = 0.0  # evaluation passes within the wall time

    def record(self) -> dict:
        """What the metrics files say about how complete this training is."""
        return {
            "epochs_planned": self.planned_epochs, "epochs_done": len(self.history), "interrupted": self.interrupted,
            "stopped_early": self.stopped_early, "resumed_from": self.resumed_from,
            "complete": not self.interrupted and (self.stopped_early or len(self.history) >= self.planned_epochs),
        }

    @property
    def images_per_s(self) -> float:
        rates = [h["images_per_s"] for h in self.history if h.get("images_per_s")]
        return float(np.median(rates)) if rates else float("nan")


# ------------------------------------------------------------------------------------ schedule


UNPLANNED = 10**12  # the length of a budget run before its first plan


class LRSchedule:
    """Per-step LR multiplier: linear warm-up, then the main schedule. `plateau` cuts a factor per epoch."""

    def __init__(self, cfg: FitConfig, steps_per_epoch: int):
        self.cfg = cfg
        # a budget run starts open-ended (the LR stays at its peak) until fit plans its length
        self.total = UNPLANNED if cfg.budget_s > 0 else max(1, cfg.total_steps(steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        warmup_steps = cfg.warmup_epochs * steps_per_epoch
        if cfg.warmup_epochs <= 0 and cfg.schedule == "onecycle":  # 30 % of the run (of `epochs` for a budget run)
            warmup_steps = 0.3 * cfg.total_steps(steps_per_epoch)
        self.warmup = min(int(warmup_steps), self.total - 1)
        self.anchor_step, self.anchor_progress = self.warmup, 0.0  # see replan
        self.plateau_factor = 1.0
        self.best = -math.inf
        self.bad_epochs = 0

    def factor(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            start = 1 / 25
            return start + (1 - start) * step / self.warmup
        progress = self.progress(step)
        if cfg.schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "onecycle":
            end = 1 / 1e4
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step - self.warmup) // max(1, cfg.step_epochs * self.steps_per_epoch))
        if cfg.schedule == "plateau":
            return self.plateau_factor
        return 1.0

    def progress(self, step: int) -> float:
        """Fraction of the post-warm-up schedule done at `step` (0 at the end of the warm-up, 1 at the end)."""
        if step <= self.anchor_step:
            return self.anchor_progress if step == self.anchor_step else 0.0
        done = (step - self.anchor_step) / max(1, self.total - self.anchor_step)
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * done)

    def replan(self, step: int, total: int) -> None:
        """Change the run's length to `total` steps at `step`, keeping the progress reached so far
        (the LR is continuous): the rest of the schedule is stretched or squeezed into what is left."""
        total = max(total, step)  # `step` itself: the budget is spent, the run ends here
        if step > self.anchor_step:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total = total

    def epoch_end(self, value: float | None, higher_is_better: bool) -> None:
        if self.cfg.schedule != "plateau" or value is None:
            return
        score = value if higher_is_better else -value
        if score > self.best:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.plateau_patience:
                self.plateau_factor *= self.cfg.plateau_factor
                self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {
            "plateau_factor": self.plateau_factor, "best": self.best, "bad_epochs": self.bad_epochs,
            "total": self.total, "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor, self.best, self.bad_epochs = state["plateau_factor"], state["best"], state["bad_epochs"]
        if self.cfg.budget_s > 0 and "total" in state:  # a budget run keeps the length it had planned
            self.total, self.anchor_step, self.anchor_progress = state["total"], state["anchor_step"], state["anchor_progress"]


def build_optimizer(params, cfg: FitConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over parameter groups; no weight decay on biases and normalisation weights."""
    fused = {"fused": True} if cfg.fused and device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def parameter_groups(model: nn.Module, objective: nn.Module, weight_decay: float, objective_lr: float | None = None) -> list[dict]:
    """Decay for weights of rank >= 2, none for biases and norm scales; the objective's own
    parameters (e.g. center-loss centers) in a group of their own, optionally with their own LR."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    own = [p for p in objective.parameters() if p.requires_grad]
    if own:
        group = {"params": own, "weight_decay": 0.0}
        if objective_lr is not None:
            group["lr"] = objective_lr
        groups.append(group)
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------ checkpoints


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def augment_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**62)


# ------------------------------------------------------------------------------------ the loop


@dataclass
class _Progress:
    """Running sums of one epoch, kept on the device until read."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    scored: int = 0  # samples with logits (accuracy is undefined for pure metric losses)
    nonfinite: torch.Tensor | None = None
    seconds: float = 0.0

    @classmethod
    def zeros(cls, device) -> "_Progress":
        z = torch.zeros((), device=device, dtype=torch.float64)
        return cls(z.clone(), z.clone(), nonfinite=torch.zeros((), device=device, dtype=torch.bool))

    def state(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "correct": float(self.correct), "seen": self.seen, "scored": self.scored, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict, device) -> "_Progress":
        p = cls.zeros(device)
        p.loss_sum += state["loss_sum"]
        p.correct += state["correct"]
        p.seen, p.scored, p.seconds = state["seen"], state["scored"], state["seconds"]
        return p


# FitConfig fields a resumed run may change: how often it reports (the length may not change:
# the LR schedule depends on it, so a longer resumed run would equal neither run)
_NOT_COMPARED = ("eval_every", "log_every")


def _monitor_mode(monitor: str) -> bool:
    """True when higher is better."""
    return not ("loss" in monitor or monitor.endswith("error"))


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
) -> FitResult:
    """Train `model` on `train` for `cfg.epochs` epochs (or exactly `cfg.max_steps` optimizer steps);
    returns the history and the best epoch.

    `evaluate(model) -> {"heldout_top1": ..., "test_top1": ...}` runs after every epoch (model in
    eval mode); `cfg.monitor` names the metric that picks the best checkpoint, drives early stopping
    and the plateau schedule (held-out only: never the test split). With `out_dir`, checkpoints
    `last.pt` / `best.pt` and `history.json` are written there and an existing `last.pt` is resumed
    (unless `resume=False`); a checkpoint of another length (`epochs`, `max_steps`) is refused.
    Ctrl-C saves `last.pt` and raises TrainingInterrupted (`on_interrupt="return"`: returns the
    partial result with `result.interrupted` set). `on_step(epoch, step)` is called after every step.
    `run_key` (e.g. the notebook's whole configuration) is stored in the checkpoint; a checkpoint
    written under another key (other data, model or settings) is never resumed silently.
    """
    check_choice("on_interrupt", on_interrupt, ("raise", "return"))
    called_at = time.perf_counter()
    eval_seconds = 0.0
    device = torch.device(device)
    objective = objective if objective is not None else CrossEntropyObjective(cfg.label_smoothing)
    cuda = device.type == "cuda"
    model.to(device)
    objective.to(device)
    if cfg.channels_last and cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(parameter_groups(model, objective, cfg.weight_decay, objective_lr), cfg, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = len(train)
    schedule = LRSchedule(cfg, steps_per_epoch)

    def num_epochs() -> int:  # a budget run's length changes as it is planned
        return -(-schedule.total // max(1, steps_per_epoch))

    def epochs_label() -> str:
        return "?" if schedule.total == UNPLANNED else str(num_epochs())

    higher_is_better = _monitor_mode(cfg.monitor)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, recursive=False)  # left by a run killed mid-write

    start_epoch, start_step, history = 0, 0, []
    best_value, best_epoch, bad_epochs = None, None, 0
    running: dict | None = None
    augment_state = None
    ckpt = None
    resumed_from = None
    if out is not None and resume and (out / "last.pt").is_file():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        saved = {k: v for k, v in ckpt["config"].items() if k not in _NOT_COMPARED} | {f"run.{k}": v for k, v in (ckpt.get("run_key") or {}).items() if k != "epochs"}
        current = {k: v for k, v in asdict(cfg).items() if k not in _NOT_COMPARED} | {f"run.{k}": v for k, v in (run_key or {}).items() if k != "epochs"}
        diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
        if set(diff) == {"epochs"}:
            planned = FitConfig(**ckpt["config"]).num_epochs(steps_per_epoch)
            state = "finished" if ckpt["epoch"] >= planned else f"stopped after epoch {ckpt['epoch']}"
            raise ValueError(
                f"{out / 'last.pt'} is a {saved['epochs']}-epoch run ({state}); epochs is now {cfg.epochs}. "
                f"Its LR schedule was planned for that length, so continuing it for {cfg.epochs} would equal neither run. "
                f"Set epochs={saved['epochs']} to resume it, or pass resume=False (or another out_dir) to train {cfg.epochs} epochs afresh."
            )
        if diff:
            raise ValueError(
                f"{out / 'last.pt'} was written with a different configuration {diff} (saved, now). "
                "Resume with the same settings, or pass resume=False / another out_dir to start afresh."
            )
        try:
            model.load_state_dict(ckpt["model"])
            objective.load_state_dict(ckpt["objective"])
        except RuntimeError as exc:
            raise ValueError(
                f"{out / 'last.pt'} holds a different model ({str(exc).splitlines()[0]}). "
                "Pass resume=False or use another out_dir to start afresh."
            ) from None
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        start_epoch, start_step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        best_value, best_epoch, bad_epochs = ckpt["best_value"], ckpt["best_epoch"], ckpt["bad_epochs"]
        running, augment_state = ckpt.get("running"), ckpt.get("augment_rng")
        resumed_from = {"epoch": start_epoch, "step": start_step}
        set_rng_state(ckpt["rng"])
        if any(h.get("stopped_early") for h in history):
            start_epoch = num_epochs()  # the run had finished by early stopping
    run_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    budget = BudgetClock(cfg.budget_s, spent_s=(ckpt.get("budget_elapsed") or 0.0) if ckpt is not None else 0.0) if cfg.budget_s > 0 else None
    first_plan_step = max(schedule.warmup, 12)  # the total is fixed here, then corrected at epoch ends
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.amp and cuda) else nullcontext()

    def checkpoint(epoch: int, step: int, progress_state: dict | None, aug: AugmentRNG | None) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": epoch,
            "step": step,
            "history": history,
            "best_value": best_value,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "running": progress_state,
            "augment_rng": aug.state() if aug is not None else None,
            "rng": rng_state(),
            "config": asdict(cfg),
            "run_key": run_key,
            "budget_elapsed": budget.elapsed() if budget is not None else None,
        }

    result = FitResult(history=history, monitor=cfg.monitor, out_dir=out, resumed_from=resumed_from, stopped_early=any(h.get("stopped_early") for h in history))
    bar_factory = _progress_bar if progress else None
    epoch, step, aug_rng, sums = start_epoch, start_step, None, None
    at_boundary = True  # last.pt already describes the current state
    stop_request = _StopRequest()
    try:
        epoch = start_epoch
        while epoch < num_epochs():
            epoch_steps = min(steps_per_epoch, schedule.total - epoch * steps_per_epoch)  # the last may be short
            aug_rng = AugmentRNG(augment_seed(cfg.seed, epoch), device)
            sums = _Progress.zeros(device)
            if epoch == start_epoch and start_step > 0:
                aug_rng.load_state(augment_state)
                sums = _Progress.from_state(running, device)
            step = start_step if epoch == start_epoch else 0
            model.train()
            objective.train()
            bar = bar_factory(epoch_steps, step, f"{name} epoch {epoch + 1}/{epochs_label()}".strip()) if bar_factory else None
            tic = time.perf_counter()
            seen_at_tic = sums.seen
            at_boundary = False
            for images, labels in train.epoch(epoch, start=step) if epoch * steps_per_epoch + step < schedule.total else ():
                global_step = epoch * steps_per_epoch + step
                factor = schedule.factor(global_step)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                x, targets = augment.train(images, labels, aug_rng)
                if cfg.channels_last and cuda and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss, logits = objective(run_model, x, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                n = labels.shape[0]
                detached = loss.detach()
                sums.loss_sum += detached.double() * n
                sums.nonfinite |= ~torch.isfinite(detached)
                if logits is not None:
                    sums.correct += (logits.detach().argmax(1) == labels).sum()
                    sums.scored += n
                sums.seen += n
                step += 1
                if budget is not None:
                    budget.step_done(global_step + 1)
                    if global_step + 1 >= first_plan_step and schedule.total == UNPLANNED and (total := budget.plan(global_step + 1)) is not None:
                        schedule.replan(global_step + 1, total)
                if step % cfg.log_every == 0 or step == epoch_steps:
                    if bool(sums.nonfinite):
                        raise _diverged(epoch, step, base_lrs[0] * factor)
                    if bar is not None:
                        elapsed = sums.seconds + time.perf_counter() - tic
                        bar.update_to(step, _postfix(sums, elapsed, sums.seen - seen_at_tic, time.perf_counter() - tic))
                if on_step is not None:
                    on_step(epoch, step)
                if stop_request.pending:
                    raise KeyboardInterrupt
                if epoch * steps_per_epoch + step >= schedule.total:  # a max_steps or budget run ends inside its last epoch
                    break
            if bool(sums.nonfinite):
                raise _diverged(epoch, step, base_lrs[0] * factor)
            sums.seconds += time.perf_counter() - tic
            if bar is not None:
                bar.close()
            record = {
                "epoch": epoch + 1,
                "lr": base_lrs[0] * schedule.factor(max(0, epoch * steps_per_epoch + step - 1)),
                "steps": epoch * steps_per_epoch + step,
                "train_loss": float(sums.loss_sum) / max(1, sums.seen),
                "train_top1": float(sums.correct) / sums.scored if sums.scored else None,
                "train_seconds": sums.seconds,
                "images_per_s": sums.seen / sums.seconds if sums.seconds > 0 else None,
            }
            if budget is not None and (total := budget.plan(epoch * steps_per_epoch + step)) is not None:
                if epoch * steps_per_epoch + step < schedule.total:  # (a finished run stays finished)
                    schedule.replan(epoch * steps_per_epoch + step, total)
            evaluating = evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == num_epochs())
            if evaluating:
                model.eval()
                objective.eval()
                tic = time.perf_counter()
                with torch.no_grad(), (budget.paused() if budget is not None else nullcontext()):
                    record.update(evaluate(run_model))
                record["eval_seconds"] = time.perf_counter() - tic
                eval_seconds += record["eval_seconds"]
            value = record.get(cfg.monitor) if cfg.monitor else None
            if cfg.monitor and evaluating and value is None:
                raise ValueError(f"monitor={cfg.monitor!r} is not among the evaluated metrics {sorted(record)}")
            improved = value is not None and (best_value is None or (value > best_value if higher_is_better else value < best_value))
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch + 1, 0
                if out is not None:
                    atomic_torch_save({"model": model.state_dict(), "epoch": epoch + 1, cfg.monitor: value, "config": asdict(cfg)}, out / "best.pt")
            elif value is not None:
                bad_epochs += 1
            schedule.epoch_end(value, higher_is_better)
            stop = cfg.patience > 0 and value is not None and bad_epochs >= cfg.patience and epoch + 1 < num_epochs()
            record["best_epoch"] = best_epoch
            if stop:
                record["stopped_early"] = True
            history.append(record)
            if progress:
                print(_epoch_line(name, record, epochs_label()), flush=True)
            if out is not None:
                atomic_torch_save(checkpoint(epoch + 1, 0, None, None), out / "last.pt")
                atomic_write_json(history, out / "history.json")
            at_boundary = True
            start_step = 0
            if stop_request.pending:
                raise KeyboardInterrupt
            if stop:
                result.stopped_early = True
                break
            epoch += 1
    except KeyboardInterrupt:
        result.interrupted = True
        interrupted_at = (epoch, step, at_boundary)
        # A first Ctrl-C is deferred to the end of the current step (see _StopRequest), so the
        # state here is consistent; a second, forced one may land mid-step: keep the last checkpoint.
        consistent = not stop_request.forced
        if out is not None and not at_boundary and consistent and sums is not None:
            atomic_torch_save(checkpoint(epoch, step, sums.state(), aug_rng), out / "last.pt")
    finally:
        stop_request.release()
    result.history = history
    result.best_value, result.best_epoch = best_value, best_epoch
    result.train_seconds = sum(h["train_seconds"] for h in history)
    result.wall_seconds, result.eval_seconds = time.perf_counter() - called_at, eval_seconds
    result.planned_epochs = num_epochs() if schedule.total != UNPLANNED else cfg.epochs
    if result.interrupted:
        message = _interrupted_message(name, *interrupted_at, result.planned_epochs, len(history), out, stop_request.forced)
        if on_interrupt == "raise":
            raise TrainingInterrupted(message, result)
        print(message, flush=True)
        return result
    if cfg.restore_best and out is not None and best_epoch is not None and (out / "best.pt").is_file():
        model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=False)["model"])
    return result


def _interrupted_message(name: str, epoch: int, step: int, at_boundary: bool, planned: int, done: int, out: Path | None, forced: bool) -> str:
    where = f"in epoch {epoch + 1}/{planned} at step {step}" if not at_boundary else f"after epoch {done}/{planned}"
    what = f"Training{' of ' + name if name else ''} was interrupted {where}"
    if out is None:
        return f"{what}; nothing was saved (no out_dir), so a rerun starts afresh."
    if forced and not at_boundary:  # a second Ctrl-C does not wait for the step to end
        if not (out / "last.pt").is_file():
            return f"{what} at once; nothing was saved yet, so a rerun starts afresh."
        saved = f"the previous checkpoint {out / 'last.pt'} is kept"
    else:
        saved = f"its state is saved in {out / 'last.pt'}"
    return (
        f"{what}; {saved}. Nothing after the training ran and no result was recorded: "
        "rerun (with resume=True, the default) to continue from there."
    )


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request honoured at the next step boundary, so an
    interrupted run saves a consistent state; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.pending = self.forced = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True
        print("\nCtrl-C: stopping after this step (press again to stop at once)...", flush=True)

    def release(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _diverged(epoch: int, step: int, lr: float) -> TrainingDiverged:
    return TrainingDiverged(
        f"The training loss became NaN or infinite in epoch {epoch + 1} (by step {step}) at lr={lr:.3g}. "
        "Lower the learning rate or the warm-up's end point, set grad_clip (e.g. 1.0), or check the data for "
        "corrupt images. The last good checkpoint (if any) was not overwritten."
    )


def _postfix(sums: _Progress, elapsed: float, images: int, seconds: float) -> str:
    loss = float(sums.loss_sum) / max(1, sums.seen)
    acc = f" acc {100 * float(sums.correct) / sums.scored:.1f}%" if sums.scored else ""
    return f"loss {loss:.3f}{acc} {images / max(seconds, 1e-9):.0f} img/s"


def _epoch_line(name: str, record: dict, num_epochs: int | str) -> str:
    parts = [f"{name + ' ' if name else ''}epoch {record['epoch']}/{num_epochs}", f"loss {record['train_loss']:.4f}"]
    if record.get("train_top1") is not None:
        parts.append(f"train {100 * record['train_top1']:.1f}%")
    for key, value in record.items():
        if key.endswith(("_top1", "recall@1", "map@r")) and key != "train_top1" and isinstance(value, float):
            parts.append(f"{key} {100 * value:.1f}%")
    parts.append(f"lr {record['lr']:.3g}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.0f} img/s")
    parts.append(f"{record['train_seconds'] + record.get('eval_seconds', 0):.1f}s")
    return "  ".join(parts)


class _progress_bar:
    """A tqdm bar (notebook-aware via tqdm.auto) that can jump to a step."""

    def __init__(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def update_to(self, step: int, postfix: str) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
