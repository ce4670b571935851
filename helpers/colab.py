"""The first cell of every notebook: in Colab, install this project when the runtime lacks it.

The cell is plain Python (it runs before `helpers` can be imported) and does nothing outside Colab
or where `helpers` imports. Its PROJECT is the repository URL that pyproject.toml names under
[project.urls] Repository; `python scripts/colab.py` writes the cell into the six notebooks and the
"Open in Colab" links into the README from it (tests/test_colab.py checks they agree).
"""

from __future__ import annotations

from pathlib import Path

CELL_TAG = "colab-install"
CELL = """# Colab only (a no-op anywhere else): install this project when the runtime lacks it. PROJECT is
# its git URL, or a folder holding a copy (e.g. on Drive: mount it first).
PROJECT = {project!r}
import importlib.util, sys

if "google.colab" in sys.modules and importlib.util.find_spec("helpers") is None:
    import subprocess

    if not PROJECT:
        raise SystemExit("set PROJECT in this cell to this project's git URL or to a folder holding it")
    if "://" in PROJECT or PROJECT.startswith("git@"):
        import os

        if not os.path.isdir("/content/project"):  # (a rerun after a failed install: cloned already)
            subprocess.run(["git", "clone", "-q", "--depth", "1", PROJECT, "/content/project"], check=True)
        PROJECT = "/content/project"
    # --no-deps would miss a dependency Colab lacks; pip keeps Colab's own torch, torchvision, ipykernel
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", PROJECT], check=True)
    sys.path.insert(0, PROJECT)  # (an editable install is seen by new processes only)"""


def install_cell(project: str) -> str:
    """The cell's source for `project` (a git URL, or "" while the repository has none)."""
    return CELL.format(project=project)


def repository_url(pyproject: Path) -> str:
    """pyproject.toml's [project.urls] Repository, or "" when it names none."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return str(project.get("urls", {}).get("Repository", ""))


def open_in_colab_url(repository: str, notebook: str, branch: str = "main") -> str:
    """Colab's address of `notebook` (e.g. "notebooks/T1_custom_cnn.ipynb") in a GitHub repository."""
    path = repository.removesuffix(".git").split("github.com/", 1)
    if len(path) != 2:
        raise ValueError(f"Open in Colab needs a GitHub repository URL, not {repository!r}")
    return f"https://colab.research.google.com/github/{path[1].strip('/')}/blob/{branch}/{notebook}"
