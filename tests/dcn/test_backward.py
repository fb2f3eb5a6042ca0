"""The backward: reference gradients against finite differences, every backward
method (atomic and deterministic) against the reference and against finite
differences, bit-identical deterministic runs, torchvision's zero rule outside
the band, poisoned outputs and argument errors."""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import ops, reference
from deftnumba.dcn.geometry import Geometry

from .cases import CASES, conv_kwargs, layer_arrays, rel_error, tolerance

METHODS = list(dn.BACKWARD_METHODS)
FIELDS = ("input", "offset", "weight", "bias", "mask")
MODES = {"atomic": False, "deterministic": True}


def as_float64(g: Geometry) -> Geometry:
    return Geometry(**{**g.__dict__, "dtype": "float64"})


def smooth_arrays(g: Geometry, rng, offset_scale=2.0):
    """Layer arrays whose samples keep away from integer coordinates.

    Sampling positions are integers plus the offsets, so offsets with fractional
    parts in [0.2, 0.8] keep every sample at least 0.2 from the kinks of the
    bilinear function: integer rows and columns, and the band edges -1, H and W.
    """
    x, offset, weight, bias, mask = layer_arrays(g, rng, offset_scale)
    offset = (np.floor(offset) + rng.uniform(0.2, 0.8, offset.shape)).astype(offset.dtype)
    return x, offset, weight, bias, mask


def grad_out_for(g: Geometry, rng):
    return rng.standard_normal(g.shapes["output"]).astype(g.dtype)


def run(method, grad_output, x, offset, weight, bias, mask, g, deterministic=False):
    arrays = [backend.to_device(a) if a is not None else None for a in (grad_output, x, offset, weight, bias, mask)]
    grads = dn.deform_conv2d_backward(*arrays[:5], **conv_kwargs(g), mask=arrays[5], method=method,
                                      deterministic=deterministic)
    return dn.DeformConv2dGrads(*(backend.to_host(a) if a is not None else None for a in grads))


def directional_check(grads, grad_output, arrays, g, rng, h=1e-6, rtol=1e-6):
    """<grad, v> against the central difference of L = <grad_out, forward> along a random v.

    One random direction per argument costs two float64 reference forwards, where
    per-element differences would cost two per element.
    """
    x, offset, weight, bias, mask = arrays
    args = dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask)
    go = grad_output.astype(np.float64)

    def loss(**change):
        a = {**args, **change}
        out = reference.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], **conv_kwargs(g),
                                      mask=a["mask"])
        return float(np.sum(go * out))

    for name in FIELDS:
        value = args[name]
        if value is None:
            assert getattr(grads, name) is None
            continue
        v = rng.standard_normal(value.shape)
        plus, minus = loss(**{name: value + h * v}), loss(**{name: value - h * v})
        numeric = (plus - minus) / (2 * h)
        analytic = float(np.sum(np.asarray(getattr(grads, name), dtype=np.float64) * v))
        scale = max(abs(numeric), float(np.linalg.norm(getattr(grads, name)) * np.linalg.norm(v)) * 1e-3, 1e-12)
        # the difference quotient's own rounding: a few ulps of the loss, divided by 2h (~1e-9
        # for losses of order 1); it dominates when the directional derivative is tiny
        rounding = 8 * np.finfo(np.float64).eps * max(abs(plus), abs(minus), 1.0) / (2 * h)
        assert abs(analytic - numeric) <= rtol * scale + rounding, (name, analytic, numeric)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("name", ["basic-3x3", "stride-pad-dil-pairs", "kernel-2x3", "groups-and-offset-groups",
                                  "offset-groups-2", "odd-everything", "batch-1-image-1x1"])
def test_reference_gradients_match_finite_differences(name, rng):
    g = as_float64(CASES[name])
    arrays = smooth_arrays(g, rng)
    go = grad_out_for(g, rng)
    grads = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    directional_check(grads, go, arrays, g, rng)


