"""The unfused baseline: offset sampling -> bilinear columns -> GEMM.

This is torchvision's design, split into separate launches on purpose so that
the notebooks can time and analyse each operator:

1. ``positions_kernel``: offsets (and mask) -> sampling points ``(y, x, m)``, one
   thread per (image, offset group, tap, output pixel).
2. ``columns_kernel``: points -> column matrix ``[C*kh*kw, Nc*Ho*Wo]``, one
   thread per (image, channel pair, output pixel) looping over taps, mask applied.
3. GEMM with the weights per weight group through the array module's
   ``matmul`` (cuBLAS via CuPy on a GPU, BLAS via NumPy in the simulator), then
   the transpose to NCHW and the bias.

Images are processed in chunks of at most ``CHUNK_IMAGES`` (torchvision uses 32)
so the column buffer stays bounded.

An honest baseline, not a strawman: the design is torchvision's (per channel,
every tap re-reads its position and recomputes its corners; here per channel *pair*:
a thread fills two channels of one offset group from one point and one set of
corners), but the kernels are written the way any of ours is (see
docs/perf-notes.md for their SASS):

* every array is a flat, C-contiguous view, and the host passes views that start at
  the chunk's first image (its 64-bit *image base*), so everything inside the kernel
  is 32-bit unsigned arithmetic (``uint32``: no sign extension, no negative-index
  wraparound); a compile-time ``wide`` variant computes the flat offsets in int64,
  for chunks of 2**31 elements or more (``needs_wide``); loop counters (image,
  channel, pixel) and the divisions on them stay 32-bit in both;
* 3-D grids (pixels, channel pairs or taps, images) with the sizes computed on the
  host: one 32-bit division per (image, channel pair) row, none per element;
* the positions stage writes each sampling point as ``(y, x, m)`` (mask included), an
  out-of-band point as ``y = x = -1``, so the tap loop reads a point from one address
  and tests ``y > -1`` alone; it walks its two streams (points, columns) by adding a
  constant stride;
* an out-of-band sample (``-1 < y < H`` and ``-1 < x < W`` fails, NaN and +-inf
  included) never reaches a memory read: the gather is inside the band test;
* launch bounds (256 threads) declared to ptxas, ``np.int32`` scalars at launch (one
  compiled specialisation per dtype, mask and variant), and ``column_filler``
  configures the column launch once (variant, grid) for every chunk.
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend, precision
from ...runtime.backend import cuda
from .sampling import conv_tuple, sampling_functions

CHUNK_IMAGES = 32
THREADS = 256  # threads per block of the column kernels, declared to ptxas as launch bounds
INT32_LIMIT = 2**31 - 1  # the largest index the narrow (uint32) kernels are launched for


def needs_wide(*sizes) -> bool:
    """True when an index space of ``sizes`` (elements) needs the 64-bit kernel variant.

    The narrow variant indexes in ``uint32``; we keep its products below 2**31 so that a
    sum of two in-range indices (e.g. a row plus ``pixels``) cannot wrap either.
    """
    return max(int(s) for s in sizes) > INT32_LIMIT


def bounded_jit():
    """``cuda.jit`` declaring ``launch_bounds=THREADS`` on a GPU (the simulator has no such option).

    Without launch bounds ptxas (via nvJitLink, sm_90) holds these kernels to 32 registers
    and reloads loop invariants inside the hot loop; knowing the block size it uses ~40 and
    the column loop loses ~4 instructions (see docs/perf-notes.md)."""
    return cuda.jit if backend.IS_SIMULATOR else cuda.jit(launch_bounds=THREADS)


def flat(a, xp):
    """A flat C-order view of ``a`` (copied only when ``a`` is not C-contiguous)."""
    return xp.ascontiguousarray(a).reshape(-1)


def launch(kernel, total, *args):
    """Launch a grid-stride ``kernel`` over ``total`` items."""
    blocks, threads = backend.launch_config(total)
    backend.launch(kernel, blocks, threads, *args)


# Traffic (per image, G offset groups, K taps, P = Ho*Wo, itemsize s): reads the offsets
#   2*G*K*P*s (and the mask G*K*P*s), writes the sampling points (2 or 3)*G*K*P*s;
#   2 FLOPs per position (roofline.POSITION_FLOPS).
@functools.cache
def positions_kernel(dtype, use_mask: bool, wide: bool = False):
    """Kernel ``(offset, mask, points, sizes, conv)``: the sampling points.

    offset: flat ``[N, 2*G*K, Ho, Wo]`` (``(dy, dx)`` interleaved per tap)
    mask:   flat ``[N, G*K, Ho, Wo]`` (any 1-element array when ``use_mask`` is False)
    points: flat ``[N, G*K, Ho, Wo, S]`` gets ``(y, x)`` (S = 2) or ``(y, x, m)`` (S = 3):
            ``y = oy*sh - ph + i*dh + dy``, ``x = ox*sw - pw + j*dw + dx``, ``m`` the mask.
            The column kernel reads one point with one address and S loads.
            An out-of-band point (``sampling.in_band`` fails: NaN and +-inf included) is
            stored as ``y = x = -1``, so the column kernel tests ``y > -1`` alone.
    sizes:  int32 tuple ``(G*K, H, W, Ho, Wo, N)``; conv: ``sampling.conv_tuple``.

    One thread per (image, group, tap, output pixel): a 3-D grid, pixels in x.
    ``wide``: int64 index arithmetic (``points.size`` past ``INT32_LIMIT``).
    ``dtype``: the storage dtype of offset and mask (read through ``load``); the points are
    in its compute dtype (float32 for float16/bfloat16, see ``runtime.precision``).
    """
    functions = sampling_functions(dtype)
    T = functions.T
    load = functions.load
    Index = np.int64 if wide else np.uint32
    Count = np.uint32
    S = 3 if use_mask else 2
    in_band = functions.in_band
    OUT_OF_BAND = T(-1)  # fails -1 < y: samples zero, like every out-of-band point

    @bounded_jit()
    def kernel(offset, mask, points, sizes, conv):
        group_taps, height, width, out_h, out_w, images = sizes
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kernel_h, kernel_w = conv
        taps = Count(Count(kernel_h) * Count(kernel_w))
        pixels = Count(Count(out_h) * Count(out_w))
        # grid: x over output pixels, y over (group, tap), z over images; all grid-stride.
        # Counters are 32-bit (each < 2**31); flat offsets are Index (int64 when wide).
        first_p = Count(Count(Count(cuda.blockIdx.x) * Count(cuda.blockDim.x)) + Count(cuda.threadIdx.x))
        p_step = Count(Count(cuda.gridDim.x) * Count(cuda.blockDim.x))
        n = Count(cuda.blockIdx.z)
        while n < Count(images):
            gk = Count(cuda.blockIdx.y)
            while gk < Count(group_taps):
                # phase: point_rows
                tap = Count(gk % taps)
                i = Count(tap // Count(kernel_w))
                j = Count(tap - Count(i * Count(kernel_w)))
                # int32: |oy*sh - ph + i*dh| < 2**24 (arguments.check_limits bounds the extent)
                tap_y = np.int32(i) * dil_h - pad_h
                tap_x = np.int32(j) * dil_w - pad_w
                row = Index(Index(Index(n) * Index(group_taps)) + Index(gk))  # the point's (n, gk)
                p = first_p
                while p < pixels:
                    # phase: positions
                    oy = Count(p // Count(out_w))
                    ox = Count(p - Count(oy * Count(out_w)))
                    item = Index(Index(row * Index(pixels)) + Index(p))  # the point's flat index
                    dy = Index(Index(Index(Index(2) * row) * Index(pixels)) + Index(p))  # offset[n, 2*gk, oy, ox]
                    y = T(np.int32(oy) * stride_h + tap_y) + load(offset, dy)
                    x = T(np.int32(ox) * stride_w + tap_x) + load(offset, Index(dy + Index(pixels)))
                    if not in_band(y, x, height, width):
                        y = OUT_OF_BAND  # one canonical point: the column kernel tests y alone
                        x = OUT_OF_BAND
                    point = Index(Index(S) * item)
                    points[point] = y
                    points[Index(point + Index(1))] = x
                    if use_mask:
                        points[Index(point + Index(2))] = load(mask, item)
                    p = Count(p + p_step)
                gk = Count(gk + Count(cuda.gridDim.y))
            n = Count(n + Count(cuda.gridDim.z))

    return kernel


# Traffic (per image): reads the points (2 or 3)*G*K*P*s once per channel pair of the
# group, i.e. C/2*K*P*(2 or 3)*s through cache, and 4 input corners per sample
# (C*K*P*4*s, mostly cache hits); writes the column block C*K*P*s.
# FLOPs: 8 per sample for the corner setup, 7 for the interpolation, 1 for the mask.
CHANNELS_PER_THREAD = 2  # column kernel: channels of one offset group a thread fills per sampling point


@functools.cache
def columns_kernel(dtype, use_mask: bool, wide: bool = False):
    """Kernel ``(input, points, columns, sizes)`` for one chunk of ``Nc`` images.

    input:   flat ``[Nc, C, H, W]``: the chunk's images
    points:  flat ``[Nc, G*K, Ho, Wo, S]`` from ``positions_kernel``, the chunk's images
    columns: flat ``[C*K, Nc*Ho*Wo]``: gets ``columns[c*K + tap, n*P + p]``
    sizes:   int32 tuple ``(C, H, W, G, C/G, K, P, Nc)`` (``column_sizes``)

    The host passes views that start at the chunk's first image (its 64-bit image base),
    so inside the kernel every index is an offset into the chunk. Grid: x over output
    pixels (coalesced point reads and column writes), y over channel pairs
    (``CHANNELS_PER_THREAD`` = 2 channels of one offset group: ``G*ceil(C/G / 2)`` pairs),
    z over images, all grid-stride; each thread walks the K taps of its pixels, and per
    tap reads the sampling point and computes its corners and weights once for both
    channels of its pair (the per-channel work is the 4 corner reads, the interpolation,
    the mask and the store). A group with an odd number of channels ends in a pair whose
    second channel is its first: the thread writes the same value twice to the same
    element, so no branch on the pair is needed. ``wide``: int64 index arithmetic, for
    chunks whose input, points or columns hold more than ``INT32_LIMIT`` elements.
    ``dtype``: the input's storage dtype (read through ``load``); points and columns are in
    its compute dtype.
    """
    Index = np.int64 if wide else np.uint32
    Count = np.uint32  # loop counters (image, channel pair, pixel): each < 2**31
    S = 3 if use_mask else 2
    functions = sampling_functions(dtype)
    bilinear_axis = functions.bilinear_axis
    load = functions.load
    ZERO = functions.ZERO
    MINUS_ONE = -functions.ONE

    @bounded_jit()
    def kernel(input, points, columns, sizes):
        channels, height, width, offset_groups, per_group, taps, pixels, images = sizes
        # Every index is wrapped in Index(...): numba widens int32/uint32 arithmetic to
        # 64 bits, and the wrap lets the compiler narrow it back to one 32-bit instruction.
        plane = Index(Index(height) * Index(width))
        image_points = Index(Index(offset_groups) * Index(Index(taps) * Index(pixels)))
        row_stride = Index(Index(images) * Index(pixels))  # Nc*P: one column-matrix row
        point_step = Index(Index(S) * Index(pixels))  # from one tap's point to the next tap's
        # channel pairs per group, at least 1 (so the compiler knows the division below
        # cannot be by zero and keeps one copy of the loops)
        pairs = max(Count(Count(Count(per_group) + Count(1)) >> Count(1)), Count(1))
        all_pairs = Count(Count(offset_groups) * pairs)
        # grid: x over output pixels, y over channel pairs, z over the chunk's images; all grid-stride
        first_p = Count(Count(Count(cuda.blockIdx.x) * Count(cuda.blockDim.x)) + Count(cuda.threadIdx.x))
        p_step = Count(Count(cuda.gridDim.x) * Count(cuda.blockDim.x))
        n = Count(cuda.blockIdx.z)
        while n < Count(images):
            pair = Count(cuda.blockIdx.y)
            while pair < all_pairs:
                # phase: rows
                group = Count(pair // pairs)
                within = Count(Count(pair - Count(group * pairs)) * Count(2))  # first channel in the group
                c = Count(Count(group * Count(per_group)) + within)
                # the pair's second channel: c + 1, or c itself at the end of an odd group
                second = Count(1) if Count(within + Count(1)) < Count(per_group) else Count(0)
                first_tap = Index(group * Count(taps))  # g*K: the group's first tap
                channel_base = Index(Index(Index(Index(n) * Index(channels)) + Index(c)) * plane)  # (n*C + c)*H*W
                second_plane = Index(Index(second) * plane)  # from channel c's image to the second's
                second_rows = Index(Index(Index(second) * Index(taps)) * row_stride)  # ... and column row
                row_point = Index(Index(S) * Index(Index(Index(n) * image_points) + Index(first_tap * Index(pixels))))
                row_column = Index(Index(Index(Index(c) * Index(taps)) * row_stride) + Index(Index(n) * Index(pixels)))
                p = first_p
                while p < Count(pixels):
                    # phase: pixels
                    point = Index(row_point + Index(Index(S) * Index(p)))  # S values per point
                    column = Index(row_column + Index(p))
                    last_column = Index(column + Index(Index(taps) * row_stride))
                    while column < last_column:
                        # phase: columns
                        at = np.uint64(point)  # 64-bit: y, x (and m) load from one address
                        y = points[at]
                        value = ZERO  # channel c's sample
                        pair_value = ZERO  # the second channel's
                        # The positions stage stored every out-of-band point as y = -1, so this is
                        # sampling.in_band; only an in-band sample reads memory.
                        if y > MINUS_ONE:
                            x = points[at + np.uint64(1)]
                            y0, y1, wy0, wy1, _, _ = bilinear_axis(y, height)
                            x0, x1, wx0, wx1, _, _ = bilinear_axis(x, width)
                            w00, w01, w10, w11 = wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1
                            row0 = Index(channel_base + Index(Index(y0) * Index(width)))
                            row1 = Index(channel_base + Index(Index(y1) * Index(width)))
                            at00, at01 = Index(row0 + Index(x0)), Index(row0 + Index(x1))
                            at10, at11 = Index(row1 + Index(x0)), Index(row1 + Index(x1))
                            value = (w00 * load(input, at00) + w01 * load(input, at01)
                                     + w10 * load(input, at10) + w11 * load(input, at11))
                            pair_value = (w00 * load(input, Index(at00 + second_plane))
                                          + w01 * load(input, Index(at01 + second_plane))
                                          + w10 * load(input, Index(at10 + second_plane))
                                          + w11 * load(input, Index(at11 + second_plane)))
                        if use_mask:
                            m = points[at + np.uint64(2)]
                            value *= m
                            pair_value *= m
                        columns[column] = value
                        columns[Index(column + second_rows)] = pair_value
                        point = Index(point + point_step)
                        column = Index(column + row_stride)
                    p = Count(p + p_step)
                pair = Count(pair + Count(cuda.gridDim.y))
            n = Count(n + Count(cuda.gridDim.z))

    return kernel


def column_sizes(geometry, images: int) -> tuple:
    """The int32 tuple ``(C, H, W, G, C/G, K, P, Nc)`` that ``columns_kernel`` takes as ``sizes``."""
    g = geometry
    return tuple(np.int32(v) for v in (g.in_channels, g.height, g.width, g.offset_groups,
                                       g.in_channels // g.offset_groups, g.taps, g.out_h * g.out_w, images))


def chunk_needs_wide(geometry, images: int) -> bool:
    """Whether the column kernel needs its int64 variant for a chunk of ``images`` images:
    the chunk's input, points or columns past ``INT32_LIMIT`` elements."""
    g = geometry
    pixels = g.out_h * g.out_w
    return needs_wide(images * g.in_channels * g.height * g.width,
                      images * 3 * g.offset_groups * g.taps * pixels,
                      images * g.in_channels * g.taps * pixels)


