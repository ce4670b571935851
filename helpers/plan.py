"""Predict the wall time of each notebook of a profile before running it.

For every notebook the plan builds the same configuration and data as the notebook (generating
the stand-in data or the decode-once cache when they are missing, as the notebook would), measures
a few training steps of each kind of model it trains on the chosen device, and times one batch of
evaluation. Prediction = data preparation (measured) + training steps x measured step time +
evaluation passes x measured pass time + t-SNE maps (one small map timed, scaled) + the start of a
notebook (a fresh interpreter importing what a notebook imports, timed once per plan) + an
allowance for the kernel, figures and HTML export (`OVERHEAD_S`, measured on a 2-core CPU).

Approximations, stated: runs of one notebook with the same architecture share one measurement (the
three CUBS fashions are timed once); a metric-loss step on P x K batches is the classifier step
scaled by the batch size; a greedy pretraining step is costed as a full MLP step (an upper bound);
each run's cost beyond its steps (set-up, checkpoints, finishing) is that of a one-step run of the
notebook's first model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from helpers.budget import StepClock
from helpers.budget_split import NotebookWork, Training
from helpers.runinfo import Runtime

OVERHEAD_S = (
    3.0  # beyond the measured imports: the kernel's start, figures, metrics and the HTML export of one notebook
)
WARMUP, STEPS = 2, 4  # measured steps per model: enough for a plan, cheap on a CPU
# ... fewer when they are slow: two timed steps of this many seconds are enough (the full profile's
# T2 takes 3.2 s a step on a 2-core CPU: its planning went from 21 s to 13 s)
ENOUGH_S = 2.0


def measure_fit_step(
    model: nn.Module,
    train,
    augment,
    cfg,
    device: torch.device | str = "cpu",
    objective: nn.Module | None = None,
    warmup: int = 5,
    steps: int = 15,
) -> float:
    """Seconds per optimizer step of `fit` for this model, data source and configuration.

    Runs `warmup + steps` steps (fewer once two timed steps took ENOUGH_S) on deep copies of `model`
    (and `objective`), so the model itself is left untouched; the data source's first batches are
    consumed as in training."""
    from helpers.engine import fit  # (the engine needs no planner: no import circle)

    probe = copy.deepcopy(model)
    probe_objective = copy.deepcopy(objective) if objective is not None else None
    clock = StepClock(warmup, device, enough_s=ENOUGH_S)
    probe_cfg = _probe_config(cfg, warmup + steps)
    try:
        fit(probe, train, augment, probe_cfg, objective=probe_objective, device=device, progress=False, on_step=clock)
    except StepClock.Enough:
        pass
    del probe, probe_objective
    return clock.seconds_per_step


def _probe_config(cfg, steps: int):
    """`cfg` for a measuring run of `steps` steps: no budget, evaluation, early stop, warm-up or logging."""
    return dataclasses.replace(
        cfg,
        max_steps=steps,
        budget_s=0.0,
        monitor="",
        patience=0,
        restore_best=False,
        log_every=10**9,
        warmup_epochs=0.0,
    )


def measure_run_seconds(
    model: nn.Module, train, augment, cfg, device, seconds_per_step: float, objective: nn.Module | None = None
) -> float:
    """Seconds a training run costs beyond its steps: its set-up, the checkpoints of the model and
    its optimizer it writes (the first and the last epoch's at least: the engine writes more only
    while they cost under 2 % of the time), finishing (the slim rewrite of last.pt). A one-step run
    of `fit` into a scratch folder, timed, less one step, plus one more checkpoint; on deep copies,
    so `model` is left untouched."""
    from helpers.checkpoint import save_last
    from helpers.engine import fit

    probe_objective = copy.deepcopy(objective) if objective is not None else None
    probe = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="plan-run-") as scratch:
        tic = time.perf_counter()
        fit(
            probe,
            train,
            augment,
            _probe_config(cfg, 1),
            objective=probe_objective,
            device=device,
            progress=False,
            out_dir=scratch,
        )
        seconds = time.perf_counter() - tic
        # the second checkpoint: the weights and a momentum-sized optimizer state, as last.pt holds them
        tic = time.perf_counter()
        weights = probe.state_dict()
        save_last(
            Path(scratch), {"model": weights, "optimizer": {k: v.clone() for k, v in weights.items()}, "epoch": 1}
        )
        seconds += time.perf_counter() - tic
    return max(0.0, seconds - seconds_per_step)


@dataclass
class Job:
    """One training run inside a notebook; `parameter` is the notebook parameter that gives it a
    time budget, `epochs` the profile's epochs (steps = epochs x steps per epoch)."""

    name: str
    steps: int
    seconds_per_step: float
    eval_passes: int = 0
    seconds_per_eval: float = 0.0
    parameter: str = "budget_s"
    epochs: int = 1
    speed_ratio: float = 1.0  # CPU precision "auto": the chosen precision's step time / fp32's
    probe_seconds: float = 0.0  # what that measurement costs the run
    run_seconds: float = 0.0  # the run's cost beyond its steps (measure_run_seconds)

    @property
    def seconds(self) -> float:
        return self.steps * self.seconds_per_step + self.eval_passes * self.seconds_per_eval + self.run_seconds


