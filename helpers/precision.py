"""precision="auto" on the CPU, chosen by measurement.

Whether bf16 autocast pays on a CPU depends on the CPU (AVX512-BF16 and AMX have bf16 matrix
units; others emulate it) and on the model and input: measured on an Intel Xeon with AMX,
ResNet-18 at 64 px with the small stem trains 2.6x faster in bf16 + channels_last, at 32 px with
the ImageNet stem 0.6x as fast. So a run that is long enough times a few training steps of the
model at hand, on one of its own batches, in fp32 and bf16 autocast, each with and without
channels_last memory, and trains in the fastest. bf16 must be clearly faster (`BF16_GAIN`): it
rounds activations, so a tie goes to fp32. channels_last changes no number but the layout: measured
on an AMD EPYC with AVX2 only (no bf16 path, so only the fp32 pair is timed there), a training step
of ResNet-18 at 32 px took 1.13x less time in fp32 + channels_last at batch 128. The timings and the choice go into
the checkpoint (a resumed run keeps its choice) and into the metrics.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from helpers.budget_split import MEASURED_PRECISION_S
from helpers.runinfo import Runtime, _autocast_works

CANDIDATES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)
BF16_GAIN = 1.10  # bf16 is chosen only when at least 10 % faster than the fastest fp32
CHANNELS_LAST_GAIN = 1.03  # channels_last only when at least 3 % faster (a tie keeps the usual layout)
MIN_STEPS = 200  # a shorter run keeps fp32: the measurement costs about a dozen steps
MIN_BUDGET_S = MEASURED_PRECISION_S  # ... and so does a shorter time budget
ROUNDS = 3  # timed steps of each candidate, taken in turns (the fastest counts)
SLOW_WARM = 4.0  # a candidate whose warm step takes this many times fp32's is dropped (an emulated bf16)


def cpu_capability() -> str:
    """PyTorch's CPU capability, e.g. "AVX512", "AVX2", "DEFAULT" (what its kernels dispatch to)."""
    return torch.backends.cpu.get_cpu_capability()


