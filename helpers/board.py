"""TensorBoard curves of a training, live: `tensorboard --logdir OUT/tensorboard`.

One folder per run (OUT/tensorboard/<run name>), written by rank 0 alone: the training loss and the
LR every `log_every` steps (where the loop reads its running sums anyway: no extra host sync per
step), and every epoch's record (train and held-out / test metrics, images/s) at the epoch's last
step. A resumed run opens its folder with `purge_step` = the step after the one it resumes from, so
the curve goes on without duplicate steps: events a killed session wrote after its last checkpoint
are dropped. A finished run (a notebook rerun) opens nothing.
Optional: without the `tensorboard` package a run trains as before, with one notice.
"""

from __future__ import annotations

from pathlib import Path

from helpers.runinfo import notice


class Board:
    """The TensorBoard writer of one run."""

    def __init__(self, folder: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(
            str(self.folder), purge_step=max(1, purge_step)
        )  # (a fresh run: 1, the old curves go)

    def steps(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, record: dict) -> None:
        """An epoch's record (numbers only) at its last global step: epoch/train_loss, epoch/heldout_top1, ..."""
        for key, value in record.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key not in ("epoch", "best_epoch", "steps")
            ):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def embedding(self, vectors, labels, tag: str) -> None:
        """Test embeddings (N, D) with their labels for TensorBoard's projector."""
        self.writer.add_embedding(vectors, metadata=[int(x) for x in labels], tag=tag)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(folder: Path | None, purge_step: int = 0) -> Board | None:
    """A Board writing to `folder`, or None without a folder or without the tensorboard package."""
    if folder is None:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        notice("TensorBoard curves are off: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return Board(folder, purge_step)
