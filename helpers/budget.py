"""Training for a wall-clock budget, and step-time measurements.

A budget run must still anneal: its LR schedule has to know the total number of steps. `fit` with
`FitConfig(budget_s=...)` measures its own first steps (during the LR warm-up, whose length does not
depend on the total), fixes the total after 12 steps (a warm-up longer than a quarter of the planned
run is then shortened to a quarter, LRSchedule.replan), and corrects it at every epoch end
from the step time measured so far; the schedule keeps its progress across a correction, so the LR
never jumps (`LRSchedule.replan`). Evaluation does not count against the budget.

`measure_seconds_per_step` (and helpers.plan's `measure_fit_step`, a few steps of `fit` on a
throw-away copy of the model) serve predictions before a run (`helpers.plan`, `helpers.proof
--plan`); `plan_steps` turns a step time into a step count for loops that must fix it up front (the
peer's OneCycle).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch


def now() -> float:
    """The clock of budget runs (a function so tests can drive it)."""
    return time.perf_counter()


class BudgetClock:
    """Training time of a budget run (evaluation excluded) and the step count that fills the budget.

    `fit` calls `step_done(global_step)` after each optimizer step, wraps evaluation in
    `paused()`, and asks `plan(global_step)` for the total number of steps: the steps done plus
    what the rest of the budget allows at the step time measured since the `skip`-th step of this
    session (the first steps of a process are slow: allocations, kernel selection). `spent_s` is
    the training time of earlier sessions of a resumed run.
    """

    def __init__(self, budget_s: float, spent_s: float = 0.0, skip: int = 3, margin: float = 0.99):
        self.budget_s, self.spent_s, self.skip, self.margin = budget_s, spent_s, skip, margin
        self.started = now()
        self.paused_s = 0.0
        self.session_steps = 0
        self.ref: tuple[float, float, int] | None = None  # (time, paused_s, global step) after `skip` steps

    def elapsed(self) -> float:
        """Training seconds spent by the run so far, across sessions, evaluation excluded."""
        return self.spent_s + now() - self.started - self.paused_s

    def step_done(self, global_step: int) -> None:
        self.session_steps += 1
        if self.session_steps == self.skip:
            self.ref = (now(), self.paused_s, global_step)

    def seconds_per_step(self, global_step: int) -> float | None:
        if self.ref is None or global_step - self.ref[2] < 2:
            return None
        t0, paused0, step0 = self.ref
        return (now() - t0 - (self.paused_s - paused0)) / (global_step - step0)

    def plan(self, global_step: int) -> int | None:
        """Total steps of the run (>= global_step), or None while too few steps are measured."""
        per_step = self.seconds_per_step(global_step)
        if per_step is None:
            return None
        return global_step + plan_steps(self.budget_s, max(per_step, 1e-9), self.elapsed(), self.margin, minimum=0)

    class _Pause:
        def __init__(self, clock: "BudgetClock"):
            self.clock = clock

        def __enter__(self):
            self.tic = now()

        def __exit__(self, *exc):
            self.clock.paused_s += now() - self.tic

    def paused(self) -> "_Pause":
        """Context manager: time inside does not count (evaluation passes)."""
        return BudgetClock._Pause(self)


class StepClock:
    """An `on_step` callback that timestamps optimizer steps after `warmup` of them.

    On CUDA the device is synchronised at the two timestamps only, so the figure is the real step
    time and the steps in between run as they would in training.
    """

    class Enough(Exception):
        """Raised by a clock with `enough_s` once it has timed enough: the measuring run stops there."""

    def __init__(self, warmup: int, device: torch.device | str = "cpu", enough_s: float = 0.0):
        self.warmup, self.device = warmup, torch.device(device)
        self.enough_s = enough_s  # > 0: stop the run (StepClock.Enough) once 2 or more timed steps took this long
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0  # steps after the warm-up

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, epoch: int = 0, step: int = 0) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.first = self._now()
        elif self.steps > self.warmup:
            self.last = self._now()
            if self.enough_s and self.steps - self.warmup >= 2 and self.last - self.first >= self.enough_s:
                raise StepClock.Enough

    @property
    def seconds_per_step(self) -> float:
        if self.first is None or self.last is None:
            raise RuntimeError(f"StepClock saw {self.steps} steps; it needs more than warmup={self.warmup}")
        return (self.last - self.first) / (self.steps - self.warmup)


def measure_seconds_per_step(
    step: Callable[[], None],
    warmup: int = 5,
    steps: int = 15,
    device: torch.device | str = "cpu",
    max_seconds: float = 0.0,
) -> float:
    """Seconds per call of `step` after `warmup` calls (e.g. one training step of a plain loop).

    max_seconds > 0 keeps the measurement in proportion to a short budget: the warm-up ends after
    half of it, and the measurement after all of it once at least two steps were timed."""
    clock = StepClock(0, device)
    start, first, timed = clock._now(), None, 0
    for done in range(1, warmup + steps + 1):
        step()
        now = clock._now()
        if first is None:
            if done >= warmup or (max_seconds > 0 and now - start >= max_seconds / 2):
                first = now
            continue
        timed += 1
        if max_seconds > 0 and timed >= 2 and now - start >= max_seconds:
            break
    if not timed:
        raise RuntimeError(f"measure_seconds_per_step timed no step (warmup={warmup}, steps={steps})")
    return (now - first) / timed


def plan_steps(
    budget_s: float, seconds_per_step: float, spent_s: float = 0.0, margin: float = 0.98, minimum: int = 1
) -> int:
    """Steps that fit in what is left of the budget (a margin for the epoch ends' overheads), at least `minimum`."""
    if budget_s <= 0:
        raise ValueError(f"budget_s={budget_s} must be > 0")
    if not seconds_per_step > 0:
        raise ValueError(f"seconds_per_step={seconds_per_step} must be > 0")
    return max(minimum, math.floor(margin * (budget_s - spent_s) / seconds_per_step))
