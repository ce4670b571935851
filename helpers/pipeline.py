"""One command regenerates everything for a profile: every notebook executed with papermill, its
HTML, the metrics JSON and figures it writes, and the two-page report built from them.

    python -m helpers.pipeline --profile smoke --out outputs/smoke
    python -m helpers.pipeline --profile full --out outputs/full --data-dir data --device cuda
    python -m helpers.pipeline --profile smoke --out outputs/smoke --only T1,T4 --resume
    python -m helpers.pipeline --profile cpu --data-dir data --budget 90m            # real data, finished in 90 minutes
    python -m helpers.pipeline --profile full --data-dir data --device cuda --plan   # predicted wall time only
    python -m helpers.pipeline --profile full --data-dir data --device cuda --gpus 4   # training under torchrun (README: Several GPUs)

Notebooks run in dependency order (T2 before T3 before T4: T3 reads T2's metrics, T4 reads T3's
selection and checkpoint). A failing notebook is reported with its failing cell (an OS error such
as a full disk with the path it could not write); what does not depend on it still runs; the exit
status is then non-zero and OUT/pipeline.json is written whatever happens. Ctrl-C or SIGTERM (Slurm's
time limit, `docker stop`) asks the running notebook to save its training state and stop (a second
one stops it at once), marks it `interrupted`, runs nothing more and exits with status 130 (143 for
SIGTERM); `--resume` then continues it. The pipeline holds a lock on OUT while it runs: a second
pipeline into the same folder is refused with one line naming the first.
`--resume` skips a notebook whose executed copy, HTML and complete metrics are all newer than its
inputs (the notebook, the helpers package, the metrics of the notebooks it depends on), and whose
metrics record the configuration and data this run would use (else it reruns, saying what changed). `--plan` measures a few training steps of every model
on the device and predicts each notebook's wall time (helpers.plan) without running anything; it
writes OUT/plan.json (a notebook whose dataset is missing is named there, the rest is planned; exit
status 1), and a later run of the same profile records each notebook's prediction beside its
measured time in pipeline.json. `--budget 90m` (s, m or h) plans the same way, then shares the
budget out over every training in the profile's proportions (helpers.budget_split), passes each
its seconds (budget_s, T4's cls_budget_s / emb_budget_s, E2's pretrain_budget_s) and records each
notebook's share, planned and measured seconds in pipeline.json. After each notebook the seconds
left are split again over the notebooks still to run (what one took more or less than planned is
carried forward; on `--resume` the recorded split is kept). A budget too small for one
evaluated epoch of every training is refused before anything runs, naming the smallest that works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from helpers.atomic import atomic_write_json, remove_stale_temporaries
from helpers.budget_split import parse_duration
from helpers.errors import OutputError, ProjectError, SettingsError
from helpers.execution import KernelInterrupter, NotebookStopped, execute, write_html
from helpers.lock import PIPELINE_LOCK, FolderLock
from helpers.tasks import STEPS, Step  # noqa: F401 (Step: importable from here too)
from helpers.runinfo import DEVICES, PACKAGE_DIR, PRECISIONS, PROFILES, absolute_env_paths, project_root

INTERRUPTED_EXIT = 130  # the shell's status for a command stopped by Ctrl-C
TERMINATED_EXIT = 143  # ... and by SIGTERM


def select_steps(only: str | None) -> list[Step]:
    """Steps named by a comma-separated list of prefixes ("T1,T4" or full names); all by default."""
    if not only:
        return list(STEPS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = []
    for w in wanted:
        matches = [s for s in STEPS if s.name == w or s.name.split("_")[0] == w]
        if not matches:
            raise SettingsError(
                f"--only: {w!r} names no notebook; valid: {', '.join(s.name.split('_')[0] for s in STEPS)}"
            )
        chosen += matches
    return [s for s in STEPS if s in chosen]


def outputs_of(out: Path, step: Step) -> list[Path]:
    return [
        out / "notebooks" / f"{step.name}.ipynb",
        out / "notebooks" / f"{step.name}.html",
        out / "metrics" / f"{step.name}.json",
    ]


def newest_input(notebook: Path, out: Path, step: Step) -> float:
    package = max(p.stat().st_mtime for p in PACKAGE_DIR.rglob("*.py"))
    deps = [out / "metrics" / f"{d}.json" for d in step.needs]
    return max([notebook.stat().st_mtime, package] + [d.stat().st_mtime for d in deps if d.is_file()])


def is_complete(out: Path, step: Step, notebook: Path, profile: str, parameters: dict | None = None) -> bool:
    """Whether --resume may keep a notebook's outputs (see stale_reason)."""
    return not stale_reason(out, step, notebook, profile, parameters)


