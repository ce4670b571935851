"""helpers.report: built from whatever metrics are complete, never a stale PDF, a real command line."""

import json
from pathlib import Path

import pytest

from helpers import report

# the six metrics documents of one real smoke pipeline run (paths shortened): the report's input
FIXTURE = Path(__file__).parent / "fixtures" / "smoke_metrics_example.json"


def write_metrics(out: Path) -> dict:
    """The smoke pipeline's six metrics documents under out/metrics."""
    documents = json.loads(FIXTURE.read_text())
    (out / "metrics").mkdir(parents=True)
    for name, document in documents.items():
        (out / "metrics" / f"{name}.json").write_text(json.dumps(document))
    return documents


def edit(out: Path, name: str, change) -> None:
    path = out / "metrics" / f"{name}.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def texts(out: Path) -> tuple[str, str]:
    return tuple(" ".join(page.content) for page in report.compose(out))


def test_a_section_whose_metrics_lack_a_key_is_named_and_the_rest_is_built(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path)
    edit(tmp_path, "T4_cars196_retrieval", lambda d: d.pop("ablation"))
    edit(tmp_path, "E2_stl10_layerwise", lambda d: d.update(models=[]))  # a list where an object belongs
    laid_out = []
    monkeypatch.setattr(
        report, "lay_out", lambda out, lay_out=report.lay_out: laid_out.append(lay_out(out)) or laid_out[-1]
    )
    pdf = report.build_report(tmp_path)
    assert pdf.is_file() and b"/Count 2" in pdf.read_bytes()
    assert (tmp_path / "report-1.png").is_file() and (tmp_path / "report-2.png").is_file()
    assert "leaves out T4_cars196_retrieval: its metrics lack 'ablation'" in capsys.readouterr().err
    page1, page2 = (" ".join(page.content) for page in laid_out[0][0])
    assert "T4_cars196_retrieval: left out, its metrics lack 'ablation'" in page1
    assert "E2_stl10_layerwise: left out, its metrics do not have the expected form (AttributeError" in page1
    assert "T4: left out (its metrics lack 'ablation')." in page2 and "R@1" not in page2, "no half of the T4 section"
    assert (
        "Custom CNN (T1, our own design" in page1 and "T3_serial12 *" in page1 and "One engine for every model" in page1
    )
    assert "E1, ResNet-18 on Tiny ImageNet with three losses" in page2 and "E2, MLP" not in page2


def test_every_notebook_complete_gives_the_whole_report(tmp_path):
    write_metrics(tmp_path)
    pages, left_out = report.lay_out(tmp_path)
    page1, page2 = (" ".join(page.content) for page in pages)
    assert left_out == {} and "Left out" not in page1 and ": left out" not in page1 + page2
    assert "after: MS loss + ms miner" in page2 and "xbm | " in page2 and "E2, MLP" in page2


