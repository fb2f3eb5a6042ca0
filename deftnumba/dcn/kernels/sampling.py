"""Device functions shared by every kernel: where a tap samples, and how.

The torchvision rule lives here once. A tap ``(i, j)`` of output pixel
``(oy, ox)`` samples at ``y = oy*sh - ph + i*dh + dy``,
``x = ox*sw - pw + j*dw + dx``. Bilinear interpolation there is

* zero unless ``-1 < y < H`` and ``-1 < x < W`` (so NaN and +-inf sample zero,
  and no float is ever converted to an out-of-range integer);
* otherwise the weighted sum of the four corners, a corner outside the image
  counting as zero.

The offset gradient (``bilinear_corner_gradients``) follows torchvision's
backward, whose band is closed at -1: ``-1 <= y < H`` and ``-1 <= x < W``
(``in_gradient_band``). At a sample exactly on ``y = -1`` every corner weight
is zero (row -1 is outside the image, row 0 has weight ``frac(y) = 0``), so
value, input gradient and mask gradient are zero as everywhere outside the
open band; but ``d value / dy`` is the one-sided derivative from inside, the
bilinear interpolation of image row 0 at ``x`` (and at ``x = -1`` the
interpolation of column 0 at ``y`` for ``d value / dx``). Everywhere else the
two bands agree (at ``y = H`` both give zero). This is the standard first
step of every DCN layer: zero offsets with padding 1 put every top-row tap of
output row 0 on ``y = -1``. **This is the one place the rule lives**; the
float64 references (``deftnumba.reference``, ``deftnumba.torch_reference``)
state it again independently.

``bilinear_corners`` returns corner indices already clamped into the image and
the four weights with out-of-image corners zeroed, so the gather that follows is
branch-free and can never address memory outside the image. (A side effect: a
non-finite *input* value on the border can leak into a neighbouring sample with
weight zero, as ``0 * inf = NaN``.)

Device functions come from ``sampling_functions(dtype)``, a factory cached per
dtype, so that float32 kernels get float32 constants and never promote to float64.
``dtype`` is the user's (storage) dtype: for float16 and bfloat16 the functions compute
in float32 (``T``) and ``tap_position`` reads the offsets through ``load``
(``runtime.precision``), which the namespace also exports with ``store``.
Kernels must bind the functions they use to plain local names before their
``@cuda.jit`` body (``bilinear_sample = sampling_functions(dtype).bilinear_sample``):
real numba-cuda cannot type attribute access on the namespace; the simulator can.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ...runtime.backend import cuda
from ...runtime.precision import as_dtype, precision


def sampling_functions(dtype) -> SimpleNamespace:
    """The device functions for one storage dtype (``float32``, ``float64``, ``float16`` or
    ``bfloat16``; the halves compute in float32)."""
    return _sampling_functions(as_dtype(dtype).name)


@functools.cache
def _sampling_functions(dtype: str) -> SimpleNamespace:
    prec = precision(dtype)
    load = prec.load  # reads of the storage arrays (offsets here)
    load_at = prec.load_at  # (through a runtime.addresses handle)
    T = prec.T  # converter and constant type used inside kernels (the compute type)
    ZERO = T(0)
    ONE = T(1)
    MINUS_ONE = T(-1)

    @cuda.jit(device=True, inline=True)
    def tap_position(offset, n, group, tap, oy, ox, conv):
        """Sampling position ``(y, x)`` of ``tap`` for output pixel ``(oy, ox)``.

        ``offset`` is ``[N, 2*G*K, Ho, Wo]`` with ``(dy, dx)`` interleaved per tap;
        ``conv`` is the int32 tuple ``(sh, sw, ph, pw, dh, dw, kh, kw)``.
        """
        sh, sw, ph, pw, dh, dw, kh, kw = conv
        i = np.int32(np.uint32(tap) // np.uint32(kw))  # 32-bit: no 64-bit division call
        j = np.int32(tap) - i * kw
        channel = 2 * (group * kh * kw + tap)
        y = T(oy * sh - ph + i * dh) + load(offset, (n, channel, oy, ox))
        x = T(ox * sw - pw + j * dw) + load(offset, (n, channel + 1, oy, ox))
        return y, x

    @cuda.jit(device=True, inline=True)
    def tap_position_at(offset, group, tap, oy, ox, out_w, out_plane, kw, sh, sw, dh, dw, ph, pw):
        """``tap_position`` for kernels that index an image in 32 bits: ``offset`` flat and
        contiguous, ``group`` the handle (``runtime.addresses``) of ``offset[n, 2*g*K, 0, 0]``;
        ``tap``, ``oy``, ``ox``, ``out_w``, ``out_plane`` (``Ho*Wo``) unsigned 32-bit; the tap
        geometry ``kw, sh, sw, dh, dw`` best passed as compile-time constants (then the tap's
        row is a multiply, not a division); ``ph, pw`` int32. Every sum is cast back to 32
        bits (Numba types ``int32 + int32`` as ``int64``)."""
        i = np.uint32(np.uint32(tap) // np.uint32(kw))
        j = np.uint32(np.uint32(tap) - np.uint32(i * np.uint32(kw)))
        at = np.uint32(np.uint32(np.uint32(tap * np.uint32(2)) * out_plane) + np.uint32(np.uint32(oy * out_w) + ox))
        y = T(np.int32(np.int32(np.int32(oy * np.uint32(sh)) + np.int32(i * np.uint32(dh))) - ph)) \
            + load_at(offset, group, at)
        x = T(np.int32(np.int32(np.int32(ox * np.uint32(sw)) + np.int32(j * np.uint32(dw))) - pw)) \
            + load_at(offset, group, np.uint32(at + out_plane))
        return y, x

    @cuda.jit(device=True, inline=True)
    def in_band(y, x, height, width):
        """True where torchvision samples at all: ``-1 < y < H`` and ``-1 < x < W``.
        False for NaN and +-inf, so no non-finite position is ever floored."""
        return y > MINUS_ONE and y < T(height) and x > MINUS_ONE and x < T(width)

    @cuda.jit(device=True, inline=True)
    def in_gradient_band(y, x, height, width):
        """True where torchvision's backward has offset gradients: ``-1 <= y < H`` and
        ``-1 <= x < W`` (``in_band`` closed at -1; see the module docstring).
        False for NaN and +-inf."""
        return y >= MINUS_ONE and y < T(height) and x >= MINUS_ONE and x < T(width)

    @cuda.jit(device=True, inline=True)
    def bilinear_axis(v, size):
        """One axis of the bilinear rule at ``v`` (inside the band ``-1 <= v < size``).

        Returns ``(lo, hi, w_lo, w_hi, dw_lo, dw_hi)``: the two neighbouring indices
        clamped into ``[0, size-1]``, their weights ``1 - frac(v)`` and ``frac(v)``,
        and the weights' derivatives ``-1`` and ``+1``; a weight and its derivative
        are zero where the index lies outside the image.
        """
        f = math.floor(v)
        frac = v - T(f)
        lo = np.int32(f)
        hi = np.int32(lo + 1)  # int32 throughout (numba widens int32 sums to int64)
        lo_inside = lo >= 0
        hi_inside = hi < size
        # (each conditional its own statement: docs/contributing.md, "One value per join")
        w_lo = ONE - frac if lo_inside else ZERO
        w_hi = frac if hi_inside else ZERO
        dw_lo = MINUS_ONE if lo_inside else ZERO
        dw_hi = ONE if hi_inside else ZERO
        return max(lo, np.int32(0)), min(hi, np.int32(size - 1)), w_lo, w_hi, dw_lo, dw_hi

    @cuda.jit(device=True, inline=True)
    def bilinear_corners(y, x, height, width):
        """``(y0, y1, x0, x1, w00, w01, w10, w11)`` for sampling at ``(y, x)``.

        Indices are clamped into ``[0, H-1] x [0, W-1]``; a corner outside the
        image, or a sample outside the band ``-1 < y < H, -1 < x < W``, gets
        weight zero. ``value = w00*I[y0,x0] + w01*I[y0,x1] + w10*I[y1,x0] + w11*I[y1,x1]``.
        """
        if not in_band(y, x, height, width):
            return 0, 0, 0, 0, ZERO, ZERO, ZERO, ZERO
        y0, y1, wy0, wy1, _, _ = bilinear_axis(y, height)
        x0, x1, wx0, wx1, _, _ = bilinear_axis(x, width)
        return y0, y1, x0, x1, wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1

    @cuda.jit(device=True, inline=True)
    def bilinear_sample(image, n, c, y, x):
        """Bilinear sample of ``image[n, c]`` (an ``[N, C, H, W]`` array) at ``(y, x)``."""
        y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, image.shape[2], image.shape[3])
        return (w00 * image[n, c, y0, x0] + w01 * image[n, c, y0, x1]
                + w10 * image[n, c, y1, x0] + w11 * image[n, c, y1, x1])

    @cuda.jit(device=True, inline=True)
    def bilinear_corner_gradients(y, x, height, width):
        """Corners, weights and weight derivatives for the backward at ``(y, x)``.

        Returns ``(y0, y1, x0, x1, w00, w01, w10, w11, gy00, gy01, gy10, gy11,
        gx00, gx01, gx10, gx11)``: the corners and weights of ``bilinear_corners``
        (same clamping, same zeros), plus ``gyab = d wab / dy`` and
        ``gxab = d wab / dx``. With ``wy0 = 1 - ly``, ``wy1 = ly`` (``ly`` the
        fractional part of ``y``), ``d wy0/dy = -1`` and ``d wy1/dy = +1``
        (one-sided from the right at integers); a row or column outside the
        image has weight and derivative zero, and so has a sample outside the
        gradient band ``-1 <= y < H, -1 <= x < W`` (torchvision's rule). On
        ``y = -1`` or ``x = -1`` all weights are zero but a derivative is not:
        the one-sided derivative from inside. So ``d value / dy = sum gyab * I[ya, xb]``.
        """
        if not in_gradient_band(y, x, height, width):
            return (0, 0, 0, 0, ZERO, ZERO, ZERO, ZERO,
                    ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO)
        y0, y1, wy0, wy1, sy0, sy1 = bilinear_axis(y, height)
        x0, x1, wx0, wx1, sx0, sx1 = bilinear_axis(x, width)
        return (y0, y1, x0, x1,
                wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1,
                sy0 * wx0, sy0 * wx1, sy1 * wx0, sy1 * wx1,
                wy0 * sx0, wy0 * sx1, wy1 * sx0, wy1 * sx1)

    return SimpleNamespace(
        T=T, ZERO=ZERO, ONE=ONE, load=load, store=prec.store, precision=prec,
        tap_position=tap_position,
        tap_position_at=tap_position_at,
        in_band=in_band,
        bilinear_axis=bilinear_axis,
        in_gradient_band=in_gradient_band,
        bilinear_corners=bilinear_corners,
        bilinear_sample=bilinear_sample,
        bilinear_corner_gradients=bilinear_corner_gradients,
    )


def conv_tuple(geometry) -> tuple:
    """The int32 tuple ``(sh, sw, ph, pw, dh, dw, kh, kw)`` kernels take as ``conv``."""
    g = geometry
    return tuple(np.int32(v) for v in (g.stride_h, g.stride_w, g.pad_h, g.pad_w,
                                       g.dil_h, g.dil_w, g.kernel_h, g.kernel_w))
