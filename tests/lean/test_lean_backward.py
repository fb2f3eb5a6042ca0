"""lean_conv2d_backward in the simulator against the float64 reference."""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.lean import BACKWARD_METHODS, PATTERNS, lean_conv2d_backward, ops
from deftnumba.lean.reference import lean_conv2d_backward_reference

NAMES = ("input", "pointwise", "stencil", "bias")


def _inputs(rng, n, c, h, w, taps, stride, dtype=np.float64, bias=True):
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    pw = rng.standard_normal((c, c)).astype(dtype)
    st = rng.standard_normal((c, len(taps))).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if bias else None
    gy = rng.standard_normal((n, c, (h - 1) // sh + 1, (w - 1) // sw + 1)).astype(dtype)
    return gy, x, pw, st, b


@pytest.fixture
def poisoned(poison_allocations):
    poison_allocations(ops)


def _check(grads, ref, rtol=1e-11, atol=1e-11):
    for name, ours, theirs in zip(NAMES, grads, ref):
        if theirs is None:
            assert ours is None, name
            continue
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("method", BACKWARD_METHODS)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_pattern_and_stride(rng, poisoned, method, pattern, stride):
    taps = PATTERNS[pattern]
    gy, x, pw, st, b = _inputs(rng, 2, 5, 7, 6, taps, stride)
    grads = lean_conv2d_backward(gy, x, pw, st, b, stride, pattern=pattern, method=method)
    _check(grads, lean_conv2d_backward_reference(gy, x, pw, st, b, stride, taps))


@pytest.mark.parametrize("method", BACKWARD_METHODS)
@pytest.mark.parametrize("shape, stride", [((1, 1, 1, 1), 1), ((2, 1, 3, 5), 2), ((1, 3, 1, 7), (1, 2)),
                                           ((3, 9, 5, 3), 1), ((1, 2, 9, 1), (2, 1)),
                                           ((2, 3, 1, 1), 1), ((2, 6, 3, 2), 2)])  # C > Ho*Wo: one GEMM
def test_irregular_shapes(rng, poisoned, method, shape, stride):
    taps = PATTERNS["star5"]
    gy, x, pw, st, b = _inputs(rng, *shape, taps, stride)
    _check(lean_conv2d_backward(gy, x, pw, st, b, stride, method=method),
           lean_conv2d_backward_reference(gy, x, pw, st, b, stride, taps))


def test_float32_no_bias_4d_pointwise_bounds_checked(rng, poisoned):
    taps = PATTERNS["plus4"]
    gy, x, pw, st, _ = _inputs(rng, 2, 3, 5, 4, taps, 1, dtype=np.float32, bias=False)
    with backend.bounds_checked():
        grads = lean_conv2d_backward(gy, x, pw.reshape(3, 3, 1, 1), st, None, pattern="plus4", method="fused")
    assert grads.bias is None and grads.pointwise.shape == (3, 3, 1, 1)
    assert all(g.dtype == np.float32 for g in grads[:3])
    _check(grads, lean_conv2d_backward_reference(gy, x, pw.reshape(3, 3, 1, 1), st, None, 1, taps),
           rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", BACKWARD_METHODS)
def test_bit_identical_on_every_run(rng, method):
    gy, x, pw, st, b = _inputs(rng, 3, 4, 6, 5, PATTERNS["star5"], 1, dtype=np.float32)
    first = lean_conv2d_backward(gy, x, pw, st, b, method=method)
    again = lean_conv2d_backward(gy, x, pw, st, b, method=method)
    for name, u, v in zip(NAMES, first, again):
        assert np.array_equal(u, v), name


def test_grad_output_shape_is_checked(rng):
    gy, x, pw, st, b = _inputs(rng, 1, 3, 5, 5, PATTERNS["star5"], 1)
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \[N, C, Ho, Wo\] = \(1, 3, 3, 3\)"):
        lean_conv2d_backward(gy, x, pw, st, b, 2)
