"""The lean kernels compile for sm_90 with numba-cuda's real compiler (no GPU needed) and keep
the SASS discipline: float32 kernels have no float64, nothing in local memory, no spills,
static shared memory within 48 KB.

The kernels are compiled once per test run with every other registered kernel (the session
fixture ``audit_reports`` in tests/conftest.py: ``python -m deftnumba ptx --json`` in a
cuda-backend subprocess); these tests read the lean kernels' reports."""

import pytest


@pytest.fixture(scope="module")
def reports(audit_reports):
    return [r for r in audit_reports if r["kernel"].startswith("lean.") and r["dtype"] == "float32"]


def test_every_lean_kernel_is_audited(reports):
    from deftnumba.lean.kernels import depthwise, fused, strip

    registered = {f"lean.{module.__name__.rsplit('.', 1)[1]}.{name}"
                  for module in (fused, depthwise, strip) for name, dtype, _, _ in module.ptx_cases()
                  if dtype == "float32"}
    assert len(registered) >= 10
    assert registered <= {r["kernel"] for r in reports}


def test_float32_discipline(reports):
    assert len(reports) >= 8
    assert not [r["kernel"] for r in reports if r["f64_instructions"]]
    assert not [r["kernel"] for r in reports if r["uses_local_memory"]]
    if any(r["spill_bytes"] is None for r in reports):
        pytest.skip("nvJitLink not installed: no ptxas resource report")
    assert not [r["kernel"] for r in reports if r["spill_bytes"]]
    assert all(r["shared_bytes"] <= 48 * 1024 + 1024 for r in reports)
