"""Regenerate docs/cpu-report/: the cpu profile on the real mini archives within a budget, as the
README shows it ("What you get without a GPU").

    python scripts/cpu_report.py --archives ../shared/data --budget 90m

1. data/mini/ gets links to the archives in --archives (the mini Tiny ImageNet and Cars-196 zips;
   the pipeline extracts them once) and a generated STL-10 stand-in (no real STL-10 here; the
   report labels it as generated).
2. `python -m helpers.pipeline --profile cpu --data-dir data/mini --budget B --out OUT` runs
   (skipped with --skip-run: the docs are then rebuilt from OUT as it is).
3. docs/cpu-report/ gets the report's two pages as PNG and results.md: per notebook its share of
   the budget, planned and measured seconds and key metric, the exact command, the machine and the
   commit. Every number there is read from OUT's pipeline.json and metrics; none is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def link_archives(archives: Path, data: Path) -> list[Path]:
    data.mkdir(parents=True, exist_ok=True)
    linked = []
    for archive in sorted(archives.glob("*.zip")):
        target = data / archive.name
        if not target.exists():
            target.symlink_to(archive.resolve())
        linked.append(target)
    if not linked:
        sys.exit(f"error: no .zip archives in {archives}; give the folder holding the mini (or full) archives")
    return linked


def key_metric(name: str, m: dict) -> str:
    """The number a reader looks for first in each notebook's metrics."""
    if name.startswith("T4"):
        return f"Recall@1 {100 * m['after']['recall@1']:.1f} % (before {100 * m['before']['recall@1']:.1f} %)"
    runs = dict(m["models"]) | ({m["bonus"]["name"]: m["bonus"]} if m.get("bonus") else {})
    best = max(
        runs.items(), key=lambda item: item[1]["heldout"]["top1"]
    )  # chosen on held-out data, as the notebooks do
    what = "accuracy" if name.startswith("E2") else "top-1"
    return f"test {what} {100 * best[1]['test']['top1']:.1f} % ({best[0]}, best on held-out)"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def results_markdown(out: Path, command: str) -> str:
    from helpers.report import data_lines

    summary = json.loads((out / "pipeline.json").read_text())
    budget = summary["budget"]
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((out / "metrics").glob("*.json"))}
    commit = next(iter(metrics.values()))["run"]["git"]
    lines = [
        "# The cpu profile on the real mini archives",
        "",
        "Made by `python scripts/cpu_report.py` (this file, the two PNG pages and the numbers in it come from",
        f"`{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/pipeline.json` and its metrics; nothing is typed by hand).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Commit: {(commit.get('commit') or 'unknown')[:10]}{' (with uncommitted changes)' if commit.get('dirty') else ''}",
        f"- Budget: {budget['budget_s'] / 60:.0f} min; planning {budget['planning_seconds']:.0f} s; planned {budget['planned_seconds']:.0f} s; "
        f"measured {budget['measured_seconds']:.0f} s ({100 * (budget['measured_seconds'] / budget['budget_s'] - 1):+.1f} %); every training ran "
        f"{budget['fraction']:.2f} x its profile's epochs",
        "- Data (from the metrics; STL-10 is a generated stand-in, no real STL-10 is available here):",
        *[f"  - {line}" for line in data_lines(metrics)],
        "",
        "| notebook | share | planned s | measured s | key metric |",
        "|---|---:|---:|---:|---|",
    ]
    for name, step in summary["steps"].items():
        if name not in budget["notebooks"]:
            continue
        metric = key_metric(name, metrics[name]) if name in metrics else step["status"]
        lines.append(
            f"| {name} | {100 * step.get('share', 0):.1f} % | {step.get('predicted_seconds', 0):.0f} | {step['seconds']:.0f} | {metric} |"
        )
    return "\n".join(lines) + "\n"


START, END = "<!-- cpu-report:start -->", "<!-- cpu-report:end -->"


def update_readme(readme: Path, docs: Path, results: str) -> None:
    """Put page 1 and results.md's table and facts (without its title) between the README's markers."""
    text = readme.read_text()
    if START not in text or END not in text:
        return
    page = (docs / "report-1.png").relative_to(ROOT) if docs.is_relative_to(ROOT) else docs / "report-1.png"
    body = results.split("\n", 2)[2].strip()  # (the title line and the blank line after it dropped)
    block = f"{START}\n![page 1 of the cpu profile's report]({page})\n\n{body}\n\nPage 2: [{page.with_name('report-2.png')}]({page.with_name('report-2.png')}).\n{END}"
    head, rest = text.split(START, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archives",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder holding the mini (or full) dataset archives",
    )
    parser.add_argument("--budget", default="90m")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "cpu-mini"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "cpu-report"))
    parser.add_argument("--skip-run", action="store_true", help="rebuild the docs from --out as it is")
    parser.add_argument(
        "--note", default="", help="a caveat to print with the results (e.g. what else ran on the machine meanwhile)"
    )
    args = parser.parse_args(argv)
    data, out, docs = ROOT / "data" / "mini", Path(args.out).resolve(), Path(args.docs).resolve()
    command = f"python -m helpers.pipeline --profile cpu --data-dir data/mini --budget {args.budget} --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
    if not args.skip_run:
        link_archives(Path(args.archives), data)
        subprocess.run(
            [sys.executable, "-m", "helpers.data.synthetic", "--which", "stl10", "--out", str(data)],
            cwd=ROOT,
            check=True,
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "helpers.pipeline",
                "--profile",
                "cpu",
                "--data-dir",
                str(data),
                "--budget",
                args.budget,
                "--out",
                str(out),
            ],
            cwd=ROOT,
        )
        if done.returncode != 0:
            print(f"error: the pipeline exited with {done.returncode}; docs left as they were", file=sys.stderr)
            return done.returncode
    docs.mkdir(parents=True, exist_ok=True)
    for page in ("report-1.png", "report-2.png"):
        shutil.copyfile(out / page, docs / page)
    results = results_markdown(out, command) + (f"\nNote: {args.note}\n" if args.note else "")
    (docs / "results.md").write_text(results)
    update_readme(ROOT / "README.md", docs, results)
    print(f"[cpu_report] wrote {docs}/report-1.png, report-2.png, results.md and the README's table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
