"""The training of a task without its notebook: `python -m helpers.train TASK [--profile P] [--name value ...]`.

Runs what the training cells of the task's notebook run (T1, T2, T3, E1, T4: the same
configuration builder, data, models, `fit` stages and evaluations) and writes the same files:
out_dir/checkpoints/<run>/ and out_dir/metrics/<notebook>.json (figures stay with the notebook).
Under torchrun every rank runs it (helpers.distributed); rank 0 writes:

    torchrun --standalone --nproc_per_node=4 -m helpers.train T2 --profile full
    python -m helpers.train T2 --profile full --gpus 4      # the same: starts torchrun itself

A notebook or the pipeline with gpus > 1 calls `helpers.experiment.train_on_gpus(cfg)` (through
`fit_stage`), which runs this under torchrun with the notebook's resolved
configuration (`--config FILE`) and then loads the finished runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from helpers import distributed
from helpers.config import RecognitionConfig, RetrievalConfig, config_class, parameter_help
from helpers.console import TerminateAsInterrupt, exit_status
from helpers.engine import TrainingInterrupted
from helpers.errors import ProjectError, SettingsError
from helpers.runinfo import absolute_env_paths
from helpers.tasks import STEPS
from helpers.experiment import describe_model, embed_split, load_metrics, save_metrics, train_classifier, train_on_gpus

TASKS = {
    step.task: step.name for step in STEPS if step.task != "E2"
}  # (E2 trains one small MLP on one device: its notebook alone)
USAGE = (
    "usage: python -m helpers.train TASK [--profile smoke|cpu|full] [--config FILE] [--<parameter> <value> ...]\n"
    f"  TASK: {', '.join(TASKS)}; parameters as in the task's notebook (e.g. --epochs 30 --batch_size 512 --gpus 4)"
)


# ------------------------------------------------------------------------------------ the tasks
# Each returns (payload, data info) as its notebook saves them with save_metrics.


def train_t1(cfg: RecognitionConfig):
    from helpers.recognition import build_model, build_tiny_imagenet

    data = _main_first(build_tiny_imagenet, cfg)
    model = build_model("custom_cnn", cfg, data.num_classes)
    run = train_classifier("T1_custom_cnn", model, data, cfg, describe=describe_model(model, width=cfg.width))
    return {"models": {run.name: run}}, data.info


def train_t2(cfg: RecognitionConfig):
    from helpers.recognition import build_model, build_tiny_imagenet

    data = _main_first(build_tiny_imagenet, cfg)
    model = build_model("resnet18", cfg, data.num_classes)
    run = train_classifier("T2_resnet18", model, data, cfg, describe=describe_model(model, stem=cfg.stem))
    return {"models": {run.name: run}}, data.info


def train_t3(cfg: RecognitionConfig):
    from helpers.recognition import build_model, build_tiny_imagenet, describe_cubs, gap_to_t2, select_t3

    data = _main_first(build_tiny_imagenet, cfg)
    runs = {}
    for fashion in cfg.fashions:
        model = build_model("resnet18", cfg, data.num_classes, cubs=fashion)
        runs[f"T3_{fashion}"] = train_classifier(
            f"T3_{fashion}", model, data, cfg, describe=describe_cubs(model, cfg, fashion, "plain")
        )
    selection = select_t3(runs, cfg)
    gap = gap_to_t2(runs[selection.best], load_metrics(cfg.out_dir, "T2_resnet18"), cfg)
    bonus_run = None
    if cfg.bonus:
        model = build_model("resnet18", cfg, data.num_classes, cubs=selection.fashion, cubs_variant="scaled")
        bonus_run = train_classifier(
            f"T3_{selection.fashion}_scaled",
            model,
            data,
            cfg,
            describe=describe_cubs(model, cfg, selection.fashion, "scaled"),
        )
    return {"models": runs, "selection": selection, "gap_to_T2": gap, "bonus": bonus_run}, data.info


def train_e1(cfg: RecognitionConfig):
    from helpers.recognition import build_model, build_tiny_imagenet, train_center_loss, train_triplet

    data = _main_first(build_tiny_imagenet, cfg)
    ce_model = build_model("resnet18", cfg, data.num_classes)
    ce = train_classifier(
        "E1_cross_entropy", ce_model, data, cfg, describe=describe_model(ce_model, stem=cfg.stem, loss="cross-entropy")
    )
    _, triplet = train_triplet("E1_triplet", data, cfg)
    _, center = train_center_loss("E1_center", data, cfg)
    return {"models": {r.name: r for r in (ce, triplet, center)}}, data.info


def train_t4(cfg: RetrievalConfig):
    from helpers.retrieval import (
        apply_t3_selection,
        build_backbone,
        build_cars196,
        embedding_run,
        retrieval_summary,
        t4_payload,
        train_classifier_stage,
    )

    cfg, t3_note = apply_t3_selection(cfg)
    data = _main_first(build_cars196, cfg)
    backbone, init_report = build_backbone(cfg, cfg.fashion, data.num_train_classes)
    classifier = train_classifier_stage(backbone, data, cfg)
    backbone.eval()
    before = retrieval_summary(*embed_split(backbone.forward_features, data.test, data.augment, cfg))
    runs = {m: embedding_run(backbone, data, cfg, m) for m in cfg.miner_runs}
    return t4_payload(cfg, t3_note, init_report, before, classifier, runs), data.info


PROGRAMS = {"T1": train_t1, "T2": train_t2, "T3": train_t3, "E1": train_e1, "T4": train_t4}


def _main_first(build, cfg):
    """build(cfg) on rank 0 first (it may generate the stand-in data or write a decode cache), then
    on the other ranks, which find it done."""
    if not distributed.is_main():
        distributed.barrier()
    data = build(cfg)
    if distributed.is_main():
        distributed.barrier()
    return data


def run_task(cfg) -> Path:
    """Train task `cfg.task` as its notebook does and write its metrics (rank 0); returns their path."""
    payload, info = PROGRAMS[cfg.task](cfg)
    path = save_metrics(TASKS[cfg.task], payload, cfg, info)
    distributed.barrier()
    return path


# ------------------------------------------------------------------------------------ launching


def parse_args(argv: list[str]) -> tuple[str, str, str | None, dict]:
    """(task, profile, config file or None, {parameter: value string}) from the command line."""
    if not argv:
        raise SystemExit(USAGE)
    if argv[0] in ("-h", "--help") or argv[1:2] in (["-h"], ["--help"]):
        print(help_text(argv[0] if argv[0] in TASKS else None))
        raise SystemExit(0)
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise SystemExit(f"helpers.train: unknown task {task!r}; choose one of {', '.join(TASKS)}\n{USAGE}")
    if len(rest) % 2 or any(not a.startswith("--") for a in rest[::2]):
        raise SystemExit(f"helpers.train: parameters come in pairs --name value; got {' '.join(rest)}\n{USAGE}")
    params = {a[2:].replace("-", "_"): v for a, v in zip(rest[::2], rest[1::2])}
    return task, params.pop("profile", "smoke"), params.pop("config", None), params


def help_text(task: str | None = None) -> str:
    """The usage and every parameter (default and meaning) of one task, or of all of them."""
    lines = [
        USAGE,
        "",
        "  --profile: smoke (generated data), cpu (real data sized for a CPU budget) or full (the GPU recipe); default smoke",
        "  --config FILE: a configuration a notebook wrote (checkpoints/<task>_torchrun_config.json)",
    ]
    tasks = [task] if task else list(TASKS)
    for cls in dict.fromkeys(config_class(t) for t in tasks):
        names = ", ".join(t for t in tasks if config_class(t) is cls)
        lines += ["", f"parameters of {names} ({cls.__name__}; a profile's preset replaces some defaults):"]
        lines += [
            f"  --{name} (default {default}){': ' + comment if comment else ''}"
            for name, default, comment in parameter_help(cls)
        ]
    return "\n".join(lines)


def build_config(task: str, profile: str, config_file: str | None, params: dict):
    cls = config_class(task)
    if config_file:  # a notebook's resolved configuration (+ overrides)
        values = read_config_file(Path(config_file)) | params
        if values.get("task") != task:
            raise SettingsError(f"{config_file} is a configuration of {values.get('task')}, not {task}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SettingsError(f"unknown parameter(s) {', '.join(unknown)} in {config_file}")
        return cls(**values).resolved()
    return cls.build(task, profile, **params)


def read_config_file(path: Path) -> dict:
    """A configuration written by a notebook (checkpoints/<task>_torchrun_config.json); a SettingsError naming it otherwise."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(
            f"--config {path}: no such file; give the <task>_torchrun_config.json a notebook wrote under out_dir/checkpoints"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"--config {path} is not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict):
        raise SettingsError(
            f'--config {path} holds a JSON {type(values).__name__}, not a configuration object ({{"task": ..., ...}})'
        )
    return values


