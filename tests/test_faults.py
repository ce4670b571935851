"""What users break, with the real fault: two processes on one folder, SIGTERM, damaged checkpoint
files, changed data, a moved output folder, bad output paths and configuration files. Each error
is one line that names the path and says what to do; nothing partial looks finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import checkpoint, pipeline
from helpers.checkpoint import BEST, LAST, PREVIOUS, RUN, save_best
from helpers.config import RecognitionConfig, RetrievalConfig
from helpers.data import BatchAugment, TensorBatches
from helpers.engine import FitConfig, TrainingInterrupted, fit
from helpers.errors import CheckpointError, FolderInUse, MetricsError, SettingsError
from helpers.experiment import T3Selection, load_metrics, save_metrics, train_classifier
from helpers.lock import PIPELINE_LOCK, RUN_LOCK, FolderLock
from helpers.recognition import build_model, build_tiny_imagenet
from helpers.retrieval import apply_t3_selection

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def hold_lock(folder: Path, name: str = RUN_LOCK) -> subprocess.Popen:
    """Another process that takes `folder`'s lock and keeps it until killed."""
    code = f"import sys, time; from helpers.lock import FolderLock; FolderLock({str(folder)!r}, {name!r}).acquire(); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ------------------------------------------------------------------------------------ locks


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(
            FolderInUse, match=rf"{tmp_path} is in use by another run: pid {holder.pid} on \S+, started .*Wait for it"
        ):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert (tmp_path / RUN_LOCK).is_file()
    with FolderLock(tmp_path):  # the OS released the dead holder's lock
        with FolderLock(tmp_path):  # re-entrant within a process
            pass
        assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()


def test_a_run_into_a_folder_another_run_trains_is_refused(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        model = nn.Linear(4, 2)
        data = TensorBatches(torch.zeros(8, 2, 2, 3, dtype=torch.uint8), torch.tensor([0, 1] * 4), batch_size=4)
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            fit(
                model,
                data,
                BatchAugment(num_classes=2),
                FitConfig(epochs=1, monitor=""),
                out_dir=tmp_path / "run",
                progress=False,
            )
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / LAST).exists(), "the refused run wrote nothing"


DRIVER = """
import sys, time
import helpers.engine as engine
original = engine._end_epoch
def slowly(*args, **kwargs):  # (an epoch as long as a real one: room for a second process to start)
    time.sleep(float(sys.argv[1]))
    return original(*args, **kwargs)
engine._end_epoch = slowly
from helpers.train import main
sys.exit(main(sys.argv[2:]))
"""


def train_t1(tiny_root: Path, out: Path, *extra: str, slow: float = 0.0, background: bool = False):
    args = [
        "T1",
        "--data_dir",
        str(tiny_root.parent),
        "--out_dir",
        str(out),
        "--train_per_class",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    command = [sys.executable, "-c", DRIVER, str(slow), *args]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_on_one_folder_then_sigterm_then_resume(tiny_root, tmp_path):
    """The issue's case: A trains T1; B (other width, resume=False) into the same out_dir is refused
    with one line naming A; SIGTERM stops A after saving (exit 143, no metrics); rerunning A
    continues and writes A's metrics."""
    out = tmp_path / "out"
    run_dir = out / "checkpoints" / "T1_custom_cnn"
    a = train_t1(tiny_root, out, "--epochs", "12", slow=1.0, background=True)
    try:
        wait_for(run_dir / LAST, a)
        b = train_t1(tiny_root, out, "--epochs", "1", "--width", "8", "--resume", "False")
        assert b.returncode == 2, b.stdout + b.stderr
        lines = b.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and f"is in use by another run: pid {a.pid}" in lines[0] and "another out_dir" in lines[0]
        ), b.stderr
        a.send_signal(signal.SIGTERM)
        stdout, stderr = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 143, stdout + stderr
    assert (
        "SIGTERM: stopping after this step" in stdout and "state is saved in" in stderr and "Traceback" not in stderr
    ), stderr
    assert not (out / "metrics" / "T1_custom_cnn.json").exists(), "an interrupted run writes no metrics"
    done_before = torch.load(run_dir / LAST, weights_only=False)["epoch"]

    again = train_t1(tiny_root, out, "--epochs", "12")
    assert again.returncode == 0, again.stdout + again.stderr
    metrics = json.loads((out / "metrics" / "T1_custom_cnn.json").read_text())
    record = metrics["models"]["T1_custom_cnn"]
    assert metrics["complete"] and metrics["config"]["width"] == 16, "A's run, not B's"
    assert record["training"]["resumed_from"]["epoch"] == done_before and record["training"]["epochs_done"] == 12
    assert record["training"]["run_dir"] == str(run_dir)
    assert not (run_dir / PREVIOUS).exists(), "a finished run keeps no fallback copy"


