"""Robustness of every method, forward and backward (docs/guarantees.md).

* non-finite and huge offsets sample zero, never index memory, and have zero gradients;
* NaN and inf in the input and the mask propagate exactly as docs/guarantees.md says;
* strided, transposed, Fortran-order, negative-stride, broadcast and read-only arrays
  give the right answer, and no argument is ever written;
* the forward and the ``deterministic=True`` backward are bit-identical across runs;
* a failed call (bad argument, or a kernel failing mid-pipeline) leaves the process
  usable: the next call is right.

The kernels run under ``backend.bounds_checked()`` where it matters: in the simulator
every index into a kernel argument, shared or local array is checked (NumPy would
silently wrap a negative index), and shared/local memory starts as NaN.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import reference
from deftnumba.dcn import geometry as arguments
from deftnumba.dcn.geometry import Geometry

from .test_fuzz import backward_function, backward_methods, backward_params, conv_kwargs, run_backward

FORWARD = list(dn.METHODS)
BACKWARD = backward_params()


def bounds_checked():
    return backend.bounds_checked() if backend.IS_SIMULATOR else contextlib.nullcontext()


def geometry(n=1, c=2, h=4, w=5, c_out=3, k=3, pad=1, groups=1, offset_groups=1, mask=True, bias=True,
             dtype="float32", stride=1, dil=1) -> Geometry:
    return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=k, kernel_w=k,
                    stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad, dil_h=dil, dil_w=dil,
                    groups=groups, offset_groups=offset_groups, has_mask=mask, has_bias=bias, dtype=dtype)


def arrays(g: Geometry, rng, offset_scale=1.5):
    dt = np.dtype(g.dtype)
    s = g.shapes
    x = rng.standard_normal(s["input"]).astype(dt)
    offset = (rng.standard_normal(s["offset"]) * offset_scale).astype(dt)
    weight = rng.standard_normal(s["weight"]).astype(dt)
    bias = rng.standard_normal(s["bias"]).astype(dt) if g.has_bias else None
    mask = rng.uniform(0.2, 1.0, s["mask"]).astype(dt) if g.has_mask else None
    return x, offset, weight, bias, mask


def forward(method, g, x, offset, weight, bias, mask):
    return backend.to_host(dn.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask, method=method))


def need_backward(method):
    if method is None or backward_function() is None:
        pytest.skip("no backward yet")
    if getattr(reference, "deform_conv2d_backward", None) is None:
        pytest.skip("no reference backward yet")


def close(result, expected, dtype, what=""):
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-6)
    np.testing.assert_allclose(result, expected, rtol=0, atol=tol * scale, err_msg=what)


# --------------------------------------------------------------------------- 1. extreme offsets
SPECIALS_32 = [np.nan, np.inf, -np.inf, 1e10, -1e10, 2.0**31, -(2.0**31), 3e9, -3e9, 2.0**63,
               1e30, float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max)]
SPECIALS_64 = SPECIALS_32 + [1e300, float(np.finfo(np.float64).max), 2.0**1000]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bilinear_corners_never_convert_an_extreme_position(dtype):
    """The device function itself, called in the simulator on every special value.

    In Python ``math.floor(nan)`` raises and ``math.floor(inf)`` raises: that these
    calls return at all proves the band test runs before any float -> int conversion.
    Indices always lie in the image; weights are zero outside the band.
    """
    if not backend.IS_SIMULATOR:
        pytest.skip("calls the device function from Python (simulator only)")
    from deftnumba.dcn.kernels.sampling import sampling_functions

    T = np.dtype(dtype).type
    fns = sampling_functions(dtype)
    specials = SPECIALS_32 if dtype == "float32" else SPECIALS_64
    ordinary = [-1.0, -0.5, 0.0, 1.25, 3.0, 4.0, 4.5]
    height, width = 4, 5
    for y in specials + ordinary:
        for x in specials + ordinary:
            y0, y1, x0, x1, *weights = fns.bilinear_corners(T(y), T(x), height, width)
            assert 0 <= y0 <= y1 < height and 0 <= x0 <= x1 < width, (y, x)
            assert all(np.isfinite(w) and w >= 0 for w in weights), (y, x, weights)
            expected = reference.bilinear_sample(np.ones((height, width)), np.array(T(y)), np.array(T(x)))
            assert abs(sum(float(w) for w in weights) - float(expected)) < 1e-6, (y, x)
            if not (-1 < y < height and -1 < x < width):
                assert all(w == 0 for w in weights)
            if hasattr(fns, "bilinear_corner_gradients"):
                out = fns.bilinear_corner_gradients(T(y), T(x), height, width)
                assert 0 <= out[0] <= out[1] < height and 0 <= out[2] <= out[3] < width
                assert all(np.isfinite(v) for v in out[4:]), (y, x)
                if not (-1 <= y < height and -1 <= x < width):  # outside the gradient band
                    assert all(v == 0 for v in out[4:])
                elif not (-1 < y and -1 < x):  # on y = -1 or x = -1: no weight, a one-sided derivative
                    assert all(v == 0 for v in out[4:8]), (y, x, out)
                    # d value/dy of an all-ones image at y = -1 is row 0 sampled at x (0 at the corner)
                    ones = np.ones((height, width))
                    d_dy = reference.bilinear_sample(ones, np.array(0.0), np.array(x)) if x != -1 else 0.0
                    d_dx = reference.bilinear_sample(ones, np.array(y), np.array(0.0)) if y != -1 else 0.0
                    assert abs(sum(out[8:12]) - d_dy) < 1e-6 and abs(sum(out[12:16]) - d_dx) < 1e-6, (y, x)


def special_offsets(g: Geometry, rng, specials, fraction=1.0):
    """Offsets where ``fraction`` of the samples have dy, dx or both set to a special value."""
    base = (rng.standard_normal(g.shapes["offset"]) * 1.5)
    n, ch, oh, ow = base.shape
    pairs = base.reshape(n, ch // 2, 2, oh, ow)
    hit = rng.random((n, ch // 2, oh, ow)) < fraction
    which = rng.integers(0, 3, hit.shape)  # 0: dy, 1: dx, 2: both
    values = rng.choice(np.array(specials), hit.shape)
    pairs[:, :, 0] = np.where(hit & (which != 1), values, pairs[:, :, 0])
    pairs[:, :, 1] = np.where(hit & (which != 0), values, pairs[:, :, 1])
    return pairs.reshape(base.shape).astype(g.dtype), hit


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", FORWARD)
def test_extreme_offsets_sample_zero(method, dtype, rng):
    g = geometry(dtype=dtype)
    x, _, weight, bias, mask = arrays(g, rng)
    specials = SPECIALS_32 if dtype == "float32" else SPECIALS_64
    offset, _ = special_offsets(g, rng, specials, fraction=1.0)
    with bounds_checked():
        out = forward(method, g, x, offset, weight, bias, mask)
    np.testing.assert_array_equal(out, np.broadcast_to(bias[None, :, None, None], out.shape))


@pytest.mark.parametrize("method", FORWARD)
def test_extreme_offsets_mixed_with_ordinary_ones(method, rng):
    g = geometry(n=2, c=4, offset_groups=2, groups=2, c_out=4)
    x, _, weight, bias, mask = arrays(g, rng)
    offset, _ = special_offsets(g, rng, SPECIALS_32, fraction=0.5)
    with bounds_checked():
        out = forward(method, g, x, offset, weight, bias, mask)
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    close(out, expected, g.dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("method", BACKWARD)
def test_extreme_offsets_have_zero_finite_gradients(method, deterministic, rng):
    need_backward(method)
    g = geometry(n=1, c=2)
    x, _, weight, bias, mask = arrays(g, rng)
    offset, _ = special_offsets(g, rng, SPECIALS_32, fraction=1.0)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    with bounds_checked():
        grads = run_backward(method, g, grad_out, x, offset, weight, bias, mask, deterministic)
    for name in ("input", "offset", "weight", "mask"):
        np.testing.assert_array_equal(grads[name], 0.0, err_msg=f"grad {name}")
    close(grads["bias"], grad_out.astype(np.float64).sum(axis=(0, 2, 3)), g.dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("method", BACKWARD)
def test_extreme_offsets_mixed_gradients_match_reference(method, deterministic, rng):
    need_backward(method)
    g = geometry(n=2, c=4, offset_groups=2, c_out=2)
    x, _, weight, bias, mask = arrays(g, rng)
    offset, hit = special_offsets(g, rng, SPECIALS_32, fraction=0.5)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    with bounds_checked():
        grads = run_backward(method, g, grad_out, x, offset, weight, bias, mask, deterministic)
    expected = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    for name in ("input", "offset", "weight", "bias", "mask"):
        assert np.all(np.isfinite(grads[name])), name
        close(grads[name], getattr(expected, name), g.dtype, f"grad {name}")
    # the special samples have exactly zero offset and mask gradients
    go = grads["offset"].reshape(g.batch, -1, 2, g.out_h, g.out_w).transpose(0, 1, 3, 4, 2)
    assert hit.any() and np.all(go[hit] == 0) and np.all(grads["mask"][hit] == 0)


# --------------------------------------------------------------------------- 2. NaN / inf in input and mask
def pixel_reach(g: Geometry, offset, n, group, r, s):
    """``(may, must)`` boolean maps over output pixels ``[Ho, Wo]`` of image ``n`` for input
    pixel ``(r, s)`` of offset group ``group``: ``may`` = some tap's clamped 2x2 footprint
    contains it (a method may read it), ``must`` = some tap gives it a non-zero weight."""
    y, x = reference.sampling_positions(offset, (g.kernel_h, g.kernel_w), (g.stride_h, g.stride_w),
                                        (g.pad_h, g.pad_w), (g.dil_h, g.dil_w))
    y, x = y[n, group], x[n, group]  # [K, Ho, Wo]
    with np.errstate(invalid="ignore"):
        inside = (y > -1) & (y < g.height) & (x > -1) & (x < g.width)
    yf = np.floor(np.where(inside, y, 0))
    xf = np.floor(np.where(inside, x, 0))
    rows = (np.clip(yf, 0, g.height - 1) == r) | (np.clip(yf + 1, 0, g.height - 1) == r)
    cols = (np.clip(xf, 0, g.width - 1) == s) | (np.clip(xf + 1, 0, g.width - 1) == s)
    may = (inside & rows & cols).any(axis=0)
    one = np.zeros((g.height, g.width))
    one[r, s] = 1.0
    weight = reference.bilinear_sample(one, y, x)  # [K, Ho, Wo]
    must = (weight > 0).any(axis=0)
    return may, must


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("method", FORWARD)
def test_non_finite_input_reaches_exactly_the_outputs_that_sample_it(method, value, rng):
    g = geometry(n=2, c=4, h=5, w=6, c_out=4, groups=2, offset_groups=2)
    x, offset, weight, bias, mask = arrays(g, rng)
    n, c, r, s = 1, 2, 2, 3  # channel 2: weight group 1 (outputs 2, 3), offset group 1
    x[n, c, r, s] = value
    with bounds_checked():
        out = forward(method, g, x, offset, weight, bias, mask)
    clean = x.copy()
    clean[n, c, r, s] = 0.0
    expected = reference.deform_conv2d(clean, offset, weight, bias, **conv_kwargs(g), mask=mask)
    may, must = pixel_reach(g, offset, n, 1, r, s)
    assert must.any(), "test setup: some output must sample the pixel"
    poisoned = out[n, 2:4]
    assert np.all(~np.isfinite(poisoned[:, must])), "an output sampling the non-finite pixel is finite"
    # Everything that cannot read the pixel is finite and right: other images, the other
    # weight group, and the pixels whose footprints miss it.
    finite = np.ones(out.shape, bool)
    finite[n, 2:4] = ~may
    assert np.all(np.isfinite(out[finite]))
    close(out[finite], expected[finite], g.dtype)


@pytest.mark.parametrize("sample_inside", [True, False])
@pytest.mark.parametrize("method", FORWARD)
def test_nan_mask_poisons_the_outputs_of_its_tap(method, sample_inside, rng):
    """A NaN mask makes its output pixel NaN, whether the sample is inside the band or
    not (outside, the value is 0 and ``0 * NaN`` is NaN, as in torchvision); nothing
    else changes. Every method agrees."""
    g = geometry(n=1, c=2, h=4, w=5, c_out=3)
    x, offset, weight, bias, mask = arrays(g, rng)
    tap, oy, ox = 4, 1, 2  # centre tap
    offset[0, 2 * tap:2 * tap + 2, oy, ox] = (0.25, -0.5) if sample_inside else (1e6, 0.0)
    mask[0, tap, oy, ox] = np.nan
    with bounds_checked():
        out = forward(method, g, x, offset, weight, bias, mask)
    clean = mask.copy()
    clean[0, tap, oy, ox] = 0.0
    assert np.all(np.isnan(out[0, :, oy, ox]))
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=clean)
    others = np.ones(out.shape, bool)
    others[0, :, oy, ox] = False
    close(out[others], expected[others], g.dtype)


@pytest.mark.parametrize("method", BACKWARD)
def test_non_finite_input_backward(method, rng):
    """The input gradient does not depend on input values: it stays finite and right.
    The other gradients take the NaN only where the forward does."""
    need_backward(method)
    g = geometry(n=2, c=4, c_out=2, groups=2)
    x, offset, weight, bias, mask = arrays(g, rng)
    x[1, 0, 2, 3] = np.nan  # weight group 0: input channels 0, 1
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    for deterministic in (False, True):
        with bounds_checked():
            grads = run_backward(method, g, grad_out, x, offset, weight, bias, mask, deterministic)
        clean = x.copy()
        clean[1, 0, 2, 3] = 0.0
        expected = reference.deform_conv2d_backward(grad_out, clean, offset, weight, bias, **conv_kwargs(g),
                                                    mask=mask)
        close(grads["input"], expected.input, g.dtype, "grad input")
        close(grads["bias"], expected.bias, g.dtype, "grad bias")
        # grad weight of weight group 1 (output 1, input channels 2, 3) never sees channel 0
        close(grads["weight"][1], expected.weight[1], g.dtype, "grad weight, other group")
        close(grads["offset"][0], expected.offset[0], g.dtype, "grad offset, other image")


# --------------------------------------------------------------------------- 3. unusual arrays
def _layout(a, kind):
    """The same values as ``a`` in an unusual memory layout."""
    if a is None:
        return None
    if kind == "strided":
        big = np.zeros(tuple(2 * d for d in a.shape), a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        return big[tuple(slice(None, None, 2) for _ in a.shape)]
    if kind == "transposed":  # a transposed view whose logical order is a's
        axes = tuple(reversed(range(a.ndim)))
        return np.ascontiguousarray(a.transpose(axes)).transpose(axes)
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "negative":
        flipped = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])
        return flipped[(slice(None, None, -1),) * a.ndim]
    if kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if kind == "broadcast":  # zero stride along the first axis (read-only by nature)
        assert np.array_equal(a, np.broadcast_to(a[:1], a.shape)), "test setup: repeat along axis 0"
        return np.broadcast_to(a[:1], a.shape)
    raise ValueError(kind)


def layout_arrays(g, rng, kind, extra=()):
    """Plain arrays (``extra`` first, then the layer's) and the same in layout ``kind``."""
    plain = tuple(extra) + tuple(arrays(g, rng))
    if kind == "broadcast":  # values repeated along axis 0, so a zero stride there is exact
        plain = tuple(None if a is None else np.ascontiguousarray(np.broadcast_to(a[:1], a.shape))
                      for a in plain)
    return plain, [_layout(a, kind) for a in plain]


LAYOUTS = ["strided", "transposed", "fortran", "negative", "readonly", "broadcast"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("method", FORWARD)
def test_unusual_layouts_forward(method, kind, rng):
    g = geometry(n=2, c=4, c_out=4, groups=2, offset_groups=2)
    plain, given = layout_arrays(g, rng, kind)
    if kind != "readonly":
        assert not any(a.flags.c_contiguous for a in given if a is not None and a.ndim > 1)
    else:
        assert not any(a.flags.writeable for a in given if a is not None)
    before = [None if a is None else a.copy() for a in given]
    out = forward(method, g, *given)
    close(out, reference.deform_conv2d(*plain[:4], **conv_kwargs(g), mask=plain[4]), g.dtype)
    for a, b in zip(given, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


MIXED = ("mixed", ["strided", "transposed", "negative", "fortran", "readonly", "strided"])


@pytest.mark.parametrize("kind", ["broadcast", MIXED])
@pytest.mark.parametrize("method", BACKWARD)
def test_unusual_layouts_backward(method, kind, rng):
    """``mixed``: grad_output, input, offset, weight, bias, mask each in another layout."""
    need_backward(method)
    g = geometry(n=2, c=4, c_out=4, groups=2, offset_groups=2)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    if kind == "broadcast":
        plain, given = layout_arrays(g, rng, kind, extra=(grad_out,))
    else:
        plain = (grad_out,) + tuple(arrays(g, rng))
        given = [_layout(a, k) for a, k in zip(plain, kind[1])]
    before = [None if a is None else a.copy() for a in given]
    grads = run_backward(method, g, *given, deterministic=True)
    expected = reference.deform_conv2d_backward(*plain[:5], **conv_kwargs(g), mask=plain[5])
    for name in ("input", "offset", "weight", "bias", "mask"):
        close(grads[name], getattr(expected, name), g.dtype, f"grad {name}")
    for a, b in zip(given, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("method", BACKWARD)
def test_backward_never_writes_its_arguments(method, deterministic, rng):
    need_backward(method)
    g = geometry(n=1, c=4, c_out=2, groups=2, offset_groups=2)
    given = (rng.standard_normal(g.shapes["output"]).astype(g.dtype),) + arrays(g, rng)
    before = [a.copy() for a in given]
    run_backward(method, g, *given, deterministic=deterministic)
    for a, b in zip(given, before):
        np.testing.assert_array_equal(a, b)


def test_byte_swapped_and_masked_arrays_are_rejected(rng):
    g = geometry()
    x, offset, weight, bias, mask = arrays(g, rng)
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or bfloat16 in native byte order"):
        dn.deform_conv2d(x.astype(x.dtype.newbyteorder()), offset, weight, bias, padding=1, mask=mask)
    with pytest.raises(TypeError, match="masked"):
        dn.deform_conv2d(np.ma.masked_array(x), offset, weight, bias, padding=1, mask=mask)


# --------------------------------------------------------------------------- 4. determinism
def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("method", FORWARD)
def test_forward_is_bit_identical_across_runs(method, rng):
    g = geometry(n=2, c=4, c_out=4, offset_groups=2, dtype="float32")
    args = arrays(g, rng, offset_scale=3.0)
    first = forward(method, g, *args)
    np.testing.assert_array_equal(bits(forward(method, g, *args)), bits(first))


@pytest.mark.parametrize("method", BACKWARD)
def test_deterministic_backward_is_bit_identical_across_runs(method, rng):
    need_backward(method)
    # Many samples land on the same pixels (offsets near zero, 3x3): the input gradient
    # sums several contributions per pixel, whose order decides the float result.
    g = geometry(n=1, c=2, c_out=3, dtype="float32")
    args = arrays(g, rng, offset_scale=0.3)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    first = run_backward(method, g, grad_out, *args, deterministic=True)
    again = run_backward(method, g, grad_out, *args, deterministic=True)
    for name, value in first.items():
        if value is not None:
            np.testing.assert_array_equal(bits(again[name]), bits(value), err_msg=name)


# --------------------------------------------------------------------------- 5. clean failure
class InjectedFailure(RuntimeError):
    pass


@contextlib.contextmanager
def failing_launch(at: int, when: str):
    """Simulator: the ``at``-th kernel launch (0-based) raises, ``before`` or ``after`` it runs.
    Yields a list that receives the number of launches seen."""
    from numba.cuda.simulator import kernel as simkernel

    original = simkernel.FakeCUDAKernel.__call__
    seen = [0]

    def call(self, *args):
        top_level = not self._device and not simkernel._kernel_context
        if not top_level:
            return original(self, *args)
        index = seen[0]
        seen[0] += 1
        if index == at and when == "before":
            raise InjectedFailure(f"launch {index} failed")
        result = original(self, *args)
        if index == at and when == "after":
            raise InjectedFailure(f"launch {index} failed after running")
        return result

    simkernel.FakeCUDAKernel.__call__ = call
    try:
        yield seen
    finally:
        simkernel.FakeCUDAKernel.__call__ = original


def test_bad_arguments_then_a_good_call(rng):
    g = geometry()
    x, offset, weight, bias, mask = arrays(g, rng)
    expected = reference.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    for method in FORWARD:
        with pytest.raises(ValueError):
            dn.deform_conv2d(x, offset[:, :4], weight, bias, padding=1, mask=mask, method=method)
        with pytest.raises(TypeError):
            dn.deform_conv2d(x, offset, weight.astype(np.float64), bias, padding=1, mask=mask, method=method)
        close(forward(method, g, x, offset, weight, bias, mask), expected, g.dtype)
    for method in backward_methods():
        grad_out = np.ones(g.shapes["output"], g.dtype)
        with pytest.raises(ValueError):
            backward_function()(grad_out[:, :1], x, offset, weight, bias, padding=1, mask=mask, method=method)
        grads = run_backward(method, g, grad_out, x, offset, weight, bias, mask)
        ref = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, padding=1, mask=mask)
        close(grads["input"], ref.input, g.dtype)


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="injects failures into the simulator's launches")
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", FORWARD)
def test_a_kernel_failure_at_any_launch_leaves_the_next_call_right(method, when, rng):
    g = geometry(n=2, c=2, c_out=2)
    args = arrays(g, rng)
    expected = reference.deform_conv2d(*args[:4], **conv_kwargs(g), mask=args[4])
    with failing_launch(-1, when) as seen:  # count the launches of one call
        forward(method, g, *args)
    launches = seen[0]
    assert launches >= 1
    for at in range(launches):
        with failing_launch(at, when), pytest.raises(InjectedFailure):
            forward(method, g, *args)
        close(forward(method, g, *args), expected, g.dtype, f"after a failure at launch {at}")


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="injects failures into the simulator's launches")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("method", BACKWARD)
def test_a_kernel_failure_in_the_backward_leaves_the_next_call_right(method, deterministic, rng):
    need_backward(method)
    g = geometry(n=1, c=2, c_out=2)
    args = arrays(g, rng)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    expected = reference.deform_conv2d_backward(grad_out, *args[:4], **conv_kwargs(g), mask=args[4])
    with failing_launch(-1, "before") as seen:
        run_backward(method, g, grad_out, *args, deterministic=deterministic)
    for at in sorted({0, seen[0] // 2, seen[0] - 1}):  # first, middle and last launch
        with failing_launch(at, "after"), pytest.raises(InjectedFailure):
            run_backward(method, g, grad_out, *args, deterministic=deterministic)
        grads = run_backward(method, g, grad_out, *args, deterministic=deterministic)
        for name in ("input", "offset", "weight", "bias", "mask"):
            close(grads[name], getattr(expected, name), g.dtype, f"grad {name} after a failure at {at}")


def test_a_failed_plan_is_not_cached(monkeypatch, rng):
    """``method="auto"`` plans through ``tiling.plan_for``'s cache: a planning failure must
    leave the cache as it was, and the next call must plan afresh and be right."""
    tiling = pytest.importorskip("deftnumba.tiling")
    g = geometry(n=1, c=3, h=5, w=4, c_out=2)
    args = arrays(g, rng)
    tiling.clear_plan_cache()
    real = tiling.choose_plan

    def broken(*a, **k):
        raise InjectedFailure("planner failed")

    monkeypatch.setattr(tiling, "choose_plan", broken)
    with pytest.raises(InjectedFailure):
        dn.deform_conv2d(*args[:4], **conv_kwargs(g), mask=args[4], method="auto")
    assert tiling.plan_cache_info()["size"] == 0
    monkeypatch.setattr(tiling, "choose_plan", real)
    out = forward("auto", g, *args)
    close(out, reference.deform_conv2d(*args[:4], **conv_kwargs(g), mask=args[4]), g.dtype)
    assert tiling.plan_cache_info()["size"] >= 1


def test_validation_runs_before_any_launch(rng):
    """A bad call must fail in argument checking, before a kernel runs or memory is touched."""
    if not backend.IS_SIMULATOR:
        pytest.skip("counts the simulator's launches")
    g = geometry()
    x, offset, weight, bias, mask = arrays(g, rng)
    with failing_launch(-1, "before") as seen:
        for method in FORWARD:
            with pytest.raises(ValueError):
                dn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask[:, :3], method=method)
    assert seen[0] == 0
    assert isinstance(arguments.check_forward(x, offset, weight, bias, 1, 1, 1, mask), Geometry)


# --------------------------------------------------------------------------- 6. the GPU check's driver
@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="tools/gpu_check.sh runs it on the GPU")
def test_sanitizer_driver_runs_in_the_simulator():
    """``tools/sanitizer_cases.py`` (what ``tools/gpu_check.sh`` runs under compute-sanitizer)
    still runs: two cases, every method, bounds-checked, compared with the reference."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DEFTNUMBA_BACKEND="simulator", DEFTNUMBA_QUIET="1")
    proc = subprocess.run([sys.executable, str(root / "tools" / "sanitizer_cases.py"), "--only", "one-pixel",
                           "--random", "0", "--require-coverage"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all cases ran and matched" in proc.stdout and "bounds-check=True" in proc.stdout
