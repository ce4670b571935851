"""Predict the wall time of each notebook of a profile before running it.

For every notebook the plan builds the same configuration and data as the notebook (generating
the stand-in data or the decode-once cache when they are missing, as the notebook would), measures
a few training steps of each kind of model it trains on the chosen device, and times one batch of
evaluation. Prediction = data preparation (measured) + training steps x measured step time +
evaluation passes x measured pass time + a fixed allowance per notebook for the kernel start,
imports, figures and HTML export (`OVERHEAD_S`, measured on the project's 2-core CPU).

Approximations, stated: runs of one notebook with the same architecture share one measurement (the
three CUBS fashions are timed once); a metric-loss step on P x K batches is the classifier step
scaled by the batch size; a greedy pretraining step is costed as a full MLP step (an upper bound).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.budget import measure_fit_step
from helpers.runinfo import Runtime

OVERHEAD_S = 12.0  # kernel start, imports, figures, metrics and the HTML export of one notebook
WARMUP, STEPS = 2, 4  # measured steps per model: enough for a plan, cheap on a CPU


@dataclass
class Job:
    """One training run inside a notebook."""

    name: str
    steps: int
    seconds_per_step: float
    eval_passes: int = 0
    seconds_per_eval: float = 0.0

    @property
    def seconds(self) -> float:
        return self.steps * self.seconds_per_step + self.eval_passes * self.seconds_per_eval


@dataclass
class NotebookPlan:
    notebook: str
    data_seconds: float
    jobs: list[Job] = field(default_factory=list)
    extra_seconds: float = 0.0  # measured work outside training (e.g. before/after embeddings)
    overhead_seconds: float = OVERHEAD_S

    @property
    def seconds(self) -> float:
        return self.data_seconds + sum(j.seconds for j in self.jobs) + self.extra_seconds + self.overhead_seconds

    def as_dict(self) -> dict:
        return {
            "notebook": self.notebook, "predicted_seconds": round(self.seconds, 1), "data_seconds": round(self.data_seconds, 1),
            "extra_seconds": round(self.extra_seconds, 1), "overhead_seconds": self.overhead_seconds,
            "jobs": [dataclasses.asdict(j) | {"seconds": round(j.seconds, 1)} for j in self.jobs],
        }


def eval_pass_seconds(fn, sources, augment, runtime) -> float:
    """Seconds of one evaluation pass over `sources`: their first batch timed (after one warm run of
    it) times the number of batches."""
    from helpers.evaluation import run_split

    total = 0.0
    for source in sources:
        if not source.num_samples:
            continue
        batches = iter(source.epoch(0))
        first = next(batches)
        probe = _OneBatch(first)
        run_split(fn, probe, augment, runtime)  # warm
        tic = time.perf_counter()
        run_split(fn, probe, augment, runtime)
        if runtime.cuda:
            torch.cuda.synchronize(runtime.device)
        total += (time.perf_counter() - tic) * len(source)
    return total


class _OneBatch:
    def __init__(self, batch):
        self.batch = batch

    def epoch(self, epoch: int = 0, start: int = 0):
        yield self.batch


def _evaluated_epochs(epochs: int, every: int) -> int:
    return sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)


def _timed(build):
    tic = time.perf_counter()
    value = build()
    return value, time.perf_counter() - tic


def plan_recognition(task: str, profile: str, overrides: dict, out_dir: Path) -> NotebookPlan:
    """T1, T2, T3 or E1: the notebook's data, then each model kind measured once."""
    from helpers.config import RecognitionConfig
    from helpers.recognition import build_model, build_tiny_imagenet

    cfg = RecognitionConfig.build(task, profile, out_dir=str(out_dir), resume=False, **overrides)
    data, data_seconds = _timed(lambda: build_tiny_imagenet(cfg))
    plan = NotebookPlan(task, data_seconds)
    fit_cfg = cfg.fit_config("train")
    steps = cfg.epochs * len(data.train)
    evals = _evaluated_epochs(cfg.epochs, cfg.eval_every) + 1  # per-epoch passes + the final one
    splits = (data.heldout, data.test)
    kinds = {"T1": [("custom_cnn", {})], "T2": [("resnet18", {})], "E1": [("resnet18", {})]}.get(task)
    if task == "T3":
        kinds = [("resnet18", {"cubs": cfg.fashions[0]})]
    for kind, options in kinds:
        model = build_model(kind, cfg, data.num_classes, **options)
        step = measure_fit_step(model, data.train, data.augment, fit_cfg, cfg.device, warmup=WARMUP, steps=STEPS)
        evaluation = eval_pass_seconds(model.eval(), splits, data.augment, Runtime.of(cfg))
        if task == "T3":
            names = [f"T3_{f}" for f in cfg.fashions] + (["T3_bonus"] if cfg.bonus else [])
        elif task == "E1":
            names = ["E1_cross_entropy", "E1_center_loss"]
        else:
            names = [{"T1": "T1_custom_cnn", "T2": "T2_resnet18"}[task]]
        plan.jobs += [Job(name, steps, step, evals, evaluation) for name in names]
        if task == "E1":  # triplet: P x K batches, nearest-class-mean evaluation (reference pass too)
            from helpers.data import PKBatchSampler

            sampler = PKBatchSampler(data.train.labels, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, drop_small_classes=True)
            scale = cfg.pk_classes * cfg.pk_images / cfg.batch_size
            reference = min(1.0, cfg.ncm_per_class * data.num_classes / max(1, data.train.num_samples))
            plan.jobs.append(Job("E1_triplet", cfg.epochs * len(sampler), step * scale, evals, evaluation * (1 + reference)))
    return plan


