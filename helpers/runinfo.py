"""Where things live (project, generated data, outputs), where they run (`resolve_device`,
`Runtime`), and the provenance stamped into every metrics JSON."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The repository root (holding pyproject.toml) for an editable install; else the working directory."""
    if os.environ.get("HELPERS_PROJECT_ROOT"):
        return Path(os.environ["HELPERS_PROJECT_ROOT"]).resolve()
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").is_file():
        return candidate
    return Path.cwd().resolve()


def generated_data_dir() -> Path:
    """Where generated data lives: $HELPERS_DATA_DIR, else <project>/data/generated."""
    return Path(os.environ.get("HELPERS_DATA_DIR") or project_root() / "data" / "generated").resolve()


def default_out_dir(profile: str) -> Path:
    """Where a profile's results go: $HELPERS_OUT_DIR, else <project>/outputs/<profile>."""
    return Path(os.environ.get("HELPERS_OUT_DIR") or project_root() / "outputs" / profile).resolve()


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; "cuda" without a GPU is an error that says so."""
    import torch

    valid = ("auto", "cpu", "cuda")
    if device not in valid and not str(device).startswith("cuda:"):
        raise ValueError(f"device={device!r} is not valid; choose one of {', '.join(valid)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible to PyTorch {torch.__version__}; use device='cpu' or 'auto'")
    return device


@dataclass(frozen=True)
class Runtime:
    """Where and how training steps and evaluation passes compute: the device, bf16 autocast
    (`amp`) and channels_last memory (both on CUDA only). `Runtime.of(cfg)` reads them from a task
    configuration."""

    device: str = "cpu"
    amp: bool = True
    channels_last: bool = False

    @classmethod
    def of(cls, cfg) -> "Runtime":
        return cls(cfg.device, cfg.amp, getattr(cfg, "channels_last", False))  # E2's MLP has no channels_last setting

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16) if (self.amp and self.cuda) else nullcontext()

    def prepare_model(self, model):
        """`model` with channels_last weights when that is on (CUDA); returns it."""
        import torch

        return model.to(memory_format=torch.channels_last) if self.channels_last and self.cuda else model

    def prepare(self, x):
        """A (B, C, H, W) batch in channels_last memory when that is on (CUDA); anything else unchanged."""
        import torch

        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and self.cuda and x.dim() == 4 else x


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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run_info(device: str = "cpu") -> dict:
    """Git commit, library versions and the device, so each reported number can be traced and rerun."""
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
    return info
