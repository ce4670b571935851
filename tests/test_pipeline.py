import json
import os
import re
import signal
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from helpers import pipeline, report
from helpers.pipeline import Step


def notebook(path: Path, body: str) -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = new_code_cell('profile = "smoke"\nout_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell("import json, pathlib\nname = " + repr(path.stem)), new_code_cell(body)]
    nbformat.write(nb, path)


WRITE_METRICS = 'pathlib.Path(out_dir, "metrics", name + ".json").write_text(json.dumps({"profile": profile}))'


@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    """Three notebooks: A fails in its third cell, B depends on A, C is independent."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    notebook(root / "notebooks" / "A_fail.ipynb", "raise ValueError('broken on purpose')")
    notebook(root / "notebooks" / "B_needs_a.ipynb", WRITE_METRICS)
    notebook(root / "notebooks" / "C_alone.ipynb", WRITE_METRICS)
    monkeypatch.setattr(pipeline, "project_root", lambda: root)
    monkeypatch.setattr(pipeline, "STEPS", (Step("A_fail"), Step("B_needs_a", ("A_fail",)), Step("C_alone")))
    return root


def test_failure_is_reported_dependents_skipped_others_run(fake_project, tmp_path):
    out = tmp_path / "out"
    summary = pipeline.run("smoke", out, report=False, log=lambda *a: None)
    steps = summary["steps"]
    assert steps["A_fail"]["status"] == "failed" and re.search(
        r"cell 3 .*raise ValueError.*raised ValueError: broken on purpose", steps["A_fail"]["message"]
    )
    assert steps["B_needs_a"]["status"] == "skipped" and "A_fail" in steps["B_needs_a"]["message"]
    assert steps["C_alone"]["status"] == "ok" and not summary["ok"]
    assert (out / "notebooks" / "C_alone.ipynb").is_file() and (out / "notebooks" / "C_alone.html").is_file()
    assert (out / "notebooks" / "A_fail.html").is_file(), "a failed notebook is rendered too, error included"
    assert json.loads((out / "pipeline.json").read_text())["steps"]["A_fail"]["status"] == "failed"


def test_exit_status_and_only(fake_project, tmp_path, capsys):
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "C", "--no-report"]) == 0
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "A", "--no-report"]) == 1
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "Z", "--no-report"]) == 2
    assert "names no notebook" in capsys.readouterr().err


def test_resume_skips_complete_up_to_date_outputs(fake_project, tmp_path):
    out = tmp_path / "out"
    pipeline.run("smoke", out, only="C", report=False, log=lambda *a: None)
    again = pipeline.run("smoke", out, only="C", resume=True, report=False, log=lambda *a: None)
    assert again["steps"]["C_alone"]["status"] == "up to date"
    other_profile = pipeline.run("full", out, only="C", resume=True, report=False, log=lambda *a: None)
    assert other_profile["steps"]["C_alone"]["status"] == "ok", "outputs of another profile are not reused"
    time.sleep(0.05)
    os.utime(fake_project / "notebooks" / "C_alone.ipynb")  # the input became newer than the outputs
    assert (
        pipeline.run("full", out, only="C", resume=True, report=False, log=lambda *a: None)["steps"]["C_alone"][
            "status"
        ]
        == "ok"
    )


def test_real_steps_are_ordered_by_dependency():
    order = [s.name for s in pipeline.STEPS]
    assert order.index("T2_resnet18") < order.index("T3_cubs_resnet18") < order.index("T4_cars196_retrieval")
    assert [s.name for s in pipeline.select_steps("T4,T1")] == ["T1_custom_cnn", "T4_cars196_retrieval"]
    assert all((Path(__file__).parents[1] / "notebooks" / f"{s.name}.ipynb").is_file() for s in pipeline.STEPS)


def test_report_is_two_pages_built_from_the_metrics(tiny_root, tmp_path):
    from helpers.config import RecognitionConfig
    from helpers.experiment import save_metrics, train_classifier
    from helpers.recognition import build_model, build_tiny_imagenet

    cfg = RecognitionConfig.build(
        "T2",
        "smoke",
        data_dir=str(tiny_root.parent),
        out_dir=str(tmp_path),
        device="cpu",
        image_size=16,
        epochs=1,
        batch_size=16,
        train_per_class=0,
    )
    data = build_tiny_imagenet(cfg)
    run = train_classifier("T2_resnet18", build_model("resnet18", cfg, data.num_classes), data, cfg, progress=False)
    run.test["top1"] = 0.4321  # a value only the metrics file holds
    save_metrics("T2_resnet18", {"models": {run.name: run}}, cfg, data.info)
    pdf = report.build_report(tmp_path)
    assert pdf.read_bytes().count(b"/Type /Page\n") + pdf.read_bytes().count(b"/Type /Page ") == 2
    assert b"/Count 2" in pdf.read_bytes()
    assert (tmp_path / "report-1.png").is_file() and (tmp_path / "report-2.png").is_file()
    page1, page2 = (" ".join(p.content) for p in report.compose(tmp_path))
    assert "43.2%" in page1 and "Profile: smoke" in page1 and "generated stand-in" in page1
    assert "Precision: auto on cpu, measured per run: fp32 in 1 run." in page1, (
        "the precision each run used, from the metrics"
    )
    document = json.loads((tmp_path / "metrics" / "T2_resnet18.json").read_text())
    assert document["run"]["precision"]["setting"] == "auto" and document["run"]["precision"]["reason"].startswith(
        "auto on cpu"
    )
    assert "too short to measure" in document["models"]["T2_resnet18"]["training"]["precision"]["reason"]
    assert "T1): not run" in page1 and "T4 has not run" in page2


def test_plan_predicts_from_measured_steps_and_the_run_records_it(fake_project, tiny_root, tmp_path, capsys):
    from helpers import plan as planning

    out = tmp_path / "out"
    overrides = {
        "data_dir": str(tiny_root.parent),
        "image_size": 16,
        "batch_size": 8,
        "device": "cpu",
        "train_per_class": 0,
    }
    t2 = planning.plan_recognition("T2", "smoke", overrides, tmp_path / "scratch")
    (job,) = t2.jobs
    assert job.name == "T2_resnet18" and job.steps == 3 * (
        66 // 8
    )  # smoke epochs x steps per epoch (72 images, 6 held out)
    assert job.seconds_per_step > 0 and job.eval_passes == 3 + 1 and job.seconds_per_eval > 0
    assert t2.seconds == pytest.approx(t2.data_seconds + job.seconds + planning.OVERHEAD_S + planning.import_seconds())
    t3 = planning.plan_recognition("T3", "smoke", overrides, tmp_path / "scratch")
    assert [j.name for j in t3.jobs] == ["T3_parallel", "T3_serial12", "T3_serial21", "T3_<selected>_scaled"]

    # a plan for the fake project's notebooks, then a run that records prediction beside measurement
    fake = {
        "profile": "smoke",
        "total_seconds": 7.0,
        "run": {"time": "now", "device": "cpu"},
        "notebooks": {"C_alone": {"predicted_seconds": 7.0, "jobs": []}},
    }
    out.mkdir()
    (out / "plan.json").write_text(json.dumps(fake))
    summary = pipeline.run("smoke", out, only="C", report=False, log=lambda *a: None)
    assert summary["steps"]["C_alone"]["predicted_seconds"] == 7.0 and summary["steps"]["C_alone"]["seconds"] > 0
    assert summary["plan"]["predicted_seconds"] == 7.0 and summary["plan"]["notebooks"] == ["C_alone"]
    assert (
        json.loads((out / "pipeline.json").read_text())["plan"]["measured_seconds"]
        == summary["steps"]["C_alone"]["seconds"]
    )
    other = pipeline.run("full", out, only="C", report=False, log=lambda *a: None)
    assert "plan" not in other, "a plan of another profile is not used"
    print(
        planning.format_plan(
            {
                "profile": "smoke",
                "notebooks": {"T2_resnet18": t2.as_dict()},
                "total_seconds": t2.seconds,
                "run": {"device": "cpu"},
            }
        )
    )
    assert "T2_resnet18" in capsys.readouterr().out


# ------------------------------------------------------------------ faults: Ctrl-C, full disks, stale files

TRAIN = """
import os, time
import numpy as np, torch, torch.nn as nn
from helpers.data import BatchAugment, TensorBatches
from helpers.engine import FitConfig, fit
rng = np.random.default_rng(0)
train = TensorBatches(rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 2, 64), batch_size=8, shuffle=True, seed=0)
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
marker = pathlib.Path(out_dir, "training_started")
def slow(epoch, step):
    marker.touch()
    time.sleep(0.1)
