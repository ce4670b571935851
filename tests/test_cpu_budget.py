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

from conftest import SHARED_DATA, cars_archive_cut, tiny_archive_cut

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.realdata
@pytest.mark.slow
def test_the_cpu_profile_on_real_images_ends_within_its_budget(tmp_path):
    """Real images in a shape a test affords: 8 classes of the mini Tiny ImageNet, and 4 images of
    each of the first 32 classes of both Cars-196 halves from the mini archive (its cars_train/ half:
    a partial copy, named as such), both as zips in the data folder, and a generated STL-10
    stand-in; T2, T4 and E2 (one notebook of each kind of budget parameter: budget_s; T4's
    cls_budget_s and emb_budget_s over its classifier, embedding and ablation runs; E2's
    pretrain_budget_s and budget_s) and the report in a 2.5-minute budget. One evaluated epoch of
    each of their trainings (T4's: the 3 epochs of 2 steps a budget run needs to plan itself) needs
    91-105 s on this 2-core EPYC, planning and the data's first extraction included, and 120 s on
    the first run after a fresh clone's install; a CPU that needs more than 2.5 min gets the smallest
    budget it measured + 20 %. All six notebooks need 2.5-2.9 min here (a 3-minute budget was refused
    on a fresh clone's first run, which then ran at 4 min), measured in docs/performance.md; E1's and
    T3's trainings honour a budget through the same runners (test_recognition, test_budget). T2 and
    E2 alone in 90 s were tried: 82 s of 90 at full speed, but 67 s (-25 %) in a CPU quota of 1.54
    cores, where this version passed (docs/performance.md)."""
    tiny, cars = SHARED_DATA / "tiny-imagenet-200-mini.zip", SHARED_DATA / "stanford-cars-mini.zip"
    if not (tiny.is_file() and cars.is_file()):
        pytest.skip(f"the real mini archives are not in {SHARED_DATA}")
    data = tmp_path / "data"
    data.mkdir()
    tiny_archive_cut(tiny, data / "tiny-imagenet-200-mini-8.zip", classes=8)
    cars_archive_cut(cars, data / "stanford-cars-mini-4.zip", per_class=4, classes_per_half=32)
    synthetic.generate("stl10", data, synthetic.STL10Params())
    out, budget_s = tmp_path / "out", 150.0
    notebooks = ("T2_resnet18", "T4_cars196_retrieval", "E2_stl10_layerwise")

    def pipeline_run(budget: float):
        command = [
            sys.executable,
            "-m",
            "helpers.pipeline",
            "--profile",
            "cpu",
            "--data-dir",
            str(data),
            "--budget",
            f"{budget:g}s",
            "--only",
            ",".join(name.split("_")[0] for name in notebooks),
        ]
        return subprocess.run(command + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)

    done = pipeline_run(budget_s)
    if done.returncode == 2 and (need := re.search(r"that needs ([\d.]+) (s|min|h) ", done.stderr)):
        # a slower CPU: the minimum it measured, + 20 % (the run plans again, as a user's rerun would)
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
    metrics = {p.stem: json.loads(p.read_text()) for p in (out / "metrics").glob("*.json")}
    assert all(m["complete"] and m["profile"] == "cpu" for m in metrics.values())
    t2 = metrics["T2_resnet18"]
    assert t2["data"]["generated"] is False and t2["data"]["num_classes"] == 8 and t2["data"]["image_size"] == 32
    run = next(iter(t2["models"].values()))
    assert run["budget"]["budget_s"] == shared["notebooks"]["T2_resnet18"]["parameters"]["budget_s"]
    assert set(metrics) == set(notebooks), sorted(metrics)
    # T2 trains for about 15-25 s here: 7 or more epochs of 23 steps of 32 images (33 % test top-1 in 15 s)
    assert t2["models"]["T2_resnet18"]["test"]["top1"] > 0.125, "T2 on 8 real classes at chance (0.125)"
    # the cpu profile's recipe follows its 760 training images: a batch of 32, more weight decay
    assert (
        run["followed_data"]["batch_size"] == 32 and run["followed_data"]["weight_decay"] > t2["config"]["weight_decay"]
    )
    t4 = metrics["T4_cars196_retrieval"]
    assert t4["data"]["partial"] and t4["config"]["cls_budget_s"] > 0 and t4["config"]["emb_budget_s"] > 0
    assert "generated stand-in" in metrics["E2_stl10_layerwise"]["data"]["dataset"]  # labelled as the stand-in it is
    assert metrics["E2_stl10_layerwise"]["config"]["pretrain_budget_s"] > 0


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
