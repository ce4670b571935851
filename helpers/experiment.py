"""The shared experiment layer: what every task (T1-T4, E1, E2) needs, written once.

- data: `locate_data` finds a dataset under `data_dir` (or generates the stand-in for the default
  folder); `resolve_data_path` picks the data path ("auto": gpu on CUDA, else cached) and
  `batch_source` turns arrays or datasets into batch sources on it;
- runs: `Runtime.of(cfg)` (device, precision, channels_last: helpers.runinfo) for every evaluation
  pass, `checkpoint_dir` and `fit_stage` (one `fit` of a training stage: its FitConfig, run key,
  checkpoint folder and resume flag);
- classifiers: `ClassificationData` and `train_classifier` (fit, restore the best held-out epoch,
  evaluate, summarise), shared by the Tiny ImageNet tasks and E2;
- results: typed records (`RunSummary`, `T3Selection`) and metrics I/O (`save_metrics`,
  `load_metrics`): notebooks hold records, never build or parse the JSON themselves.

Task modules (recognition, retrieval, layerwise) build on this and never import each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from helpers import distributed
from helpers.atomic import atomic_write_json
from helpers.checkpoint import BEST, run_owner
from helpers.config import lr_for_batch, weight_decay_for
from helpers.data import LoaderBatches, TensorBatches, synthetic
from helpers.data.archives import extracted_from_archive
from helpers.data.fingerprint import tree_fingerprint
from helpers.data.loaders import BatchSource
from helpers.data.transforms import BatchAugment
from helpers.engine import FitConfig, FitResult, fit, load_finished_run
from helpers.errors import MetricsError, SettingsError
from helpers.evaluation import ClassificationEvaluator, classification_metrics, classification_report, run_split
from helpers.runinfo import Runtime, choose_precision, generated_data_dir, run_info

# ------------------------------------------------------------------------------------ data

# kind -> (generator params, folders tried under data_dir in order, the file or folder marking one)
DATASETS = {
    "tiny": (synthetic.TinyParams, ("tiny-imagenet-200", "."), "wnids.txt"),
    "cars": (synthetic.CarsParams, ("stanford_cars", "cars196", "."), ("devkit", "cars_annos.mat")),
    "stl10": (synthetic.STL10Params, ("stl10_binary", "."), "train_X.bin"),
}


TASK_DATA = {"T1": "tiny", "T2": "tiny", "T3": "tiny", "E1": "tiny", "T4": "cars", "E2": "stl10"}  # task -> its dataset
_FINGERPRINTS: dict[tuple[str, str], str] = {}  # (kind, data_dir) -> the fingerprint when last located


def locate_data(data_dir: str | Path, kind: str) -> tuple[Path, bool]:
    """(dataset root, generated) for "tiny", "cars" or "stl10" under `data_dir`.

    The default generated-data folder gets the stand-in dataset, created on first use. Elsewhere
    the first candidate folder holding the dataset's marker wins; else an archive in `data_dir` whose
    top folder is a candidate is extracted once (helpers.data.archives); when none is, the first
    candidate is returned and the dataset class raises its clear "not found" error. The root's
    fingerprint (file list and sizes) is taken now: `data_fingerprint` reads it."""
    params, candidates, markers = DATASETS[kind]
    data_dir = Path(data_dir)
    if data_dir == generated_data_dir():
        root, generated = synthetic.generate(kind, data_dir, params(seed=0)), True
    else:
        folders = [data_dir / c for c in candidates]
        markers = (markers,) if isinstance(markers, str) else markers

        def is_dataset(folder: Path) -> bool:
            return any((folder / m).exists() for m in markers)

        root = next((f for f in folders if is_dataset(f)), None)
        if root is None:  # an archive of it in data_dir (e.g. the mini archives): extracted once
            root = extracted_from_archive(data_dir, tuple(c for c in candidates if c != "."), is_dataset) or folders[0]
        generated = (root / synthetic.STAMP).is_file()
    _FINGERPRINTS[(kind, str(data_dir))] = tree_fingerprint(root)
    return root, generated


def data_fingerprint(cfg) -> str:
    """The fingerprint of the dataset of task `cfg.task` under cfg.data_dir, as taken when this
    process last located it (building the task's data does); taken now if it never did."""
    kind = TASK_DATA[cfg.task]
    if (kind, str(Path(cfg.data_dir))) not in _FINGERPRINTS:
        locate_data(cfg.data_dir, kind)
    return _FINGERPRINTS[(kind, str(Path(cfg.data_dir)))]


def resolve_data_path(data_path: str, device: str) -> str:
    """ "auto" -> "gpu" on CUDA, else "cached"; "gpu" without CUDA is an error that says what to use."""
    cuda = str(device).startswith("cuda")
    path = data_path if data_path != "auto" else ("gpu" if cuda else "cached")
    if path == "gpu" and not cuda:
        raise SettingsError("data_path='gpu' needs device='cuda'; use 'cached' or 'lazy' on the CPU")
    return path


def batch_source(
    path: str,
    device: str,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    images: np.ndarray | None = None,
    dataset: Dataset | None = None,
    batch_sampler=None,
    num_workers: int = 0,
) -> BatchSource:
    """A batch source on data path `path`: "lazy" decodes `dataset` items in DataLoader workers;
    "cached" / "gpu" gather batches from `images` (uint8 (N, H, W, 3)) held in CPU RAM / on the GPU."""
    common = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, batch_sampler=batch_sampler)
    if path == "lazy":
        return LoaderBatches(dataset, labels=labels, device=device, num_workers=num_workers, **common)
    return TensorBatches(images, labels, device=device if path == "gpu" else "cpu", output_device=device, **common)


