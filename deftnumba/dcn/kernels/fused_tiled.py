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
weight group. It loops over the group's input channels in chunks of ``CC``:

1. **Sampling table** (once per block and offset group, not per channel): for
   every (tap, pixel) of the tile, the clamped bilinear corners and the four
   corner weights (mask folded in), from ``sampling.tap_position`` and
   ``sampling.bilinear_corners``. Corner indices are stored relative to the
   staged region.
2. **Stage** ``CC`` channels of the input region that the tile's *undeformed*
   taps touch, widened by ``halo`` on each side and zero-filled outside the
   image, plus the ``[CC*K, OCB]`` weight slice.
3. **Build** the ``[CC*K, P]`` column tile in shared memory: each sample reads
   its 2x2 footprint from the staged region when it lies inside it (*in-tile*),
   else from global memory (*out-of-tile*; see ``OUT_OF_TILE``).
4. **Multiply**: every thread owns ``RO`` output channels x ``RP`` pixels in
   registers and accumulates ``CC*K`` rank-1 updates from shared memory.

The epilogue adds the bias and writes NCHW directly. The only extra device
memory is a 3-element counter array (and 1-element dummies for absent bias/mask).

The definition of *out-of-tile* (one place; ``tiling.brute_force_counts`` and
the model in ``tiling`` use the same one)
---------------------------------------------------------------------------
``OUT_OF_TILE`` below.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from .sampling import conv_tuple, sampling_functions

OUT_OF_TILE = """\
A *sample* is one (image n, input channel c, tap k, output pixel (oy, ox)) with
its position (y, x) = tap_position(...). The block that owns (oy, ox) stages the
rows [iy0, iy0 + SH) and columns [ix0, ix0 + SW) of the input, where
iy0 = oy0*sh - ph - halo for the tile's first output row oy0 and
SH = (TH-1)*sh + (kh-1)*dh + 1 + 2*halo (likewise for columns).

* outside the band (not -1 < y < H and -1 < x < W, or non-finite): the sample
  is zero and touches no memory. Counted as `outside_band`.
* in-tile: inside the band, and the clamped 2x2 footprint
  rows {max(floor(y), 0), min(floor(y)+1, H-1)} x
  cols {max(floor(x), 0), min(floor(x)+1, W-1)}
  lies inside the staged rows x columns. Read from shared memory.
* out-of-tile: inside the band, footprint not fully inside the staged region.
  Four reads from global memory (L1/L2) for each such sample.

Counts are of samples (channel-samples): each (n, offset group, tap, pixel)
position contributes C/offset_groups samples. The kernel counts them in the
blocks of output-channel block 0; every further output-channel block repeats the
same reads (the plan keeps that number at 1 where it can).
"""


