"""Write the Colab install cell into every notebook and the "Open in Colab" links into the README,
from the repository URL in pyproject.toml ([project.urls] Repository).

    python scripts/colab.py [--url https://github.com/OWNER/REPO]   # --url also records it in pyproject.toml

Without a URL the cells get PROJECT = "" (in Colab they then ask for one) and the README says how to
add the links. The notebooks stay without outputs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.colab import CELL_TAG, install_cell, open_in_colab_url, repository_url  # noqa: E402
from helpers.tasks import STEPS  # noqa: E402

START, END = "<!-- colab:start -->", "<!-- colab:end -->"


def set_repository_url(pyproject: Path, url: str) -> None:
    text = pyproject.read_text()
    if re.search(r"^\[project\.urls\]", text, flags=re.M):
        text = re.sub(r'^Repository = ".*"$', f'Repository = "{url}"', text, flags=re.M)
        if f'Repository = "{url}"' not in text:
            text = text.replace("[project.urls]\n", f'[project.urls]\nRepository = "{url}"\n', 1)
    else:
        text = text.replace("\n[project.scripts]", f'\n[project.urls]\nRepository = "{url}"\n\n[project.scripts]', 1)
    pyproject.write_text(text)


def write_cell(notebook: Path, source: str) -> bool:
    """The tagged first code cell of `notebook` holds `source` (added when missing). True when changed."""
    nb = json.loads(notebook.read_text())
    cell = {
        "cell_type": "code",
        "execution_count": None,
        "id": "colab-install",
        "metadata": {"tags": [CELL_TAG]},
        "outputs": [],
        "source": source.splitlines(keepends=True),
    }
    cells = nb["cells"]
    index = next((i for i, c in enumerate(cells) if CELL_TAG in c.get("metadata", {}).get("tags", [])), None)
    if index is not None and cells[index] == cell:
        return False
    if index is None:
        cells.insert(1 if cells and cells[0]["cell_type"] == "markdown" else 0, cell)  # after the title
    else:
        cells[index] = cell
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def readme_block(url: str) -> str:
    if not url:
        return (
            f'{START}\nThis repository has no public URL yet, so there are no "Open in Colab" links: set\n'
            "`Repository` under `[project.urls]` in pyproject.toml (or run `python scripts/colab.py --url URL`),\n"
            f"and this block, the clone command and each notebook's install cell are written from it.\n{END}"
        )
    rows = "\n".join(
        f"| {s.name} | [Open in Colab]({open_in_colab_url(url, f'notebooks/{s.name}.ipynb')}) |" for s in STEPS
    )
    return f"{START}\n```bash\ngit clone {url} project\n```\n\n| notebook | |\n|---|---|\n{rows}\n{END}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the repository's git URL (recorded in pyproject.toml)")
    args = parser.parse_args(argv)
    pyproject = ROOT / "pyproject.toml"
    if args.url:
        set_repository_url(pyproject, args.url)
    url = repository_url(pyproject)
    source = install_cell(url)
    for step in STEPS:
        notebook = ROOT / "notebooks" / f"{step.name}.ipynb"
        print(f"{notebook.relative_to(ROOT)}: {'written' if write_cell(notebook, source) else 'up to date'}")
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = readme_block(url)
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        raise SystemExit(f"README.md has no {START} ... {END} block to write the links into")
    readme.write_text(text)
    print(f"README.md: Colab block {'with links to ' + url if url else 'says the URL is missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
