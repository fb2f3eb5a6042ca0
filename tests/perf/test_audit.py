"""Compile every kernel with numba-cuda's real compiler (no GPU needed) and audit the PTX.

The simulator accepts code a GPU compiler rejects (untyped globals, dynamic
shared shapes) and hides float64 promotion. This test runs ``python -m
deftnumba ptx --json`` in a subprocess with the cuda backend; it skips only
where NVVM is not installed (``pip install 'numba-cuda[cu13]'`` provides it).
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-m", "deftnumba", "ptx", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and ("libnvvm" in proc.stderr or "nvrtc" in proc.stderr.lower()
                                 and "not found" in proc.stderr.lower()):
        pytest.skip("NVVM/NVRTC not installed: pip install 'numba-cuda[cu13]'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(reports):
    assert len(reports) >= 6
    assert {r["dtype"] for r in reports} == {"float32", "float64"}


def test_float32_kernels_have_no_float64_instructions(reports):
    offenders = {r["kernel"]: r["f64_examples"] for r in reports
                 if r["dtype"] == "float32" and r["f64_instructions"]}
    assert not offenders


def test_no_kernel_spills_registers(reports):
    """ptxas (through nvJitLink) reports no spill stores or loads for any kernel."""
    if any(r["spill_bytes"] is None for r in reports):
        pytest.skip("nvJitLink not installed: no ptxas resource report")
    spilling = {f'{r["kernel"]} {r["dtype"]}': r["spill_bytes"] for r in reports if r["spill_bytes"]}
    assert not spilling
    assert all(0 < r["registers"] <= 255 for r in reports)


def test_static_shared_memory_fits_the_48kb_limit(reports):
    """Declared static shared memory <= 48 KB; ptxas adds sm_90's 1 KB system reserve."""
    if any(r["shared_bytes"] is None for r in reports):
        pytest.skip("nvJitLink not installed: no ptxas resource report")
    assert all(r["shared_bytes"] <= 48 * 1024 + 1024 for r in reports)
