"""Atomic file writes shared by checkpoints, metrics and caches.

A write goes to `.<name>.tmp<pid>` in the same folder, is flushed and fsynced, then renamed over
the target: readers see the old file or the new one, never half of one. When the write fails
(e.g. the disk is full) the temporary file is removed and the error names the target path; a
temporary file left by a killed process is removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Callable, IO

import numpy as np

_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(handle)` on a temporary file next to `path`, then rename it to `path`.

    Any failure removes the temporary file; an OSError (disk full, permissions) is raised again
    as an OSError of the same errno whose message names `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failure = _as_os_error(exc)
        if failure is not None:
            raise OSError(failure.errno, f"could not write {path}: {failure.strerror or failure}") from exc
        raise


def _as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself, or the one torch/numpy wrapped in a RuntimeError."""
    if isinstance(exc, OSError):
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return cause
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():  # torch's PytorchStreamWriter hides the errno
        return OSError(errno.EIO, f"{str(exc).splitlines()[0]} (is the disk full?)")
    return None


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(obj, path: str | Path) -> None:
    text = json.dumps(obj, indent=1, default=_json_default).encode()
    atomic_write(path, lambda handle: handle.write(text))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files under `folder` whose writing process is gone (a run killed
    mid-write); returns the removed paths. Files of live processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