# ------------------------------------------------------------------------------------ runs


def checkpoint_dir(out_dir: str | Path, name: str) -> Path:
    """Where the run `name` keeps last.pt, best.pt and history.json."""
    return Path(out_dir) / "checkpoints" / name


def fit_stage(
    name: str,
    model: nn.Module,
    source: BatchSource,
    augment,
    cfg,
    stage: str = "train",
    *,
    fit_cfg: FitConfig | None = None,
    key_extra: dict | None = None,
    progress: bool = True,
    **fit_options,
) -> FitResult:
    """One `fit` of `model` for the task configuration `cfg`: the stage's FitConfig (unless
    `fit_cfg` is given) and run key (with the data's fingerprint, plus `key_extra`: what else the run
    starts from, e.g. a weights file's checksum), checkpoints in out_dir/checkpoints/<name>, cfg.resume.

    With cfg.gpus > 1 outside torchrun (a notebook, the pipeline): the first such call trains the
    whole task under torchrun (`train_on_gpus`: `python -m helpers.train`, once per configuration), and every
    call then loads its finished run (engine.load_finished_run) and continues as after training."""
    fit_cfg = fit_cfg or cfg.fit_config(stage)
    run_key = cfg.run_key(stage) | {"data_fingerprint": data_fingerprint(cfg)} | (key_extra or {})
    if getattr(cfg, "gpus", 1) > 1 and not distributed.is_distributed():
        train_on_gpus(cfg)
        loading = {k: v for k, v in fit_options.items() if k in ("objective", "objective_lr")}
        return load_finished_run(
            model,
            source,
            augment,
            fit_cfg,
            out_dir=checkpoint_dir(cfg.out_dir, name),
            device=cfg.device,
            run_key=run_key,
            **loading,
        )
    return fit(
        model,
        source,
        augment,
        fit_cfg,
        out_dir=checkpoint_dir(cfg.out_dir, name),
        device=cfg.device,
        progress=progress,
        name=name,
        run_key=run_key,
        resume=cfg.resume,
        board_dir=board_dir(cfg.out_dir, name),
        **fit_options,
    )


def board_dir(out_dir: str | Path, name: str) -> Path:
    """Where the run `name` writes its TensorBoard curves: out_dir/tensorboard/<name> (`tensorboard --logdir out_dir/tensorboard`)."""
    return Path(out_dir) / "tensorboard" / name


_TRAINED: set[str] = set()  # configurations trained under torchrun from this process


