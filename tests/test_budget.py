"""Budget training: step-planned runs in the engine (max_steps, eval_every) and the planner."""

import math
import time

import tempfile

import pytest
import torch

from helpers import budget
from helpers.budget import StepClock, measure_seconds_per_step, plan_steps
from helpers.plan import measure_fit_step, measure_run_seconds
from helpers.engine import FitConfig, TrainingInterrupted, fit
from helpers.optim import LRSchedule
from helpers.data.transforms import BatchAugment

from test_engine import assert_same_run, interrupt_at, run, setup, toy_model


def test_plan_steps_fits_the_rest_of_the_budget():
    assert plan_steps(100, 0.5) == math.floor(0.98 * 100 / 0.5)
    assert plan_steps(100, 0.5, spent_s=20) == math.floor(0.98 * 80 / 0.5)
    assert plan_steps(10, 0.5, spent_s=12) == 1  # over budget already: still one step
    with pytest.raises(ValueError, match="budget_s"):
        plan_steps(0, 0.5)
    with pytest.raises(ValueError, match="seconds_per_step"):
        plan_steps(10, 0.0)


def test_step_clock_measures_after_the_warmup():
    calls = []

    def step():
        time.sleep(0.05 if len(calls) < 3 else 0.01)  # slow first calls, as a cold start
        calls.append(1)

    seconds = measure_seconds_per_step(step, warmup=3, steps=5)
    assert len(calls) == 8
    assert 0.009 < seconds < 0.045, "the slow first calls (0.05 s) are left out"  # (room for a loaded machine)
    with pytest.raises(RuntimeError, match="needs more"):
        StepClock(4).seconds_per_step


def test_a_step_clock_with_enough_s_stops_a_slow_measurement_after_two_timed_steps(monkeypatch):
    """A planner's measuring run: slow steps (1.5 s) stop it after the warm-up and 2 timed steps;
    fast ones (0.1 s) never do; a controlled clock."""
    for seconds, stops_after in ((1.5, 2 + 2), (0.1, None)):
        now = [0.0]
        monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
        clock = StepClock(2, enough_s=2.0)
        stopped = None
        for step in range(1, 7):
            now[0] += seconds
            try:
                clock()
            except StepClock.Enough:
                stopped = step
                break
        assert stopped == stops_after
        assert clock.seconds_per_step == pytest.approx(seconds)


def test_the_planner_measures_a_slow_model_in_fewer_steps(monkeypatch, tmp_path):
    """measure_fit_step on a real `fit`: 2 warm-up + 2 timed steps of a model whose steps take 1.2 s
    (on the controlled clock), of the 6 it would take for fast steps."""
    for seconds, expected in ((1.2, 4), (0.01, 6)):
        now, steps = [0.0], []

        def on_batch(module, args):
            now[0] += seconds
            steps.append(1)

        monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
        train, augment, cfg, _ = setup(tmp_path, epochs=10)
        model = toy_model()
        # (the deep copy measure_fit_step trains keeps this hook: a forward pass is a step here)
        model.register_forward_pre_hook(on_batch)
        assert measure_fit_step(model, train, augment, cfg, warmup=2, steps=4) == pytest.approx(seconds)
        assert len(steps) == expected


def test_a_pilot_with_max_seconds_stays_in_proportion(monkeypatch):
    """With max_seconds the warm-up ends after half of it and the measurement after all of it (at
    least two timed steps); a controlled clock: every step takes 1 s."""
    now = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    calls = []

    def step():
        now[0] += 1.0
        calls.append(1)

    assert measure_seconds_per_step(step, warmup=50, steps=100, max_seconds=10) == pytest.approx(1.0)
    assert len(calls) == 10  # 5 warm-up steps (half of 10 s), then timed steps up to 10 s
    calls.clear()
    assert measure_seconds_per_step(step, warmup=50, steps=100, max_seconds=1) == pytest.approx(1.0)
    assert len(calls) == 3  # the warm-up ends after one step; two steps are always timed
    calls.clear()
    measure_seconds_per_step(step, warmup=3, steps=4)
    assert len(calls) == 7  # without max_seconds: exactly warmup + steps


def test_max_steps_runs_exactly_that_many_steps_and_anneals(tmp_path):
    steps_seen = []
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, max_steps=15, warmup_epochs=0.5)
    model = toy_model()
    result = fit(
        model, train, augment, cfg, evaluate=evaluator, on_step=lambda e, s: steps_seen.append((e, s)), progress=False
    )
    per_epoch = len(train)  # 96 // 16 = 6 steps per epoch
    assert per_epoch == 6 and len(steps_seen) == 15
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # 6 + 6 + 3: the last epoch is short
    assert [h["steps"] for h in result.history] == [6, 12, 15]
    assert steps_seen[-1] == (2, 3)
    schedule = LRSchedule(cfg, per_epoch)
    assert schedule.total == 15 and schedule.warmup == 3
    assert schedule.factor(14) < 0.02  # the cosine has (nearly) reached zero at the last step
    assert result.history[-1]["lr"] == pytest.approx(cfg.lr * schedule.factor(14))