@dataclass
class NotebookPlan:
    notebook: str
    data_seconds: float
    jobs: list[Job] = field(default_factory=list)
    extra_seconds: float = 0.0  # measured work outside training (e.g. before/after embeddings, t-SNE)
    overhead_seconds: float = field(default_factory=lambda: OVERHEAD_S + import_seconds())

    def work(self, name: str, eval_every: int = 1) -> NotebookWork:
        """What helpers.budget_split shares a budget out over: the fixed part and every training."""
        trainings = tuple(
            Training(
                j.name,
                j.parameter,
                j.epochs,
                max(1, j.steps // max(1, j.epochs)),
                j.seconds_per_step,
                j.seconds_per_eval if j.eval_passes else 0.0,
                eval_every,
                j.speed_ratio,
                j.probe_seconds,
                j.run_seconds,
            )
            for j in self.jobs
        )
        return NotebookWork(name, self.data_seconds + self.extra_seconds + self.overhead_seconds, trainings)

    @property
    def seconds(self) -> float:
        return self.data_seconds + sum(j.seconds for j in self.jobs) + self.extra_seconds + self.overhead_seconds

    def as_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "predicted_seconds": round(self.seconds, 1),
            "data_seconds": round(self.data_seconds, 1),
            "extra_seconds": round(self.extra_seconds, 1),
            "overhead_seconds": self.overhead_seconds,
            "jobs": [dataclasses.asdict(j) | {"seconds": round(j.seconds, 1)} for j in self.jobs],
        }


def precision_speed(model, train, augment, fit_cfg, device, probe_precision: bool = True) -> tuple[float, float]:
    """(chosen step time / fp32 step time, seconds of the measurement) of a run of `model` that
    measures its CPU precision (helpers.precision.probe; (1.0, 0.0) on a GPU or with a fixed precision)."""
    from helpers.objectives import CrossEntropyObjective
    from helpers.precision import probe

    if not probe_precision:
        return 1.0, 0.0
    return probe(model, CrossEntropyObjective(0.0), train, augment, fit_cfg, device)


def with_speed(jobs: list[Job], speed: tuple[float, float], run_seconds: float = 0.0) -> list[Job]:
    for job in jobs:
        job.speed_ratio, job.probe_seconds = speed
        job.run_seconds = run_seconds
    return jobs


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


def _timed_data(build):
    """(data, seconds) of a data build as the notebook will see it: a first build that made a
    decode cache (over 2 s) is timed again, since the notebook then loads that cache."""
    data, seconds = _timed(build)
    if seconds > 2.0:
        data, seconds = _timed(build)
    return data, seconds


