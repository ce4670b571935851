"""Root pytest configuration: notebook runs (pytest --nbval-lax notebooks/) write their results to a
temporary folder instead of outputs/, so a test never resumes stale checkpoints or overwrites a
real run. The kernels nbval starts inherit this environment variable. The folder (about 2.5 GB of
smoke checkpoints) is removed when the session ends."""

import os
import shutil
import tempfile

_CREATED = None
if not os.environ.get("HELPERS_OUT_DIR"):
    _CREATED = os.environ["HELPERS_OUT_DIR"] = tempfile.mkdtemp(prefix="helpers-test-outputs-")


def pytest_sessionfinish(session, exitstatus):
    if _CREATED is not None:
        shutil.rmtree(_CREATED, ignore_errors=True)
