"""Does `pip install -e .` leave a runtime's own torch, torchvision and ipykernel alone (Colab's case)?

A fresh virtualenv first gets other versions of those three: metadata-only wheels built here (the
real ones are GB downloads, and only their installed versions matter to pip's resolver). Then
`pip install -e <project>` runs for real, the other dependencies coming from the package index. The
script prints `pip freeze` before and after and exits 1 when any of the three changed.

    python scripts/check_install.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESENT = {"torch": "2.5.1", "torchvision": "0.20.1", "ipykernel": "6.17.1"}  # none of them what `make setup` installs


def stub_wheel(name: str, version: str, folder: Path) -> Path:
    """A wheel holding only `name`'s metadata at `version` (what pip's resolver reads)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: check_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def installed(python: Path) -> dict[str, str]:
    """{distribution name: version} in the virtualenv of `python`."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(listed)}


def freeze(python: Path) -> str:
    return subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the virtualenv in this folder and keep it")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="check-install-"))
    work.mkdir(parents=True, exist_ok=True)
    venv, wheels = work / "venv", work / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    stubs = [stub_wheel(name, version, wheels) for name, version in PRESENT.items()]
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", *map(str, stubs)], check=True)
    before = installed(python)
    print("pip freeze before `pip install -e .`:\n" + freeze(python))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:])
        return 1
    after = installed(python)
    print("pip freeze after:\n" + freeze(python))
    added = sorted(f"{k}=={v}" for k, v in after.items() if k not in before)
    changed = {k: f"{before[k]} -> {after.get(k)}" for k in before if after.get(k) != before[k]}
    print(f"added by `pip install -e .`: {', '.join(added) or 'nothing'}")
    print(f"changed or removed: {changed or 'nothing'}")
    kept = all(after.get(name) == version for name, version in PRESENT.items())
    print(("ok: " if kept else "FAILED: ") + ", ".join(f"{n} {after.get(n)} (was {v})" for n, v in PRESENT.items()))
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
