import json

from helpers import bench
from helpers.errors import OutputError


def test_quick_cpu_benchmark_writes_every_record(tmp_path):
    out = tmp_path / "bench.json"
    chosen = ("custom_cnn",)  # (the command measures every model; one shows the records here: CUBS alone adds 12 s)
    bench.run("cpu", quick=True, out=str(out), models=chosen)
    records = json.loads(out.read_text())
    models = {r["name"]: r for r in records if r["what"] == "model"}
    data = {r["name"]: r for r in records if r["what"] == "data"}
    assert set(models) == set(chosen) and set(bench.MODELS) >= set(chosen)
    assert set(data) == {"lazy", "cached"}, "both CPU data paths are measured in the same run"
    for record in list(models.values()) + list(data.values()):
        assert (
            record["images_per_s"] > 0
            and record["device"] == "cpu"
            and record["batch_size"] > 0
            and record["peak_mem_mb"] > 0
        )
    ratio = next(r for r in records if r["what"] == "ratio" and r["name"] == "data paths")
    assert ratio["cached/lazy"] == data["cached"]["images_per_s"] / data["lazy"]["images_per_s"]
    e2e = {(r["model"], r["who"]): r for r in records if r["what"] == "end_to_end"}
    assert set(e2e) == {(m, who) for m in models for who in ("project", "peer")}, "a peer row beside every project row"
    for name in models:
        project, peer = e2e[(name, "project")], e2e[(name, "peer")]
        same = ("images", "batch_size", "image_size", "stem", "device")
        assert [project[k] for k in same] == [peer[k] for k in same], "same data, shapes and device"
        assert project["images_per_s"] > 0 and peer["images_per_s"] > 0
        ratio_row = next(r for r in records if r["what"] == "ratio" and r.get("model") == name)
        assert ratio_row["project/peer"] == project["images_per_s"] / peer["images_per_s"]
    assert type(bench.peer_model("cubs_serial21", 10, "small")).__module__.startswith(
        "helpers.models"
    )  # (no torchvision twin of a CUBS model)
    assert type(bench.peer_model("resnet18", 10, "small")).__module__ == "torchvision.models.resnet", (
        "the peer's ResNet-18 is torchvision's"
    )
    assert e2e[("custom_cnn", "peer")]["peer_model"].startswith("helpers.models")
    info = next(r for r in records if r["what"] == "info")
    assert info["torch"] and "git" in info


def test_cuda_request_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_memory_rows_use_each_models_full_profile_batch(monkeypatch):
    import torch

    shapes = bench.full_profile_shapes()
    assert shapes["resnet18"] == ("resnet18", 256, 64, "small", 200), "the full preset's batch and input size"
    assert shapes["T4 cubs_serial12"] == ("cubs_serial12", 128, 224, "imagenet", 98)
    assert set(shapes) == set(bench.MODELS) | {"T4 cubs_serial12"}
    monkeypatch.setattr(
        bench,
        "full_profile_shapes",
        lambda: {
            "resnet18": ("resnet18", 4, 16, "small", 200),
            "T4 cubs_serial12": ("cubs_serial12", 2, 32, "imagenet", 98),
        },
    )
    rows = bench.bench_memory(torch.device("cpu"), steps=1)
    assert [(r["what"], r["name"], r["batch_size"], r["image_size"], r["stem"]) for r in rows] == [
        ("memory", "resnet18", 4, 16, "small"),
        ("memory", "T4 cubs_serial12", 2, 32, "imagenet"),
    ]
    assert all(
        r["peak_mem_mb"] > 0 and r["precision_used"] == "fp32" and r["switches"]["precision"] == "auto" for r in rows
    )


def test_an_unusable_out_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    import pytest

    def measured(*args, **kwargs):
        pytest.fail("the benchmark ran with an --out it cannot write")

    monkeypatch.setattr(bench, "run", measured)
    (tmp_path / "a_file").write_text("")
    for out, problem in (
        (tmp_path, "it is a folder"),
        (tmp_path / "a_file" / "bench.json", "a_file is a file, not a folder"),
    ):
        assert bench.main(["--device", "cpu", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: cannot write {out}: ") and problem in err


def test_the_out_check_really_writes_and_creates_the_folder(tmp_path, monkeypatch):
    import os
    import tempfile

    import pytest

    out = tmp_path / "new" / "deeper" / "bench.json"
    assert bench.check_output_file(str(out)) == out
    assert out.parent.is_dir() and os.listdir(out.parent) == [], "the folder is made, the probe removed"

    def refused(*args, **kwargs):  # what a read-only folder does (root ignores permission bits)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(
        OutputError, match=r"cannot write .*bench.json: Permission denied in .*deeper; choose another --out"
    ):
        bench.check_output_file(out)
