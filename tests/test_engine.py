import math
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers.checkpoint import CHECKPOINT_FORMAT
from helpers.errors import CheckpointError
from helpers.data import BatchAugment, TensorBatches
from helpers.engine import FitConfig, TrainingDiverged, TrainingInterrupted, fit
from helpers.optim import EpochMonitor, LRSchedule
from helpers.objectives import CrossEntropyObjective
from helpers.evaluation import ClassificationEvaluator


def toy_data(n=96, classes=4, seed=0):
    """Images whose mean colour encodes the class, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 80, (n, 12, 12, 3)).astype(np.int64)
    images[np.arange(n), :, :, labels % 3] += 100 + 40 * (labels // 3)[:, None, None]
    return images.clip(0, 255).astype(np.uint8), labels


def toy_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(32, classes),
    )


def setup(tmp_path, epochs=4, **overrides):
    images, labels = toy_data()
    held_images, held_labels = toy_data(n=32, seed=1)
    train = TensorBatches(images, labels, batch_size=16, shuffle=True, drop_last=True, seed=0)
    held = TensorBatches(held_images, held_labels, batch_size=32)
    augment = BatchAugment(crop="pad", padding=2, num_classes=4, mixup_alpha=0.4, mix_prob=0.5)
    options = dict(epochs=epochs, lr=0.05, warmup_epochs=1, label_smoothing=0.1, log_every=2, seed=3) | overrides
    cfg = FitConfig(**options)
    return train, augment, cfg, ClassificationEvaluator({"heldout": held}, augment)


def run(tmp_path, name, model_seed=0, on_step=None, on_interrupt="raise", resume=True, **overrides):
    train, augment, cfg, evaluator = setup(tmp_path, **overrides)
    model = toy_model(model_seed)
    result = fit(
        model,
        train,
        augment,
        cfg,
        evaluate=evaluator,
        out_dir=tmp_path / name,
        on_step=on_step,
        progress=False,
        on_interrupt=on_interrupt,
        resume=resume,
    )
    return model, result


def interrupt_at(epoch, step):
    def hook(e, s):
        if (e, s) == (epoch, step):
            raise KeyboardInterrupt

    return hook


def assert_same_run(a, b):
    (model_a, result_a), (model_b, result_b) = a, b
    keys = ("epoch", "lr", "train_loss", "train_top1", "heldout_top1", "heldout_loss", "best_epoch")
    assert [{k: h[k] for k in keys} for h in result_a.history] == [{k: h[k] for k in keys} for h in result_b.history]
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("epoch,step", [(1, 2), (1, 6), (2, 3)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, epoch, step):
    straight = run(tmp_path, "straight")
    assert straight[1].resumed_from is None and straight[1].planned_epochs == 4
    with pytest.raises(
        TrainingInterrupted,
        match=rf"interrupted in epoch {epoch + 1}/4 at step {step}; its state is saved in .*last.pt.*rerun",
    ) as info:
        run(tmp_path, "resumed", on_step=interrupt_at(epoch, step))
    stopped = info.value.result
    assert stopped.interrupted and len(stopped.history) == epoch and stopped.planned_epochs == 4
    # resume into a differently initialised model: everything must come from last.pt
    resumed = run(tmp_path, "resumed", model_seed=99)
    assert not resumed[1].interrupted and len(resumed[1].history) == 4
    assert resumed[1].resumed_from == {"epoch": epoch, "step": step}
    assert_same_run(straight, resumed)


def test_eval_every_may_change_on_resume_only_when_nothing_is_selected_on_the_evaluations(tmp_path):
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "monitored", epochs=2, on_step=interrupt_at(1, 1))
    with pytest.raises(ValueError, match="different configuration.*eval_every"):
        run(tmp_path, "monitored", epochs=2, eval_every=2)  # which epochs compete for best.pt would change
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "plain", epochs=2, monitor="", on_step=interrupt_at(1, 1))
    _, resumed = run(tmp_path, "plain", epochs=2, monitor="", eval_every=2)
    assert resumed.resumed_from == {"epoch": 1, "step": 1} and "heldout_top1" in resumed.history[-1]


def test_interrupt_can_return_the_partial_result_instead(tmp_path, capsys):
    _, result = run(tmp_path, "r", on_step=interrupt_at(1, 2), on_interrupt="return")
    assert result.interrupted and len(result.history) == 1 and result.planned_epochs == 4
    assert "interrupted in epoch 2/4 at step 2" in capsys.readouterr().out


def test_a_checkpoint_of_another_length_is_refused_not_stretched(tmp_path):
    run(tmp_path, "len", epochs=2)
    with pytest.raises(
        ValueError,
        match=r"is a 2-epoch run \(finished\); epochs is now 3.*Set epochs=2 to resume it, or pass resume=False",
    ):
        run(tmp_path, "len", epochs=3)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "half", epochs=3, on_step=interrupt_at(1, 1))
    with pytest.raises(ValueError, match=r"is a 3-epoch run \(stopped after epoch 1\); epochs is now 2"):
        run(tmp_path, "half", epochs=2)
    model, again = run(tmp_path, "len", epochs=2)
    assert len(again.history) == 2 and again.resumed_from == {"epoch": 2, "step": 0}


def test_real_ctrl_c_finishes_the_step_saves_and_raises(tmp_path):
    def press_ctrl_c(e, s):
        if (e, s) == (0, 3):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where the test runner was started in the background)
    with pytest.raises(TrainingInterrupted, match="interrupted in epoch 1/4 at step 3; its state is saved") as info:
        run(tmp_path, "sigint", on_step=press_ctrl_c)
    assert isinstance(info.value, KeyboardInterrupt), "a notebook or script stops there"
    result = info.value.result
    assert result.interrupted and result.history == []
    ckpt = torch.load(tmp_path / "sigint" / "last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)
    assert signal.getsignal(signal.SIGINT) is before, "the handler is restored"
    assert_same_run(run(tmp_path, "straight"), run(tmp_path, "sigint"))


def saved_epochs(monkeypatch) -> list[int]:
    """The epochs (the next epoch to run, as saved) of every last.pt the engine writes from now on."""
    import helpers.engine as engine

    written, write = [], engine.save_last
    monkeypatch.setattr(engine, "save_last", lambda out, state: (written.append(state["epoch"]), write(out, state)))
    return written


def test_last_pt_is_written_every_epoch_or_at_a_cadence_and_always_at_the_end(tmp_path, monkeypatch):
    import helpers.engine as engine

    written = saved_epochs(monkeypatch)
    run(tmp_path, "every", checkpoint_every_s=0)
    assert written == [1, 2, 3, 4]
    written.clear()
    run(tmp_path, "hour", checkpoint_every_s=3600)  # the first epoch of a call, then only the last
    assert written == [1, 4]
    written.clear()
    monkeypatch.setattr(engine, "CHECKPOINT_COST_RATIO", 1e9)  # automatic: writing would cost too much
    straight = run(tmp_path, "auto")
    assert written == [1, 4]
    assert straight[1].record()["complete"]
    assert_same_run(run(tmp_path, "straight", checkpoint_every_s=0), straight)
    with pytest.raises(ValueError, match="checkpoint_every_s=-2 must be >= 0.*or -1"):
        FitConfig(checkpoint_every_s=-2)


def test_a_stop_at_an_epoch_end_without_a_checkpoint_writes_one_there_and_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C while epoch 2 is evaluated: the cadence skipped that epoch's last.pt, so the stop
    writes it at the epoch boundary; nothing is lost and the resumed run equals an uninterrupted one."""
    train, augment, cfg, evaluator = setup(tmp_path, checkpoint_every_s=3600)
    calls = []

    def evaluate_then_ctrl_c(model):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluator(model)

    written = saved_epochs(monkeypatch)
    model = toy_model()
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 2/4"):
        fit(model, train, augment, cfg, evaluate=evaluate_then_ctrl_c, out_dir=tmp_path / "stop", progress=False)
    assert written == [1, 2]
    ckpt = torch.load(tmp_path / "stop" / "last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (2, 0, 2)
    resumed = run(tmp_path, "stop", model_seed=99, checkpoint_every_s=3600)
    assert resumed[1].resumed_from == {"epoch": 2, "step": 0}
    assert_same_run(run(tmp_path, "straight"), resumed)


def test_early_stopping_on_a_flat_heldout_metric(tmp_path):
    train, augment, cfg, _ = setup(tmp_path, epochs=10, patience=2)
    result = fit(
        toy_model(),
        train,
        augment,
        cfg,
        evaluate=lambda m: {"heldout_top1": 0.5},
        out_dir=tmp_path / "es",
        progress=False,
    )
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    again = fit(
        toy_model(),
        train,
        augment,
        cfg,
        evaluate=lambda m: {"heldout_top1": 0.5},
        out_dir=tmp_path / "es",
        progress=False,
    )
    assert len(again.history) == 3, "a finished (early-stopped) run is not continued"
    assert result.record()["complete"] and again.record() | {"resumed_from": None} == result.record(), (
        "and is still complete"
    )


def test_best_checkpoint_is_restored(tmp_path):
    scores = iter([0.2, 0.9, 0.4])
    train, augment, cfg, _ = setup(tmp_path, epochs=3)
    model = toy_model()
    result = fit(
        model,
        train,
        augment,
        cfg,
        evaluate=lambda m: {"heldout_top1": next(scores)},
        out_dir=tmp_path / "best",
        progress=False,
    )
    best = torch.load(tmp_path / "best" / "best.pt", weights_only=False)
    assert result.best_epoch == 2 == best["epoch"] and result.best_value == 0.9
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), best["model"].values()))


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    class Poisoned(CrossEntropyObjective):
        calls = 0

        def forward(self, model, images, targets):
            loss, logits = super().forward(model, images, targets)
            Poisoned.calls += 1
            return (loss * float("nan") if Poisoned.calls > 8 else loss), logits

    train, augment, cfg, evaluator = setup(tmp_path, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite in epoch 2.*Lower the learning rate"):
        fit(
            toy_model(),
            train,
            augment,
            cfg,
            objective=Poisoned(),
            evaluate=evaluator,
            out_dir=tmp_path / "nan",
            progress=False,
        )
    ckpt = torch.load(tmp_path / "nan" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "cfg", epochs=1)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        run(tmp_path, "cfg", epochs=1, lr=0.5)


def test_learns_and_identical_seeds_give_identical_runs(tmp_path):
    a = run(tmp_path, "a", epochs=8, lr=0.1)
    b = run(tmp_path, "b", epochs=8, lr=0.1)
    assert_same_run(a, b)
    assert a[1].history[-1]["heldout_top1"] > 0.7, a[1].history[-1]  # chance: 0.25
    assert a[1].history[-1]["train_loss"] < a[1].history[0]["train_loss"]


def test_schedules():
    def factors(**kw):
        cfg = FitConfig(epochs=10, lr=1.0, **kw)
        schedule = LRSchedule(cfg, steps_per_epoch=10)
        return schedule, [schedule.factor(s) for s in range(100)]

    _, cos = factors(schedule="cosine", warmup_epochs=2)
    assert math.isclose(cos[0], 1 / 25) and cos[19] < 1 and math.isclose(cos[20], 1.0) and cos[99] < 1e-3
    assert all(a <= b for a, b in zip(cos[:20], cos[1:21])) and all(a >= b for a, b in zip(cos[20:], cos[21:]))
    _, one = factors(schedule="onecycle")
    assert int(np.argmax(one)) == 30 and one[-1] < 1e-3
    _, step = factors(schedule="step", step_epochs=3, step_gamma=0.5)
    assert step[29] == 1.0 and step[30] == 0.5 and step[60] == 0.25
    plateau, _ = factors(schedule="plateau", plateau_patience=1, plateau_factor=0.1)
    monitor = EpochMonitor(higher_is_better=True)
    for epoch, value in enumerate((0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7), 1):
        monitor.update(value, epoch)
        plateau.epoch_end(monitor)
    assert math.isclose(plateau.factor(50), 0.01)
    with pytest.raises(ValueError, match="cosine, onecycle, step, plateau, constant"):
        FitConfig(schedule="linear")
    with pytest.raises(ValueError, match="sgd, adam, adamw"):
        FitConfig(optimizer="rmsprop")


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    """Format 1 (before the epoch monitor) and unknown formats: none could be resumed exactly any more
    (format-1 files predate the data fingerprint in run keys), so none is migrated."""
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "old", on_step=interrupt_at(2, 1))
    path = tmp_path / "old" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    for stamp, says in [
        (1, "written in checkpoint format 1;"),
        (3, "written in checkpoint format 3;"),
        (None, "written without a format number;"),
    ]:
        torch.save({k: v for k, v in ckpt.items() if k != "format"} | ({"format": stamp} if stamp else {}), path)
        with pytest.raises(
            CheckpointError,
            match=rf"{re.escape(str(path))} was {says} this version .* resumes format {CHECKPOINT_FORMAT} only: delete that folder or pass resume=False",
        ):
            run(tmp_path, "old")
    _, fresh = run(tmp_path, "old", epochs=1, resume=False)
    assert fresh.resumed_from is None and torch.load(path, weights_only=False)["format"] == CHECKPOINT_FORMAT