@dataclass(frozen=True)
class TileConfig:
    """Compile-time tile configuration of the fused kernel.

    tile_h, tile_w: output pixels per block (TH x TW), any size; edge tiles are masked.
    halo:     extra staged input rows/columns on each side of the undeformed footprint.
    chunk:    input channels staged per step (CC).
    oc_block: output channels per block (OCB), within one weight group.
    reg_oc, reg_px: register blocking: each thread owns reg_oc channels x reg_px pixels.
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
        for name in ("tile_h", "tile_w", "chunk", "oc_block", "reg_oc", "reg_px"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TileConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.halo < 0:
            raise ValueError(f"TileConfig.halo must be >= 0, got {self.halo}")
        if self.oc_block % self.reg_oc:
            raise ValueError(f"oc_block ({self.oc_block}) must be a multiple of reg_oc ({self.reg_oc})")
        if (self.tile_h * self.tile_w) % self.reg_px:
            raise ValueError(f"tile_h*tile_w ({self.tile_h * self.tile_w}) must be a multiple of "
                             f"reg_px ({self.reg_px})")

    @property
    def pixels(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def threads(self) -> int:
        return (self.oc_block // self.reg_oc) * (self.pixels // self.reg_px)

    def staged_shape(self, geometry) -> tuple[int, int]:
        """Rows and columns of the staged input region (footprint of the undeformed taps + halo)."""
        g = geometry
        rows = (self.tile_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1 + 2 * self.halo
        cols = (self.tile_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1 + 2 * self.halo
        return rows, cols

    def shared_bytes(self, geometry) -> int:
        """Static shared memory of one block, in bytes."""
        s = geometry.itemsize
        rows, cols = self.staged_shape(geometry)
        k = geometry.taps
        ck = self.chunk * k
        return (s * (self.chunk * rows * cols + ck * (self.oc_block + 1) + ck * self.pixels)
                + 4 * 4 * k * self.pixels + s * 4 * k * self.pixels)

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
(|d| ~ N(0, 1)): 64 threads of 8x8 accumulators, 39.2 KB shared memory, 4 blocks per SM."""
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
# SH x SW the staged region per tile, f the out-of-tile fraction of in-band samples):
#   reads  input   B * N * C * T * SH*SW * s          (the staged tiles; halo rows/cols are
#                                                      re-read by neighbouring tiles: L2 hits)
#          offsets B * groups_overlap * N * 2*G*K*P * s and mask B * N * G*K*P * s (table)
#          weights N * T * Cout * C/groups * K * s    (every block stages its slice: L2 hits)
#          out-of-tile  B * f * N * C * K * P * 4 corners * s  (scattered, mostly L1/L2 hits)
#   writes output  N * Cout * P * s once, NCHW; no column buffer, nothing else.
#   FLOPs  2 * N * Cout * C/groups * K * P (the GEMM) + ~7 * B * N * C * K * P (interpolation)
#          + ~20 * B * N * G*K*P (positions and corner weights).
#   Shared memory per block (TileConfig.shared_bytes): staged input CC*SH*SW, weights
#   CC*K*(OCB+1), column tile CC*K*P, sampling table K*P*(4 int32 + 4 weights).
@functools.cache
def fused_kernel(dtype, kernel_h, kernel_w, stride_h, stride_w, dil_h, dil_w, config: TileConfig,
                 use_mask: bool, use_bias: bool, counting: bool = False):
    """Kernel ``(input, offset, mask, weight, bias, out, conv, counters, block_y0)``, launched
    on ``config.grid(geometry)`` blocks of ``config.threads`` threads (``config.launches``).

    input ``[N, C, H, W]``; offset ``[N, 2*G*K, Ho, Wo]``; mask ``[N, G*K, Ho, Wo]`` (a dummy
    when ``use_mask`` is false); weight ``[Cout, C/groups, kh, kw]``; bias ``[Cout]`` (dummy
    when ``use_bias`` is false); out ``[N, Cout, Ho, Wo]``; conv the int32 tuple of
    ``sampling.conv_tuple``; counters int64 ``[3]``: ``(in_tile, out_of_tile, outside_band)``
    samples, accumulated only when ``counting`` (see ``OUT_OF_TILE``); block_y0 (int64) the
    first (weight group x output-channel block) index of this launch.
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    in_band = fns.in_band
    bilinear_corners = fns.bilinear_corners
    T = fns.T
    ZERO = fns.ZERO
    DT = T  # shared/local array element type

    TH, TW, HALO = config.tile_h, config.tile_w, config.halo
    CC, OCB, RO, RP = config.chunk, config.oc_block, config.reg_oc, config.reg_px
    KW = kernel_w
    K = kernel_h * kernel_w
    P = TH * TW
    CK = CC * K
    KP = K * P
    SHR = (TH - 1) * stride_h + (kernel_h - 1) * dil_h + 1 + 2 * HALO
    SWR = (TW - 1) * stride_w + (kernel_w - 1) * dil_w + 1 + 2 * HALO
    REGION = SHR * SWR
    STAGED = CC * REGION
    WSTAGE = OCB * CK
    OCP = OCB + 1  # padded row: conflict-free transposed stores of the weight slice
    OC_T = OCB // RO  # thread rows (output channels)
    PX_T = P // RP  # thread columns (pixels)
    THREADS = OC_T * PX_T
    SH_, SW_ = stride_h, stride_w
    USE_MASK, USE_BIAS, COUNTING = use_mask, use_bias, counting

    @cuda.jit
    def kernel(input, offset, mask, weight, bias, out, conv, counters, block_y0):
        tid = cuda.threadIdx.x
        n = cuda.blockIdx.z
        channels = input.shape[1]
        height = input.shape[2]
        width = input.shape[3]
        out_channels = out.shape[1]
        out_h = out.shape[2]
        out_w = out.shape[3]
        cpg = weight.shape[1]  # input channels per weight group
        groups = channels // cpg
        opg = out_channels // groups  # output channels per weight group
        oc_blocks = (opg + OCB - 1) // OCB
        gy = cuda.blockIdx.y + block_y0  # launches split at 65535 blocks in y
        g = gy // oc_blocks
        ob = gy - g * oc_blocks
        oc0 = g * opg + ob * OCB
        oc_end = min(oc0 + OCB, (g + 1) * opg)
        cpo = channels // (offset.shape[1] // (2 * K))  # input channels per offset group
        tiles_x = (out_w + TW - 1) // TW
        ty = cuda.blockIdx.x // tiles_x
        oy0 = ty * TH
        ox0 = (cuda.blockIdx.x - ty * tiles_x) * TW
        iy0 = oy0 * SH_ - conv[2] - HALO  # first staged input row
        ix0 = ox0 * SW_ - conv[3] - HALO  # first staged input column

        s_in = cuda.shared.array((CC, SHR, SWR), dtype=DT)
        s_w = cuda.shared.array((CK, OCP), dtype=DT)
        s_col = cuda.shared.array((CK, P), dtype=DT)
        s_idx = cuda.shared.array((4, KP), dtype=np.int32)
        s_wt = cuda.shared.array((4, KP), dtype=DT)

        acc = cuda.local.array((RO, RP), dtype=DT)
        a = cuda.local.array(RO, dtype=DT)
        b = cuda.local.array(RP, dtype=DT)
        for i in range(RO):
            for j in range(RP):
                acc[i, j] = ZERO
        oc_t = tid // PX_T  # this thread owns output channels oc_t + i*OC_T ...
        px_t = tid - oc_t * PX_T  # ... and pixels px_t + j*PX_T

        c_begin = g * cpg
        c_end = c_begin + cpg
        table_og = -1
        c = c_begin
        # phase: chunk
        while c < c_end:
            og = c // cpo
            seg_end = min(c_end, (og + 1) * cpo)
            if og != table_og:
                # phase: table
                # 1. sampling table of offset group og (the previous chunk ended with a barrier)
                n_in = 0
                n_out = 0
                n_band = 0
                for e in range(tid, KP, THREADS):
                    k = e // P
                    p = e - k * P
                    u = p // TW
                    oy = oy0 + u
                    ox = ox0 + (p - u * TW)
                    r0 = 0
                    r1 = 0
                    q0 = 0
                    q1 = 0
                    w00 = ZERO
                    w01 = ZERO
                    w10 = ZERO
                    w11 = ZERO
                    if oy < out_h and ox < out_w:
                        y, x = tap_position(offset, n, og, k, oy, ox, conv)
                        if in_band(y, x, height, width):
                            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
                            if USE_MASK:
                                m = mask[n, og * K + k, oy, ox]
                                w00 *= m
                                w01 *= m
                                w10 *= m
                                w11 *= m
                            r0 = y0 - iy0
                            r1 = y1 - iy0
                            q0 = x0 - ix0
                            q1 = x1 - ix0
                            if r0 >= 0 and r1 < SHR and q0 >= 0 and q1 < SWR:
                                n_in += 1
                            else:
                                n_out += 1
                        else:
                            n_band += 1
                            if USE_MASK:  # value 0 times the mask, as torchvision: NaN stays NaN
                                m = mask[n, og * K + k, oy, ox]
                                w00 = ZERO * m
                                w01 = w00
                                w10 = w00
                                w11 = w00
                    s_idx[0, e] = r0
                    s_idx[1, e] = r1
                    s_idx[2, e] = q0
                    s_idx[3, e] = q1
                    s_wt[0, e] = w00
                    s_wt[1, e] = w01
                    s_wt[2, e] = w10
                    s_wt[3, e] = w11
                if COUNTING and ob == 0:
                    seg_channels = seg_end - c
                    cuda.atomic.add(counters, 0, np.int64(n_in * seg_channels))
                    cuda.atomic.add(counters, 1, np.int64(n_out * seg_channels))
                    cuda.atomic.add(counters, 2, np.int64(n_band * seg_channels))
                table_og = og
            # phase: chunk
            chunk_end = min(seg_end, c + CC)
            nc = chunk_end - c

            # 2. stage the input region (coalesced along rows) and the weight slice
            # phase: staging
            for idx in range(tid, STAGED, THREADS):
                cc = idx // REGION
                rem = idx - cc * REGION
                row = rem // SWR
                col = rem - row * SWR
                gy = iy0 + row
                gx = ix0 + col
                v = ZERO
                if cc < nc and gy >= 0 and gy < height and gx >= 0 and gx < width:
                    v = input[n, c + cc, gy, gx]
                s_in[cc, row, col] = v
            # phase: weights
            for idx in range(tid, WSTAGE, THREADS):
                o = idx // CK
                ck = idx - o * CK
                cc = ck // K
                k = ck - cc * K
                v = ZERO
                if cc < nc and oc0 + o < oc_end:
                    i_tap = k // KW
                    v = weight[oc0 + o, c - c_begin + cc, i_tap, k - i_tap * KW]
                s_w[ck, o] = v
            cuda.syncthreads()

            # 3. the column tile: in-tile samples from shared memory, the others from global
            # phase: columns
            for idx in range(tid, CK * P, THREADS):
                ck = idx // P
                p = idx - ck * P
                cc = ck // K
                e = (ck - cc * K) * P + p
                v = ZERO
                if cc < nc:
                    r0 = s_idx[0, e]
                    r1 = s_idx[1, e]
                    q0 = s_idx[2, e]
                    q1 = s_idx[3, e]
                    if r0 >= 0 and r1 < SHR and q0 >= 0 and q1 < SWR:
                        v = (s_wt[0, e] * s_in[cc, r0, q0] + s_wt[1, e] * s_in[cc, r0, q1]
                             + s_wt[2, e] * s_in[cc, r1, q0] + s_wt[3, e] * s_in[cc, r1, q1])
                    else:
                        # phase: out_of_tile
                        ci = c + cc
                        v = (s_wt[0, e] * input[n, ci, iy0 + r0, ix0 + q0]
                             + s_wt[1, e] * input[n, ci, iy0 + r0, ix0 + q1]
                             + s_wt[2, e] * input[n, ci, iy0 + r1, ix0 + q0]
                             + s_wt[3, e] * input[n, ci, iy0 + r1, ix0 + q1])
                # phase: columns
                s_col[ck, p] = v
            cuda.syncthreads()

            # 4. register-blocked rank-1 updates (compile-time bounds; unused rows are zero)
            # phase: multiply
            for ck in range(CK):
                for i in range(RO):
                    a[i] = s_w[ck, oc_t + i * OC_T]
                for j in range(RP):
                    b[j] = s_col[ck, px_t + j * PX_T]
                for i in range(RO):
                    for j in range(RP):
                        acc[i, j] += a[i] * b[j]
            cuda.syncthreads()
            # phase: chunk
            c = chunk_end

        # epilogue: bias, NCHW store (consecutive threads -> consecutive pixels of a tile row)
        # phase: epilogue
        for i in range(RO):
            oc = oc0 + oc_t + i * OC_T
            if oc < oc_end:
                bias_v = ZERO
                if USE_BIAS:
                    bias_v = bias[oc]
                for j in range(RP):
                    p = px_t + j * PX_T
                    u = p // TW
                    oy = oy0 + u
                    ox = ox0 + (p - u * TW)
                    if oy < out_h and ox < out_w:
                        out[n, oc, oy, ox] = acc[i, j] + bias_v

    return kernel


def _config_of(plan, geometry) -> TileConfig:
    if plan is None:
        return default_config(geometry)
    if isinstance(plan, TileConfig):
        return plan
    tile = getattr(plan, "tile", None)
    return tile if tile is not None else default_config(geometry)


def _launch(geometry, config, input, offset, weight, bias, mask, out, counters, counting):
    """Launch ``config.launches(geometry)`` on the current stream: images past 65535 go to
    further launches on batch slices, (group x channel-block) indices past 65535 through
    ``block_y0``."""
    g = geometry
    xp = backend.array_module(input)
    dummy = xp.zeros((1, 1, 1, 1), dtype=input.dtype)
    kernel = fused_kernel(g.dtype, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                          config, mask is not None, bias is not None, counting)
    tiles = config.blocks(g)[0]
    conv = conv_tuple(g)
    bias_arg = bias if bias is not None else dummy.reshape(1)
    for first, images, y0, blocks_y in config.launches(g):
        last = first + images
        mask_arg = mask[first:last] if mask is not None else dummy
        backend.launch(kernel, (tiles, blocks_y, images), config.threads,
                       input[first:last], offset[first:last], mask_arg, weight, bias_arg,
                       out[first:last], conv, counters, np.int64(y0))


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
    dtype = np.dtype(g.dtype)
    input = xp.zeros(g.shapes["input"], dtype=dtype)
    weight = xp.zeros(g.shapes["weight"], dtype=dtype)
    out = xp.empty(g.shapes["output"], dtype=dtype)
    counters = xp.zeros(3, dtype=np.int64)
    _launch(g, config, input, offset.astype(dtype, copy=False), weight, None, None, out, counters, True)
    in_tile, out_tile, band = (int(v) for v in backend.to_host(counters))
    inside = in_tile + out_tile
    return {"in_tile": in_tile, "out_of_tile": out_tile, "outside_band": band,
            "out_of_tile_fraction": out_tile / inside if inside else 0.0}


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``)."""
    from numba import types

    configs = {"float32": (GPU_CONFIG, TileConfig(4, 8, 2, 4, 64, 4, 8), TileConfig(8, 8, 1, 4, 128, 8, 8),
                           SIMULATOR_CONFIG),
               "float64": (TileConfig(8, 8, 1, 2, 64, 4, 8), TileConfig(4, 8, 2, 2, 64, 4, 8), SIMULATOR_CONFIG)}
    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a4, a1 = types.Array(t, 4, "A"), types.Array(t, 1, "A")
        conv = types.UniTuple(types.int32, 8)
        sig = (a4, a4, a4, a4, a1, a4, conv, types.Array(types.int64, 1, "A"), types.int64)
        for cfg in configs[dtype]:
            tag = f"{cfg.tile_h}x{cfg.tile_w}h{cfg.halo}c{cfg.chunk}o{cfg.oc_block}r{cfg.reg_oc}x{cfg.reg_px}"
            yield f"fused[3x3,{tag}]", dtype, fused_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, True), sig
        yield ("fused[3x3,count]", dtype,
               fused_kernel(dtype, 3, 3, 1, 1, 1, 1, GPU_CONFIG if dtype == "float32" else SIMULATOR_CONFIG,
                            False, False, True), sig)
