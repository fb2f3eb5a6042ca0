"""The float64 NumPy reference of the lean operator, forward and backward.

Slow and obvious on purpose: every kernel is tested against these functions.
``taps`` is a tuple of ``(dy, dx)`` pairs (``geometry.PATTERNS``); output pixel
``(oy, ox)`` is centred on input pixel ``(oy*sh, ox*sw)``; taps outside the
image read zero (padding 1 on the 3x3 footprint).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _shifted(padded, dy, dx, out_h, out_w, sh, sw):
    """``x[n, c, oy*sh + dy, ox*sw + dx]`` for every output pixel, from the 1-padded input."""
    return padded[:, :, 1 + dy: 1 + dy + (out_h - 1) * sh + 1: sh,
                  1 + dx: 1 + dx + (out_w - 1) * sw + 1: sw]


def lean_conv2d_reference(input, pointwise, stencil, bias=None, stride=(1, 1), taps=((0, 0),)):
    """``conv1x1(x, pointwise, stride) + depthwise(x, stencil, taps, stride) + bias`` in float64."""
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    x = np.asarray(input, dtype=np.float64)
    n, c, h, w = x.shape
    pw = np.asarray(pointwise, dtype=np.float64).reshape(c, c)
    st = np.asarray(stencil, dtype=np.float64)
    out_h, out_w = (h - 1) // sh + 1, (w - 1) // sw + 1
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    centre = _shifted(padded, 0, 0, out_h, out_w, sh, sw)
    y = np.einsum("oc,nchw->nohw", pw, centre)
    for t, (dy, dx) in enumerate(taps):
        y += st[None, :, t, None, None] * _shifted(padded, dy, dx, out_h, out_w, sh, sw)
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return y


class LeanGrads(NamedTuple):
    """Gradients of the lean operator; ``bias`` is None when the layer has no bias."""

    input: object
    pointwise: object
    stencil: object
    bias: object


def lean_conv2d_backward_reference(grad_output, input, pointwise, stencil, bias=None, stride=(1, 1),
                                   taps=((0, 0),)) -> LeanGrads:
    """All gradients of ``sum(grad_output * lean_conv2d(...))`` in float64.

    ``pointwise`` comes back with the shape it was given (``[C, C]`` or ``[C, C, 1, 1]``).
    """
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    x = np.asarray(input, dtype=np.float64)
    gy = np.asarray(grad_output, dtype=np.float64)
    n, c, h, w = x.shape
    pw_shape = np.shape(pointwise)
    pw = np.asarray(pointwise, dtype=np.float64).reshape(c, c)
    st = np.asarray(stencil, dtype=np.float64)
    out_h, out_w = gy.shape[2], gy.shape[3]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    centre = _shifted(padded, 0, 0, out_h, out_w, sh, sw)
    grad_pw = np.einsum("nohw,nchw->oc", gy, centre).reshape(pw_shape)
    grad_st = np.stack([np.einsum("nchw,nchw->c", gy, _shifted(padded, dy, dx, out_h, out_w, sh, sw))
                        for dy, dx in taps], axis=1)
    grad_padded = np.zeros_like(padded)
    grad_padded[:, :, 1: 1 + (out_h - 1) * sh + 1: sh, 1: 1 + (out_w - 1) * sw + 1: sw] += (
        np.einsum("oc,nohw->nchw", pw, gy))
    for t, (dy, dx) in enumerate(taps):
        grad_padded[:, :, 1 + dy: 1 + dy + (out_h - 1) * sh + 1: sh,
                    1 + dx: 1 + dx + (out_w - 1) * sw + 1: sw] += st[None, :, t, None, None] * gy
    grad_x = grad_padded[:, :, 1:h + 1, 1:w + 1]
    grad_b = gy.sum(axis=(0, 2, 3)) if bias is not None else None
    return LeanGrads(grad_x, grad_pw, grad_st, grad_b)


def dense_equivalent(pointwise, stencil, taps) -> np.ndarray:
    """The lean operator as a dense ``[C, C, 3, 3]`` weight (padding 1): the pointwise
    matrix at the centre tap plus the stencil on the diagonal. Used to test the
    reference against an independent dense convolution."""
    st = np.asarray(stencil, dtype=np.float64)
    c = st.shape[0]
    weight = np.zeros((c, c, 3, 3))
    weight[:, :, 1, 1] = np.asarray(pointwise, dtype=np.float64).reshape(c, c)
    for t, (dy, dx) in enumerate(taps):
        weight[np.arange(c), np.arange(c), 1 + dy, 1 + dx] += st[:, t]
    return weight
