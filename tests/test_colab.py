"""The Colab install cell: in every notebook, written from pyproject's repository URL, a no-op outside
Colab and where `helpers` imports, and in Colab the clone and `pip install -e` it promises."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers.colab import CELL_TAG, install_cell, open_in_colab_url, repository_url
from helpers.tasks import STEPS

ROOT = Path(__file__).resolve().parents[1]
FIND_SPEC = importlib.util.find_spec
pytest.importorskip("tomllib")


def colab_script():
    spec = importlib.util.spec_from_file_location("colab_script", ROOT / "scripts" / "colab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_starts_with_the_cell_for_the_repository_url_and_the_readme_agrees():
    url = repository_url(ROOT / "pyproject.toml")
    for step in STEPS:
        nb = json.loads((ROOT / "notebooks" / f"{step.name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert CELL_TAG in code[0]["metadata"].get("tags", []), f"{step.name}: the install cell comes first"
        assert "".join(code[0]["source"]) == install_cell(url), f"{step.name}: rerun python scripts/colab.py"
        assert "parameters" in code[1]["metadata"].get("tags", [])
    script = colab_script()
    assert script.readme_block(url) in (ROOT / "README.md").read_text(), "rerun python scripts/colab.py"


def test_the_links_and_the_url_recorded_in_pyproject(tmp_path):
    script = colab_script()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n\n[project.scripts]\nx = "x:main"\n')
    script.set_repository_url(pyproject, "https://github.com/someone/cubs-project.git")
    assert repository_url(pyproject) == "https://github.com/someone/cubs-project.git"
    script.set_repository_url(pyproject, "https://github.com/other/repo")
    assert (
        repository_url(pyproject) == "https://github.com/other/repo" and pyproject.read_text().count("Repository") == 1
    )
    block = script.readme_block("https://github.com/someone/cubs-project.git")
    assert "git clone https://github.com/someone/cubs-project.git project" in block
    assert (
        "(https://colab.research.google.com/github/someone/cubs-project/blob/main/notebooks/T4_cars196_retrieval.ipynb)"
        in block
    )
    assert block.count("Open in Colab") == len(STEPS)
    with pytest.raises(ValueError, match="needs a GitHub repository URL"):
        open_in_colab_url("/content/drive/project", "notebooks/T1_custom_cnn.ipynb")


def run_cell(project: str, monkeypatch, in_colab: bool, installed: bool) -> list[list[str]]:
    """Execute the cell as a kernel would; returns the commands it ran (none are run for real)."""
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: ran.append(command))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: FIND_SPEC(name, *a) if installed else None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(install_cell(project), "<colab cell>", "exec"), {})
    return ran


def test_the_cell_does_nothing_outside_colab_or_where_the_project_is_installed(monkeypatch):
    assert run_cell("https://github.com/someone/cubs-project", monkeypatch, in_colab=False, installed=False) == []
    assert run_cell("https://github.com/someone/cubs-project", monkeypatch, in_colab=True, installed=True) == []


def test_in_colab_the_cell_clones_and_installs_or_asks_for_the_project(monkeypatch, tmp_path):
    ran = run_cell("https://github.com/someone/cubs-project", monkeypatch, in_colab=True, installed=False)
    assert ran[0][:2] == ["git", "clone"] and ran[0][-2:] == [
        "https://github.com/someone/cubs-project",
        "/content/project",
    ]
    assert ran[1] == [sys.executable, "-m", "pip", "install", "-q", "-e", "/content/project"]
    assert sys.path[0] == "/content/project"
    ran = run_cell(str(tmp_path), monkeypatch, in_colab=True, installed=False)  # a copy on Drive
    assert ran == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(tmp_path)]]
    with pytest.raises(SystemExit, match="set PROJECT in this cell to this project's git URL or to a folder"):
        run_cell("", monkeypatch, in_colab=True, installed=False)
