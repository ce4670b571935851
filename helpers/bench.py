"""Throughput benchmark: training images/s of each model and of each data path, in one run.

    python -m helpers.bench --device cpu --quick --out outputs/bench_cpu.json
    python -m helpers.bench --device cuda --out outputs/bench_cuda.json [--data-dir data]

Writes a JSON list of records {what: "model"|"data"|"end_to_end"|"ratio", name, images_per_s, device,
batch_size, peak_mem_mb, ...}. Models are timed through the real engine (`fit`, second epoch, on
device-resident random data so the input pipeline is not what is measured); data paths deliver
augmented batches with no model: "lazy" (per-item JPEG decode in DataLoader workers), "cached" (the
decode-once uint8 array in RAM) and "gpu" (that array on the GPU; CUDA only). On CUDA every speed
switch (precision bf16 / fp16 + GradScaler / fp32, channels_last, fused optimizer, torch.compile,
CUDA graphs) is also timed against the defaults, and "memory" rows give each model's peak GPU memory
at its full profile's batch and input size (T1-T3: 256 images of 64 px; T4: 128 of 224 px). "end_to_end" rows time training with its data pipeline, the project (cache + batch
augmentation + `fit`) beside the peer a user would write (`helpers.peer`: PIL DataLoader,
torchvision model, plain fp32 loop; on CUDA also its autocast version), on the same images, shapes
and device; a "ratio" record per model gives project/peer. Ratios are only meaningful within one
file (one machine, one run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers.budget import StepClock
from helpers.errors import OutputError, ProjectError
from helpers.data import (
    BatchAugment,
    CachedTinyImageNet,
    LoaderBatches,
    TensorBatches,
    TinyImageNet,
    ToUint8Tensor,
    synthetic,
)
from helpers.data.transforms import AugmentRNG
from helpers.engine import FitConfig, fit
from helpers.memory import BatchDoesNotFit
from helpers.models import CustomCNN, resnet18
from helpers.peer import PeerConfig, measure_peer_step, peer_loader, peer_resnet18
from helpers.config import RetrievalConfig, TINY_IMAGENET_PRESETS
from helpers.runinfo import choose_precision, peak_mem_mb, resolve_device, run_info

MODELS = {
    "custom_cnn": lambda n, stem: CustomCNN(n),
    "resnet18": lambda n, stem: resnet18(n, stem=stem),
    "cubs_parallel": lambda n, stem: resnet18(n, stem=stem, cubs="parallel"),
    "cubs_serial12": lambda n, stem: resnet18(n, stem=stem, cubs="serial12"),
    "cubs_serial21": lambda n, stem: resnet18(n, stem=stem, cubs="serial21"),
}
# (name, FitConfig overrides): each CUDA speed switch against the all-on default
SWITCHES = (
    ("all on", {}),  # precision "auto": bf16 on compute capability >= 8.0, fp16 + GradScaler below
    ("bf16", {"precision": "bf16"}),
    ("fp16 + GradScaler", {"precision": "fp16"}),
    ("fp32", {"precision": "fp32"}),
    ("channels_last off", {"channels_last": False}),
    ("fused off", {"fused": False}),
    ("compile on", {"compile": True}),
    ("compile + CUDA graphs", {"compile": True, "compile_mode": "reduce-overhead"}),
)


def check_output_file(path: str | Path) -> Path:
    """`path` once a file is sure to be writable there (its folder created if need be); a ValueError
    of one line naming the path otherwise. Called before any work, so a long run is never lost to
    an --out that is a folder, lies under a file, or is not writable."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; choose another --out")
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose another --out")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc} in {out.parent}; choose another --out") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"cannot write {path}: it is not writable; choose another --out")
    return out