_IMPORT_SECONDS: list[float] = []


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import what a notebook imports (torch, the optimizers'
    torch._dynamo, the task modules, the plots), measured once per process."""
    import subprocess
    import sys

    if not _IMPORT_SECONDS:
        code = "import torch, torch._dynamo, helpers.recognition, helpers.retrieval, helpers.layerwise, helpers.plots"
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
        _IMPORT_SECONDS.append(time.perf_counter() - tic)
    return _IMPORT_SECONDS[0]


_TSNE_SECONDS: dict[int, float] = {}


def tsne_seconds(points: int, probe: int = 300) -> float:
    """Predicted seconds of one t-SNE map of `points` points: one map of `probe` random points timed
    on this machine (once per process), scaled by n log n (Barnes-Hut)."""
    import numpy as np

    from helpers.plots import tsne_2d

    if points <= 0:
        return 0.0
    if probe not in _TSNE_SECONDS:
        x = np.random.default_rng(0).standard_normal((probe, 64)).astype(np.float32)
        _, _TSNE_SECONDS[probe] = _timed(lambda: tsne_2d(x, probe))
    scale = points * math.log(max(points, 2)) / (probe * math.log(probe))
    return _TSNE_SECONDS[probe] * max(scale, points / probe)


def plan_recognition(
    task: str, profile: str, overrides: dict, out_dir: Path, probe_precision: bool = True
) -> NotebookPlan:
    """T1, T2, T3 or E1: the notebook's data, then each model kind measured once."""
    from helpers.config import RecognitionConfig
    from helpers.recognition import build_model, build_tiny_imagenet

    cfg = RecognitionConfig.build(task, profile, out_dir=str(out_dir), resume=False, **overrides)
    data, data_seconds = _timed_data(lambda: build_tiny_imagenet(cfg))
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
        run = measure_run_seconds(model, data.train, data.augment, fit_cfg, cfg.device, step)
        evaluation = eval_pass_seconds(model.eval(), splits, data.augment, Runtime.of(cfg))
        if task == "T3":
            names = [f"T3_{f}" for f in cfg.fashions] + (
                ["T3_<selected>_scaled"] if cfg.bonus else []
            )  # (the bonus: in the fashion T3 selects)
        elif task == "E1":
            names = ["E1_cross_entropy", "E1_center"]
        else:
            names = [{"T1": "T1_custom_cnn", "T2": "T2_resnet18"}[task]]
        speed = precision_speed(model, data.train, data.augment, fit_cfg, cfg.device, probe_precision)
        plan.jobs += with_speed(
            [Job(name, steps, step, evals, evaluation, epochs=cfg.epochs) for name in names], speed, run
        )
        if task == "E1":  # triplet: P x K batches, nearest-class-mean evaluation (reference pass too)
            from helpers.data import PKBatchSampler

            sampler = PKBatchSampler(
                data.train.labels, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, drop_small_classes=True
            )
            scale = cfg.pk_classes * cfg.pk_images / data.train.batch_size
            reference = min(1.0, cfg.ncm_per_class * data.num_classes / max(1, data.train.num_samples))
            triplet = Job(
                "E1_triplet",
                cfg.epochs * len(sampler),
                step * scale,
                evals,
                evaluation * (1 + reference),
                epochs=cfg.epochs,
            )
            plan.jobs += with_speed([triplet], speed, run)
    if task == "E1":  # three maps of the test embeddings (the notebook's max_points=2000)
        plan.extra_seconds += 3 * tsne_seconds(min(2000, data.test.num_samples))
    return plan