result = fit(model, train, BatchAugment(num_classes=2), FitConfig(epochs=3, lr=0.01, monitor=""), out_dir=pathlib.Path(out_dir, "checkpoints", name),
             on_step=slow, progress=False, resume=resume, name=name)
pathlib.Path(out_dir, "metrics", name + ".json").write_text(json.dumps({"profile": profile, "complete": True, "training": result.record()}))
"""


@pytest.fixture
def training_project(tmp_path, monkeypatch):
    """B trains a tiny model slowly (about 3 s) with real checkpoints; C depends on B; D is independent."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    notebook(root / "notebooks" / "B_train.ipynb", TRAIN)
    notebook(root / "notebooks" / "C_after_b.ipynb", WRITE_METRICS)
    notebook(root / "notebooks" / "D_alone.ipynb", WRITE_METRICS)
    monkeypatch.setattr(pipeline, "project_root", lambda: root)
    monkeypatch.setattr(pipeline, "STEPS", (Step("B_train"), Step("C_after_b", ("B_train",)), Step("D_alone")))
    return root


def press_ctrl_c_when(marker: Path, timeout: float = 60.0, signum: int = signal.SIGINT):
    """SIGINT to this process (as a terminal's Ctrl-C; or `signum`) once `marker` exists."""
    import threading

    def wait_and_press():
        deadline = time.time() + timeout
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=wait_and_press, daemon=True)
    thread.start()
    return thread


