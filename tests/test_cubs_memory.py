"""Peak memory of CUBS Block 2's chunked column softmax at 64x64 maps, batch 64, measured in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter, so that this process's earlier allocations cannot hide the peak.
# VmHWM is the peak resident set size; writing 5 to clear_refs resets it to the current size
# (Linux >= 4.0), otherwise the "before" value is the peak so far (imports, warm-up), which can
# only make the measured increase smaller than the true one, hence the check that it was reset.
_SCRIPT = r"""
import json, re, time
import torch
from helpers.models.cubs import column_softmax_features

def status(field):
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\s*(\d+) kB", text).group(1)) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

torch.manual_seed(0)
batch, length = 64, 64 * 64
q, k, v = (torch.randn(batch, length).requires_grad_() for _ in range(3))
grad_output = torch.randn(batch, length)
# Warm-up at a tiny size (kernels, allocator, autograd engine threads), then the real run.
column_softmax_features(q[:1, :64], k[:1, :64], v[:1, :64], method="chunked").sum().backward()
q.grad = k.grad = v.grad = None
reset_peak()
rss_before, peak_before = status("VmRSS"), status("VmHWM")
start = time.perf_counter()
f = column_softmax_features(q, k, v, method="chunked")
f.backward(grad_output)
seconds = time.perf_counter() - start
finite = bool(torch.isfinite(f).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v)))
print(json.dumps(dict(rss_before=rss_before, peak_before=peak_before, peak_after=status("VmHWM"),
                      seconds=seconds, finite=finite)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")
def test_chunked_block2_peak_memory_64x64_batch64():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    increase = result["peak_after"] - result["peak_before"]
    full_matrix = 64 * 4096 * 4096 * 4  # the (B, HW, HW) float32 similarity: 4 GiB
    bound = 1 << 30
    message = (
        f"peak RSS increase over forward + backward: {increase / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB, "
        f"full matrix {full_matrix / 2**20:.0f} MiB), {result['seconds']:.1f} s"
    )
    print(message)
    assert result["finite"]
    # The peak was reset to the current RSS (else the increase could be understated by the earlier peak).
    assert result["peak_before"] - result["rss_before"] < 64 << 20, result
    assert 0 < increase < bound < full_matrix, message