def plan_retrieval(profile: str, overrides: dict, out_dir: Path, probe_precision: bool = True) -> NotebookPlan:
    """T4: stage-1 classifier steps, then one stage-2 run per miner (main + ablation) on P x K batches."""
    from helpers.config import RetrievalConfig
    from helpers.models import resnet18
    from helpers.retrieval import apply_t3_selection, build_cars196

    cfg = RetrievalConfig.build("T4", profile, out_dir=str(out_dir), resume=False, **overrides)
    cfg, _ = apply_t3_selection(cfg)
    data, data_seconds = _timed_data(lambda: build_cars196(cfg))
    plan = NotebookPlan("T4", data_seconds)
    torch.manual_seed(cfg.seed)
    model = resnet18(
        data.num_train_classes,
        stem=cfg.stem,
        cubs=cfg.fashion,
        cubs_width=cfg.cubs_width or None,
        width=cfg.resnet_width,
    )
    step = measure_fit_step(
        model, data.train, data.augment, cfg.fit_config("classifier"), cfg.device, warmup=WARMUP, steps=STEPS
    )
    run = measure_run_seconds(model, data.train, data.augment, cfg.fit_config("classifier"), cfg.device, step)
    speed = precision_speed(model, data.train, data.augment, cfg.fit_config("classifier"), cfg.device, probe_precision)
    embed = eval_pass_seconds(model.eval().forward_features, (data.test,), data.augment, Runtime.of(cfg))
    plan.jobs.append(
        Job(
            "T4_classifier",
            cfg.cls_epochs * len(data.train),
            step,
            cfg.cls_epochs,
            embed,
            "cls_budget_s",
            cfg.cls_epochs,
        )
    )
    scale = cfg.pk_classes * cfg.pk_images / cfg.batch_size
    for miner in cfg.miner_runs:
        plan.jobs.append(
            Job(
                f"T4_embedding_{miner}",
                cfg.emb_epochs * len(data.train_pk),
                step * scale,
                cfg.emb_epochs + 1,
                embed,
                "emb_budget_s",
                cfg.emb_epochs,
            )
        )
    with_speed(plan.jobs, speed, run)
    # the "before" embeddings, and two t-SNE maps (before, after)
    plan.extra_seconds = embed + 2 * tsne_seconds(min(cfg.tsne_points, data.test.num_samples))
    return plan


def plan_layerwise(profile: str, overrides: dict, out_dir: Path, probe_precision: bool = True) -> NotebookPlan:
    """E2: greedy pretraining of every layer, then fine-tuning and the baseline."""
    from helpers.config import LayerwiseConfig
    from helpers.layerwise import build_mlp, build_stl10

    cfg = LayerwiseConfig.build("E2", profile, out_dir=str(out_dir), resume=False, **overrides)
    (data, pretrain), data_seconds = _timed_data(lambda: build_stl10(cfg))
    plan = NotebookPlan("E2", data_seconds)
    model = build_mlp(cfg)
    step = measure_fit_step(
        model, data.train, data.augment, cfg.fit_config("train"), cfg.device, warmup=WARMUP, steps=STEPS
    )
    run = measure_run_seconds(model, data.train, data.augment, cfg.fit_config("train"), cfg.device, step)
    pretrain_runs = pretrain_run_seconds(model, pretrain, data.augment, cfg, step)
    evaluation = eval_pass_seconds(model.eval(), (data.heldout, data.test), data.augment, Runtime.of(cfg))
    speed = precision_speed(model, data.train, data.augment, cfg.fit_config("train"), cfg.device, probe_precision)
    plan.jobs += [
        Job(
            f"E2_pretrain_layer{i}",
            cfg.pretrain_epochs * len(pretrain),
            step,
            0,
            0.0,
            "pretrain_budget_s",
            cfg.pretrain_epochs,
        )
        for i in range(len(cfg.hidden))
    ]
    for job, run_seconds in zip(plan.jobs, pretrain_runs):
        with_speed([job], speed, run_seconds)
    for name in ("E2_pretrained", "E2_baseline"):
        plan.jobs += with_speed(
            [Job(name, cfg.epochs * len(data.train), step, cfg.epochs + 1, evaluation, epochs=cfg.epochs)], speed, run
        )
    plan.extra_seconds = tsne_seconds(min(cfg.tsne_per_class * 10, data.test.num_samples))  # the X[3] map
    return plan


