"""lean_conv2d in the simulator against the float64 reference, on irregular tiny shapes."""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.lean import METHODS, PATTERNS, lean_conv2d, ops
from deftnumba.lean.kernels.fused import LeanTileConfig
from deftnumba.lean.reference import lean_conv2d_reference


def _inputs(rng, n, c, h, w, taps, dtype=np.float32, bias=True):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    pw = rng.standard_normal((c, c)).astype(dtype)
    st = rng.standard_normal((c, len(taps))).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if bias else None
    return x, pw, st, b


def _tolerance(x, pw, st, b, stride, taps, dtype):
    """A bound from the magnitudes summed: |x| through |pw| and |st| (+ |b|)."""
    magnitude = lean_conv2d_reference(np.abs(x), np.abs(pw), np.abs(st), None if b is None else np.abs(b),
                                      stride, taps)
    eps = 1e-6 if dtype == np.float32 else 1e-14
    return 4 * eps * (magnitude + 1)


@pytest.fixture
def poisoned(poison_allocations):
    """Every array the ops allocate starts NaN: an element no kernel writes shows up."""
    poison_allocations(ops)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_pattern_and_stride(rng, poisoned, method, pattern, stride):
    taps = PATTERNS[pattern]
    x, pw, st, b = _inputs(rng, 2, 5, 7, 6, taps)
    y = lean_conv2d(x, pw, st, b, stride, pattern=pattern, method=method)
    ref = lean_conv2d_reference(x, pw, st, b, stride, taps)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= _tolerance(x, pw, st, b, stride, taps, np.float32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, stride", [((1, 1, 1, 1), 1), ((2, 1, 3, 5), 2), ((1, 3, 1, 7), (1, 2)),
                                           ((3, 9, 5, 3), 1), ((1, 2, 9, 1), (2, 1))])
def test_irregular_shapes_float64(rng, poisoned, method, shape, stride):
    """1x1 images, C = 1, odd sizes, mixed strides, channels across several chunks and blocks."""
    taps = PATTERNS["star5"]
    x, pw, st, b = _inputs(rng, *shape, taps, dtype=np.float64)
    y = lean_conv2d(x, pw, st, b, stride, method=method)
    ref = lean_conv2d_reference(x, pw, st, b, stride, taps)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_no_bias_4d_pointwise_and_a_custom_pattern(rng, poisoned, method):
    taps = ((-1, -1), (1, 1), (0, 0))
    x, pw, st, _ = _inputs(rng, 1, 3, 5, 5, taps, dtype=np.float64, bias=False)
    y = lean_conv2d(x, pw.reshape(3, 3, 1, 1), st, None, 1, pattern=taps, method=method)
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, None, 1, taps), rtol=1e-11, atol=1e-11)


def test_fused_other_tiles_and_bounds_checked(rng, poisoned):
    """Another tile config (4 output channels per thread, 1 pixel), under the simulator's
    index checks with NaN-filled shared memory."""
    taps = PATTERNS["full9"]
    x, pw, st, b = _inputs(rng, 1, 6, 5, 7, taps, dtype=np.float64)
    config = LeanTileConfig(tile_h=2, tile_w=4, chunk=4, oc_block=8, reg_oc=4, reg_px=1)
    with backend.bounds_checked():
        y = lean_conv2d(x, pw, st, b, 1, pattern="full9", method="fused", config=config)
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(rng, method):
    x, pw, st, b = _inputs(rng, 2, 5, 6, 5, PATTERNS["star5"])
    first = lean_conv2d(x, pw, st, b, method=method)
    assert np.array_equal(first, lean_conv2d(x, pw, st, b, method=method))


def test_methods_agree(rng):
    x, pw, st, b = _inputs(rng, 1, 4, 5, 5, PATTERNS["star5"], dtype=np.float64)
    np.testing.assert_allclose(lean_conv2d(x, pw, st, b, method="fused"),
                               lean_conv2d(x, pw, st, b, method="separate"), rtol=1e-12, atol=1e-12)


def test_caller_arrays_untouched(rng):
    x, pw, st, b = _inputs(rng, 1, 3, 4, 4, PATTERNS["star5"])
    copies = [a.copy() for a in (x, pw, st, b)]
    lean_conv2d(x[:, :, ::-1], pw.T, st, b)  # non-contiguous views too
    for a, c in zip((x, pw, st, b), copies):
        assert np.array_equal(a, c)


# ---------------------------------------------------------------------------- validation
def _good(rng):
    return _inputs(rng, 1, 4, 5, 5, PATTERNS["star5"])


def test_width_change_is_a_clear_error(rng):
    x, _, st, b = _good(rng)
    with pytest.raises(ValueError, match="plain 1x1 convolution with stride"):
        lean_conv2d(x, np.zeros((8, 4), np.float32), st, b)


@pytest.mark.parametrize("case, error, match", [
    ("stencil", ValueError, r"stencil must have shape \[C, S\] = \(4, 5\)"),
    ("pattern", ValueError, "pattern must be one of"),
    ("bias", ValueError, r"bias must have shape \[C\] = \(4,\)"),
    ("pointwise_in", ValueError, r"pointwise must be \[C, C\] = \(4, 4\)"),
    ("dtype", TypeError, "one dtype"),
    ("input_ndim", ValueError, r"input must be 4-D \[N, C, H, W\]"),
    ("stride", ValueError, "stride must be >= 1"),
    ("method", ValueError, "method must be 'auto' or one of"),
    ("int", TypeError, "float32 or float64"),
    ("far_tap", ValueError, "3x3 footprint"),
])
def test_errors_name_the_argument(rng, case, error, match):
    x, pw, st, b = _good(rng)
    kwargs = {}
    stride = 1
    if case == "stencil":
        st = st[:, :3]
    elif case == "pattern":
        kwargs["pattern"] = "star7"
    elif case == "bias":
        b = b[:3]
    elif case == "pointwise_in":
        pw = np.zeros((4, 3), np.float32)
    elif case == "dtype":
        pw = pw.astype(np.float64)
    elif case == "input_ndim":
        x = x[0]
    elif case == "stride":
        stride = 0
    elif case == "method":
        kwargs["method"] = "cudnn"
    elif case == "int":
        x = x.astype(np.int32)
    elif case == "far_tap":
        kwargs["pattern"] = ((0, 2),)
        st = st[:, :1]
    with pytest.raises(error, match=match):
        lean_conv2d(x, pw, st, b, stride, **kwargs)


def test_phase_models_name_the_kernels_phases():
    """Every phase a kernel marks with ``# phase: NAME`` has an entry in its module's
    ``phase_model`` (the SASS audit multiplies the two), and nothing else."""
    import inspect
    import re

    from deftnumba.lean import bench_op
    from deftnumba.lean.kernels import depthwise, fused

    g = bench_op.geometry(bench_op.suites()["28x28x128"])
    cases = ((fused, fused.fused_kernel("float32", g.taps, 1, 1, fused.GPU_CONFIG, True), g, fused.GPU_CONFIG),
             (depthwise, depthwise.reduce_kernel("float32", g.taps, 1, 1, 16, True),
              {"batch": 2, "out_h": 5, "out_w": 5}, None))
    for module, kernel, shape, config in cases:
        source = inspect.getsource(kernel.py_func)
        marked = set(re.findall(r"^\s*# phase: (\w+)\s*$", source, re.M))
        model = module.phase_model(shape, config)
        assert marked and marked == set(model), (module.__name__, marked, set(model))
