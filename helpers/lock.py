"""One writer per folder: an OS-level lock that a run holds on its checkpoint folder (and the
pipeline on its --out) for as long as it runs.

The lock is `flock` on `<folder>/<name>` (Windows: `msvcrt.locking`), so the operating system
releases it when the holder dies, however it dies: a lock file left by a dead process is simply
taken over. The file holds who has the lock (pid, host, start time, command), which is what a
second run into the same folder is told, in one line, instead of silently mixing its files with
the first one's. A process may take the same lock again (re-entrant), e.g. a notebook cell rerun.
Where the file system cannot lock (some network mounts), a notice says so and the run goes on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from helpers.errors import FolderInUse, OutputError

RUN_LOCK = ".run.lock"  # a run's checkpoint folder
PIPELINE_LOCK = ".pipeline.lock"  # the pipeline's --out

_HELD: dict[Path, list] = {}  # lock path -> [file descriptor, times taken] in this process


def holder_info() -> dict:
    """What the lock file says of its holder."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200],
    }


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting: True, False when another process has it."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def describe_holder(path: Path) -> str:
    """ "pid 123 on host h, started ... (command)" from a lock file, or what is known."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


class FolderLock:
    """`with FolderLock(folder, what="run"):` holds `folder`/RUN_LOCK; FolderInUse when a live
    process holds it, OutputError when the folder cannot be written."""

    def __init__(
        self, folder: str | Path, name: str = RUN_LOCK, what: str = "run", remedy: str = "use another out_dir"
    ):
        self.folder, self.what, self.remedy = Path(folder), what, remedy
        self.path = (self.folder / name).absolute()

    def acquire(self) -> "FolderLock":
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(
                f"cannot write to {self.folder} ({exc.strerror or exc}); choose a writable folder"
            ) from None
        try:
            locked = _try_lock(fd)
        except OSError as exc:  # e.g. ENOLCK / EOPNOTSUPP on a network file system
            from helpers.runinfo import notice

            notice(
                f"{self.folder}: this file system cannot lock files ({exc.strerror or exc}); a second {self.what} into it would not be detected"
            )
            locked = True
        if not locked:
            os.close(fd)
            raise FolderInUse(
                f"{self.folder} is in use by another {self.what}: {describe_holder(self.path)}. "
                f"Wait for it to finish (or stop it), or {self.remedy}."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        _HELD[self.path] = [fd, 1]
        return self

    def release(self) -> None:
        held = _HELD.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            try:
                _unlock(held[0])
            finally:
                os.close(held[0])

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
