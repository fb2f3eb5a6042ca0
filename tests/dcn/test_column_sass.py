"""The column kernels' sm_90 SASS holds issue 10's targets (static counts, no GPU needed).

Runs ``tools/sass_loops.py --json`` in a subprocess with the cuda backend (numba-cuda's
compiler, nvJitLink, the ``nvdisasm`` wheel) and reads the innermost loop of each float32
narrow (uint32) kernel: the tap loop of ``im2col``'s column kernel (one column element per
iteration) and the channel loop of ``fused_columns`` (one column element per iteration).
Skips where those tools are not installed. ``python -m deftnumba audit`` supersedes this.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures():
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1", PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sass_loops.py"), "im2col", "fused_columns",
                           "--json"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("libnvvm", "nvdisasm not found", "nvjitlink",
                                                                 "No module named 'cuda")):
        pytest.skip("needs NVVM, nvJitLink and nvdisasm: pip install 'numba-cuda[cu13]' nvidia-cuda-nvdisasm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hot_loop(case) -> int:
    """Instructions of the largest innermost loop: the per-column-element loop."""
    return max(loop["count"] for loop in case["loops"] if loop["innermost"])


@pytest.mark.parametrize("mask", [True, False])
def test_im2col_tap_loop_is_at_most_60_instructions(figures, mask):
    assert hot_loop(figures[f"im2col.columns[mask={mask}]"]) <= 60


@pytest.mark.parametrize("mask", [True, False])
def test_fused_columns_channel_loop_is_at_most_25_instructions(figures, mask):
    assert hot_loop(figures[f"fused_columns.fused_columns[mask={mask}]"]) <= 25


def test_no_float64_local_memory_or_calls_and_full_occupancy_in_reach(figures):
    """Every column kernel, both index variants: no F64, no LDL/STL, no CALL (64-bit
    division subroutines), and at most 64 registers (>= 32 warps/SM at 256 threads)."""
    assert figures, "no kernels measured"
    for name, case in figures.items():
        assert (case["f64"], case["local"], case["calls"]) == (0, 0, 0), name
        assert case["registers"] <= 64, (name, case["registers"])
