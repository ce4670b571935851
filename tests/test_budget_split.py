"""helpers.budget_split: the split of a pipeline budget, on mocked step and evaluation times."""

import math

import pytest

from helpers.budget_split import (
    BudgetTooSmall,
    NotebookWork,
    Training,
    parse_duration,
    split_budget,
    split_rest,
    total_seconds,
)
from helpers.errors import SettingsError


def notebooks():
    """Two notebooks: A trains one model (10 epochs x 100 steps x 0.1 s = 100 s of work, evaluated
    in 2 s), B two (30 epochs x 10 steps x 1 s = 300 s each; one not evaluated)."""
    a = NotebookWork(
        "A", fixed_seconds=20.0, trainings=(Training("A_model", "budget_s", 10, 100, 0.1, seconds_per_eval=2.0),)
    )
    b = NotebookWork(
        "B",
        fixed_seconds=40.0,
        trainings=(
            Training("B_classifier", "cls_budget_s", 30, 10, 1.0, seconds_per_eval=1.0),
            Training("B_pretrain", "pretrain_budget_s", 30, 10, 1.0),
        ),
    )
    return [a, b]


def test_the_split_keeps_the_profiles_proportions_and_fills_the_budget():
    books = notebooks()
    plan = split_budget(books, budget_s=600.0, reserved_s=30.0)
    r = plan["fraction"]
    assert 0 < r < 1
    a, b = plan["notebooks"]["A"], plan["notebooks"]["B"]
    # every training gets the same fraction of its work: 100 : 300 : 300
    assert a["parameters"]["budget_s"] == pytest.approx(100 * r, abs=0.1)
    assert b["parameters"]["cls_budget_s"] == pytest.approx(300 * r, abs=0.1) == b["parameters"]["pretrain_budget_s"]
    # evaluations: the engine runs ceil(0.99 r x epochs) epochs (the last one partial), one pass each plus the final one
    evals_a = max(1, math.ceil(0.99 * r * 10)) + 1
    evals_b = max(1, math.ceil(0.99 * r * 30)) + 1
    expected = 30 + 20 + 40 + 700 * r + 2.0 * evals_a + 1.0 * evals_b
    assert plan["planned_seconds"] == pytest.approx(expected, abs=0.2)
    assert 600 - 2.0 <= plan["planned_seconds"] <= 600.0  # filled up to the last evaluation step
    assert a["planned_seconds"] + b["planned_seconds"] + 30 == pytest.approx(plan["planned_seconds"], abs=0.2)
    assert a["share"] == pytest.approx(a["planned_seconds"] / 600, abs=1e-4)


def test_a_larger_budget_gives_more_training_and_never_exceeds_itself():
    books = notebooks()
    previous = 0.0
    for budget in (300.0, 450.0, 900.0, 3600.0):
        plan = split_budget(books, budget, reserved_s=10.0)
        assert plan["planned_seconds"] <= budget + 1e-6
        assert plan["fraction"] > previous
        previous = plan["fraction"]


def test_a_budget_too_small_for_one_epoch_is_refused_with_the_smallest_that_works():
    books = notebooks()
    need = total_seconds(books, 0.0, 30.0)
    # one epoch of each training, evaluated after it and at the end: A 10 s + 2 x 2 s, B 10 s + 2 x 1 s and 10 s
    assert need == pytest.approx(30 + 20 + (10 + 4) + 40 + (10 + 2) + 10)
    with pytest.raises(
        BudgetTooSmall, match=r"too small for one evaluated epoch.*give at least --budget \d+m"
    ) as caught:
        split_budget(books, budget_s=need - 1, reserved_s=30.0)
    minimum = int(str(caught.value).split("--budget ")[-1].split("m")[0])
    assert minimum * 60 >= need
    plan = split_budget(books, budget_s=minimum * 60, reserved_s=30.0)  # the budget it names works
    assert (
        plan["notebooks"]["A"]["parameters"]["budget_s"] >= 10
        and plan["notebooks"]["B"]["parameters"]["cls_budget_s"] >= 10
    )


def test_a_short_budget_gives_every_training_one_epoch_and_shares_the_rest_in_proportion():
    """Just above the smallest budget the common fraction r is below A's one epoch (1/10 of its
    work): A gets that one epoch, B's trainings r x 300 s, at least their own one epoch (10 s)."""
    books = notebooks()
    plan = split_budget(books, budget_s=total_seconds(books, 0.0, 30.0) + 20.0, reserved_s=30.0)
    r = plan["fraction"]
    assert 1 / 30 < r < 1 / 10
    assert plan["notebooks"]["A"]["parameters"]["budget_s"] == pytest.approx(10.0, abs=0.1)
    assert plan["notebooks"]["B"]["parameters"]["cls_budget_s"] == pytest.approx(300 * r, abs=0.1)
    assert plan["planned_seconds"] <= total_seconds(books, 0.0, 30.0) + 20.0


