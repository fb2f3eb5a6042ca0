"""Fused column building: offsets -> bilinear corners -> column matrix, in one launch.

The im2col baseline (``kernels/im2col.py``) spends two launches before its GEMM:
one writes the absolute sampling positions to a buffer, the next reads them back
once per channel and recomputes the floor, the fractions and the four corner
weights for every channel of the group. But the position and the weights of a
sample depend only on ``(image, offset group, tap, output pixel)``, not on the
channel. This module computes them once per such point, folds the mask into the
four weights, and then walks every channel of the offset group, writing

    columns[c*K + tap, n_local*P + p] = m * bilinear(input[n, c], y, x)

So there is no positions buffer and no per-channel corner setup. The column
buffer stays (the fully fused method removes that too), and so does the GEMM,
which is the baseline's own ``im2col.gemm_bias`` over the same image chunks
(``im2col.column_chunks``).

Coalescing: consecutive threads take consecutive output pixels ``p`` of one
(image, group, tap), so each column-buffer store of a warp is one contiguous
row segment, and the corner gathers of neighbouring pixels hit neighbouring
input addresses.
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from .im2col import column_chunks, gemm_bias, launch
from .sampling import conv_tuple, sampling_functions


# Traffic (per image, C channels, G offset groups, K taps, P = Ho*Wo, itemsize s):
#   reads the offsets 2*G*K*P*s and the mask G*K*P*s once, and gathers 4 input
#   corners per sample (4*C*K*P loads, mostly L1/L2 hits: the input itself is
#   C*H*W*s); writes the column block C*K*P*s. No shared memory, no positions buffer.
# FLOPs: ~10 per (group, tap, pixel) for the position, fractions, corner weights and
#   mask fold (done once, reused over C/G channels); 7 per sample (4 mul + 3 add).
@functools.cache
def fused_columns_kernel(dtype, use_mask: bool):
    """Kernel ``(input, offset, mask, columns, first_image, conv)``.

    input:       ``[N, C, H, W]``
    offset:      ``[N, 2*G*K, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    mask:        ``[N, G*K, Ho, Wo]`` (ignored, any 4-D array, when ``use_mask`` is False)
    columns:     ``[C*K, Nc*Ho*Wo]``, filled for images ``first_image .. first_image + Nc - 1``
    first_image: int64, the chunk's first image
    conv:        int32 tuple ``(sh, sw, ph, pw, dh, dw, kh, kw)`` (``sampling.conv_tuple``)

    One grid-stride item per (image in chunk, offset group, tap, output pixel).
    """
    functions = sampling_functions(dtype)
    tap_position = functions.tap_position
    bilinear_corners = functions.bilinear_corners

    @cuda.jit
    def kernel(input, offset, mask, columns, first_image, conv):
        _, channels, height, width = input.shape
        _, offset_channels, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        group_taps = offset_channels // 2  # G*K
        per_group = channels // (group_taps // taps)
        pixels = out_h * out_w
        total = (columns.shape[1] // pixels) * group_taps * pixels
        # phase: point
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            p = idx % pixels
            gk = (idx // pixels) % group_taps
            n_local = idx // (pixels * group_taps)
            n = first_image + n_local
            group = gk // taps
            tap = gk - group * taps
            oy = p // out_w
            ox = p - oy * out_w
            y, x = tap_position(offset, n, group, tap, oy, ox, conv)
            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
            if use_mask:
                m = mask[n, gk, oy, ox]
                w00 *= m
                w01 *= m
                w10 *= m
                w11 *= m
            col = n_local * pixels + p
            # phase: channel
            for c in range(group * per_group, (group + 1) * per_group):
                columns[c * taps + tap, col] = (w00 * input[n, c, y0, x0] + w01 * input[n, c, y0, x1]
                                                + w10 * input[n, c, y1, x0] + w11 * input[n, c, y1, x1])

    return kernel


def forward(geometry, input, offset, weight, bias, mask, out, stopwatch=backend.NO_STOPWATCH):
    """Fused column building, then the baseline's GEMM, per chunk of images, into ``out``."""
    g = geometry
    xp = backend.array_module(input)
    conv = conv_tuple(g)
    points_per_image = g.offset_groups * g.taps * g.out_h * g.out_w
    mask_arg = mask if mask is not None else xp.empty((1, 1, 1, 1), dtype=input.dtype)
    fill = fused_columns_kernel(g.dtype, mask is not None)
    for first, cols in column_chunks(g, xp, input.dtype):
        n_chunk = cols.shape[1] // (g.out_h * g.out_w)
        with stopwatch.section("fused columns"):
            launch(fill, n_chunk * points_per_image, input, offset, mask_arg, cols, np.int64(first), conv)
        with stopwatch.section("gemm"):
            gemm_bias(g, cols, weight, bias, out, first, xp)
    return out


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``)."""
    from numba import types

    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a4, a2 = types.Array(t, 4, "A"), types.Array(t, 2, "A")
        conv = types.UniTuple(types.int32, 8)
        for use_mask in (True, False):
            yield (f"fused_columns[mask={use_mask}]", dtype, fused_columns_kernel(dtype, use_mask),
                   (a4, a4, a4, a2, types.int64, conv))
