"""Float64 NumPy reference for deformable convolution (DCN v1 / v2).

Written to be read, not to be fast, and deliberately independent of the CUDA
kernels: it shares no code with ``deftnumba.kernels`` and derives the layer
geometry from the arrays itself. Every kernel in the package is tested against
it.

Semantics follow ``torchvision.ops.deform_conv2d``:

* output pixel ``(oy, ox)`` and kernel tap ``(i, j)`` sample the input at
  ``y = oy*stride_h - pad_h + i*dil_h + dy`` and
  ``x = ox*stride_w - pad_w + j*dil_w + dx``;
* ``offset[n, 2*(g*kh*kw + i*kw + j) + 0]`` is ``dy`` and ``+ 1`` is ``dx``
  for offset group ``g`` (interleaved per tap);
* ``mask[n, g*kh*kw + i*kw + j]`` multiplies that sample (DCN v2);
* bilinear interpolation is zero when ``y <= -1``, ``y >= H``, ``x <= -1`` or
  ``x >= W``; inside that band, corners outside the image count as zero;
* non-finite positions (NaN, +-inf) sample zero;
* the offset gradient is the derivative of the bilinear weights, one-sided from
  the right at integer coordinates; its band is closed at -1
  (``-1 <= y < H``, ``-1 <= x < W``): exactly on ``y = -1`` (or ``x = -1``) the
  value is zero but ``d value / dy`` is the interpolation of image row 0 at
  ``x`` (the derivative from inside), as torchvision's backward computes it.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def bilinear_sample(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample ``image[..., H, W]`` at float positions ``y``, ``x`` (same shape).

    Returns an array of shape ``image.shape[:-2] + y.shape``.
    """
    height, width = image.shape[-2:]
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = np.where(inside, y, 0.0)
    x = np.where(inside, x, 0.0)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    ly, lx = y - y0, x - x0
    out = np.zeros(image.shape[:-2] + y.shape, dtype=np.float64)
    for cy, wy in ((y0, 1.0 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1.0 - lx), (x0 + 1, lx)):
            ok = inside & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
            value = image[..., np.clip(cy, 0, height - 1), np.clip(cx, 0, width - 1)]
            out += np.where(ok, wy * wx, 0.0) * value
    return out


