"""The fully fused, tiled DCN forward (``method="fused"``): no column matrix in device memory.

Motivation
----------
The im2col pipeline writes the column matrix ``[C*kh*kw, N*Ho*Wo]`` to device
memory and reads it back for the GEMM: for the DefT paper's ``deft64`` layer
that is ~9.4 MB written and read per image against ~2.7 MB of real data, so the
layer runs at an arithmetic intensity of ~14 FLOP/B instead of ~112. This
kernel is an *implicit GEMM*: the columns are built tile by tile in shared
memory and consumed there.

One block computes ``out[n, oc0:oc0+OCB, tile]`` for one image ``n``, a
``TH x TW`` tile of output pixels and a block of ``OCB`` output channels of one
weight group. It loops over the group's input channels in chunks of ``CC``
(a chunk never crosses an offset group). The phases, as marked ``# phase:`` in
the kernel (the SASS audit attributes instructions to them by source line):

1. **table** (once per block and offset group, not per channel): for every
   (tap, pixel) of the tile, one int32 -- where the sample's 2x2 window starts
   in the staged region (in-tile), or a negative code (out-of-tile: the clamped
   corner goes to two more int32; outside the band: a window of zeros past the
   staged region) -- and the four corner weights with the mask folded in.
2. **staging**: ``CC`` channels of the input region that the tile's
   *undeformed* taps touch, widened by ``halo`` on each side, zero outside the
   image, the channels interleaved.
3. **weights**: the ``[CC*K, OCB]`` slab of the weights, pre-packed once per
   call (``pack_weights``) in exactly this order, copied in 16-byte vectors.
4. **columns**: the ``[CC*K, P]`` column tile, one table entry per (tap, pixel)
   for all ``CC`` channels: one wide shared load per corner (the interleaved
   channels) and four FMAs per in-tile sample; four global loads per
   out-of-tile sample; no global memory read outside the band.
5. **multiply**: every thread owns ``RO`` output channels x ``RP`` pixels in
   registers, in runs of 4 consecutive ones (``LDS.128`` from 16-byte aligned
   flat shared arrays), and accumulates ``CC*K`` rank-1 updates.
6. **epilogue**: bias, NCHW stores (bounds-checked only in edge blocks).

A chunk cut short (the last of an offset group that ``CC`` does not divide) runs the
``_partial`` forms of staging, weights and columns.

Index arithmetic is 32-bit inside an image (64-bit image bases; a compile-time
``wide_index`` variant for image planes past 2**30 elements or images past 2**31),
so the sm_90 SASS has no 64-bit division and no wraparound tests in any loop
(``docs/perf-notes.md`` has the instruction counts; ``python -m deftnumba audit``
reads them).
The only extra device memory is the packed weights, a 3-element counter array
and 1-element dummies for absent bias/mask.

The definition of *out-of-tile* (one place; ``tiling.brute_force_counts`` and
the model in ``tiling`` use the same one)
---------------------------------------------------------------------------
``OUT_OF_TILE`` below.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ...runtime import backend, precision
from ...runtime.tiles import RegisterBlockedTile, staged_extent
from ...runtime.backend import cuda
from .sampling import conv_tuple, sampling_functions
from .vector import load_vector, vector_width

OUT_OF_TILE = """\
A *sample* is one (image n, input channel c, tap k, output pixel (oy, ox)) with
its position (y, x) = tap_position(...). The block that owns (oy, ox) stages the
rows [iy0, iy0 + SH) and columns [ix0, ix0 + SW) of the input, where
iy0 = oy0*sh - ph - halo for the tile's first output row oy0 and
SH = (TH-1)*sh + (kh-1)*dh + 1 + 2*halo (likewise for columns).

* outside the band (not -1 < y < H and -1 < x < W, or non-finite): the sample
  is zero and touches no memory. Counted as `outside_band`.
* in-tile: inside the band, and the 2x2 window
  rows {floor(y), floor(y)+1} x cols {floor(x), floor(x)+1}
  lies inside the staged rows x columns (a row or column of it outside the
  image is staged as zeros there, and its weight is zero). Read from shared memory.
* out-of-tile: inside the band, window not fully inside the staged region.
  Four reads from global memory (L1/L2) for each such sample (the corners
  clamped into the image).