def no_fast_bf16() -> str:
    """Why bf16 autocast cannot pay on this CPU ("" where it may: it is then measured)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not cpu_capability().startswith("AVX512"):
        return f"no bf16 matrix path on this CPU (PyTorch's CPU capability: {cpu_capability()})"
    return ""


def label(precision: str, channels_last: bool) -> str:
    return precision + (" + channels_last" if channels_last else "")


def time_step(
    step: Callable[[], None], steps: int = 3, clock: Callable[[], float] = time.perf_counter, warm: bool = True
) -> float:
    """Seconds per call of `step` (after one warm call unless `warm` is False)."""
    if warm:
        step()
    tic = clock()
    for _ in range(steps):
        step()
    return (clock() - tic) / steps


def candidates(channels_last: bool = True, images: bool = True) -> list[tuple[str, bool]]:
    """The (precision, channels_last) pairs worth timing on this CPU: bf16 only where bf16 autocast
    works and may be fast (`no_fast_bf16`), channels_last only for image batches when the
    configuration allows it. A single candidate (fp32) needs no measurement."""
    return [
        (precision, layout)
        for precision, layout in CANDIDATES
        if not (layout and not (channels_last and images))
        and not (precision == "bf16" and (no_fast_bf16() or not _autocast_works("cpu", "bf16")))
    ]


def measure(
    model: nn.Module,
    objective: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    rounds: int = ROUNDS,
    channels_last: bool = True,
    budget_s: float = 0.0,
) -> dict[str, float]:
    """{label: seconds per forward + backward} of copies of `model` (and `objective`) on one CPU
    batch, for every candidate (`candidates`; channels_last ones only when `channels_last` and `x`
    is a (B, C, H, W) batch): after one warm step each, the candidates take turns for `rounds` rounds of one
    step, and each keeps its fastest. (Timed one after another, the first candidate paid the
    process's cold start: fp32 read 192 ms against 175 ms, and bf16 was chosen at 1.43x where a
    longer timing gives 1.04x.) A candidate whose warm step took over SLOW_WARM x fp32's keeps that
    reading and is not timed again. With `budget_s`, a budget that affords fewer than MIN_STEPS of
    fp32's warm step returns that reading alone (nothing is worth choosing then). The global random
    state is left as it was (dropout draws nothing for the training itself)."""
    with torch.random.fork_rng(devices=[]):
        steps = {}
        for precision, layout in candidates(channels_last, x.dim() == 4):
            runtime = Runtime("cpu", precision, layout, cpu_channels_last=layout)
            probe = set_layout(copy.deepcopy(model), layout).train()
            steps[label(precision, layout)] = _training_step(
                runtime, probe, copy.deepcopy(objective).train(), runtime.prepare(x), targets
            )
        warm = {"fp32": time_step(steps["fp32"], steps=1, warm=False)}
        if too_short(budget_s, warm["fp32"]):
            return warm
        warm |= {name: time_step(step, steps=1, warm=False) for name, step in steps.items() if name != "fp32"}
        timings = {name: float("inf") for name in steps}
        slow = {name: seconds for name, seconds in warm.items() if seconds > SLOW_WARM * warm["fp32"]}
        for _ in range(rounds):
            for name, step in steps.items():
                if name not in slow:
                    timings[name] = min(timings[name], time_step(step, steps=1, warm=False))
    return timings | slow


def too_short(budget_s: float, step_s: float) -> bool:
    """Whether a time budget affords fewer than MIN_STEPS steps of `step_s` (0: no budget)."""
    return 0 < budget_s < MIN_STEPS * step_s


def set_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """`model` with its 4-D weights in channels_last memory, or back in the usual layout (a model
    copied from one trained in channels_last keeps that layout otherwise); returns it."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _training_step(runtime: Runtime, model: nn.Module, objective: nn.Module, batch, targets) -> Callable[[], None]:
    def step():
        with runtime.autocast():
            loss, _ = objective(model, batch, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _fastest(timings: dict[str, float], precision: str) -> str | None:
    """The label of `precision`'s fastest layout: channels_last only when CHANNELS_LAST_GAIN faster."""
    plain, other = timings.get(precision), timings.get(label(precision, True))
    if plain is None:
        return None if other is None else label(precision, True)
    return label(precision, True) if other is not None and plain / other >= CHANNELS_LAST_GAIN else precision


def choose(timings: dict[str, float], no_bf16: str = "", budget_s: float = 0.0) -> tuple[str, bool, str]:
    """(precision, channels_last, reason) from measured seconds per step: the fastest, bf16 only
    when it beats the fastest fp32 by BF16_GAIN, a channels_last layout only when it beats the usual
    one by CHANNELS_LAST_GAIN. `no_bf16`: why bf16 was not timed (for the reason); `budget_s`: a
    budget that affords under MIN_STEPS steps of fp32 keeps fp32 (`measure` stopped after one step)."""
    fp32 = timings["fp32"]
    best32, best16 = _fastest(timings, "fp32"), _fastest(timings, "bf16")
    fastest32 = min(v for k, v in timings.items() if k.startswith("fp32"))
    measured = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in timings.items())
    if too_short(budget_s, fp32):
        return (
            "fp32",
            False,
            f"auto on cpu: fp32 (its budget affords under {MIN_STEPS} steps of {1000 * fp32:.0f} ms: too short to measure)",
        )
    if best16 is not None and fastest32 / timings[best16] >= BF16_GAIN:
        return (
            "bf16",
            best16.endswith("channels_last"),
            f"auto on cpu, measured per step: {measured}; {best16} is {fp32 / timings[best16]:.2f}x fp32",
        )
    why = no_bf16 or ("bf16 autocast unavailable" if best16 is None else f"bf16 is not {BF16_GAIN:.2f}x faster")
    if best32 != "fp32":
        return (
            "fp32",
            True,
            f"auto on cpu, measured per step: {measured}; {best32} is {fp32 / timings[best32]:.2f}x fp32 ({why})",
        )
    return "fp32", False, f"auto on cpu, measured per step: {measured}; fp32 ({why})"


def worth_measuring(total_steps: int, budget_s: float) -> bool:
    """Whether a run is long enough for the measurement to pay for itself."""
    return budget_s >= MIN_BUDGET_S if budget_s > 0 else total_steps >= MIN_STEPS


def probe(model: nn.Module, objective: nn.Module, train, augment, cfg, device) -> tuple[float, float]:
    """(chosen step time / fp32 step time, seconds the measurement takes) for a training of `model`
    with `cfg` on `device` that measures its precision (CPU, "auto"); (1.0, 0.0) elsewhere. For
    planning a budget (helpers.plan): the engine makes the same measurement and choice."""
    if torch.device(device).type != "cpu" or cfg.precision != "auto" or len(candidates(cfg.channels_last)) < 2:
        return 1.0, 0.0
    images, labels = next(iter(train.epoch(0)), (None, None))
    if images is None or len(candidates(cfg.channels_last, images.dim() == 4)) < 2:
        return 1.0, 0.0
    tic = time.perf_counter()
    timings = measure(
        model, objective, augment.eval(images), labels, channels_last=cfg.channels_last, budget_s=cfg.budget_s
    )
    spent = time.perf_counter() - tic
    used, channels_last, _ = choose(timings)
    return timings[label(used, channels_last)] / timings["fp32"], spent