@pytest.mark.serial  # (under a parallel run's load, teardown noise on stderr: see docs/performance.md)
def test_ctrl_c_saves_the_training_marks_it_interrupted_and_resume_continues_it(training_project, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics").mkdir()
    (out / "metrics" / "B_train.json").write_text(json.dumps({"profile": "smoke"}))  # an older run's metrics
    press_ctrl_c_when(out / "training_started")
    code = pipeline.main(["--profile", "smoke", "--out", str(out), "--no-report"])
    captured = capfd.readouterr()
    assert code == pipeline.INTERRUPTED_EXIT, captured.out + captured.err
    last = [line for line in captured.out.splitlines() if line.strip()][-1]
    assert re.fullmatch(
        r"\[pipeline\] interrupted: B_train saved its training state under .*/checkpoints\. Continue with: python -m helpers\.pipeline --profile smoke --out \S+ --no-report --resume",
        last,
    ), captured.out
    printed = captured.out + captured.err
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["interrupted"] and not summary["ok"]
    steps = summary["steps"]
    assert (
        steps["B_train"]["status"] == "interrupted"
        and "TrainingInterrupted" in steps["B_train"]["message"]
        and "state is saved" in steps["B_train"]["message"]
    ), steps
    assert steps["C_after_b"]["status"] == "not run" and steps["D_alone"]["status"] == "not run"
    assert (out / "checkpoints" / "B_train" / "last.pt").is_file(), "the training state was saved"
    assert not (out / "metrics" / "B_train.json").exists(), "no metrics, not even an older run's, look finished"

    again = pipeline.run("smoke", out, resume=True, report=False, log=lambda *a: None)
    assert again["ok"] and not again["interrupted"], again["steps"]
    assert [again["steps"][n]["status"] for n in ("B_train", "C_after_b", "D_alone")] == ["ok", "ok", "ok"]
    record = json.loads((out / "metrics" / "B_train.json").read_text())["training"]
    assert record["complete"] and record["epochs_done"] == 3 and record["resumed_from"] is not None, (
        "continued, not restarted"
    )
    assert (
        pipeline.run("smoke", out, resume=True, report=False, log=lambda *a: None)["steps"]["B_train"]["status"]
        == "up to date"
    )


@pytest.mark.serial  # (under a parallel run's load, teardown noise on stderr: see docs/performance.md)
def test_sigterm_is_handled_as_ctrl_c_and_exits_143(training_project, tmp_path, capfd):
    """Slurm's time limit, `docker stop`, `kill`: the training saves, the notebook is interrupted,
    pipeline.json says so, one line, exit status 143."""
    out = tmp_path / "out"
    press_ctrl_c_when(out / "training_started", signum=signal.SIGTERM)
    code = pipeline.main(["--profile", "smoke", "--out", str(out), "--no-report"])
    captured = capfd.readouterr()
    assert code == pipeline.TERMINATED_EXIT == 143, captured.out + captured.err
    assert "[pipeline] SIGTERM: asking B_train to save its state and stop" in captured.out
    last = [line for line in captured.out.splitlines() if line.strip()][-1]
    assert (
        last.startswith("[pipeline] interrupted: B_train saved its training state") and "Traceback" not in captured.err
    ), captured.out
    summary = json.loads((out / "pipeline.json").read_text())
    assert (
        summary["interrupted"]
        and summary["signal"] == "SIGTERM"
        and summary["steps"]["B_train"]["status"] == "interrupted"
    ), summary
    assert (out / "checkpoints" / "B_train" / "last.pt").is_file() and not (out / "metrics" / "B_train.json").exists()


def test_disk_full_in_a_notebook_names_the_path_removes_the_temporary_and_the_rest_runs(fake_project, tmp_path):
    full_disk = """
import errno, torch
from helpers.atomic import atomic_torch_save
def no_space(obj, handle):
    handle.write(b"x" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")
torch.save = no_space
target = pathlib.Path(out_dir, "checkpoints", "last.pt")
target.parent.mkdir(parents=True, exist_ok=True)
atomic_torch_save({"w": 1}, target)
"""
    notebook(fake_project / "notebooks" / "A_fail.ipynb", full_disk)
    out = tmp_path / "out"
    summary = pipeline.run("smoke", out, report=False, log=lambda *a: None)
    message = summary["steps"]["A_fail"]["message"]
    assert summary["steps"]["A_fail"]["status"] == "failed"
    assert (
        "OSError: [Errno 28] could not write" in message
        and str(out / "checkpoints" / "last.pt") in message
        and "No space left on device" in message
    )
    assert list((out / "checkpoints").iterdir()) == [], "no temporary file keeps the disk full"
    assert summary["steps"]["B_needs_a"]["status"] == "skipped" and summary["steps"]["C_alone"]["status"] == "ok"
    assert json.loads((out / "pipeline.json").read_text())["steps"]["A_fail"]["status"] == "failed"


def test_disk_full_while_papermill_writes_the_notebook_is_reported_not_masked(fake_project, tmp_path, monkeypatch):
    import errno

    import papermill.engines

    real_write = papermill.engines.write_ipynb

    def write(nb, path):
        if "A_fail" in str(path):
            Path(path).write_text('{"cells": [')  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(nb, path)

    monkeypatch.setattr(papermill.engines, "write_ipynb", write)
    out = tmp_path / "out"
    summary = pipeline.run("smoke", out, report=False, log=lambda *a: None)
    a = summary["steps"]["A_fail"]
    assert a["status"] == "failed" and a["message"].startswith("OSError: [Errno 28] No space left on device")
    assert (
        str(out / "notebooks" / "A_fail.ipynb") in a["message"]
        and "does not appear to be JSON" not in a["message"].split("(no HTML")[0]
    )
    assert summary["steps"]["C_alone"]["status"] == "ok", "independent notebooks still run"
    assert (out / "pipeline.json").is_file()


def test_stale_temporaries_of_a_killed_run_are_removed_on_the_next_start(fake_project, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    out = tmp_path / "out"
    (out / "checkpoints" / "T2").mkdir(parents=True)
    stale = out / "checkpoints" / "T2" / f".last.pt.tmp{dead}"
    stale.write_bytes(b"x" * 1000)
    live = out / "checkpoints" / "T2" / f".last.pt.tmp{os.getpid()}"
    live.write_bytes(b"x")
    lines = []
    pipeline.run("smoke", out, only="C", report=False, log=lines.append)
    assert not stale.exists() and live.exists(), "only files of dead processes are removed"
    assert any("removed 1 temporary file" in line and str(stale) in line for line in lines)


def test_partial_or_failed_outputs_are_never_up_to_date(fake_project, tmp_path):
    out = tmp_path / "out"
    pipeline.run("smoke", out, only="C", report=False, log=lambda *a: None)
    step = Step("C_alone")
    notebook_path = fake_project / "notebooks" / "C_alone.ipynb"
    assert pipeline.is_complete(out, step, notebook_path, "smoke")
    metrics = out / "metrics" / "C_alone.json"
    metrics.write_text(json.dumps({"profile": "smoke", "complete": False}))
    assert not pipeline.is_complete(out, step, notebook_path, "smoke"), "partial metrics are rerun"
    metrics.write_text(json.dumps({"profile": "smoke"}))
    executed = out / "notebooks" / "C_alone.ipynb"
    nb = json.loads(executed.read_text())
    nb["metadata"]["papermill"]["exception"] = True
    executed.write_text(json.dumps(nb))
    assert not pipeline.is_complete(out, step, notebook_path, "smoke"), "a notebook that raised is rerun"


def test_report_leaves_out_partial_metrics_and_says_so(tmp_path):
    (tmp_path / "metrics").mkdir()
    partial = {
        "name": "T2_resnet18",
        "profile": "smoke",
        "complete": False,
        "partial": ["models.T2_resnet18"],
        "models": {},
    }
    (tmp_path / "metrics" / "T2_resnet18.json").write_text(json.dumps(partial))
    (tmp_path / "metrics" / "T1_custom_cnn.json").write_text('{"models": {')  # truncated
    metrics, refused = report.load(tmp_path)
    assert metrics == {} and set(refused) == {"T1_custom_cnn", "T2_resnet18"}
    page1 = " ".join(report.compose(tmp_path)[0].content)
    assert (
        "Left out, not finished: T1_custom_cnn (unreadable (JSONDecodeError)); T2_resnet18 (partial results of models.T2_resnet18)"
        in page1
    )
    assert "ResNet-18 (T2): left out" in page1 and report.pct(float("nan")) == "n/a"


def test_ctrl_c_while_the_kernel_starts_stops_the_notebook_before_its_first_cell(fake_project, tmp_path, capfd):
    import signal
    import threading

    def log(line):
        print(line)
        if line.startswith("[pipeline] running"):  # the kernel is starting: ipykernel would ignore a SIGINT now
            threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()

    out = tmp_path / "out"
    summary = pipeline.run("smoke", out, only="C", report=False, log=log)
    step = summary["steps"]["C_alone"]
    assert summary["interrupted"] and not summary["ok"]
    assert step["status"] == "interrupted" and step["message"].startswith(
        "NotebookStopped: stopped by Ctrl-C before cell"
    ), step
    assert not (out / "metrics" / "C_alone.json").exists(), "no cell after the press ran"
    assert "Traceback" not in capfd.readouterr().err
    line = pipeline.interrupted_line(summary)
    assert "C_alone was stopped (NotebookStopped" in line and line.endswith("--only C --no-report --resume")


def test_ctrl_c_during_the_html_export_waits_for_a_whole_file(fake_project, tmp_path, monkeypatch):
    import signal
    import threading

    real = pipeline.write_html

    def slow_html(executed, html):
        threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        time.sleep(0.5)
        real(executed, html)

    monkeypatch.setattr(pipeline, "write_html", slow_html)
    out = tmp_path / "out"
    summary = pipeline.run("smoke", out, only="C", log=lambda *a: None)
    assert summary["interrupted"] and not summary["ok"] and summary["report"] is None
    assert summary["steps"]["C_alone"]["status"] == "ok", summary["steps"]
    assert (out / "notebooks" / "C_alone.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((out / "pipeline.json").read_text())["interrupted"]
    assert "no notebook was running; finished: C_alone" in pipeline.interrupted_line(summary)


def test_notebooks_run_over_local_ipc_without_the_kernels_tcp_warning(tmp_path, capfd, monkeypatch):
    """...and the kernel is shut down without jupyter_client's SIGINT, which a kernel still finishing
    its last reply on a busy machine logged as "KeyboardInterrupt caught in kernel." (seen in a
    parallel test run: the Ctrl-C test's one-line output had it)."""
    import nbformat
    from jupyter_client.manager import KernelManager

    from helpers.execution import execute

    signals, real_signal = [], KernelManager._async_signal_kernel

    async def recorded(self, signum):
        signals.append(signum)
        await real_signal(self, signum)

    monkeypatch.setattr(KernelManager, "_async_signal_kernel", recorded)

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1 + 1\nprint(x)")])
    notebook.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
    )
    nbformat.write(notebook, tmp_path / "n.ipynb")
    execute(tmp_path / "n.ipynb", tmp_path / "out.ipynb", {}, tmp_path, None)
    outputs = [o for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells for o in c.outputs]
    assert outputs[0]["text"] == "2\n"
    captured = capfd.readouterr()
    assert "running over TCP without encryption" not in captured.err + captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.ipynb", "out.ipynb"], (
        "no IPC socket files left in the notebook's folder"
    )
    assert signal.SIGINT not in signals, signals


def test_a_budget_skips_a_notebook_the_plan_could_not_cost_without_starting_it(fake_project, tmp_path, monkeypatch):
    why = "PKBatchSampler: P=8 classes per batch (pk_classes) is more classes than there are. Lower pk_classes to at most 4."

    def shares(profile, out, steps, data_dir, device, budget_s, started, log):
        return {
            "budget_s": budget_s,
            "notebooks": {"C_alone": {"share": 1.0, "planned_seconds": 5.0, "parameters": {}}},
            "missing": {"A_fail": why},
        }, {}

    monkeypatch.setattr(pipeline, "share_budget", shares)
    summary = pipeline.run("smoke", tmp_path / "out", report=False, log=lambda *a: None, budget_s=60.0)
    assert summary["steps"]["A_fail"] | {"seconds": 0} == {
        "status": "skipped",
        "message": f"not planned for the budget: {why}",
        "seconds": 0,
    }
    assert summary["steps"]["B_needs_a"]["status"] == "skipped", "and what needs it"
    for name in ("A_fail", "B_needs_a"):
        assert not (tmp_path / "out" / "notebooks" / f"{name}.ipynb").exists(), "its kernel never started"
    assert summary["steps"]["C_alone"]["status"] == "ok" and not summary["ok"]
