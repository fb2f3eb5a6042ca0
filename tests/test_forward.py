"""Every forward method against the float64 reference, on irregular tiny cases."""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba import backend, reference

from .cases import CASES, conv_kwargs, layer_arrays, rel_error, tolerance

METHODS = list(dn.METHODS)


def run(method, x, offset, weight, bias, mask, g):
    arrays = [backend.to_device(a) if a is not None else None for a in (x, offset, weight, bias, mask)]
    return dn.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4], method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(method, name, rng):
    g = CASES[name]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    out = run(method, x, offset, weight, bias, mask, g)
    assert out.shape == g.shapes["output"] and out.dtype == np.dtype(g.dtype)
    assert rel_error(out, expected) < tolerance(g.dtype)


@pytest.mark.parametrize("method", METHODS)
def test_zero_offsets_equal_plain_convolution(method, rng):
    from .test_reference import dense_conv

    g = CASES["stride-pad-dil-pairs"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    out = run(method, x, np.zeros_like(offset), weight, bias, None, g)
    expected = dense_conv(x, weight, bias, *conv_kwargs(g).values(), g.groups)
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_integer_offsets_equal_shifted_convolution(method, rng):
    """Every tap shifted by (dy, dx) = (+1, -2) is a dense, unpadded convolution of
    the canvas ``Z[a, b] = x[a - ph + 1, b - pw - 2]`` (zero outside the image)."""
    from .test_reference import dense_conv

    g = CASES["no-mask-no-bias"]
    x, offset, weight, _, _ = layer_arrays(g, rng)
    offset[:, 0::2], offset[:, 1::2] = 1.0, -2.0
    canvas = np.zeros(x.shape[:2] + (g.out_h + g.kernel_h - 1, g.out_w + g.kernel_w - 1), x.dtype)
    for a in range(canvas.shape[2]):
        for b in range(canvas.shape[3]):
            ya, xb = a - g.pad_h + 1, b - g.pad_w - 2
            if 0 <= ya < g.height and 0 <= xb < g.width:
                canvas[:, :, a, b] = x[:, :, ya, xb]
    out = run(method, x, offset, weight, None, None, g)
    expected = dense_conv(canvas, weight, None, (1, 1), (0, 0), (1, 1), g.groups)
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_offsets_far_outside_contribute_zero(method, rng):
    g = CASES["basic-3x3"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    offset[:, 0::2] = rng.choice([-1, 1], offset[:, 0::2].shape) * rng.uniform(50, 1e6, offset[:, 0::2].shape)
    out = backend.to_host(run(method, x, offset, weight, bias, mask, g))
    np.testing.assert_array_equal(out, np.broadcast_to(bias[None, :, None, None], out.shape))


@pytest.mark.parametrize("method", METHODS)
def test_points_exactly_on_the_border_band(method, rng):
    """Sampling at y = -1 or y = H (and x = -1, x = W) is zero; just inside is not."""
    g = CASES["kernel-1x1"]
    x, offset, weight, _, _ = layer_arrays(g, rng)
    oy = np.arange(g.out_h)[:, None].astype(x.dtype)
    ox = np.arange(g.out_w)[None, :].astype(x.dtype)
    for target_y, target_x in ((-1.0, 2.0), (float(g.height), 2.0), (2.0, -1.0), (1.0, float(g.width))):
        offset[:, 0] = target_y - oy
        offset[:, 1] = target_x - ox
        out = backend.to_host(run(method, x, offset, weight, None, None, g))
        np.testing.assert_array_equal(out, 0.0)
    offset[:, 0] = -0.5 - oy  # inside the band: half of row 0
    offset[:, 1] = 2.0 - ox
    out = backend.to_host(run(method, x, offset, weight, None, None, g))
    w64, x64 = weight[:, :, 0, 0].astype(np.float64), x[:, :, 0, 2].astype(np.float64)
    expected = 0.5 * np.einsum("oc,nc->no", w64, x64)[:, :, None, None]
    magnitude = 0.5 * np.einsum("oc,nc->no", np.abs(w64), np.abs(x64)).max()  # sums of random signs may cancel
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=1e-6 * magnitude)


@pytest.mark.parametrize("method", METHODS)
def test_output_is_fully_written_and_inputs_untouched(method, monkeypatch, rng):
    g = CASES["odd-everything"]
    arrays = layer_arrays(g, rng)
    copies = [a.copy() for a in arrays if a is not None]
    import deftnumba.ops as ops

    module = ops.backend.array_module(arrays[0])

    class Poisoned:  # the output deform_conv2d allocates starts as NaN: an unwritten element shows
        def __getattr__(self, name):
            if name == "empty":
                return lambda shape, dtype: module.full(shape, np.nan, dtype=dtype)
            return getattr(module, name)

    monkeypatch.setattr(ops.backend, "array_module", lambda like: Poisoned())
    out = backend.to_host(run(method, *arrays, g))
    monkeypatch.undo()
    assert np.all(np.isfinite(out))
    for before, after in zip(copies, [a for a in arrays if a is not None]):
        np.testing.assert_array_equal(before, after)


def test_results_are_reproducible(rng):
    g = CASES["offset-groups-2"]
    arrays = layer_arrays(g, rng)
    first = backend.to_host(run("auto", *arrays, g))
    second = backend.to_host(run("auto", *arrays, g))
    np.testing.assert_array_equal(first, second)


def test_unknown_method_is_rejected(rng):
    g = CASES["basic-3x3"]
    with pytest.raises(ValueError, match="method"):
        run("nope", *layer_arrays(g, rng), g)
