"""Where things live (project, generated data, outputs), where they run (`resolve_device`,
`Runtime`), and the provenance stamped into every metrics JSON."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from helpers.errors import SettingsError
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The repository root (holding pyproject.toml) for an editable install; else the working directory."""
    if os.environ.get("HELPERS_PROJECT_ROOT"):
        return env_path("HELPERS_PROJECT_ROOT")
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").is_file():
        return candidate
    return Path.cwd().resolve()


PATH_VARIABLES = ("HELPERS_DATA_DIR", "HELPERS_OUT_DIR", "HELPERS_CACHE_DIR", "HELPERS_PROJECT_ROOT")


def launch_dir() -> Path:
    """The directory relative paths resolve against: $HELPERS_LAUNCH_DIR, which the pipeline sets
    to the directory it was run from before its kernels start (they run in notebooks/), else the
    working directory (a shell command's, or a notebook's own folder in Jupyter)."""
    value = os.environ.get("HELPERS_LAUNCH_DIR")
    return Path(value) if value and os.path.isabs(value) else Path.cwd()


def env_path(name: str) -> Path | None:
    """The folder an environment variable names, a relative value resolved against `launch_dir()`; None when unset."""
    value = os.environ.get(name)
    return (launch_dir() / Path(value).expanduser()).resolve() if value else None


def absolute_env_paths() -> None:
    """Make the HELPERS_* path variables absolute (against the directory the command was run from)
    before kernels and subprocesses, which run elsewhere, inherit them."""
    for name in PATH_VARIABLES:
        if os.environ.get(name):
            os.environ[name] = str(env_path(name))
    os.environ.setdefault("HELPERS_LAUNCH_DIR", str(Path.cwd()))


def generated_data_dir() -> Path:
    """Where generated data lives: $HELPERS_DATA_DIR, else <project>/data/generated."""
    return env_path("HELPERS_DATA_DIR") or (project_root() / "data" / "generated").resolve()


def default_data_dir(profile: str) -> Path:
    """Where a profile reads its datasets by default: smoke the generated ones, cpu and full <project>/data."""
    return generated_data_dir() if profile == "smoke" else (project_root() / "data").resolve()


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2
    cpu.max, or v1 cfs quota), which the affinity does not show (2 cores of quota on a 64-core host)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        cores = os.cpu_count() or 1
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota not in ("max", "-1"):
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup files (macOS, Windows) or an unexpected format: the affinity alone
    return cores


def default_workers() -> int:
    """DataLoader workers that follow the machine: one core is left to the training process, at most 8."""
    return max(0, min(8, usable_cores() - 1))


def default_out_dir(profile: str) -> Path:
    """Where a profile's results go: $HELPERS_OUT_DIR, else <project>/outputs/<profile>."""
    return env_path("HELPERS_OUT_DIR") or (project_root() / "outputs" / profile).resolve()


def live_progress() -> bool:
    """Whether progress bars are drawn: not when $HELPERS_PROGRESS is "off", as the pipeline sets it
    for the notebooks it runs (a saved notebook would keep a widget's first state, "0/7"; the epoch
    lines are the progress there)."""
    return os.environ.get("HELPERS_PROGRESS", "").lower() != "off"


PROFILES = ("smoke", "cpu", "full")  # generated data on any machine; real data sized for a CPU budget; the GPU recipe
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_NOTICED: set[str] = set()


def notice(message: str) -> None:
    """Print a one-line notice once per process (to stderr): what a device cannot do and what is done instead."""
    from helpers.distributed import is_main

    if message not in _NOTICED and is_main():  # (under torchrun: once, by rank 0)
        _NOTICED.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "mps" (Apple silicon), else "cpu"; "cuda" or "mps"
    without that device is an error that says so."""
    import torch

    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise SettingsError(f"device={device!r} is not valid; choose one of {', '.join(DEVICES)} (or cuda:N)")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(
            f"device={device!r} but no CUDA GPU is visible to PyTorch {torch.__version__}; use device='cpu' or 'auto'"
        )
    if device == "mps" and not mps:
        raise SettingsError(
            f"device='mps' but Apple's Metal backend is not available to PyTorch {torch.__version__} here; use device='cpu' or 'auto'"
        )
    return device


@dataclass(frozen=True)
class Precision:
    """The arithmetic of the training steps and evaluation passes: `setting` as asked ("auto",
    "bf16", "fp16", "fp32"), `used` ("bf16" / "fp16": autocast to that dtype, fp16 with a gradient
    scaler in training; "fp32": no autocast) and the `reason` for it (metrics JSON, report)."""

    setting: str
    used: str
    reason: str

    def as_dict(self) -> dict:
        return {"setting": self.setting, "used": self.used, "reason": self.reason}


def _autocast_works(device_type: str, used: str) -> bool:
    """Whether torch.autocast(device_type, that dtype) stays enabled (it disables itself with a
    warning for a dtype the backend lacks, e.g. bf16 on MPS before macOS 14)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(
                torch.autocast(
                    device_type, dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[used])
                )._enabled
            )
        except (RuntimeError, ValueError):
            return False