def test_max_steps_resume_is_exact(tmp_path):
    whole = run(tmp_path, "whole", epochs=1, max_steps=14)
    run(
        tmp_path, "split", epochs=1, max_steps=14, on_step=interrupt_at(2, 1), on_interrupt="return"
    )  # inside the short last epoch
    resumed = run(tmp_path, "split", epochs=1, max_steps=14)
    assert_same_run(whole, resumed)


def test_eval_every_skips_epochs_but_always_evaluates_the_last(tmp_path):
    train, augment, cfg, evaluator = setup(tmp_path, epochs=5, eval_every=2)
    calls = []

    def counting(model):
        calls.append(1)
        return evaluator(model)

    result = fit(toy_model(), train, augment, cfg, evaluate=counting, progress=False)
    assert [("heldout_top1" in h) for h in result.history] == [False, True, False, True, True]
    assert len(calls) == 3
    assert result.best_epoch in (2, 4, 5)
    assert result.eval_seconds > 0 and result.wall_seconds >= result.train_seconds + result.eval_seconds * 0.99


def test_measure_fit_step_leaves_the_model_untouched(tmp_path, monkeypatch):
    train, augment, cfg, _ = setup(tmp_path, epochs=1)
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = measure_fit_step(model, train, augment, cfg, warmup=2, steps=3)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where its one-step run writes
    run = measure_run_seconds(model, train, augment, cfg, "cpu", seconds)
    assert run > 0, "a run's set-up and checkpoint cost something beyond its steps"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(scratch.iterdir()), "the run's scratch folder, with its last.pt, is gone"


def test_fit_config_validates_the_new_fields():
    with pytest.raises(ValueError, match="max_steps"):
        FitConfig(max_steps=-1)
    with pytest.raises(ValueError, match="eval_every"):
        FitConfig(eval_every=0)
    assert FitConfig(epochs=3).total_steps(10) == 30 and FitConfig(max_steps=25).num_epochs(10) == 3


class FakeClock:
    """Drives helpers.budget.now: every optimizer step costs `per_step` seconds, nothing else costs time."""

    def __init__(self, per_step: float):
        self.t, self.per_step = 0.0, per_step

    def __call__(self) -> float:
        return self.t

    def on_step(self, epoch, step):
        self.t += self.per_step


def test_budget_run_fills_its_budget_and_anneals(tmp_path, monkeypatch):
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, budget_s=2.0, warmup_epochs=0.5, eval_every=1)
    result = fit(toy_model(), train, augment, cfg, evaluate=evaluator, on_step=clock.on_step, progress=False)
    steps = result.history[-1]["steps"]
    assert 18 <= steps <= 20  # 2.0 s at 0.1 s a step, less the 1 % margin
    assert clock.t == pytest.approx(steps * 0.1)
    assert result.history[-1]["lr"] < 0.05 * 0.05  # annealed at the end
    assert [h["steps"] for h in result.history][:3] == [6, 12, 18]  # whole epochs, then the short last one


def test_a_budget_run_counts_its_precision_measurement_as_training_time(tmp_path, monkeypatch):
    from helpers import precision

    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    monkeypatch.setattr(precision, "MIN_BUDGET_S", 1.0)
    monkeypatch.setattr(precision, "MIN_STEPS", 5)  # (2 s affords 10 steps of fp32's 0.2 s: worth measuring)
    monkeypatch.setattr(precision, "no_fast_bf16", lambda: "")  # (any CPU: the timings are mocked)

    def measure(*args, **kwargs):  # 0.5 s of the budget's clock, as a real measurement would take
        clock.t += 0.5
        return {"fp32": 0.2, "bf16": 0.1}

    monkeypatch.setattr(precision, "measure", measure)
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, budget_s=2.0, warmup_epochs=0.5, precision="auto")
    result = fit(toy_model(), train, augment, cfg, evaluate=evaluator, on_step=clock.on_step, progress=False)
    steps = result.history[-1]["steps"]
    assert result.precision["used"] == "bf16" and clock.t == pytest.approx(0.5 + steps * 0.1)
    # (the run ends at an epoch's end once planned: epochs of 6 steps; 2.4 s if the measurement did not count)
    assert 1.5 <= clock.t <= 2.0, "the measurement and the steps fill the budget together"