def early_stopping_reference(values, higher_is_better, patience):
    """fit's early stopping before EpochMonitor: (best, best_epoch, stop) after each epoch."""
    best, best_epoch, bad, out = None, None, 0, []
    for epoch, value in enumerate(values, 1):
        improved = value is not None and (best is None or (value > best if higher_is_better else value < best))
        if improved:
            best, best_epoch, bad = value, epoch, 0
        elif value is not None:
            bad += 1
        out.append((best, best_epoch, patience > 0 and value is not None and bad >= patience))
    return out


def plateau_reference(values, higher_is_better, patience, factor):
    """LRSchedule's plateau cuts before EpochMonitor (its own best and count, reset by each cut): the factor after each epoch."""
    best, bad, scale, out = -math.inf, 0, 1.0, []
    for value in values:
        if value is not None:
            score = value if higher_is_better else -value
            if score > best:
                best, bad = score, 0
            else:
                bad += 1
                if bad > patience:
                    scale *= factor
                    bad = 0
        out.append(scale)
    return out


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_epoch_monitor_drives_early_stopping_and_plateau_cuts_as_before(higher_is_better):
    rng = np.random.default_rng(0)
    for trial in range(300):
        # few distinct values: many ties; None: an epoch without evaluation (eval_every > 1)
        values = [
            None if rng.random() < 0.15 else float(rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(rng.integers(1, 25))
        ]
        patience, plateau_patience = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        schedule = LRSchedule(
            FitConfig(schedule="plateau", plateau_patience=plateau_patience, plateau_factor=0.5), steps_per_epoch=10
        )
        monitor, got = EpochMonitor(higher_is_better), []
        for epoch, value in enumerate(values, 1):
            monitor.update(value, epoch)
            schedule.epoch_end(monitor)
            got.append((monitor.best, monitor.best_epoch, monitor.stalled(patience), schedule.plateau_factor))
        expected = zip(
            early_stopping_reference(values, higher_is_better, patience),
            plateau_reference(values, higher_is_better, plateau_patience, 0.5),
        )
        assert got == [(*stopping, scale) for stopping, scale in expected], (values, patience, plateau_patience)
    assert (
        EpochMonitor.for_metric("heldout_loss").higher_is_better is False
        and EpochMonitor.for_metric("heldout_top1").higher_is_better
    )


def test_epoch_monitor_on_a_lower_is_better_metric_with_ties():
    monitor = EpochMonitor.for_metric("heldout_loss")
    schedule = LRSchedule(FitConfig(schedule="plateau", plateau_patience=1, plateau_factor=0.1), steps_per_epoch=10)
    stalled = []
    for epoch, value in enumerate([2.0, 1.5, 1.5, 1.6, 1.4, 1.4, None, 1.4, 1.4], 1):
        monitor.update(value, epoch)
        schedule.epoch_end(monitor)
        stalled.append(monitor.stalled(patience=2))
    assert (monitor.best, monitor.best_epoch, monitor.bad_epochs) == (1.4, 5, 3)
    assert stalled == [False, False, False, True, False, False, False, True, True]
    assert math.isclose(schedule.plateau_factor, 0.01)  # cut after epochs 4 and 8: two bad epochs each


def test_plateau_run_resumed_mid_epoch_equals_uninterrupted(tmp_path):
    options = {"epochs": 5, "schedule": "plateau", "plateau_patience": 0, "plateau_factor": 0.5, "patience": 3}
    straight = run(tmp_path, "straight", **options)
    assert straight[1].history[-1]["lr"] < 0.05, "the plateau schedule cut the LR"
    run(tmp_path, "resumed", on_step=interrupt_at(2, 3), on_interrupt="return", **options)
    resumed = run(tmp_path, "resumed", model_seed=99, **options)
    assert resumed[1].resumed_from == {"epoch": 2, "step": 3}
    assert_same_run(straight, resumed)
    assert [h["lr"] for h in straight[1].history] == [h["lr"] for h in resumed[1].history]
    assert (straight[1].best_epoch, straight[1].stopped_early) == (resumed[1].best_epoch, resumed[1].stopped_early)


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_tensorboard_curves_go_on_across_a_resume_without_duplicate_steps(tmp_path):
    pytest.importorskip("tensorboard")
    train, augment, cfg, evaluator = setup(tmp_path, log_every=2)
    board = tmp_path / "tensorboard" / "run"
    with pytest.raises(TrainingInterrupted):
        fit(
            toy_model(),
            train,
            augment,
            cfg,
            evaluate=evaluator,
            out_dir=tmp_path / "run",
            progress=False,
            on_step=interrupt_at(2, 3),
            board_dir=board,
        )
    from torch.utils.tensorboard import SummaryWriter

    killed = SummaryWriter(
        str(board)
    )  # what a session killed after its checkpoint (step 2 x 6 + 3) had written beyond it
    killed.add_scalar("train/loss", 999.0, 2 * len(train) + 5)
    killed.close()
    fit(toy_model(), train, augment, cfg, evaluate=evaluator, out_dir=tmp_path / "run", progress=False, board_dir=board)
    loss = scalars(board, "train/loss")
    assert 999.0 not in [v for _, v in loss]
    steps = [s for s, _ in loss]
    assert steps == sorted(set(steps)), "no step twice, in order (a killed session's extra points dropped)"
    assert steps[0] == 2 and steps[-1] == 4 * len(train) and all(math.isfinite(v) for _, v in loss)
    epochs = scalars(board, "epoch/heldout_top1")
    assert [s for s, _ in epochs] == [len(train) * e for e in range(1, 5)], "one point per epoch at its last step"
    assert [s for s, _ in scalars(board, "train/lr")] == steps
    fit(
        toy_model(), train, augment, cfg, evaluate=evaluator, out_dir=tmp_path / "run", progress=False, board_dir=board
    )  # finished: rerun
    assert scalars(board, "epoch/heldout_top1") == epochs, "a rerun of a finished run keeps its curves"


def test_a_fresh_run_replaces_the_old_curves(tmp_path):
    pytest.importorskip("tensorboard")
    train, augment, cfg, evaluator = setup(tmp_path, epochs=2, log_every=2)
    board = tmp_path / "tensorboard" / "run"
    fit(toy_model(), train, augment, cfg, evaluate=evaluator, out_dir=tmp_path / "run", progress=False, board_dir=board)
    first = scalars(board, "epoch/train_loss")
    fit(
        toy_model(seed=5),
        train,
        augment,
        cfg,
        evaluate=evaluator,
        out_dir=tmp_path / "run",
        progress=False,
        board_dir=board,
        resume=False,
    )
    second = scalars(board, "epoch/train_loss")
    assert [s for s, _ in second] == [s for s, _ in first] == [len(train), 2 * len(train)], "one curve, not two mixed"
    assert second != first
