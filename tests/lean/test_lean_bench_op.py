"""The lean bench op: protocol, runners in the simulator, and roofline counts."""

import numpy as np
import pytest

from deftnumba.lean import bench_op, roofline
from deftnumba.lean.reference import lean_conv2d_reference


def test_protocol():
    assert bench_op.name == "lean"
    assert set(bench_op.methods()) == {"fused", "separate", "cudnn_pointwise+depthwise", "cudnn_conv"}
    assert set(bench_op.suites()) == {"56x56x64", "28x28x128", "14x14x256", "7x7x512"}
    assert all(s["batch"] == 32 for s in bench_op.suites().values())


@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwdbwd"])
def test_runners_in_the_simulator(pass_):
    shape = dict(batch=1, channels=3, height=4, width=5, stride=1, pattern="star5", bias=True)
    inputs = bench_op.make_inputs(shape, "float64", seed=3)
    result = bench_op.runner("fused", pass_, inputs)()
    if pass_ == "fwd":
        ref = lean_conv2d_reference(inputs["input"], inputs["pointwise"], inputs["stencil"], inputs["bias"], 1,
                                    inputs["geometry"].taps)
        np.testing.assert_allclose(result, ref, rtol=1e-12, atol=1e-12)
    assert bench_op.runner("cudnn_conv", pass_, inputs) is None  # GPU-only baselines
    assert bench_op.baselines() == ()


def test_check_and_useful_flops():
    shape = bench_op.smoke_suites()["smoke"]
    inputs = bench_op.make_inputs(shape, "float32", seed=1)
    for method in ("fused", "separate"):
        against, error = bench_op.check(method, inputs)
        assert against == "float64 reference" and error < 1e-5
    assert bench_op.check("cudnn_conv", inputs) is None
    assert bench_op.useful_flops(dict(shape, dtype="float32"), "fwd") == roofline.totals(
        bench_op.geometry(shape), "fused", "fwd").flops


def test_counts_by_hand():
    g = bench_op.geometry(bench_op.suites()["56x56x64"])
    n, c, p, s = 32, 64, 56 * 56, 4
    fused = roofline.totals(g, "fused", "fwd")
    assert fused.flops == 2 * n * c * c * p + 2 * n * c * 5 * p + n * c * p
    assert fused.bytes == 2 * n * c * p * s + (c * c + 5 * c + c) * s
    # the separate passes move more than twice the minimal bytes
    assert roofline.totals(g, "separate", "fwd").bytes > 2 * fused.bytes
    assert roofline.totals(g, "cudnn_pointwise+depthwise", "fwd").bytes > 2 * fused.bytes
    dense = roofline.totals(g, "cudnn_conv", "fwd")
    assert dense.flops > 8 * fused.flops and dense.bytes < 1.1 * fused.bytes + 9 * c * c * s
    for method in roofline.MODELS:
        for pass_ in roofline.PASSES:
            assert roofline.floor_ms(g, method, pass_) > 0
    assert [o.name for o in bench_op.operators(bench_op.suites()["7x7x512"], "fused", "fwd")] == ["fused lean"]


def test_predictions_are_the_recorded_audit():
    """``predictions`` reads data/lean/static_audit.json (python -m deftnumba.lean.audit): the
    fused kernel's predicted time at every suite shape, nothing for other shapes."""
    import json

    recorded = json.loads(bench_op.AUDIT_PATH.read_text())["suites"]
    for name, shape in bench_op.suites().items():
        got = bench_op.predictions(shape)
        assert got == {"fused": recorded[name]["predicted_us"] / 1e3}
        assert got["fused"] >= roofline.floor_ms(bench_op.geometry(shape), "fused", "fwd")
    assert bench_op.predictions(bench_op.smoke_suites()["smoke"]) == {}
    assert bench_op.predictions(bench_op.suites()["56x56x64"], "float64") == {}