def test_budget_run_resumes_within_the_same_budget(tmp_path, monkeypatch):
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, budget_s=2.0, warmup_epochs=0.5)
    whole = fit(
        toy_model(),
        train,
        augment,
        cfg,
        evaluate=evaluator,
        on_step=clock.on_step,
        out_dir=tmp_path / "a",
        progress=False,
    )

    clock.t = 0.0

    def stop_at_14(epoch, step):
        clock.on_step(epoch, step)
        if (epoch, step) == (2, 2):
            raise KeyboardInterrupt

    first = fit(
        toy_model(),
        train,
        augment,
        cfg,
        evaluate=evaluator,
        on_step=stop_at_14,
        out_dir=tmp_path / "b",
        progress=False,
        on_interrupt="return",
    )
    assert first.interrupted
    second = fit(
        toy_model(),
        train,
        augment,
        cfg,
        evaluate=evaluator,
        on_step=clock.on_step,
        out_dir=tmp_path / "b",
        progress=False,
    )
    assert second.history[-1]["steps"] == whole.history[-1]["steps"]  # the budget counts both sessions
    assert second.history[-1]["lr"] < 0.05 * 0.05


def test_replan_keeps_the_learning_rate_continuous():
    cfg = FitConfig(epochs=10, warmup_epochs=1)
    schedule = LRSchedule(cfg, 10)
    assert schedule.total == 100 and schedule.warmup == 10
    before = schedule.factor(40)
    schedule.replan(40, 60)  # less time than thought: the rest is squeezed
    assert schedule.factor(40) == pytest.approx(before) and schedule.total == 60
    assert schedule.factor(59) < 0.01 and schedule.progress(60) == 1.0
    previous = schedule.factor(40)
    for step in range(41, 60):  # still decreasing, no jump
        assert schedule.factor(step) < previous
        previous = schedule.factor(step)
    schedule.replan(5, 80)  # during the warm-up only the total changes
    with pytest.raises(ValueError, match="budget_s"):
        FitConfig(budget_s=5.0, max_steps=10)


def test_budget_run_of_the_recognition_runner(tiny_root, tmp_path):
    from helpers.config import RecognitionConfig
    from helpers.experiment import train_classifier
    from helpers.recognition import build_model, build_tiny_imagenet

    cfg = RecognitionConfig.build(
        "T2",
        "smoke",
        data_dir=str(tiny_root.parent),
        out_dir=str(tmp_path),
        image_size=16,
        batch_size=8,
        heldout_fraction=0.0,
        budget_s=2.0,
        stem="imagenet",
        train_per_class=0,
    )
    data = build_tiny_imagenet(cfg)
    assert data.heldout.num_samples == 0  # every training image is used
    summary = train_classifier("budget", build_model("resnet18", cfg, data.num_classes), data, cfg, progress=False)
    budget = summary.budget
    assert budget["budget_s"] == 2.0 and budget["steps"] == summary.history[-1]["steps"] >= 1
    assert budget["budget_seconds_used"] > 0
    assert summary.heldout["top1"] is None and 0 <= summary.test["top1"] <= 1


def test_a_budget_run_holds_its_peak_lr_until_planned():
    schedule = LRSchedule(FitConfig(epochs=3, warmup_epochs=0, budget_s=60.0), 10)
    assert schedule.factor(0) == 1.0 and schedule.factor(11) == pytest.approx(1.0)
    schedule.replan(12, 112)
    assert schedule.factor(12) == pytest.approx(1.0, abs=1e-9) and schedule.factor(111) < 1e-3


def test_a_warmup_longer_than_a_quarter_of_the_run_is_shortened_with_a_notice(tmp_path, monkeypatch, capsys):
    from helpers import runinfo

    monkeypatch.setattr(runinfo, "_NOTICED", set())
    # a fixed-length run: 1 epoch of 6 steps with a 2-epoch warm-up -> a quarter of the run (1 step)
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, warmup_epochs=2.0)
    schedule = LRSchedule(cfg, len(train))
    assert schedule.warmup == 6 // 4 and "warming up over 0.167 epochs instead" in capsys.readouterr().err
    assert schedule.factor(schedule.warmup) == pytest.approx(1.0) and schedule.factor(5) < 0.2, (
        "it anneals after its peak"
    )
    # a budget run (0.1 s a step, 3 s: about 30 steps) with a 4-epoch warm-up (24 steps): planned after 12 steps, shortened then
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    train, augment, cfg, evaluator = setup(tmp_path / "budget", epochs=1, budget_s=3.0, warmup_epochs=4.0)
    result = fit(toy_model(), train, augment, cfg, evaluate=evaluator, on_step=clock.on_step, progress=False)
    lrs = [h["lr"] for h in result.history]
    assert result.history[-1]["steps"] <= 30 and lrs[-1] < 0.05 * 0.1, "it still anneals to the end"
    assert "is longer than a quarter of this" in capsys.readouterr().err
    assert max(lrs) == pytest.approx(0.05, rel=0.05) or lrs[0] > lrs[-1]