def test_a_second_pipeline_into_the_same_out_is_refused(tmp_path, capsys):
    holder = hold_lock(tmp_path, PIPELINE_LOCK)
    try:
        code = pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--only", "T1", "--no-report"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and len(err) == 1
        and f"in use by another pipeline: pid {holder.pid}" in err[0]
        and "another --out" in err[0]
    ), err


# ------------------------------------------------------------------------------------ damaged checkpoints


def tiny_fit(out: Path, epochs: int = 3, interrupt_after: int | None = None, restore_best: bool = True, **options):
    """A 2-class linear model on fixed data with a held-out monitor (best.pt written)."""
    torch.manual_seed(0)
    x = torch.randint(0, 255, (32, 4, 4, 3), dtype=torch.uint8)
    y = torch.arange(32) % 2
    data = TensorBatches(x, y, batch_size=8, shuffle=True, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))

    def evaluate(m):
        with torch.no_grad():
            logits = m(x.permute(0, 3, 1, 2).float() / 255)
        return {"heldout_top1": float((logits.argmax(1) == y).float().mean())}

    def stop(epoch, step):
        if interrupt_after is not None and epoch * 4 + step == interrupt_after:
            raise KeyboardInterrupt

    result = fit(
        model,
        data,
        BatchAugment(crop="none", num_classes=2),
        FitConfig(epochs=epochs, lr=0.05, restore_best=restore_best, checkpoint_every_s=0),  # (a last.pt every epoch)
        evaluate=evaluate,
        out_dir=out,
        progress=False,
        on_step=stop,
        **options,
    )
    return model, result


DAMAGE = {
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero length": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_last_pt_falls_back_to_the_previous_one_and_resumes_exactly(tmp_path, damage, capsys):
    reference, _ = tiny_fit(tmp_path / "reference")
    with pytest.raises(TrainingInterrupted):
        tiny_fit(tmp_path / "run", interrupt_after=10)  # in epoch 3, after two epoch ends: last.pt and last.prev.pt
    assert (tmp_path / "run" / PREVIOUS).is_file()
    DAMAGE[damage](tmp_path / "run" / LAST)
    model, result = tiny_fit(tmp_path / "run")
    err = capsys.readouterr().err
    assert "last.pt" in err and "resuming from the checkpoint before it, last.prev.pt (epoch 2, step 0)" in err, err
    assert result.resumed_from == {"epoch": 2, "step": 0} and result.record()["complete"]
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b), "the fallback resumes exactly"


def test_nothing_usable_left_says_delete_the_folder_or_resume_false(tmp_path):
    with pytest.raises(TrainingInterrupted):
        tiny_fit(tmp_path, interrupt_after=10)
    DAMAGE["truncated"](tmp_path / LAST)
    DAMAGE["random bytes"](tmp_path / PREVIOUS)
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path / LAST} is damaged or not a checkpoint .*last.prev.pt is damaged too; delete that folder or pass resume=False",
    ):
        tiny_fit(tmp_path)
    tiny_fit(tmp_path, resume=False)  # what the message says works


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_best_pt_is_named_before_any_training(tmp_path, damage):
    with pytest.raises(TrainingInterrupted):
        tiny_fit(tmp_path, interrupt_after=6)
    DAMAGE[damage](tmp_path / BEST)
    mtime = (tmp_path / LAST).stat().st_mtime_ns
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path / BEST} is damaged or not a checkpoint.*delete that folder or pass resume=False",
    ):
        tiny_fit(tmp_path)
    assert (tmp_path / LAST).stat().st_mtime_ns == mtime, "nothing was trained or written"


