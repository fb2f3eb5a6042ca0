"""The unfused baseline: offset sampling -> bilinear columns -> GEMM.

This is torchvision's design, split into separate launches on purpose so that
the notebooks can time and analyse each operator:

1. ``positions_kernel``: offsets -> absolute sampling positions, one thread per
   (image, offset group, tap, output pixel).
2. ``columns_kernel``: positions -> column matrix ``[C*kh*kw, Nc*Ho*Wo]``, one
   thread per (image, channel, output pixel) looping over taps, mask applied.
3. GEMM with the weights per weight group through the array module's
   ``matmul`` (cuBLAS via CuPy on a GPU, BLAS via NumPy in the simulator), then
   the transpose to NCHW and the bias.

Images are processed in chunks of at most ``CHUNK_IMAGES`` (torchvision uses 32)
so the column buffer stays bounded.
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from .sampling import conv_tuple, sampling_functions

CHUNK_IMAGES = 32


# Traffic (per image, G offset groups, K taps, P = Ho*Wo, itemsize s):
#   reads the offsets 2*G*K*P*s, writes the positions 2*G*K*P*s; 2 FLOPs per position.
@functools.cache
def positions_kernel(dtype):
    """Kernel ``(offset, positions, conv)``: both ``[N, 2*G*K, Ho, Wo]``, ``(y, x)`` interleaved."""
    tap_position = sampling_functions(dtype).tap_position

    @cuda.jit
    def kernel(offset, positions, conv):
        n_img, channels, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        total = n_img * (channels // 2) * out_h * out_w
        # phase: positions
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            ox = idx % out_w
            oy = (idx // out_w) % out_h
            gk = (idx // (out_w * out_h)) % (channels // 2)
            n = idx // (out_w * out_h * (channels // 2))
            y, x = tap_position(offset, n, gk // taps, gk % taps, oy, ox, conv)
            positions[n, 2 * gk, oy, ox] = y
            positions[n, 2 * gk + 1, oy, ox] = x

    return kernel


# Traffic (per image): reads positions 2*G*K*P*s (+ mask G*K*P*s) once per channel of
# the group, i.e. C*K*P*(2 or 3)*s through cache, and 4 input corners per sample
# (C*K*P*4*s, mostly cache hits); writes the column block C*K*P*s.
# FLOPs: 8 per sample for the corner setup, 7 for the interpolation, 1 for the mask.
@functools.cache
def columns_kernel(dtype, use_mask: bool):
    """Kernel ``(input, positions, mask, columns, first_image)``.

    Fills ``columns[c*K + tap, n_local*P + p]`` for images
    ``first_image .. first_image + columns.shape[1] // P - 1``.
    """
    bilinear_sample = sampling_functions(dtype).bilinear_sample

    @cuda.jit
    def kernel(input, positions, mask, columns, first_image):
        _, channels, _, _ = input.shape
        _, pos_channels, out_h, out_w = positions.shape
        taps = columns.shape[0] // channels
        groups = pos_channels // (2 * taps)
        per_group = channels // groups
        pixels = out_h * out_w
        total = columns.shape[1] * channels  # (images in chunk) * C * P
        # phase: pixel
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            p = idx % pixels
            c = (idx // pixels) % channels
            n_local = idx // (pixels * channels)
            n = first_image + n_local
            oy = p // out_w
            ox = p - oy * out_w
            g = c // per_group
            # phase: sample
            for tap in range(taps):
                gk = g * taps + tap
                y = positions[n, 2 * gk, oy, ox]
                x = positions[n, 2 * gk + 1, oy, ox]
                value = bilinear_sample(input, n, c, y, x)
                if use_mask:
                    value *= mask[n, gk, oy, ox]
                columns[c * taps + tap, n_local * pixels + p] = value

    return kernel


def launch(kernel, total, *args):
    """Launch a grid-stride ``kernel`` over ``total`` items."""
    blocks, threads = backend.launch_config(total)
    backend.launch(kernel, blocks, threads, *args)


def gemm_bias(geometry, columns, weight, bias, out, first_image, xp):
    """``out[first_image:...] = weight (x) columns + bias`` per weight group."""
    g = geometry
    groups, k = g.groups, g.taps
    n_chunk = columns.shape[1] // (g.out_h * g.out_w)
    w = weight.reshape(groups, g.out_channels // groups, (g.in_channels // groups) * k)
    cols = columns.reshape(groups, (g.in_channels // groups) * k, columns.shape[1])
    result = xp.matmul(w, cols)  # [G, Cout/G, Nc*P]
    result = result.reshape(g.out_channels, n_chunk, g.out_h, g.out_w).transpose(1, 0, 2, 3)
    if bias is not None:
        result = result + bias.reshape(1, -1, 1, 1)
    out[first_image:first_image + n_chunk] = result


def column_chunks(geometry, xp, dtype):
    """Yield ``(first_image, columns)`` per chunk of at most ``CHUNK_IMAGES`` images.

    One buffer of ``C*kh*kw * chunk*Ho*Wo`` elements is allocated and reused: each
    ``columns`` is a contiguous ``[C*kh*kw, n*Ho*Wo]`` view of it for the chunk's images.
    """
    g = geometry
    pixels = g.out_h * g.out_w
    rows = g.in_channels * g.taps
    # At most CHUNK_IMAGES images, and (unless one image alone is more) at most 2**31 - 1
    # elements: bounds the buffer's memory and keeps the GEMM's n = chunk*P within int32.
    chunk = max(1, min(g.batch, CHUNK_IMAGES, (2**31 - 1) // (rows * pixels)))
    # One flat buffer; each chunk's view is its first rows*n*P elements, so the view is
    # C-contiguous even for a short last chunk (the simulator transfers only contiguous
    # arrays, and the GEMM's reshape then needs no copy).
    buffer = xp.empty(rows * chunk * pixels, dtype=dtype)
    for first in range(0, g.batch, chunk):
        width = min(chunk, g.batch - first) * pixels
        yield first, buffer[:rows * width].reshape(rows, width)


def forward(geometry, input, offset, weight, bias, mask, out, stopwatch=backend.NO_STOPWATCH):
    """Run the three-stage pipeline into ``out`` (``[N, Cout, Ho, Wo]``, preallocated)."""
    g = geometry
    xp = backend.array_module(input)
    conv = conv_tuple(g)
    mask_arg = mask if mask is not None else xp.empty((1, 1, 1, 1), dtype=input.dtype)

    with stopwatch.section("offset sampling"):
        positions = xp.empty(offset.shape, dtype=offset.dtype)
        launch(positions_kernel(g.dtype), offset.size // 2, offset, positions, conv)

    fill = columns_kernel(g.dtype, mask is not None)
    for first, cols in column_chunks(g, xp, input.dtype):
        with stopwatch.section("bilinear columns"):
            launch(fill, cols.shape[1] * g.in_channels, input, positions, mask_arg, cols, np.int64(first))
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
        yield "positions", dtype, positions_kernel(dtype), (a4, a4, conv)
        for use_mask in (True, False):
            yield (f"columns[mask={use_mask}]", dtype, columns_kernel(dtype, use_mask),
                   (a4, a4, a4, a2, types.int64))
