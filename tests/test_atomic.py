"""Atomic writes: all or nothing, named errors, Ctrl-C kept as Ctrl-C, stale temporaries removed."""

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers.atomic import atomic_torch_save, atomic_write, atomic_write_json, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json({"old": 1}, target)

    def no_space(handle):
        handle.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"could not write {target}: No space left on device") as info:
        atomic_write(target, no_space)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text().startswith('{\n "old"') and os.listdir(tmp_path) == ["m.json"]


def test_ctrl_c_wrapped_by_torch_stays_a_keyboard_interrupt(tmp_path):
    target = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, target)

    def interrupted_inside_torch(handle):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted_inside_torch)
    assert torch.load(target) == {"epoch": 1} and os.listdir(tmp_path) == ["last.pt"]


def test_real_ctrl_c_during_a_large_torch_save(tmp_path):
    target = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, target)
    big = {"w": torch.zeros(30_000_000)}
    threading.Timer(0.01, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    try:
        atomic_torch_save(big, target)
        time.sleep(0.2)  # the save won the race: the signal lands here
    except KeyboardInterrupt:
        assert torch.load(target) == {"epoch": 1}, "the old checkpoint is kept"
    else:  # pragma: no cover - depends on the disk's speed
        pytest.skip("the save finished before the signal")
    assert os.listdir(tmp_path) == ["last.pt"], "no temporary file is left"


def test_stale_temporaries_dead_and_reused_pids(tmp_path):
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    stale = tmp_path / f".last.pt.tmp{dead}"
    mine = tmp_path / f".best.pt.tmp{os.getpid()}"
    reused = tmp_path / ".metrics.json.tmp1"  # pid 1 is alive, but the file is older than it
    for path in (stale, mine, reused):
        path.write_bytes(b"x")
    os.utime(reused, (1_000_000, 1_000_000))  # 1970: before any process now running started
    other = tmp_path / "sub" / "keep.tmp5"  # not one of our temporary names
    other.parent.mkdir()
    other.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, reused])
    assert mine.exists() and other.exists()
