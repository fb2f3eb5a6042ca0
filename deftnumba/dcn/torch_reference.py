"""A differentiable deformable convolution in plain PyTorch ops.

Independent of the CUDA kernels and of ``deftnumba.reference``: bilinear
sampling by ``torch.gather`` and autograd for the gradients. It serves as

* a second, independently built reference for the layer's gradients, and
* a trainable DCN on any torch device, e.g. to learn offsets on the CPU.

Semantics are torchvision's (see ``deftnumba.reference``); non-finite
positions sample zero. Memory grows with ``C * kh*kw * Ho*Wo``: for small layers.
"""

from __future__ import annotations

import torch


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """``torchvision.ops.deform_conv2d`` semantics in differentiable torch ops."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    groups_off = offset.shape[1] // (2 * taps)
    out_h, out_w = offset.shape[2:]
    dev, dt = input.device, input.dtype

    off = offset.reshape(n, groups_off, taps, 2, out_h, out_w)
    tap_y = (torch.arange(kh, device=dev) * dh).repeat_interleave(kw).to(dt)
    tap_x = (torch.arange(kw, device=dev) * dw).repeat(kh).to(dt)
    base_y = (torch.arange(out_h, device=dev) * sh - ph).to(dt)[None, :, None] + tap_y[:, None, None]
    base_x = (torch.arange(out_w, device=dev) * sw - pw).to(dt)[None, None, :] + tap_x[:, None, None]
    y = base_y + off[:, :, :, 0]  # [N, G, K, Ho, Wo]
    x = base_x + off[:, :, :, 1]

    # Closed at -1 (torchvision's backward band): there every weight below is zero,
    # so the value is too, but autograd sees row/column 0's weight frac = y - floor(y)
    # and gives the one-sided derivative from inside. False for NaN / inf.
    inside = (y >= -1) & (y < h) & (x >= -1) & (x < w)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly, lx = y - y0, x - x0

    per_group = c // groups_off
    image = input.reshape(n, groups_off, per_group, h * w)
    sampled = torch.zeros(n, groups_off, per_group, taps * out_h * out_w, device=dev, dtype=dt)
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            ok = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long().reshape(n, groups_off, 1, -1)
            values = torch.gather(image, 3, index.expand(n, groups_off, per_group, index.shape[-1]))
            weight_corner = torch.where(ok, wy * wx, torch.zeros_like(wy)).reshape(n, groups_off, 1, -1)
            sampled = sampled + weight_corner * values
    if mask is not None:
        sampled = sampled * mask.reshape(n, groups_off, 1, -1)

    groups = c // c_per_group
    cols = sampled.reshape(n, groups, c_per_group * taps, out_h * out_w)
    w_mat = weight.reshape(groups, c_out // groups, c_per_group * taps)
    out = torch.einsum("gok,ngkp->ngop", w_mat, cols).reshape(n, c_out, out_h, out_w)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out
