"""The smoke pipeline's metrics equal, bit for bit, those of the code before the issue-12 refactor.

The baseline (tests/fixtures/smoke_metrics_baseline.json) was recorded with commit BASELINE_COMMIT
(checked out in a git worktree) by `python tests/test_smoke_unchanged.py record <its smoke
pipeline's out> <the worktree>`; two runs of that commit gave identical metrics. Every metric,
history value, configuration field and data description is compared exactly; only what cannot
repeat is left out: timings, the provenance stamp ("run") and absolute paths (replaced by
<out> / <project>). Floating-point results depend on the CPU's kernels, so the stored baseline is
used only on a machine like the one that recorded it; elsewhere the test runs the baseline commit
itself (from git) beside the current code and compares the two.

A change that is meant to change the smoke metrics records a new baseline (and says so).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "smoke_metrics_baseline.json"
BASELINE_COMMIT = "b59661aba6486c3cbe5cf74ab25a26edfc5b1b25"  # the code before the refactor (with the center-loss determinism fix)
TIMING_KEYS = {"train_seconds", "images_per_s", "eval_seconds", "fit_seconds", "budget_seconds_used"}
# configuration fields the refactor removed because nothing read them (task -> fields)
REMOVED_CONFIG_FIELDS = {"E2_stl10_layerwise": ("channels_last",)}


# configuration fields added since, with the value that reproduces the baseline (issue 14: one process)
ADDED_CONFIG_FIELDS = {"gpus": 1}
ADDED_ONLY_WITH = ("sync_bn",)  # a field that does nothing at the value above


def renamed_config_fields(documents: dict) -> dict:
    """Baseline documents with the configuration fields renamed since (issue 13: amp=True, bf16
    autocast on CUDA and fp32 elsewhere, is precision="auto"; amp=False is "fp32")."""
    for document in documents.values():
        config = document["config"]
        if "amp" in config:
            config["precision"] = "auto" if config.pop("amp") else "fp32"
    return documents


def without_added_fields(documents: dict) -> dict:
    """Documents of today's code without the configuration fields added since the baseline, each
    checked to hold the value under which the baseline's results are reproduced."""
    for name, document in documents.items():
        config = document["config"]
        for field, value in ADDED_CONFIG_FIELDS.items():
            if field in config:
                assert config.pop(field) == value, f"{name}: {field} is not {value}"
        for field in ADDED_ONLY_WITH:
            config.pop(field, None)
    return documents


def machine() -> dict:
    """What decides the floating-point results of a CPU run."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"torch": torch.__version__, "cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def canonical(out: Path, project: Path) -> dict:
    """{notebook: its metrics without timings, provenance and absolute paths}."""

    def clean(value, name):
        if isinstance(value, dict):
            return {k: clean(v, name) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [clean(v, name) for v in value]
        if isinstance(value, str):
            return value.replace(str(out), "<out>").replace(str(project), "<project>")
        return value

    documents = {}
    for path in sorted((out / "metrics").glob("*.json")):
        document = json.loads(path.read_text())
        document.pop("run")
        for field in REMOVED_CONFIG_FIELDS.get(path.stem, ()):
            document["config"].pop(field, None)
        documents[path.stem] = clean(document, path.stem)
    return documents


def run_smoke(out: Path, code: Path, env_extra: dict | None = None) -> None:
    env = dict(os.environ, **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "helpers.pipeline", "--profile", "smoke", "--out", str(out), "--no-report"],
                          cwd=code, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}.{k}: only in {'baseline' if k in a else 'now'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            found += differences(a[k], b[k], f"{where}.{k}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    same = a == b or (a != a and b != b)  # NaN equals NaN here
    return [] if same else [f"{where}: baseline {a!r}, now {b!r}"]


def test_smoke_metrics_are_identical_to_the_code_before_the_refactor(tmp_path):
    run_smoke(tmp_path / "now", ROOT)
    now = canonical(tmp_path / "now", ROOT)
    recorded = json.loads(FIXTURE.read_text())
    if recorded["machine"] == machine():
        baseline = recorded["metrics"]
    else:  # another CPU or torch: run the baseline commit here
        has_commit = subprocess.run(["git", "cat-file", "-e", BASELINE_COMMIT + "^{commit}"], cwd=ROOT, capture_output=True).returncode == 0
        if not has_commit:
            pytest.skip(f"this machine differs from the recording one ({machine()}) and git has no commit {BASELINE_COMMIT[:10]} to rerun")
        code = tmp_path / "baseline_code"
        subprocess.run(["git", "worktree", "add", "--detach", str(code), BASELINE_COMMIT], cwd=ROOT, check=True, capture_output=True)
        try:
            run_smoke(tmp_path / "baseline", code, {"PYTHONPATH": str(code), "HELPERS_PROJECT_ROOT": str(code)})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
        baseline = canonical(tmp_path / "baseline", code)
    found = differences(renamed_config_fields(baseline), without_added_fields(now))
    assert not found, f"{len(found)} differences, e.g.\n" + "\n".join(found[:20])


if __name__ == "__main__":  # python tests/test_smoke_unchanged.py record OUT [PROJECT that produced OUT]
    assert sys.argv[1:2] == ["record"], __doc__
    project = Path(sys.argv[3]).resolve() if len(sys.argv) > 3 else ROOT
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"commit": BASELINE_COMMIT, "machine": machine(), "metrics": canonical(Path(sys.argv[2]).resolve(), project)}, indent=1, sort_keys=True) + "\n")
    print("recorded", FIXTURE)
