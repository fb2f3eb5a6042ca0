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
* non-finite positions (NaN, +-inf) sample zero.
"""

from __future__ import annotations

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