def test_a_best_pt_of_another_run_is_never_loaded(tmp_path):
    tiny_fit(tmp_path / "a")
    tiny_fit(tmp_path / "b", epochs=2)
    shutil.copy(tmp_path / "b" / BEST, tmp_path / "a" / BEST)
    with pytest.raises(CheckpointError, match="was written by another run"):
        checkpoint.load_best_weights(tmp_path / "a", "cpu", json.loads((tmp_path / "a" / RUN).read_text())["run_id"])


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_good_one(tmp_path, monkeypatch):
    with pytest.raises(TrainingInterrupted):
        tiny_fit(tmp_path, interrupt_after=6)
    good = (tmp_path / LAST).read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (real_save(obj, f), f.truncate(100)))  # a write that lies
    with pytest.raises(CheckpointError, match="the previous checkpoint is kept|damaged"):
        tiny_fit(tmp_path)  # (its first write: at the end of epoch 2)
    assert (tmp_path / LAST).read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "no temporary left behind"


class Payload:
    """What a foreign pickle may hold: loading it unsafely would call this."""

    def __reduce__(self):
        return (os.system, ("echo loaded-unsafely",))


def test_checkpoints_load_safely_and_a_file_holding_code_is_refused_with_its_path(tmp_path, capsys):
    with pytest.raises(TrainingInterrupted):
        tiny_fit(tmp_path, interrupt_after=6)
    for name in (
        LAST,
        BEST,
    ):  # what the project writes loads with weights_only=True (RNG states as tensors and plain values)
        assert isinstance(torch.load(tmp_path / name, weights_only=True), dict)
    state = torch.load(tmp_path / LAST, weights_only=True)
    torch.save(state | {"extra": Payload()}, tmp_path / LAST)
    (tmp_path / PREVIOUS).unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path / LAST} holds more than tensors and plain values .*posix.system.*Pass resume=False",
    ):
        tiny_fit(tmp_path)
    assert "loaded-unsafely" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ run identity


def small_cfg(tiny_copy: Path, out: Path, **params) -> RecognitionConfig:
    return RecognitionConfig.build(
        "T1", data_dir=str(tiny_copy.parent), out_dir=str(out), device="cpu", train_per_class=0, epochs=2, **params
    )


def test_changed_data_is_never_resumed_silently(tiny_root, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_root, data_dir / "tiny-imagenet-200")
    cfg = small_cfg(data_dir / "tiny-imagenet-200", tmp_path / "out")
    data = build_tiny_imagenet(cfg)
    assert len(data.info["fingerprint"]) == 40
    with pytest.raises(TrainingInterrupted):
        train_classifier(
            "T1_custom_cnn",
            build_model("custom_cnn", cfg, data.num_classes),
            data,
            cfg,
            on_step=lambda e, s: (_ for _ in ()).throw(KeyboardInterrupt) if e == 1 else None,
        )
    for folder in (data_dir / "tiny-imagenet-200" / "train").iterdir():  # half of each class's images
        for image in sorted((folder / "images").iterdir())[::2]:
            image.unlink()
    data = build_tiny_imagenet(cfg)
    with pytest.raises(
        SettingsError, match="was trained on other data: the files under .* have changed since .*pass resume=False"
    ):
        train_classifier("T1_custom_cnn", build_model("custom_cnn", cfg, data.num_classes), data, cfg)


def test_metrics_are_written_only_by_the_run_that_trained_them(tiny_root, tmp_path):
    cfg = small_cfg(tiny_root, tmp_path)
    data = build_tiny_imagenet(cfg)
    a = train_classifier("T1_custom_cnn", build_model("custom_cnn", cfg, data.num_classes), data, cfg, progress=False)
    other = small_cfg(tiny_root, tmp_path, lr=0.2, resume=False)  # a second run into the same folder, after the first
    train_classifier("T1_custom_cnn", build_model("custom_cnn", other, data.num_classes), data, other, progress=False)
    with pytest.raises(
        MetricsError, match=r"T1_custom_cnn.json was not written: .*checkpoints/T1_custom_cnn now holds another run"
    ):
        save_metrics("T1_custom_cnn", {"models": {a.name: a}}, cfg, data.info)
    assert not (tmp_path / "metrics" / "T1_custom_cnn.json").exists()


