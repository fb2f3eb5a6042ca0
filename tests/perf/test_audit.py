"""Compile every kernel with numba-cuda's real compiler (no GPU needed) and audit the PTX.

The simulator accepts code a GPU compiler rejects (untyped globals, dynamic
shared shapes) and hides float64 promotion. This test runs ``python -m
deftnumba ptx --json`` in a subprocess with the cuda backend; it skips only
where NVVM is not installed (``pip install 'numba-cuda[cu13]'`` provides it). The
compilation runs once per test run (per xdist worker): the session fixture ``audit_reports``
in tests/conftest.py; every audit test reads its reports.
"""

import pytest


@pytest.fixture(scope="module")
def reports(audit_reports):
    """The session's audit reports (compiled once per run: tests/conftest.py)."""
    return audit_reports


def test_every_kernel_compiles_for_sm90(reports):
    assert len(reports) >= 6
    assert {r["dtype"] for r in reports} == {"float32", "float64", "float16", "bfloat16"}


HALF_KERNEL_KINDS = ("im2col.positions[", "im2col.columns[", "fused_columns.fused_columns[",
                     "fused_tiled.fused[", "backward.sample[", "backward.col2im[", "backward.entries[",
                     "backward.gather[", "backward_fused.input_grad[", "backward_fused.weight_grad[")
"""Every DCN kernel kind a forward or backward method launches, as the registry names it."""


LOCAL_BY_DESIGN = ("backward_fused.input_grad[",)
"""Kernels whose local memory is deliberate: the fused backward's input kernel keeps each owned
point's four corner sums ``S_q`` in a local array, read and written once per point and channel
chunk (one ``LDL.128``, one ``STL.128``) by a point loop that stays rolled (backward_fused's
``sums``): unrolled, 6 points a thread at 96 threads would cost 6x the loop's code."""


def test_every_dcn_kernel_kind_compiles_in_both_half_dtypes(reports):
    """float16 and bfloat16 (storage in half, float32 arithmetic: runtime.precision): every DCN
    kernel kind, forward and backward, is compiled for sm_90, without local memory (but for
    ``LOCAL_BY_DESIGN``)."""
    for dtype in ("float16", "bfloat16"):
        half = [r for r in reports if r["dtype"] == dtype]
        names = {r["kernel"] for r in half}
        missing = [kind for kind in HALF_KERNEL_KINDS if not any(n.startswith(kind) for n in names)]
        assert not missing, (dtype, missing, sorted(names))
        assert not [r["kernel"] for r in half if r["uses_local_memory"]
                    and not r["kernel"].startswith(LOCAL_BY_DESIGN)], dtype


def test_float32_and_half_kernels_have_no_float64_instructions(reports):
    offenders = {f'{r["kernel"]} {r["dtype"]}': r["f64_examples"] for r in reports
                 if r["dtype"] in ("float32", "float16", "bfloat16") and r["f64_instructions"]}
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