def train_on_gpus(cfg) -> None:
    """Train the whole task of `cfg` on cfg.gpus GPUs: `python -m helpers.train <task> --config
    <cfg as JSON>` under torchrun (once per configuration in this process), its output streamed
    here; engine.load_finished_run then loads each finished run."""
    key = json.dumps(cfg.as_dict(), sort_keys=True, default=str)
    if key in _TRAINED:
        return
    distributed.check_gpus(cfg.gpus, cfg.device)
    path = checkpoint_dir(cfg.out_dir, f"{cfg.task}_torchrun_config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.as_dict(), path)
    print(
        f"Training {cfg.task} on {cfg.gpus} {'GPUs' if str(cfg.device).startswith('cuda') else 'processes'} under torchrun "
        f"(global batch {cfg.batch_size}); configuration in {path}",
        flush=True,
    )
    distributed.launch(cfg.gpus, [cfg.task, "--config", str(path)])
    _TRAINED.add(key)


def file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embed_split(
    fn: Callable[[torch.Tensor], torch.Tensor], source: BatchSource, augment, cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, ...) of `fn` (a model, `model.forward_features`, an encoder) and labels (N,) of a
    whole split, eval transform, in order, with the runtime of `cfg`."""
    return run_split(fn, source, augment, Runtime.of(cfg))


def describe_model(model: nn.Module, **extra) -> dict:
    """{"class", "parameters", **extra}: what a summary says about a model."""
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()), **extra}


# ------------------------------------------------------------------------------------ results


@dataclass
class RunSummary:
    """One trained model as the metrics files record it: how its training went and its held-out
    and test scores (`heldout` / `test`: top1, top5, loss, ...; see evaluation.classification_report)."""

    name: str
    architecture: dict
    best_epoch: int | None
    epochs_run: int
    training: dict  # FitResult.record(): epochs planned / done, complete, ...
    train_seconds: float
    fit_seconds: dict
    images_per_s: float
    checkpoint: str
    heldout: dict
    test: dict
    history: list
    budget: dict | None = None  # budget runs: {"budget_s", "steps", "budget_seconds_used"}
    # the recipe as fit ran it, when it followed the training set (batch_size=0): {"batch_size", "lr", "weight_decay"}
    followed_data: dict | None = None

    @classmethod
    def of(
        cls,
        name: str,
        architecture: dict,
        result: FitResult,
        out_dir: str | Path,
        heldout: dict,
        test: dict,
        budget_s: float = 0.0,
        followed_data: dict | None = None,
    ) -> "RunSummary":
        """The summary of a finished `fit`; `budget_s` > 0: a budget run, which records its budget;
        `followed_data`: the batch, lr and weight decay a recipe that followed the data chose."""
        budget = None
        if budget_s > 0:
            steps = result.history[-1]["steps"] if result.history else 0
            budget = {
                "budget_s": budget_s,
                "steps": steps,
                "budget_seconds_used": result.wall_seconds - result.eval_seconds,
            }
        return cls(
            budget=budget,
            followed_data=followed_data,
            name=name,
            architecture=architecture,
            best_epoch=result.best_epoch,
            epochs_run=len(result.history),
            training=result.record(),
            train_seconds=result.train_seconds,
            fit_seconds={"wall": result.wall_seconds, "evaluation": result.eval_seconds},
            images_per_s=result.images_per_s,
            checkpoint=str(checkpoint_dir(".", name) / BEST),
            heldout=heldout,
            test=test,
            history=result.history,
        )

    OPTIONAL = ("budget", "followed_data")

    @classmethod
    def from_dict(cls, values: dict) -> "RunSummary":
        """The record a metrics JSON holds (a KeyError names any missing field; OPTIONAL ones may be
        absent)."""
        return cls(
            **{
                f.name: values.get(f.name) if f.name in cls.OPTIONAL else values[f.name]
                for f in dataclasses.fields(cls)
            }
        )

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for name in self.OPTIONAL:  # only budget runs record a budget, only batch_size=0 runs what they chose
            if values[name] is None:
                del values[name]
        return values


@dataclass(frozen=True)
class T3Selection:
    """The CUBS model T3 selected on held-out top-1, which T4 starts from."""

    criterion: str
    best: str  # the run's name
    fashion: str
    checkpoint: str  # its best.pt, relative to the output folder (older metrics: an absolute path)
    stem: str
    run_id: str = ""  # the run that wrote that best.pt ("" in older metrics: not checked)

    @classmethod
    def load(cls, out_dir: str | Path) -> "T3Selection | None":
        """The selection in T3's metrics under out_dir, or None when T3 has not run there."""
        document = load_metrics(out_dir, "T3_cubs_resnet18")
        return cls.from_metrics(document) if document else None

    @classmethod
    def from_metrics(cls, document: dict) -> "T3Selection | None":
        values = document.get("selection")
        return (
            cls(
                **{
                    f.name: values.get(f.name, "") if f.name == "run_id" else values[f.name]
                    for f in dataclasses.fields(cls)
                }
            )
            if values
            else None
        )

    def checkpoint_in(self, out_dir: str | Path) -> Path:
        """T3's best.pt in the output folder `out_dir` (which may have been moved or copied since
        T3 ran): a relative path resolves against it, and so does an absolute one's part from
        "checkpoints/" on, when that exists there."""
        path = Path(self.checkpoint)
        if not path.is_absolute():
            return Path(out_dir) / path
        parts = path.parts
        if "checkpoints" in parts:
            moved = Path(out_dir).joinpath(*parts[len(parts) - 1 - parts[::-1].index("checkpoints") :])
            if moved.is_file() or not path.is_file():
                return moved
        return path

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def metrics_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "metrics" / f"{name}.json"


def as_json(value):
    """`value` with every record (anything with `as_dict`) turned into plain JSON-able values."""
    if hasattr(value, "as_dict"):
        return as_json(value.as_dict())
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def save_metrics(name: str, payload: dict, cfg, data_info: dict | None = None) -> Path:
    """Write out_dir/metrics/<name>.json: the payload (records turned into plain values), the
    resolved configuration and the run's provenance.

    `complete` is False (and `partial` lists where) when any training record in the payload
    (a FitResult.record()) is not complete: the report leaves such files out."""
    path = metrics_path(cfg.out_dir, name)
    if not distributed.is_main():  # under torchrun rank 0 writes
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = as_json(payload)
    check_runs_current(payload, path)
    partial = partial_trainings(payload)
    document = {
        "name": name,
        "task": cfg.task,
        "profile": cfg.profile,
        "complete": not partial,
        "partial": partial,
        "config": cfg.as_dict(),
        "data": data_info or {},
        "run": run_info(cfg.device, choose_precision(cfg.precision, cfg.device)),
        **payload,
    }
    atomic_write_json(document, path)
    return path


def training_records(payload, where: str = "") -> list[tuple[str, dict]]:
    """(path, record) of every training record (a FitResult.record()) in a metrics payload."""
    if isinstance(payload, dict):
        if "epochs_planned" in payload and "complete" in payload:
            return [(where, payload)]
        return [
            found
            for key, value in payload.items()
            for found in training_records(value, f"{where}.{key}" if where else str(key))
        ]
    if isinstance(payload, list):
        return [found for i, value in enumerate(payload) for found in training_records(value, f"{where}[{i}]")]
    return []


def check_runs_current(payload: dict, path: Path) -> None:
    """Metrics are written only by the run that trained them: refuse (MetricsError) when a training
    record's checkpoint folder now belongs to another run (e.g. a second notebook or pipeline
    trained into the same folder meanwhile)."""
    for where, record in training_records(payload):
        if not record.get("run_dir"):
            continue
        run_dir = Path(record["run_dir"])
        owner = run_owner(run_dir)
        if owner is not None and record.get("run_id") and owner.get("run_id") != record["run_id"]:
            raise MetricsError(
                f"{path} was not written: {run_dir} now holds another run (pid {owner.get('pid')} on {owner.get('host')}, "
                f"started {owner.get('started')}) than the one this process trained ({where}); rerun to train and report one run"
            )


def partial_trainings(payload, where: str = "") -> list[str]:
    """Paths (e.g. "models.T2_resnet18") of the incomplete training records in a metrics payload."""
    found = []
    if isinstance(payload, dict):
        if "epochs_planned" in payload and payload.get("complete") is False:  # a FitResult.record()
            return [where]
        for key, value in payload.items():
            found += partial_trainings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(payload, list):
        for i, value in enumerate(payload):
            found += partial_trainings(value, f"{where}[{i}]")
    return found


def load_metrics(out_dir: str | Path, name: str) -> dict | None:
    """A metrics JSON written by another notebook of the same run, or None when it is absent; a
    MetricsError naming the file when it is unreadable or not a metrics object."""
    path = metrics_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); rerun {name} to write it again, or delete it"
        ) from None
    if not isinstance(document, dict):
        raise MetricsError(
            f"{path} is not a metrics file of this project (it holds a JSON {type(document).__name__}); rerun {name} to write it again, or delete it"
        )
    return document


