"""Issue 15's static targets for the fused lean forward, read from the SASS audit
(``deftnumba.lean.audit``: the strip kernel at every bench-suite shape, compiled for sm_90 by
numba-cuda's real compiler in a compile job, tests/conftest.py; no GPU). Deterministic
static instruction counts through the issue-slot model, never a timer.

A met target is asserted as the issue states it. A missed one is pinned at today's figure
plus a little slack (the ratio is a model sum) and docs/perf-notes.md says by how much it
is missed. Never loosen a met target.
"""

import pytest

SUITE = ("56x56x64", "28x28x128", "14x14x256", "7x7x512")
TARGET = 1.3
MISSED = {}  # every suite shape meets the target (7x7x512 since the channel groups; docs/perf-notes.md)


@pytest.fixture(scope="module")
def figures(job_lean_targets):
    return job_lean_targets.figures()


def test_every_suite_shape_is_audited(figures):
    assert set(figures["suites"]) == set(SUITE)
    assert "predict" in figures["label"] and "measured" in figures["label"]


@pytest.mark.parametrize("shape", SUITE)
def test_pointwise_loop_is_ffma_bound_with_wide_shared_loads(figures, shape):
    r = figures["suites"][shape]
    assert r["pointwise_ffma_percent"] >= 85
    assert "128" in r["pointwise_lds_bits"].split("/")


@pytest.mark.parametrize("shape", SUITE)
def test_float32_discipline(figures, shape):
    r = figures["suites"][shape]
    assert r["f64"] == 0 and r["local"] == 0
    if r["spill_bytes"] is not None:
        assert r["spill_bytes"] == 0
    assert r["shared_bytes"] <= 48 * 1024 + 1024


@pytest.mark.parametrize("shape", SUITE)
def test_predicted_time_against_the_floor(figures, shape):
    """Predicted issue-bound time over the fp32 roofline floor: <= 1.3x (issue 15)."""
    assert figures["suites"][shape]["ratio"] <= MISSED.get(shape, TARGET)


def test_phases_add_up_to_the_prediction(figures):
    for r in figures["suites"].values():
        assert sum(p["predicted_us"] for p in r["phases"]) == pytest.approx(r["predicted_us"], rel=1e-6)
        assert r["floor_us"] > 0 and r["ratio"] == pytest.approx(r["predicted_us"] / r["floor_us"])


def test_stalls_only_add_time(figures):
    """The estimate with one warp's stalls (``perf.sass.stall_charges``, assumed latencies) is
    never below the issue-slot one. It equals it where several blocks share each busy SM
    (56x56x64, 28x28x128 and 14x14x256, whose picks were made so in session 38) and is larger
    where one block holds an SM (7x7x512, whose candidates that wait less miss the 1.3x issue
    target): a prediction either way."""
    for shape, r in figures["suites"].items():
        assert r["latency_us"] >= r["predicted_us"] * (1 - 1e-9), shape
        assert set(r["one_warp_clocks"]) == {p["phase"] for p in r["phases"]}
    for shape in ("56x56x64", "28x28x128", "14x14x256"):
        crowded = figures["suites"][shape]
        assert crowded["blocks_per_sm"] >= 2 and crowded["latency_us"] == pytest.approx(crowded["predicted_us"])
    lone = figures["suites"]["7x7x512"]
    assert lone["blocks_per_sm"] == 1 and lone["latency_us"] > 1.1 * lone["predicted_us"]


def test_stalls_keep_the_first_three_shapes_within_the_target(figures):
    """Since session 38 the picks of 56x56x64, 28x28x128 and 14x14x256 meet 1.3x the floor with
    one warp's stalls counted too (1.20-1.22x); 7x7x512 is pinned at today's 1.55x."""
    for shape in ("56x56x64", "28x28x128", "14x14x256"):
        r = figures["suites"][shape]
        assert r["latency_us"] / r["floor_us"] <= TARGET, shape
    r = figures["suites"]["7x7x512"]
    assert r["latency_us"] / r["floor_us"] <= 1.56
