"""Depthwise kernels of the lean operator: the separate method's pieces and the backward's.

* ``depthwise_kernel``: ``d[n, c, oy, ox] = sum_t S[c, t] * x[n, c, oy*sh + dy_t, ox*sw + dx_t]``
  (zero outside the image), one thread per output element in a grid-stride loop.
  The separate forward is ``pointwise GEMM -> this -> add (+ bias)``.
  Traffic: reads input ``N*C*H*W*s`` (each element by up to S threads: L1/L2 hits)
  and the stencil; writes ``N*C*Ho*Wo*s``. FLOPs ``2*N*C*S*Ho*Wo``.
* ``adjoint_kernel``: the input gradient at any stride, by gathering (no atomics):
  ``gx[n, c, y, x] = centre[n, c, y/sh, x/sw] (where y, x are multiples of the stride)
  + sum_t S[c, t] * gy[n, c, (y - dy_t)/sh, (x - dx_t)/sw] (where those divide exactly)``,
  with ``centre = P^T gy`` from a GEMM. Reads ``gy`` and ``centre``; writes ``gx`` once.
* ``reduce_kernel``: ``grad_stencil[c, t] = sum_{n, p} gy[n, c, p] * x[n, c, p + tap_t]`` and
  ``grad_bias[c] = sum_{n, p} gy[n, c, p]``: one block per channel, per-thread partial
  sums in a fixed order, then a fixed shared-memory tree: bit-identical on every run.
  Reads ``gy`` and ``x`` once; writes ``C*(S+1)`` values.

Indices inside an image are int32; image bases are int64.
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from . import SHARED_ALIGN

GRID_YZ_LIMIT = 65535


@functools.cache
def depthwise_kernel(dtype, taps: tuple, stride_h: int, stride_w: int):
    """Kernel ``(x, stencil, out, channels, height, width, out_h, out_w, image0)``; flat
    C-contiguous arrays; grid ``(blocks, images)``, any block size."""
    DT = np.dtype(dtype).type
    ZERO = DT(0)
    S = len(taps)
    TAP_DY = tuple(dy for dy, _ in taps)
    TAP_DX = tuple(dx for _, dx in taps)
    SH, SW = stride_h, stride_w

    @cuda.jit
    def kernel(x, stencil, out, channels, height, width, out_h, out_w, image0):
        n = np.int64(cuda.blockIdx.y) + image0
        plane_in = np.int32(height * width)
        plane_out = np.int32(out_h * out_w)
        total = np.int32(channels * plane_out)
        image_in = n * np.int64(channels * plane_in)
        image_out = n * np.int64(total)
        step = np.int32(cuda.blockDim.x * cuda.gridDim.x)
        for e in range(np.int32(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x), total, step):
            c = np.int32(e // plane_out)
            p = np.int32(e - c * plane_out)
            oy = np.int32(p // out_w)
            ox = np.int32(p - oy * out_w)
            acc = ZERO
            for t in range(S):
                y = np.int32(oy * SH + TAP_DY[t])
                xx = np.int32(ox * SW + TAP_DX[t])
                if y >= 0 and y < height and xx >= 0 and xx < width:
                    acc += stencil[np.int32(c * S + t)] * x[image_in + np.int32(c * plane_in + y * width + xx)]
            out[image_out + e] = acc

    return kernel


@functools.cache
def adjoint_kernel(dtype, taps: tuple, stride_h: int, stride_w: int):
    """Kernel ``(grad_out, centre, stencil, grad_in, channels, height, width, out_h, out_w,
    image0)``: the input gradient (see the module docstring); flat arrays; grid ``(blocks, images)``."""
    DT = np.dtype(dtype).type
    ZERO = DT(0)
    S = len(taps)
    TAP_DY = tuple(dy for dy, _ in taps)
    TAP_DX = tuple(dx for _, dx in taps)
    SH, SW = stride_h, stride_w

    @cuda.jit
    def kernel(grad_out, centre, stencil, grad_in, channels, height, width, out_h, out_w, image0):
        n = np.int64(cuda.blockIdx.y) + image0
        plane_in = np.int32(height * width)
        plane_out = np.int32(out_h * out_w)
        total = np.int32(channels * plane_in)
        image_in = n * np.int64(total)
        image_out = n * np.int64(channels * plane_out)
        step = np.int32(cuda.blockDim.x * cuda.gridDim.x)
        for e in range(np.int32(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x), total, step):
            c = np.int32(e // plane_in)
            p = np.int32(e - c * plane_in)
            y = np.int32(p // width)
            x = np.int32(p - y * width)
            out_c = np.int32(c * plane_out)
            acc = ZERO
            if y % SH == 0 and x % SW == 0:
                acc = centre[image_out + np.int32(out_c + (y // SH) * out_w + x // SW)]
            for t in range(S):
                ry = np.int32(y - TAP_DY[t])  # the output row whose tap t reads input row y
                rx = np.int32(x - TAP_DX[t])
                if ry >= 0 and rx >= 0 and ry % SH == 0 and rx % SW == 0:
                    oy = np.int32(ry // SH)
                    ox = np.int32(rx // SW)
                    if oy < out_h and ox < out_w:
                        acc += stencil[np.int32(c * S + t)] * grad_out[image_out + np.int32(out_c + oy * out_w + ox)]
            grad_in[image_in + e] = acc

    return kernel


@functools.cache
def reduce_kernel(dtype, taps: tuple, stride_h: int, stride_w: int, threads: int, use_bias: bool):
    """Kernel ``(grad_out, x, grad_stencil, grad_bias, batch, channels, height, width, out_h,
    out_w)`` on ``C`` blocks of ``threads`` threads (a power of two); flat arrays."""
    if threads & (threads - 1):
        raise ValueError(f"threads must be a power of two, got {threads}")
    DT = np.dtype(dtype).type
    ZERO = DT(0)
    S = len(taps)
    SUMS = S + 1  # one per tap, then the bias
    TAP_DY = tuple(dy for dy, _ in taps)
    TAP_DX = tuple(dx for _, dx in taps)
    SH, SW = stride_h, stride_w
    R = threads
    PARTIALS = SUMS * R
    USE_BIAS = use_bias

    @cuda.jit
    def kernel(grad_out, x, grad_stencil, grad_bias, batch, channels, height, width, out_h, out_w):
        tid = np.int32(cuda.threadIdx.x)
        c = np.int32(cuda.blockIdx.x)
        plane_in = np.int32(height * width)
        plane_out = np.int32(out_h * out_w)
        partial = cuda.shared.array(PARTIALS, dtype=DT, alignment=SHARED_ALIGN)
        sums = cuda.local.array(SUMS, dtype=DT)
        for t in range(SUMS):
            sums[t] = ZERO
        # phase: gather
        for n in range(batch):
            base_in = np.int64(n) * np.int64(channels * plane_in) + np.int64(c * plane_in)
            base_out = np.int64(n) * np.int64(channels * plane_out) + np.int64(c * plane_out)
            for p in range(tid, plane_out, R):
                oy = np.int32(p // out_w)
                ox = np.int32(p - oy * out_w)
                g = grad_out[base_out + p]
                sums[S] += g
                for t in range(S):
                    y = np.int32(oy * SH + TAP_DY[t])
                    xx = np.int32(ox * SW + TAP_DX[t])
                    if y >= 0 and y < height and xx >= 0 and xx < width:
                        sums[t] += g * x[base_in + np.int32(y * width + xx)]
        for t in range(SUMS):
            partial[t * R + tid] = sums[t]
        cuda.syncthreads()  # every thread's partial sums are in shared memory before the tree reads them
        # phase: tree
        half = R // 2
        while half > 0:
            if tid < half:
                for t in range(SUMS):
                    partial[t * R + tid] += partial[t * R + tid + half]
            cuda.syncthreads()  # this level's sums are complete before the next level reads them
            half //= 2
        if tid == 0:
            for t in range(S):
                grad_stencil[c * S + t] = partial[t * R]
            if USE_BIAS:
                grad_bias[c] = partial[S * R]

    return kernel


def _grid_stride(total: int) -> tuple[int, int]:
    cap = 8 if backend.IS_SIMULATOR else 4096
    threads = 32 if backend.IS_SIMULATOR else 256
    return max(1, min(cap, -(-total // threads))), threads


def depthwise(geometry, x_flat, stencil_flat, out_flat):
    """``out`` (flat ``[N*C*Ho*Wo]``) = the depthwise stencil term of the layer."""
    g = geometry
    kernel = depthwise_kernel(g.dtype, g.taps, g.stride_h, g.stride_w)
    blocks, threads = _grid_stride(g.channels * g.out_h * g.out_w)
    sizes = tuple(np.int32(v) for v in (g.channels, g.height, g.width, g.out_h, g.out_w))
    for image0 in range(0, g.batch, GRID_YZ_LIMIT):
        images = min(GRID_YZ_LIMIT, g.batch - image0)
        backend.launch(kernel, (blocks, images), threads, x_flat, stencil_flat, out_flat, *sizes,
                       np.int64(image0))


def adjoint(geometry, grad_out_flat, centre_flat, stencil_flat, grad_in_flat):
    """``grad_in`` (flat ``[N*C*H*W]``) = the input gradient, from ``centre = P^T gy``."""
    g = geometry
    kernel = adjoint_kernel(g.dtype, g.taps, g.stride_h, g.stride_w)
    blocks, threads = _grid_stride(g.channels * g.height * g.width)
    sizes = tuple(np.int32(v) for v in (g.channels, g.height, g.width, g.out_h, g.out_w))
    for image0 in range(0, g.batch, GRID_YZ_LIMIT):
        images = min(GRID_YZ_LIMIT, g.batch - image0)
        backend.launch(kernel, (blocks, images), threads, grad_out_flat, centre_flat, stencil_flat,
                       grad_in_flat, *sizes, np.int64(image0))


REDUCE_THREADS_GPU = 256
REDUCE_THREADS_SIMULATOR = 16


def reduce_stencil_bias(geometry, grad_out_flat, x_flat, grad_stencil_flat, grad_bias):
    """Fill ``grad_stencil`` (flat ``[C*S]``) and, when not None, ``grad_bias`` ``[C]``."""
    g = geometry
    threads = REDUCE_THREADS_SIMULATOR if backend.IS_SIMULATOR else REDUCE_THREADS_GPU
    kernel = reduce_kernel(g.dtype, g.taps, g.stride_h, g.stride_w, threads, grad_bias is not None)
    xp = backend.array_module(x_flat)
    bias_arg = grad_bias if grad_bias is not None else xp.zeros(1, dtype=x_flat.dtype)
    sizes = tuple(np.int32(v) for v in (g.batch, g.channels, g.height, g.width, g.out_h, g.out_w))
    backend.launch(kernel, g.channels, threads, grad_out_flat, x_flat, grad_stencil_flat, bias_arg, *sizes)


def phase_model(shape: dict, config=None) -> dict[str, float]:
    """Iterations per thread of the reduce kernel's innermost loop bodies (``config`` unused):
    *gather* one (image, output pixel) of the thread (S taps unrolled); *tree* one level."""
    batch, out_h, out_w = int(shape["batch"]), int(shape["out_h"]), int(shape["out_w"])
    threads = REDUCE_THREADS_GPU
    return {"gather": batch * -(-out_h * out_w // threads), "tree": threads.bit_length() - 1}


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``)."""
    from numba import types

    from .stencils import PATTERNS

    i32, i64 = types.int32, types.int64
    for dtype in ("float32", "float64"):
        a1 = types.Array(getattr(types, dtype), 1, "C")
        for name in ("star5", "full9"):
            taps = PATTERNS[name]
            yield (f"depthwise[{name},s1]", dtype, depthwise_kernel(dtype, taps, 1, 1),
                   (a1, a1, a1, i32, i32, i32, i32, i32, i64))
            yield (f"adjoint[{name},s2]", dtype, adjoint_kernel(dtype, taps, 2, 2),
                   (a1, a1, a1, a1, i32, i32, i32, i32, i32, i64))
            yield (f"reduce[{name},s1]", dtype, reduce_kernel(dtype, taps, 1, 1, REDUCE_THREADS_GPU, True),
                   (a1, a1, a1, a1, i32, i32, i32, i32, i32, i32))