def test_a_failed_build_removes_the_old_report(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    old = report.report_files(tmp_path)
    for path in old:
        path.write_bytes(b"an older report")

    def full_disk(self, figure=None, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.PdfPages, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        report.build_report(tmp_path)
    assert not any(path.exists() for path in old), "no older report may look current"


def test_a_metrics_file_that_is_not_an_object_is_refused_by_name(tmp_path):
    write_metrics(tmp_path)
    (tmp_path / "metrics" / "T2_resnet18.json").write_text("[]")
    metrics, refused = report.load(tmp_path)
    assert refused == {"T2_resnet18": "unreadable (not a metrics object)"} and "T2_resnet18" not in metrics
    page1, _ = texts(tmp_path)
    assert "Left out, not finished: T2_resnet18 (unreadable (not a metrics object))" in page1
    assert "ResNet-18 (T2): left out (unreadable (not a metrics object))." in page1


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        report.main(["--help"])
    assert done.value.code == 0 and "OUT" in capsys.readouterr().out
    for folder, problem in ((tmp_path / "missing", "does not exist"), (tmp_path, "has no metrics/ folder")):
        assert report.main([str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err and str(folder) in err
    write_metrics(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.pdf")


def test_the_report_states_the_data_each_run_used_its_real_length_and_the_budget(tmp_path):
    """What a reader needs to read a number right: classes, images per class and size of each
    dataset, a partial Cars-196, the epochs a budget run really trained, and the pipeline's budget."""
    documents = write_metrics(tmp_path)
    t2 = documents["T2_resnet18"]
    run = next(iter(t2["models"].values()))

    def budget_run(d):
        r = next(iter(d["models"].values()))
        r["training"]["epochs_done"] = 7
        r["budget"] = {"budget_s": 225.1, "steps": 1000, "budget_seconds_used": 226.0}
        d["data"].update(num_classes=10, train_images=400, test_images=500, image_size=32)

    edit(tmp_path, "T2_resnet18", budget_run)
    edit(
        tmp_path,
        "T4_cars196_retrieval",
        lambda d: d["data"].update(
            partial="partial Cars-196: cars_test/ missing at /x; the train classes come from cars_train/ alone"
        ),
    )
    (tmp_path / "pipeline.json").write_text(
        json.dumps({"budget": {"budget_s": 3600, "measured_seconds": 3570, "fraction": 0.27}})
    )
    one, two = texts(tmp_path)
    assert "10 classes, 400 train (40 per class) / 500 test images at 32 px" in one
    assert "partial Cars-196: cars_test/ missing: PARTIAL" in one
    assert "Budget: 60 min for the whole pipeline (took 59.5 min)" in one and "0.27 x its profile's epochs" in one
    assert "7 epochs (a 225 s budget)" in one and f"{run['epochs_run']} epochs," not in one.split("One engine")[1][:200]
    (tmp_path / "pipeline.json").write_text(json.dumps({"steps": {}}))  # no budget: no budget sentence
    assert "Budget:" not in texts(tmp_path)[0]


def test_the_report_states_the_batch_lr_and_weight_decay_a_run_chose_from_its_data(tmp_path):
    documents = write_metrics(tmp_path)
    run = next(iter(documents["T2_resnet18"]["models"].values()))
    fixed = (
        f"lr {documents['T2_resnet18']['config']['lr']} for batch {documents['T2_resnet18']['config']['batch_size']}"
    )
    assert fixed in texts(tmp_path)[0]

    def followed(d):
        d["config"].update(batch_size=0, lr=0.1, weight_decay=5e-4)
        next(iter(d["models"].values()))["followed_data"] = {"batch_size": 32, "lr": 0.025, "weight_decay": 0.00115}

    edit(tmp_path, "T2_resnet18", followed)
    one = texts(tmp_path)[0]
    assert "lr 0.025 for batch 32 and weight decay 0.0011, both chosen from the training set" in one, run["name"]
    assert "(lr 0.1 per 128 images; decay 0.0005 at 10,000 images or more" in one


def test_the_precision_line_says_what_each_cpu_run_measured_and_chose():
    fast = {
        "used": "bf16",
        "channels_last": True,
        "reason": "...",
        "timings": {"fp32": 0.3, "bf16": 0.25, "bf16 + channels_last": 0.2},
    }
    faster = fast | {"timings": {"fp32": 0.3, "bf16": 0.25, "bf16 + channels_last": 0.15}}
    short = {
        "used": "fp32",
        "channels_last": False,
        "reason": "auto: fp32 on cpu (a 21-step run is too short to measure bf16)",
        "timings": {},
    }
    assert (
        report.precision_label(None, [fast, faster, short])
        == "auto on cpu, measured per run: bf16 + channels_last in 2 runs (1.5-2x fp32), fp32 in 1 run"
    )
    assert (
        report.precision_label({"used": "bf16", "reason": "auto: bf16 autocast, native on this GPU"}, [])
        == "bf16 (auto: bf16 autocast, native on this GPU)"
    )
    document = {
        "models": {"a": {"training": {"precision": fast}}},
        "training": {"classifier": {"precision": short}, "ms": {"precision": None}},
    }
    assert report.measured_choices(document) == [fast, short]


def test_the_report_says_when_a_short_budget_run_dropped_the_crop(tmp_path):
    write_metrics(tmp_path)
    assert "dropped, flips kept" not in texts(tmp_path)[0], "crop_min_epochs 0: nothing to say"

    def short(d, dropped):
        d["config"].update(crop="pad", padding=4, crop_min_epochs=3.0)
        next(iter(d["models"].values())).setdefault("training", {})["crop_dropped"] = dropped

    edit(tmp_path, "T2_resnet18", lambda d: short(d, True))
    assert (
        "random crop with 4-pixel padding (dropped, flips kept, once a budget run is planned under 3 epochs; this one was)"
        in texts(tmp_path)[0]
    )
    edit(tmp_path, "T2_resnet18", lambda d: short(d, False))
    assert "under 3 epochs; this one was not)" in texts(tmp_path)[0]
