"""`FitConfig`: everything `fit` needs besides the model and the data, with the choices its fields
allow (the optimizers and LR schedules helpers.optim implements). Its own module so that the engine,
the optimizers and the task configurations all read it without importing one another."""

from __future__ import annotations

from dataclasses import dataclass

from helpers.errors import SettingsError
from helpers.runinfo import PRECISIONS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "plateau", "constant")


# Run-key fields that joined after checkpoints existed -> the value those checkpoints were trained
# with: declared beside each field (helpers.config's `param(..., older=...)`, which fills this in),
# read by helpers.checkpoint, which compares run keys without knowing the task configurations.
OLDER_RUN_KEYS: dict = {}


def check_choice(name: str, value, valid) -> None:
    """Raise SettingsError (a ValueError) naming the valid values when `value` is not one of them."""
    if value not in valid:
        raise SettingsError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class FitConfig:
    """Everything `fit` needs to know besides the model and the data."""

    epochs: int = 10
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | step | plateau | constant (all after the warm-up)
    warmup_epochs: float = 0.0  # linear warm-up from lr / 25 (onecycle: 30 % of training when 0)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    step_epochs: int = 30  # "step": multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    plateau_patience: int = 2  # "plateau": epochs without held-out improvement before cutting the LR
    plateau_factor: float = 0.2
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    monitor: str = "heldout_top1"  # metric for best checkpoint / early stopping / plateau; "" = none
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    restore_best: bool = True  # load the best held-out weights into the model at the end
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (helpers.runinfo.choose_precision; fp16 adds a gradient scaler)
    channels_last: bool = True  # CUDA; on the CPU a candidate that precision auto times
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    fused: bool = True  # fused optimizer kernels (CUDA, and the CPU where PyTorch has them)
    sync_bn: bool = False  # several GPUs: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    log_every: int = 25  # steps between host reads of the running loss (progress bar, NaN check)
    seed: int = 0
    max_steps: int = 0  # > 0: train exactly this many steps (the schedule spans them; epochs is then derived)
    # > 0: a budget run planned (helpers.budget) for fewer epochs than this trains without the pad
    # crop's random translation (padding 0; flips stay): at under two passes over the data the
    # translated copies only slow the fit (docs/performance.md); 0: never
    crop_min_epochs: float = 0.0
    budget_s: float = (
        0.0  # > 0: train for this many seconds (evaluation excluded); steps planned from measured step times
    )
    eval_every: int = 1  # run `evaluate` every N epochs (and always after the last one)
    # write last.pt at an epoch's end once this many seconds have passed since the last one (0: every
    # epoch; -1: once the time since is CHECKPOINT_COST_RATIO x what the last write took). The last
    # epoch, an early stop and a Ctrl-C / SIGTERM always write it.
    checkpoint_every_s: float = -1.0

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.epochs < 1:
            raise SettingsError(f"epochs={self.epochs} must be >= 1")
        if self.lr <= 0:
            raise SettingsError(f"lr={self.lr} must be > 0")
        if self.eval_every < 1:
            raise SettingsError(f"eval_every={self.eval_every} must be >= 1")
        if self.checkpoint_every_s < 0 and self.checkpoint_every_s != -1:
            raise SettingsError(
                f"checkpoint_every_s={self.checkpoint_every_s} must be >= 0 (seconds; 0 = every epoch) or -1 (automatic)"
            )
        if self.max_steps < 0:
            raise SettingsError(f"max_steps={self.max_steps} must be >= 0 (0 = epochs x steps per epoch)")
        if self.budget_s < 0 or (self.budget_s > 0 and self.max_steps > 0):
            raise SettingsError(
                f"budget_s={self.budget_s} must be >= 0, and cannot be combined with max_steps={self.max_steps}"
            )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: max_steps when set, else epochs x steps_per_epoch."""
        return self.max_steps or self.epochs * steps_per_epoch

    def num_epochs(self, steps_per_epoch: int) -> int:
        """Epochs the loop runs (the last one may stop early when max_steps is set)."""
        return -(-self.total_steps(steps_per_epoch) // max(1, steps_per_epoch))
