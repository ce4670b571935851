"""Root pytest configuration: notebook runs (pytest --nbval-lax notebooks/) write their results to a
temporary folder instead of outputs/, so a test never resumes stale checkpoints or overwrites a
real run. The kernels nbval starts inherit this environment variable."""

import os
import tempfile

if not os.environ.get("HELPERS_OUT_DIR"):
    os.environ["HELPERS_OUT_DIR"] = tempfile.mkdtemp(prefix="helpers-test-outputs-")
