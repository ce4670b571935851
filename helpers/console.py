"""What `fit` shows while it trains: the progress bar and its postfix, the line printed after each
epoch, the message of an interrupted run, and `StopRequest`, which defers a first Ctrl-C to the end
of the current step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from helpers.checkpoint import LAST
from helpers.runinfo import live_progress


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (Slurm's time limit, `docker stop`, `kill`, a
    Jupyter kernel being shut down) into a request honoured at the next step boundary, so an
    interrupted run saves a consistent state; a second signal interrupts at once. `signum` is the
    first signal (an entry point exits with 128 + it: 130 for Ctrl-C, 143 for SIGTERM).

    `several=True` (a rank under torchrun): further signals never force: torchrun passes the
    launcher's signal on to every rank (a terminal's Ctrl-C reaches them twice), and all ranks must
    stop at the same step to save one consistent checkpoint (torchrun kills what has not stopped
    30 s later)."""

    def __init__(self, several: bool = False):
        self.pending = self.forced = False
        self.signum = 0
        self.several = several
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.pending:
            if self.several:
                return
            self.forced = True
            raise KeyboardInterrupt
        self.pending, self.signum = True, signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\n{what}: stopping after this step" + ("" if self.several else " (again: stop at once)") + "...",
            flush=True,
        )

    def release(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM while no training step runs: handled as Ctrl-C is (nothing partial is written; the
    entry point says so in one line and exits with 143)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def exit_status(stop: KeyboardInterrupt) -> int:
    """128 + the signal that stopped a run: 143 for SIGTERM, 130 for Ctrl-C."""
    signum = getattr(stop, "signum", 0) or (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    return 128 + int(signum)


class TerminateAsInterrupt:
    """`with TerminateAsInterrupt():` an entry point's SIGTERM (Slurm's time limit, `docker stop`,
    `kill`) raises Terminated, a KeyboardInterrupt, wherever no training step runs (a training's
    StopRequest takes the signal over while it runs). `.received` says whether one came."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.received = False
        return self

    def _handle(self, signum, frame):
        self.received = True
        _raise_terminated(signum, frame)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def interrupted_message(
    name: str, epoch: int, step: int, at_boundary: bool, planned: int, done: int, out: Path | None, forced: bool
) -> str:
    where = f"in epoch {epoch + 1}/{planned} at step {step}" if not at_boundary else f"after epoch {done}/{planned}"
    what = f"Training{' of ' + name if name else ''} was interrupted {where}"
    if out is None:
        return f"{what}; nothing was saved (no out_dir), so a rerun starts afresh."
    if forced and not at_boundary:  # a second Ctrl-C does not wait for the step to end
        if not (out / LAST).is_file():
            return f"{what} at once; nothing was saved yet, so a rerun starts afresh."
        saved = f"the previous checkpoint {out / LAST} is kept"
    else:
        saved = f"its state is saved in {out / LAST}"
    return (
        f"{what}; {saved}. Nothing after the training ran and no result was recorded: "
        "rerun (with resume=True, the default) to continue from there."
    )


def postfix(sums, images: int, seconds: float) -> str:
    """The progress bar's postfix from an epoch's running sums (`loss_sum`, `correct`, `seen`, `scored`)."""
    loss = float(sums.loss_sum) / max(1, sums.seen)
    acc = f" acc {100 * float(sums.correct) / sums.scored:.1f}%" if sums.scored else ""
    return f"loss {loss:.3f}{acc} {images / max(seconds, 1e-9):.0f} img/s"


def epoch_line(name: str, record: dict, num_epochs: int | str) -> str:
    parts = [f"{name + ' ' if name else ''}epoch {record['epoch']}/{num_epochs}", f"loss {record['train_loss']:.4f}"]
    if record.get("train_top1") is not None:
        parts.append(f"train {100 * record['train_top1']:.1f}%")
    for key, value in record.items():
        if key.endswith(("_top1", "recall@1", "map@r")) and key != "train_top1" and isinstance(value, float):
            parts.append(f"{key} {100 * value:.1f}%")
    parts.append(f"lr {record['lr']:.3g}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.0f} img/s")
    parts.append(f"{record['train_seconds'] + record.get('eval_seconds', 0):.1f}s")
    return "  ".join(parts)


class ProgressBar:
    """A tqdm bar (notebook-aware via tqdm.auto) that can jump to a step; drawn only where progress
    is live (helpers.runinfo.live_progress: not in the pipeline's batch runs)."""

    def __init__(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, disable=not live_progress()
        )

    def update_to(self, step: int, postfix: str) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