def plan_retrieval(profile: str, overrides: dict, out_dir: Path) -> NotebookPlan:
    """T4: stage-1 classifier steps, then one stage-2 run per miner (main + ablation) on P x K batches."""
    from helpers.config import RetrievalConfig
    from helpers.models import resnet18
    from helpers.retrieval import apply_t3_selection, build_cars196

    cfg = RetrievalConfig.build("T4", profile, out_dir=str(out_dir), resume=False, **overrides)
    cfg, _ = apply_t3_selection(cfg)
    data, data_seconds = _timed(lambda: build_cars196(cfg))
    plan = NotebookPlan("T4", data_seconds)
    torch.manual_seed(cfg.seed)
    model = resnet18(data.num_train_classes, stem=cfg.stem, cubs=cfg.fashion, cubs_width=cfg.cubs_width or None)
    step = measure_fit_step(model, data.train, data.augment, cfg.fit_config("classifier"), cfg.device, warmup=WARMUP, steps=STEPS)
    embed = eval_pass_seconds(model.eval().forward_features, (data.test,), data.augment, Runtime.of(cfg))
    plan.jobs.append(Job("T4_classifier", cfg.cls_epochs * len(data.train), step, cfg.cls_epochs, embed))
    scale = cfg.pk_classes * cfg.pk_images / cfg.batch_size
    for miner in cfg.miner_runs:
        plan.jobs.append(Job(f"T4_embedding_{miner}", cfg.emb_epochs * len(data.train_pk), step * scale, cfg.emb_epochs + 1, embed))
    plan.extra_seconds = embed  # the "before" embeddings
    return plan


def plan_layerwise(profile: str, overrides: dict, out_dir: Path) -> NotebookPlan:
    """E2: greedy pretraining of every layer, then fine-tuning and the baseline."""
    from helpers.config import LayerwiseConfig
    from helpers.layerwise import build_mlp, build_stl10

    cfg = LayerwiseConfig.build("E2", profile, out_dir=str(out_dir), resume=False, **overrides)
    (data, pretrain), data_seconds = _timed(lambda: build_stl10(cfg))
    plan = NotebookPlan("E2", data_seconds)
    model = build_mlp(cfg)
    step = measure_fit_step(model, data.train, data.augment, cfg.fit_config("train"), cfg.device, warmup=WARMUP, steps=STEPS)
    evaluation = eval_pass_seconds(model.eval(), (data.heldout, data.test), data.augment, Runtime.of(cfg))
    plan.jobs.append(Job("E2_pretraining", len(cfg.hidden) * cfg.pretrain_epochs * len(pretrain), step))
    for name in ("E2_pretrained", "E2_baseline"):
        plan.jobs.append(Job(name, cfg.epochs * len(data.train), step, cfg.epochs + 1, evaluation))
    return plan


def plan_pipeline(profile: str, steps: list[str], data_dir: str | None, device: str | None, out_dir: Path) -> dict:
    """{"notebooks": {notebook: plan dict}, "total_seconds"} for the pipeline's notebooks `steps`."""
    overrides = {}
    if data_dir:
        overrides["data_dir"] = str(Path(data_dir).resolve())
    if device:
        overrides["device"] = device
    notebooks = {}
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        for name in steps:
            task = name.split("_")[0]
            tic = time.perf_counter()
            if task in ("T1", "T2", "T3", "E1"):
                plan = plan_recognition(task, profile, overrides, Path(tmp))
            elif task == "T4":
                plan = plan_retrieval(profile, overrides, out_dir)  # reads T3's selection when it exists
            else:
                plan = plan_layerwise(profile, overrides, Path(tmp))
            notebooks[name] = plan.as_dict() | {"planning_seconds": round(time.perf_counter() - tic, 1)}
    from helpers.runinfo import resolve_device, run_info

    total = round(sum(n["predicted_seconds"] for n in notebooks.values()), 1)
    return {"profile": profile, "notebooks": notebooks, "total_seconds": total, "run": run_info(resolve_device(device or "auto"))}


def format_plan(plan: dict) -> str:
    lines = [f"Predicted wall time, profile {plan['profile']} on {plan['run']['device']}:"]
    for name, n in plan["notebooks"].items():
        jobs = ", ".join(f"{j['name']} {j['steps']} steps x {1000 * j['seconds_per_step']:.0f} ms" for j in n["jobs"])
        lines.append(f"  {name:22s} {_duration(n['predicted_seconds']):>9s}   ({jobs})")
    lines.append(f"  {'whole pipeline':22s} {_duration(plan['total_seconds']):>9s}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
