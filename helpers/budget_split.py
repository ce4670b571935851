"""Split a wall-time budget for the whole pipeline across its notebooks and their trainings.

The planner (helpers.plan) measures, for each notebook, the time it needs whatever its budget
(data preparation, the kernel start and imports, t-SNE, figures: `fixed_seconds`) and, for each
training, its step time and evaluation pass time. This module is the arithmetic on those numbers:

    budget = planning + report + sum(fixed) + sum over trainings of (train_j + evals_j x eval_j + run_j)

Every training gets the same fraction r of the work its profile asks of it (train_j = r x epochs_j
x steps_per_epoch_j x seconds_per_step_j), and at least the whole epochs a budget run needs to
plan itself, one or more (r_j = max(r, floor_j), `Training.share`): the profile's proportions
between notebooks and between the runs of a notebook are kept above that floor. An evaluated training runs r_j x epochs_j epochs and evaluates after each of them and once
more at the end, so the evaluation time grows with r; the largest r that fits is found by bisection.
The smallest budget is the one that gives every training one evaluated epoch (r = 0: every r_j at
its floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from helpers.errors import SettingsError

PLAN_MARGIN = 0.99  # helpers.budget.BudgetClock: the share of a budget the engine plans steps for
# helpers.budget.BudgetClock: a budget run can plan its length once `skip` (3) + 2 steps are timed, and
# does so at an epoch's end: an epoch of fewer steps makes it run whole epochs up to that many steps
MIN_BUDGET_STEPS = 5
MEASURED_PRECISION_S = 60.0  # a CPU budget of at least this measures its precision (helpers.precision)


class BudgetTooSmall(SettingsError):
    """A budget that cannot give every training one evaluated epoch."""


@dataclass(frozen=True)
class Training:
    """One training of a notebook, as the planner measured it. `parameter` is the notebook
    parameter that carries its budget (e.g. "budget_s", or T4's "cls_budget_s")."""

    name: str
    parameter: str
    epochs: int  # what the profile asks for
    steps_per_epoch: int
    seconds_per_step: float
    seconds_per_eval: float = 0.0  # one evaluation pass (0: the training is not evaluated)
    eval_every: int = 1
    speed_ratio: float = 1.0  # CPU precision "auto": the chosen precision's step time / fp32's (helpers.precision)
    probe_seconds: float = 0.0  # ... and what measuring it costs (inside its budget: the engine's clock counts it)
    run_seconds: float = 0.0  # the run's cost beyond its steps: set-up, checkpoints, finishing

    @property
    def work(self) -> float:
        """Training seconds of the profile's whole schedule."""
        return self.epochs * self.steps_per_epoch * self.seconds_per_step

    def share(self, fraction: float) -> float:
        """The fraction of its work this training gets when the pipeline's is `fraction`: at least one
        epoch, and at least the epochs a budget run needs to plan itself (MIN_BUDGET_STEPS)."""
        floor_epochs = max(1, math.ceil(MIN_BUDGET_STEPS / max(1, self.steps_per_epoch)))
        return max(fraction, min(1.0, floor_epochs / max(1, self.epochs)))

    def budget(self, fraction: float) -> float:
        """Its training seconds (the budget parameter it is given)."""
        return self.share(fraction) * self.work

    def eval_passes(self, fraction: float) -> int:
        """Evaluation passes of a budget run of `fraction` x its work: the engine plans
        PLAN_MARGIN x budget / step time steps and evaluates every epoch, the last (partial) one
        included, and once more at the end."""
        if self.seconds_per_eval <= 0:
            return 0
        share = self.share(fraction)
        if self.measures(fraction):  # faster steps: more epochs, so more evaluations, in the same seconds
            share /= self.speed_ratio
        epochs = max(1, math.ceil(PLAN_MARGIN * share * self.epochs))
        return math.ceil(epochs / self.eval_every) + 1

    def measures(self, fraction: float) -> bool:
        """Whether the training, given `fraction` of its work, measures its CPU precision first."""
        return (self.speed_ratio != 1.0 or self.probe_seconds > 0) and self.budget(fraction) >= MEASURED_PRECISION_S

    def seconds(self, fraction: float) -> float:
        return self.budget(fraction) + self.eval_passes(fraction) * self.seconds_per_eval + self.run_seconds


@dataclass(frozen=True)
class NotebookWork:
    name: str
    fixed_seconds: float  # data, kernel start and imports, t-SNE, figures: whatever the budget
    trainings: tuple[Training, ...] = field(default_factory=tuple)

    def seconds(self, fraction: float) -> float:
        return self.fixed_seconds + sum(t.seconds(fraction) for t in self.trainings)


def total_seconds(notebooks: list[NotebookWork], fraction: float, reserved_s: float) -> float:
    return reserved_s + sum(n.seconds(fraction) for n in notebooks)


def split_budget(notebooks: list[NotebookWork], budget_s: float, reserved_s: float = 0.0) -> dict:
    """{"fraction", "notebooks": {name: {"share", "planned_seconds", "training_seconds",
    "parameters": {parameter: seconds per training}}}, "planned_seconds"}.

    `reserved_s` is what is spent outside the notebooks (planning so far, the report). Raises
    BudgetTooSmall, naming the smallest budget that would work, when one epoch of every training
    does not fit."""
    if budget_s <= 0:
        raise SettingsError(f"--budget {budget_s:g} s is not valid; give a positive time such as 90m")
    if not any(t.work > 0 for n in notebooks for t in n.trainings):
        raise SettingsError(
            "--budget: nothing to share out, no training of the selected notebooks could be planned (see above why)"
        )
    low = 0.0  # every training at its floor of one epoch
    need = total_seconds(notebooks, low, reserved_s)
    if need > budget_s:
        raise BudgetTooSmall(
            f"--budget {format_seconds(budget_s)} is too small for one evaluated epoch of every training "
            f"(that needs {format_seconds(need)} on this device, planning included); give at least --budget {math.ceil(need / 60)}m, "
            "or fewer notebooks with --only"
        )
    high = max(low, 1.0)
    while total_seconds(notebooks, high, reserved_s) < budget_s and high < 1e6:
        high *= 2
    for _ in range(60):  # the total grows with the fraction (in steps where an evaluation is added)
        middle = (low + high) / 2
        low, high = (middle, high) if total_seconds(notebooks, middle, reserved_s) <= budget_s else (low, middle)
    return _at_fraction(notebooks, low, reserved_s, budget_s)


def _at_fraction(notebooks: list[NotebookWork], fraction: float, reserved_s: float, budget_s: float = 0.0) -> dict:
    """The split at `fraction`; shares are of `budget_s` (of the planned total when 0)."""
    budget_s = budget_s or max(total_seconds(notebooks, fraction, reserved_s), 1e-9)
    out = {}
    for n in notebooks:
        parameters: dict[str, list[float]] = {}
        for t in n.trainings:
            parameters.setdefault(t.parameter, []).append(t.budget(fraction))
        planned = n.seconds(fraction)
        out[n.name] = {
            "share": round(planned / budget_s, 4),
            "planned_seconds": round(planned, 1),
            "training_seconds": round(sum(t.budget(fraction) for t in n.trainings), 1),
            "parameters": {
                p: max(0.1, math.ceil(10 * sum(v) / len(v)) / 10) for p, v in parameters.items()
            },  # (never 0: "no budget")
        }
    return {
        "fraction": fraction,
        "notebooks": out,
        "planned_seconds": round(total_seconds(notebooks, fraction, reserved_s), 1),
    }


def split_rest(notebooks: list[NotebookWork], seconds_left: float, budget_s: float) -> dict:
    """`split_budget` of the `seconds_left` of a budget over the notebooks yet to run, once the
    earlier ones took more or less than planned: the slack (or the overrun) is carried forward. Never
    refused: when even one evaluated epoch of each does not fit, each gets that floor. Shares stay
    fractions of the whole `budget_s`."""
    try:
        split = split_budget(notebooks, seconds_left)
    except SettingsError:  # (BudgetTooSmall, or no time or training left to share out)
        split = _at_fraction(notebooks, 0.0, 0.0)
    for n in split["notebooks"].values():
        n["share"] = round(n["planned_seconds"] / budget_s, 4)
    return split


def parse_duration(text: str) -> float:
    """Seconds of "90m", "1.5h", "300s" or "300" (seconds); SettingsError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = str(text).strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds <= 0:
        raise SettingsError(
            f"--budget {text!r} is not valid; give a positive time with a unit s, m or h, e.g. 90m or 1h"
        )
    return seconds


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