def test_reference_offset_gradient_per_element(rng):
    """Every element of the offset and mask gradient, by central differences (tiny case)."""
    g = as_float64(CASES["kernel-1x1"])
    g = Geometry(**{**g.__dict__, "batch": 1, "in_channels": 2, "out_channels": 3})
    x, offset, weight, bias, mask = smooth_arrays(g, rng)
    go = grad_out_for(g, rng)
    grads = reference.deform_conv2d_backward(go, x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    h = 1e-6
    for name, array, grad in (("offset", offset, grads.offset), ("mask", mask, grads.mask)):
        numeric = np.empty(array.shape)
        for index in np.ndindex(array.shape):
            up, down = array.copy(), array.copy()
            up[index] += h
            down[index] -= h
            args = {"offset": offset, "mask": mask, name: up}
            plus = np.sum(go * reference.deform_conv2d(x, args["offset"], weight, bias, **conv_kwargs(g),
                                                        mask=args["mask"]))
            args = {"offset": offset, "mask": mask, name: down}
            minus = np.sum(go * reference.deform_conv2d(x, args["offset"], weight, bias, **conv_kwargs(g),
                                                         mask=args["mask"]))
            numeric[index] = (plus - minus) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(method, mode, name, rng):
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    expected = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    grads = run(method, go, *arrays, g, deterministic=MODES[mode])
    for field in FIELDS:
        got, want = getattr(grads, field), getattr(expected, field)
        if want is None:
            assert got is None, field
            continue
        assert got.shape == want.shape and got.dtype == np.dtype(g.dtype), field
        assert rel_error(got, want) < 10 * tolerance(g.dtype), (field, rel_error(got, want))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_gradients_match_finite_differences(method, mode, name, rng):
    """The issue's check, directly: float64 kernel gradients against finite differences."""
    g = as_float64(CASES[name])
    arrays = smooth_arrays(g, rng)
    go = grad_out_for(g, rng)
    grads = run(method, go, *arrays, g, deterministic=MODES[mode])
    directional_check(grads, go, arrays, g, rng)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", METHODS)
def test_more_images_than_one_chunk(method, mode, rng):
    """34 images: two chunks of the image loop (``im2col.CHUNK_IMAGES`` is 32)."""
    from deftnumba.dcn.kernels import im2col

    g = CASES["basic-3x3"]
    g = Geometry(**{**g.__dict__, "batch": im2col.CHUNK_IMAGES + 2, "in_channels": 1, "out_channels": 2,
                    "height": 3, "width": 4})
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    expected = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    grads = run(method, go, *arrays, g, deterministic=MODES[mode])
    for field in FIELDS:
        assert rel_error(getattr(grads, field), getattr(expected, field)) < 10 * tolerance(g.dtype), field


def collision_arrays(g: Geometry, rng):
    """Offsets that pile every sample of every tap onto the few pixels around (1.5, 2.5)."""
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    k = g.kernel_h * g.kernel_w
    tap_y = (np.arange(g.kernel_h) * g.dil_h).repeat(g.kernel_w)
    tap_x = np.tile(np.arange(g.kernel_w) * g.dil_w, g.kernel_h)
    base_y = (np.arange(g.out_h) * g.stride_h - g.pad_h)[None, :, None] + tap_y[:, None, None]
    base_x = (np.arange(g.out_w) * g.stride_w - g.pad_w)[None, None, :] + tap_x[:, None, None]
    shape = (g.batch, g.offset_groups, k, g.out_h, g.out_w)
    dy = 1.5 - base_y + rng.uniform(-0.4, 0.4, shape)
    dx = 2.5 - base_x + rng.uniform(-0.4, 0.4, shape)
    offset = np.stack([dy, dx], axis=3).reshape(offset.shape).astype(offset.dtype)
    return x, offset, weight, bias, mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["basic-3x3", "offset-groups-2"])