def sampling_positions(offset, kernel_size, stride, padding, dilation):
    """Absolute sampling positions ``(y, x)``, each ``[N, G, kh*kw, Ho, Wo]``."""
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, channels, out_h, out_w = offset.shape
    groups = channels // (2 * kh * kw)
    off = np.asarray(offset, dtype=np.float64).reshape(n, groups, kh * kw, 2, out_h, out_w)
    tap_y = (np.arange(kh) * dh).repeat(kw)  # per tap, row-major over (i, j)
    tap_x = np.tile(np.arange(kw) * dw, kh)
    base_y = (np.arange(out_h) * sh - ph)[:, None] + tap_y[:, None, None]  # [K, Ho, 1]
    base_x = (np.arange(out_w) * sw - pw)[None, :] + tap_x[:, None, None]  # [K, 1, Wo]
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def columns(input, offset, kernel_size, stride=1, padding=0, dilation=1, mask=None):
    """The column matrix ``[N, C, kh*kw, Ho, Wo]`` (im2col of the sampled input)."""
    x = np.asarray(input, dtype=np.float64)
    n, c = x.shape[:2]
    kh, kw = kernel_size
    y_pos, x_pos = sampling_positions(offset, kernel_size, _pair(stride), _pair(padding), _pair(dilation))
    groups = y_pos.shape[1]
    per_group = c // groups
    cols = np.empty((n, c) + y_pos.shape[2:], dtype=np.float64)
    for b in range(n):
        for g in range(groups):
            chans = slice(g * per_group, (g + 1) * per_group)
            cols[b, chans] = bilinear_sample(x[b, chans], y_pos[b, g], x_pos[b, g])
            if mask is not None:
                m = np.asarray(mask, dtype=np.float64)[b, g * kh * kw:(g + 1) * kh * kw]
                cols[b, chans] *= m[None]
    return cols


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Float64 deformable convolution with torchvision's signature and semantics.

    Shapes: ``input [N, C, H, W]``, ``offset [N, 2*G*kh*kw, Ho, Wo]``,
    ``weight [Cout, C/groups, kh, kw]``, ``bias [Cout]``, ``mask [N, G*kh*kw, Ho, Wo]``.
    Returns ``[N, Cout, Ho, Wo]`` in float64.
    """
    w = np.asarray(weight, dtype=np.float64)
    c_out, c_per_group, kh, kw = w.shape
    cols = columns(input, offset, (kh, kw), stride, padding, dilation, mask)
    n, c, _, out_h, out_w = cols.shape
    groups = c // c_per_group
    cols = cols.reshape(n, groups, c_per_group * kh * kw, out_h * out_w)
    w = w.reshape(groups, c_out // groups, c_per_group * kh * kw)
    out = np.einsum("gok,ngkp->ngop", w, cols).reshape(n, c_out, out_h, out_w)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return out


# --------------------------------------------------------------------------- backward
Gradients = namedtuple("Gradients", "input offset weight bias mask")
Gradients.__doc__ = "Float64 gradients of ``deform_conv2d``; ``bias``/``mask`` are None when not given."

def _bilinear_corner_terms(height, width, y, x):
    """The four corners of bilinear sampling at ``(y, x)`` with their weights and derivatives.

    Yields ``(cy, cx, weight, d_weight/dy, d_weight/dx)`` per corner, each an array
    of the shape of ``y``; corners outside the image and samples outside the
    gradient band ``-1 <= y < H, -1 <= x < W`` (or non-finite) have weight and
    derivatives zero, and their indices are clipped into the image so they can
    be used to index. The band is closed at -1: there every weight is zero
    anyway (row -1 is outside, row 0 has weight ``frac(y) = 0``), but row 0's
    derivative ``+1`` survives, giving the one-sided derivative from inside.
    """
    with np.errstate(invalid="ignore"):
        inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)
    y = np.where(inside, y, 0.0)
    x = np.where(inside, x, 0.0)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    ly, lx = y - y0, x - x0
    # corner row (or column), its 1-D weight, and that weight's derivative
    rows = ((y0, 1.0 - ly, -1.0), (y0 + 1, ly, 1.0))
    cols = ((x0, 1.0 - lx, -1.0), (x0 + 1, lx, 1.0))
    for cy, wy, dwy in rows:
        for cx, wx, dwx in cols:
            ok = inside & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
            yield (np.clip(cy, 0, height - 1), np.clip(cx, 0, width - 1),
                   np.where(ok, wy * wx, 0.0), np.where(ok, dwy * wx, 0.0), np.where(ok, wy * dwx, 0.0))


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                           mask=None):
    """Float64 gradients of ``deform_conv2d`` with respect to every argument.

    ``grad_output`` is ``dL/d out`` (``[N, Cout, Ho, Wo]``). Returns ``Gradients``
    (fields ``input, offset, weight, bias, mask``; ``bias``/``mask`` are ``None``
    when the argument is ``None``), each ``dL/d argument`` in float64.

    Derivation: ``out[n, o, p] = b[o] + sum_{c, k} W[o, c, k] * m[n, g(c), k, p] *
    S[n, c, k, p]`` with ``S = sum_corners w(y, x) * I[n, c, corner]`` the bilinear
    sample. With ``gcol = dL/d cols = W^T grad_out`` (per weight group):

    * ``dL/dI[n, c, corner] += gcol * m * w``;
    * ``dL/dy = m * sum_{c in group} gcol * sum_corners (dw/dy) * I[corner]`` (x alike);
      ``dy`` is the offset's first channel of the tap, ``dx`` the second;
    * ``dL/dm = sum_{c in group} gcol * S``;
    * ``dL/dW = grad_out (x) cols``; ``dL/db = sum grad_out``.

    The bilinear weights are piecewise linear in ``y`` and ``x``; at integer
    coordinates the derivative used is the one-sided one from the right (the
    floor cell), as torchvision does, including at ``y = -1`` and ``x = -1``
    where the value itself is zero (see the module docstring).
    """
    go = np.asarray(grad_output, dtype=np.float64)
    image = np.asarray(input, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    n, c, height, width = image.shape
    c_out, c_per_group, kh, kw = w.shape
    taps = kh * kw
    groups = c // c_per_group
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_h, out_w = go.shape[2:]
    pixels = out_h * out_w

    y_pos, x_pos = sampling_positions(offset, (kh, kw), stride, padding, dilation)  # [N, G, K, Ho, Wo]
    offset_groups = y_pos.shape[1]
    per_offset_group = c // offset_groups
    y_pos = y_pos.reshape(n, offset_groups, taps, pixels)
    x_pos = x_pos.reshape(n, offset_groups, taps, pixels)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64).reshape(n, offset_groups, taps, pixels)
    else:
        m = np.ones((n, offset_groups, taps, pixels))

    # Gradient of the columns: [N, C, K, P], per weight group W^T @ grad_out.
    w_groups = w.reshape(groups, c_out // groups, c_per_group * taps)
    go_groups = go.reshape(n, groups, c_out // groups, pixels)
    gcol = np.einsum("gok,ngop->ngkp", w_groups, go_groups).reshape(n, c, taps, pixels)
    gcol = gcol.reshape(n, offset_groups, per_offset_group, taps, pixels)

    images = image.reshape(n, offset_groups, per_offset_group, height * width)
    grad_image = np.zeros((n, offset_groups, per_offset_group, height * width))
    grad_y = np.zeros((n, offset_groups, taps, pixels))
    grad_x = np.zeros((n, offset_groups, taps, pixels))
    grad_m = np.zeros((n, offset_groups, taps, pixels))
    for cy, cx, wgt, dwdy, dwdx in _bilinear_corner_terms(height, width, y_pos, x_pos):
        flat = cy * width + cx  # [N, G, K, P]
        for b in range(n):
            for g in range(offset_groups):
                corner_values = images[b, g][:, flat[b, g]]  # [C/G, K, P]
                grad_y[b, g] += np.sum(gcol[b, g] * corner_values, axis=0) * dwdy[b, g]
                grad_x[b, g] += np.sum(gcol[b, g] * corner_values, axis=0) * dwdx[b, g]
                grad_m[b, g] += np.sum(gcol[b, g] * corner_values, axis=0) * wgt[b, g]
                contribution = gcol[b, g] * (m[b, g] * wgt[b, g])[None]  # [C/G, K, P]
                for ch in range(per_offset_group):
                    np.add.at(grad_image[b, g, ch], flat[b, g].ravel(), contribution[ch].ravel())

    grad_offset = np.stack([grad_y * m, grad_x * m], axis=3).reshape(n, 2 * offset_groups * taps, out_h, out_w)
    cols = columns(image, offset, (kh, kw), stride, padding, dilation, mask)  # [N, C, K, Ho, Wo]
    cols = cols.reshape(n, groups, c_per_group * taps, pixels)
    grad_weight = np.einsum("ngop,ngkp->gok", go_groups, cols).reshape(w.shape)
    return Gradients(
        input=grad_image.reshape(image.shape),
        offset=grad_offset,
        weight=grad_weight,
        bias=go.sum(axis=(0, 2, 3)) if bias is not None else None,
        mask=grad_m.reshape(n, offset_groups * taps, out_h, out_w) if mask is not None else None,
    )
