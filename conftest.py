"""Root pytest configuration: notebook runs (pytest --nbval-lax notebooks/) write their results to a
temporary folder instead of outputs/, so a test never resumes stale checkpoints or overwrites a
real run. The kernels nbval starts inherit this environment variable. The test suite's one smoke
pipeline run (tests/conftest.py, `smoke_out`) writes there too, so the notebooks nbval executes
afterwards find its finished checkpoints and resume them instead of training everything again.
The folder (GBs of smoke checkpoints) is removed when the session ends."""

import os
import shutil
import tempfile

_CREATED = None
if not os.environ.get("HELPERS_OUT_DIR"):
    _CREATED = os.environ["HELPERS_OUT_DIR"] = tempfile.mkdtemp(prefix="helpers-test-outputs-")
    os.environ["HELPERS_TEST_OUTPUTS"] = _CREATED  # (the smoke fixture writes here only when the suite made the folder)


def pytest_sessionfinish(session, exitstatus):
    if _CREATED is not None:
        shutil.rmtree(_CREATED, ignore_errors=True)
