"""The cpu profile end to end on real images within a wall-time budget (`pipeline --budget`), and
the budget's refusal and split at the pipeline's level on mocked plans."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import pipeline, plan as planning
from helpers.budget_split import NotebookWork, Training
from helpers.data import synthetic

from conftest import SHARED_DATA, tiny_archive_cut

ROOT = Path(__file__).resolve().parents[1]


def budget_run(
    profile: str, data: Path, out: Path, budget_s: float, notebooks: tuple, device: str = ""
) -> tuple[dict, float]:
    """`pipeline --profile P --budget B --only ...` as a user runs it: (pipeline.json, the budget it
    ran), checked to end within the budget's tolerance with every notebook's share recorded. A CPU
    slower than this one is refused the budget and given the smallest it measured + 20 %."""

    def pipeline_run(budget: float):
        command = [sys.executable, "-m", "helpers.pipeline", "--profile", profile, "--data-dir", str(data)]
        command += ["--budget", f"{budget:g}s", "--only", ",".join(name.split("_")[0] for name in notebooks)]
        command += ["--device", device] if device else []
        return subprocess.run(command + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)

    done = pipeline_run(budget_s)
    if done.returncode == 2 and (need := re.search(r"that needs ([\d.]+) (s|min|h) ", done.stderr)):
        # (the run plans again, as a user's rerun would)
        budget_s = round(1.2 * float(need[1]) * {"s": 1, "min": 60, "h": 3600}[need[2]])
        done = pipeline_run(budget_s)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["ok"] and (out / "report.pdf").is_file()
    shared = summary["budget"]
    assert shared["budget_s"] == budget_s and set(shared["notebooks"]) == set(notebooks)
    # within the budget's tolerance on the machine it planned on (the issue asks +-10 %; 15 % leaves room for a loaded CI machine)
    assert abs(shared["measured_seconds"] - budget_s) <= 0.15 * budget_s, (
        shared["measured_seconds"],
        shared["planned_seconds"],
    )
    for name, step in summary["steps"].items():
        if name in shared["notebooks"]:
            assert step["share"] == shared["notebooks"][name]["share"] and step["predicted_seconds"] > 0
    return summary, budget_s


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.serial
def test_the_full_profile_runs_end_to_end_within_a_budget_on_the_cpu(tmp_path):
    """`pipeline --budget` end to end on real images, and the GPU route's code paths (`--profile full
    --budget 1h --device cuda`: 64 px, the small stem, a batch of 256, CutMix, the full width) on a CPU.
    T2 on 4 classes x 3 images of the mini Tiny ImageNet (5 validation images a class; one step an
    epoch) and E2 on a generated STL-10 stand-in (pretrain_budget_s per layer, budget_s for
    fine-tuning and the baseline) and the report, in an 80 s budget, planning included; after T2 the
    pipeline splits what is left again, so E2 makes up T2's drift. Measured on an AVX2 EPYC (Zen 3):
    82 s of 80 (+2.8 %), the smallest budget 61 s (with 6 images a class, 90 s and 65 s; on an
    AVX-512 EPYC 59 s, and 66 s in a CPU quota of 1.54 cores). A CPU that needs more than 80 s gets
    the smallest it measured + 20 %. The cpu profile's own
    choices are tested in test_recognition and test_proof, and its 90-minute run is the README's
    report (docs/cpu-report). T4's classifier, embedding and ablation budgets: test_retrieval."""
    tiny = SHARED_DATA / "tiny-imagenet-200-mini.zip"
    if not tiny.is_file():
        pytest.skip(f"the real mini Tiny ImageNet archive is not in {SHARED_DATA}")
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    tiny_archive_cut(tiny, data / "tiny-imagenet-200-mini-4x3.zip", classes=4, train_per_class=3, val_per_class=5)
    synthetic.generate("stl10", data, synthetic.STL10Params())
    notebooks = ("T2_resnet18", "E2_stl10_layerwise")
    summary, _ = budget_run("full", data, out, 80.0, notebooks, device="cpu")
    shared = summary["budget"]
    metrics = {p.stem: json.loads(p.read_text()) for p in (out / "metrics").glob("*.json")}
    assert set(metrics) == set(notebooks) and all(m["complete"] and m["profile"] == "full" for m in metrics.values())
    t2 = metrics["T2_resnet18"]
    config = t2["config"]
    assert (config["image_size"], config["stem"], config["batch_size"], config["cutmix"]) == (64, "small", 256, 1.0)
    assert t2["data"]["generated"] is False and t2["data"]["num_classes"] == 4
    run = t2["models"]["T2_resnet18"]
    assert run["budget"]["budget_s"] == shared["notebooks"]["T2_resnet18"]["parameters"]["budget_s"]
    assert run["training"]["complete"] and run["budget"]["steps"] >= 5  # (MIN_BUDGET_STEPS: a run plans itself)
    e2 = metrics["E2_stl10_layerwise"]
    assert "generated stand-in" in e2["data"]["dataset"]  # labelled as the stand-in it is
    given = shared["notebooks"]["E2_stl10_layerwise"]["parameters"]
    assert e2["config"]["pretrain_budget_s"] == given["pretrain_budget_s"] > 0
    assert e2["config"]["budget_s"] == given["budget_s"] > 0


def fake_plan(seconds_per_step: float):
    """A plan_pipeline stand-in: every notebook one training of 10 epochs x 10 steps, evaluated in 1 s."""

    def plan_pipeline(profile, steps, data_dir, device, out, log=None, budget_s=0.0):
        work = [NotebookWork(name, 5.0, (Training(name, "budget_s", 10, 10, seconds_per_step, 1.0),)) for name in steps]
        return {"profile": profile, "notebooks": {}, "total_seconds": 0.0, "run": {}, "work": work}

    return plan_pipeline


def test_a_budget_too_small_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(planning, "plan_pipeline", fake_plan(seconds_per_step=1.0))
    ran = []
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: ran.append(a) or ("ok", ""))
    assert (
        pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--budget", "30s", "--only", "T1,T2"]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --budget 30 s is too small for one evaluated epoch of every training")
        and "give at least --budget 1m" in err
    )
    assert not ran and not (tmp_path / "out" / "metrics" / "T1_custom_cnn.json").exists()
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--budget", "ninety"]) == 2
    assert "not valid; give a positive time with a unit s, m or h" in capsys.readouterr().err


def test_each_notebook_gets_its_share_as_parameters_and_the_summary_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "plan_pipeline", fake_plan(seconds_per_step=0.1))
    given = {}

    def run_step(step, out, parameters, *args, **kwargs):
        given[step.name] = parameters
        return "ok", "fine"

    monkeypatch.setattr(pipeline, "run_step", run_step)
    summary = pipeline.run("smoke", tmp_path / "out", only="T1,T2", report=False, log=lambda *a: None, budget_s=120.0)
    shared = summary["budget"]
    assert set(given) == {"T1_custom_cnn", "T2_resnet18"}
    for name, parameters in given.items():
        assert (
            parameters["budget_s"] == shared["notebooks"][name]["parameters"]["budget_s"] > 10 * 10 * 0.1
        )  # more than the profile's 10 epochs
        assert (
            parameters["profile"] == "smoke" and summary["steps"][name]["share"] == shared["notebooks"][name]["share"]
        )
    assert shared["planned_seconds"] <= 120.0 and shared["measured_seconds"] >= 0
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["budget"]["budget_s"] == 120.0


def test_the_plan_survives_a_missing_dataset_and_writes_what_it_has(tmp_path, monkeypatch, capsys):
    from helpers.data.errors import DatasetError

    def plan_notebook(name, profile, overrides, out_dir, scratch, probe_precision=True):
        if name.startswith("E2"):
            raise DatasetError(f"STL-10 not found at {tmp_path}/stl10_binary. Download it with ...")
        return planning.NotebookPlan(
            name.split("_")[0], 1.0, [planning.Job(name, 10, 0.5, 2, 0.25, epochs=2)], overhead_seconds=3.0
        )

    monkeypatch.setattr(planning, "plan_notebook", plan_notebook)
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--plan", "--only", "T1,E2"]) == 1
    printed = capsys.readouterr().out
    assert "E2_stl10_layerwise" in printed and "not planned: its data is missing (STL-10 not found" in printed
    written = json.loads((tmp_path / "plan.json").read_text())
    assert (
        set(written["notebooks"]) == {"T1_custom_cnn"}
        and written["notebooks"]["T1_custom_cnn"]["predicted_seconds"] == 1.0 + 5.0 + 0.5 + 3.0
    )
    assert "STL-10 not found" in written["missing"]["E2_stl10_layerwise"]


def test_resuming_a_budget_run_keeps_its_shares_so_its_trainings_can_continue(tmp_path, monkeypatch):
    planned = []

    def plan_pipeline(*args, **kwargs):
        planned.append(1)
        return fake_plan(seconds_per_step=0.1 + 0.01 * len(planned))(
            *args, **kwargs
        )  # each plan measures a bit differently

    monkeypatch.setattr(planning, "plan_pipeline", plan_pipeline)
    given = []
    monkeypatch.setattr(
        pipeline, "run_step", lambda step, out, parameters, *a, **k: given.append(parameters) or ("ok", "fine")
    )
    out = tmp_path / "out"
    first = pipeline.run("smoke", out, only="T1", report=False, log=lambda *a: None, budget_s=120.0)
    again = pipeline.run("smoke", out, only="T1", report=False, log=lambda *a: None, budget_s=120.0, resume=True)
    assert planned == [1], "--resume with the same budget reuses the recorded split"
    assert (
        given[0]["budget_s"]
        == given[-1]["budget_s"]
        == first["budget"]["notebooks"]["T1_custom_cnn"]["parameters"]["budget_s"]
    )
    assert again["budget"]["fraction"] == first["budget"]["fraction"]
    pipeline.run("smoke", out, only="T1", report=False, log=lambda *a: None, budget_s=150.0, resume=True)
    assert planned == [1, 1], "another budget is planned afresh"
    line = pipeline.interrupted_line(
        first | {"steps": {"T1_custom_cnn": {"status": "interrupted", "message": "TrainingInterrupted"}}}
    )
    assert "--budget 120s" in line and line.endswith("--resume")


def test_what_a_notebook_takes_more_or_less_than_planned_is_carried_to_the_next(tmp_path, monkeypatch):
    """T1 runs 20 s over its plan in one run and 20 s under it in another, on a driven clock: T2's
    budget_s is split again from the seconds left, and pipeline.json records what T2 was given."""
    import types

    monkeypatch.setattr(planning, "plan_pipeline", fake_plan(seconds_per_step=0.1))
    real_share = pipeline.share_budget
    for drift in (20.0, -20.0):
        clock = [0.0]
        monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
        given, split = {}, {}

        def run_step(step, out, parameters, *args, **kwargs):
            given[step.name] = parameters["budget_s"]
            if not split:
                split.update(json.loads(json.dumps(summary_budget[0])))  # the first split, before any re-split
            planned = summary_budget[0]["notebooks"][step.name]["planned_seconds"]  # as split again
            clock[0] += planned + (drift if step.name == "T1_custom_cnn" else 0.0)
            return "ok", "fine"

        summary_budget = []

        def share_budget(*args, **kwargs):
            shared, work = real_share(*args, **kwargs)
            summary_budget.append(shared)
            return shared, work

        monkeypatch.setattr(pipeline, "share_budget", share_budget)
        monkeypatch.setattr(pipeline, "run_step", run_step)
        out = tmp_path / f"out{drift:+.0f}"
        summary = pipeline.run("smoke", out, only="T1,T2", report=False, log=lambda *a: None, budget_s=120.0)
        first = split["notebooks"]["T2_resnet18"]
        assert given["T1_custom_cnn"] == split["notebooks"]["T1_custom_cnn"]["parameters"]["budget_s"]
        assert (given["T2_resnet18"] - first["parameters"]["budget_s"]) * drift < 0
        # T2 makes up the whole drift, in training and evaluations (1 s a pass here: the last one may not fit)
        recorded = json.loads((out / "pipeline.json").read_text())["budget"]["notebooks"]["T2_resnet18"]
        unplanned = 120.0 - split["planned_seconds"]  # what the first split left over (< 1 evaluation)
        assert 0 <= first["planned_seconds"] - drift + unplanned - recorded["planned_seconds"] <= 1.0 + 0.05
        assert recorded["parameters"]["budget_s"] == given["T2_resnet18"]
        # the notebooks fill the budget but for the report's allowance (no report here) and < 1 evaluation
        assert 0 <= 120.0 - summary["budget"]["report_seconds"] - summary["budget"]["measured_seconds"] <= 1.0 + 0.05
