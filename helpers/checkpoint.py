"""Checkpoint files of `fit`: `last.pt` (the whole training state, to resume) and `best.pt` (the
best held-out weights), written atomically (helpers.atomic) and read back before they replace the
old file; the global RNG states they hold; and the check that a `last.pt` belongs to the run about
to resume it (same format, configuration, run key, data and length).

Damage is survivable: while a run trains, the previous `last.pt` stays as `last.prev.pt`, and an
unreadable `last.pt` (a cloud-synced folder, a truncated copy) falls back to it with a notice.
Every unreadable file is a CheckpointError naming it and what to do. Both files carry the run's
`run_id` (kept across resumes), and `run.json` names the run that owns the folder: a best.pt of
another run is never loaded, and metrics are written only for the run whose checkpoints are there.
"""

from __future__ import annotations

import json
import pickle
import random
import uuid
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from helpers.atomic import atomic_torch_save, atomic_write_json
from helpers.errors import CheckpointError, SettingsError
from helpers.fit_config import OLDER_RUN_KEYS

# 2: the plateau schedule reads the early-stopping monitor ("monitor") instead of keeping its own best
CHECKPOINT_FORMAT = 2
LAST, BEST, HISTORY = "last.pt", "best.pt", "history.json"  # the files of a run folder
PREVIOUS = "last.prev.pt"  # the last.pt before the newest, kept while the run trains
RUN = "run.json"  # which run owns the folder: {"run_id", "pid", "host", "started"}
AFRESH = "delete that folder or pass resume=False (or use another out_dir) to train afresh"


# FitConfig fields a resumed run may change: how often it reports progress and writes last.pt, and
# how often it evaluates when nothing is selected on the evaluations (a monitor reads only evaluated epochs, so
# eval_every then changes the best checkpoint, early stopping and plateau cuts). The length may not
# change: the LR schedule depends on it, so a longer resumed run would equal neither run.
def _not_compared(config: dict) -> tuple[str, ...]:
    often = ("log_every", "checkpoint_every_s")
    return often if config.get("monitor") else (*often, "eval_every")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (a `weights_only` load reads them back)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _read(path: Path, device) -> dict:
    """torch.load of a checkpoint file; CheckpointError naming it when it is unreadable."""
    try:
        state = torch.load(
            path, map_location=device, weights_only=True
        )  # tensors and plain values only: a foreign file cannot run code
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        what = next(
            (line.split("GLOBAL ", 1)[1].split(" ", 1)[0] for line in str(exc).splitlines() if "GLOBAL " in line), None
        )
        if what is None:  # not a refused object: damage
            reason = next(
                (line.strip() for line in str(exc).splitlines() if "error:" in line.lower()), type(exc).__name__
            )[:120]
            raise CheckpointError(f"{path} is damaged or not a checkpoint (UnpicklingError: {reason})") from None
        raise CheckpointError(
            f"{path} holds more than tensors and plain values ({what}), which a safe load refuses: it is not a checkpoint of this "
            "version of the project. Pass resume=False (or another out_dir) to train afresh; load it yourself only if you trust its source."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any damage: unpickling, zip, truncation, zero bytes
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is damaged or not a checkpoint (it holds a {type(state).__name__}, not a training state)"
        )
    return state


def _verified(keys: tuple[str, ...]):
    """A check that a freshly written file reads back as a checkpoint with `keys` (before it replaces the old one)."""

    def verify(path: Path) -> None:
        state = _read(path, "cpu")
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(
                f"{path} did not read back whole (missing {missing}); the previous checkpoint is kept"
            )

    return verify


def save_last(out: Path, state: dict) -> None:
    """Write the training state `state` as out/last.pt, stamped with CHECKPOINT_FORMAT; the old
    last.pt becomes last.prev.pt once the new one has been read back."""
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT} | state,
        out / LAST,
        verify=_verified(("format", "model", "epoch")),
        keep_previous=out / PREVIOUS,
    )


def has_checkpoint(out: Path) -> bool:
    """Whether out holds a training state to resume (last.pt, or the previous one after a crash between the two renames)."""
    return (out / LAST).is_file() or (out / PREVIOUS).is_file()


def drop_previous(out: Path) -> None:
    """A finished run needs no fallback: remove last.prev.pt (it holds a whole training state)."""
    (out / PREVIOUS).unlink(missing_ok=True)


def slim_finished(out: Path, weights_in_best: bool) -> None:
    """A finished run's last.pt without what only continuing its training would need: the optimizer
    state (as large as the model for SGD with momentum, twice for Adam) and, when best.pt holds the
    weights anyone reads afterwards (`weights_in_best`: the run restores its best weights at the end,
    or the last epoch was the best), the model. A finished run is never continued (the engine refuses
    another length), so resuming it (a notebook rerun) reads the weights from best.pt and trains nothing."""
    state = _read(out / LAST, "cpu")
    state |= {"optimizer": None, "slim": True} | ({"model": None} if weights_in_best else {})
    atomic_torch_save(state, out / LAST, verify=_verified(("format", "epoch", "slim")))


