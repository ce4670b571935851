"""Is a bf16 run's accuracy within the fp32 seed spread? T2 (ResNet-18, the cpu profile's 32 px /
ImageNet-stem recipe) on the first classes of the real mini Tiny ImageNet, the same epochs, several
seeds in fp32 and in bf16 autocast (precision="bf16": no channels_last), on this CPU. Writes a JSON and a markdown table.

    python scripts/bf16_check.py --data-dir data/mini --classes 10 --epochs 6 --seeds 3 --out docs/bf16-check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(
    data_dir: str, out: Path, classes: int, epochs: int, seed: int, precision: str, image_size: int = 32
) -> dict:
    run_dir = out / f"{precision}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "helpers.train",
        "T2",
        "--profile",
        "cpu",
        "--data_dir",
        data_dir,
        "--out_dir",
        str(run_dir),
        "--classes",
        str(classes),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--precision",
        precision,
        "--resume",
        "False",
        "--image_size",
        str(image_size),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    document = json.loads((run_dir / "metrics" / "T2_resnet18.json").read_text())
    run = document["models"]["T2_resnet18"]
    return {
        "precision": precision,
        "seed": seed,
        "heldout_top1": run["heldout"]["top1"],
        "test_top1": run["test"]["top1"],
        "train_seconds": run["train_seconds"],
        "images_per_s": run["images_per_s"],
        "epochs": run["epochs_run"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "mini"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bf16-check"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    args.data_dir = str(Path(args.data_dir).resolve())  # (the runs start in the project folder)
    work = ROOT / "outputs" / f"bf16-check-{args.classes}x{args.image_size}"
    records = [
        one_run(args.data_dir, work, args.classes, args.epochs, seed, p, args.image_size)
        for seed in range(args.seeds)
        for p in ("fp32", "bf16")
    ]
    summary = {}
    for p in ("fp32", "bf16"):
        tops = [r["test_top1"] for r in records if r["precision"] == p]
        speed = [r["images_per_s"] for r in records if r["precision"] == p]
        summary[p] = {
            "mean": statistics.mean(tops),
            "min": min(tops),
            "max": max(tops),
            "images_per_s": statistics.median(speed),
        }
    inside = summary["fp32"]["min"] <= summary["bf16"]["mean"] <= summary["fp32"]["max"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_check.json").write_text(
        json.dumps(
            {"args": vars(args), "records": records, "summary": summary, "bf16_mean_within_fp32_range": inside},
            indent=1,
        )
    )
    lines = [
        f"T2 (cpu profile) on {args.classes} classes of the mini Tiny ImageNet at {args.image_size} px, {args.epochs} epochs, "
        f"seeds 0-{args.seeds - 1}; made by `python scripts/bf16_check.py --classes {args.classes} --epochs {args.epochs} "
        f"--seeds {args.seeds} --image-size {args.image_size} --out {args.out}`.",
        "",
        "| precision | test top-1 per seed | mean | range | train img/s (median) |",
        "|---|---|---:|---:|---:|",
    ]
    for p in ("fp32", "bf16"):
        tops = [r["test_top1"] for r in records if r["precision"] == p]
        s = summary[p]
        lines.append(
            f"| {p} | {', '.join(f'{100 * t:.1f}' for t in tops)} | {100 * s['mean']:.1f} | {100 * (s['max'] - s['min']):.1f} | {s['images_per_s']:.0f} |"
        )
    lines += ["", f"bf16's mean {'lies' if inside else 'does NOT lie'} within fp32's seed range."]
    (out / "bf16_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