# ------------------------------------------------------------------------------------ T4 follows T3 in its own output folder


def t3_output(out: Path, absolute: bool = False) -> Path:
    """An output folder where T3 ran: its metrics select a run whose best.pt exists."""
    run_dir = out / "checkpoints" / "T3_parallel"
    run_dir.mkdir(parents=True)
    model = nn.Linear(2, 2)
    save_best(run_dir, model, 1, "heldout_top1", 0.5, {}, "abc123", None)
    checkpoint_path = str(run_dir / BEST) if absolute else "checkpoints/T3_parallel/best.pt"
    selection = T3Selection("held-out top-1", "T3_parallel", "parallel", checkpoint_path, "imagenet", "abc123")
    (out / "metrics").mkdir()
    (out / "metrics" / "T3_cubs_resnet18.json").write_text(json.dumps({"config": {}, "selection": selection.as_dict()}))
    return out


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "older absolute path"])
def test_t4_finds_t3s_checkpoint_in_a_moved_output_folder(tmp_path, absolute):
    t3_output(tmp_path / "first", absolute)
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    shutil.rmtree(tmp_path / "first") if absolute else None
    cfg = RetrievalConfig.build("T4", out_dir=str(tmp_path / "copy"), device="cpu")
    concrete, note = apply_t3_selection(cfg)
    assert concrete.init == "tinyimagenet" and concrete.checkpoint == str(
        tmp_path / "copy" / "checkpoints" / "T3_parallel" / BEST
    ), note


def test_t4_refuses_to_train_from_scratch_when_t3s_checkpoint_is_missing_or_replaced(tmp_path):
    out = t3_output(tmp_path / "out")
    cfg = RetrievalConfig.build("T4", out_dir=str(out), device="cpu")
    save_best(out / "checkpoints" / "T3_parallel", nn.Linear(2, 2), 1, "heldout_top1", 0.5, {}, "another", None)
    with pytest.raises(
        SettingsError, match="written by another run.*rerun T3 into this output folder, or pass init='scratch'"
    ):
        apply_t3_selection(cfg)
    (out / "checkpoints" / "T3_parallel" / BEST).unlink()
    with pytest.raises(
        SettingsError,
        match=r"T3's metrics \(.*T3_cubs_resnet18.json\) name the checkpoint .*best.pt, which is missing; rerun T3",
    ):
        apply_t3_selection(cfg)
    concrete, _ = apply_t3_selection(
        RetrievalConfig.build("T4", out_dir=str(out), device="cpu", init="scratch")
    )  # explicit: allowed
    assert concrete.init == "scratch"


@pytest.mark.parametrize("content", ["{not json", "[]", '"text"'])
def test_a_damaged_t3_metrics_file_is_named(tmp_path, content):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "T3_cubs_resnet18.json").write_text(content)
    with pytest.raises(
        MetricsError,
        match=rf"{tmp_path / 'metrics' / 'T3_cubs_resnet18.json'} is (unreadable|not a metrics file).*rerun T3_cubs_resnet18",
    ):
        load_metrics(tmp_path, "T3_cubs_resnet18")
    with pytest.raises(MetricsError):
        apply_t3_selection(RetrievalConfig.build("T4", out_dir=str(tmp_path), device="cpu"))


# ------------------------------------------------------------------------------------ fail early, in one line