def stale_reason(out: Path, step: Step, notebook: Path, profile: str, parameters: dict | None = None) -> str:
    """Why a notebook's outputs cannot be kept ("" when they can): all outputs present, newer than
    every input, produced by this profile, the metrics not partial, the executed notebook free of
    errors and, given the pipeline's `parameters`, the metrics' configuration and data fingerprint
    the same as this run's."""
    paths = outputs_of(out, step)
    if not all(p.is_file() for p in paths):
        return "outputs missing"
    try:
        metrics = json.loads(paths[2].read_text())
        executed = json.loads(paths[0].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "outputs unreadable"
    if not isinstance(metrics, dict) or not isinstance(executed, dict):
        return "outputs unreadable"
    if metrics.get("profile") != profile or metrics.get("complete") is False:
        return "metrics of another profile or partial"
    if executed.get("metadata", {}).get("papermill", {}).get("exception"):
        return "the notebook raised an error"
    if min(p.stat().st_mtime for p in paths) <= newest_input(notebook, out, step):
        return "inputs changed since"
    return configuration_changes(step, metrics, parameters) if parameters is not None else ""


def configuration_changes(step: Step, metrics: dict, parameters: dict) -> str:
    """What differs between the configuration and data a notebook's metrics record and what the
    notebook would use now with the pipeline's `parameters` ("" when nothing does)."""
    changes, _ = _differences(step, metrics, parameters)
    return ("changed: " + "; ".join(changes)) if changes else ""


def retrains_afresh(out: Path, step: Step, parameters: dict) -> bool:
    """Whether what changed since a notebook's metrics were written defines its trained models (data,
    model, recipe: its checkpoints can no longer be resumed), not only where or how it runs."""
    try:
        metrics = json.loads((out / "metrics" / f"{step.name}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and _differences(step, metrics, parameters)[1]


def _differences(step: Step, metrics: dict, parameters: dict) -> tuple[list[str], bool]:
    """(what changed, as "name old -> new", and whether any of it is part of the runs' identity)."""
    from helpers.config import config_class
    from helpers.experiment import TASK_DATA, data_fingerprint

    if step.task not in TASK_DATA:
        return [], False
    cls = config_class(step.task)
    names = {f.name for f in dataclasses.fields(cls)} - {"task", "profile"}
    cfg = cls.build(step.task, parameters["profile"], **{k: v for k, v in parameters.items() if k in names})
    saved = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    if saved:  # (fields it predates count at the value it was trained with, where that is known)
        saved = {k: v for k, v in cls.older_values().items() if k not in saved} | saved
    changed = {
        k: f"{k} {saved.get(k)!r} -> {v!r}"
        for k, v in cfg.as_dict().items()
        if k not in ("resume", *cls.RESOLVED_BY_TASK) and _plain(saved.get(k)) != _plain(v)
    }
    recorded = (metrics.get("data") or {}).get("fingerprint") if isinstance(metrics.get("data"), dict) else None
    data_changed = recorded != data_fingerprint(cfg)
    changes = list(changed.values()) + (
        [f"the data under {cfg.data_dir} (file list and sizes)"] if data_changed else []
    )
    return changes, data_changed or bool(set(changed) - set(cls.runtime_keys()))


def _plain(value):
    """A configuration value as its JSON form (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value


INTERRUPT_NAMES = ("TrainingInterrupted", "KeyboardInterrupt")


def failure_summary(exc: BaseException, written: Path | None = None) -> str:
    """One line naming the failing cell and the error, from a papermill execution error; an
    OSError of the pipeline's own writes (e.g. a full disk) names the path it was writing."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        code = [line for line in (exc.source or "").splitlines() if line.strip() and not line.lstrip().startswith("#")]
        where = f"cell {exc.cell_index} of the executed notebook" + (f" (`{code[0].strip()[:60]}`)" if code else "")
        return f"{where} raised {exc.ename}: {exc.evalue}"
    if isinstance(exc, OSError) and not exc.filename and written is not None:
        return f"{type(exc).__name__}: {exc} (while writing {written})"
    return f"{type(exc).__name__}: {exc}"


def run_step(
    step: Step,
    out: Path,
    parameters: dict,
    notebooks_dir: Path,
    html_pool=None,
    interrupter: KernelInterrupter | None = None,
) -> tuple[str, str]:
    """Execute one notebook and render its HTML (in `html_pool` when given); returns (status,
    message), status "ok", "failed" or "interrupted". Never raises for a notebook's failure."""
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    executed = out / "notebooks" / f"{step.name}.ipynb"
    metrics = out / "metrics" / f"{step.name}.json"
    metrics.unlink(missing_ok=True)  # a failed run must not leave an older run's metrics behind
    import papermill

    declared = papermill.inspect_notebook(str(notebooks_dir / f"{step.name}.ipynb"))
    parameters = {k: v for k, v in parameters.items() if k in declared or k != "gpus"}  # (E2 trains on one GPU)
    try:
        execute(notebooks_dir / f"{step.name}.ipynb", executed, parameters, notebooks_dir, interrupter)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
        pressed = interrupter is not None and interrupter.presses > 0  # whatever broke after a Ctrl-C, it was stopped
        interrupted = (
            pressed
            or isinstance(exc, NotebookStopped)
            or (isinstance(exc, PapermillExecutionError) and exc.ename in INTERRUPT_NAMES)
        )
        message = failure_summary(exc, executed)
        if isinstance(exc, DeadKernelError) and pressed:
            message = "the kernel was killed by a third Ctrl-C; checkpoints written before are kept"
        try:
            if executed.is_file():
                write_html(executed, executed.with_suffix(".html"))
        except Exception as html_exc:  # noqa: BLE001 - e.g. the executed copy is truncated (disk full): keep the first error
            message += f" (no HTML: {type(html_exc).__name__}: {str(html_exc)[:120]})"
        return ("interrupted" if interrupted else "failed"), message
    if html_pool is not None:  # the next notebook's kernel runs meanwhile; errors are collected at the end
        html_pool.futures[step.name] = html_pool.submit(write_html, executed, executed.with_suffix(".html"))
    else:
        write_html(executed, executed.with_suffix(".html"))
    if not metrics.is_file():
        return "failed", f"ran, but wrote no {metrics}"
    if json.loads(metrics.read_text()).get("complete") is False:
        return "failed", f"{metrics} holds partial results (an interrupted training); rerun with --resume"
    return "ok", str(metrics)


def load_plan(out: Path, profile: str) -> dict | None:
    """OUT/plan.json when it was made for this profile, else None."""
    try:
        plan = json.loads((out / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return plan if plan.get("profile") == profile else None


def make_plan(
    profile: str,
    out: str | Path,
    only: str | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    log=print,
) -> dict:
    """Predict every selected notebook's wall time; writes OUT/plan.json and returns the plan."""
    from helpers.plan import format_plan, plan_pipeline

    if profile not in PROFILES:
        raise SettingsError(f"profile={profile!r} is not valid; choose one of {', '.join(PROFILES)}")
    out = check_output_folder(Path(out))
    plan = plan_pipeline(profile, [s.name for s in select_steps(only)], data_dir, device, out, log=log)
    plan.pop("work")
    atomic_write_json(plan, out / "plan.json")
    log(format_plan(plan))
    log(
        f"[pipeline] plan written to {out / 'plan.json'}; a run of this profile into {out} records it beside the measured times"
    )
    return plan


def run(
    profile: str,
    out: str | Path,
    only: str | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    resume: bool = False,
    report: bool = True,
    log=print,
    precision: str | None = None,
    gpus: int = 1,
    budget_s: float = 0.0,
) -> dict:
    """Run the pipeline; returns {"steps": {name: {...}}, "report": path or None, "ok": bool,
    "interrupted": bool, "signal": "SIGINT" / "SIGTERM" when one stopped it}. OUT/pipeline.json is
    written whatever happens (Ctrl-C and SIGTERM included). Everything a user can get wrong (the
    profile, OUT, the device, the precision) is checked before any notebook starts; OUT is locked
    while the pipeline runs (FolderInUse for a second one)."""
    if profile not in PROFILES:
        raise SettingsError(f"profile={profile!r} is not valid; choose one of {', '.join(PROFILES)}")
    steps = select_steps(only)
    check_pipeline_tools()
    out = check_output_folder(Path(out))
    if device:
        from helpers.runinfo import resolve_device

        resolve_device(device)  # e.g. --device cuda without a GPU: say so now, not in every kernel
    if precision and precision not in PRECISIONS:
        raise SettingsError(f"--precision {precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    if budget_s and gpus != 1:
        raise SettingsError(
            f"--budget cannot be combined with --gpus {gpus} (a budget is planned from one process's step times); give epochs"
        )
    with FolderLock(out, PIPELINE_LOCK, what="pipeline", remedy="use another --out"):
        return _run(profile, out, steps, data_dir, device, resume, report, log, precision, gpus, only, budget_s)


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under `folder` (files that vanish meanwhile are skipped)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def check_pipeline_tools() -> None:
    """papermill, nbconvert and a Jupyter kernel (the `pipeline` extra): a SettingsError saying how to install them."""
    import importlib.util

    missing = [name for name in ("papermill", "nbconvert", "ipykernel") if importlib.util.find_spec(name) is None]
    if missing:
        raise SettingsError(
            f"the pipeline runs notebooks with {', '.join(missing)}, which are not installed: pip install -e '.[pipeline]'"
        )


def check_output_folder(out: Path) -> Path:
    """`out` made absolute and created, with its subfolders; an OutputError (one line) when it is a
    file, lies under one, or cannot be written."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder for the pipeline's outputs")
    try:
        for sub in ("notebooks", "metrics", "figures"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"--out {out} cannot be written ({exc.strerror or exc}); choose a writable folder") from None
    return out


# the report's allowance in a budget: the last notebook's HTML export, then two pages from the metrics
# (measured on a 2-core EPYC, matplotlib already imported by the planning: 1.0 s for 2 notebooks, 2.6 s for 6)
REPORT_BASE_S, REPORT_PER_NOTEBOOK_S = 1.5, 0.5


def report_seconds(notebooks: int) -> float:
    return REPORT_BASE_S + REPORT_PER_NOTEBOOK_S * notebooks


def earlier_shares(out: Path, profile: str, budget_s: float, steps: list) -> dict | None:
    """The budget split an earlier run into `out` recorded in pipeline.json, when it was of this
    profile and budget and covered these notebooks (so --resume continues its trainings); else None."""
    try:
        earlier = json.loads((out / "pipeline.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    shared = earlier.get("budget") if isinstance(earlier, dict) else None
    if earlier.get("profile") != profile or not isinstance(shared, dict) or shared.get("budget_s") != budget_s:
        return None
    if not {s.name for s in steps} <= set(shared.get("notebooks", {})):
        return None
    return {k: v for k, v in shared.items() if k != "measured_seconds"}


def share_budget(
    profile: str, out: Path, steps: list, data_dir, device, budget_s: float, started: float, log
) -> tuple[dict, dict]:
    """Plan the selected notebooks (measured step, evaluation and t-SNE times on this device) and
    share `budget_s` out (helpers.budget_split); BudgetTooSmall before anything runs. Returns the
    split and what it was made from ({notebook: NotebookWork}, to split the rest again as it runs)."""
    from helpers.budget_split import format_seconds, split_budget
    from helpers.plan import plan_pipeline

    log(f"[pipeline] planning a budget of {format_seconds(budget_s)}: measuring every training on this device ...")
    plan = plan_pipeline(profile, [s.name for s in steps], data_dir, device, out, log=log, budget_s=budget_s)
    planning = time.perf_counter() - started
    work = plan.pop("work")
    report_s = report_seconds(len(work))
    shared = split_budget(work, budget_s, reserved_s=planning + report_s)
    shared |= {
        "budget_s": budget_s,
        "planning_seconds": round(planning, 1),
        "report_seconds": report_s,
        "missing": plan.get("missing", {}),
    }
    for name, n in shared["notebooks"].items():
        settings = ", ".join(f"{k}={v:g}" for k, v in n["parameters"].items())
        log(
            f"[pipeline]   {name:22s} {100 * n['share']:5.1f} %  {format_seconds(n['planned_seconds']):>9s}  ({settings})"
        )
    log(
        f"[pipeline] planned {format_seconds(shared['planned_seconds'])} of {format_seconds(budget_s)} (planning took {planning:.0f} s; "
        f"each training runs {shared['fraction']:.3g} x its profile's epochs)"
    )
    return shared, {n.name: n for n in work}


def carry_forward(shared: dict, work: dict, later: list[str], seconds_left: float, log) -> None:
    """Split the `seconds_left` of the budget again over the `later` notebooks (in `shared`, in
    place): what the notebooks so far took more or less than planned is theirs to give or to make up."""
    from helpers.budget_split import split_rest

    rest = [work[name] for name in later if name in work]
    if not rest:
        return
    planned = sum(shared["notebooks"][n.name]["planned_seconds"] for n in rest)
    again = split_rest(rest, seconds_left, shared["budget_s"])
    for name, entry in again["notebooks"].items():
        shared["notebooks"][name] = entry
    if abs(seconds_left - planned) >= 1.0:
        log(
            f"[pipeline] {seconds_left - planned:+.0f} s against the plan so far: the budget of "
            + ", ".join(f"{name} is now {entry['planned_seconds']:.0f} s" for name, entry in again["notebooks"].items())
        )


def _run(profile, out: Path, steps, data_dir, device, resume, report, log, precision, gpus, only, budget_s=0.0) -> dict:
    stale = remove_stale_temporaries(out)
    if stale:
        log(f"[pipeline] removed {len(stale)} temporary file(s) left by a killed run, e.g. {stale[0]}")
    notebooks_dir = project_root() / "notebooks"
    # without --resume everything is regenerated: no earlier checkpoint is continued
    parameters = {"profile": profile, "out_dir": str(out), "resume": resume}
    if data_dir:
        parameters["data_dir"] = str(Path(data_dir).resolve())
    if device:
        parameters["device"] = device
    if precision:
        parameters["precision"] = precision
    if gpus != 1:
        from helpers.distributed import check_gpus

        if gpus < 1:
            raise SettingsError(f"--gpus {gpus} is not valid; use 1 or more")
        check_gpus(gpus, device or "cuda")
        parameters["gpus"] = gpus
    status: dict[str, dict] = {}
    started = time.perf_counter()
    shared, work = None, {}
    if budget_s:
        shared = earlier_shares(out, profile, budget_s, steps) if resume else None
        if shared is not None:  # (a new split would give every training another budget_s: nothing could be resumed)
            log(f"[pipeline] --resume: the shares of the {budget_s:.0f} s budget planned by the run this continues")
        else:
            shared, work = share_budget(profile, out, steps, data_dir, device, budget_s, started, log)
    plan = None if shared else load_plan(out, profile)
    predicted = {name: n["predicted_seconds"] for name, n in (plan or {}).get("notebooks", {}).items()}
    summary = {
        "profile": profile,
        "out": str(out),
        "only": only,
        "report_requested": report,
        "parameters": parameters,
        "steps": status,
        "report": None,
        "ok": False,
        "interrupted": False,
    }
    if shared:
        summary["budget"] = shared
        predicted = {name: n["planned_seconds"] for name, n in shared["notebooks"].items()}
    (out / "pipeline.json").unlink(missing_ok=True)  # if it cannot be written at the end, no older one may look current
    interrupter = (
        KernelInterrupter(log)
        if threading.current_thread() is threading.main_thread() and hasattr(os, "killpg")
        else None
    )
    previous_handler = signal.signal(signal.SIGINT, interrupter) if interrupter is not None else None
    previous_term = signal.signal(signal.SIGTERM, interrupter) if interrupter is not None else None
    html_pool = ThreadPoolExecutor(max_workers=1)  # the HTML of one notebook renders while the next runs
    html_pool.futures = {}
    current = None  # what runs in this process when a Ctrl-C raises here
    try:
        for index, step in enumerate(steps):
            notebook = notebooks_dir / f"{step.name}.ipynb"
            broken = [d for d in step.needs if status.get(d, {}).get("status") not in (None, "ok", "up to date")]
            tic = time.perf_counter()
            current = step.name
            budgets = shared["notebooks"].get(step.name, {}).get("parameters", {}) if shared else {}
            unplanned = shared["missing"].get(step.name) if shared else None
            if broken:
                result = {"status": "skipped", "message": f"depends on {', '.join(broken)}, which did not complete"}
            elif unplanned:  # (it has no share of the budget: its kernel would fail on the same check, or overrun)
                result = {"status": "skipped", "message": f"not planned for the budget: {unplanned}"}
            elif resume and not (why := stale_reason(out, step, notebook, profile, parameters | budgets)):
                result = {"status": "up to date", "message": "outputs newer than inputs, same configuration and data"}
            else:
                given = parameters | budgets
                if resume and why.startswith("changed"):
                    # (its checkpoints were trained as before the change: continuing them would be refused)
                    afresh = retrains_afresh(out, step, given)
                    given |= {"resume": False} if afresh else {}
                    log(f"[pipeline] {step.name}: rerunning{' afresh' if afresh else ''}, {why}")
                log(f"[pipeline] running {step.name} ...")
                state, message = run_step(step, out, given, notebooks_dir, html_pool, interrupter)
                result = {"status": state, "message": message}
            status[step.name] = result | {"seconds": round(time.perf_counter() - tic, 1)}
            current = None
            if step.name in predicted and result["status"] != "up to date":
                status[step.name]["predicted_seconds"] = predicted[step.name]
                if shared:
                    status[step.name]["share"] = shared["notebooks"][step.name]["share"]
            log(f"[pipeline] {step.name}: {result['status']} ({status[step.name]['seconds']} s) {result['message']}")
            if result["status"] == "interrupted" or (interrupter is not None and interrupter.presses):
                summary["interrupted"] = True
                break
            if work:
                left = budget_s - (time.perf_counter() - started) - shared["report_seconds"]
                carry_forward(shared, work, [s.name for s in steps[index + 1 :]], left, log)
                predicted |= {name: n["planned_seconds"] for name, n in shared["notebooks"].items()}
        current = "HTML export"
        wait(html_pool.futures.values())
        current = None
        if report and not summary["interrupted"]:
            from helpers.report import build_report

            current = "report"
            try:
                summary["report"] = str(build_report(out))
                log(f"[pipeline] report: {summary['report']}")
            except Exception as exc:  # noqa: BLE001
                status["report"] = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
                log(f"[pipeline] report failed: {exc}")
            current = None
    except KeyboardInterrupt:  # Ctrl-C while no notebook was running (dependency checks, HTML, report)
        summary["interrupted"] = True
        if current in [s.name for s in steps] and current not in status:
            status[current] = {"status": "interrupted", "message": "Ctrl-C before its kernel started", "seconds": 0.0}
        elif current == "report":
            status["report"] = {"status": "interrupted", "message": "Ctrl-C while building the report"}
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
            signal.signal(signal.SIGTERM, previous_term)
        if interrupter is not None and interrupter.signum and summary["interrupted"]:
            summary["signal"] = signal.Signals(interrupter.signum).name
        try:  # (futures, not Thread.join: a join interrupted by Ctrl-C never waits again)
            wait(html_pool.futures.values())  # an HTML file is written whole or not at all
        except KeyboardInterrupt:
            summary["interrupted"] = True
        html_pool.shutdown(wait=False, cancel_futures=True)
        for name, future in html_pool.futures.items():
            if not future.done() or future.cancelled():
                status[name] = status[name] | {
                    "status": "interrupted",
                    "message": "Ctrl-C before its HTML copy was written",
                }
            elif future.exception() is not None:
                status[name] = status[name] | {
                    "status": "failed",
                    "message": f"HTML export failed: {future.exception()}",
                }
        for step in steps:
            if step.name not in status:
                status[step.name] = {
                    "status": "not run",
                    "message": "the pipeline was interrupted"
                    if summary["interrupted"]
                    else "the pipeline stopped early",
                }
        summary["ok"] = not summary["interrupted"] and all(s["status"] in ("ok", "up to date") for s in status.values())
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["output_mb"] = round(folder_bytes(out) / 2**20, 1)  # (Colab users keep OUT on a 15 GB Drive)
        if shared:
            shared["measured_seconds"] = summary["seconds"]
        if plan:
            ran = [name for name, s in status.items() if "predicted_seconds" in s]
            summary["plan"] = {
                "made": plan["run"]["time"],
                "predicted_seconds": round(sum(predicted[n] for n in ran), 1),
                "measured_seconds": round(sum(status[n]["seconds"] for n in ran), 1),
                "notebooks": ran,
            }
        try:
            atomic_write_json(summary, out / "pipeline.json")
        except OSError as exc:
            log(f"[pipeline] could not write the summary: {exc}")
            summary["summary_error"] = str(exc)
    return summary


def interrupted_line(summary: dict) -> str:
    """The one line a Ctrl-C or SIGTERM ends with: what was saved, how to go on (a command to paste)."""
    steps = summary["steps"]
    stopped = next((name for name, s in steps.items() if s["status"] == "interrupted"), None)
    done = [name for name, s in steps.items() if s["status"] in ("ok", "up to date")]
    options = ["--profile", summary["profile"], "--out", summary["out"]] + (
        ["--only", summary["only"]] if summary.get("only") else []
    )
    for key in ("data_dir", "device", "precision", "gpus"):
        if key in summary["parameters"]:
            options += [f"--{key.replace('_', '-')}", summary["parameters"][key]]
    if summary.get("budget"):
        options += ["--budget", f"{summary['budget']['budget_s']:g}s"]
    options += [] if summary.get("report_requested", True) else ["--no-report"]
    command = "python -m helpers.pipeline " + " ".join(shlex.quote(str(o)) for o in options + ["--resume"])
    if stopped is None:
        what = "no notebook was running"
    elif "TrainingInterrupted" in steps[stopped]["message"]:
        what = f"{stopped} saved its training state under {summary['out']}/checkpoints"
    else:
        what = f"{stopped} was stopped ({steps[stopped]['message'][:80]}); checkpoints written before are kept"
    kept = f"; finished: {', '.join(done)}" if done else ""
    return f"[pipeline] interrupted: {what}{kept}. Continue with: {command}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", choices=PROFILES)
    parser.add_argument("--out", default=None, help="output folder (default: outputs/<profile>)")
    parser.add_argument("--only", default=None, help="comma-separated notebooks, e.g. T1,T4 (default: all)")
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (default: each profile's)")
    parser.add_argument("--device", default=None, choices=DEVICES)
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="every notebook's precision (default: auto, see the README's 'Where it runs')",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="train T1-T4 and E1 on this many GPUs of this machine (torchrun; batch sizes are global)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip notebooks whose outputs are complete and up to date"
    )
    parser.add_argument("--no-report", action="store_true", help="do not build report.pdf")
    parser.add_argument(
        "--budget",
        default=None,
        help="finish the whole pipeline in this wall time, e.g. 90m, 1.5h, 600s: every training gets its share, planned from measured steps",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only predict each notebook's wall time from a few measured steps (writes OUT/plan.json)",
    )
    args = parser.parse_args(argv)
    absolute_env_paths()  # (relative HELPERS_* folders mean the user's directory, not the kernels' notebooks/)
    os.environ.setdefault("HELPERS_PROGRESS", "off")  # the kernels' bars: epoch lines instead of a saved "0/7" widget
    out = args.out or str(project_root() / "outputs" / args.profile)
    try:
        if args.plan:
            plan = make_plan(args.profile, out, args.only, args.data_dir, args.device)
            return 1 if plan.get("missing") else 0
        budget_s = parse_duration(args.budget) if args.budget is not None else 0.0
        summary = run(
            args.profile,
            out,
            args.only,
            args.data_dir,
            args.device,
            args.resume,
            not args.no_report,
            precision=args.precision,
            gpus=args.gpus,
            budget_s=budget_s,
        )
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        print(interrupted_line(summary), flush=True)
        return TERMINATED_EXIT if summary.get("signal") == "SIGTERM" else INTERRUPTED_EXIT
    if summary.get("plan"):
        print(
            f"[pipeline] predicted {summary['plan']['predicted_seconds']} s for the notebooks run, measured {summary['plan']['measured_seconds']} s"
        )
    if summary.get("budget"):
        b = summary["budget"]
        print(
            f"[pipeline] budget {b['budget_s']:.0f} s: planned {b['planned_seconds']:.0f} s, took {b['measured_seconds']:.0f} s "
            f"({100 * (b['measured_seconds'] / b['budget_s'] - 1):+.1f} %)"
        )
    failed = {k: v for k, v in summary["steps"].items() if v["status"] not in ("ok", "up to date")}
    print(
        f"[pipeline] done in {summary['seconds']} s: {len(summary['steps']) - len(failed)} ok"
        + (f", {len(failed)} not: {', '.join(failed)}" if failed else "")
        + f"; {summary['out']} holds {summary['output_mb']:.0f} MB"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    from helpers.console import TerminateAsInterrupt, exit_status

    with TerminateAsInterrupt():
        try:
            sys.exit(main())
        except KeyboardInterrupt as stop:  # before the pipeline's own handler was in place
            print("[pipeline] interrupted before any notebook ran; nothing was changed.", file=sys.stderr)
            sys.exit(exit_status(stop))