def test_the_rest_of_a_budget_is_split_again_and_an_overrun_leaves_every_training_its_floor():
    books = notebooks()
    whole = split_budget(books, budget_s=600.0, reserved_s=30.0)
    later = books[1:]  # A ran; B's share is split again from what is left
    planned_b = whole["notebooks"]["B"]["planned_seconds"]
    more, less = split_rest(later, planned_b + 30.0, 600.0), split_rest(later, planned_b - 30.0, 600.0)
    b_more, b_less = more["notebooks"]["B"], less["notebooks"]["B"]
    assert b_less["parameters"]["cls_budget_s"] < whole["notebooks"]["B"]["parameters"]["cls_budget_s"]
    assert b_more["parameters"]["cls_budget_s"] > whole["notebooks"]["B"]["parameters"]["cls_budget_s"]
    assert planned_b + 30.0 - 1.0 <= b_more["planned_seconds"] <= planned_b + 30.0  # (one evaluation: 1 s)
    assert b_more["share"] == pytest.approx(b_more["planned_seconds"] / 600.0, abs=1e-4)  # of the whole budget
    # nothing left: no refusal (the run is under way), every training at its floor of one evaluated epoch
    overrun = split_rest(later, -50.0, 600.0)["notebooks"]["B"]
    assert overrun["parameters"] == {"cls_budget_s": 10.0, "pretrain_budget_s": 10.0}
    assert overrun["planned_seconds"] == pytest.approx(total_seconds(later, 0.0, 0.0))


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("1.5h", 5400), ("300s", 300), ("45", 45), (" 2H ", 7200)])
def test_durations_take_s_m_h(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "0", "ninety", "5d", "nanm", "infh"])
def test_bad_durations_are_one_clear_message(text):
    with pytest.raises(SettingsError, match="not valid; give a positive time with a unit s, m or h"):
        parse_duration(text)


def test_nothing_to_plan_is_refused_and_tiny_shares_never_round_to_no_budget():
    with pytest.raises(SettingsError, match="nothing to share out"):
        split_budget([], 600.0)  # (every dataset missing: once a loop without end)
    with pytest.raises(SettingsError, match="nothing to share out"):
        split_budget([NotebookWork("A", 5.0, (Training("A_x", "budget_s", 3, 0, 0.1),))], 600.0)
    tiny = [
        NotebookWork("A", 1.0, (Training("A_x", "budget_s", 1, 1, 0.001),)),
        NotebookWork("B", 1.0, (Training("B_x", "budget_s", 1, 100, 1.0),)),
    ]
    plan = split_budget(tiny, 110.0)
    assert plan["notebooks"]["A"]["parameters"]["budget_s"] >= 0.1


def test_the_planned_evaluations_are_those_a_budget_run_of_the_engine_makes(tmp_path, monkeypatch):
    """The split's evaluation count against a real budget `fit`, on a controlled clock (0.1 s a step)."""
    from helpers.engine import fit
    from test_budget import FakeClock, setup, toy_model

    for budget_s in (2.0, 3.3, 4.4):
        clock = FakeClock(0.1)
        monkeypatch.setattr("helpers.budget.now", clock)
        train, augment, cfg, evaluator = setup(tmp_path / str(budget_s), epochs=4, budget_s=budget_s, warmup_epochs=0.0)
        calls = []
        fit(
            toy_model(),
            train,
            augment,
            cfg,
            evaluate=lambda m: calls.append(1) or evaluator(m),
            on_step=clock.on_step,
            progress=False,
        )
        training = Training("x", "budget_s", 4, len(train), 0.1, seconds_per_eval=1.0)
        assert training.eval_passes(budget_s / training.work) == len(calls) + 1, (
            budget_s
        )  # (+1: the notebook's final test pass)


def test_a_faster_measured_precision_means_more_epochs_and_evaluations_in_the_same_seconds():
    plain = Training("x", "budget_s", 10, 10, 1.0, seconds_per_eval=1.0)
    bf16 = Training("x", "budget_s", 10, 10, 1.0, seconds_per_eval=1.0, speed_ratio=0.5, probe_seconds=4.0)
    long, short = 0.5, 0.05  # 50 s and 5 s of training: only a run of 60 s or more measures (helpers.precision)
    assert bf16.eval_passes(0.8) == max(1, math.ceil(0.99 * 0.8 * 10 / 0.5)) + 1 > plain.eval_passes(0.8)
    assert bf16.seconds(0.8) == pytest.approx(0.8 * 100 + bf16.eval_passes(0.8) * 1.0), "the budget holds the probe"
    assert bf16.eval_passes(short) == plain.eval_passes(short) and bf16.seconds(short) == plain.seconds(short)
    assert bf16.eval_passes(long) == plain.eval_passes(long)  # (50 s: below the 60 s at which a run measures)


def test_a_training_of_short_epochs_gets_the_epochs_a_budget_run_needs_to_plan_itself():
    """An epoch of 2 steps: the engine times 5 steps before it can plan, at an epoch's end, so even
    the smallest budget run makes 3 epochs (6 steps) and evaluates after each; the split counts them."""
    from helpers.budget import BudgetClock
    from helpers.budget_split import MIN_BUDGET_STEPS

    assert BudgetClock(1.0).skip + 2 == MIN_BUDGET_STEPS
    short = Training("T4_embedding_ms", "emb_budget_s", 20, 2, 0.5, seconds_per_eval=1.0)
    assert short.share(0.0) == pytest.approx(3 / 20) and short.budget(0.0) == pytest.approx(3.0)
    assert short.eval_passes(0.0) == 3 + 1
    long = Training("T1_custom_cnn", "budget_s", 30, 50, 0.1)
    assert long.share(0.0) == pytest.approx(1 / 30), "5 steps fit in one epoch: one epoch"