def pretrain_run_seconds(model, pretrain, augment, cfg, seconds_per_step: float) -> list[float]:
    """Each greedy pretraining run's cost beyond its steps. A run checkpoints the model with its
    layer's decoder and their Adam state, so the cost grows with the layer's size: the largest (first)
    and the smallest layer's runs are timed, the others interpolated by their parameters."""
    from helpers.layerwise import LayerReconstruction, freeze_all_but

    def size(i: int) -> int:
        return 2 * model.layers[i].weight.numel()  # the layer and its decoder

    def timed(i: int) -> float:
        try:
            freeze_all_but(model, i)
            layer = model.layers[i]
            reconstruction = LayerReconstruction(i, layer.out_features, layer.in_features)
            return measure_run_seconds(
                model, pretrain, augment, cfg.fit_config("pretrain"), cfg.device, seconds_per_step, reconstruction
            )
        finally:
            freeze_all_but(model, None)

    layers = range(len(model.layers))
    largest, smallest = max(layers, key=size), min(layers, key=size)
    if size(largest) == size(smallest):
        return [timed(largest)] * len(layers)
    high, low = timed(largest), timed(smallest)
    return [low + (high - low) * (size(i) - size(smallest)) / (size(largest) - size(smallest)) for i in layers]


def plan_notebook(
    name: str, profile: str, overrides: dict, out_dir: Path, scratch: Path, probe_precision: bool = True
) -> NotebookPlan:
    """The plan of one pipeline notebook (by its name, e.g. "T4_cars196_retrieval")."""
    task = name.split("_")[0]
    if task in ("T1", "T2", "T3", "E1"):
        return plan_recognition(task, profile, overrides, scratch, probe_precision)
    if task == "T4":
        return plan_retrieval(profile, overrides, out_dir, probe_precision)  # reads T3's selection when it exists
    return plan_layerwise(profile, overrides, scratch, probe_precision)


def plan_pipeline(
    profile: str,
    steps: list[str],
    data_dir: str | None,
    device: str | None,
    out_dir: Path,
    log=None,
    budget_s: float = 0.0,
) -> dict:
    """{"notebooks": {notebook: plan dict}, "total_seconds", "missing": {notebook: why}} for the
    pipeline's notebooks `steps`. A notebook whose dataset is missing is named in "missing" and the
    rest is planned (`log` says so as it happens); "work" holds what a budget is split over."""
    from helpers.errors import ProjectError
    from helpers.runinfo import resolve_device, run_info

    overrides = {}
    if data_dir:
        overrides["data_dir"] = str(Path(data_dir).resolve())
    if device:
        overrides["device"] = device
    notebooks, missing, work = {}, {}, []
    # no precision probe for a budget in which no training can reach the minute from which a run
    # measures its precision (helpers.precision.MIN_BUDGET_S; over 20 trainings share a budget)
    probe_precision = not budget_s or budget_s >= 600.0
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        for name in steps:
            tic = time.perf_counter()
            try:
                plan = plan_notebook(name, profile, overrides, out_dir, Path(tmp), probe_precision)
            except ProjectError as exc:  # missing data, or what it reads from another notebook (T4: T3's selection)
                missing[name] = str(exc)
                if log is not None:
                    log(f"[plan] {name}: not planned, its data is missing: {str(exc)[:200]}")
                continue
            notebooks[name] = plan.as_dict() | {"planning_seconds": round(time.perf_counter() - tic, 1)}
            work.append(plan.work(name))
    total = round(sum(n["predicted_seconds"] for n in notebooks.values()), 1)
    plan = {
        "profile": profile,
        "notebooks": notebooks,
        "total_seconds": total,
        "run": run_info(resolve_device(device or "auto")),
    }
    if missing:
        plan["missing"] = missing
    return plan | {"work": work}


def format_plan(plan: dict) -> str:
    lines = [f"Predicted wall time, profile {plan['profile']} on {plan['run']['device']}:"]
    for name, n in plan["notebooks"].items():
        jobs = ", ".join(f"{j['name']} {j['steps']} steps x {1000 * j['seconds_per_step']:.0f} ms" for j in n["jobs"])
        lines.append(f"  {name:22s} {_duration(n['predicted_seconds']):>9s}   ({jobs})")
    for name, why in plan.get("missing", {}).items():
        lines.append(f"  {name:22s} {'-':>9s}   not planned: its data is missing ({why.split('. ')[0][:120]})")
    lines.append(
        f"  {'whole pipeline':22s} {_duration(plan['total_seconds']):>9s}"
        + ("   (without the notebooks not planned)" if plan.get("missing") else "")
    )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
