"""The smoke pipeline as a whole, run once per test run (`smoke_out`): it learned (ranges that hold
on any CPU, with room to spare), the same seed gives identical metrics, and --resume keeps what is
current and reruns what changed. Comparing two commits' smoke metrics on one machine, for a
refactor, is scripts/compare_smoke.py, outside the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import pipeline

ROOT = Path(__file__).resolve().parents[1]
# what cannot repeat between two runs of the same configuration
VARYING = {
    "train_seconds",
    "images_per_s",
    "eval_seconds",
    "fit_seconds",
    "budget_seconds_used",
    "seconds",
    "run",
    "run_id",
    "wall_seconds",
}

pytestmark = pytest.mark.slow


def metrics(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "metrics").glob("*.json"))}


def canonical(value, out: Path):
    """A metrics document without what varies between runs, the output folder written as <out>."""
    if isinstance(value, dict):
        return {k: canonical(v, out) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [canonical(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    return value


def models_of(document: dict) -> list[dict]:
    runs = list((document.get("models") or {}).values())
    return runs + ([document["bonus"]] if document.get("bonus") else [])


def test_the_smoke_pipeline_completes_and_learned(smoke_out):
    summary = json.loads((smoke_out / "pipeline.json").read_text())
    assert summary["ok"] and (smoke_out / "report.pdf").is_file(), summary["steps"]
    # `make run` stays under 500 MB (it wrote 2.5 GB before finished runs were slimmed and the smoke
    # profile's ResNet-18 narrowed; 130 MB after)
    assert 0 < summary["output_mb"] < 500, f"the smoke run's output: {summary['output_mb']} MB"
    documents = metrics(smoke_out)
    assert set(documents) == {step.name for step in pipeline.STEPS} and all(d["complete"] for d in documents.values())
    for name, document in documents.items():
        for run in models_of(document):
            first, last = run["history"][0]["train_loss"], run["history"][-1]["train_loss"]
            assert last < first, f"{name}/{run['name']}: the training loss did not fall ({first:.4f} -> {last:.4f})"
    chance = 1 / documents["T1_custom_cnn"]["data"]["num_classes"]
    for name in ("T1_custom_cnn", "T3_cubs_resnet18", "E1_metric_losses"):  # the best model of each, on the test split
        best = max(run["test"]["top1"] for run in models_of(documents[name]))
        assert best >= 1.5 * chance, f"{name}: best test top-1 {best:.3f} is not above chance ({chance:.3f})"
    e2 = documents["E2_stl10_layerwise"]
    assert max(run["test"]["top1"] for run in models_of(e2)) >= 1.3 * 0.1, "E2 (10 classes) learned nothing"
    t4 = documents["T4_cars196_retrieval"]
    per_class = t4["data"]["test_images"] / t4["data"]["test_classes"]
    chance_recall = (per_class - 1) / (t4["data"]["test_images"] - 1)  # a random neighbour of the same class
    assert t4["after"]["recall@1"] >= 2 * chance_recall, (t4["after"], chance_recall)
    assert t4["after"]["queries"] == t4["data"]["test_images"]


def test_the_same_seed_gives_identical_metrics_and_helpers_train_runs_the_notebooks_program(smoke_out, tmp_path):
    """T1 again from scratch, in another folder, by `python -m helpers.train` (what torchrun runs)
    instead of its notebook: every metric, history value and configuration field is the same. So
    the same seed repeats, and the notebook and helpers.train run the same program. (The engine's
    resume-exactness tests and the center loss's repeated-backward test cover the other losses
    without another minute of training here.)"""
    again = tmp_path / "again"
    command = [sys.executable, "-m", "helpers.train", "T1", "--resume", "False", "--out_dir", str(again)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = metrics(smoke_out), metrics(again)
    assert set(second) == {"T1_custom_cnn"}
    assert canonical(first["T1_custom_cnn"], smoke_out) == canonical(second["T1_custom_cnn"], again), (
        "T1 differs between its notebook and helpers.train, run with the same seed and configuration"
    )


def test_the_planners_runs_are_the_runs_that_happened(smoke_out, monkeypatch):
    """helpers.plan names the trainings it costs in each notebook; they are exactly the run folders
    the smoke pipeline wrote (T3's bonus in the fashion T3 selected). The measurements are mocked:
    names and counts are what is checked here, the timings are tests/test_pipeline.py's."""
    from helpers import plan as planning

    for name, value in (
        ("measure_fit_step", 0.01),
        ("measure_run_seconds", 0.0),
        ("eval_pass_seconds", 0.0),
        ("precision_speed", (1.0, 0.0)),
        ("tsne_seconds", 0.0),
        ("import_seconds", 0.0),
    ):
        monkeypatch.setattr(planning, name, lambda *a, value=value, **k: value)
    plan = planning.plan_pipeline("smoke", [s.name for s in pipeline.STEPS], None, "cpu", smoke_out)
    assert not plan.get("missing") and set(plan["notebooks"]) == {s.name for s in pipeline.STEPS}
    bonus = metrics(smoke_out)["T3_cubs_resnet18"]["bonus"]["name"]
    planned = [j["name"].replace("T3_<selected>_scaled", bonus) for n in plan["notebooks"].values() for j in n["jobs"]]
    ran = sorted(p.name for p in (smoke_out / "checkpoints").iterdir() if p.is_dir())
    assert sorted(planned) == ran


def test_resume_keeps_what_is_current_and_reruns_what_changed(smoke_out, tmp_path):
    notebooks = ROOT / "notebooks"
    same = {"profile": "smoke", "out_dir": str(smoke_out), "resume": True}
    for step in pipeline.STEPS:
        assert pipeline.stale_reason(smoke_out, step, notebooks / f"{step.name}.ipynb", "smoke", same) == "", step.name
    t1 = pipeline.STEPS[0]
    other_data = pipeline.stale_reason(
        smoke_out, t1, notebooks / f"{t1.name}.ipynb", "smoke", same | {"data_dir": str(tmp_path)}
    )
    assert (
        other_data.startswith("changed: data_dir")
        and f"-> '{tmp_path}'" in other_data
        and "the data under" in other_data
    ), other_data
    fp32 = pipeline.stale_reason(smoke_out, t1, notebooks / f"{t1.name}.ipynb", "smoke", same | {"precision": "fp32"})
    assert fp32 == "changed: precision 'auto' -> 'fp32'", fp32
    # what defines the trained models is retrained afresh (its checkpoints would be refused); where it runs is not
    assert pipeline.retrains_afresh(smoke_out, t1, same | {"precision": "fp32"})
    assert pipeline.retrains_afresh(smoke_out, t1, same | {"data_dir": str(tmp_path)})
    assert not pipeline.retrains_afresh(smoke_out, t1, same | {"num_workers": 1})
    # metrics written before a field existed count at the value older runs had (param(..., older=))
    saved = json.loads((smoke_out / "metrics" / f"{t1.name}.json").read_text())
    before_flip = saved | {"config": {k: v for k, v in saved["config"].items() if k != "flip"}}
    assert pipeline.configuration_changes(t1, before_flip, same) == ""
    assert pipeline.configuration_changes(t1, before_flip, same | {"flip": False}) == "changed: flip True -> False"


def test_the_executed_notebooks_read_well(smoke_out):
    """Plain epoch lines as the progress, no saved widget bar ("0/7"), and the HTML shows them."""
    import re

    for step in pipeline.STEPS:
        executed = json.loads((smoke_out / "notebooks" / f"{step.name}.ipynb").read_text())
        outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], (
            f"{step.name}: a widget bar was saved"
        )
        text = "".join("".join(o.get("text", "")) for o in outputs)
        assert not re.search(r"\b0/\d+ \[00:00", text), f"{step.name}: a bar's first state was saved"
        assert re.search(r"epoch \d+/\d+ ", text), f"{step.name}: no epoch line"
        html = (smoke_out / "notebooks" / f"{step.name}.html").read_text()
        assert re.search(r"epoch \d+/\d+ ", html), f"{step.name}: the HTML shows no epoch line"