def compute_points(geometry, offset, mask, xp):
    """The sampling points (flat ``[N, G*K, Ho, Wo, S]``, see ``positions_kernel``), one launch."""
    g = geometry
    offset = flat(offset, xp)
    mask = flat(mask, xp) if mask is not None else xp.empty(1, dtype=offset.dtype)
    per_point = 3 if g.has_mask else 2
    points = xp.empty(offset.size // 2 * per_point, dtype=precision.compute_dtype(g.dtype))
    kernel = positions_kernel(g.dtype, g.has_mask, needs_wide(points.size))
    sizes = tuple(np.int32(v) for v in (g.offset_groups * g.taps, g.height, g.width, g.out_h, g.out_w,
                                        g.batch))
    grid, threads = point_grid(g)
    backend.launch(kernel, grid, threads, offset, mask, points, sizes, conv_tuple(g))
    return points


def column_filler(geometry, input, points, xp):
    """``fill(columns, first_image)``: the bilinear column kernel configured for this layer.

    input: the layer's input (any layout); points: from ``compute_points``. The kernel
    variant and the launch configuration are chosen once, for the largest chunk; each
    call passes flat views that start at the chunk's first image.
    """
    g = geometry
    chunk = chunk_images(g)
    pixels = g.out_h * g.out_w
    input = flat(input, xp)
    image, image_points = g.in_channels * g.height * g.width, points.size // g.batch
    kernel = columns_kernel(g.dtype, g.has_mask, chunk_needs_wide(g, chunk))
    grid, threads = column_grid(g, chunk)

    def fill(columns, first_image):
        images = columns.shape[1] // pixels
        last = first_image + images
        backend.launch(kernel, grid, threads, input[first_image * image:last * image],
                       points[first_image * image_points:last * image_points], columns.reshape(-1),
                       column_sizes(g, images))

    return fill


def gemm_bias(geometry, columns, weight, bias, out, first_image, xp):
    """``out[first_image:...] = weight (x) columns + bias`` per weight group.

    ``weight``, ``bias`` and ``columns`` are in the compute dtype (``compute_operands``);
    ``out`` in the layer's storage dtype: the GEMM runs in float32 for float16/bfloat16 layers
    and its result is rounded once into ``out``."""
    g = geometry
    groups, k = g.groups, g.taps
    n_chunk = columns.shape[1] // (g.out_h * g.out_w)
    w = weight.reshape(groups, g.out_channels // groups, (g.in_channels // groups) * k)
    cols = columns.reshape(groups, (g.in_channels // groups) * k, columns.shape[1])
    result = xp.matmul(w, cols)  # [G, Cout/G, Nc*P]
    result = result.reshape(g.out_channels, n_chunk, g.out_h, g.out_w).transpose(1, 0, 2, 3)
    if bias is not None:
        result = result + bias.reshape(1, -1, 1, 1)
    precision.store_into(out[first_image:first_image + n_chunk], result, g.dtype, xp)


def compute_operands(geometry, weight, bias, xp):
    """``(weight, bias)`` in the layer's compute dtype: for float16/bfloat16 layers a float32
    copy per call (the weights are small beside the activations), else the arrays themselves."""
    dtype = geometry.dtype
    return (precision.to_compute(weight, dtype, xp),
            precision.to_compute(bias, dtype, xp) if bias is not None else None)


def chunk_images(geometry) -> int:
    """Images per column chunk: at most ``CHUNK_IMAGES``, and (unless one image alone is
    more) at most 2**31 - 1 column elements: bounds the buffer's memory, keeps the GEMM's
    n = chunk*P within int32, and the column kernels on their narrow (uint32) variant."""
    g = geometry
    per_image = g.in_channels * g.taps * g.out_h * g.out_w
    return max(1, min(g.batch, CHUNK_IMAGES, INT32_LIMIT // per_image))


def column_chunks(geometry, xp, dtype):
    """Yield ``(first_image, columns)`` per chunk of at most ``CHUNK_IMAGES`` images.

    One buffer of ``C*kh*kw * chunk*Ho*Wo`` elements of ``dtype`` (the compute dtype: float32
    for float16/bfloat16 layers) is allocated and reused: each
    ``columns`` is a contiguous ``[C*kh*kw, n*Ho*Wo]`` view of it for the chunk's images.
    """
    g = geometry
    pixels = g.out_h * g.out_w
    rows = g.in_channels * g.taps
    chunk = chunk_images(g)
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

    with stopwatch.section("offset sampling"):
        points = compute_points(g, offset, mask, xp)

    fill = column_filler(g, input, points, xp)
    weight, bias = compute_operands(g, weight, bias, xp)
    for first, cols in column_chunks(g, xp, precision.compute_dtype(g.dtype)):
        with stopwatch.section("bilinear columns"):
            fill(cols, first)
        with stopwatch.section("gemm"):
            gemm_bias(g, cols, weight, bias, out, first, xp)
    return out


def point_grid(geometry, gpu: bool | None = None) -> tuple:
    """``((blocks_x, blocks_y, blocks_z), threads)`` of the positions launch: x over output
    pixels, y over (group, tap), z over images (all loops grid-stride). ``gpu`` as in
    ``column_grid``."""
    g = geometry
    pixels, group_taps = g.out_h * g.out_w, g.offset_groups * g.taps
    if not (gpu if gpu is not None else not backend.IS_SIMULATOR):  # a simulated thread is a Python thread
        return (min(-(-pixels // 64), 2), min(group_taps, 3), min(g.batch, 2)), min(64, 32 * -(-pixels // 32))
    return (min(-(-pixels // THREADS), 65535), min(group_taps, 65535), min(g.batch, 65535)), THREADS


PIXELS_PER_THREAD = 4  # column kernel: pixels a thread walks per (image, channel pair) row
MIN_BLOCKS = 1024  # ... unless that leaves fewer blocks than this (an H200 has 132 SMs)


def channel_pairs(geometry) -> int:
    """The column kernel's grid rows per image: ``G * ceil((C/G) / CHANNELS_PER_THREAD)``."""
    g = geometry
    per_group = g.in_channels // g.offset_groups
    return g.offset_groups * -(-per_group // CHANNELS_PER_THREAD)


def column_grid(geometry, images: int, gpu: bool | None = None) -> tuple:
    """``((blocks_x, blocks_y, blocks_z), threads)`` of a column-kernel launch over ``images``
    images: x over output pixels, y over channel pairs (``channel_pairs``), z over images
    (all loops grid-stride).

    Each thread walks ``PIXELS_PER_THREAD`` pixels of its row when the grid keeps at least
    ``MIN_BLOCKS`` blocks, so the row setup (a division, the row's bases: ~50 instructions)
    is paid once per 4*K*2 column elements instead of once per K*2. ``gpu``: the GPU's grid
    (default: the current backend's; the simulator's grid is small)."""
    g = geometry
    pixels = g.out_h * g.out_w
    pairs = channel_pairs(g)
    if not (gpu if gpu is not None else not backend.IS_SIMULATOR):  # a simulated thread is a Python thread
        return (min(-(-pixels // 64), 2), min(pairs, 3), min(images, 2)), min(64, 32 * -(-pixels // 32))
    rows = min(pairs, 65535) * min(images, 65535)
    blocks_x = -(-pixels // (THREADS * PIXELS_PER_THREAD))
    if blocks_x * rows < MIN_BLOCKS:
        blocks_x = -(-pixels // THREADS)
    return (min(blocks_x, 65535), min(pairs, 65535), min(images, 65535)), THREADS


def phase_model(geometry, config=None) -> dict:
    """Iterations per thread of each ``# phase:`` body on a GPU, for the first (largest) chunk.

    Positions kernel: ``point_rows``: (image, group, tap) rows per thread; ``positions``:
    sampling points per thread. Column kernel: ``rows``: (image, channel pair) rows per
    thread; ``pixels``: output pixels per thread; ``columns``: the tap-loop body, once per
    (pixel, tap): ``CHANNELS_PER_THREAD`` column elements. (``config`` is unused: these kernels have no tunables.)
    """
    g = geometry
    pixels = g.out_h * g.out_w
    (bx, by, bz), threads = point_grid(g, gpu=True)
    point_rows = -(-g.offset_groups * g.taps // by) * -(-g.batch // bz)
    chunk = chunk_images(g)
    (blocks_x, blocks_y, blocks_z), threads_x = column_grid(g, chunk, gpu=True)
    rows = -(-channel_pairs(g) // blocks_y) * -(-chunk // blocks_z)
    pixels_per_thread = rows * -(-pixels // (blocks_x * threads_x))
    return {"point_rows": point_rows, "positions": point_rows * -(-pixels // (bx * threads)), "rows": rows,
            "pixels": pixels_per_thread, "columns": pixels_per_thread * g.taps}


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``): both index variants, and
    one float16 and one bfloat16 case of each kernel."""
    from numba import types

    for dtype in ("float32", "float64"):
        a1 = types.Array(getattr(types, dtype), 1, "C")
        conv = types.UniTuple(types.int32, 8)
        for wide in (False, True):
            suffix = ",wide" if wide else ""
            for use_mask in (True, False):
                yield (f"positions[mask={use_mask}{suffix}]", dtype, positions_kernel(dtype, use_mask, wide),
                       (a1, a1, a1, types.UniTuple(types.int32, 6), conv))
                yield (f"columns[mask={use_mask}{suffix}]", dtype, columns_kernel(dtype, use_mask, wide),
                       (a1, a1, a1, types.UniTuple(types.int32, 8)))
    # float16 and bfloat16 (storage in half, arithmetic in float32): mask on, 32-bit indices only;
    # offset, mask and input in the storage type, points and columns in float32 (compute_points,
    # column_chunks)
    f1 = types.Array(types.float32, 1, "C")
    for dtype in ("float16", "bfloat16"):
        s1 = types.Array(precision.numba_type(dtype), 1, "C")
        yield ("positions[mask=True]", dtype, positions_kernel(dtype, True),
               (s1, s1, f1, types.UniTuple(types.int32, 6), types.UniTuple(types.int32, 8)))
        yield ("columns[mask=True]", dtype, columns_kernel(dtype, True), (s1, f1, f1, types.UniTuple(types.int32, 8)))
