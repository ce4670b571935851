"""Optimization settings of `fit`: the optimizer and its parameter groups, the per-step LR schedule,
and `EpochMonitor`, the best-so-far tracking of the monitored held-out metric that both early
stopping and the plateau schedule act on.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn

from helpers.fit_config import OPTIMIZERS, SCHEDULES, FitConfig  # noqa: F401 (OPTIMIZERS, SCHEDULES: importable from here too)
from helpers.runinfo import notice

UNPLANNED = 10**12  # the length of a budget run before its first plan


class EpochMonitor:
    """The best value of a metric over the evaluated epochs and how many evaluated epochs have
    passed since it without improving on it (a tie is no improvement)."""

    def __init__(self, higher_is_better: bool = True):
        self.higher_is_better = higher_is_better
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0  # evaluated epochs since the best one
        self.updated = self.improved = False  # the last update had a value / set a new best

    @classmethod
    def for_metric(cls, name: str) -> EpochMonitor:
        """Lower is better for losses and errors, higher for everything else (accuracy, recall, mAP)."""
        return cls(higher_is_better=not ("loss" in name or name.endswith("error")))

    def update(self, value: float | None, epoch: int) -> bool:
        """Record epoch `epoch`'s value (None: not evaluated, nothing changes); True on a new best."""
        self.updated = value is not None
        self.improved = value is not None and (
            self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        )
        if self.improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        elif value is not None:
            self.bad_epochs += 1
        return self.improved

    def stalled(self, patience: int) -> bool:
        """Early stopping: this epoch was evaluated and `patience` (> 0) evaluated epochs brought no new best."""
        return patience > 0 and self.updated and self.bad_epochs >= patience

    def plateau_ended(self, patience: int) -> bool:
        """The plateau schedule's cut: this epoch was evaluated, brought no new best, and ends the
        (patience + 1)-th, 2 (patience + 1)-th, ... epoch since the best: each cut waits anew."""
        return self.updated and not self.improved and self.bad_epochs % (max(0, patience) + 1) == 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


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
        if self.total != UNPLANNED:
            self.warmup = self._short_run_warmup(self.warmup, self.total)
        self.anchor_step, self.anchor_progress = self.warmup, 0.0  # see replan
        self.plateau_factor = 1.0

    def _short_run_warmup(self, warmup: int, total: int, step: int = 0) -> int:
        """A warm-up of more than a quarter of the run is scaled to a quarter of it (not before
        `step`, the steps already taken), with a notice: a run as short as its warm-up would
        otherwise end at its peak LR."""
        limit = max(step, total // 4)
        if warmup <= limit or self.cfg.warmup_epochs <= 0:  # (onecycle's own 30 % is its shape)
            return warmup
        notice(
            f"warmup_epochs={self.cfg.warmup_epochs:g} is longer than a quarter of this {total / self.steps_per_epoch:.3g}-epoch run; "
            f"warming up over {limit / self.steps_per_epoch:.3g} epochs instead"
        )
        return limit

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
        if step < self.warmup:  # a budget shorter than the warm-up: its length is known only now
            self.warmup = self.anchor_step = self._short_run_warmup(self.warmup, total, step)
        if step > self.anchor_step:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total = total

    def epoch_end(self, monitor: EpochMonitor) -> None:
        """`plateau`: multiply the LR by plateau_factor when `monitor` has not improved for plateau_patience + 1 evaluated epochs."""
        if self.cfg.schedule == "plateau" and monitor.plateau_ended(self.cfg.plateau_patience):
            self.plateau_factor *= self.cfg.plateau_factor

    def state_dict(self) -> dict:
        return {
            "plateau_factor": self.plateau_factor,
            "total": self.total,
            "anchor_step": self.anchor_step,
            "anchor_progress": self.anchor_progress,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        if self.cfg.budget_s > 0:  # a budget run keeps the length it had planned
            self.total, self.anchor_step, self.anchor_progress = (
                state["total"],
                state["anchor_step"],
                state["anchor_progress"],
            )
            self.warmup = state.get("warmup", self.warmup)


def build_optimizer(params, cfg: FitConfig, device: torch.device, scaled: bool = False) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over parameter groups; no weight decay on biases and normalisation weights.
    cfg.fused: one fused kernel per step on CUDA, and on the CPU where this PyTorch has one (2.4 on);
    on a 2-core CPU it cut ResNet-18's SGD step from 8.3 to 2.8 ms, 11 % of a step at batch 32.
    `scaled` (fp16 with a gradient scaler): not fused on the CPU. There, with torch 2.14, the fused
    SGD made the engine's fp16 resume test diverge (NaN loss in its third epoch; the plain loop
    trains it). The cause was not found: a lone overflowed step is skipped by both."""
    params = list(params)
    fused_here = device.type == "cuda" or (device.type == "cpu" and not scaled)
    fused = {"fused": True} if cfg.fused and fused_here else {}
    if cfg.fused and device.type == "mps":
        notice(
            "fused=True: fused optimizer kernels are used on CUDA and the CPU only; MPS uses PyTorch's default (foreach) optimizer"
        )
    try:
        return _optimizer(params, cfg, fused)
    except RuntimeError:  # (an older PyTorch without CPU kernels: "fused=True requires all the params to be ...")
        if not fused or device.type == "cuda":
            raise
        return _optimizer(params, cfg, {})


def _optimizer(params: list, cfg: FitConfig, options: dict) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            **options,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


def parameter_groups(
    model: nn.Module, objective: nn.Module, weight_decay: float, objective_lr: float | None = None
) -> list[dict]:
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
