"""The lean kernels compile for sm_90 with numba-cuda's real compiler (no GPU needed) and keep
the SASS discipline: float32 kernels have no float64, nothing in local memory, no spills,
static shared memory within 48 KB. Runs in a subprocess with the cuda backend."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, re
from deftnumba.perf import audit as ptx
from deftnumba.runtime import backend
from deftnumba.lean.kernels import depthwise, fused
out = []
for module in (fused, depthwise):
    for name, dtype, kernel, sig in module.ptx_cases():
        if dtype != "float32":
            continue
        text, _ = backend.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        lines = [l for l in text.splitlines() if not l.strip().startswith("//")]
        out.append({"kernel": name, "f64": sum(bool(re.search(r"\.f64\b", l)) for l in lines),
                    "local": any(".local" in l for l in lines), **ptx.ptxas_resources(text)})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "libnvvm" in proc.stderr:
        pytest.skip("NVVM not installed: pip install 'numba-cuda[cu13]'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_float32_discipline(reports):
    assert len(reports) >= 8
    assert not [r["kernel"] for r in reports if r["f64"]]
    assert not [r["kernel"] for r in reports if r["local"]]
    if any("spill_bytes" not in r for r in reports):
        pytest.skip("nvJitLink not installed: no ptxas resource report")
    assert not [r["kernel"] for r in reports if r["spill_bytes"]]
    assert all(r["shared_bytes"] <= 48 * 1024 + 1024 for r in reports)