# ------------------------------------------------------------------------------------ classifiers


@dataclass
class ClassificationData:
    """Batch sources of one classification task plus what the notebooks print about them."""

    train: BatchSource
    heldout: BatchSource
    test: BatchSource
    augment: BatchAugment
    num_classes: int
    class_names: list[str]
    info: dict = field(default_factory=dict)


def follow_the_data(fit_cfg: FitConfig, cfg, train: BatchSource) -> tuple[FitConfig, dict | None]:
    """batch_size=0 (the recipe follows the data): lr is that of a batch of REFERENCE_BATCH, scaled
    linearly to the batch the data chose (the linear scaling rule of Goyal et al., 2017), and weight
    decay that of REFERENCE_IMAGES training images, scaled up for a smaller set (weight_decay_for).
    Returns the FitConfig to train with and what it chose ({"batch_size", "lr", "weight_decay"}; None
    for a fixed batch, which keeps its lr and decay)."""
    if getattr(cfg, "batch_size", None) != 0:
        return fit_cfg, None
    lr, weight_decay = (
        lr_for_batch(fit_cfg.lr, train.batch_size),
        weight_decay_for(fit_cfg.weight_decay, train.num_samples),
    )
    chosen = {"batch_size": train.batch_size, "lr": lr, "weight_decay": weight_decay}
    return dataclasses.replace(fit_cfg, lr=lr, weight_decay=weight_decay), chosen


