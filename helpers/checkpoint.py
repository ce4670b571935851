"""Checkpoint files of `fit`: `last.pt` (the whole training state, to resume) and `best.pt` (the
best held-out weights), written atomically (helpers.atomic); the global RNG states they hold; and
the check that a `last.pt` belongs to the run about to resume it (same format, configuration,
run key and length).
"""

from __future__ import annotations

import random
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from helpers.atomic import atomic_torch_save

# 2: the plateau schedule reads the early-stopping monitor ("monitor") instead of keeping its own best
CHECKPOINT_FORMAT = 2
LAST, BEST, HISTORY = "last.pt", "best.pt", "history.json"  # the files of a run folder

# FitConfig fields a resumed run may change: how often it reports progress, and how often it
# evaluates when nothing is selected on the evaluations (a monitor reads only evaluated epochs, so
# eval_every then changes the best checkpoint, early stopping and plateau cuts). The length may not
# change: the LR schedule depends on it, so a longer resumed run would equal neither run.
def _not_compared(config: dict) -> tuple[str, ...]:
    return ("log_every",) if config.get("monitor") else ("log_every", "eval_every")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(out: Path, state: dict) -> None:
    """Write the training state `state` as out/last.pt, stamped with CHECKPOINT_FORMAT."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT} | state, out / LAST)


def load_last(out: Path, device: torch.device) -> dict:
    """out/last.pt (a format-1 file is read as format 2); a ValueError for any other format."""
    path = out / LAST
    state = torch.load(path, map_location=device, weights_only=False)
    found = state.get("format") if isinstance(state, dict) else None
    if found == 1 and {"best_value", "best_epoch", "bad_epochs", "schedule"} <= set(state):
        return upgrade_amp(upgrade_format_1(state))
    if found != CHECKPOINT_FORMAT:
        written = "without a format number" if found is None else f"in checkpoint format {found!r}"
        raise ValueError(
            f"{path} was written {written}; this version of the training engine resumes format {CHECKPOINT_FORMAT} only. "
            "Pass resume=False (or use another out_dir) to start afresh."
        )
    return upgrade_amp(state)


def upgrade_amp(state: dict) -> dict:
    """A training state written before `precision` replaced `amp` (bf16 autocast on CUDA, off
    elsewhere): amp=True is precision "auto" (the same bf16 on an Ampere or newer GPU, and fp32 on
    the CPU), amp=False is "fp32"; in the FitConfig and in the run key alike."""
    for part in ("config", "run_key"):
        settings = state.get(part)
        if isinstance(settings, dict) and "amp" in settings and "precision" not in settings:
            settings = dict(settings)
            settings["precision"] = "auto" if settings.pop("amp") else "fp32"
            state = state | {part: settings}
    return state


def upgrade_format_1(state: dict) -> dict:
    """A format-1 training state as format 2: the best value, its epoch and the epochs since it
    move into "monitor"; the plateau schedule's own best and count go (it reads the monitor, whose
    epochs-since-best give the same cuts)."""
    upgraded = {k: v for k, v in state.items() if k not in ("best_value", "best_epoch", "bad_epochs")}
    upgraded["format"] = CHECKPOINT_FORMAT
    upgraded["monitor"] = {"best": state["best_value"], "best_epoch": state["best_epoch"], "bad_epochs": state["bad_epochs"]}
    upgraded["schedule"] = {k: v for k, v in state["schedule"].items() if k not in ("best", "bad_epochs")}
    for key in ("running", "augment_rng", "run_key", "budget_elapsed"):  # absent from the earliest format-1 files
        upgraded.setdefault(key, None)
    return upgraded


def save_best(out: Path, model: torch.nn.Module, epoch: int, monitor: str, value: float, config: dict) -> None:
    atomic_torch_save({"model": model.state_dict(), "epoch": epoch, monitor: value, "config": config}, out / BEST)


def load_best_weights(out: Path, device: torch.device) -> dict:
    """The model state dict of out/best.pt."""
    return torch.load(out / BEST, map_location=device, weights_only=False)["model"]


def check_same_run(state: dict, path: Path, cfg, run_key: dict | None, steps_per_epoch: int) -> None:
    """Refuse (ValueError) to resume the checkpoint `state` read from `path` under the FitConfig
    `cfg` and `run_key` when it was written with other settings or for another length."""
    # (a field added since the checkpoint was written counts as its default)
    saved_config = {f.name: f.default for f in fields(cfg)} | state["config"]
    saved = {k: v for k, v in saved_config.items() if k not in _not_compared(saved_config)} | {f"run.{k}": v for k, v in (state["run_key"] or {}).items() if k != "epochs"}
    current = {k: v for k, v in asdict(cfg).items() if k not in _not_compared(asdict(cfg))} | {f"run.{k}": v for k, v in (run_key or {}).items() if k != "epochs"}
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if set(diff) == {"epochs"}:
        planned = type(cfg)(**state["config"]).num_epochs(steps_per_epoch)
        progress = "finished" if state["epoch"] >= planned else f"stopped after epoch {state['epoch']}"
        raise ValueError(
            f"{path} is a {saved['epochs']}-epoch run ({progress}); epochs is now {cfg.epochs}. "
            f"Its LR schedule was planned for that length, so continuing it for {cfg.epochs} would equal neither run. "
            f"Set epochs={saved['epochs']} to resume it, or pass resume=False (or another out_dir) to train {cfg.epochs} epochs afresh."
        )
    if diff:
        raise ValueError(
            f"{path} was written with a different configuration {diff} (saved, now). "
            "Resume with the same settings, or pass resume=False / another out_dir to start afresh."
        )