def main(argv: list[str] | None = None) -> int:
    task, profile, config_file, params = parse_args(sys.argv[1:] if argv is None else argv)
    absolute_env_paths()
    with TerminateAsInterrupt() as terminate:
        try:
            cfg = build_config(task, profile, config_file, params)
            if distributed.launched_by_torchrun():
                device = distributed.setup(cfg.device)
                cfg = dataclasses.replace(cfg, device=device, gpus=distributed.world_size())
            elif cfg.gpus > 1:  # start torchrun on this module
                train_on_gpus(cfg)
                return 0
            path = run_task(cfg)
            if distributed.is_main():
                print(f"metrics written to {path}", flush=True)
        except ProjectError as error:  # a setting, the data, a folder or a file: one line that says what to change
            print(f"helpers.train {task}: {error}", file=sys.stderr, flush=True)
            return 2
        except TrainingInterrupted as stop:
            print(stop, file=sys.stderr, flush=True)
            return exit_status(stop)
        except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM outside a training step
            what = str(stop) or "stopped by Ctrl-C"
            print(
                f"helpers.train {task}: {what}; no metrics were written, checkpoints written before are kept: rerun to continue",
                file=sys.stderr,
                flush=True,
            )
            return 143 if terminate.received else exit_status(stop)
        finally:
            distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