def test_deterministic_runs_are_bit_identical(method, name, rng):
    g = CASES[name]
    arrays = collision_arrays(g, rng)
    go = grad_out_for(g, rng)
    # Two different block/thread orders (the simulator's stand-in for two GPU runs): an
    # atomic path would change bits here (test_backward_fused checks that it does).
    with backend.order_varying(1), backend.launch_log() as launched:
        first = run(method, go, *arrays, g, deterministic=True)
    with backend.order_varying(2):
        second = run(method, go, *arrays, g, deterministic=True)
    # the order-fixed gather ran (gather_kernel, or gather_staged_kernel for the column-free
    # methods), and no atomic scatter kernel (col2im) did
    assert any("gather" in k for k in launched) and not any("col2im" in k for k in launched)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field), err_msg=field)
    # the collisions are real: at most 12 input pixels per channel receive anything
    assert np.count_nonzero(first.input[0, 0]) <= 12
    expected = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    assert rel_error(first.input, expected.input) < 10 * tolerance(g.dtype)


@pytest.mark.parametrize("keys", ["narrow", "wide"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["odd-everything", "eight-channels"])
def test_deterministic_gather_in_row_parts(method, name, keys, rng, monkeypatch):
    """The gather sorts in parts of output rows (here one row per part: the most parts) and
    with 32- or 64-bit packed keys: every part after the first adds to grad_input, in a fixed
    order, so the result matches the reference and is bit-identical under two block orders.
    ``eight-channels`` gives gather threads of 8 channels, ``odd-everything`` of 1."""
    from deftnumba.dcn.kernels import backward as bk

    g = CASES["odd-everything"] if name == "odd-everything" else Geometry(
        **{**CASES["basic-3x3"].__dict__, "in_channels": 8, "out_channels": 3, "height": 4, "width": 6})
    layout = bk.sort_key_layout
    monkeypatch.setattr(bk, "sort_part_rows", lambda g_, n, budget=None: 1)
    monkeypatch.setattr(bk, "sort_key_layout", lambda *a: (layout(*a)[0], keys == "wide"))
    arrays = collision_arrays(g, rng) if name == "eight-channels" else layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.order_varying(3), backend.launch_log() as launched:
        first = run(method, go, *arrays, g, deterministic=True)
    with backend.order_varying(4):
        second = run(method, go, *arrays, g, deterministic=True)
    entries = [k for k in launched if "entries_kernel" in k]
    assert len(entries) >= g.out_h  # one sort per output row (per chunk of images)
    np.testing.assert_array_equal(first.input, second.input)
    expected = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    assert rel_error(first.input, expected.input) < 10 * tolerance(g.dtype)


def test_sort_parts_fit_their_budget():
    """``sort_part_rows`` picks as few equal parts as fit the budget, and one part without one."""
    from deftnumba.dcn.kernels import backward as bk

    g = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=True, has_bias=True)
    assert bk.sort_part_rows(g, 1) == 64
    whole = bk.sort_part_bytes(g, 1, 64)
    assert bk.sort_key_layout(g, 1, 64) == (18, False)  # 4*9*4096 ids (18 bits), 4097 destinations (13)
    half = bk.sort_part_bytes(g, 1, 32)
    assert half < whole and bk.sort_part_rows(g, 1, half) == 32  # two parts
    assert bk.sort_part_rows(g, 1, half - 1) == 22  # three parts: 22 + 22 + 20 rows
    assert bk.sort_part_rows(g, 1, 1) == 1  # at least one row
    # eight images of 64x64 and 64 rows need 33 bits: 64-bit keys
    assert bk.sort_key_layout(g, 8, 64)[1] and not bk.sort_key_layout(g, 8, 16)[1]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", METHODS)
