"""The float64 reference against definitions that share none of its code."""

import numpy as np
import pytest

from deftnumba.dcn import reference

from .cases import CASES, conv_kwargs, layer_arrays


def dense_conv(x, weight, bias, stride, padding, dilation, groups):
    """Plain grouped convolution by explicit loops (float64)."""
    n, c, h, w = x.shape
    c_out, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, c_out, out_h, out_w))
    per_out = c_out // groups
    for o in range(c_out):
        g = o // per_out
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + sh * out_h:sh, j * dw:j * dw + sw * out_w:sw]
                out[:, o] += np.einsum("nchw,c->nhw", patch[:, :, :out_h, :out_w], weight[o, :, i, j])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def brute_force_sample(img, y, x):
    """torchvision's bilinear rule for one point, by the book."""
    h, w = img.shape
    if not (-1 < y < h and -1 < x < w):
        return 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[yy, xx]
    return total


@pytest.mark.parametrize("name", ["basic-3x3", "stride-pad-dil-pairs", "groups-and-offset-groups", "kernel-2x3"])
def test_zero_offsets_equal_dense_convolution(name, rng):
    g = CASES[name]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    out = reference.deform_conv2d(x, np.zeros_like(offset), weight, bias, **conv_kwargs(g))
    expected = dense_conv(x, weight, bias, *conv_kwargs(g).values(), g.groups)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_bilinear_sample_matches_pointwise_rule(rng):
    img = rng.standard_normal((4, 5))
    ys = np.concatenate([rng.uniform(-2, 6, 300), [-1.0, -0.999, 0.0, 3.0, 3.5, 4.0, np.nan, np.inf, -np.inf]])
    xs = np.concatenate([rng.uniform(-2, 7, 300), [0.5, 0.5, -1.0, 4.0, 4.999, 5.0, 1.0, 1.0, 1.0]])
    got = reference.bilinear_sample(img, ys, xs)
    want = [brute_force_sample(img, y, x) for y, x in zip(ys, xs)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
