"""The float64 NumPy rule every Tucker method is tested against.

A Tucker-format layer is three convolutions::

    hidden_in  = conv2d(input, first)                              1x1, C -> r_in
    hidden_out = conv2d(hidden_in, core, stride, padding, dilation, groups)
    output     = conv2d(hidden_out, last) + bias                   1x1, r_out -> Cout

and equals one ``conv2d(input, reconstruct(first, core, last, groups), bias, ...)``
because zero padding commutes with the 1x1 convolutions (a 1x1 conv of zeros is zero,
and ``first`` has no bias). ``conv2d`` below is the direct definition
(PyTorch's cross-correlation), written as one ``einsum`` per tap.
"""

from __future__ import annotations

import numpy as np

from .geometry import pair


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> np.ndarray:
    """``torch.nn.functional.conv2d`` in float64 NumPy. input ``[N, C, H, W]``, weight
    ``[Cout, C/groups, kh, kw]``, bias ``[Cout]`` or None; returns ``[N, Cout, Ho, Wo]``."""
    x = np.asarray(input, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    n, c, h, wd = x.shape
    c_out, cpg, kh, kw = w.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph:ph + h, pw:pw + wd] = x
    opg = c_out // groups
    out = np.zeros((n, c_out, out_h, out_w))
    for g in range(groups):
        xs = padded[:, g * cpg:(g + 1) * cpg]
        ws = w[g * opg:(g + 1) * opg]
        for i in range(kh):
            for j in range(kw):
                window = xs[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh,
                            j * dw: j * dw + sw * (out_w - 1) + 1: sw]
                out[:, g * opg:(g + 1) * opg] += np.einsum("oc,nchw->nohw", ws[:, :, i, j], window)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return out


def dense_core(core, groups: int = 1) -> np.ndarray:
    """A grouped core ``[r_out, r_in/groups, kh, kw]`` as a dense block-diagonal
    ``[r_out, r_in, kh, kw]`` (zeros between groups)."""
    core = np.asarray(core)
    r_out, rpg, kh, kw = core.shape
    if groups == 1:
        return core
    dense = np.zeros((r_out, rpg * groups, kh, kw), dtype=core.dtype)
    opg = r_out // groups
    for g in range(groups):
        dense[g * opg:(g + 1) * opg, g * rpg:(g + 1) * rpg] = core[g * opg:(g + 1) * opg]
    return dense


def reconstruct(first, core, last, groups: int = 1) -> np.ndarray:
    """The dense weight ``W[o, c] = sum_ab last[o, a] core[a, b] first[b, c]`` (float64),
    ``[Cout, C, kh, kw]``."""
    f = np.asarray(first, dtype=np.float64)[:, :, 0, 0]
    l = np.asarray(last, dtype=np.float64)[:, :, 0, 0]
    k = dense_core(np.asarray(core, dtype=np.float64), groups)
    return np.einsum("oa,abhw,bc->ochw", l, k, f, optimize=True)


def tucker_conv2d_reference(input, first, core, last, bias=None, stride=1, padding=0, dilation=1,
                            groups=1) -> np.ndarray:
    """The three convolutions in float64 (``[N, Cout, Ho, Wo]``)."""
    hidden_in = conv2d(input, first)
    hidden_out = conv2d(hidden_in, core, None, stride, padding, dilation, groups)
    return conv2d(hidden_out, last, bias)