def test_samples_far_outside_get_zero_gradients(method, mode, rng):
    """Outside the band (and for NaN/inf positions) a sample has no value and no gradient."""
    g = CASES["basic-3x3"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    far = np.zeros(offset.shape[1] // 2, dtype=bool)
    far[::2] = True  # every other tap samples far away; the others are ordinary
    dy = offset[:, 0::2]
    dy[:, far] = rng.choice([-1, 1], dy[:, far].shape) * rng.uniform(50, 1e6, dy[:, far].shape)
    dy[0, 0, 0, 0], dy[0, 0, 0, 1], dy[1, 2, 1, 1] = np.nan, np.inf, -np.inf
    go = grad_out_for(g, rng)
    grads = run(method, go, x, offset, weight, bias, mask, g, deterministic=MODES[mode])
    for field in FIELDS:
        assert np.all(np.isfinite(getattr(grads, field))), field
    np.testing.assert_array_equal(grads.offset[:, 0::2][:, far], 0.0)
    np.testing.assert_array_equal(grads.offset[:, 1::2][:, far], 0.0)
    np.testing.assert_array_equal(grads.mask[:, far], 0.0)
    assert np.count_nonzero(grads.offset[:, 0::2][:, ~far]) > 0
    # the input gradient is the one of the ordinary taps alone (far taps masked out)
    mask_near = mask.copy()
    mask_near[:, far] = 0.0
    offset_clean = np.where(np.isfinite(offset), offset, 0.0)
    expected = reference.deform_conv2d_backward(go, x, offset_clean, weight, bias, **conv_kwargs(g),
                                                mask=mask_near)
    assert rel_error(grads.input, expected.input) < 10 * tolerance(g.dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_all_samples_far_outside(mode, rng):
    g = CASES["groups-2"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    offset[:, 1::2] = rng.choice([-1, 1], offset[:, 1::2].shape) * rng.uniform(50, 1e6, offset[:, 1::2].shape)
    go = grad_out_for(g, rng)
    grads = run("auto", go, x, offset, weight, bias, mask, g, deterministic=MODES[mode])
    for field in ("input", "offset", "weight", "mask"):
        np.testing.assert_array_equal(getattr(grads, field), 0.0, err_msg=field)
    # float32 sums of random signs can land near zero: bound the error by the magnitudes summed
    # (a bare rtol failed for ~2.5% of seeds).
    np.testing.assert_allclose(grads.bias, go.astype(np.float64).sum(axis=(0, 2, 3)), rtol=0,
                               atol=1e-6 * float(np.abs(go).astype(np.float64).sum(axis=(0, 2, 3)).max()))


@pytest.mark.parametrize("mode", list(MODES))
def test_samples_on_the_band_edge(mode, rng):
    """y = H and x = W are outside: no value, no gradient. y = -1 and x = -1 are
    outside for the value and the input/weight/mask gradients, but the offset
    gradient there is the one-sided derivative from inside, as torchvision's
    backward computes it: d out / dy at y = -1 interpolates image row 0 at x."""
    g = CASES["kernel-1x1"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    oy = np.arange(g.out_h)[:, None].astype(x.dtype)
    ox = np.arange(g.out_w)[None, :].astype(x.dtype)
    go = grad_out_for(g, rng)
    # grad_cols[n, c, p] = sum_o W[o, c] grad_out[n, o, p] (1x1 kernel, one group)
    gcol = np.einsum("oc,nohw->nchw", weight[:, :, 0, 0].astype(np.float64), go.astype(np.float64))
    m = mask[:, 0].astype(np.float64)
    xd = x.astype(np.float64)
    for target_y, target_x in ((float(g.height), 2.5), (1.5, float(g.width)), (-1.0, 2.5), (2.5, -1.0),
                               (-1.0, -1.0)):
        offset[:, 0] = target_y - oy
        offset[:, 1] = target_x - ox
        grads = run("auto", go, x, offset, weight, bias, mask, g, deterministic=MODES[mode])
        for field in ("input", "weight", "mask"):
            np.testing.assert_array_equal(getattr(grads, field), 0.0, err_msg=field)
        expected = np.zeros(offset.shape)
        if target_y == -1.0 and target_x == 2.5:  # row 0 between columns 2 and 3
            row0 = 0.5 * (xd[:, :, 0, 2] + xd[:, :, 0, 3])  # [N, C]
            expected[:, 0] = m * np.einsum("nchw,nc->nhw", gcol, row0)
        if target_y == 2.5 and target_x == -1.0:  # column 0 between rows 2 and 3
            col0 = 0.5 * (xd[:, :, 2, 0] + xd[:, :, 3, 0])
            expected[:, 1] = m * np.einsum("nchw,nc->nhw", gcol, col0)
        scale = np.abs(gcol).sum(axis=1).max() * np.abs(xd).max()
        np.testing.assert_allclose(grads.offset, expected, rtol=0, atol=1e-5 * scale,
                                   err_msg=f"offset at {(target_y, target_x)}")
        ref = reference.deform_conv2d_backward(go, x, offset, weight, bias, **conv_kwargs(g), mask=mask)
        np.testing.assert_allclose(ref.offset, expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", METHODS)
def test_outputs_fully_written_and_inputs_untouched(method, mode, rng, monkeypatch, poison_allocations):
    """Gradients are allocated poisoned (NaN); every element must be overwritten."""
    poison_allocations(ops)
    g = CASES["odd-everything"]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    copies = [a.copy() for a in (go, *arrays) if a is not None]
    grads = run(method, go, *arrays, g, deterministic=MODES[mode])
    for field in FIELDS:
        value = getattr(grads, field)
        assert value is None or np.all(np.isfinite(value)), field
    for before, after in zip(copies, [a for a in (go, *arrays) if a is not None]):
        np.testing.assert_array_equal(before, after)


def test_returns_named_tuple_with_none_for_missing_arguments(rng):
    g = CASES["no-mask-no-bias"]
    x, offset, weight, _, _ = layer_arrays(g, rng)
    grads = dn.deform_conv2d_backward(grad_out_for(g, rng), x, offset, weight, padding=1)
    assert isinstance(grads, dn.DeformConv2dGrads) and grads._fields == FIELDS
    assert grads.bias is None and grads.mask is None
    assert grads.input.shape == x.shape and grads.offset.shape == offset.shape
    assert grads.weight.shape == weight.shape


@pytest.fixture
def good(rng):
    g = CASES["offset-groups-2"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    return dict(grad_output=grad_out_for(g, rng), input=x, offset=offset, weight=weight, bias=bias, padding=1,
                mask=mask)


BAD = [
    (lambda a: dict(grad_output=a["grad_output"][0]), ValueError, r"grad_output must be 4-D"),
    (lambda a: dict(grad_output=a["grad_output"][:, :5]), ValueError,
     r"grad_output must have the output's shape \[N, Cout, Ho, Wo\] = \(2, 6, 5, 7\), got \(2, 5, 5, 7\)"),
    (lambda a: dict(grad_output=a["grad_output"][:, :, :4]), ValueError, r"grad_output must have the output's shape"),
    (lambda a: dict(grad_output=a["grad_output"].astype(np.float64)), TypeError,
     r"grad_output must have the dtype of input \(float32\), got float64"),
    (lambda a: dict(grad_output=a["grad_output"].astype(np.int64)), TypeError,
     r"grad_output must be float32, float64, float16 or bfloat16, got int64"),
    (lambda a: dict(grad_output=a["grad_output"].tolist()), TypeError, r"grad_output must be a NumPy or CuPy array"),
    (lambda a: dict(weight=a["weight"][:, :3]), ValueError, r"weight.shape\[1\]"),
    (lambda a: dict(mask=a["mask"][:, :9]), ValueError, r"mask must have shape"),
]


@pytest.mark.parametrize("change, error, message", BAD)
def test_bad_arguments_raise_clear_errors(good, change, error, message):
    with pytest.raises(error, match=message):
        dn.deform_conv2d_backward(**{**good, **change(good)})


def test_unknown_method_is_rejected(good):
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        dn.deform_conv2d_backward(**good, method="nope")