def load_last(out: Path, device: torch.device) -> dict:
    """out/last.pt; when it is missing or unreadable,
    out/last.prev.pt with a notice. A CheckpointError when neither is usable or the format is unknown."""
    from helpers.runinfo import notice

    path, previous = out / LAST, out / PREVIOUS
    try:
        state = _read(path, device)
    except (FileNotFoundError, CheckpointError) as exc:
        damage = "is missing" if isinstance(exc, FileNotFoundError) else str(exc).removeprefix(f"{path} ")
        if not previous.is_file():
            raise CheckpointError(f"{path} {damage}, and no earlier checkpoint is left; {AFRESH}") from None
        try:
            state = _read(previous, device)
        except CheckpointError:
            raise CheckpointError(f"{path} {damage}, and {previous.name} is damaged too; {AFRESH}") from None
        notice(
            f"{path} {damage}; resuming from the checkpoint before it, {previous.name} (epoch {state.get('epoch', '?')}, step {state.get('step', '?')})"
        )
        path = previous
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        written = "without a format number" if found is None else f"in checkpoint format {found!r}"
        raise CheckpointError(
            f"{path} was written {written}; this version of the training engine resumes format {CHECKPOINT_FORMAT} only: {AFRESH}"
        )
    return state


def save_best(
    out: Path,
    model: torch.nn.Module,
    epoch: int,
    monitor: str,
    value: float,
    config: dict,
    run_id: str,
    run_key: dict | None,
) -> None:
    state = {
        "model": model.state_dict(),
        "epoch": epoch,
        monitor: value,
        "config": config,
        "run_id": run_id,
        "run_key": run_key,
    }
    atomic_torch_save(state, out / BEST, verify=_verified(("model", "run_id")))


def load_best(path: Path, device, run_id: str | None = None, remedy: str = AFRESH) -> dict:
    """The best.pt at `path` ({"model", "epoch", "run_id", ...}); a CheckpointError ending in
    `remedy` when it is missing, unreadable or, with `run_id`, written by another run (a file
    without a run id, from an older version, is accepted)."""
    try:
        state = _read(path, device)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {remedy}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {remedy}") from None
    if "model" not in state:
        raise CheckpointError(f"{path} is damaged or not a checkpoint (no model weights); {remedy}")
    if run_id is not None and state.get("run_id") not in (None, run_id):
        raise CheckpointError(
            f"{path} was written by another run ({state['run_id']}) than the expected one ({run_id}); {remedy}"
        )
    return state


def load_best_weights(out: Path, device: torch.device, run_id: str | None = None) -> dict:
    """The model state dict of out/best.pt (see load_best)."""
    try:
        return load_best(out / BEST, device, run_id)["model"]
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(AFRESH, "the held-out best weights are lost: " + AFRESH)) from None


def claim_run(out: Path, run_id: str) -> None:
    """Record in out/run.json that the run `run_id` owns the folder (written by the process training it)."""
    from helpers.lock import holder_info

    info = holder_info()
    atomic_write_json(
        {"run_id": run_id, "pid": info["pid"], "host": info["host"], "started": info["started"]}, out / RUN
    )


def run_owner(out: Path) -> dict | None:
    """out/run.json, or None when absent or unreadable."""
    try:
        owner = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def check_same_run(state: dict, path: Path, cfg, run_key: dict | None, steps_per_epoch: int) -> None:
    """Refuse (SettingsError) to resume the checkpoint `state` read from `path` under the FitConfig
    `cfg` and `run_key` when it was written with other settings or for another length."""
    # (a field added since the checkpoint was written counts as its default)
    saved_config = {f.name: f.default for f in fields(cfg)} | state["config"]
    saved_key = state["run_key"] or {}
    if saved_key:  # (a field it predates counts at the value it was trained with, where that is known)
        saved_key = {k: v for k, v in OLDER_RUN_KEYS.items() if k in (run_key or {})} | saved_key
    saved = {k: v for k, v in saved_config.items() if k not in _not_compared(saved_config)} | {
        f"run.{k}": v for k, v in saved_key.items() if k != "epochs"
    }
    current = {k: v for k, v in asdict(cfg).items() if k not in _not_compared(asdict(cfg))} | {
        f"run.{k}": v for k, v in (run_key or {}).items() if k != "epochs"
    }
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if set(diff) == {"epochs"}:
        planned = type(cfg)(**state["config"]).num_epochs(steps_per_epoch)
        progress = "finished" if state["epoch"] >= planned else f"stopped after epoch {state['epoch']}"
        raise SettingsError(
            f"{path} is a {saved['epochs']}-epoch run ({progress}); epochs is now {cfg.epochs}. "
            f"Its LR schedule was planned for that length, so continuing it for {cfg.epochs} would equal neither run. "
            f"Set epochs={saved['epochs']} to resume it, or pass resume=False (or another out_dir) to train {cfg.epochs} epochs afresh."
        )
    newer = sorted(k.removeprefix("run.") for k in diff if k.startswith("run.") and k[4:] not in saved_key)
    if newer and state["run_key"]:
        raise SettingsError(
            f"{path} was written before the setting(s) {', '.join(newer)} existed, so what it was trained with is unknown. "
            "Pass resume=False (or another out_dir) to train afresh."
        )
    if "run.data_fingerprint" in diff:
        before, now = diff["run.data_fingerprint"]
        raise SettingsError(
            f"{path} was trained on other data: the files under {current.get('run.data_dir', 'the data folder')} have changed since "
            f"(file list and sizes {str(before)[:10]}, now {str(now)[:10]}). Restore the data it was trained on to resume it, "
            "or pass resume=False (or another out_dir) to train afresh on the data as it is now."
        )
    if diff:
        raise SettingsError(
            f"{path} was written with a different configuration {diff} (saved, now). "
            "Resume with the same settings, or pass resume=False / another out_dir to start afresh."
        )