Counts are of samples (channel-samples): each (n, offset group, tap, pixel)
position contributes C/offset_groups samples. The kernel counts them in the
blocks of output-channel block 0; every further output-channel block repeats the
same reads (the plan keeps that number at 1 where it can).
"""


@dataclass(frozen=True)
class TileConfig(RegisterBlockedTile):
    """Compile-time tile configuration of the fused kernel.

    tile_h, tile_w: output pixels per block (TH x TW), any size; edge tiles are masked.
    halo:     extra staged input rows/columns on each side of the undeformed footprint.
    chunk:    input channels staged per step (CC).
    oc_block: output channels per block (OCB), within one weight group.
    reg_oc, reg_px: register blocking: each thread owns reg_oc channels x reg_px pixels, in
              runs of 4 consecutive ones (2 or 1 when 4 does not divide them): one LDS.128
              per run and rank-1 update.
    threads = (oc_block // reg_oc) * (tile_h * tile_w // reg_px).
    """

    tile_h: int = 4
    tile_w: int = 4
    halo: int = 1
    chunk: int = 2
    oc_block: int = 4
    reg_oc: int = 2
    reg_px: int = 2

    def __post_init__(self):
        self.check_blocking("chunk")
        if self.halo < 0:
            raise ValueError(f"TileConfig.halo must be >= 0, got {self.halo}")

    def staged_shape(self, geometry) -> tuple[int, int]:
        """Rows and columns of the staged input region (footprint of the undeformed taps + halo)."""
        g = geometry
        return (staged_extent(self.tile_h, g.stride_h, g.kernel_h, g.dil_h, self.halo),
                staged_extent(self.tile_w, g.stride_w, g.kernel_w, g.dil_w, self.halo))

    def shared_bytes(self, geometry) -> int:
        """Static shared memory of one block, in bytes: the staged region and the zero window
        (``chunk`` channels), the weight slab and the column tile
        (``chunk * K`` rows of ``oc_block`` and of ``pixels``), and the sampling table
        (per (tap, pixel): four weights and three int32)."""
        s = precision.compute_dtype(geometry.dtype).itemsize  # shared arrays: the compute type
        rows, cols = self.staged_shape(geometry)
        k = geometry.taps
        ck = self.chunk * k
        table = k * self.pixels
        zero_window = cols + 2  # row_pitch + 2 positions past the region, always zero
        slab = -(-ck * self.oc_block // 4) * 4  # the column tile starts 16-byte aligned after it
        return s * (self.chunk * (rows * cols + zero_window) + slab
                    + ck * self.pixels + 4 * table) + 4 * 3 * table

    def blocks(self, geometry) -> tuple[int, int, int]:
        """All blocks of the layer: ``(tiles, groups * oc_blocks, batch)``."""
        g = geometry
        tiles = -(-g.out_h // self.tile_h) * -(-g.out_w // self.tile_w)
        oc_blocks = -(-(g.out_channels // g.groups) // self.oc_block)
        return tiles, g.groups * oc_blocks, g.batch

    def grid(self, geometry) -> tuple[int, int, int]:
        """The grid of one launch: ``blocks`` with y and z capped at 65535 (CUDA's limit);
        ``forward`` launches as many times as the cap needs (see ``launches``)."""
        tiles, blocks_y, batch = self.blocks(geometry)
        return tiles, min(blocks_y, GRID_YZ_LIMIT), min(batch, GRID_YZ_LIMIT)

    def launches(self, geometry):
        """``(first_image, images, first_block_y, blocks_y)`` of every launch, in order."""
        _, blocks_y, batch = self.blocks(geometry)
        for first in range(0, batch, GRID_YZ_LIMIT):
            for y0 in range(0, blocks_y, GRID_YZ_LIMIT):
                yield first, min(GRID_YZ_LIMIT, batch - first), y0, min(GRID_YZ_LIMIT, blocks_y - y0)


GRID_YZ_LIMIT = 65535  # CUDA's limit on gridDim.y and gridDim.z

# A small config for the simulator (32 threads) and a GPU default used when no plan is given.
SIMULATOR_CONFIG = TileConfig(tile_h=4, tile_w=4, halo=1, chunk=2, oc_block=4, reg_oc=2, reg_px=1)
GPU_CONFIG = TileConfig(tile_h=8, tile_w=8, halo=2, chunk=4, oc_block=64, reg_oc=8, reg_px=8)
"""What ``tiling.choose_plan`` picks for ``deft64`` on the H200 with the prior statistics
(|d| ~ N(0, 1)): 64 threads of 8x8 accumulators, 38.7 KB shared memory (5 blocks per SM),
128 registers under ``launch_bounds``, no spills."""
STATIC_SHARED_LIMIT = 48 * 1024


def default_config(geometry) -> TileConfig:
    """The config used when ``forward`` gets no plan (``tiling.plan_for`` is the better choice):
    ``GPU_CONFIG``, shrunk (channel chunk, then output-channel block, then tile) until its
    static shared memory fits 48 KB; ``SIMULATOR_CONFIG`` in the simulator."""
    if backend.IS_SIMULATOR:
        return SIMULATOR_CONFIG
    cfg = GPU_CONFIG
    for th, tw in ((8, 8), (4, 8), (4, 4), (2, 4), (2, 2), (1, 2), (1, 1)):
        for ocb, ro in ((64, 8), (32, 4), (16, 2), (8, 1)):
            for chunk in (4, 2, 1):
                cfg = TileConfig(th, tw, GPU_CONFIG.halo, chunk, ocb, ro, min(GPU_CONFIG.reg_px, th * tw))
                if cfg.shared_bytes(geometry) <= STATIC_SHARED_LIMIT:
                    return cfg
    return cfg  # a 1x1 tile of 8 channels: ~32*K + 36*K bytes, over 48 KB only for K > ~700 taps


# Traffic of one launch (N images, C -> Cout, K = kh*kw taps, P = Ho*Wo, s = itemsize,
# B = number of output-channel blocks per weight group, T = number of tiles,
# SH x SW the staged region per tile, f the
# out-of-tile fraction of in-band samples):
#   reads  input   B * N * C * T * SH*SW * s  (the staged tiles; halo rows/cols are
#                                              re-read by neighbouring tiles: L2 hits)
#          offsets B * groups_overlap * N * 2*G*K*P * s and mask B * N * G*K*P * s (table)
#          weights N * T * Cout * C/groups * K * s    (the packed slab of every block: L2 hits)
#          out-of-tile  B * f * N * C * K * P * 4 corners * s  (scattered, mostly L1/L2 hits)
#   writes output  N * Cout * P * s once, NCHW; no column buffer. The packed weights
#          (``pack_weights``: Cout rounded up to the block x C/groups x K) are written once per call.
#   FLOPs  2 * N * Cout * C/groups * K * P (the GEMM) + ~7 * B * N * C * K * P (interpolation)
#          + ~20 * B * N * G*K*P (positions and corner weights).
#   Shared memory per block: TileConfig.shared_bytes.
#
# Integer types. Numba types every integer sum and product as int64 (and adds a wraparound
# test to every signed subscript). The kernel therefore converts each index to uint32
# (``U32``: non-negative, so subscripts skip the wraparound) or int32 (``I32``: may be
# negative) as soon as it is computed; LLVM then narrows the arithmetic to 32 bits. Only
# the base of an image (``n * C + c`` times ``H * W``, etc.) is int64. ``wide_index`` makes
# the offset inside an image plane int64 too (``PLANE``), for planes past 2**31 elements.
I32 = np.int32
U32 = np.uint32
I64 = np.int64
U64 = np.uint64  # only at a subscript: an int64 index known to be >= 0 skips the wraparound
INT32_LIMIT = 2**31 - 1


def _vector(width: int) -> int:
    """Elements a thread reads at once from shared memory: 4 (LDS.128), 2 (LDS.64) or 1."""
    return 4 if width % 4 == 0 else 2 if width % 2 == 0 else 1


REGISTER_BUDGET = 128  # per thread: 65536 / (16 warps * 32 threads), so 16 warps fit on an SM


WIDE_REGISTER_BUDGET = 168  # the wide_index variant: int64 offsets need more (12 warps/SM)


def launch_bounds(config, wide_index: bool = False) -> tuple[int, int]:
    """``(threads per block, minimum blocks per SM)`` for ptxas: it then keeps the kernel
    within ``REGISTER_BUDGET`` registers (``WIDE_REGISTER_BUDGET`` for the ``wide_index``
    variant, whose 64-bit offsets spilled at 128). (Unbounded, ptxas gives the deft64 kernel
    ~158 registers to hold the sampling table's and the staging's values beside the 64
    accumulators; bounded at 128 the SASS of every loop is the same, with no spills.)"""
    budget = WIDE_REGISTER_BUDGET if wide_index else REGISTER_BUDGET
    return config.threads, max(1, 65536 // (budget * config.threads))


def _slab_copy(config, taps) -> tuple[int, int]:
    """``(elements, unrolled)``: weight-slab elements each thread copies per chunk, and how
    many of them one loop iteration copies (a divisor, at most 4: loads in flight)."""
    reps = -(-config.chunk * taps * config.oc_block // config.threads)
    return reps, max(d for d in range(1, 5) if reps % d == 0)


def _weight_vector(config, taps, dtype) -> int:
    """Elements per copy step of a full chunk's weight slab: a 16-byte vector (4 float32, 2
    float64) when every slab, and every block's slice of the packed weights, starts at a
    multiple of it (``taps * oc_block`` divisible by the width), else 1. The packed weights
    are in the layer's compute dtype (float32 for float16/bfloat16 layers)."""
    width = vector_width(precision.compute_dtype(dtype))
    return width if (taps * config.oc_block) % width == 0 else 1


def _multiply_unroll(config, taps) -> int:
    """Rank-1 updates per iteration of the multiply loop: 12, 8, 4, 2 or 1, the largest that
    divides ``chunk * K`` (a 3x3 kernel's chunk of 4: 12, three iterations per chunk; the
    loop's own counter, compare and branch are then half an instruction per update)."""
    rows = config.chunk * taps
    return next(u for u in (12, 8, 4, 2, 1) if rows % u == 0)


def needs_wide_index(geometry) -> bool:
    """True when an offset inside one image plane may not fit in int32 (``H * W`` past 2**30),
    or one inside a whole input image not in uint32 arithmetic (``C * H * W`` past 2**31)."""
    g = geometry
    return (max(g.height * g.width, g.out_h * g.out_w) > INT32_LIMIT // 2
            or g.in_channels * g.height * g.width > INT32_LIMIT)


@functools.cache
def fused_kernel(dtype, kernel_h, kernel_w, stride_h, stride_w, dil_h, dil_w, config: TileConfig,
                 use_mask: bool, use_bias: bool, counting: bool = False, wide_index: bool = False):
    """Kernel ``(input, offset, mask, weight, bias, out, conv, dims, counters, block_y0)``,
    launched on ``config.grid(geometry)`` blocks of ``config.threads`` threads
    (``config.launches``). Every array is flat (1-D, C order):

    input ``[N*C*H*W]``; offset ``[N*2GK*Ho*Wo]``; mask ``[N*GK*Ho*Wo]`` (a dummy when
    ``use_mask`` is false); weight the packed ``[G*oc_blocks, C/groups, K, oc_block]`` of
    ``pack_weights``; bias ``[Cout]`` (a dummy when ``use_bias`` is false); out
    ``[N*Cout*Ho*Wo]``; conv the int32 tuple of ``sampling.conv_tuple``; dims the int32
    tuple of ``kernel_dims``; counters int64 ``[3]``: ``(in_tile, out_of_tile,
    outside_band)`` samples, accumulated only when ``counting`` (see ``OUT_OF_TILE``);
    block_y0 (int32) the first (weight group x output-channel block) index of this launch.

    ``dtype`` is the layer's storage dtype: input, offset, mask and out are stored in it
    (read through ``load``, written through ``store``); weight and bias, the shared arrays
    and the accumulators are in its compute dtype (float32 for float16/bfloat16).
    """
    fns = sampling_functions(dtype)
    load, store = fns.load, fns.store
    in_band = fns.in_band
    bilinear_axis = fns.bilinear_axis
    T = fns.T
    ZERO = fns.ZERO
    DT = T  # shared/local array element type
    PLANE = I64 if wide_index else I32  # offsets inside one image plane
    IMG = I64 if wide_index else U32  # offsets inside one input image (C*H*W elements)

    tile_h, tile_w, halo = config.tile_h, config.tile_w, config.halo
    chunk, oc_block, reg_oc, reg_px = config.chunk, config.oc_block, config.reg_oc, config.reg_px
    taps = kernel_h * kernel_w
    pixels = tile_h * tile_w
    chunk_rows = chunk * taps  # rows of the column tile and of the weight slab (channel, tap)
    table_size = taps * pixels  # one sampling-table entry per (tap, pixel)
    # The staged region (OUT_OF_TILE) is staged_rows x staged_cols: an in-tile sample's
    # whole 2x2 window lies in it (rows or columns of it outside the image are staged zeros).
    staged_rows = (tile_h - 1) * stride_h + (kernel_h - 1) * dil_h + 1 + 2 * halo
    staged_cols = (tile_w - 1) * stride_w + (kernel_w - 1) * dil_w + 1 + 2 * halo
    row_pitch = staged_cols
    region = staged_rows * row_pitch  # one channel of the stored region
    # past the region, row_pitch + 2 positions that stay zero: the 2x2 window every entry
    # outside the band (or the output) points at, so the column build reads no memory for it
    zero_window = region
    zero_size = chunk * (row_pitch + 2)
    staged_size = chunk * region + zero_size
    slab_size = chunk_rows * oc_block  # the weight slab of one chunk
    column_size = chunk_rows * pixels  # the column tile of one chunk
    columns_at = -(-slab_size // 4) * 4  # where the column tile starts, 16-byte aligned
    operands_size = columns_at + column_size
    table_weight_size = 4 * table_size
    accumulators = reg_oc * reg_px
    unroll = _multiply_unroll(config, taps)  # rank-1 updates per multiply-loop iteration
    oc_threads = oc_block // reg_oc  # threads along output channels ...
    px_threads = pixels // reg_px  # ... and along pixels
    threads = oc_threads * px_threads
    # Ownership: a thread owns reg_oc channels in runs of oc_vec consecutive ones (the runs
    # oc_threads * oc_vec apart), and reg_px pixels likewise, so each run is one wide load
    # and the 8 threads of a quarter warp read 8 consecutive runs (no bank conflict).
    oc_vec, px_vec = _vector(reg_oc), _vector(reg_px)
    oc_run_step, px_run_step = oc_threads * oc_vec, px_threads * px_vec
    RUNS_IN_ROWS = tile_w % px_vec == 0  # a thread's run of pixels never crosses a tile row
    slab_reps, slab_group = _slab_copy(config, taps)  # weight elements per thread and (partial) chunk
    slab_stop = slab_reps * threads
    weight_vec = _weight_vector(config, taps, dtype)  # elements per 16-byte vector of the slab copy
    slab_vectors = slab_size // weight_vec
    slab_vector_reps = -(-slab_vectors // threads)  # vectors per thread and full chunk
    stage_reps = -(-region // threads)  # staged positions per thread and full chunk
    row_step = row_pitch * chunk  # staged elements between vertically neighbouring positions
    USE_MASK, USE_BIAS, COUNTING = use_mask, use_bias, counting
    options = {} if backend.IS_SIMULATOR else {"launch_bounds": launch_bounds(config, wide_index)}

    @cuda.jit(**options)
    def kernel(input, offset, mask, weight, bias, out, conv, dims, counters, block_y0):
        tid = U32(cuda.threadIdx.x)
        n = I64(cuda.blockIdx.z)
        channels, height, width, out_channels, out_h, out_w, cpg, cpo, offset_channels, mask_channels = dims
        pad_h = conv[2]
        pad_w = conv[3]
        groups = U32(channels) // U32(cpg)
        opg = U32(U32(out_channels) // groups)  # output channels per weight group
        oc_blocks = U32(U32(opg + (oc_block - 1)) // U32(oc_block))
        block_y = U32(cuda.blockIdx.y + block_y0)  # launches split at 65535 blocks in y
        g = U32(block_y // oc_blocks)
        ob = U32(block_y - g * oc_blocks)
        tiles_x = U32(U32(out_w + (tile_w - 1)) // U32(tile_w))
        tile_y = U32(U32(cuda.blockIdx.x) // tiles_x)
        oy0 = I32(tile_y * tile_h)
        ox0 = I32((U32(cuda.blockIdx.x) - tile_y * tiles_x) * tile_w)
        iy0 = I32(oy0 * stride_h - pad_h - halo)  # first staged input row (OUT_OF_TILE)
        ix0 = I32(ox0 * stride_w - pad_w - halo)  # first staged input column
        in_plane = I64(height) * I64(width)
        out_plane = I64(out_h) * I64(out_w)
        image_plane = IMG(in_plane)  # offsets from a channel's plane: uint32 (int64 when wide_index)

        staged = cuda.shared.array(staged_size, dtype=DT, alignment=16)
        # the weight slab and the column tile in one array, the column tile from columns_at: the
        # multiply loop addresses both from one shared-memory base (with two arrays, ptxas
        # recomputed the second base in every iteration: 5 instructions per 12 updates)
        operands = cuda.shared.array(operands_size, dtype=DT, alignment=16)
        slab = operands  # [chunk * K, oc_block] from 0
        columns = operands  # [chunk * K, pixels] from columns_at
        table_where = cuda.shared.array(table_size, dtype=np.int32, alignment=16)
        table_weights = cuda.shared.array(table_weight_size, dtype=DT, alignment=16)
        table_row = cuda.shared.array(table_size, dtype=np.int32, alignment=16)
        table_col = cuda.shared.array(table_size, dtype=np.int32, alignment=16)

        acc = cuda.local.array(accumulators, dtype=DT)
        a = cuda.local.array(reg_oc, dtype=DT)
        b = cuda.local.array(reg_px, dtype=DT)
        position = cuda.local.array(chunk, dtype=DT)  # one staged position of the chunk's channels
        for i in range(accumulators):
            acc[i] = ZERO
        oc_t = U32(tid // U32(px_threads))
        oc_first = U32(oc_t * oc_vec)  # first channel of this thread's first run
        px_first = U32((tid - oc_t * px_threads) * px_vec)  # first pixel of its first run

        # The zero window (all channels), written once: staging never writes past the region.
        # (The first chunk's barrier after staging makes it visible to the column build.)
        z = tid
        while z < zero_size:
            staged[chunk * region + z] = ZERO
            z = U32(z + threads)

        c_begin = I32(g * cpg)
        c_end = I32(c_begin + cpg)
        table_group = I32(-1)
        og = I32(U32(c_begin) // U32(cpo))  # offset group of channel c (one division per block)
        segment_end = I32(min(c_end, (og + 1) * cpo))  # where its channels end in this group
        c = c_begin
        while c < c_end:
            if c == segment_end:  # the next offset group
                og = I32(og + 1)
                segment_end = I32(min(c_end, I32(I32(og + 1) * cpo)))
            chunk_end = I32(min(segment_end, I32(c + chunk)))  # 32-bit (c + chunk alone is int64)
            nc = I32(chunk_end - c)  # channels in this chunk (<= chunk)
            if og != table_group:
                # phase: table
                # One entry per (tap, pixel) of offset group og, for all its channels: where
                # the sample's 2x2 window starts in the stored region (>= 0, in-tile), or
                # -1 - (row step * 2 + column step) with its clamped top-left corner in
                # table_row/table_col (out-of-tile); outside the band or the output, the zero
                # window (no global memory is read: the value is 0 * mask); and the four
                # corner weights.
                # (The previous chunk ended with a barrier: nobody reads the old table.)
                count_in = 0
                count_out = 0
                count_band = 0
                e = tid
                while e < table_size:
                    tap = U32(e // U32(pixels))
                    p = U32(e - tap * pixels)
                    u = U32(p // U32(tile_w))
                    oy = I32(oy0 + u)
                    ox = I32(ox0 + (p - u * tile_w))
                    tap_i = U32(tap // U32(kernel_w))
                    tap_j = U32(tap - tap_i * kernel_w)
                    where = I32(zero_window)
                    row = I32(-1)
                    col = I32(0)
                    w00 = ZERO
                    w01 = ZERO
                    w10 = ZERO
                    w11 = ZERO
                    if oy < out_h and ox < out_w:
                        pixel = PLANE(oy * out_w + ox)
                        ch = I32(og * taps + tap)
                        # sampling.tap_position's rule, on flat arrays
                        at = (n * offset_channels + 2 * ch) * out_plane + pixel
                        y = T(oy * stride_h - pad_h + tap_i * dil_h) + load(offset, U64(at))
                        x = T(ox * stride_w - pad_w + tap_j * dil_w) + load(offset, U64(at + out_plane))
                        m = ZERO
                        if USE_MASK:
                            m = load(mask, U64((n * mask_channels + ch) * out_plane + pixel))
                        if in_band(y, x, height, width):
                            y_lo, y_hi, wy_lo, wy_hi, _, _ = bilinear_axis(y, height)
                            x_lo, x_hi, wx_lo, wx_hi, _, _ = bilinear_axis(x, width)
                            w00 = wy_lo * wx_lo
                            w01 = wy_lo * wx_hi
                            w10 = wy_hi * wx_lo
                            w11 = wy_hi * wx_hi
                            if USE_MASK:
                                w00 *= m
                                w01 *= m
                                w10 *= m
                                w11 *= m
                            # the unclamped window's first row and column, in the region
                            if (U32(I32(math.floor(y)) - iy0) < U32(staged_rows - 1)
                                    and U32(I32(math.floor(x)) - ix0) < U32(staged_cols - 1)):
                                # in-tile: the window (floor(y), floor(x)) .. +1, unclamped, in
                                # the region; a row or column of it outside the image has
                                # weight zero and is staged as zero
                                where = I32((I32(math.floor(y)) - iy0) * row_pitch + (I32(math.floor(x)) - ix0))
                                count_in += 1
                            else:
                                where = I32(-1 - ((y_hi - y_lo) * 2 + (x_hi - x_lo)))
                                row = I32(y_lo)
                                col = I32(x_lo)
                                count_out += 1
                        else:  # the zero window, weights (0 * m, 0, 0, 0)
                            count_band += 1
                            if USE_MASK:  # value 0 times the mask, as torchvision: NaN stays NaN
                                w00 = ZERO * m
                    table_where[e] = where
                    table_row[e] = row
                    table_col[e] = col
                    table_weights[4 * e] = w00
                    table_weights[4 * e + 1] = w01
                    table_weights[4 * e + 2] = w10
                    table_weights[4 * e + 3] = w11
                    e = U32(e + threads)
                if COUNTING and ob == 0:
                    segment_channels = I64(segment_end - c)
                    cuda.atomic.add(counters, 0, I64(count_in) * segment_channels)
                    cuda.atomic.add(counters, 1, I64(count_out) * segment_channels)
                    cuda.atomic.add(counters, 2, I64(count_band) * segment_channels)
                table_group = og

            # phase: staging
            # The chunk's input region, row by row (coalesced); zero outside
            # the image. The channels are interleaved: position s of channel cc is
            # staged[s * chunk + cc], so that the column build reads one corner of all the
            # chunk's channels with one wide shared load. A thread decodes the position of
            # one stored element once and copies it for every channel of the chunk.
            channel_base = (n * channels + c) * in_plane  # channel c's plane (int64)
            full_chunk = nc == chunk
            if full_chunk:  # every chunk but the last of an offset group or weight group
                # stage_reps positions per thread: a compile-time trip count (a 32-bit counter
                # from 0), so LLVM unrolls it without a run-time remainder
                rep = U32(0)
                while rep < stage_reps:
                    s = U32(tid + rep * threads)
                    if region % threads == 0 or s < region:
                        r = U32(s // U32(row_pitch))
                        gy = I32(iy0 + r)
                        gx = I32(ix0 + (s - r * row_pitch))
                        inside = U32(gy) < U32(height) and U32(gx) < U32(width)
                        for cc in range(chunk):
                            position[cc] = ZERO
                        if inside:  # one branch, then the chunk's stores side by side (STS.128)
                            at = channel_base + PLANE(PLANE(gy) * width + gx)  # channel c's element (int64)
                            for cc in range(chunk):
                                position[cc] = load(input, U64(at + cc * in_plane))
                        to = U32(s * chunk)
                        for cc in range(chunk):
                            staged[to + cc] = position[cc]
                    rep = U32(rep + 1)
            else:
                # phase: staging_partial
                # The same, with zeros for the channels past the chunk's end.
                s = tid
                while s < region:
                    r = U32(s // U32(row_pitch))
                    gy = I32(iy0 + r)
                    gx = I32(ix0 + (s - r * row_pitch))
                    inside = U32(gy) < U32(height) and U32(gx) < U32(width)
                    at = PLANE(PLANE(gy) * width + gx)  # in channel c's plane; read only when inside
                    to = U32(s * chunk)
                    for cc in range(chunk):
                        v = ZERO
                        if inside and cc < nc:
                            v = load(input, U64(channel_base + at + cc * in_plane))
                        staged[to + cc] = v
                    s = U32(s + threads)

            # phase: weights
            # The packed weight slab of (block, channels c .. c+nc): contiguous, read in order.
            # A full chunk is copied in 16-byte vectors (LDG.128, STS.128; pack_weights'
            # array is freshly allocated, so 16-byte aligned, and every slab starts at a
            # multiple of the vector width), slab_vector_reps per thread: a compile-time
            # count, so no run-time remainder; one 64-bit address per thread, and the r-th
            # vector at a compile-time offset from it.
            slab_base = (I64(block_y) * cpg + I64(c - c_begin)) * (taps * oc_block)
            if full_chunk:
                # the r-th vector of this thread is r * threads vectors past its first one: with
                # r a constant in the unrolled copy, one base address and immediate offsets
                first_from = U64(slab_base + tid * weight_vec)
                first_to = U32(tid * weight_vec)
                r = U32(0)
                while r < slab_vector_reps:
                    if slab_vectors % threads == 0 or U32(tid + r * threads) < slab_vectors:
                        step = r * (threads * weight_vec)
                        if weight_vec == 1:
                            slab[first_to + step] = weight[first_from + U64(step)]
                        else:
                            values = load_vector(weight, first_from + U64(step))
                            for k in range(weight_vec):
                                slab[first_to + step + k] = values[k]
                    r = U32(r + 1)
            else:
                # phase: weights_partial
                # The last chunk of an offset group or weight group: zeros past nc channels.
                slab_valid = U32(nc * (taps * oc_block))
                from_at = slab_base + tid  # this thread's next element: weight[from_at + rep * threads]
                to_at = tid  # ... goes to slab[to_at + rep * threads]
                while to_at < slab_stop:
                    valid_left = I32(I32(slab_valid) - I32(to_at))  # rep * threads < valid_left: a weight
                    slab_left = I32(slab_size - I32(to_at))
                    for rep in range(slab_group):
                        if slab_size % threads == 0 or rep * threads < slab_left:
                            v = ZERO
                            if rep * threads < valid_left:
                                v = weight[U64(from_at + rep * threads)]
                            slab[to_at + rep * threads] = v
                    from_at += slab_group * threads
                    to_at = U32(to_at + slab_group * threads)
            cuda.syncthreads()  # the table, the staged region and the slab are complete

            # phase: columns
            # The [chunk*K, P] column tile, one table entry per (tap, pixel) for all the
            # chunk's channels. In-tile: the 2x2 window's corners are at where, where + 1,
            # where + row_pitch and where + row_pitch + 1, each one wide load of the chunk's
            # interleaved channels (LDS.128 for 4), and four FMAs per channel.
            e = tid
            if full_chunk:
                while e < table_size:
                    where = table_where[e]
                    w00 = table_weights[4 * e]
                    w01 = table_weights[4 * e + 1]
                    w10 = table_weights[4 * e + 2]
                    w11 = table_weights[4 * e + 3]
                    if where >= 0:  # in-tile (or the zero window: outside the band or the output)
                        at = U32(U32(where) * chunk)
                        for cc in range(chunk):
                            columns[columns_at + e + cc * table_size] = (
                                w00 * staged[at + cc] + w01 * staged[at + chunk + cc]
                                + w10 * staged[at + row_step + cc] + w11 * staged[at + row_step + chunk + cc])
                    else:
                        # phase: out_of_tile
                        # Four global loads (clamped corners) per channel; the warp issues this
                        # path only when one of its lanes has an out-of-tile sample.
                        row = table_row[e]
                        steps = I32(-1 - where)
                        down = PLANE((steps >> 1) * width)
                        right = I32(steps & 1)
                        corner = IMG(PLANE(row) * width + table_col[e])  # in channel c's plane
                        for cc in range(chunk):
                            at = channel_base + IMG(corner + cc * image_plane)
                            columns[columns_at + U32(cc * table_size + e)] = (
                                w00 * load(input, U64(at)) + w01 * load(input, U64(at + right))
                                + w10 * load(input, U64(at + down)) + w11 * load(input, U64(at + down + right)))
                    # phase: columns
                    e = U32(e + threads)
            else:
                # phase: columns_partial
                # The same for a chunk cut short: rows of channels past nc are zero.
                while e < table_size:
                    where = table_where[e]
                    w00 = table_weights[4 * e]
                    w01 = table_weights[4 * e + 1]
                    w10 = table_weights[4 * e + 2]
                    w11 = table_weights[4 * e + 3]
                    if where >= 0:  # in-tile (or the zero window)
                        at = U32(U32(where) * chunk)
                        for cc in range(chunk):  # rows past nc are staged as zeros ...
                            v = (w00 * staged[at + cc] + w01 * staged[at + chunk + cc]
                                 + w10 * staged[at + row_step + cc] + w11 * staged[at + row_step + chunk + cc])
                            if cc >= nc:  # ... but a weight may be NaN (mask): select, no branch
                                v = ZERO
                            columns[columns_at + e + cc * table_size] = v
                    else:  # out-of-tile: four global loads (clamped corners) per channel
                        row = table_row[e]
                        steps = I32(-1 - where)
                        down = PLANE((steps >> 1) * width)
                        right = I32(steps & 1)
                        corner = PLANE(PLANE(row) * width + table_col[e])
                        base = (n * channels + c) * in_plane + corner
                        for cc in range(chunk):
                            v = ZERO
                            if cc < nc:
                                at = base + cc * in_plane
                                v = (w00 * load(input, U64(at)) + w01 * load(input, U64(at + right))
                                     + w10 * load(input, U64(at + down)) + w11 * load(input, U64(at + down + right)))
                            columns[columns_at + U32(cc * table_size + e)] = v
                    e = U32(e + threads)
            cuda.syncthreads()  # the column tile is complete

            # phase: multiply
            # chunk*K rank-1 updates: reg_oc weights and reg_px columns from shared memory
            # (runs of oc_vec / px_vec consecutive floats: LDS.128 when 4), then
            # reg_oc * reg_px FFMAs into the accumulators.
            w_at = oc_first  # this thread's first weight of slab row ck
            c_at = U32(columns_at + px_first)  # its first column value of column-tile row ck
            c_stop = U32(c_at + column_size)
            while c_at < c_stop:  # `unroll` rows of the slab and the column tile per iteration
                # written out: LLVM does not unroll a loop over these calls
                rank_one_update(acc, a, b, slab, columns, w_at, c_at)
                if unroll >= 2:
                    rank_one_update(acc, a, b, slab, columns, w_at + oc_block, c_at + pixels)
                if unroll >= 4:
                    rank_one_update(acc, a, b, slab, columns, w_at + 2 * oc_block, c_at + 2 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 3 * oc_block, c_at + 3 * pixels)
                if unroll >= 8:
                    rank_one_update(acc, a, b, slab, columns, w_at + 4 * oc_block, c_at + 4 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 5 * oc_block, c_at + 5 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 6 * oc_block, c_at + 6 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 7 * oc_block, c_at + 7 * pixels)
                if unroll == 12:
                    rank_one_update(acc, a, b, slab, columns, w_at + 8 * oc_block, c_at + 8 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 9 * oc_block, c_at + 9 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 10 * oc_block, c_at + 10 * pixels)
                    rank_one_update(acc, a, b, slab, columns, w_at + 11 * oc_block, c_at + 11 * pixels)
                w_at = U32(w_at + unroll * oc_block)
                c_at = U32(c_at + unroll * pixels)
            cuda.syncthreads()  # all reads of the region, slab and columns are done
            c = chunk_end

        # phase: epilogue
        # bias, NCHW store: a thread writes runs of px_vec consecutive pixels of a tile row.
        # The block's channels are derived here, not kept through the chunk loop (a register
        # fewer there: at 128 registers that is the difference between a spill and none;
        # so are the group sizes, from the kernel's parameters).
        block_y = U32(cuda.blockIdx.y + block_y0)
        out_per_group = U32(U32(out_channels) // U32(U32(channels) // U32(cpg)))
        blocks_per_group = U32(U32(out_per_group + (oc_block - 1)) // U32(oc_block))
        g = U32(block_y // blocks_per_group)
        ob = U32(block_y - g * blocks_per_group)
        oc0 = I32(g * out_per_group + ob * oc_block)  # first output channel of the block
        oc_count = I32(min(oc_block, out_per_group - ob * oc_block))  # valid channels of the block
        if (RUNS_IN_ROWS and oc_count == oc_block and oy0 + tile_h <= out_h
                and ox0 + tile_w <= out_w):  # an interior block: every value is stored
            for i in range(reg_oc):
                o = I32(oc_first + (i // oc_vec) * oc_run_step + i % oc_vec)
                bias_v = ZERO
                if USE_BIAS:
                    bias_v = bias[U32(oc0 + o)]
                out_base = (n * out_channels + (oc0 + o)) * out_plane
                for run in range(reg_px // px_vec):  # a run of px_vec pixels lies in one tile row
                    p = U32(px_first + run * px_run_step)
                    u = U32(p // U32(tile_w))
                    at = out_base + PLANE(I32(oy0 + u) * out_w + I32(ox0 + (p - u * tile_w)))
                    for k in range(px_vec):
                        store(out, U64(at + k), acc[i * reg_px + run * px_vec + k] + bias_v)
        else:
            # phase: epilogue_edge
            # A block at the output's edge (or with a partial channel block): each value checked.
            for i in range(reg_oc):
                o = I32(oc_first + (i // oc_vec) * oc_run_step + i % oc_vec)
                if o < oc_count:
                    bias_v = ZERO
                    if USE_BIAS:
                        bias_v = bias[U32(oc0 + o)]
                    out_base = (n * out_channels + (oc0 + o)) * out_plane
                    for j in range(reg_px):
                        p = U32(px_first + (j // px_vec) * px_run_step + j % px_vec)
                        u = U32(p // U32(tile_w))
                        oy = I32(oy0 + u)
                        ox = I32(ox0 + (p - u * tile_w))
                        if oy < out_h and ox < out_w:
                            store(out, U64(out_base + PLANE(oy * out_w + ox)), acc[i * reg_px + j] + bias_v)

    @cuda.jit(device=True, inline="always")
    def rank_one_update(acc, a, b, slab, columns, w_at, c_at):
        """acc += a b^T for one row of the slab (from w_at) and of the column tile (from c_at).
        Defined after the kernel (numba resolves it at compile time) so that its lines
        belong to the multiply phase."""
        # phase: multiply
        for i in range(reg_oc):
            a[i] = slab[w_at + ((i // oc_vec) * oc_run_step + i % oc_vec)]
        for j in range(reg_px):
            b[j] = columns[c_at + ((j // px_vec) * px_run_step + j % px_vec)]
        for i in range(reg_oc):
            for j in range(reg_px):
                acc[i * reg_px + j] += a[i] * b[j]

    return kernel


def kernel_dims(geometry) -> tuple:
    """The int32 tuple ``dims`` of the kernel: ``(C, H, W, Cout, Ho, Wo, C/groups,
    C/offset_groups, 2*G*K, G*K)`` (G the offset groups, K the taps)."""
    g = geometry
    return tuple(np.int32(v) for v in (g.in_channels, g.height, g.width, g.out_channels, g.out_h, g.out_w,
                                       g.in_channels // g.groups, g.in_channels // g.offset_groups,
                                       2 * g.offset_groups * g.taps, g.offset_groups * g.taps))


def pack_weights(geometry, config, weight, xp):
    """``weight`` ``[Cout, C/groups, kh, kw]`` in the order the kernel reads it:
    ``[groups * oc_blocks, C/groups, K, oc_block]`` flat, each block's output channels
    padded with zeros to ``oc_block``. One pass per call, by the array module, into a new
    array in the layer's compute dtype (a float16/bfloat16 weight is converted to float32
    here; the kernel copies it in 16-byte vectors: ``_weight_vector``)."""
    g = geometry
    opg, cpg = g.out_channels // g.groups, g.in_channels // g.groups
    oc_blocks = -(-opg // config.oc_block)
    weight = precision.to_compute(weight, g.dtype, xp)
    w = weight.reshape(g.groups, opg, cpg, g.taps)
    padded = oc_blocks * config.oc_block
    if padded != opg:
        w = xp.concatenate([w, xp.zeros((g.groups, padded - opg, cpg, g.taps), dtype=weight.dtype)], axis=1)
    w = w.reshape(g.groups * oc_blocks, config.oc_block, cpg, g.taps).transpose(0, 2, 3, 1)
    # a fresh allocation (never a view of ``weight``): 16-byte aligned for the kernel's
    # vector copy (CuPy allocates on 256-byte boundaries)
    return xp.array(w, dtype=weight.dtype, copy=True, order="C").reshape(-1)


def _config_of(plan, geometry) -> TileConfig:
    if plan is None:
        return default_config(geometry)
    if isinstance(plan, TileConfig):
        return plan
    tile = getattr(plan, "tile", None)
    return tile if tile is not None else default_config(geometry)


def _flat(a):
    """A 1-D view of a C-contiguous array (a copy only if it is not contiguous)."""
    return a.reshape(-1)


def _launch(geometry, config, input, offset, weight, bias, mask, out, counters, counting):
    """Launch ``config.launches(geometry)`` on the current stream: images past 65535 go to
    further launches on batch slices, (group x channel-block) indices past 65535 through
    ``block_y0``."""
    g = geometry
    xp = backend.array_module(input)
    dummy = xp.zeros(1, dtype=input.dtype)  # the absent mask (storage dtype) ...
    compute = precision.compute_dtype(g.dtype)
    compute_dummy = xp.zeros(1, dtype=compute)  # ... and bias (compute dtype)
    kernel = fused_kernel(g.dtype, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                          config, mask is not None, bias is not None, counting, needs_wide_index(g))
    tiles = config.blocks(g)[0]
    conv = conv_tuple(g)
    dims = kernel_dims(g)
    packed = pack_weights(g, config, weight, xp)
    bias_arg = precision.to_compute(bias, g.dtype, xp) if bias is not None else compute_dummy
    contiguous = out.flags.c_contiguous
    target = out if contiguous else xp.empty(out.shape, dtype=out.dtype)
    for first, images, y0, blocks_y in config.launches(g):
        last = first + images
        mask_arg = _flat(mask[first:last]) if mask is not None else dummy
        backend.launch(kernel, (tiles, blocks_y, images), config.threads,
                       _flat(input[first:last]), _flat(offset[first:last]), mask_arg, packed, bias_arg,
                       target[first:last].reshape(-1), conv, dims, counters, np.int32(y0))
    if not contiguous:
        out[...] = target


def forward(geometry, input, offset, weight, bias, mask, out, stopwatch=backend.NO_STOPWATCH, plan=None):
    """Fill ``out`` (``[N, Cout, Ho, Wo]``, preallocated) with the fused tiled kernel.

    ``plan`` is a ``tiling.Plan`` (its ``tile`` is used), a ``TileConfig``, or ``None``
    for ``default_config(geometry)``.
    """
    config = _config_of(plan, geometry)
    xp = backend.array_module(input)
    counters = xp.zeros(3, dtype=np.int64)
    with stopwatch.section("fused tiled"):
        _launch(geometry, config, input, offset, weight, bias, mask, out, counters, False)
    return out


def count_out_of_tile(geometry, offset, plan=None) -> dict:
    """Run the counting build of the kernel on ``offset`` and return the sample counts.

    Returns ``{"in_tile", "out_of_tile", "outside_band", "out_of_tile_fraction"}`` where
    the fraction is ``out_of_tile / (in_tile + out_of_tile)`` (samples inside the band).
    Definitions: ``OUT_OF_TILE``. The input values do not matter (zeros are used); the
    mask does not change the counts.
    """
    g = geometry
    config = _config_of(plan, g)
    offset = backend.to_device(offset)
    xp = backend.array_module(offset)
    dtype = precision.storage_dtype(g.dtype)
    input = xp.zeros(g.shapes["input"], dtype=dtype)
    weight = xp.zeros(g.shapes["weight"], dtype=dtype)
    out = xp.empty(g.shapes["output"], dtype=dtype)
    counters = xp.zeros(3, dtype=np.int64)
    if offset.dtype != dtype:  # e.g. float32 statistics for a half layer: round as the layer would
        offset = precision.to_storage(offset.astype(precision.compute_dtype(g.dtype)), g.dtype, xp)
    _launch(g, config, input, offset, weight, None, None, out, counters, True)
    in_tile, out_tile, band = (int(v) for v in backend.to_host(counters))
    inside = in_tile + out_tile
    return {"in_tile": in_tile, "out_of_tile": out_tile, "outside_band": band,
            "out_of_tile_fraction": out_tile / inside if inside else 0.0}


def _tag(cfg) -> str:
    return f"{cfg.tile_h}x{cfg.tile_w}h{cfg.halo}c{cfg.chunk}o{cfg.oc_block}r{cfg.reg_oc}x{cfg.reg_px}"


def kernel_signature(dtype):
    """The numba signature of ``fused_kernel``'s kernels for a layer of ``dtype``: input, offset,
    mask and out in its storage dtype, weight and bias in its compute dtype."""
    from numba import types

    flat = types.Array(precision.numba_type(dtype), 1, "C")
    compute = types.Array(getattr(types, precision.compute_dtype(dtype).name), 1, "C")
    return (flat, flat, flat, compute, compute, flat, types.UniTuple(types.int32, 8),
            types.UniTuple(types.int32, 10), types.Array(types.int64, 1, "C"), types.int32)


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.ptx``): the deft64 plan's
    config (``GPU_CONFIG``) with 32-bit and 64-bit (``wide_index``) plane offsets, two
    neighbouring configs, the simulator's, and the counting build. A kernel's launch bounds
    are in ``kernel.targetoptions["launch_bounds"]`` (``launch_bounds(config)``)."""
    configs = {"float32": (GPU_CONFIG, TileConfig(8, 8, 2, 2, 64, 8, 8), TileConfig(8, 8, 2, 4, 64, 8, 4),
                           SIMULATOR_CONFIG),
               "float64": (TileConfig(8, 8, 1, 2, 64, 4, 8), SIMULATOR_CONFIG)}
    for dtype in ("float32", "float64"):
        sig = kernel_signature(dtype)
        for cfg in configs[dtype]:
            yield f"fused[3x3,{_tag(cfg)}]", dtype, fused_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, True), sig
        wide = configs[dtype][0]
        yield (f"fused[3x3,{_tag(wide)},wide]", dtype,
               fused_kernel(dtype, 3, 3, 1, 1, 1, 1, wide, True, True, False, True), sig)
        yield ("fused[3x3,count]", dtype,
               fused_kernel(dtype, 3, 3, 1, 1, 1, 1, configs[dtype][0], False, False, True), sig)
    for dtype in ("float16", "bfloat16"):  # storage in half, arithmetic in float32: the float32 plan
        yield (f"fused[3x3,{_tag(GPU_CONFIG)}]", dtype,
               fused_kernel(dtype, 3, 3, 1, 1, 1, 1, GPU_CONFIG, True, True), kernel_signature(dtype))


PHASES = ("table", "staging", "weights", "columns", "multiply", "epilogue")


def _segments(geometry):
    """``[(channels, ...)]``: the channel counts of the (weight group x offset group)
    segments one block walks (every weight group walks the same pattern up to a shift)."""
    g = geometry
    cpg, cpo = g.in_channels // g.groups, g.in_channels // g.offset_groups
    c, end = 0, cpg  # weight group 0; groups are alike when cpg and cpo divide each other
    segments = []
    while c < end:
        seg_end = min(end, (c // cpo + 1) * cpo)
        segments.append(seg_end - c)
        c = seg_end
    return segments


def warp_mean_trips(items: int, threads: int) -> float:
    """Passes of a grid-stride loop (``e = tid; while e < items: ...; e += threads``) per
    warp of the block, averaged over its warps: warp ``w`` runs as many passes as its first
    lane, ``ceil((items - 32 w) / threads)`` (none when that lane has no item). The issue
    slots of the block are this mean times its warps; ``ceil(items / threads)`` (every warp
    as the first) overcounts them when ``threads`` does not divide ``items``."""
    warps = -(-threads // 32)
    return sum(max(0, -(-(items - 32 * w) // threads)) for w in range(warps)) / warps


def phase_model(geometry, config: TileConfig) -> dict:
    """Iterations, per thread of one block, of each phase's innermost source loop body
    (``# phase:`` lines of ``fused_kernel``), for the audit's issue-slot model.

    A chunk is *full* (``chunk`` channels) or *partial* (the last of an offset-group
    segment whose channel count ``chunk`` does not divide). The two kinds run different
    code: each per-chunk phase has a full form and a ``_partial`` form (separate source
    loops, separate phases), and each is charged for the chunks that run it, no more.

    * ``prologue``: its code inside the chunk loop (the segment and chunk bounds) once per
      chunk, the rest once;
    * ``table``: one (tap, pixel) entry, ``warp_mean_trips(K*P, threads)`` per offset-group
      segment (a grid-stride loop: a warp runs as many passes as its first lane);
    * ``staging`` / ``staging_partial``: one (stored position, channel) of the region:
      ``warp_mean_trips(region, threads) * chunk`` per chunk. The full form is a
      loop of compile-time trip count, unrolled by LLVM (the audit divides the unrolled code
      by its loads); a position past the region is skipped by a branch, so a warp whose
      lanes are all past it skips that copy, as in the grid-stride loop of the partial form;
    * ``weights``: one 16-byte vector of the slab (``_weight_vector`` elements),
      ``ceil(slab vectors / threads)`` per full chunk (a compile-time trip count, unrolled;
      the audit counts per vector from its ``LDG.128``);
    * ``weights_partial``: ``slab_group`` slab elements, ``slab_reps / slab_group`` per
      partial chunk;
    * ``columns`` / ``columns_partial``: one (tap, pixel) entry of one channel,
      ``warp_mean_trips(K*P, threads) * chunk`` per chunk (a grid-stride loop); ``columns`` holds the in-tile path (which
      out-of-band entries take too, reading the zero window), ``out_of_tile`` the global-read
      path (the audit weights it by the chance that a warp takes it);
    * ``multiply``: one rank-1 update of ``reg_oc * reg_px`` FFMA, ``chunk * K`` per chunk
      (the audit's ``normalise_multiply`` turns the SASS loop body, which holds
      ``_multiply_unroll`` updates or more, into the count of one update);
    * ``epilogue``: 1 (straight-line stores; the unchecked form of interior blocks, charged
      to every block: an upper bound), ``epilogue_edge``: the checked form, charged as the
      share of blocks that run it (``interior_fraction``).

    Each per-chunk phase is ``(body iterations, straight runs)``: its code outside the
    innermost loop (loop set-up, LLVM's remainder iterations) runs once per chunk of its
    kind (table: once per offset-group segment).

    The SASS may unroll a source loop further (ptxas/LLVM): divide by the unroll factor
    seen in the loop's body (e.g. its FFMA or LDG count over the source body's).
    """
    g = geometry
    threads = config.threads
    taps = g.taps
    rows, cols = config.staged_shape(g)
    region = rows * cols
    table_size = taps * config.pixels
    segments = _segments(g)
    full = sum(s // config.chunk for s in segments)
    partial = sum(1 for s in segments if s % config.chunk)
    chunks = full + partial
    slab_reps, slab_group = _slab_copy(config, taps)
    vectors = -(-config.chunk * taps * config.oc_block // _weight_vector(config, taps, g.dtype))
    per_table = warp_mean_trips(table_size, threads)
    per_region = warp_mean_trips(region, threads)
    c = config.chunk
    return {"prologue": (chunks, 1),
            "table": (len(segments) * per_table, len(segments)),
            "staging": (full * per_region * c, full),
            "staging_partial": (partial * per_region * c, partial),
            "weights": (full * -(-vectors // threads), full),
            "weights_partial": (partial * (slab_reps // slab_group), partial),
            "columns": (full * per_table * c, full),
            "columns_partial": (partial * per_table * c, partial),
            "multiply": (chunks * config.chunk * taps, chunks),
            "epilogue": 1,
            "epilogue_edge": (0, 1.0 - interior_fraction(g, config))}


def interior_fraction(geometry, config: TileConfig) -> float:
    """Share of the blocks whose epilogue stores without bounds checks (phase ``epilogue``):
    the tile lies inside the output and the output-channel block is full; the others run
    ``epilogue_edge`` (all of them when a thread's run of pixels may cross a tile row)."""
    g = geometry
    if config.tile_w % _vector(config.reg_px):
        return 0.0
    tiles = -(-g.out_h // config.tile_h) * -(-g.out_w // config.tile_w)
    inside = (g.out_h // config.tile_h) * (g.out_w // config.tile_w)
    opg = g.out_channels // g.groups
    return inside / tiles * (opg // config.oc_block) / -(-opg // config.oc_block)