def _grad_scaler_works(device_type: str) -> bool:
    """Whether a gradient scaler can unscale and step on this device (fp16 training needs one);
    on MPS it fails before PyTorch 2.8 (a float64 cast Metal lacks)."""
    if device_type in ("cpu", "cuda"):
        return True
    import torch

    try:
        param = torch.nn.Parameter(torch.ones(1, device=device_type))
        optimizer = torch.optim.SGD([param], lr=0.0)
        scaler = torch.amp.GradScaler(device_type)
        scaler.scale((param * 2).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no fp16 training here"
        return False


def choose_precision(setting: str, device: str, capability: tuple[int, int] | None = None) -> Precision:
    """The precision `setting` resolves to on `device`. "auto": bf16 on a CUDA GPU with native
    bf16 (compute capability >= 8.0), fp16 with a gradient scaler on an older one (e.g. Colab's T4,
    7.5), fp32 on the CPU and MPS. An explicit setting is used as asked where the backend has it;
    one it lacks falls back to fp32 with a notice. `capability` (major, minor) defaults to the
    device's own (tests pass one)."""
    import torch

    if setting not in PRECISIONS:
        raise SettingsError(f"precision={setting!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if device_type == "cuda" and capability is None:
        capability = torch.cuda.get_device_capability(torch.device(device))
    cc = f"compute capability {capability[0]}.{capability[1]}" if device_type == "cuda" else ""
    if setting == "fp32":
        return Precision(setting, "fp32", "fp32 as asked")
    if setting == "auto":
        if device_type == "cpu":
            return Precision(
                setting,
                "fp32",
                "auto on cpu: fp32, unless a run long enough to measure finds bf16 autocast or channels_last faster (its training record says)",
            )
        if device_type != "cuda":
            return Precision(setting, "fp32", f"auto: fp32 on {device_type} (autocast is used on CUDA GPUs only)")
        if capability >= (8, 0):
            return Precision(setting, "bf16", f"auto: bf16 autocast, native on this GPU ({cc} >= 8.0)")
        return Precision(setting, "fp16", f"auto: fp16 autocast with a gradient scaler ({cc} < 8.0 has no native bf16)")
    reason = f"{setting} as asked" + (" (a gradient scaler keeps small fp16 gradients)" if setting == "fp16" else "")
    if setting == "bf16" and device_type == "cuda" and capability < (8, 0):
        notice(
            f"precision='bf16' on a GPU without native bf16 ({cc}): it runs, slowly; precision='auto' would use fp16 with a gradient scaler"
        )
        reason += f", emulated on this GPU ({cc} < 8.0)"
    missing = (
        f"autocast to {setting}"
        if not _autocast_works(device_type, setting)
        else "the fp16 gradient scaler"
        if setting == "fp16" and not _grad_scaler_works(device_type)
        else None
    )
    if missing:
        notice(
            f"precision={setting!r}: {missing} is not available on {device_type} with PyTorch {torch.__version__}; training in fp32"
        )
        return Precision(setting, "fp32", f"{setting} asked, unavailable on {device_type}: fp32")
    return Precision(setting, setting, reason)


@dataclass(frozen=True)
class Runtime:
    """Where and how training steps and evaluation passes compute: the device, the precision used
    ("bf16" / "fp16": autocast to it; "fp32": none; see `choose_precision`) and channels_last
    memory (CUDA; on the CPU only when `cpu_channels_last`, as chosen by measurement in
    helpers.precision). `Runtime.of(cfg)` reads them from a task configuration."""

    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    cpu_channels_last: bool = False

    @property
    def memory_channels_last(self) -> bool:
        return self.channels_last and (self.cuda or self.cpu_channels_last)

    @classmethod
    def resolve(cls, device: str, precision: str, channels_last: bool) -> "Runtime":
        """The Runtime of a precision setting ("auto", ...) on `device` (see `choose_precision`)."""
        return cls(str(device), choose_precision(precision, str(device)).used, channels_last)

    @classmethod
    def of(cls, cfg) -> "Runtime":
        return cls.resolve(
            cfg.device, cfg.precision, getattr(cfg, "channels_last", False)
        )  # E2's MLP has no channels_last setting

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def device_type(self) -> str:
        return str(self.device).split(":")[0]

    def autocast(self):
        import torch

        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def grad_scaler(self):
        """A gradient scaler for fp16 training (None otherwise): it multiplies the loss so small
        fp16 gradients do not flush to zero, and skips steps whose gradients overflowed."""
        import torch

        return torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None

    def prepare_model(self, model):
        """`model` with channels_last weights when that is on (CUDA); returns it."""
        import torch

        return model.to(memory_format=torch.channels_last) if self.memory_channels_last else model

    def prepare(self, x):
        """A (B, C, H, W) batch in channels_last memory when that is on (CUDA); anything else unchanged."""
        import torch

        return x.contiguous(memory_format=torch.channels_last) if self.memory_channels_last and x.dim() == 4 else x


def peak_mem_mb(device="cpu") -> float:
    """Peak GPU memory allocated since the last reset on CUDA; else this process's peak resident
    memory (VmHWM, which unlike ru_maxrss is not inherited from the parent across fork + exec)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def git_commit(root: Path | None = None) -> dict:
    root = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run_info(device: str = "cpu", precision: Precision | None = None) -> dict:
    """Git commit, library versions, the device and the precision used (with its reason), so each
    reported number can be traced and rerun."""
    import torch
    import torchvision

    info = {
        "git": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    if precision is not None:
        info["precision"] = precision.as_dict()
    return info
