"""Notebook configuration: flat parameters (papermill-overridable) -> one small frozen dataclass.

Each notebook's `parameters` cell holds plain annotated values, `None` meaning "the profile's
value". The next cell calls e.g. `RecognitionConfig.from_parameters("T1", globals())`, which
passes every name declared there to `build`: it starts from the dataclass defaults, applies the
profile preset (`PRESETS`, literal data: `smoke`: generated data, CPU, about a minute; `cpu`: the
real data sized for a CPU budget; `full`: the real dataset with the recipe recommended for one CUDA
GPU), then every parameter that is not None. Each field declares its rules beside it
(`param(default, range=..., choices=..., runtime=...)`); unknown names or invalid values raise one
SettingsError (a ValueError) listing what is allowed. Adding a parameter is its field and a line
of the notebook's parameters cell.

Each training stage of a task (`STAGES`: "train"; T4: "classifier" and "embedding"; E2: "pretrain"
and "train") declares which fields it reads: `cfg.fit_config(stage)` is the engine's FitConfig
built from them and `cfg.run_key(stage)` the settings its checkpoints must match to be resumed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

from helpers.fit_config import OLDER_RUN_KEYS, OPTIMIZERS, SCHEDULES, FitConfig, check_choice
from helpers.runinfo import (
    PRECISIONS,
    PROFILES,
    default_data_dir,
    default_out_dir,
    default_workers,
    launch_dir,
    resolve_device,
)
from helpers.errors import SettingsError

DATA_PATHS = ("auto", "lazy", "cached", "gpu")
FASHIONS = ("parallel", "serial12", "serial21")
STEMS = ("small", "imagenet")


class Range(NamedTuple):
    """Allowed values of a number: low <= x (< when low_open), x <= high (< when high_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, AT_LEAST_2, NON_NEGATIVE, POSITIVE = Range(1), Range(2), Range(0), Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def param(
    default,
    *,
    range: Range | None = None,
    choices: tuple | None = None,
    runtime: bool = False,
    items=None,
    older=dataclasses.MISSING,
):
    """A configuration field with its rules beside it: the `range` of a number (of every item of a
    list), the valid `choices` of a name (of every item of a list), whether it is `runtime` (where
    things run, what is shown, which runs a notebook makes: it may change between a run and its
    resumption and is not part of a run key), the type of a list's `items` (int; else names), and,
    for a field added after checkpoints existed, the value they were trained with (`older`: they
    resume at that value; without it such a checkpoint is refused, naming the field)."""
    metadata = {"range": range, "choices": choices, "runtime": runtime, "items": items}
    return dataclasses.field(
        default=default, metadata=metadata | ({"older": older} if older is not dataclasses.MISSING else {})
    )


def rule(f: dataclasses.Field, what: str):
    """One of `param`'s rules of a field (None where the field has none)."""
    return f.metadata.get(what)


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_list(value) -> tuple:
    """A list parameter from a list, or from the string `papermill -p` passes: a JSON or Python
    list ('["ms", "none"]'), comma-separated names ("ms,none") or one name ("ms")."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if not isinstance(value, str):
        raise TypeError
    text = value.strip()
    if text[:1] in "[(":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise TypeError from None
        if not isinstance(parsed, (list, tuple)):
            raise TypeError
        return tuple(parsed)
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _coerce(kind: str, value, item=None):
    """`value` as a `kind` ("int", "float", "bool", "str", "tuple") or TypeError; whole numbers
    count as ints (3.0 and "3" -> 3), never 2.5 or "three"."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise TypeError
    if kind in ("int", "float") and isinstance(value, str):  # `papermill -r` passes raw strings
        try:
            value = float(value)
        except ValueError:
            raise TypeError from None
    if kind == "int":
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise TypeError
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError
        return value
    items = parse_list(value)
    if item is int:  # "1024,512" arrives as strings
        return tuple(
            _coerce("int", int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v) for v in items
        )
    return tuple(_coerce("str", v) for v in items)


EXPECTED = {
    "int": "a whole number",
    "float": "a finite number",
    "bool": "True or False",
    "str": "a string",
    "tuple": "a list",
}
LIST_EXAMPLE = {
    int: " of whole numbers (e.g. [1024, 512] or 1024,512)",
    None: ' of names (e.g. ["ms", "none"] or ms,none)',
}


def _listing(values) -> str:
    return ", ".join('"" (the default)' if v == "" else str(v) for v in values)


@dataclass(frozen=True)
class Stage:
    """How one training stage reads its task configuration.

    `reads`: FitConfig field -> configuration field; `fixed`: FitConfig values set by the task (a
    callable receives the configuration); `also_reads`: further fields only this stage uses (e.g.
    its loss); `after`: stages whose trained model this one starts from. FitConfig fields in
    neither keep the engine's defaults. Configuration fields that no stage declares (the data, the
    architecture) belong to every stage's run key."""

    reads: dict
    fixed: dict = dataclasses.field(default_factory=dict)
    also_reads: tuple = ()
    after: tuple = ()

    def uses(self) -> set[str]:
        """The configuration fields this stage reads."""
        return set(self.reads.values()) | set(self.also_reads)


def same_names(*names: str) -> dict:
    """{name: name}: FitConfig fields read from configuration fields of the same name."""
    return {name: name for name in names}


class ConfigBase:
    """Shared builder and helpers of the task configurations."""

    PRESETS: dict = {}  # task -> profile -> values
    STAGES: dict = {}  # stage name -> Stage

    def _validate(self) -> None:
        """Coerce every field to its annotated type and check its range and choices; raise one
        SettingsError listing every problem (parameter, value, what is allowed)."""
        problems = []
        for f in fields(self):
            value, valid, choices = getattr(self, f.name), rule(f, "range"), rule(f, "choices")
            try:
                coerced = _coerce(f.type, value, rule(f, "items"))
            except TypeError:
                if f.type == "str" and choices:
                    problems.append(f"{f.name}={value!r} is not valid; choose one of {_listing(choices)}")
                    continue
                detail = LIST_EXAMPLE[rule(f, "items")] if f.type == "tuple" else f" {valid}" if valid else ""
                problems.append(f"{f.name}={value!r} is not valid; expected {EXPECTED[f.type]}{detail}")
                continue
            object.__setattr__(self, f.name, coerced)
            for x in coerced if f.type == "tuple" else (coerced,):
                if valid is not None and x not in valid:
                    what = "every item" if f.type == "tuple" else EXPECTED[f.type]
                    problems.append(f"{f.name}={value!r} is not valid; expected {what} {valid}")
                    break
                if choices and x not in choices:
                    problems.append(
                        f"{f.name}={value!r} is not valid; choose {'items from' if f.type == 'tuple' else 'one of'} {_listing(choices)}"
                    )
                    break
        if not problems:
            problems = self._check()
        if problems:
            raise SettingsError(
                problems[0]
                if len(problems) == 1
                else f"{len(problems)} invalid parameters:\n  " + "\n  ".join(problems)
            )

    def _check(self) -> list[str]:
        """Rules between parameters (each subclass its own)."""
        return []

    @classmethod
    def build(cls, task: str, profile: str = "smoke", **params):
        """Defaults <- PRESETS[task][profile] <- the parameters that are not None."""
        check_choice("task", task, tuple(cls.PRESETS))
        check_choice("profile", profile, PROFILES)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise SettingsError(
                f"unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(names - {'task', 'profile'}))}"
            )
        values = dict(cls.PRESETS[task][profile])
        values.update({k: v for k, v in params.items() if v is not None})
        return cls(task=task, profile=profile, **values).resolved()

    @classmethod
    def from_parameters(cls, task: str, namespace: dict):
        """A notebook's configuration: `build` from every name its parameters cell declares (the
        annotated names IPython keeps in `namespace["__annotations__"]`), with the values papermill
        may have injected after it."""
        declared = namespace.get("__annotations__")
        if declared is None and callable(namespace.get("__annotate__")):  # (Python 3.14: annotations made lazily)
            declared = namespace["__annotate__"](1)
        if not declared or "profile" not in declared:
            raise SettingsError(
                "from_parameters found no parameters cell in this namespace (annotated assignments such as "
                '`profile: str = "smoke"`); run that cell first, or call build(task, profile, name=value, ...)'
            )
        return cls.build(task, **{name: namespace[name] for name in declared if name in namespace})

    def resolved(self):
        """A copy with data_dir, out_dir and device made concrete. Defaults: smoke reads generated
        data (created on first use), full reads <project>/data; results go to outputs/<profile>."""
        data_dir = (
            (launch_dir() / Path(self.data_dir).expanduser()).resolve()
            if self.data_dir
            else default_data_dir(self.profile)
        )
        out_dir = (
            (launch_dir() / Path(self.out_dir).expanduser()).resolve()
            if self.out_dir
            else default_out_dir(self.profile)
        )
        resolved = dataclasses.replace(
            self, data_dir=str(data_dir), out_dir=str(out_dir), device=resolve_device(self.device)
        )
        if getattr(self, "num_workers", 0) < 0:  # -1: follow the machine's cores
            resolved = dataclasses.replace(resolved, num_workers=default_workers())
        return resolved

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    RESOLVED_BY_TASK: tuple = ()  # fields the task fills in when it runs (their saved values are not the parameters)

    @classmethod
    def runtime_keys(cls) -> tuple[str, ...]:
        """The fields declared `param(..., runtime=True)` (gpus and sync_bn too: the engine compares
        the number of processes itself; eval_every too: the engine compares it when a monitor
        selects on the evaluations)."""
        return tuple(f.name for f in fields(cls) if rule(f, "runtime"))

    @classmethod
    def older_values(cls) -> dict:
        """{field: the value checkpoints and metrics written before it existed were trained with}."""
        return {f.name: f.metadata["older"] for f in fields(cls) if "older" in f.metadata}

    def fit_config(self, stage: str = "train") -> FitConfig:
        """The engine's FitConfig for one training stage (see Stage)."""
        check_choice("stage", stage, tuple(self.STAGES))
        spec = self.STAGES[stage]
        values = {target: getattr(self, source) for target, source in spec.reads.items()}
        values |= {target: value(self) if callable(value) else value for target, value in spec.fixed.items()}
        return FitConfig(**values)

    def run_key(self, stage: str = "train") -> dict:
        """The settings a checkpoint of `stage` must have been trained with to be resumed: every
        field except the runtime ones and those only other stages read (unless this stage starts
        from theirs). Its own epoch count is left to the engine, which refuses another length."""
        check_choice("stage", stage, tuple(self.STAGES))
        spec = self.STAGES[stage]
        skip = set(self.runtime_keys()) | {spec.reads["epochs"]}
        for name, other in self.STAGES.items():
            if name != stage and name not in spec.after:
                skip |= other.uses() - spec.uses()
        return {k: v for k, v in self.as_dict().items() if k not in skip}


def several_gpus_sync_bn(cfg) -> bool:
    """The engine's sync_bn: only with several GPUs (one process has nothing to synchronise)."""
    return cfg.sync_bn and cfg.gpus > 1


def gpus_problems(cfg, batch_size: int, pk_classes: int | None) -> list[str]:
    """With gpus > 1 the global batches must split evenly (P x K batches into whole classes), and a
    time budget cannot be shared out."""
    n = cfg.gpus
    if n <= 1:
        return []
    problems = []
    if batch_size % n:
        problems.append(
            f"batch_size={batch_size} is the global batch and must split evenly over gpus={n}; use a multiple of {n}"
        )
    if pk_classes is not None and pk_classes % n:
        problems.append(
            f"pk_classes={pk_classes}: each of the gpus={n} GPUs gets whole classes of a P x K batch; use a multiple of {n}"
        )
    if getattr(cfg, "budget_s", 0) > 0:
        problems.append(
            f"budget_s={cfg.budget_s} cannot be combined with gpus={n} (a budget is planned from one process's step times); give epochs"
        )
    return problems


CLASSIFIER_READS = same_names(
    "epochs",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "patience",
    "precision",
    "channels_last",
    "compile",
    "seed",
    "eval_every",
    "budget_s",
    "crop_min_epochs",
)

# batch_size=0 (the cpu profile of T1-T3): the batch follows the training set. The largest power of
# two in [SMALLEST_BATCH, REFERENCE_BATCH] that gives MIN_STEPS_PER_EPOCH or more steps an epoch; the
# LR scales linearly from REFERENCE_BATCH's. Chosen on held-out splits (docs/performance.md): at 20
# classes x 100 images, 60 s, a batch of 32 led 128 by 2.2 points over 3 seeds, while the 20,000
# images of the mini archive keep 128 (156 steps an epoch).
REFERENCE_BATCH, SMALLEST_BATCH, MIN_STEPS_PER_EPOCH = 128, 32, 50


def batch_for(train_images: int) -> int:
    """The batch of a training set of `train_images` images when batch_size=0 (see above)."""
    batch = REFERENCE_BATCH
    while batch > SMALLEST_BATCH and train_images < MIN_STEPS_PER_EPOCH * batch:
        batch //= 2
    return batch


def lr_for_batch(lr: float, batch: int) -> float:
    """The lr of a batch of `batch` images when `lr` is that of REFERENCE_BATCH (batch_size=0: the
    linear scaling rule of Goyal et al., 2017)."""
    return lr * batch / REFERENCE_BATCH


# batch_size=0 also scales the weight decay to the training set: a smaller set gets more passes in a
# budget and overfits sooner, so it gets more decay, by sqrt(REFERENCE_IMAGES / images), from 1x (at
# REFERENCE_IMAGES or more) up to MOST_DECAY_SCALE. Chosen on held-out splits (docs/performance.md):
# 20 classes x 75 images, 60 s: 1e-3 and 2e-3 led 5e-4 by 2.7-2.8 points over 3 seeds; 50 x 75: 2e-3
# led by 0.6 (within the seeds' spread); 200 x 90 (the mini archive): 1e-3 neutral (-0.1).
REFERENCE_IMAGES, MOST_DECAY_SCALE = 10_000, 4.0


def weight_decay_for(weight_decay: float, train_images: int) -> float:
    """The weight decay of a training set of `train_images` images when `weight_decay` is that of
    REFERENCE_IMAGES or more (batch_size=0; see above)."""
    scale = (REFERENCE_IMAGES / max(1, train_images)) ** 0.5
    return weight_decay * min(MOST_DECAY_SCALE, max(1.0, scale))


# T1-T3. smoke: 32 px, 24 images per class, the cheap ImageNet stem (16x fewer FLOPs than the small
# one), a narrow custom CNN and ResNet-18 (width 16: its checkpoints are 1/16 of the published
# width's 45 MB) and N = 32 in CUBS Block 1 (its B x N x N similarity dominates on a CPU)
TINY_IMAGENET_PRESETS = {
    "smoke": dict(
        image_size=32,
        train_per_class=24,
        epochs=3,
        batch_size=64,
        lr=0.05,
        warmup_epochs=0.5,
        stem="imagenet",
        width=16,
        resnet_width=16,
        cubs_width=32,
        num_workers=0,
    ),
    # cpu: the real dataset at 32 px with the ImageNet stem (about 40x fewer FLOPs than 64 px with the
    # small one), the T2 recipe helpers.proof chose on held-out data for short CPU budgets, its batch
    # following the training set (batch_for); meant to run with a budget (pipeline --budget), which
    # scales the epochs
    "cpu": dict(
        image_size=32,
        stem="imagenet",
        epochs=30,
        batch_size=0,
        lr=0.1,
        warmup_epochs=0.5,
        crop="pad",
        padding=4,
        # a budget run planned under 6 epochs drops the crop's translation: on held-out splits (T2, 32 px,
        # 2 seeds) that led by 1.0-2.7 points at 1.8 epochs, 1.0-2.0 at 2.9 and 1.6-2.9 at 5.2; longer
        # runs were not tried and keep it (docs/performance.md)
        crop_min_epochs=6.0,
        label_smoothing=0.1,
        weight_decay=5e-4,
        width=32,
        cubs_width=32,
    ),
    "full": dict(
        image_size=64,
        epochs=40,
        batch_size=256,
        lr=0.2,
        warmup_epochs=2,
        crop="pad",
        padding=8,
        cutmix=1.0,
        mix_prob=0.5,
        label_smoothing=0.1,
        weight_decay=5e-4,
        patience=0,
        width=64,
    ),
}


@dataclass(frozen=True)
class RecognitionConfig(ConfigBase):
    """T1-T3 (and E1): classification on Tiny ImageNet."""

    task: str
    profile: str = "smoke"
    # data
    data_dir: str = ""  # the folder holding tiny-imagenet-200/, or that folder ("" = the profile's default)
    out_dir: str = param("", runtime=True)  # metrics/, figures/, checkpoints/ go here ("" = outputs/<profile>)
    device: str = param("auto", runtime=True)
    # continue the checkpoints of an identical earlier run (False: train afresh)
    resume: bool = param(True, runtime=True)
    # lazy (per-item JPEG decode) | cached (uint8 array, RAM) | gpu (array on the GPU)
    data_path: str = param("auto", choices=DATA_PATHS, runtime=True)
    # DataLoader workers of the lazy path and of building the cache (-1: follow the machine's cores)
    num_workers: int = param(-1, range=Range(-1), runtime=True)
    classes: int = param(0, range=NON_NEGATIVE)  # keep only the first N classes of wnids.txt (0 = all)
    train_per_class: int = param(0, range=NON_NEGATIVE)  # at most N training images per class (0 = all)
    heldout_fraction: float = param(0.05, range=FRACTION)  # stratified held-out part of train for model selection
    # augmentation
    # training/eval input side (images are resized first when smaller than 64)
    image_size: int = param(64, range=Range(8))
    crop: str = param("pad", choices=("pad", "rrc"))  # pad (random crop with zero padding) | rrc (random-resized crop)
    flip: bool = param(True, older=True)  # random horizontal flips of the training batches
    padding: int = param(4, range=NON_NEGATIVE)
    # > 0: a budget run planned for fewer epochs than this trains without the pad crop's translation
    # (flips stay; FitConfig.crop_min_epochs); 0: never
    crop_min_epochs: float = param(0.0, range=NON_NEGATIVE, older=0.0)
    rrc_scale_min: float = param(0.35, range=Range(0, 1, low_open=True))
    mixup: float = param(0.0, range=NON_NEGATIVE)  # Beta alpha; 0 = off
    cutmix: float = param(0.0, range=NON_NEGATIVE)  # Beta alpha; 0 = off
    mix_prob: float = param(0.5, range=Range(0, 1))  # fraction of batches mixed when mixup/cutmix is on
    # optimisation
    epochs: int = param(3, range=AT_LEAST_1)
    # images per step; 0: follow the training set (batch_for), and lr is then that of a batch of
    # REFERENCE_BATCH, scaled linearly to the batch chosen, and weight_decay that of REFERENCE_IMAGES
    # training images or more, scaled up for fewer (weight_decay_for)
    batch_size: int = param(64, range=NON_NEGATIVE)
    optimizer: str = param("sgd", choices=OPTIMIZERS)
    lr: float = param(0.05, range=POSITIVE)
    momentum: float = param(0.9, range=FRACTION)
    weight_decay: float = param(5e-4, range=NON_NEGATIVE)
    schedule: str = param("cosine", choices=SCHEDULES)
    warmup_epochs: float = param(0.5, range=NON_NEGATIVE)
    label_smoothing: float = param(0.1, range=FRACTION)
    # early stopping on held-out top-1 after N epochs without improvement (0 = off)
    patience: int = param(0, range=NON_NEGATIVE)
    # > 0: train for this many seconds (step count planned from measured steps; epochs ignored)
    budget_s: float = param(0.0, range=NON_NEGATIVE)
    # evaluate held-out and test every N epochs (and after the last)
    eval_every: int = param(1, range=AT_LEAST_1, runtime=True)
    # auto (bf16 on GPUs with native bf16, fp16 + gradient scaler on older ones, on the CPU the fastest of fp32 and bf16 autocast, each with and without channels_last, measured (helpers.precision), fp32 on MPS) | bf16 | fp16 | fp32
    precision: str = param("auto", choices=PRECISIONS)
    channels_last: bool = True
    compile: bool = False
    # > 1: train on this many GPUs of this machine (torchrun + DDP); batch_size is the global batch
    gpus: int = param(1, range=AT_LEAST_1, runtime=True)
    sync_bn: bool = param(False, runtime=True)  # gpus > 1: BatchNorm statistics over the global batch (SyncBatchNorm)
    seed: int = param(0, range=NON_NEGATIVE)
    # models
    # ResNet stem: small (3x3/1, no max-pool; for 64x64) | imagenet (7x7/2 + max-pool)
    stem: str = param("small", choices=STEMS)
    width: int = param(64, range=AT_LEAST_1)  # custom CNN base width
    # ResNet-18's first-stage channels (64 as published; stages x 1, 2, 4, 8)
    resnet_width: int = param(64, range=AT_LEAST_1, older=64)
    fashions: tuple = param(FASHIONS, choices=FASHIONS, runtime=True)  # T3: the CUBS fashions to train and select from
    cubs_width: int = param(0, range=NON_NEGATIVE)  # N of CUBS Block 1 (0 = C, the channel count, as specified)
    bonus: bool = param(True, runtime=True)  # T3: also train the bonus CUBS variant in the selected fashion
    embedding_dim: int = param(128, range=AT_LEAST_1)  # E1: embedding size of the metric-loss heads
    triplet_margin: float = param(0.2, range=NON_NEGATIVE)  # E1
    center_weight: float = param(0.01, range=NON_NEGATIVE)  # E1: lambda in CE + lambda * center loss
    center_lr: float = param(0.5, range=POSITIVE)  # E1: SGD learning rate of the centers
    pk_classes: int = param(16, range=AT_LEAST_2)  # E1 triplet batches: P classes x K images
    pk_images: int = param(4, range=AT_LEAST_2)
    ncm_per_class: int = param(50, range=AT_LEAST_1)  # E1: train images per class whose embeddings give the class means

    PRESETS = {
        "T1": TINY_IMAGENET_PRESETS,
        "T2": TINY_IMAGENET_PRESETS,
        "T3": TINY_IMAGENET_PRESETS,
        # E1 compares losses: no mixing (center and triplet losses need hard labels), Adam
        "E1": {
            "smoke": dict(
                image_size=32,
                train_per_class=24,
                epochs=2,
                batch_size=64,
                optimizer="adam",
                lr=1e-3,
                weight_decay=1e-4,
                warmup_epochs=0.5,
                stem="imagenet",
                width=16,
                resnet_width=16,
                cubs_width=32,
                num_workers=0,
                pk_classes=8,
                pk_images=4,
                embedding_dim=64,
            ),
            "cpu": dict(
                image_size=32,
                stem="imagenet",
                epochs=30,
                batch_size=128,
                optimizer="adam",
                lr=1e-3,
                weight_decay=1e-4,
                warmup_epochs=0.5,
                crop="pad",
                padding=4,
                label_smoothing=0.1,
                pk_classes=8,
                pk_images=16,
                embedding_dim=128,
            ),
            "full": dict(
                image_size=64,
                epochs=30,
                batch_size=256,
                optimizer="adam",
                lr=1e-3,
                weight_decay=1e-4,
                warmup_epochs=2,
                crop="pad",
                padding=8,
                cutmix=0.0,
                mix_prob=0.5,
                label_smoothing=0.1,
                patience=0,
                pk_classes=32,
                pk_images=8,
                ncm_per_class=100,
            ),
        },
    }
    STAGES = {
        # T1-T3 and E1's cross-entropy model; E1's other two models add their loss's settings
        "train": Stage(reads=CLASSIFIER_READS, fixed={"monitor": "heldout_top1", "sync_bn": several_gpus_sync_bn}),
        "center": Stage(
            reads=CLASSIFIER_READS,
            fixed={"monitor": "heldout_top1", "sync_bn": several_gpus_sync_bn},
            also_reads=("center_weight", "center_lr"),
        ),
        "triplet": Stage(
            reads=CLASSIFIER_READS,
            fixed={"monitor": "heldout_top1", "sync_bn": several_gpus_sync_bn},
            also_reads=("embedding_dim", "triplet_margin", "pk_classes", "pk_images", "ncm_per_class"),
        ),
    }

    def __post_init__(self):
        self._validate()

    def _check(self) -> list[str]:
        problems = (
            []
            if self.fashions
            else [f"fashions={self.fashions!r} is not valid; name at least one of {', '.join(FASHIONS)}"]
        )
        return problems + gpus_problems(
            self, batch_size=self.batch_size, pk_classes=self.pk_classes if self.task == "E1" else None
        )


MINERS = ("none", "ms", "batch_hard", "semi_hard", "adaptive_ms", "xbm")
INITS = ("auto", "scratch", "tinyimagenet", "imagenet")


@dataclass(frozen=True)
class RetrievalConfig(ConfigBase):
    """T4: Cars-196 retrieval. Stage 1: the T3 architecture as a 98-way classifier; stage 2: an
    `embedding_dim` (512) embedding trained with the multi-similarity loss and a miner on P x K batches."""

    task: str
    profile: str = "smoke"
    data_dir: str = ""  # holds stanford_cars/ (devkit) or cars196/ (metric-learning), or is one of them
    out_dir: str = param("", runtime=True)
    device: str = param("auto", runtime=True)
    # continue the checkpoints of an identical earlier run (False: train afresh)
    resume: bool = param(True, runtime=True)
    # lazy | cached | gpu (decoded, resized images in RAM / on the GPU)
    data_path: str = param("auto", choices=DATA_PATHS, runtime=True)
    num_workers: int = param(-1, range=Range(-1), runtime=True)  # (-1: follow the machine's cores)
    bbox_crop: bool = False  # crop to the annotated bounding box first
    # shorter side before the crops (train: random-resized crop; test: centre crop)
    resize: int = param(256, range=Range(8))
    image_size: int = param(224, range=Range(8))
    rrc_scale_min: float = param(0.16, range=Range(0, 1, low_open=True))
    # architecture and initialisation
    # CUBS fashion ("" = the one T3 selected, from its metrics; serial12 without them)
    fashion: str = param("", choices=("",) + FASHIONS)
    stem: str = param("imagenet", choices=STEMS)
    # ResNet-18's first-stage channels (64 as published; T3's and ImageNet weights need theirs)
    resnet_width: int = param(64, range=AT_LEAST_1, older=64)
    cubs_width: int = param(0, range=NON_NEGATIVE)  # N of CUBS Block 1 (0 = C)
    # scratch | tinyimagenet (T3 checkpoint) | imagenet (torchvision's ImageNet weights) | auto
    init: str = param("auto", choices=INITS)
    checkpoint: str = ""  # init="tinyimagenet": a T3 best.pt ("" = the one T3's metrics name)
    imagenet_weights: str = ""  # init="imagenet": path of torchvision's resnet18 ImageNet .pth ("" = torchvision's download-once cache, $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth)
    # stage 1: classifier
    cls_epochs: int = param(3, range=AT_LEAST_1)
    # > 0: train stage 1 for this many seconds (cls_epochs ignored; pipeline --budget sets it)
    cls_budget_s: float = param(0.0, range=NON_NEGATIVE)
    batch_size: int = param(64, range=AT_LEAST_1)
    cls_optimizer: str = param("sgd", choices=OPTIMIZERS)
    cls_lr: float = param(0.05, range=POSITIVE)
    weight_decay: float = param(5e-4, range=NON_NEGATIVE)
    label_smoothing: float = param(0.1, range=FRACTION)
    warmup_epochs: float = param(0.5, range=NON_NEGATIVE)
    # stage 2: embedding + multi-similarity loss
    emb_epochs: int = param(2, range=AT_LEAST_1)
    # > 0: each stage-2 run (the main miner and every ablation run) trains this many seconds
    emb_budget_s: float = param(0.0, range=NON_NEGATIVE)
    emb_optimizer: str = param("adamw", choices=OPTIMIZERS)
    emb_lr: float = param(3e-4, range=POSITIVE)
    emb_weight_decay: float = param(1e-4, range=NON_NEGATIVE)
    embedding_dim: int = param(512, range=AT_LEAST_1)
    pk_classes: int = param(8, range=AT_LEAST_2)  # P classes per batch
    pk_images: int = param(4, range=AT_LEAST_2)  # K images per class
    alpha: float = param(2.0, range=POSITIVE)
    beta: float = param(50.0, range=POSITIVE)
    lam: float = param(0.5, range=Range(-1, 1))
    miner: str = param("ms", choices=MINERS, runtime=True)  # the main run's miner
    epsilon: float = param(0.1, range=NON_NEGATIVE)  # MS miner margin
    memory_size: int = param(2048, range=AT_LEAST_1)  # "xbm": cross-batch memory size
    memory_warmup_steps: int = param(0, range=NON_NEGATIVE)
    # miners compared in the ablation table (each a stage-2 run from the same stage 1)
    ablation: tuple = param(MINERS, choices=MINERS, runtime=True)
    # auto (bf16 on GPUs with native bf16, fp16 + gradient scaler on older ones, on the CPU the fastest of fp32 and bf16 autocast, each with and without channels_last, measured (helpers.precision), fp32 on MPS) | bf16 | fp16 | fp32
    precision: str = param("auto", choices=PRECISIONS)
    channels_last: bool = True
    compile: bool = False
    # > 1: train on this many GPUs of this machine (torchrun + DDP); batch_size and P x K are global batches
    gpus: int = param(1, range=AT_LEAST_1, runtime=True)
    # gpus > 1: BatchNorm statistics over the global batch (SyncBatchNorm): a GPU's part of a P x K batch is small
    sync_bn: bool = param(True, runtime=True)
    seed: int = param(0, range=NON_NEGATIVE)
    tsne_points: int = param(2000, range=AT_LEAST_1, runtime=True)  # at most this many test embeddings in each t-SNE
    grid_queries: int = param(3, range=AT_LEAST_1, runtime=True)  # queries shown with their nearest / farthest 10

    PRESETS = {
        "T4": {
            # CPU-sized: 32 px crops of 40 px images, short schedules, N = 32 in CUBS Block 1
            # and a three-miner ablation (the full profile compares all six)
            "smoke": dict(
                resize=40,
                image_size=32,
                resnet_width=16,
                cubs_width=32,
                cls_epochs=2,
                emb_epochs=2,
                batch_size=64,
                pk_classes=8,
                pk_images=4,
                num_workers=0,
                memory_size=256,
                ablation=("ms", "none", "xbm"),
            ),
            # cpu: 64 px crops of 72 px images with the ImageNet stem and N = 32 in CUBS Block 1; every
            # miner in the ablation (a budget divides the time)
            "cpu": dict(
                resize=72,
                image_size=64,
                cubs_width=32,
                cls_epochs=20,
                emb_epochs=20,
                batch_size=64,
                cls_lr=0.05,
                pk_classes=16,
                pk_images=4,
                memory_size=1024,
                tsne_points=1000,
            ),
            "full": dict(
                resize=256,
                image_size=224,
                cls_epochs=30,
                batch_size=128,
                cls_lr=0.1,
                warmup_epochs=1,
                emb_epochs=40,
                emb_lr=1e-4,
                pk_classes=32,
                pk_images=4,
                memory_size=4096,
                memory_warmup_steps=200,
            ),
        }
    }

    STAGES = {
        # stage 1: the 98-way classifier
        "classifier": Stage(
            reads={
                "epochs": "cls_epochs",
                "budget_s": "cls_budget_s",
                "optimizer": "cls_optimizer",
                "lr": "cls_lr",
                **same_names(
                    "weight_decay", "warmup_epochs", "label_smoothing", "precision", "channels_last", "compile", "seed"
                ),
            },
            fixed={"schedule": "cosine", "monitor": "", "sync_bn": several_gpus_sync_bn},
        ),
        # stage 2: the embedding, from stage 1's backbone
        "embedding": Stage(
            reads={
                "epochs": "emb_epochs",
                "budget_s": "emb_budget_s",
                "optimizer": "emb_optimizer",
                "lr": "emb_lr",
                "weight_decay": "emb_weight_decay",
                **same_names("precision", "channels_last", "compile", "seed"),
            },
            fixed={
                "schedule": "cosine",
                "warmup_epochs": lambda cfg: min(1.0, cfg.emb_epochs / 4),
                "monitor": "",
                "sync_bn": several_gpus_sync_bn,
            },
            also_reads=(
                "embedding_dim",
                "pk_classes",
                "pk_images",
                "alpha",
                "beta",
                "lam",
                "epsilon",
                "memory_size",
                "memory_warmup_steps",
            ),
            after=("classifier",),
        ),
    }

    RESOLVED_BY_TASK = ("fashion", "init", "checkpoint")  # from T3's metrics (retrieval.apply_t3_selection)

    def __post_init__(self):
        self._validate()

    @property
    def miner_runs(self) -> tuple[str, ...]:
        """The stage-2 runs a T4 notebook makes: the main miner, then the rest of the ablation."""
        return tuple(dict.fromkeys([self.miner, *self.ablation]))

    def _check(self) -> list[str]:
        problems = gpus_problems(self, batch_size=self.batch_size, pk_classes=self.pk_classes)
        if self.image_size > self.resize:
            problems.append(f"image_size={self.image_size} is not valid; it must not exceed resize={self.resize}")
        if self.init == "imagenet" and self.resnet_width != 64:
            problems.append(
                f"init='imagenet' loads torchvision's ResNet-18, of width 64; resnet_width={self.resnet_width} cannot take its weights: "
                "pass resnet_width=64, or another init"
            )
        return problems


E2_CLASSIFIER_READS = same_names(
    "epochs", "budget_s", "optimizer", "lr", "weight_decay", "label_smoothing", "precision", "seed"
)
E2_CLASSIFIER_FIXED = {
    "schedule": "cosine",
    "warmup_epochs": lambda cfg: min(1.0, cfg.epochs / 5),
    "monitor": "heldout_top1",
    "channels_last": False,
}


@dataclass(frozen=True)
class LayerwiseConfig(ConfigBase):
    """E2: an MLP on flattened 96x96 grayscale STL-10 images, greedy layer-wise autoencoder
    pretraining then fine-tuning, against the same MLP trained from scratch."""

    task: str
    profile: str = "smoke"
    data_dir: str = ""  # holds stl10_binary/ (or is it)
    out_dir: str = param("", runtime=True)
    device: str = param("auto", runtime=True)
    # continue the checkpoints of an identical earlier run (False: train afresh)
    resume: bool = param(True, runtime=True)
    # X; the seed report's alternative: (1024, 1000, 500, 256, 128, 64)
    hidden: tuple = param((1024, 1200, 728, 512, 128), range=AT_LEAST_1, items=int)
    heldout_fraction: float = param(0.1, range=FRACTION)  # stratified part of train for model selection
    use_unlabeled: bool = False  # pretrain on train + the unlabeled split (100,000 images) too
    unlabeled_limit: int = param(0, range=NON_NEGATIVE)  # at most this many unlabeled images (0 = all)
    flip: bool = True  # random horizontal flips while training
    pretrain_epochs: int = param(3, range=AT_LEAST_1)  # per layer
    # > 0: pretrain each layer for this many seconds (pretrain_epochs ignored; pipeline --budget sets it)
    pretrain_budget_s: float = param(0.0, range=NON_NEGATIVE)
    pretrain_lr: float = param(1e-3, range=POSITIVE)
    epochs: int = param(8, range=AT_LEAST_1)  # fine-tuning (and the baseline)
    # > 0: fine-tune, and train the baseline, for this many seconds each (epochs ignored)
    budget_s: float = param(0.0, range=NON_NEGATIVE)
    batch_size: int = param(64, range=AT_LEAST_1)
    optimizer: str = param("adam", choices=OPTIMIZERS)
    lr: float = param(1e-3, range=POSITIVE)
    weight_decay: float = param(1e-5, range=NON_NEGATIVE)
    dropout: float = param(0.2, range=FRACTION)
    label_smoothing: float = param(0.0, range=FRACTION)
    # first N test images of each class in the X[3] t-SNE
    tsne_per_class: int = param(500, range=AT_LEAST_1, runtime=True)
    # auto (bf16 on GPUs with native bf16, fp16 + gradient scaler on older ones, on the CPU the fastest of fp32 and bf16 autocast, each with and without channels_last, measured (helpers.precision), fp32 on MPS) | bf16 | fp16 | fp32
    precision: str = param("auto", choices=PRECISIONS)
    seed: int = param(0, range=NON_NEGATIVE)

    PRESETS = {
        "E2": {
            # smoke: five layers as X, narrower (X's 9216 x 1024 first layer alone is 38 MB in each of ten
            # checkpoints), and 15 epochs (on the generated stand-in both models then leave chance: 30 steps did not)
            "smoke": dict(pretrain_epochs=1, epochs=15, batch_size=64, hidden=(256, 256, 128, 128, 64)),
            "cpu": dict(pretrain_epochs=10, epochs=40, batch_size=128),  # the real sizes: an MLP is cheap
            "full": dict(pretrain_epochs=20, epochs=60, batch_size=128),
        }
    }

    STAGES = {
        # one greedy autoencoder step per layer: MSE, Adam, cosine to 10 % of the LR, no warm-up
        "pretrain": Stage(
            reads={
                "epochs": "pretrain_epochs",
                "budget_s": "pretrain_budget_s",
                "lr": "pretrain_lr",
                **same_names("precision", "seed"),
            },
            fixed={
                "optimizer": "adam",
                "weight_decay": 0.0,
                "schedule": "cosine",
                "warmup_epochs": 0.0,
                "min_lr_ratio": 0.1,
                "monitor": "",
                "channels_last": False,
            },
            also_reads=("use_unlabeled", "unlabeled_limit"),
        ),
        # fine-tuning from the pretrained layers: cross-entropy, best held-out epoch kept
        "train": Stage(
            reads=E2_CLASSIFIER_READS, fixed=E2_CLASSIFIER_FIXED, also_reads=("dropout",), after=("pretrain",)
        ),
        # the same MLP and recipe from its random init
        "baseline": Stage(reads=E2_CLASSIFIER_READS, fixed=E2_CLASSIFIER_FIXED, also_reads=("dropout",)),
    }

    def __post_init__(self):
        self._validate()

    def _check(self) -> list[str]:
        if len(self.hidden) < 4:
            return [f"hidden={self.hidden} is not valid; give at least 4 layer sizes (the t-SNE shows layer X[3])"]
        return []


def parameter_help(cls) -> list[tuple[str, str, str]]:
    """(name, default, meaning) of every parameter of a configuration class, for command-line help:
    the meaning is the comment after the field (after its closing parenthesis when it spans lines),
    or the comment line right above it, in its source."""
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    meaning = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = node.lineno - 1
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            standalone = above in comments and lines[above - 1].lstrip().startswith("#")
            meaning[node.target.id] = own[-1] if own else comments[above] if standalone else ""
    defaults = {f.name: (repr(f.default) if f.default is not dataclasses.MISSING else "required") for f in fields(cls)}
    return [(name, defaults[name], meaning.get(name, "")) for name in defaults if name not in ("task", "profile")]


def config_class(task: str):
    """The configuration class of a task (T1-T3 and E1: RecognitionConfig; T4: RetrievalConfig; E2: LayerwiseConfig)."""
    return {"T4": RetrievalConfig, "E2": LayerwiseConfig}.get(task, RecognitionConfig)


# (helpers.checkpoint compares run keys without knowing these classes)
for _config in (RecognitionConfig, RetrievalConfig, LayerwiseConfig):
    OLDER_RUN_KEYS.update(_config.older_values())
