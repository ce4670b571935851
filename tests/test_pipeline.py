import json
import os
import re
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
    assert steps["A_fail"]["status"] == "failed" and re.search(r"cell 3 .*raise ValueError.*raised ValueError: broken on purpose", steps["A_fail"]["message"])
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
    assert pipeline.run("full", out, only="C", resume=True, report=False, log=lambda *a: None)["steps"]["C_alone"]["status"] == "ok"


def test_real_steps_are_ordered_by_dependency():
    order = [s.name for s in pipeline.STEPS]
    assert order.index("T2_resnet18") < order.index("T3_cubs_resnet18") < order.index("T4_cars196_retrieval")
    assert [s.name for s in pipeline.select_steps("T4,T1")] == ["T1_custom_cnn", "T4_cars196_retrieval"]
    assert all((Path(__file__).parents[1] / "notebooks" / f"{s.name}.ipynb").is_file() for s in pipeline.STEPS)


def test_report_is_two_pages_built_from_the_metrics(tiny_root, tmp_path):
    from helpers.config import RecognitionConfig
    from helpers.recognition import build_model, build_tiny_imagenet, save_metrics, train_classifier

    cfg = RecognitionConfig.build("T2", "smoke", data_dir=str(tiny_root.parent), out_dir=str(tmp_path), device="cpu", image_size=16, epochs=1, batch_size=16)
    data = build_tiny_imagenet(cfg)
    run = train_classifier("T2_resnet18", build_model("resnet18", cfg, data.num_classes), data, cfg, progress=False)
    run["test"]["top1"] = 0.4321  # a value only the metrics file holds
    save_metrics("T2_resnet18", {"models": {run["name"]: run}}, cfg, data.info)
    pdf = report.build_report(tmp_path)
    assert pdf.read_bytes().count(b"/Type /Page\n") + pdf.read_bytes().count(b"/Type /Page ") == 2
    assert b"/Count 2" in pdf.read_bytes()
    assert (tmp_path / "report-1.png").is_file() and (tmp_path / "report-2.png").is_file()
    page1, page2 = (" ".join(p.content) for p in report.compose(tmp_path))
    assert "43.2%" in page1 and "Profile: smoke" in page1 and "generated stand-in" in page1
    assert "T1): not run" in page1 and "T4 has not run" in page2


def test_plan_predicts_from_measured_steps_and_the_run_records_it(fake_project, tiny_root, tmp_path, capsys):
    from helpers import plan as planning

    out = tmp_path / "out"
    overrides = {"data_dir": str(tiny_root.parent), "image_size": 16, "batch_size": 8, "device": "cpu"}
    t2 = planning.plan_recognition("T2", "smoke", overrides, tmp_path / "scratch")
    (job,) = t2.jobs
    assert job.name == "T2_resnet18" and job.steps == 3 * (66 // 8)  # smoke epochs x steps per epoch (72 images, 6 held out)
    assert job.seconds_per_step > 0 and job.eval_passes == 3 + 1 and job.seconds_per_eval > 0
    assert t2.seconds == pytest.approx(t2.data_seconds + job.seconds + planning.OVERHEAD_S)
    t3 = planning.plan_recognition("T3", "smoke", overrides, tmp_path / "scratch")
    assert [j.name for j in t3.jobs] == ["T3_parallel", "T3_serial12", "T3_serial21", "T3_bonus"]

    # a plan for the fake project's notebooks, then a run that records prediction beside measurement
    fake = {"profile": "smoke", "total_seconds": 7.0, "run": {"time": "now", "device": "cpu"},
            "notebooks": {"C_alone": {"predicted_seconds": 7.0, "jobs": []}}}
    out.mkdir()
    (out / "plan.json").write_text(json.dumps(fake))
    summary = pipeline.run("smoke", out, only="C", report=False, log=lambda *a: None)
    assert summary["steps"]["C_alone"]["predicted_seconds"] == 7.0 and summary["steps"]["C_alone"]["seconds"] > 0
    assert summary["plan"]["predicted_seconds"] == 7.0 and summary["plan"]["notebooks"] == ["C_alone"]
    assert json.loads((out / "pipeline.json").read_text())["plan"]["measured_seconds"] == summary["steps"]["C_alone"]["seconds"]
    other = pipeline.run("full", out, only="C", report=False, log=lambda *a: None)
    assert "plan" not in other, "a plan of another profile is not used"
    print(planning.format_plan({"profile": "smoke", "notebooks": {"T2_resnet18": t2.as_dict()}, "total_seconds": t2.seconds, "run": {"device": "cpu"}}))
    assert "T2_resnet18" in capsys.readouterr().out
