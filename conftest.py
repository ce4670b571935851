"""Root pytest configuration.

Outputs: notebook runs (pytest --nbval-lax notebooks/) write their results to a temporary folder
instead of outputs/, so a test never resumes stale checkpoints or overwrites a real run. The kernels
nbval starts inherit this environment variable. The test suite's one smoke pipeline run
(tests/conftest.py, `smoke_out`) writes there too, so the notebooks nbval executes afterwards find
its finished checkpoints and resume them instead of training everything again. The folder (GBs of
smoke checkpoints) is removed when the session ends.

Parallel runs (`make test`: pytest-xdist, `-n 2 -m "not serial"`, then the `serial` tests
alone): each worker writes to its own subfolder (and uses its share of the cores:
tests/conftest.py); the smoke pipeline's tests and the notebooks nbval resumes from its outputs run
in one worker, first (`work_unit`)."""

import os
import shutil
import tempfile

import pytest

_CREATED = None
if not os.environ.get("HELPERS_OUT_DIR"):
    _CREATED = os.environ["HELPERS_OUT_DIR"] = tempfile.mkdtemp(prefix="helpers-test-outputs-")
    os.environ["HELPERS_TEST_OUTPUTS"] = _CREATED  # (the smoke fixture writes here only when the suite made the folder)
elif os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("HELPERS_TEST_OUTPUTS") == os.environ["HELPERS_OUT_DIR"]:
    # an xdist worker of a suite that made the folder: its own subfolder (removed with the folder)
    _worker_out = os.path.join(os.environ["HELPERS_OUT_DIR"], os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(_worker_out, exist_ok=True)
    os.environ["HELPERS_OUT_DIR"] = os.environ["HELPERS_TEST_OUTPUTS"] = _worker_out


SMOKE_GROUP_FILES = ("tests/test_smoke.py",)  # the test files that may use `smoke_out` (checked at collection)


def work_unit(nodeid: str) -> str:
    """What one pytest-xdist worker runs as a whole: the smoke group (the smoke pipeline's tests and
    the notebooks nbval resumes from its outputs), else a test file (its module fixtures run once)."""
    path = nodeid.split("::")[0]
    notebook = path.endswith(".ipynb") or "::ipynb::" in nodeid  # (nbval's ids: notebooks/T1_custom_cnn::ipynb::Cell 0)
    return "smoke" if notebook or path in SMOKE_GROUP_FILES else path


def pytest_collection_modifyitems(config, items):
    strays = [
        item.nodeid
        for item in items
        if "smoke_out" in getattr(item, "fixturenames", ()) and work_unit(item.nodeid) != "smoke"
    ]
    if strays:  # (in another worker, it would run the smoke pipeline again, in another folder)
        raise pytest.UsageError(f"{strays[0]} uses smoke_out: put it in one of {SMOKE_GROUP_FILES} (conftest.py)")
    items.sort(key=lambda item: work_unit(item.nodeid) != "smoke")  # the smoke group first (stable otherwise)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # (xdist's own --dist loadgroup marks tests by rewriting item._nodeid, which pytest 9 no longer reads)
    from xdist.scheduler import LoadScopeScheduling

    class SmokeGroupFirst(LoadScopeScheduling):
        """Units of work as `work_unit` says, in collection order: the smoke group (its pipeline is the
        longest single setup) starts first, in one worker, while the other takes the test files."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # (else units go by their number of tests)
    return SmokeGroupFirst(config, log)


def pytest_sessionfinish(session, exitstatus):
    if _CREATED is not None:
        shutil.rmtree(_CREATED, ignore_errors=True)
