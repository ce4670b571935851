"""Atomic file writes shared by checkpoints, metrics and caches.

A write goes to `.<name>.tmp<pid>` in the same folder, is flushed and fsynced, then renamed over
the target: readers see the old file or the new one, never half of one. When the write fails
(e.g. the disk is full) the temporary file is removed and the error names the target path; a
temporary file left by a killed process is removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Callable

from helpers.errors import ProjectError

_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], None],
    verify: Callable[[Path], None] | None = None,
    keep_previous: Path | None = None,
) -> None:
    """Call `write(handle)` on a temporary file next to `path`, then rename it to `path`.

    `verify(temporary path)` (e.g. read it back) runs before the rename and may raise to keep the
    old file; `keep_previous`: the old `path` is moved there first, so one earlier version stays.
    Any failure removes the temporary file (`path` keeps its old content); an OSError (disk full,
    permissions) is raised again as an OSError of the same errno whose message names `path`, and a
    Ctrl-C stays a KeyboardInterrupt."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify is not None:
            verify(tmp)
        if keep_previous is not None and path.is_file():
            os.replace(
                path, keep_previous
            )  # (a crash before the next line leaves only the previous: loaders fall back to it)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ProjectError):  # (e.g. a file that did not read back: already says what happened)
            raise
        if not isinstance(exc, KeyboardInterrupt) and _caused_by_interrupt(exc):
            raise KeyboardInterrupt from exc  # torch's writer turns a Ctrl-C into "unexpected pos"
        failure = _as_os_error(exc)
        if failure is not None:
            raise OSError(failure.errno, f"could not write {path}: {failure.strerror or failure}") from exc
        raise


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself, or the one another error was raised from."""
    if isinstance(exc, OSError):
        return exc
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, OSError) else None


def atomic_torch_save(
    obj, path: str | Path, verify: Callable[[Path], None] | None = None, keep_previous: Path | None = None
) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle), verify, keep_previous)


def atomic_write_json(obj, path: str | Path) -> None:
    text = json.dumps(obj, indent=1, default=_json_default).encode()
    atomic_write(path, lambda handle: handle.write(text))


def atomic_save_npy(path: str | Path, array) -> None:
    import numpy as np

    atomic_write(path, lambda handle: np.save(handle, array))


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _writer_alive(pid: int, written_at: float) -> bool:
    """Whether process `pid` may still be writing a file last modified at `written_at`: it exists
    and (where /proc tells) started before that time; a reused pid of a younger process does not count."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    started = _process_start(pid)
    return started is None or started <= written_at + 2.0  # (boot time has whole seconds)


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of a process from /proc (Linux); None where unknown."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files under `folder` whose writing process is gone (a run killed
    mid-write, or a pid now reused by a younger process); returns the removed paths. Files of live
    writers are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not _writer_alive(int(match.group(1)), path.stat().st_mtime):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
