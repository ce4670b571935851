"""Executing one notebook for the pipeline: papermill in a worker thread, Ctrl-C passed on to the
kernel at the right moment, and the HTML copy written atomically.

A Jupyter kernel runs in a session of its own, so a terminal's Ctrl-C reaches the pipeline, not
the kernel; and ipykernel acts on SIGINT only while it runs a cell. `KernelInterrupter` therefore
forwards a press while a cell executes (a training then saves its state and stops, see
helpers.engine), and a press that comes while no cell runs (kernel start-up, between cells) stops
the notebook before its next cell (`NotebookStopped`).
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class NotebookStopped(Exception):
    """Ctrl-C came while no cell was running: the notebook was stopped before its next cell."""


class KernelInterrupter:
    """SIGINT handler of a pipeline run. While a cell runs, the first press interrupts it (a
    training saves its state and stops after its current step), the second interrupts it again (the
    training stops at once), a third kills the kernel. Between notebooks a press raises
    KeyboardInterrupt in the pipeline itself."""

    def __init__(self, log):
        self.log = log
        self.signum = 0  # the first signal received: SIGINT (Ctrl-C) or SIGTERM, each handled as a press
        self.presses = self.forwarded = 0
        self.running = ""  # the notebook being executed, "" between notebooks
        self.cell_running = False  # between sending a cell and its reply
        self.kernel_manager = None  # set by the TrackedKernelManager of the running notebook

    def start(self, step: str) -> None:
        self.running, self.presses, self.forwarded, self.cell_running, self.kernel_manager = step, 0, 0, False, None

    def stop(self) -> None:
        self.running, self.cell_running, self.kernel_manager = "", False, None

    @property
    def killed(self) -> bool:
        return self.forwarded >= 3

    def __call__(self, signum, frame):
        self.signum = self.signum or signum
        if not self.running:
            raise KeyboardInterrupt
        self.presses += 1
        if self.presses == 1:
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.log(f"\n[pipeline] {what}: asking {self.running} to save its state and stop (again: stop at once)")
        self.forward()

    def forward(self) -> None:
        """Pass on the presses not passed on yet: SIGINT while a cell runs, SIGKILL from the third on."""
        pid = getattr(getattr(self.kernel_manager, "provisioner", None), "pid", None)
        while pid is not None and self.forwarded < self.presses and (self.cell_running or self.presses >= 3):
            self.forwarded += 1
            try:
                os.killpg(pid, signal.SIGINT if self.forwarded < 3 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    # nbclient hooks (called in the worker thread)
    def before_cell(self, cell, cell_index: int) -> None:
        if self.presses:  # a press that found no running cell, or one the finished cell outran
            raise NotebookStopped(f"stopped by Ctrl-C before cell {cell_index}")

    def cell_sent(self, cell, cell_index: int) -> None:
        self.cell_running = True
        self.forward()

    def cell_done(self, cell, cell_index: int, execute_reply=None) -> None:
        self.cell_running = False

    def client_options(self) -> dict:
        """papermill/nbclient options that connect the running notebook to this handler."""

        handler = self

        class TrackedKernelManager(kernel_manager_class()):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                handler.kernel_manager = self

        return {
            "kernel_manager_class": TrackedKernelManager,
            "on_cell_execute": self.before_cell,
            "on_cell_complete": self.cell_sent,
            "on_cell_executed": self.cell_done,
        }


def kernel_manager_class():
    """jupyter_client's kernel manager, talking to the kernel over local IPC sockets (POSIX) instead of
    TCP: nothing leaves the machine, and ipykernel 7 has no "running over TCP without encryption"
    warning to print into every run's log. (Windows has no IPC transport: TCP there.)

    It shuts a kernel down without the SIGINT jupyter_client sends first: a notebook's cells have all
    replied by then, but a kernel still finishing its last reply (a busy machine) takes that SIGINT
    in its message handler and logs "KeyboardInterrupt caught in kernel." into the run's output. A
    running cell is stopped by the pipeline's own interrupter, and a kernel that does not exit by
    SIGTERM and SIGKILL, as before."""
    from jupyter_client.manager import AsyncKernelManager

    from jupyter_core.paths import jupyter_runtime_dir

    class QuietShutdownKernelManager(AsyncKernelManager):
        async def _async_interrupt_kernel(self) -> None:
            if getattr(self, "shutting_down", False):
                return
            await super()._async_interrupt_kernel()

    if os.name == "nt" or len(jupyter_runtime_dir()) > 60:  # (a socket path must stay under ~107 bytes)
        return QuietShutdownKernelManager

    class IPCKernelManager(QuietShutdownKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

    return IPCKernelManager


def execute(source: Path, executed: Path, parameters: dict, cwd: Path, interrupter: KernelInterrupter | None) -> None:
    """papermill.execute_notebook. With an interrupter (POSIX, main thread) papermill runs in a
    worker thread, where nbclient installs no signal handler that would shut the kernel down,
    while this thread waits and passes Ctrl-C on to the kernel."""
    import papermill

    # start_timeout: papermill's 60 s was not enough for a kernel importing PyTorch on a 2-core machine
    # busy with two other such processes ("Kernel didn't respond in 60 seconds", a failed notebook)
    options = dict(parameters=parameters, kernel_name="python3", cwd=str(cwd), progress_bar=False, start_timeout=300)
    if interrupter is None:
        papermill.execute_notebook(str(source), str(executed), **options, kernel_manager_class=kernel_manager_class())
        return
    interrupter.start(source.stem)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(
                papermill.execute_notebook, str(source), str(executed), **options, **interrupter.client_options()
            )
            while True:
                try:
                    return future.result(timeout=0.2)
                except TimeoutError:
                    continue
    finally:
        interrupter.stop()


def write_html(executed: Path, html: Path) -> None:
    """The executed notebook as HTML, written atomically (never a truncated page)."""
    import nbformat
    from nbconvert import HTMLExporter

    from helpers.atomic import atomic_write

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    data = body.encode("utf-8")
    atomic_write(html, lambda handle: handle.write(data))
