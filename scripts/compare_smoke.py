"""Compare two commits' smoke metrics on this machine, for a refactor that must not change results.

    python scripts/compare_smoke.py BASE [NEW]     # NEW defaults to the working tree

Each side runs the smoke pipeline (`--no-report`) from its own code (a git worktree for a commit,
with PYTHONPATH and HELPERS_PROJECT_ROOT pointing at it, so notebook kernels import that code too),
into its own folder; then every metrics JSON is compared exactly, leaving out only what cannot
repeat (timings, run ids, the provenance stamp) and writing each side's project and output folders
as <project> and <out>. Floating-point results depend on the CPU's kernels, so compare on one
machine only; this is a refactoring aid, not a test (the suite checks determinism and learning).
Exit status 0 when identical, 1 with the differences listed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def run_smoke(code: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(code), HELPERS_PROJECT_ROOT=str(code))
    env.pop("HELPERS_OUT_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "helpers.pipeline", "--profile", "smoke", "--out", str(out), "--no-report"],
        cwd=code,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"the smoke pipeline of {code} failed (exit {done.returncode})")


def canonical(out: Path, code: Path) -> dict:
    """{notebook: its metrics without what varies, with <out> / <project> for the two folders}."""
    roots = sorted(
        [(str(out), "<out>"), (str(code), "<project>")], key=lambda r: -len(r[0])
    )  # (the longer first: one may hold the other)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in VARYING}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            for path, name in roots:
                value = value.replace(path, name)
        return value

    return {p.stem: clean(json.loads(p.read_text())) for p in sorted((out / "metrics").glob("*.json"))}


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}.{k}: only in {'base' if k in a else 'new'}" for k in sorted(set(a) ^ set(b))]
        return found + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: base {a!r}, new {b!r}"]


def checkout(commit: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, check=True, capture_output=True
    )
    return folder


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    work = Path(tempfile.mkdtemp(prefix="compare-smoke-"))
    sides, worktrees = [], []
    for name, commit in zip(("base", "new"), argv + ([] if len(argv) == 2 else [None])):
        code = ROOT if commit is None else checkout(commit, work / f"{name}_code")
        worktrees += [] if commit is None else [code]
        sides.append((code, work / f"{name}_out"))
    try:
        for code, out in sides:
            run_smoke(code, out)
        found = differences(*(canonical(out, code) for code, out in sides))
    finally:
        for code in worktrees:
            subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
    if found:
        print(f"{len(found)} differences:\n" + "\n".join(found[:50]))
        return 1
    print(f"identical smoke metrics ({sides[0][1]} and {sides[1][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
