"""Every `python -m helpers.*` entry point answers --help with its parameters and exit status 0."""

import importlib

import pytest

ENTRY_POINTS = ["pipeline", "train", "report", "bench", "proof", "data.download", "data.synthetic"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_exits_0_and_lists_the_parameters(name, capsys):
    module = importlib.import_module(f"helpers.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.startswith("usage:") and "--" in printed


def test_console_scripts_are_the_module_entry_points():
    """pyproject's [project.scripts] name exactly the `python -m helpers.*` entry points; where the
    installed scripts are on this interpreter's bin folder, each answers --help with exit status 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(target.split(":")[0] for target in scripts.values()) == sorted(f"helpers.{n}" for n in ENTRY_POINTS)
    assert all(target.endswith(":main") and name.startswith("cubs-") for name, target in scripts.items())
    installed = [Path(sys.executable).parent / name for name in scripts]
    installed = [path for path in installed if path.is_file() and os.access(path, os.X_OK)]
    for path in installed[:2]:  # (each start costs the imports of torch: two show the wrappers work)
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("usage:"), (path, done.stderr[-500:])


def test_train_help_lists_every_parameter_of_a_task_with_its_meaning(capsys):
    from helpers.config import RetrievalConfig
    from helpers.train import main

    with pytest.raises(SystemExit) as done:
        main(["T4", "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for field in ("cls_budget_s", "emb_budget_s", "miner", "num_workers"):
        assert f"--{field} (default " in printed
    assert "--emb_budget_s (default 0.0): > 0: each stage-2 run" in printed
    assert "--cls_budget_s (default 0.0): > 0: train stage 1" in printed, (
        "a meaning written above its field is found too"
    )
    assert "--gpus (default 1): > 1: train on this many GPUs" in printed and "(default ()" not in printed
    assert (
        printed.count("\n  --") >= len(RetrievalConfig.__dataclass_fields__) - 2
    )  # (task and profile are not parameters)


def test_the_licence_and_citation_are_there_and_agree():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    citation = (root / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and "license: MIT" in citation
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text()


def test_environment_yml_installs_what_pyproject_declares():
    """conda-forge for Python, pip for PyTorch (the pytorch channel stopped at 2.5) with pyproject's
    own pins, and the package with the extras `make` installs."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    yaml = pytest.importorskip("yaml")
    root = Path(__file__).resolve().parents[1]
    env = yaml.safe_load((root / "environment.yml").read_text())
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert env["channels"] == ["conda-forge"] and "pytorch" not in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {d.split("=")[0] for d in conda} == {"python", "pip"}
    pinned = [d for d in project["dependencies"] if d.split(">")[0] in ("torch", "torchvision")]
    assert [d for d in pip if not d.startswith("-e")] == pinned
    editable = next(d for d in pip if d.startswith("-e"))
    assert editable.startswith("-e .[") and {"dev"} <= set(editable[5:-1].split(",")) <= set(
        project["optional-dependencies"]
    )
    assert "helpers[pipeline,board]" in project["optional-dependencies"]["dev"], (
        "make (.[dev]) installs the pipeline's and TensorBoard's extras"
    )
    assert not {"papermill", "ipykernel", "nbconvert", "ipywidgets"} & {
        d.split(">")[0] for d in project["dependencies"]
    }, "a notebook's runtime keeps its own ipykernel: the pipeline's tools are an extra"


def test_the_pipeline_without_its_extra_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    from helpers import pipeline

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "papermill" else real(name, *a))
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path / "out")]) == 2
    assert (
        "error: the pipeline runs notebooks with papermill, which are not installed: pip install -e '.[pipeline]'"
        in capsys.readouterr().err
    )