def train_classifier(
    name: str,
    model: nn.Module,
    data: ClassificationData,
    cfg,
    describe: dict | None = None,
    progress: bool = True,
    stage: str = "train",
    **fit_options,
) -> RunSummary:
    """Fit one classifier (training `stage` of `cfg`; checkpoints in out_dir/checkpoints/<name>),
    restore its best held-out epoch, evaluate held-out and test, and summarise it. `fit_options`
    go to `fit` (e.g. objective=CenterLossObjective(...), objective_lr=...)."""
    runtime = Runtime.of(cfg)
    splits = {"heldout": data.heldout, "test": data.test} if data.heldout.num_samples else {"test": data.test}
    fit_cfg, followed = follow_the_data(cfg.fit_config(stage), cfg, data.train)
    if not data.heldout.num_samples:  # no held-out split: keep the last epoch
        fit_cfg = dataclasses.replace(fit_cfg, monitor="")
    result = fit_stage(
        name,
        model,
        data.train,
        data.augment,
        cfg,
        stage,
        fit_cfg=fit_cfg,
        progress=progress,
        evaluate=ClassificationEvaluator(splits, data.augment, runtime),
        **fit_options,
    )
    model.eval()
    heldout = {"top1": None, "top5": None, "loss": None}  # no held-out split (heldout_fraction=0)
    if data.heldout.num_samples:
        heldout = classification_metrics(*run_split(model, data.heldout, data.augment, runtime))
    test = classification_report(*run_split(model, data.test, data.augment, runtime), data.class_names)
    return RunSummary.of(
        name,
        describe or describe_model(model),
        result,
        cfg.out_dir,
        heldout,
        test,
        budget_s=fit_cfg.budget_s,
        followed_data=followed,
    )
