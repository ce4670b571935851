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


def freeze(python: Path) -> dict[str, str]:
    lines = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return dict(line.split("==", 1) if "==" in line else (line, "") for line in lines if line.strip())


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
    before = freeze(python)
    print("pip freeze before `pip install -e .`:\n  " + "\n  ".join(f"{k}=={v}" for k, v in sorted(before.items())))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:])
        return 1
    after = freeze(python)
    added = {k: v for k, v in after.items() if k not in before}
    changed = {k: (before[k], after[k]) for k in before if k in after and before[k] != after[k]}
    print("pip freeze after:\n  " + "\n  ".join(f"{k}=={v}" for k, v in sorted(after.items()) if v))
    print(f"added by `pip install -e .`: {', '.join(sorted(added)) or 'nothing'}")
    print(f"changed: {changed or 'nothing'}")
    kept = all(after.get(name) == version for name, version in PRESENT.items())
    print(("ok: " if kept else "FAILED: ") + ", ".join(f"{n} {after.get(n)} (was {v})" for n, v in PRESENT.items()))
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