def one_line_error(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_pipeline_out_that_is_a_file_or_under_one_fails_before_any_kernel(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("a kernel was started"))
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_line_error(
        pipeline.main(["--out", str(tmp_path / "file"), "--only", "T1"]), capsys
    )
    assert "cannot be written" in one_line_error(
        pipeline.main(["--out", str(tmp_path / "file" / "sub"), "--only", "T1"]), capsys
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pipeline_device_cuda_without_a_gpu_fails_before_any_kernel(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("a kernel was started"))
    line = one_line_error(pipeline.main(["--out", str(tmp_path), "--device", "cuda"]), capsys)
    assert "no CUDA GPU is visible" in line and not (tmp_path / "report.pdf").exists()


@pytest.mark.parametrize(
    "content, says", [(None, "no such file"), ("[1, 2]", "holds a JSON list"), ("{oops", "is not readable JSON")]
)
def test_train_config_file_problems_are_one_line_naming_it(tmp_path, capsys, content, says):
    from helpers.train import main

    path = tmp_path / "T1_torchrun_config.json"
    if content is not None:
        path.write_text(content)
    line = one_line_error(main(["T1", "--config", str(path)]), capsys)
    assert str(path) in line and says in line, line


def test_relative_environment_folders_mean_the_directory_the_command_ran_from(tmp_path, monkeypatch):
    from helpers.runinfo import absolute_env_paths, generated_data_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HELPERS_DATA_DIR", "gen")
    monkeypatch.delenv("HELPERS_LAUNCH_DIR", raising=False)
    absolute_env_paths()
    assert os.environ["HELPERS_DATA_DIR"] == str(tmp_path / "gen") and os.environ["HELPERS_LAUNCH_DIR"] == str(tmp_path)
    (tmp_path / "notebooks").mkdir()
    kernel = subprocess.run(
        [sys.executable, "-c", "from helpers.runinfo import generated_data_dir; print(generated_data_dir())"],
        cwd=tmp_path / "notebooks",
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert kernel.stdout.strip() == str(tmp_path / "gen"), "a kernel running in notebooks/ uses the same folder"
    monkeypatch.setenv("HELPERS_DATA_DIR", "gen2")  # not made absolute: relative to HELPERS_LAUNCH_DIR
    monkeypatch.chdir(tmp_path / "notebooks")
    assert generated_data_dir() == tmp_path / "gen2"


def test_a_finished_run_keeps_a_slim_last_pt_and_a_rerun_still_loads_it(tmp_path):
    """No optimizer state in a finished run's last.pt, nor the model when the run restores its best
    weights (nothing reads the final ones again: a finished run is never continued); a rerun of the
    finished run (a notebook rerun) resumes it and trains nothing."""
    model, result = tiny_fit(tmp_path)
    state = torch.load(tmp_path / LAST, weights_only=True)
    assert state["slim"] and state["optimizer"] is None and not (tmp_path / PREVIOUS).exists()
    assert state["model"] is None, "best.pt holds the weights the run ends with: not stored twice"
    _, kept = tiny_fit(tmp_path / "final", restore_best=False)
    final = torch.load(tmp_path / "final" / LAST, weights_only=True)
    assert (final["model"] is None) == (kept.best_epoch == len(kept.history)), (
        "without restore_best the final weights are kept"
    )
    again, rerun = tiny_fit(tmp_path)
    assert rerun.resumed_from == {"epoch": len(result.history), "step": 0} and rerun.history == result.history
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_older_value_or_is_refused_naming_it(tmp_path):
    """Fields that joined the run keys after checkpoints existed: those declared with the value older
    checkpoints were trained with (param(..., older=): resnet_width 64, flip True) resume at that
    value only; any other is refused in one line naming it and the way out."""
    from dataclasses import asdict

    import helpers.config  # noqa: F401 (declares the older values)
    from helpers.checkpoint import check_same_run

    cfg = FitConfig(epochs=2)
    old = {"config": asdict(cfg), "run_key": {"stem": "small"}, "epoch": 1}
    check_same_run(old, tmp_path / LAST, cfg, {"stem": "small", "resnet_width": 64, "flip": True}, 10)
    with pytest.raises(SettingsError, match=r"different configuration \{'run.resnet_width': \(64, 16\)\}"):
        check_same_run(old, tmp_path / LAST, cfg, {"stem": "small", "resnet_width": 16, "flip": True}, 10)
    with pytest.raises(SettingsError) as info:
        check_same_run(old, tmp_path / LAST, cfg, {"stem": "small", "flip": True, "hue": 0.1, "blur": 1}, 10)
    assert str(info.value) == (
        f"{tmp_path / LAST} was written before the setting(s) blur, hue existed, so what it was trained with "
        "is unknown. Pass resume=False (or another out_dir) to train afresh."
    )
    with pytest.raises(SettingsError, match=r"different configuration \{'run.stem': \('small', 'imagenet'\)\}"):
        check_same_run(old, tmp_path / LAST, cfg, {"stem": "imagenet"}, 10)
