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

Written to the same discipline as ``im2col`` (see there and docs/perf-notes.md):
flat chunk views (the chunk's first image is the 64-bit image base), ``uint32``
index arithmetic inside the chunk with an int64 ``wide`` variant (32-bit loop
counters in both), a 3-D grid (pixels in x, (group, tap) in y, images in z) with
sizes from the host, so that only a row (two 32-bit divisions) and a point (one)
divide, launch bounds declared to ptxas, and a channel loop that only adds a plane
to four corner indices, two channels per iteration: 20 instructions per column
element in sm_90 SASS (two points per thread share a row's set-up). An
out-of-band sample reads no memory: its channels get ``0 * m``.
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend, precision
from ...runtime.backend import cuda
from .im2col import (THREADS, bounded_jit, chunk_images, column_chunks, compute_operands, flat, gemm_bias,
                     needs_wide)
from .sampling import conv_tuple, sampling_functions


# Traffic (per image, C channels, G offset groups, K taps, P = Ho*Wo, itemsize s):
#   reads the offsets 2*G*K*P*s and the mask G*K*P*s once, and gathers 4 input
#   corners per sample (4*C*K*P loads, mostly L1/L2 hits: the input itself is
#   C*H*W*s); writes the column block C*K*P*s. No shared memory, no positions buffer.
# FLOPs: ~10 per (group, tap, pixel) for the position, fractions, corner weights and
#   mask fold (done once, reused over C/G channels); 7 per sample (4 mul + 3 add).
@functools.cache
def fused_columns_kernel(dtype, use_mask: bool, wide: bool = False):
    """Kernel ``(input, offset, mask, columns, sizes, conv)`` for one chunk of ``Nc`` images.

    input:   flat ``[Nc, C, H, W]``, the chunk's images
    offset:  flat ``[Nc, 2*G*K, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    mask:    flat ``[Nc, G*K, Ho, Wo]`` (any 1-element array when ``use_mask`` is False)
    columns: flat ``[C*K, Nc*Ho*Wo]``: gets ``columns[c*K + tap, n*P + p]``
    sizes:   int32 tuple ``(C, H, W, G, C/G, Ho, Wo, Nc)`` (``fused_sizes``)
    conv:    int32 tuple ``(sh, sw, ph, pw, dh, dw, kh, kw)`` (``sampling.conv_tuple``)

    Grid: x over output pixels, y over (group, tap), z over images, all grid-stride. Each
    thread computes one sampling point (position, corners, weights with the mask folded
    in) and walks the C/G channels of its group. ``wide``: int64 index arithmetic, for
    chunks whose input, offsets or columns hold more than ``INT32_LIMIT`` elements.
    ``dtype``: the storage dtype of input, offset and mask (read through ``load``); the
    columns are in its compute dtype (float32 for float16/bfloat16).
    """
    Index = np.int64 if wide else np.uint32
    Count = np.uint32  # loop counters and small sizes (image, tap, pixel, ...): each < 2**31
    functions = sampling_functions(dtype)
    T = functions.T
    load = functions.load
    in_band = functions.in_band
    bilinear_corners = functions.bilinear_corners
    ZERO, ONE = functions.ZERO, functions.ONE

    @bounded_jit()
    def kernel(input, offset, mask, columns, sizes, conv):
        channels, height, width, offset_groups, per_group, out_h, out_w, images = sizes
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kernel_h, kernel_w = conv
        # Every index is wrapped in Index(...): numba widens int32/uint32 arithmetic to
        # 64 bits, and the wrap lets the compiler narrow it back to one 32-bit instruction.
        taps = Count(Count(kernel_h) * Count(kernel_w))
        pixels = Count(Count(out_h) * Count(out_w))  # < 2**31 (check_limits)
        plane = Index(Index(height) * Index(width))
        group_taps = Count(Count(offset_groups) * taps)
        row_stride = Index(Index(images) * Index(pixels))  # Nc*P: one column-matrix row
        channel_step = Index(Index(taps) * row_stride)  # columns: from channel c's row to c+1's
        # grid: x over output pixels, y over (group, tap), z over the chunk's images; grid-stride
        first_p = Count(Count(Count(cuda.blockIdx.x) * Count(cuda.blockDim.x)) + Count(cuda.threadIdx.x))
        p_step = Count(Count(cuda.gridDim.x) * Count(cuda.blockDim.x))
        n = Count(cuda.blockIdx.z)
        while n < Count(images):
            gk = Count(cuda.blockIdx.y)
            while gk < group_taps:
                # phase: rows
                row = Index(Index(Index(n) * Index(group_taps)) + Index(gk))  # the (image, group, tap) row
                group = Count(gk // taps)
                tap = Count(gk - Count(group * taps))
                i = Count(tap // Count(kernel_w))
                j = Count(tap - Count(i * Count(kernel_w)))
                # int32: |oy*sh - ph + i*dh| < 2**24 (arguments.check_limits bounds the extent)
                tap_y = np.int32(i) * dil_h - pad_h
                tap_x = np.int32(j) * dil_w - pad_w
                first_channel = Index(Index(group) * Index(per_group))
                group_base = Index(Index(Index(Index(n) * Index(channels)) + first_channel) * plane)
                dy_row = Index(Index(Index(2) * row) * Index(pixels))  # offset[n, 2*gk, 0]
                mask_row = Index(row * Index(pixels))  # mask[n, gk, 0]
                column_row = Index(Index(Index(Index(first_channel * Index(taps)) + Index(tap)) * row_stride)
                                   + Index(Index(n) * Index(pixels)))
                p = first_p
                while p < pixels:
                    # phase: points
                    oy = Count(p // Count(out_w))
                    ox = Count(p - Count(oy * Count(out_w)))
                    y = T(np.int32(oy) * stride_h + tap_y) + load(offset, Index(dy_row + Index(p)))
                    x = T(np.int32(ox) * stride_w + tap_x) + load(offset, Index(Index(dy_row + Index(pixels)) + Index(p)))
                    m = load(mask, Index(mask_row + Index(p))) if use_mask else ONE
                    column = Index(column_row + Index(p))
                    last_column = Index(column + Index(Index(per_group) * channel_step))
                    if in_band(y, x, height, width):  # only an in-band sample reads memory
                        y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
                        w00 *= m
                        w01 *= m
                        w10 *= m
                        w11 *= m
                        row0 = Index(group_base + Index(Index(y0) * Index(width)))
                        row1 = Index(group_base + Index(Index(y1) * Index(width)))
                        at00 = Index(row0 + Index(x0))
                        at01 = Index(row0 + Index(x1))
                        at10 = Index(row1 + Index(x0))
                        at11 = Index(row1 + Index(x1))
                        pairs_end = Index(last_column - channel_step)  # per_group >= 1: no wrap
                        while column < pairs_end:
                            # phase: columns
                            # two channels per iteration (the loop's compare and branch, and
                            # the increments, shared by both)
                            for k in range(2):  # CHANNELS_PER_ITERATION
                                columns[Index(column + k * channel_step)] = (
                                    w00 * load(input, Index(at00 + k * plane))
                                    + w01 * load(input, Index(at01 + k * plane))
                                    + w10 * load(input, Index(at10 + k * plane))
                                    + w11 * load(input, Index(at11 + k * plane)))
                            at00 = Index(at00 + 2 * plane)
                            at01 = Index(at01 + 2 * plane)
                            at10 = Index(at10 + 2 * plane)
                            at11 = Index(at11 + 2 * plane)
                            column = Index(column + 2 * channel_step)
                        if column < last_column:  # an odd channel count: the last channel
                            columns[column] = (w00 * load(input, at00) + w01 * load(input, at01)
                                               + w10 * load(input, at10) + w11 * load(input, at11))
                    else:
                        value = ZERO * m  # a NaN mask still poisons its tap, as in torchvision
                        while column < last_column:
                            # phase: out_of_band_columns
                            columns[column] = value
                            column = Index(column + channel_step)
                    p = Count(p + p_step)
                gk = Count(gk + Count(cuda.gridDim.y))
            n = Count(n + Count(cuda.gridDim.z))

    return kernel


def fused_sizes(geometry, images: int) -> tuple:
    """The int32 tuple ``(C, H, W, G, C/G, Ho, Wo, Nc)`` that ``fused_columns_kernel`` takes."""
    g = geometry
    return tuple(np.int32(v) for v in (g.in_channels, g.height, g.width, g.offset_groups,
                                       g.in_channels // g.offset_groups, g.out_h, g.out_w, images))


def chunk_needs_wide(geometry, images: int) -> bool:
    """Whether the kernel needs its int64 variant for a chunk of ``images`` images."""
    g = geometry
    pixels = g.out_h * g.out_w
    return needs_wide(images * g.in_channels * g.height * g.width,
                      images * 2 * g.offset_groups * g.taps * pixels,
                      images * g.in_channels * g.taps * pixels)


def launch_grid(geometry, images: int, gpu: bool | None = None) -> tuple:
    """``((blocks_x, blocks_y, blocks_z), threads)`` of a launch over a chunk of ``images`` images:
    x over output pixels (``POINTS_PER_THREAD`` per thread on the GPU), y over (group, tap),
    z over images (all loops grid-stride).
    ``gpu``: the GPU's grid (default: the current backend's; the simulator's is small)."""
    g = geometry
    pixels = g.out_h * g.out_w
    group_taps = g.offset_groups * g.taps
    if not (gpu if gpu is not None else not backend.IS_SIMULATOR):  # a simulated thread is a Python thread
        return (min(-(-pixels // 64), 2), min(group_taps, 3), min(images, 2)), min(64, 32 * -(-pixels // 32))
    blocks_x = -(-pixels // (THREADS * POINTS_PER_THREAD))
    return (min(blocks_x, 65535), min(group_taps, 65535), min(images, 65535)), THREADS


CHANNELS_PER_ITERATION = 2
"""Column elements (channels of one point) the kernel's channel loop writes per iteration."""

POINTS_PER_THREAD = 2
"""Sampling points each GPU thread takes (grid-stride over the pixels of a row): the row's
set-up (two 32-bit divisions, the row's bases) is shared by them, so the whole launch issues
fewer instructions per column element (``docs/perf-notes.md``)."""


def column_filler(geometry, input, offset, mask, xp):
    """``fill(columns, first_image)``: the fused column kernel configured for this layer.

    The kernel variant and its grid are chosen once, for the largest chunk; each call
    passes flat views that start at the chunk's first image (64-bit image bases) and the
    chunk's sizes.
    """
    g = geometry
    pixels = g.out_h * g.out_w
    chunk = chunk_images(g)
    input, offset = flat(input, xp), flat(offset, xp)
    mask = flat(mask, xp) if mask is not None else None
    no_mask = xp.empty(1, dtype=input.dtype)
    image, image_offset = g.in_channels * g.height * g.width, offset.size // g.batch
    image_mask = mask.size // g.batch if mask is not None else 0
    kernel = fused_columns_kernel(g.dtype, mask is not None, chunk_needs_wide(g, chunk))
    conv = conv_tuple(g)
    grid, threads = launch_grid(g, chunk)

    def fill(columns, first_image):
        images = columns.shape[1] // pixels
        last = first_image + images
        backend.launch(kernel, grid, threads, input[first_image * image:last * image],
                       offset[first_image * image_offset:last * image_offset],
                       mask[first_image * image_mask:last * image_mask] if mask is not None else no_mask,
                       columns.reshape(-1), fused_sizes(g, images), conv)

    return fill


def forward(geometry, input, offset, weight, bias, mask, out, stopwatch=backend.NO_STOPWATCH):
    """Fused column building, then the baseline's GEMM, per chunk of images, into ``out``."""
    g = geometry
    xp = backend.array_module(input)
    fill = column_filler(g, input, offset, mask, xp)
    weight, bias = compute_operands(g, weight, bias, xp)
    for first, cols in column_chunks(g, xp, precision.compute_dtype(g.dtype)):
        with stopwatch.section("fused columns"):
            fill(cols, first)
        with stopwatch.section("gemm"):
            gemm_bias(g, cols, weight, bias, out, first, xp)
    return out


def phase_model(geometry, config=None) -> dict:
    """Iterations per thread of each ``# phase:`` body on a GPU, for the first (largest) chunk.

    ``rows``: (image, group, tap) rows per thread; ``points``: sampling points per thread;
    ``columns``: column elements per thread (points times C/G channels; the loop takes two
    per iteration, its code around the loop runs once per point), all counted as
    in-band samples (an upper bound: ``out_of_band_columns``, the loop that writes ``0 * m``
    for an out-of-band point, is ~4x cheaper). ``config`` is unused (no tunables).
    """
    g = geometry
    pixels = g.out_h * g.out_w
    chunk, group_taps = chunk_images(g), g.offset_groups * g.taps
    (blocks_x, blocks_y, blocks_z), threads = launch_grid(g, chunk, gpu=True)
    rows = -(-group_taps // blocks_y) * -(-chunk // blocks_z)
    points = rows * -(-pixels // (blocks_x * threads))
    # columns: (channel steps, straight runs): the loop's set-up and an odd group's last
    # channel run once per point
    return {"rows": rows, "points": points, "columns": (points * (g.in_channels // g.offset_groups), points),
            "out_of_band_columns": 0}


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``): both index variants, and
    one float16 and one bfloat16 case."""
    from numba import types

    for dtype in ("float32", "float64"):
        a1 = types.Array(getattr(types, dtype), 1, "C")
        conv = types.UniTuple(types.int32, 8)
        sizes = types.UniTuple(types.int32, 8)
        for wide in (False, True):
            for use_mask in (True, False):
                yield (f"fused_columns[mask={use_mask}{',wide' if wide else ''}]", dtype,
                       fused_columns_kernel(dtype, use_mask, wide), (a1, a1, a1, a1, sizes, conv))
    # float16 and bfloat16 (storage in half, arithmetic in float32): mask on, 32-bit indices only;
    # input, offset and mask in the storage type, the columns in float32 (column_chunks)
    f1 = types.Array(types.float32, 1, "C")
    for dtype in ("float16", "bfloat16"):
        s1 = types.Array(precision.numba_type(dtype), 1, "C")
        yield ("fused_columns[mask=True]", dtype, fused_columns_kernel(dtype, True), (s1, s1, s1, f1, sizes, conv))