def test_the_shortened_warmup_is_the_same_after_a_resume(tmp_path, monkeypatch):
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    straight = run(tmp_path, "straight", epochs=1, budget_s=3.0, warmup_epochs=4.0, on_step=clock.on_step)
    clock.t = 0.0
    with pytest.raises(TrainingInterrupted):
        run(
            tmp_path,
            "resumed",
            epochs=1,
            budget_s=3.0,
            warmup_epochs=4.0,
            on_step=lambda e, s: (clock.on_step(e, s), interrupt_at(2, 2)(e, s)),
        )
    resumed = run(tmp_path, "resumed", epochs=1, budget_s=3.0, warmup_epochs=4.0, on_step=clock.on_step)
    a, b = straight[1].history, resumed[1].history
    assert [h["lr"] for h in a[:2]] == [h["lr"] for h in b[:2]], "the same shortened warm-up before the interruption"
    assert a[-1]["steps"] == b[-1]["steps"] and b[-1]["lr"] < 0.05 * 0.1, (
        "the same length, annealed (the budget counts both sessions)"
    )


class RecordingAugment(BatchAugment):
    """Records the padding of every training batch it augments."""

    def train(self, x, labels, rng):
        self.seen.append(self.padding)
        return super().train(x, labels, rng)


def recording(augment):
    augment.__class__, augment.seen = RecordingAugment, []
    return augment


@pytest.mark.parametrize("crop_min_epochs, dropped", [(6.0, True), (3.0, False), (0.0, False)])
def test_a_budget_run_planned_under_crop_min_epochs_trains_on_without_the_translation(
    tmp_path, monkeypatch, capsys, crop_min_epochs, dropped
):
    """3 s at 0.1 s a step, epochs of 6 steps: first planned at the end of epoch 1 (3.8 epochs, from
    the steps timed so far): under crop_min_epochs the later batches are not translated (padding 0),
    flips stay; the caller's augmentation is not changed; the choice is in the training record."""
    from helpers import runinfo

    monkeypatch.setattr(runinfo, "_NOTICED", set())
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, budget_s=3.0, crop_min_epochs=crop_min_epochs)
    augment = recording(augment)
    result = fit(toy_model(), train, augment, cfg, evaluate=evaluator, on_step=clock.on_step, progress=False)
    seen, steps = augment.seen, result.history[-1]["steps"]
    assert augment.padding == 2 and len(seen) == steps
    assert result.crop_dropped is dropped and result.record()["crop_dropped"] is dropped
    if dropped:
        assert seen == [2] * 6 + [0] * (steps - 6), "translated until planned after step 6, not after"
        assert (
            "a 3.8-epoch budget run (under crop_min_epochs=6): training without the 2 px random crop from step 7"
            in capsys.readouterr().err
        )
    else:
        assert seen == [2] * steps
    fixed = setup(tmp_path, epochs=2, crop_min_epochs=6.0)  # not a budget run: never dropped
    assert not fit(toy_model(), *fixed[:3], evaluate=fixed[3], progress=False).crop_dropped


def test_a_run_that_dropped_the_translation_resumes_without_it(tmp_path, monkeypatch):
    """The choice is in last.pt: a session resumed after it trains without the translation too (its
    caller passes the usual augmentation again), and the run ends as planned."""
    clock = FakeClock(0.1)
    monkeypatch.setattr("helpers.budget.now", clock)

    def session(name, on_step, **kwargs):
        train, augment, cfg, evaluator = setup(tmp_path, epochs=1, budget_s=3.0, crop_min_epochs=6.0)
        augment = recording(augment)
        result = fit(
            toy_model(),
            train,
            augment,
            cfg,
            evaluate=evaluator,
            on_step=on_step,
            out_dir=tmp_path / name,
            progress=False,
            **kwargs,
        )
        return result, augment.seen

    straight, _ = session("straight", clock.on_step)
    clock.t = 0.0
    first, seen_first = session(
        "resumed", lambda e, s: (clock.on_step(e, s), interrupt_at(2, 4)(e, s)), on_interrupt="return"
    )
    second, seen_second = session("resumed", clock.on_step)
    assert first.interrupted and seen_first[:6] == [2] * 6 and seen_first[6:] == [0] * (len(seen_first) - 6)
    assert second.resumed_from is not None and second.crop_dropped and seen_second and set(seen_second) == {0}
    assert [h["lr"] for h in straight.history[:1]] == [h["lr"] for h in second.history[:1]]
    assert second.record()["complete"] and second.history[-1]["lr"] < 0.05 * 0.1, "it ends annealed"