def bench_model(
    name: str,
    device: torch.device,
    batch_size: int,
    image_size: int,
    steps: int,
    stem: str,
    num_classes: int = 200,
    **switches,
) -> dict:
    """Training images/s of one model through `fit` (epoch 2 of 2; epoch 1 warms up / compiles)."""
    torch.manual_seed(0)
    model = MODELS[name](num_classes, stem)
    images = torch.randint(0, 256, (batch_size * steps, image_size, image_size, 3), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (batch_size * steps,))
    source = TensorBatches(images, labels, batch_size=batch_size, shuffle=True, drop_last=True, device=device)
    cfg = FitConfig(epochs=2, lr=0.01, monitor="", log_every=10**9, **switches)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = fit(model, source, BatchAugment(crop="pad", padding=4), cfg, device=device, progress=False)
    return {
        "what": "model",
        "name": name,
        "images_per_s": result.history[-1]["images_per_s"],
        "device": str(device),
        "batch_size": batch_size,
        "image_size": image_size,
        "stem": stem,
        "steps": steps,
        "peak_mem_mb": round(peak_mem_mb(device), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "switches": {k: cfg.__dict__[k] for k in ("precision", "channels_last", "fused", "compile", "compile_mode")},
        "precision_used": choose_precision(cfg.precision, str(device)).used,
    }


def full_profile_shapes() -> dict[str, tuple[str, int, int, str, int]]:
    """row label -> (model, batch size, image size, stem, classes) of the full profile that trains it."""
    tiny = TINY_IMAGENET_PRESETS["full"]
    t4 = RetrievalConfig.PRESETS["T4"]["full"]
    shapes = {name: (name, tiny["batch_size"], tiny["image_size"], "small", 200) for name in MODELS}
    # T4's stage 1: the 98-way classifier in the fashion T3 picks (serial12 without T3's metrics)
    shapes["T4 cubs_serial12"] = ("cubs_serial12", t4["batch_size"], t4["image_size"], RetrievalConfig.stem, 98)
    return shapes


def bench_memory(device: torch.device, steps: int = 3) -> list[dict]:
    """Peak GPU memory (and images/s) of each model at its full profile's batch and input size."""
    records = []
    for label, (name, batch, size, stem, classes) in full_profile_shapes().items():
        try:
            record = bench_model(name, device, batch, size, steps, stem=stem, num_classes=classes)
        except BatchDoesNotFit as error:
            record = {
                "name": name,
                "images_per_s": None,
                "peak_mem_mb": None,
                "error": str(error),
                "batch_size": batch,
                "image_size": size,
                "stem": stem,
            }
        records.append(record | {"what": "memory", "name": label, "profile": "full"})
    return records


def time_source(source, augment: BatchAugment, device: torch.device, epochs: int = 2) -> float:
    """Images/s delivered (decoded, gathered, augmented on the device) in the last of `epochs` epochs."""
    rate = 0.0
    for epoch in range(epochs):
        rng = AugmentRNG(epoch, device)
        seen, tic = 0, time.perf_counter()
        for images, labels in source.epoch(epoch):
            x, _ = augment.train(images, labels, rng)
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = seen / (time.perf_counter() - tic)
    return rate


def bench_data(root: Path, device: torch.device, batch_size: int, num_workers: int, cache_dir: Path) -> list[dict]:
    """The lazy, cached and (CUDA) gpu paths over the same Tiny ImageNet train split."""
    augment = BatchAugment(crop="pad", padding=4)
    records = []
    lazy_set = TinyImageNet(root, "train", transform=ToUint8Tensor())
    common = dict(batch_size=batch_size, shuffle=True, drop_last=True, seed=0)
    lazy = LoaderBatches(lazy_set, device=device, num_workers=num_workers, **common)
    records.append({"name": "lazy", "images_per_s": time_source(lazy, augment, device), "num_workers": num_workers})
    tic = time.perf_counter()
    cached_set = CachedTinyImageNet(root, "train", cache_dir=cache_dir, num_workers=num_workers)
    build = time.perf_counter() - tic
    images, labels = cached_set.tensors()
    cached = TensorBatches(images, labels, device="cpu", output_device=device, **common)
    records.append(
        {
            "name": "cached",
            "images_per_s": time_source(cached, augment, device),
            "build_seconds": round(build, 2),
            "cache_built": cached_set.built,
        }
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = TensorBatches(images, labels, device=device, **common)
        records.append({"name": "gpu", "images_per_s": time_source(resident, augment, device, epochs=3)})
    for r in records:
        r.update(
            what="data",
            device=str(device),
            batch_size=batch_size,
            images=len(lazy_set),
            peak_mem_mb=round(peak_mem_mb(device), 1),
        )
    return records


def peer_model(name: str, num_classes: int, stem: str) -> torch.nn.Module:
    """The peer's model for a row: torchvision's resnet18 (3x3 stem for "small"); for the project's own
    designs (custom CNN, CUBS) the same module, since a user would have to write it too."""
    return peer_resnet18(num_classes, stem) if name == "resnet18" else MODELS[name](num_classes, stem)


def bench_end_to_end(
    name: str,
    root: Path,
    device: torch.device,
    batch_size: int,
    image_size: int,
    steps: int,
    stem: str,
    num_workers: int,
    cache_dir: Path,
    warmup: int = 3,
) -> list[dict]:
    """Training images/s with the data included, project against peer, same images, shapes and device.

    project: the decode-once uint8 cache (on the GPU on CUDA), batch augmentation on the device and
    `fit` with the product's settings. peer: PIL `Dataset` + torchvision transforms + `DataLoader`
    (workers, pinned memory on CUDA) and the plain fp32 loop; on CUDA also the autocast loop
    ("peer-amp": bf16 where supported, else fp16 with a GradScaler). Returns one record per side.
    """
    cuda = device.type == "cuda"
    cached = CachedTinyImageNet(root, "train", cache_dir=cache_dir, num_workers=num_workers)
    num_classes = len(cached.classes)
    images, labels = cached.tensors()
    source = TensorBatches(
        images,
        labels,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        device=device if cuda else "cpu",
        output_device=device,
    )
    augment = BatchAugment(crop="pad", size=image_size, resize_to=image_size if image_size != 64 else None, padding=4)
    common = {
        "what": "end_to_end",
        "model": name,
        "device": str(device),
        "batch_size": batch_size,
        "image_size": image_size,
        "stem": stem,
        "steps": steps,
        "images": len(labels),
    }
    records = []
    torch.manual_seed(0)
    model = MODELS[name](num_classes, stem)
    clock = StepClock(warmup, device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fit(
        model,
        source,
        augment,
        FitConfig(max_steps=warmup + steps, lr=0.01, monitor="", log_every=10**9),
        device=device,
        progress=False,
        on_step=clock,
    )
    records.append(
        common
        | {
            "name": f"{name} project",
            "who": "project",
            "images_per_s": batch_size / clock.seconds_per_step,
            "peak_mem_mb": round(peak_mem_mb(device), 1),
            "data_path": "gpu" if cuda else "cached",
        }
    )
    del model
    samples = TinyImageNet(root, "train").samples
    sides = [("peer", "none")] + ([("peer-amp", "bf16" if torch.cuda.is_bf16_supported() else "fp16")] if cuda else [])
    for who, amp in sides:
        cfg = PeerConfig(batch_size=batch_size, num_workers=num_workers, amp=amp)
        loader = peer_loader(samples, image_size, True, cfg, device)
        torch.manual_seed(0)
        model = peer_model(name, num_classes, stem)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = measure_peer_step(model, loader, cfg, device, warmup, steps)
        records.append(
            common
            | {
                "name": f"{name} {who}",
                "who": who,
                "images_per_s": batch_size / seconds,
                "peak_mem_mb": round(peak_mem_mb(device), 1),
                "data_path": f"PIL DataLoader ({num_workers} workers)",
                "amp": amp,
                "peer_model": type(model).__module__ + "." + type(model).__name__,
            }
        )
        del model, loader
    return records


def end_to_end_ratios(records: list[dict]) -> list[dict]:
    """One "ratio" record per model: project images/s over each peer's, from the end-to-end rows."""
    out = []
    for name in dict.fromkeys(r["model"] for r in records if r["what"] == "end_to_end"):
        rows = {r["who"]: r["images_per_s"] for r in records if r["what"] == "end_to_end" and r["model"] == name}
        ratios = {f"project/{who}": rows["project"] / rate for who, rate in rows.items() if who != "project"}
        out.append({"what": "ratio", "name": f"{name} end-to-end", "model": name, **ratios})
    return out


def run(
    device: str = "cpu", quick: bool = False, data_dir: str | None = None, out: str | None = None, models=tuple(MODELS)
) -> list[dict]:
    """Run every measurement of one benchmark and return (and optionally write) the records."""
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    batch_size = 16 if (cpu and quick) else 32 if cpu else 256
    image_size = 32 if quick else 64
    steps = 3 if cpu else 30
    records = [{"what": "info", "name": "run", **run_info(device), "quick": quick}]
    for name in models:
        records.append(bench_model(name, dev, batch_size, image_size, steps, stem="small"))
        print(f"model {name:14s} {records[-1]['images_per_s']:9.1f} img/s", flush=True)
    if dev.type == "cuda":  # (the switches and memory counters are CUDA's)
        for label, switches in SWITCHES:
            for name in ("resnet18", "cubs_serial21"):
                record = bench_model(name, dev, batch_size, image_size, steps, stem="small", **switches)
                record["name"], record["variant"] = f"{name} [{label}]", label
                records.append(record)
                print(f"model {record['name']:34s} {record['images_per_s']:9.1f} img/s", flush=True)
        for record in bench_memory(dev):
            records.append(record)
            print(
                f"memory {record['name']:20s} batch {record['batch_size']:4d} x {record['image_size']} px: peak {record['peak_mem_mb']} MiB",
                flush=True,
            )
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir:
            root = Path(data_dir) / "tiny-imagenet-200"
        else:
            params = synthetic.TinyParams(
                num_classes=10 if quick else 50, train_per_class=100 if quick else 200, val_per_class=1, test_images=0
            )
            root = synthetic.generate("tiny", tmp, params)
        workers = (os.cpu_count() or 1) if cpu else min(8, os.cpu_count() or 1)
        for record in bench_data(root, dev, 64 if cpu else 256, workers, Path(tmp) / "cache"):
            records.append(record)
            print(f"data  {record['name']:14s} {record['images_per_s']:9.1f} img/s", flush=True)
        peer_workers = 2 if cpu else workers  # the issue's peer: 2 workers on the CPU
        e2e_steps, e2e_warmup = (
            (4, 2) if quick else (20, 10) if cpu else (50, 20)
        )  # data loading needs longer runs than the model rows
        for name in models:
            for record in bench_end_to_end(
                name,
                root,
                dev,
                batch_size,
                image_size,
                e2e_steps,
                "small",
                peer_workers,
                Path(tmp) / "cache",
                warmup=e2e_warmup,
            ):
                records.append(record)
                print(f"e2e   {record['name']:26s} {record['images_per_s']:9.1f} img/s", flush=True)
        for ratio in end_to_end_ratios(records):
            records.append(ratio)
            print(
                "ratio",
                ratio["name"],
                {k: round(v, 2) for k, v in ratio.items() if k.startswith("project/")},
                flush=True,
            )
    data = {r["name"]: r["images_per_s"] for r in records if r["what"] == "data"}
    if "lazy" in data:
        ratios = {f"{k}/lazy": v / data["lazy"] for k, v in data.items() if k != "lazy"}
        records.append({"what": "ratio", "name": "data paths", **ratios})
        print("ratios", {k: round(v, 2) for k, v in ratios.items()}, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(records, indent=1))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training throughput of each model and data path (writes JSON).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument(
        "--quick", action="store_true", help="small inputs and few steps (ends within ~3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--data-dir", default=None, help="folder holding tiny-imagenet-200/ (default: generated data)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
        check_output_file(args.out)
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(args.device, args.quick, args.data_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