def test_the_smoke_run_has_tensorboard_curves_and_t4s_projector(smoke_out):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t2 = json.loads((smoke_out / "metrics" / "T2_resnet18.json").read_text())["models"]["T2_resnet18"]
    events = EventAccumulator(str(smoke_out / "tensorboard" / "T2_resnet18"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/heldout_top1", "epoch/test_top1"} <= set(
        events.Tags()["scalars"]
    )
    curve = [e.value for e in events.Scalars("epoch/train_loss")]
    assert curve == pytest.approx([h["train_loss"] for h in t2["history"]], rel=1e-6), (
        "the curve is the metrics' history"
    )
    assert (smoke_out / "tensorboard" / "T4_embedding_ms" / "projector_config.pbtxt").is_file()


def test_the_parameter_counts_the_notebooks_print_are_the_models_they_trained(smoke_out):
    """The notebooks' deterministic printed lines (each model's parameter count), checked against the
    metrics of the models they trained. (nbval's NBVAL_CHECK_OUTPUT compares nothing in notebooks
    committed without outputs: this is the check that can fail.)"""
    import re

    def printed_counts(name):
        executed = json.loads((smoke_out / "notebooks" / f"{name}.ipynb").read_text())
        text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
        return [int(n.replace(",", "")) for n in re.findall(r": ([\d,]+) parameters", text)]

    documents = metrics(smoke_out)
    for name in ("T1_custom_cnn", "T2_resnet18", "E2_stl10_layerwise"):
        counts = printed_counts(name)
        trained = {run["architecture"]["parameters"] for run in models_of(documents[name])}
        assert counts and counts[0] in trained, (name, counts, trained)
    t3 = documents["T3_cubs_resnet18"]
    counts = printed_counts("T3_cubs_resnet18")[: len(t3["models"])]
    assert counts == [run["architecture"]["parameters"] for run in t3["models"].values()], (
        "one line per fashion, in order"
    )
