"""The column-free DCN backward (``method="fused"``): no ``[C*K, N*P]`` matrix in device memory.

Motivation
----------
Every column method of ``backward.py`` writes a column matrix to device memory:
the column gradient ``W^T @ grad_out`` for the scatter, or the recomputed forward
columns for the weight gradient (9.4 MB per image at ``deft64``, written and read
back). This module builds both tile by tile in shared memory, as the forward's
``fused_tiled`` kernel builds its columns, and never stores them.

Two kernels; atomic mode (the default) runs only the first (notation of
``backward.py``: ``C`` inputs, ``Co`` outputs, ``Gw`` weight groups of ``Cg`` inputs
and ``Og`` outputs, ``G`` offset groups of ``cpo`` channels, ``K`` taps, a tile of
``P`` output pixels):

``input_grad_kernel``: one block per (image, tile, channel span). A *span* is
``lcm(Cg, cpo)`` channels, so it holds whole weight groups and whole offset
groups: the offset and mask gradients of a point are summed by one block, in a
fixed order. Per chunk of ``CC`` channels:

1. *sampling table* (once per offset group): corners of each (tap, pixel),
   relative to the staged region, and their weights with the mask folded in;
2. *stage* the input region of the chunk, as the forward does;
3. *column gradient*: ``grad_cols[ck, p] = sum_o W[o, ck] * grad_out[o, p]``, a
   register-blocked GEMM over the weight group's ``Og`` outputs, in steps of
   ``OGB`` staged outputs; each thread owns ``RR`` contiguous rows x ``RP``
   contiguous pixels; the tile lands in shared memory;
4. *scatter*: each thread owns (tap, pixel) points and loops over the chunk's
   channels: four corner products accumulate ``S_q = sum_c grad_cols * I[c, corner_q]``
   in registers (for the offset and mask gradients), and, in atomic mode, four
   ``RED.ADD`` (``atomics.red_add``) send ``grad_cols * m * w_q`` to ``grad_input``
   and the sample's column value ``sum_q m * w_q * I[c, corner_q]`` (the corners
   are already in registers) overwrites its ``grad_cols`` element in place;
5. *weight gradient* (atomic mode): ``grad_weight[o, ck] += sum_p grad_out[o, p] *
   cols[ck, p]`` for the chunk, one output step of ``OGB`` at a time, last step
   first (its ``grad_out`` is still staged from step 3, and the next chunk's step 0
   finds step 0 staged): a register-blocked GEMM whose threads own ``wg_reg_out``
   outputs x ``wg_reg_cols`` column rows (interleaved) and read 16 contiguous pixels
   of each row per trip (``LDS.128``; rows padded to ``padded_pixels`` against bank
   conflicts); each thread then adds its partials to ``grad_weight`` with ``RED``.
   So atomic mode samples once: no second pass, no weight partials in memory.

When the offset group ends, the same threads turn ``S_q`` into
``grad_offset = m * sum_q (dw_q/dy, dw_q/dx) S_q`` and ``grad_mask = sum_q w_q S_q``,
with the weights and derivatives recomputed by ``sampling.bilinear_corner_gradients``
(the shared rule: no private copy of the border derivatives).

``weight_grad_kernel`` (deterministic mode only): one block per (split, output block,
channel chunk, weight group) owns ``grad_weight[OGW outputs, CC*K]`` in registers (``RO`` outputs x ``RK``
columns per thread) and walks its share of the (image, tile) pairs in a fixed
order: build the column tile ``[P, CC*K]`` in shared memory (table, staged region,
out-of-tile reads as the forward), stage ``grad_out[P, OGW]``, and add the
rank-``P`` update. The ``S`` blocks of one slice (``S`` splits) draw tickets as they
start; ticket ``s`` sums the pairs ``s, s + S, ...`` and adds its partial to
``grad_weight`` after tickets ``0 .. s-1`` have added theirs (a wait on a counter, read
with ``atomics.load_acquire``). So this weight gradient is deterministic with no partials
in memory (two counters per slice), and ``S`` is free to fill the device
(``choose_splits``). It repeats the sampling the input kernel did; fusing it
deterministically would need the same ordered additions from every (image, tile) block,
N*T of them per slice, hence two kernels in this mode.

Determinism
-----------
Atomic mode: the ``RED`` additions to ``grad_input`` and ``grad_weight`` are the
order-varying steps. ``deterministic=True`` launches ``input_grad_kernel`` without
them (offset and mask gradients only), the weight kernel above, and builds
``grad_input`` with ``backward.py``'s sort-then-segment gather in its column-free form
(``gather_staged_kernel``: the column gradient recomputed per tap from ``grad_output`` and
the weights, no column matrix), one image at a time, in parts of output rows
within ``sort_budget``. Its extra memory (the sort part and the weight kernel's counters)
stays under 5% of the arguments and gradients (``extra_bytes``; docs/perf-notes.md).

Precision: the kernel factories take the layer's storage dtype; input, offset, mask and
``grad_out`` are read through ``load`` (float16/bfloat16 stay half in memory), the weights
(converted once per call), the shared tiles, the accumulators and every gradient buffer
are in the compute dtype (float32 for the halves; ``ops`` rounds the gradients once).

Phase markers (``# phase: NAME``) label the source lines of each phase for the
SASS audit; ``phase_model(geometry, config)`` gives the iterations per thread of
each phase's innermost loop body.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from ...runtime import backend, precision
from ...runtime.addresses import element_address, offset_address, read_at
from ...runtime.tiles import staged_extent
from ...runtime.vector import load_vector, vector_aligned, vector_width
from ...runtime.backend import cuda
from ...runtime.atomics import keep_if, load_acquire, red_add_at
from .sampling import conv_tuple, sampling_functions

GRID_YZ_LIMIT = 65535
OUTSIDE = -(1 << 20)  # table marker: the point samples outside the band (no value, no gradient)
NOT_STAGED = -1  # table marker (input kernel): a corner of the point lies outside the staged region


@dataclass(frozen=True)
class BackwardTileConfig:
    """Compile-time shape of the two kernels.

    tile_h, tile_w: output pixels per tile (P = tile_h * tile_w); halo: staged margin.
    chunk (CC): input channels per step.
    out_block (OGB): outputs staged per step of the column-gradient GEMM (input kernel).
    reg_rows, reg_px: input kernel ownership: RR contiguous ``c*K + tap`` rows x RP pixels.
    w_out_block (OGW): outputs per block of the weight kernel (deterministic mode).
    w_reg_out, w_reg_cols: weight kernel ownership: RO contiguous outputs x RK columns.
    wg_reg_out, wg_reg_cols: ownership of the weight-gradient GEMM fused into the input
    kernel (atomic mode): ``wg_reg_out`` outputs x ``wg_reg_cols`` column rows per thread
    and slot, interleaved (rows ``t, t + T, ...``) so that a quarter-warp's ``LDS.128``
    along the pixels hit distinct banks of the padded tiles.
    """

    tile_h: int = 4
    tile_w: int = 4
    halo: int = 1
    chunk: int = 2
    out_block: int = 4
    reg_rows: int = 2
    reg_px: int = 2
    w_out_block: int = 4
    w_reg_out: int = 2
    w_reg_cols: int = 2
    wg_reg_out: int = 1
    wg_reg_cols: int = 1

    @property
    def pixels(self) -> int:
        return self.tile_h * self.tile_w

    def rows(self, taps: int) -> int:
        """Rows of the column tile, ``CC*K``."""
        return self.chunk * taps

    def check(self, taps: int) -> None:
        """Raise ``ValueError`` unless the ownership divides the tile shapes for ``taps``."""
        ck = self.rows(taps)
        for name, total, part in (("reg_rows", ck, self.reg_rows), ("reg_px", self.pixels, self.reg_px),
                                  ("w_reg_out", self.w_out_block, self.w_reg_out),
                                  ("w_reg_cols", ck, self.w_reg_cols),
                                  ("wg_reg_out", self.out_block, self.wg_reg_out),
                                  ("wg_reg_cols", ck, self.wg_reg_cols)):
            if part < 1 or total % part:
                raise ValueError(f"BackwardTileConfig.{name}={part} must divide {total}")

    def regular(self, geometry) -> bool:
        """Whether every channel chunk of the input kernel is full (``chunk`` divides the
        channels of a weight group and of an offset group) and every output step too
        (``out_block`` divides a weight group's outputs): its compile-time variant then drops
        the per-channel and per-output bounds tests."""
        g = geometry
        cpg, cpo, opg = g.in_channels // g.groups, g.in_channels // g.offset_groups, g.out_channels // g.groups
        return cpg % self.chunk == 0 and cpo % self.chunk == 0 and opg % self.out_block == 0

    def input_threads(self, taps: int) -> int:
        return (self.rows(taps) // self.reg_rows) * (self.pixels // self.reg_px)

    def weights_by_vector(self, geometry) -> bool:
        """Whether the input kernel stages its weight slabs ``[out_block, CC*K]`` in 16-byte
        vectors: every chunk and output step full (``regular``), a slab row (``CC*K``) and a
        weight row (``Cg*K``) whole vectors, so each vector starts 16-byte aligned (the
        launcher passes an aligned weight array, ``runtime.vector.vector_aligned``), and the
        block has a thread for every slab row (each stages one)."""
        g = geometry
        k, vw = g.taps, vector_width(precision.compute_dtype(g.dtype))
        ck = self.rows(k)
        return (self.regular(g) and ck % vw == 0 and (g.in_channels // g.groups) * k % vw == 0
                and self.input_threads(k) >= self.out_block)

    def grad_out_by_vector(self, geometry) -> bool:
        """Whether the input kernel stages ``grad_out`` in 16-byte vectors of pixels: stored in
        the compute dtype (float32, float64), a tile row and an output row whole vectors (so a
        vector never straddles the image's edge, and starts 16-byte aligned: the launcher
        passes an aligned ``grad_out``), and a thread for every vector of a staged row."""
        g = geometry
        dtype = precision.compute_dtype(g.dtype)
        vw = vector_width(dtype)
        return (np.dtype(g.dtype) == dtype and self.tile_w % vw == 0 and g.out_w % vw == 0
                and self.input_threads(g.taps) >= self.pixels // vw)

    def pixel_vector(self) -> int:
        """Pixels per shared load of the fused weight-gradient GEMM (4: ``LDS.128``)."""
        p = self.pixels
        return 4 if p % 4 == 0 else 2 if p % 2 == 0 else 1

    def padded_pixels(self) -> int:
        """Row stride of the staged ``grad_out`` and column tiles: ``P``, padded by one
        vector when ``P / vector`` is even, so that consecutive rows start in different
        banks (8 rows of a quarter-warp's ``LDS.128`` then touch all 32 banks once)."""
        v = self.pixel_vector()
        return self.pixels + (v if (self.pixels // v) % 2 == 0 else 0)

    def fused_weight_slots(self, taps: int) -> int:
        """Ownership slots of the fused weight-gradient GEMM per output step:
        ``(OGB / wg_reg_out) * (CC*K / wg_reg_cols)`` (threads loop over them)."""
        return (self.out_block // self.wg_reg_out) * (self.rows(taps) // self.wg_reg_cols)

    def weight_threads(self, taps: int) -> int:
        return (self.w_out_block // self.w_reg_out) * (self.rows(taps) // self.w_reg_cols)

    def staged_shape(self, geometry) -> tuple[int, int]:
        """Rows and columns of the staged input region (the tile's footprint plus the halo)."""
        g = geometry
        return (staged_extent(self.tile_h, g.stride_h, g.kernel_h, g.dil_h, self.halo),
                staged_extent(self.tile_w, g.stride_w, g.kernel_w, g.dil_w, self.halo))

    def tiles(self, geometry) -> int:
        return -(-geometry.out_h // self.tile_h) * -(-geometry.out_w // self.tile_w)

    def input_shared_bytes(self, geometry) -> int:
        s, k, p = precision.compute_dtype(geometry.dtype).itemsize, geometry.taps, self.pixels
        rows, cols = self.staged_shape(geometry)
        ck, ps = self.rows(k), self.padded_pixels()
        tiles = self.chunk * rows * cols + self.out_block * ck + self.out_block * ps + ck * ps
        return s * tiles + (4 + s) * 4 * k * p

    def weight_shared_bytes(self, geometry) -> int:
        s, k, p = precision.compute_dtype(geometry.dtype).itemsize, geometry.taps, self.pixels
        rows, cols = self.staged_shape(geometry)
        ck = self.rows(k)
        return s * (self.chunk * rows * cols + p * self.w_out_block + p * ck) + 4  # (+ the ticket)


SIMULATOR_CONFIG = BackwardTileConfig()  # 16 threads per block in the input kernel for K = 9
GPU_CONFIG = BackwardTileConfig(tile_h=8, tile_w=8, halo=3, chunk=4, out_block=32, reg_rows=6, reg_px=4,
                                w_out_block=64, w_reg_out=8, w_reg_cols=4, wg_reg_out=4, wg_reg_cols=3)
"""``deft64`` (3x3): input kernel 96 threads (3 whole warps) of 6x4 (and 4x3) accumulators,
44.6 KB shared; weight kernel 72 threads of 8x4 accumulators, 47.0 KB. (Until session 33
the input kernel had 144 threads of 4x4 and 2x4: 4.5 warps, so a sixth of its fifth warp's
issue slots were empty in every phase. 192 threads of 3x4 fit 80 registers but their
GEMM loops fell to 71-79% FFMA. Weight-kernel ownerships of 4x4 and 8x2 for 144 threads
were tried: their GEMM loops fall to 75% and 72% FFMA in SASS.)

The halo of 3 keeps a sample's corners in the staged region for all but ~0.02% of samples
under N(0,1) offsets (3% with a halo of 1), so a warp rarely takes the scatter's out-of-tile
path (``scatter_outside``: 0.7% of point visits, 63% at a halo of 1), for 16x16 staged
positions per channel instead of 12x12."""
STATIC_SHARED_LIMIT = 48 * 1024
GATHER_IMAGES = 1
"""Images per call of the deterministic gather (``backward._deterministic_input_grad``), which
sorts them in parts of ``backward.sort_part_rows`` output rows within ``sort_budget``."""
MAX_SPLITS = 32
"""At most this many blocks share a slice of the deterministic weight kernel
(``choose_splits``): their additions to ``grad_weight`` run one after another, a few
microseconds each (a prediction, unmeasured), so the chain shows as a tail. 32 x 16 slices
fill an H200 at ``deft64`` with 4 blocks an SM (``WEIGHT_WARPS_PER_SM``); 8 (before session
37) gave one block of 3 warps an SM."""
WEIGHT_WARPS_PER_SM = 12
"""Warps an SM the deterministic weight kernel's launch aims at (``choose_splits``): 3 a
scheduler, so that one warp's wait for its global loads (the offsets and mask of each point in
``w_build``, the staging's gathers) is covered by the others. With one block of 3 warps an SM
(session 27-36) the audit's estimate with stalls was 4.1x its issue-slot one at ``deft64``
(0.576 against 0.139 ms); with 4 blocks, 1.4x (0.149 against 0.105 ms). Predictions, on
assumed latencies (``perf.sass.LATENCY``); docs/perf-notes.md, "Session 37"."""
SORT_SHARE = 0.025
"""Cap on the deterministic gather's sort buffers, as a share of the arguments and gradients
(``sort_budget``). With the weight kernel's counters (8 bytes per slice), deterministic
mode's extra memory stays under 5% (issue 11's target) wherever one output row fits the
budget."""
INPUT_REGISTER_BUDGET = 96
"""``launch_bounds`` of ``input_grad_kernel``: as many blocks per SM as fit at this many
registers per thread in float32, twice as many in float64, at most 4 (set when the blocks had
144 threads at ``deft64``, where ptxas unbounded took ~126 registers and fitted 3; the 96 of
``GPU_CONFIG`` now get 4 blocks, at most 168 registers); never fewer registers than this,
so larger blocks are not forced to spill."""


def input_min_blocks(threads: int, itemsize: int = 4) -> int:
    """Blocks per SM ``input_grad_kernel`` asks ptxas to allow (``INPUT_REGISTER_BUDGET``)."""
    warp_threads = -(-threads // 32) * 32
    blocks = 65536 // (warp_threads * INPUT_REGISTER_BUDGET * max(1, itemsize // 4))
    return max(1, min(4, blocks))  # at most 4: more, for small blocks, made ptxas spill


def default_config(geometry) -> BackwardTileConfig:
    """``SIMULATOR_CONFIG`` in the simulator; on a GPU ``GPU_CONFIG`` shrunk (tile, then
    chunk) until both kernels fit 48 KB of static shared memory and the ownership divides."""
    k = geometry.taps
    # GPU_CONFIG, then its halo shrunk (a stride or dilation of 2 widens the staged region past
    # 48 KB at halo 3), then smaller tiles and chunks
    candidates = ([SIMULATOR_CONFIG] if backend.IS_SIMULATOR
                  else [replace(GPU_CONFIG, halo=h) for h in (GPU_CONFIG.halo, 2, 1)])
    for th, tw in ((8, 8), (4, 8), (4, 4), (2, 4), (2, 2), (1, 1)):
        for chunk in (4, 2, 1):
            for rr in (4, 2, 1):
                for halo in (3, 2, 1):  # (see GPU_CONFIG)
                    rp = min(4, th * tw)
                    candidates.append(BackwardTileConfig(th, tw, halo, chunk, 32, rr, rp, 64, 8, rr, 2,
                                                         max(d for d in (4, 2, 1) if (chunk * k) % d == 0)))
    for cfg in candidates:
        try:
            cfg.check(k)
        except ValueError:
            continue
        if max(cfg.input_shared_bytes(geometry), cfg.weight_shared_bytes(geometry)) <= STATIC_SHARED_LIMIT:
            return cfg
    raise ValueError(f"no fused backward tile fits 48 KB of shared memory for {k} taps")


def channel_span(geometry) -> int:
    """Channels per block of the input kernel: ``lcm(C/groups, C/offset_groups)``."""
    g = geometry
    return math.lcm(g.in_channels // g.groups, g.in_channels // g.offset_groups)


def supported(geometry) -> bool:
    """Whether the unsigned 32-bit in-image offsets hold: ``C*H*W``, ``Co*Ho*Wo`` and
    ``Co*Cg*K`` below 2**32 elements (offsets and mask are indexed in 64 bits)."""
    g = geometry
    return max(g.in_channels * g.height * g.width, g.out_channels * g.out_h * g.out_w,
               g.out_channels * (g.in_channels // g.groups) * g.taps) < 2**32


def planes(geometry) -> tuple[int, int]:
    """``(H*W, Ho*Wo)``: the compile-time planes of the kernels (``input_grad_kernel``), so a
    kernel is compiled per layer shape, as its tile already is."""
    g = geometry
    return g.height * g.width, g.out_h * g.out_w


def _steps(trips: int, products: int, ffma: int = 64) -> int:
    """Rank-1 updates per trip of a GEMM loop: enough for ~``ffma`` FFMA per trip (at 64 the
    loop's counter, branch and address updates cost < 15% of its issue slots), dividing ``trips``."""
    want = max(1, ffma // products)
    return max(s for s in range(1, want + 1) if trips % s == 0)


def _staging_rows(threads: int, per_row: int, rows: int) -> int:
    """Rows of a ``[rows, per_row]`` staging per pass of the block, one item per thread: as many
    as the threads hold, rounded down to a divisor of ``rows`` (every thread then stages the
    same count, with no bounds test per row); 0 when one row does not fit."""
    fit = threads // per_row
    return max((d for d in range(1, fit + 1) if rows % d == 0), default=0)


WG_TRIP_FFMA = 192
"""FFMA per trip of the fused weight-gradient GEMM's pixel loop, halved (``_steps``): 4x3
accumulators at 32 pixels a trip (384 FFMA, 56 ``LDS.128``), 86% FFMA in its SASS at
``deft64`` (85% at 16 pixels, 83% at 8). (The column-gradient GEMM stays at ~64 FFMA per
source loop: at 96 LLVM kept the loop rolled.)"""


def _column_gemm_trip(out_block: int, products: int) -> tuple[int, int]:
    """``(steps, trip)`` of the input kernel's column-gradient GEMM: a trip runs ``_steps``
    rank-1 updates twice where ``2 * steps`` divides ``out_block`` (~128 FFMA per trip: the
    trip's ~11 overhead instructions fall from ~15% to ~8% of its issue slots). The source
    repeats the loop of ``steps`` updates: LLVM fully unrolls a loop of ~64 FFMA but keeps one
    of ~128 rolled (seen in the SASS at ``deft64``: the trip then fell to 53% FFMA)."""
    steps = _steps(out_block, products)
    return steps, (2 * steps if out_block % (2 * steps) == 0 else steps)


# --------------------------------------------------------------------------- input-side kernel
# Traffic (whole batch; T tiles of P pixels, SH x SW staged region, f the out-of-tile
# fraction of in-band samples):
#   reads  input    N * C * T * SH*SW * s            (staged per chunk; halos re-read: L2)
#                   + f * N*C*K*P * 4 * s            (out-of-tile corners, scattered)
#          offsets, mask  N * 3*G*K*P * s once (the table), again at the offset group's end
#          grad_out N * T * (C/CC) * Og * P * s      (staged once per output step and chunk,
#                   shared by both GEMMs; atomic mode ~2 stagings per chunk at deft64: L2
#                   hits; N * Co * P * s from DRAM)
#          weights  N * T * (C/CC) * Og*CC*K * s     (L2 hits; Co*Cg*K*s from DRAM)
#   writes grad_offset, grad_mask once (N * 3*G*K*P * s); atomic mode, by RED: grad_input,
#          4 per in-band sample, N*C*K*P*4 adds landing in L2 (N*C*H*W*s to DRAM), and
#          grad_weight, one block partial per (image, tile): N*T*Co*Cg*K adds in L2
#          (Co*Cg*K*s to DRAM).
#   FLOPs  2*N*Co*Cg*K*P (column gradient) + 8 per sample (S_q) + 8 per sample (scatter)
#          + atomic mode: 7 per sample (the column value) + 2*N*Co*Cg*K*P (weight gradient)
#          + per point: position 2, corners 8, mask 4, derivatives 8, the end sums 12.
#   No column matrix: the column-gradient tile lives in shared memory, and in atomic mode
#   the column tile overwrites it in place.
@functools.cache
def input_grad_kernel(dtype, kernel_h, kernel_w, stride_h, stride_w, dil_h, dil_w, config: BackwardTileConfig,
                      use_mask: bool, atomic: bool, regular: bool, planes: tuple[int, int],
                      weights_by_vector: bool = False, grad_out_by_vector: bool = False):
    """Kernel ``(input, offset, mask, weight, grad_out, grad_input, grad_weight, grad_offset,
    grad_mask, conv, dims)`` on ``(tiles, C // channel_span, images)`` blocks of
    ``config.input_threads(K)``.

    input and grad_input are flat (``N*C*H*W``), weight and grad_weight flat (``Co*Cg*K``),
    grad_out flat (``N*Co*Ho*Wo``); offset, mask, grad_offset, grad_mask flat and contiguous
    (``N*2GK*Ho*Wo``, ``N*GK*Ho*Wo``; mask and grad_mask dummies without ``use_mask``), read
    and written through handles in 32 bits (``sampling.tap_position_at``); dims the int32 tuple
    ``(C, H, W, Co, Cg, span, cpo, Ho, Wo)``. ``atomic`` adds the input gradient and the block's weight-gradient
    partials with ``red_add`` (grad_input and grad_weight zeroed by the caller); without it
    grad_input and grad_weight are untouched (the deterministic path computes them apart).
    ``regular`` (``config.regular(geometry)``: every channel chunk and output step full)
    compiles out the per-channel and per-output bounds tests; it must only be passed where
    it holds. ``planes`` (``planes(geometry)``: ``H*W`` and ``Ho*Wo``) are compile-time
    constants, so the channel and output steps of a handle (``cc * plane`` past a staged
    position or a RED's corner, ``GO_ROWS`` output planes in the ``grad_out`` stagings) fold
    into the instructions' immediate offsets: at ``deft64`` a RED costs 3 instructions, not 5
    (a 64-bit add per channel), and the predicted pass 0.158 ms, not 0.167.
    ``weights_by_vector`` (``config.weights_by_vector(geometry)``, with a 16-byte aligned
    ``weight``) stages the weight slabs by ``LDG.128``; ``grad_out_by_vector``
    (``config.grad_out_by_vector(geometry)``, with a 16-byte aligned ``grad_out``) stages
    ``grad_out`` by ``LDG.128``/``STS.128``.
    """
    PLANE, OUT_PLANE = planes
    fns = sampling_functions(dtype)
    load = fns.load  # input, offset, mask, grad_out: the storage dtype
    load_at = fns.precision.load_at  # (through a runtime.addresses handle)
    tap_position_at = fns.tap_position_at
    bilinear_corner_gradients = fns.bilinear_corner_gradients
    in_gradient_band = fns.in_gradient_band
    T = fns.T
    ZERO = fns.ZERO
    ONE = fns.ONE
    DT = T
    BITS = np.uint32 if np.dtype(DT).itemsize == 4 else np.uint64  # keep_if's masks
    ALL_BITS, NO_BITS = BITS(np.iinfo(BITS).max), BITS(0)

    TH, TW, HALO = config.tile_h, config.tile_w, config.halo
    CC, OGB, RR, RP = config.chunk, config.out_block, config.reg_rows, config.reg_px
    KW = kernel_w
    K = kernel_h * kernel_w
    P = TH * TW
    CK = CC * K
    KP = K * P
    SHR = (TH - 1) * stride_h + (kernel_h - 1) * dil_h + 1 + 2 * HALO
    SWR = (TW - 1) * stride_w + (kernel_w - 1) * dil_w + 1 + 2 * HALO
    REGION = SHR * SWR
    STAGED = CC * REGION
    ROW_T = CK // RR  # thread rows of the GEMM (column-gradient rows)
    PX_T = P // RP  # thread columns of the GEMM (pixels)
    THREADS = ROW_T * PX_T
    EPT = -(-KP // THREADS)  # table points owned per thread in the scatter phase
    PS = config.padded_pixels()  # row stride of staged_grad_out and grad_cols (bank padding)
    VW = config.pixel_vector()  # pixels per shared load in the weight-gradient GEMM
    WRO, WRK = config.wg_reg_out, config.wg_reg_cols
    WG_O_T = OGB // WRO  # weight-gradient GEMM: output rows of slots ...
    WG_CK_T = CK // WRK  # ... and column rows of slots
    WG_SLOTS = WG_O_T * WG_CK_T
    WEIGHT_STEP = OGB * CK  # shared-array sizes must be compile-time literals
    GRAD_OUT_STEP = OGB * PS
    COLUMN_TILE = CK * PS
    TABLE = 4 * KP
    SH_, SW_, DH_, DW_ = stride_h, stride_w, dil_h, dil_w
    USE_MASK, ATOMIC = use_mask, atomic
    REGULAR = regular  # every chunk full and every output step full (config.regular): no bounds tests
    STEPS_A, TRIP_A = _column_gemm_trip(OGB, RR * RP)
    TWICE_A = TRIP_A != STEPS_A  # the trip's two runs of STEPS_A updates
    # pixels per trip of the weight-gradient GEMM: ~2 * WG_TRIP_FFMA FFMA per trip (its trip
    # overhead, two address LEAs, two adds, compare and branch, is then under 5% of its slots)
    PX_TRIP = VW * _steps(P // VW, max(1, (WRO * WRK * VW) // 2), WG_TRIP_FFMA)
    # grad_out staging: each thread owns one pixel (GO_VECTOR: one 16-byte vector of GV pixels in
    # a tile row) of GO_ROWS rows per pass (GO_FAST; else the generic element loop)
    GV = vector_width(DT)
    GO_VECTOR = grad_out_by_vector and TW % GV == 0 and P // GV <= THREADS
    GO_SPAN = GV if GO_VECTOR else 1  # pixels a thread stages per row
    GO_ROWS = _staging_rows(THREADS, P // GO_SPAN, OGB)
    GO_FAST = GO_ROWS >= 1
    GO_REPS = -(-OGB // GO_ROWS) if GO_FAST else 0  # rows per thread and staged step
    # weight slab staging, transposed: staged_weight[ck * OGB + o], so that the column-gradient
    # GEMM reads a row's weights of consecutive output steps as one vector (LDS.128). A thread
    # stages one output row o (consecutive threads consecutive o: its stores hit distinct
    # banks), every W_CKS-th column (W_VECTOR: every W_CKS-th 16-byte vector of columns)
    W_CKS = THREADS // OGB
    W_FAST = W_CKS >= 1
    W_REPS = -(-CK // W_CKS) if W_FAST else 0  # columns per thread and output step
    WV = vector_width(DT)  # weight staging by 16-byte vector (weights_by_vector): ...
    WV_COLS = CK // WV  # ... vectors per slab row
    W_VECTOR = weights_by_vector and REGULAR and CK % WV == 0 and W_FAST
    WV_REPS = -(-WV_COLS // W_CKS) if W_VECTOR else 0  # vectors per thread and output step
    W_SPAN = WV if W_VECTOR else 1  # weight columns a thread stages at once (one vector, or one)
    NO_STEP = np.uint32(0xFFFFFFFF)  # "no grad_out step staged yet"
    POS_REPS = -(-REGION // THREADS)  # region positions staged per thread
    u32 = np.uint32
    u64 = np.uint64
    i32 = np.int32

    # ptxas bound (INPUT_REGISTER_BUDGET): 4 blocks per SM at deft64 (the launch's 3.9 blocks
    # per SM then run in one wave)
    options = {} if backend.IS_SIMULATOR else {"launch_bounds": (THREADS, input_min_blocks(THREADS, np.dtype(DT).itemsize))}

    @cuda.jit(device=True, inline=True)
    def point_gradients(offset, mask, grad_offset, grad_mask, group, k, oy, ox, out_w, out_plane, height_i, width_i,
                        pad_h, pad_w, s0, s1, s2, s3):
        """The offset and mask gradients of one (tap ``k``, pixel) point of the offset group whose
        first offset plane is element ``group`` (``u64``) of the flat offsets, from its corner sums
        ``S_q``: ``grad_offset = m * sum_q (dw_q/dy, dw_q/dx) S_q``, ``grad_mask = sum_q w_q S_q``."""
        y, x = tap_position_at(offset, element_address(offset, group), k, oy, ox, out_w, out_plane, KW, SH_, SW_,
                               DH_, DW_, pad_h, pad_w)
        (_, _, _, _, w00, w01, w10, w11, gy00, gy01, gy10, gy11,
         gx00, gx01, gx10, gx11) = bilinear_corner_gradients(y, x, height_i, width_i)
        at = u32(u32(k * out_plane) + u32(u32(oy * out_w) + ox))  # the point in its plane of the group's mask
        m = ONE
        if USE_MASK:
            m = load_at(mask, element_address(mask, u64(group // u64(2))), at)
        dy_at = u64(group + u64(u32(at + u32(k * out_plane))))  # plane 2k of the group's offsets
        grad_offset[dy_at] = m * (gy00 * s0 + gy01 * s1 + gy10 * s2 + gy11 * s3)
        grad_offset[u64(dy_at + u64(out_plane))] = m * (gx00 * s0 + gx01 * s1 + gx10 * s2 + gx11 * s3)
        if USE_MASK:
            grad_mask[u64(u64(group // u64(2)) + u64(at))] = w00 * s0 + w01 * s1 + w10 * s2 + w11 * s3

    @cuda.jit(**options)
    def kernel(input, offset, mask, weight, grad_out, grad_input, grad_weight, grad_offset, grad_mask, conv,
               dims):
        # Index discipline: every index inside an image is uint32 (wrapped in u32() so that
        # Numba's int64 promotion narrows back: no 64-bit math, no negative-index fixups, no
        # 64-bit division calls); image bases are uint64; iy0/ix0 and corner rows are int32.
        tid = u32(cuda.threadIdx.x)
        n = u32(cuda.blockIdx.z)
        channels = u32(dims[0])
        height = u32(dims[1])
        width = u32(dims[2])
        out_channels = u32(dims[3])
        cpg = u32(dims[4])  # input channels per weight group
        span = u32(dims[5])  # channels of this block (whole weight and offset groups)
        cpo = u32(dims[6])  # input channels per offset group
        out_h = u32(dims[7])
        out_w = u32(dims[8])
        plane = u32(PLANE)  # == height * width, compile-time (docstring)
        out_plane = u32(OUT_PLANE)  # == out_h * out_w
        opg = u32(out_channels // u32(channels // cpg))  # outputs per weight group
        image_base = u64(n) * u64(u32(channels * plane))  # 64-bit only here ...
        out_base = u64(n) * u64(u32(out_channels * out_plane))  # ... and here
        tiles_x = u32(u32(out_w + u32(TW - 1)) // u32(TW))
        ty = u32(u32(cuda.blockIdx.x) // tiles_x)
        oy0 = u32(ty * u32(TH))
        ox0 = u32(u32(u32(cuda.blockIdx.x) - u32(ty * tiles_x)) * u32(TW))
        iy0 = i32(i32(oy0 * u32(SH_)) - i32(conv[2] + HALO))  # first staged input row (may be < 0)
        ix0 = i32(i32(ox0 * u32(SW_)) - i32(conv[3] + HALO))  # first staged input column

        staged = cuda.shared.array(STAGED, dtype=DT, alignment=16)
        staged_weight = cuda.shared.array(WEIGHT_STEP, dtype=DT, alignment=16)
        staged_grad_out = cuda.shared.array(GRAD_OUT_STEP, dtype=DT, alignment=16)
        grad_cols = cuda.shared.array(COLUMN_TILE, dtype=DT, alignment=16)
        corner_index = cuda.shared.array(TABLE, dtype=np.int32, alignment=16)  # [point, corner]
        corner_weight = cuda.shared.array(TABLE, dtype=DT, alignment=16)  # [point, corner]

        acc = cuda.local.array((RR, RP), dtype=DT)
        go_values = cuda.local.array(GV, dtype=DT)  # a staged vector of grad_out (GO_VECTOR)
        a = cuda.local.array(RR, dtype=DT)
        b = cuda.local.array(RP, dtype=DT)
        # S_q of the points this thread owns (points tid, tid + THREADS, ...). The point loops
        # stay rolled (a run-time trip count), so the sums live in local memory (L1), read and
        # written once per point and chunk (LDL.128, STL.128): unrolled, the loops held them in
        # registers only up to 4 points a thread (LLVM kept a loop of 6 rolled, 96 threads at
        # deft64), and cost 4x the code.
        sums = cuda.local.array((EPT, 4), dtype=DT)
        position = cuda.local.array(CC, dtype=DT)  # a staged position's channels (stage)
        c00 = cuda.local.array(CC, dtype=DT)  # a point's four staged corners, the chunk's channels
        c01 = cuda.local.array(CC, dtype=DT)
        c10 = cuda.local.array(CC, dtype=DT)
        c11 = cuda.local.array(CC, dtype=DT)
        wacc = cuda.local.array((WRO, WRK), dtype=DT)  # weight-gradient partials of one slot
        wa = cuda.local.array((WRO, PX_TRIP), dtype=DT)
        wb = cuda.local.array((WRK, PX_TRIP), dtype=DT)
        row_t = u32(tid // u32(PX_T))  # this thread owns rows row_t*RR .. +RR ...
        px_t = u32(tid - u32(row_t * u32(PX_T)))  # ... and pixels px_t*RP .. +RP
        a_first = u32(row_t * u32(RR))
        b_first = u32(px_t * u32(RP))
        for r in range(EPT):
            for q in range(4):
                sums[r, q] = ZERO
        # grad_out staging (GO_FAST): this thread's pixel go_pixel_t and first row go_row; the
        # threads past GO_ROWS * P start past the last row and stage nothing
        go_row = u32(OGB)
        go_pixel_t = u32(0)
        if tid < u32(GO_ROWS * (P // GO_SPAN)):
            go_row = u32(tid // u32(P // GO_SPAN))
            go_pixel_t = u32(u32(tid - u32(go_row * u32(P // GO_SPAN))) * u32(GO_SPAN))  # (GO_VECTOR: its first)
        go_u = u32(go_pixel_t // u32(TW))
        go_oy = u32(oy0 + go_u)
        go_ox = u32(ox0 + u32(go_pixel_t - u32(go_u * u32(TW))))
        go_inside = go_oy < out_h and go_ox < out_w
        go_pixel = u32(u32(go_oy * out_w) + go_ox)
        go_at0 = u32(u32(go_row * u32(PS)) + go_pixel_t)
        go_rows_step = u32(u32(GO_ROWS) * out_plane)  # grad_out elements from one of its rows to the next
        # weight staging (W_FAST): this thread's output row w_o of the slab and first column
        # w_first (W_VECTOR: first vector of columns); the threads past W_CKS * OGB stage nothing
        w_o = u32(OGB)
        w_first = u32(0)
        row_length = u32(cpg * u32(K))  # weights per output channel
        if tid < u32(W_CKS * OGB):
            w_first = u32(tid // u32(OGB))
            w_o = u32(tid - u32(w_first * u32(OGB)))
        w_at0 = u32(u32(w_first * u32(W_SPAN * OGB)) + w_o)  # its first element of staged_weight

        c_begin = u32(u32(cuda.blockIdx.y) * span)
        c_end = u32(c_begin + span)
        table_og = u32(0)
        have_table = False
        staged_o0 = NO_STEP  # the grad_out step in staged_grad_out: outputs staged_o0 ..
        staged_g = NO_STEP  # ... of weight group staged_g (reused across the two GEMMs)
        c = c_begin
        while c < c_end:
            og = u32(c // cpo)
            g = u32(c // cpg)
            chunk_end = min(u32(c + u32(CC)), u32(u32(og + u32(1)) * cpo), u32(u32(g + u32(1)) * cpg))
            nc = u32(chunk_end - c)
            if not have_table or og != table_og:
                if have_table:
                    # phase: offset_grad (end of an offset group: S_q -> offset and mask gradients)
                    e = tid
                    r = u32(0)
                    while e < u32(KP):  # (the thread's points, as in the scatter)
                        k = u32(e // u32(P))
                        p = u32(e - u32(k * u32(P)))
                        u = u32(p // u32(TW))
                        oy = u32(oy0 + u)
                        ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                        if oy < out_h and ox < out_w:
                            # (the offset-group count, the int32 sizes and pads recomputed from
                            # the arguments here: kept live, they made the kernel spill)
                            point_gradients(offset, mask, grad_offset, grad_mask,
                                            u64(u32(u32(n * u32(channels // cpo)) + table_og))
                                            * u64(u32(2 * K) * out_plane),
                                            k, oy, ox, out_w, out_plane, i32(dims[1]), i32(dims[2]), i32(conv[2]),
                                            i32(conv[3]), sums[r, 0], sums[r, 1], sums[r, 2], sums[r, 3])
                        for q in range(4):
                            sums[r, q] = ZERO
                        e = u32(e + u32(THREADS))
                        r = u32(r + u32(1))
                # phase: table (per point: its first corner's offset in a channel plane and in the
                # staged region, the steps to the other corners, and the weights with the mask
                # folded in: what the scatter needs in every chunk, computed once per offset
                # group; the previous chunk ended with a barrier, so nobody still reads the old table)
                group_row = u64(u32(u32(n * u32(channels // cpo)) + og)) * u64(u32(K) * out_plane)  # mask[n, og*K]
                offset_group = element_address(offset, u64(group_row * u64(2)))  # offset[n, 2*og*K]
                mask_group = element_address(mask, group_row) if USE_MASK else u64(0)
                e = tid
                while e < u32(KP):
                    k = u32(e // u32(P))
                    p = u32(e - u32(k * u32(P)))
                    u = u32(p // u32(TW))
                    oy = u32(oy0 + u)
                    ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                    f00 = i32(0)  # corner (y0, x0) in a channel plane
                    s00 = i32(OUTSIDE)  # ... and in the staged region (NOT_STAGED: a corner outside it)
                    dx = i32(0)  # x1 - x0 and y1 - y0: 0 or 1 (the corners are clamped into the image)
                    dy = i32(0)
                    w00 = ZERO
                    w01 = ZERO
                    w10 = ZERO
                    w11 = ZERO
                    if oy < out_h and ox < out_w:
                        y, x = tap_position_at(offset, offset_group, k, oy, ox, out_w, out_plane, KW, SH_, SW_, DH_,
                                               DW_, i32(conv[2]), i32(conv[3]))
                        # the gradient band (closed at -1): a sample on y = -1 or x = -1 has zero
                        # weights (it scatters nothing) but its clamped corners still feed the
                        # one-sided offset gradient, as in torchvision (sampling.py's rule)
                        if in_gradient_band(y, x, height, width):
                            (y0, y1, x0, x1, w00, w01, w10, w11,
                             _, _, _, _, _, _, _, _) = bilinear_corner_gradients(y, x, i32(dims[1]), i32(dims[2]))
                            if USE_MASK:
                                m = load_at(mask, mask_group, u32(u32(k * out_plane) + u32(u32(oy * out_w) + ox)))
                                w00 *= m
                                w01 *= m
                                w10 *= m
                                w11 *= m
                            r0 = i32(i32(y0) - iy0)
                            q0 = i32(i32(x0) - ix0)
                            dy = i32(i32(y1) - i32(y0))
                            dx = i32(i32(x1) - i32(x0))
                            f00 = i32(i32(i32(y0) * i32(dims[2])) + i32(x0))
                            s00 = i32(NOT_STAGED)
                            if r0 >= i32(0) and i32(r0 + dy) < i32(SHR) and q0 >= i32(0) and i32(q0 + dx) < i32(SWR):
                                s00 = i32(i32(r0 * i32(SWR)) + q0)  # (a staged position)
                        elif USE_MASK:  # the column is 0 times the mask, as torchvision: NaN stays NaN
                            w00 = ZERO * load_at(mask, mask_group, u32(u32(k * out_plane) + u32(u32(oy * out_w) + ox)))
                    t = u32(e * u32(4))  # the point's four entries: one vector (STS.128)
                    corner_index[t] = f00
                    corner_index[t + 1] = s00
                    corner_index[t + 2] = dx
                    corner_index[t + 3] = dy
                    corner_weight[t] = w00
                    corner_weight[t + 1] = w01
                    corner_weight[t + 2] = w10
                    corner_weight[t + 3] = w11
                    e = u32(e + u32(THREADS))
                table_og = og
                have_table = True

            # phase: stage (the chunk's input region, zero outside the image and past nc): this
            # thread's region positions, each for every channel of the chunk, channel-innermost
            # (staged[pos*CC + cc]: a corner's CC channels are one vector, STS.128/LDS.128 at CC = 4)
            chunk_input = element_address(input, image_base + u64(u32(c * plane)))  # input[n, c]
            for r in range(POS_REPS):
                pos = u32(tid + u32(r * THREADS))
                if (r + 1) * THREADS <= REGION or pos < u32(REGION):
                    row = u32(pos // u32(SWR))
                    gy = u32(iy0 + i32(row))  # (a row above the image wraps past height)
                    gx = u32(ix0 + i32(u32(pos - u32(row * u32(SWR)))))
                    inside = gy < height and gx < width
                    at = offset_address(input, chunk_input, u32(u32(gy * width) + gx))  # (read if inside)
                    slot = u32(pos * u32(CC))
                    for cc in range(CC):  # (all loads, then all stores: one STS.128 at CC = 4)
                        position[cc] = ZERO
                        if inside and (REGULAR or u32(cc) < nc):
                            position[cc] = load_at(input, at, u32(u32(cc) * plane))
                    for cc in range(CC):
                        staged[slot + cc] = position[cc]

            for i in range(RR):
                for j in range(RP):
                    acc[i, j] = ZERO
            weight_row = u32(u32(g * opg) * u32(cpg * u32(K)) + u32(u32(c - u32(g * cpg)) * u32(K)))
            o0 = u32(0)
            while o0 < opg:
                # phase: stage_gemm (weights [OGB, CC*K] of this output step, stored transposed)
                if W_VECTOR:  # this thread's row, every W_CKS-th vector of columns: WV_REPS 16-byte
                    # vectors (LDG.128; regular: no bounds tests), a compile-time count
                    if w_o < u32(OGB):
                        at = u32(u32(weight_row + u32(u32(o0 + w_o) * row_length)) + u32(w_first * u32(WV)))
                        k = u32(0)
                        while k < u32(WV_REPS):
                            vector = u32(w_first + u32(k * u32(W_CKS)))
                            if WV_COLS % W_CKS == 0 or vector < u32(WV_COLS):
                                v = load_vector(weight, u64(at))
                                w_at = u64(w_at0) + u64(k * u32(W_CKS * WV * OGB))
                                for e in range(WV):  # (compile-time offsets: they fold into the stores)
                                    staged_weight[w_at + e * OGB] = v[e]
                            at = u32(at + u32(W_CKS * WV))
                            k = u32(k + u32(1))
                elif W_FAST:  # this thread's row, every W_CKS-th column: W_REPS columns, a
                    # compile-time count, read through one handle
                    if w_o < u32(OGB):
                        src = element_address(weight, u32(u32(weight_row + u32(u32(o0 + w_o) * row_length)) + w_first))
                        row_ok = REGULAR or u32(o0 + w_o) < opg
                        k = u32(0)
                        while k < u32(W_REPS):
                            ck = u32(w_first + u32(k * u32(W_CKS)))
                            if CK % W_CKS == 0 or ck < u32(CK):
                                v = ZERO
                                if row_ok and (REGULAR or ck < u32(nc * u32(K))):
                                    v = read_at(weight, src, u32(0))
                                staged_weight[u64(w_at0) + u64(k * u32(W_CKS * OGB))] = v
                            src = offset_address(weight, src, u32(W_CKS))
                            k = u32(k + u32(1))
                else:
                    idx = tid
                    while idx < u32(WEIGHT_STEP):
                        ck = u32(idx // u32(OGB))
                        o = u32(idx - u32(ck * u32(OGB)))
                        v = ZERO
                        if u32(o0 + o) < opg and ck < u32(nc * u32(K)):
                            v = weight[u32(weight_row + u32(u32(o0 + o) * row_length) + ck)]
                        staged_weight[idx] = v
                        idx = u32(idx + u32(THREADS))
                # phase: stage_grad_out (grad_out [OGB, P] rows of stride PS, unless already staged)
                if o0 != staged_o0 or g != staged_g:
                    if GO_FAST:  # this thread's pixel (GO_VECTOR: its GV pixels, LDG.128/STS.128; a vector
                        # lies wholly inside or outside the image, as out_w % GV == 0), every GO_ROWS-th row:
                        # GO_REPS rows, a compile-time count (unrolled, no run-time remainder); one 64-bit index
                        # stepped by GO_ROWS planes, stores at compile-time offsets
                        if go_row < u32(OGB):  # the threads past GO_ROWS * P / GO_SPAN stage nothing
                            src = out_base + u64(u32(u32(u32(u32(g * opg) + u32(o0 + go_row)) * out_plane) + go_pixel))
                            if not GO_VECTOR:  # (a handle, runtime.addresses; the vectors are read at an index)
                                src = element_address(grad_out, src)
                            k = u32(0)
                            while k < u32(GO_REPS):
                                o = u32(go_row + u32(k * u32(GO_ROWS)))
                                if OGB % GO_ROWS == 0 or o < u32(OGB):
                                    keep = go_inside and (REGULAR or u32(o0 + o) < opg)
                                    at = u64(go_at0) + u64(k * u32(GO_ROWS * PS))
                                    if GO_VECTOR:
                                        for e in range(GV):
                                            go_values[e] = ZERO
                                        if keep:
                                            v4 = load_vector(grad_out, src)
                                            for e in range(GV):
                                                go_values[e] = v4[e]
                                        for e in range(GV):
                                            staged_grad_out[at + e] = go_values[e]
                                    else:
                                        v = ZERO
                                        if keep:
                                            v = load_at(grad_out, src, u32(0))
                                        staged_grad_out[at] = v
                                if GO_VECTOR:
                                    src = u64(src + u64(go_rows_step))
                                else:
                                    src = offset_address(grad_out, src, go_rows_step)
                                k = u32(k + u32(1))
                    else:
                        idx = tid
                        while idx < u32(OGB * P):
                            o = u32(idx // u32(P))
                            p = u32(idx - u32(o * u32(P)))
                            u = u32(p // u32(TW))
                            oy = u32(oy0 + u)
                            ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                            v = ZERO
                            if u32(o0 + o) < opg and oy < out_h and ox < out_w:
                                channel = u32(u32(g * opg) + u32(o0 + o))
                                v = load(grad_out, out_base + u64(u32(u32(channel * out_plane) + u32(oy * out_w + ox))))
                            staged_grad_out[u32(u32(o * u32(PS)) + p)] = v
                            idx = u32(idx + u32(THREADS))
                    staged_o0 = o0
                    staged_g = g
                cuda.syncthreads()  # the staged input, weights, grad_out and the table are complete

                # phase: grad_cols_gemm (rank-1 updates; RR + RP contiguous values per step: LDS.128)
                # (a uint32 while loop: LLVM unrolls it; a Python range keeps a 64-bit counter)
                wo = u32(a_first * u32(OGB))  # row a_first of the transposed weight slab
                go = b_first
                # (two source loops of STEPS_A updates: LLVM unrolls each, not one loop of TRIP_A)
                wo_end = u32(wo + u32(OGB))
                while wo < wo_end:  # TRIP_A rank-1 updates per trip (unrolled)
                    for sub in range(STEPS_A):
                        for i in range(RR):
                            a[i] = staged_weight[u32(wo + u32(i * OGB + sub))]
                        for j in range(RP):
                            b[j] = staged_grad_out[u32(go + u32(sub * PS + j))]
                        for i in range(RR):
                            for j in range(RP):
                                acc[i, j] += a[i] * b[j]
                    if TWICE_A:
                        for sub in range(STEPS_A):
                            for i in range(RR):
                                a[i] = staged_weight[u32(wo + u32(i * OGB + STEPS_A + sub))]
                            for j in range(RP):
                                b[j] = staged_grad_out[u32(go + u32((STEPS_A + sub) * PS + j))]
                            for i in range(RR):
                                for j in range(RP):
                                    acc[i, j] += a[i] * b[j]
                    wo = u32(wo + u32(TRIP_A))
                    go = u32(go + u32(TRIP_A * PS))
                cuda.syncthreads()  # everyone is done reading this step's weights and grad_out
                o0 = u32(o0 + u32(OGB))
            for i in range(RR):
                for j in range(RP):
                    grad_cols[u32(u32(u32(a_first + u32(i)) * u32(PS)) + u32(b_first + u32(j)))] = acc[i, j]
            cuda.syncthreads()  # the column-gradient tile is complete

            # phase: scatter (per owned point: S_q over the chunk's channels; atomic mode: RED to
            # grad_input, and the point's column values written over its grad_cols, in place)
            chunk_grad = element_address(grad_input, image_base + u64(u32(c * plane)))  # grad_input[n, c]
            # (a loop over the thread's points, rolled: see the sums' declaration)
            e = tid
            r = u32(0)
            while e < u32(KP):
                k = u32(e // u32(P))
                at = u32(u32(k * u32(PS)) + u32(e - u32(k * u32(P))))  # row k, pixel p of grad_cols
                t = u32(e * u32(4))  # the point's table entries: one LDS.128 each
                f00 = u32(corner_index[t])
                s00 = corner_index[t + 1]
                dx = u32(corner_index[t + 2])
                dy = u32(corner_index[t + 3])
                w00 = corner_weight[t]
                w01 = corner_weight[t + 1]
                w10 = corner_weight[t + 2]
                w11 = corner_weight[t + 3]
                if s00 == i32(OUTSIDE):
                    if ATOMIC:  # no sample: the column is 0 (0 * mask: NaN stays NaN)
                        for cc in range(CC):
                            grad_cols[at + cc * K * PS] = w00
                else:
                    # the corners' offsets in a channel plane (clamped into the image: valid
                    # addresses even at weight 0) and their handles in grad_input[n, c]; channel
                    # cc is cc * plane further (red_add_at: an immediate offset)
                    f01 = u32(f00 + dx)
                    f10 = u32(f00 + u32(dy * width))
                    f11 = u32(f10 + dx)
                    a00 = offset_address(grad_input, chunk_grad, f00)
                    a01 = offset_address(grad_input, chunk_grad, f01)
                    a10 = offset_address(grad_input, chunk_grad, f10)
                    a11 = offset_address(grad_input, chunk_grad, f11)
                    # a corner of weight 0 (outside the image, clamped in; or at an integer
                    # position) adds an exact +0, not gc * 0 (NaN for a non-finite gc), as in
                    # torchvision: its value is ANDed with a mask of zeros (set per point)
                    k00 = ALL_BITS if w00 != ZERO else NO_BITS
                    k01 = ALL_BITS if w01 != ZERO else NO_BITS
                    k10 = ALL_BITS if w10 != ZERO else NO_BITS
                    k11 = ALL_BITS if w11 != ZERO else NO_BITS
                    if s00 >= i32(0):
                        # all four corners staged (the common case; a branch per point)
                        # (staged channel-innermost: a corner's CC values are consecutive, and
                        # start at a multiple of CC that LLVM sees, so the loads become vectors)
                        row1 = u32(u32(s00) + u32(dy * u32(SWR)))
                        s0 = u32(u32(s00) * u32(CC))
                        s01 = u32(u32(u32(s00) + dx) * u32(CC))
                        s10 = u32(row1 * u32(CC))
                        s11 = u32(u32(row1 + dx) * u32(CC))
                        # the corners' values, read before any store or RED (which the
                        # vectoriser does not move loads across): one LDS.128 per corner
                        for cc in range(CC):
                            c00[cc] = staged[s0 + cc]
                            c01[cc] = staged[s01 + cc]
                            c10[cc] = staged[s10 + cc]
                            c11[cc] = staged[s11 + cc]
                        for cc in range(CC):
                            if REGULAR or u32(cc) < nc:
                                # (compile-time offsets added unwrapped: they fold into the loads)
                                gc = grad_cols[at + cc * K * PS]  # row (cc*K + k), pixel p
                                v00 = c00[cc]
                                v01 = c01[cc]
                                v10 = c10[cc]
                                v11 = c11[cc]
                                sums[r, 0] += gc * v00
                                sums[r, 1] += gc * v01
                                sums[r, 2] += gc * v10
                                sums[r, 3] += gc * v11
                                if ATOMIC:
                                    grad_cols[at + cc * K * PS] = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                                    step = u32(u32(cc) * plane)
                                    red_add_at(grad_input, a00, step, keep_if(gc * w00, k00))
                                    red_add_at(grad_input, a01, step, keep_if(gc * w01, k01))
                                    red_add_at(grad_input, a10, step, keep_if(gc * w10, k10))
                                    red_add_at(grad_input, a11, step, keep_if(gc * w11, k11))
                    else:
                        # phase: scatter_outside (a corner outside the staged region: the same
                        # sums and additions, the values read from the input; a warp issues this
                        # when any of its lanes' points needs it)
                        channel_base = image_base + u64(u32(c * plane))  # input[n, c]
                        cc = u32(0)
                        while cc < nc:  # (a loop: this path is rare)
                            gc = grad_cols[u32(at + u32(cc * u32(K * PS)))]
                            step = u32(cc * plane)
                            v00 = load(input, channel_base + u64(u32(f00 + step)))
                            v01 = load(input, channel_base + u64(u32(f01 + step)))
                            v10 = load(input, channel_base + u64(u32(f10 + step)))
                            v11 = load(input, channel_base + u64(u32(f11 + step)))
                            sums[r, 0] += gc * v00
                            sums[r, 1] += gc * v01
                            sums[r, 2] += gc * v10
                            sums[r, 3] += gc * v11
                            if ATOMIC:
                                grad_cols[u32(at + u32(cc * u32(K * PS)))] = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                                red_add_at(grad_input, a00, step, keep_if(gc * w00, k00))
                                red_add_at(grad_input, a01, step, keep_if(gc * w01, k01))
                                red_add_at(grad_input, a10, step, keep_if(gc * w10, k10))
                                red_add_at(grad_input, a11, step, keep_if(gc * w11, k11))
                            cc = u32(cc + u32(1))
                e = u32(e + u32(THREADS))
                r = u32(r + u32(1))
            # phase: scatter (its closing barrier)
            # (atomic mode) the column tile is complete; (deterministic mode) the next chunk may
            # overwrite the staged input, grad_cols and the table
            cuda.syncthreads()

            if ATOMIC:
                # The weight gradient of this (tile, chunk): grad_weight[o, ck] += sum_p
                # grad_out[o, p] * cols[ck, p], one output step of OGB at a time, last step first
                # (its grad_out is still staged; the next chunk's first step finds step 0 staged).
                o0 = u32(u32(u32(opg - u32(1)) // u32(OGB)) * u32(OGB))
                while True:
                    # phase: wg_stage (grad_out [OGB, P] of this step, unless still staged)
                    if o0 != staged_o0 or g != staged_g:
                        if GO_FAST:  # this thread's pixel (GO_VECTOR: its GV pixels, LDG.128/STS.128; a vector
                            # lies wholly inside or outside the image, as out_w % GV == 0), every GO_ROWS-th row:
                            # GO_REPS rows, a compile-time count (unrolled, no run-time remainder); one 64-bit index
                            # stepped by GO_ROWS planes, stores at compile-time offsets
                            if go_row < u32(OGB):  # the threads past GO_ROWS * P / GO_SPAN stage nothing
                                src = out_base + u64(u32(u32(u32(u32(g * opg) + u32(o0 + go_row)) * out_plane) + go_pixel))
                                if not GO_VECTOR:  # (a handle, runtime.addresses; the vectors are read at an index)
                                    src = element_address(grad_out, src)
                                k = u32(0)
                                while k < u32(GO_REPS):
                                    o = u32(go_row + u32(k * u32(GO_ROWS)))
                                    if OGB % GO_ROWS == 0 or o < u32(OGB):
                                        keep = go_inside and (REGULAR or u32(o0 + o) < opg)
                                        at = u64(go_at0) + u64(k * u32(GO_ROWS * PS))
                                        if GO_VECTOR:
                                            for e in range(GV):
                                                go_values[e] = ZERO
                                            if keep:
                                                v4 = load_vector(grad_out, src)
                                                for e in range(GV):
                                                    go_values[e] = v4[e]
                                            for e in range(GV):
                                                staged_grad_out[at + e] = go_values[e]
                                        else:
                                            v = ZERO
                                            if keep:
                                                v = load_at(grad_out, src, u32(0))
                                            staged_grad_out[at] = v
                                    if GO_VECTOR:
                                        src = u64(src + u64(go_rows_step))
                                    else:
                                        src = offset_address(grad_out, src, go_rows_step)
                                    k = u32(k + u32(1))
                        else:
                            idx = tid
                            while idx < u32(OGB * P):
                                o = u32(idx // u32(P))
                                p = u32(idx - u32(o * u32(P)))
                                u = u32(p // u32(TW))
                                oy = u32(oy0 + u)
                                ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                                v = ZERO
                                if u32(o0 + o) < opg and oy < out_h and ox < out_w:
                                    channel = u32(u32(g * opg) + u32(o0 + o))
                                    v = load(grad_out, out_base + u64(u32(u32(channel * out_plane) + u32(oy * out_w + ox))))
                                staged_grad_out[u32(u32(o * u32(PS)) + p)] = v
                                idx = u32(idx + u32(THREADS))
                        staged_o0 = o0
                        staged_g = g
                        cuda.syncthreads()  # this step's grad_out is staged
                    # phase: wg_gemm (per slot: WRO outputs x WRK column rows, interleaved; each
                    # step reads VW pixels of every row: LDS.128 along the pixels)
                    slot = tid
                    while slot < u32(WG_SLOTS):
                        o_t = u32(slot // u32(WG_CK_T))
                        ck_t = u32(slot - u32(o_t * u32(WG_CK_T)))
                        for i in range(WRO):
                            for j in range(WRK):
                                wacc[i, j] = ZERO
                        # row starts (uint32) plus compile-time offsets added unwrapped: the offsets
                        # fold into the load instructions and neighbouring loads merge (LDS.128)
                        ga = u32(o_t * u32(PS))
                        ca = u32(ck_t * u32(PS))
                        ga_stop = u32(ga + u32(P))
                        while ga < ga_stop:  # PX_TRIP contiguous pixels of every owned row per trip
                            for i in range(WRO):
                                for v in range(PX_TRIP):
                                    wa[i, v] = staged_grad_out[ga + (i * WG_O_T * PS + v)]
                            for j in range(WRK):
                                for v in range(PX_TRIP):
                                    wb[j, v] = grad_cols[ca + (j * WG_CK_T * PS + v)]
                            for v in range(PX_TRIP):
                                for i in range(WRO):
                                    for j in range(WRK):
                                        wacc[i, j] += wa[i, v] * wb[j, v]
                            ga = u32(ga + u32(PX_TRIP))
                            ca = u32(ca + u32(PX_TRIP))
                        # phase: wg_red (the slot's partials into grad_weight: fire-and-forget RED)
                        for i in range(WRO):
                            o = u32(o0 + u32(o_t + u32(i * WG_O_T)))
                            if REGULAR or o < opg:
                                # (a handle per output row, the columns at compile-time offsets:
                                # ptxas folds them into the REDs' immediate offsets)
                                row = element_address(grad_weight, u32(u32(weight_row + u32(o * u32(cpg * u32(K))))
                                                                       + ck_t))
                                for j in range(WRK):
                                    if REGULAR or u32(ck_t + u32(j * WG_CK_T)) < u32(nc * u32(K)):
                                        red_add_at(grad_weight, row, u32(j * WG_CK_T), wacc[i, j])
                        slot = u32(slot + u32(THREADS))
                    if o0 == u32(0):
                        break
                    o0 = u32(o0 - u32(OGB))
                    cuda.syncthreads()  # everyone is done with this step's grad_out before the next is staged
                cuda.syncthreads()  # the next chunk may overwrite grad_cols, grad_out and the table
            c = chunk_end

        # phase: offset_grad (the last offset group of the span)
        e = tid
        r = u32(0)
        while e < u32(KP):  # (the thread's points, as in the scatter)
            k = u32(e // u32(P))
            p = u32(e - u32(k * u32(P)))
            u = u32(p // u32(TW))
            oy = u32(oy0 + u)
            ox = u32(ox0 + u32(p - u32(u * u32(TW))))
            if oy < out_h and ox < out_w:
                point_gradients(offset, mask, grad_offset, grad_mask,
                                u64(u32(u32(n * u32(channels // cpo)) + table_og)) * u64(u32(2 * K) * out_plane),
                                k, oy, ox, out_w, out_plane, i32(dims[1]), i32(dims[2]), i32(conv[2]), i32(conv[3]),
                                sums[r, 0], sums[r, 1], sums[r, 2], sums[r, 3])
            e = u32(e + u32(THREADS))
            r = u32(r + u32(1))

    return kernel


# --------------------------------------------------------------------------- weight kernel
# Traffic (whole batch; B = Co/OGW output blocks, T tiles, f the out-of-tile fraction):
#   reads  input    B * N * C * T * SH*SW * s      (staged per (tile, chunk); halos: L2 hits)
#                   + B * f * N*C*K*P * 4 * s      (out-of-tile corners)
#          offsets, mask  B * (C/CC) * N * 3*G*K*P * s (one table per block and tile: L2 hits)
#          grad_out (C/CC) * N * Co * P * s        (every channel chunk re-reads it: L2 hits)
#   writes S partial weight gradients of Co*Cg*K*s each (S = 1: grad_weight itself); the host
#          adds them in a fixed order: (S-1) * Co*Cg*K*s read and written again.
#   FLOPs  2*N*Co*Cg*K*P (the GEMM) + 7 per sample (interpolation) + per point 2 + 8 + 4.
#   No column matrix: the column tile lives in shared memory.
@functools.cache
def weight_grad_kernel(dtype, kernel_h, kernel_w, stride_h, stride_w, dil_h, dil_w, config: BackwardTileConfig,
                       use_mask: bool, planes: tuple[int, int], regular: bool = False):
    """Kernel ``(input, offset, mask, grad_out, grad_weight, tickets, conv, dims)`` on
    ``(S, out_blocks * chunks, groups)`` blocks of ``config.weight_threads(K)`` threads.

    input, offset, mask and grad_out flat and contiguous (``N*C*H*W``, ``N*2GK*Ho*Wo``,
    ``N*GK*Ho*Wo``, ``N*Co*Ho*Wo``); grad_weight flat ``[Co, Cg*K]``; tickets a zeroed ``uint32`` array of two counters per slice (``2 * out_blocks * chunks *
    groups``). The ``S`` blocks ``(., ob*chunks + j, g)`` share the slice of outputs ``g*Og +
    ob*OGW ..`` x columns ``(j*CC)*K ..``: each draws a ticket ``s`` (counter 0, in the order the
    blocks start), sums the (image, tile) pairs ``s, s + S, s + 2S, ...`` in registers, waits
    until counter 1 reads ``s`` (tickets ``0 .. s-1`` have added theirs), adds its partial to
    grad_weight (ticket 0 writes it) and raises counter 1. The additions run in ticket order and
    ticket ``s`` always sums the same pairs, so grad_weight is bit-identical run to run, with no
    partials in memory. A block waits only for tickets drawn before its own, by blocks already
    running that wait on nothing later: it cannot deadlock. dims ``(C, H, W, Co, Cg, N, cpo, Ho,
    Wo)`` int32; ``planes`` compile-time ``(H*W, Ho*Wo)`` as in ``input_grad_kernel``;
    ``regular``: every chunk lies in one offset group and is full (``BackwardTileConfig.regular``),
    so the build drops its per-channel tests.
    """
    PLANE, OUT_PLANE = planes
    REGULAR = regular
    fns = sampling_functions(dtype)
    tap_position_at = fns.tap_position_at
    load = fns.load  # input, offset, mask, grad_out: the storage dtype
    load_at = fns.precision.load_at  # (through a runtime.addresses handle)
    in_band = fns.in_band
    bilinear_corners = fns.bilinear_corners
    T = fns.T
    ZERO = fns.ZERO
    DT = T

    TH, TW, HALO = config.tile_h, config.tile_w, config.halo
    CC, OGW, RO, RK = config.chunk, config.w_out_block, config.w_reg_out, config.w_reg_cols
    K = kernel_h * kernel_w
    P = TH * TW
    CK = CC * K
    KP = K * P
    SHR = (TH - 1) * stride_h + (kernel_h - 1) * dil_h + 1 + 2 * HALO
    SWR = (TW - 1) * stride_w + (kernel_w - 1) * dil_w + 1 + 2 * HALO
    REGION = SHR * SWR
    STAGED = CC * REGION
    OUT_T = OGW // RO
    COL_T = CK // RK
    THREADS = OUT_T * COL_T
    STEPS_B, TRIP_B = _column_gemm_trip(P, RO * RK)
    TWICE_B = TRIP_B != STEPS_B  # the trip's two runs of STEPS_B updates
    GRAD_OUT_TILE = P * OGW  # shared-array sizes must be compile-time literals
    POS_REPS = -(-REGION // THREADS)  # region positions staged per thread
    GO_ROWS = THREADS // P  # grad_out staging: rows per pass when every thread owns one pixel ...
    GO_FAST = GO_ROWS >= 1  # ... (else the generic element loop)
    GO_REPS = -(-OGW // GO_ROWS) if GO_FAST else 0
    COLUMN_TILE = CK * P
    SH_, SW_, DH_, DW_, KW = stride_h, stride_w, dil_h, dil_w, kernel_w
    USE_MASK = use_mask
    u32 = np.uint32
    u64 = np.uint64
    i32 = np.int32

    @cuda.jit
    def kernel(input, offset, mask, grad_out, grad_weight, tickets, conv, dims):
        # Index discipline as in input_grad_kernel: uint32 inside an image, uint64 bases.
        tid = u32(cuda.threadIdx.x)
        splits = u32(cuda.gridDim.x)
        channels = u32(dims[0])
        height = u32(dims[1])
        width = u32(dims[2])
        out_channels = u32(dims[3])
        cpg = u32(dims[4])
        images = u32(dims[5])
        cpo = u32(dims[6])
        out_h = u32(dims[7])
        out_w = u32(dims[8])
        plane = u32(PLANE)  # == height * width, compile-time (input_grad_kernel's docstring)
        out_plane = u32(OUT_PLANE)  # == out_h * out_w
        groups_o = u32(channels // cpo)  # offset groups
        height_i = i32(dims[1])  # (the bilinear rule's clamps in int32)
        width_i = i32(dims[2])
        pad_h = i32(conv[2])
        pad_w = i32(conv[3])
        opg = u32(out_channels // u32(channels // cpg))
        chunks = u32(u32(cpg + u32(CC - 1)) // u32(CC))
        g = u32(cuda.blockIdx.z)
        ob = u32(u32(cuda.blockIdx.y) // chunks)
        j_chunk = u32(u32(cuda.blockIdx.y) - u32(ob * chunks))
        o_first = u32(ob * u32(OGW))  # first output of this block within the group
        c_first = u32(u32(g * cpg) + u32(j_chunk * u32(CC)))  # first input channel of this block
        nc = min(u32(CC), u32(cpg - u32(j_chunk * u32(CC))))
        tiles_x = u32(u32(out_w + u32(TW - 1)) // u32(TW))
        tiles = u32(tiles_x * u32(u32(out_h + u32(TH - 1)) // u32(TH)))

        staged = cuda.shared.array(STAGED, dtype=DT, alignment=16)
        staged_grad_out = cuda.shared.array(GRAD_OUT_TILE, dtype=DT, alignment=16)
        columns = cuda.shared.array(COLUMN_TILE, dtype=DT, alignment=16)
        ticket = cuda.shared.array(1, dtype=np.uint32)

        # this block's ticket among the S blocks of its slice: the pairs it sums, and its turn
        counters = u32(u32(2) * u32(u32(cuda.blockIdx.y) + u32(u32(cuda.blockIdx.z) * u32(cuda.gridDim.y))))
        if tid == u32(0):
            ticket[0] = cuda.atomic.add(tickets, counters, u32(1))
        cuda.syncthreads()  # every thread reads the ticket
        split = ticket[0]

        acc = cuda.local.array((RO, RK), dtype=DT)
        a = cuda.local.array(RO, dtype=DT)
        b = cuda.local.array(RK, dtype=DT)
        # grad_out staging (GO_FAST): this thread's pixel go_pixel_t and first output go_row
        go_row = u32(OGW)
        go_pixel_t = u32(0)
        if tid < u32(GO_ROWS * P):
            go_row = u32(tid // u32(P))
            go_pixel_t = u32(tid - u32(go_row * u32(P)))
        go_at0 = u32(u32(go_pixel_t * u32(OGW)) + go_row)  # its first element of staged_grad_out
        go_rows_step = u32(u32(GO_ROWS) * out_plane)
        out_t = u32(tid // u32(COL_T))  # this thread owns outputs out_t*RO .. +RO ...
        col_t = u32(tid - u32(out_t * u32(COL_T)))  # ... and columns col_t*RK .. +RK
        a_first = u32(out_t * u32(RO))
        b_first = u32(col_t * u32(RK))
        for i in range(RO):
            for j in range(RK):
                acc[i, j] = ZERO

        item = split
        while item < u32(images * tiles):
            n = u32(item // tiles)
            tile = u32(item - u32(n * tiles))
            ty = u32(tile // tiles_x)
            oy0 = u32(ty * u32(TH))
            ox0 = u32(u32(tile - u32(ty * tiles_x)) * u32(TW))
            iy0 = i32(i32(oy0 * u32(SH_)) - i32(conv[2] + HALO))
            ix0 = i32(i32(ox0 * u32(SW_)) - i32(conv[3] + HALO))
            image_base = u64(n) * u64(u32(channels * plane))
            out_base = u64(n) * u64(u32(out_channels * out_plane))
            go_u = u32(go_pixel_t // u32(TW))
            go_oy = u32(oy0 + go_u)
            go_ox = u32(ox0 + u32(go_pixel_t - u32(go_u * u32(TW))))
            go_inside = go_oy < out_h and go_ox < out_w
            go_pixel = u32(u32(go_oy * out_w) + go_ox)

            # phase: w_stage (input region of the chunk: this thread's region positions, each for
            # every channel of the chunk, through one handle per position)
            chunk_input = element_address(input, image_base + u64(u32(c_first * plane)))  # input[n, c_first]
            for r in range(POS_REPS):
                pos = u32(tid + u32(r * THREADS))
                if (r + 1) * THREADS <= REGION or pos < u32(REGION):
                    row = u32(pos // u32(SWR))
                    gy = u32(iy0 + i32(row))  # (a row above the image wraps past height)
                    gx = u32(ix0 + i32(u32(pos - u32(row * u32(SWR)))))
                    inside = gy < height and gx < width
                    at = offset_address(input, chunk_input, u32(u32(gy * width) + gx))  # (read if inside)
                    for cc in range(CC):
                        v = ZERO
                        if inside and u32(cc) < nc:
                            v = load_at(input, at, u32(u32(cc) * plane))
                        staged[pos + cc * REGION] = v
            # phase: w_stage_grad_out (grad_out [P, OGW], pixel-major: this thread's pixel, every
            # GO_ROWS-th output, a compile-time count of rows through one handle)
            if GO_FAST:
                if tid < u32(GO_ROWS * P):
                    src = element_address(grad_out, out_base + u64(u32(u32(u32(u32(g * opg) + u32(o_first + go_row))
                                                                           * out_plane) + go_pixel)))
                    k = u32(0)
                    while k < u32(GO_REPS):
                        o = u32(go_row + u32(k * u32(GO_ROWS)))
                        if OGW % GO_ROWS == 0 or o < u32(OGW):
                            v = ZERO
                            if go_inside and u32(o_first + o) < opg:
                                v = load_at(grad_out, src, u32(0))
                            staged_grad_out[u64(go_at0) + u64(k * u32(GO_ROWS))] = v
                        src = offset_address(grad_out, src, go_rows_step)
                        k = u32(k + u32(1))
            else:
                idx = tid
                while idx < u32(GRAD_OUT_TILE):
                    o = u32(idx // u32(P))
                    p = u32(idx - u32(o * u32(P)))
                    u = u32(p // u32(TW))
                    oy = u32(oy0 + u)
                    ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                    v = ZERO
                    if u32(o_first + o) < opg and oy < out_h and ox < out_w:
                        channel = u32(u32(g * opg) + u32(o_first + o))
                        v = load(grad_out, out_base + u64(u32(u32(channel * out_plane) + u32(oy * out_w + ox))))
                    staged_grad_out[u32(u32(p * u32(OGW)) + o)] = v
                    idx = u32(idx + u32(THREADS))

            # phase: w_build (the chunk's channels may span offset groups: one pass over the
            # points per group)
            cuda.syncthreads()  # the staged input and grad_out are complete
            c = c_first
            while c < u32(c_first + nc):
                og = u32(c // cpo)
                seg_end = min(u32(c_first + nc), u32(u32(og + u32(1)) * cpo))
                offset_group = element_address(offset, u64(u32(u32(u32(n * groups_o) + og) * u32(2 * K))) * u64(out_plane))
                mask_group = element_address(mask, u64(u32(u32(u32(n * groups_o) + og) * u32(K))) * u64(out_plane)) \
                    if USE_MASK else u64(0)
                e = tid
                while e < u32(KP):
                    # phase: w_build (one thread per (tap, pixel) point: its position from the
                    # offsets, corners relative to the staged region, weights with the mask folded
                    # in -- 32-bit indices, compile-time tap geometry, the offsets through handles --
                    # then its column values, kept in registers between the two: no table)
                    k = u32(e // u32(P))
                    p = u32(e - u32(k * u32(P)))
                    u = u32(p // u32(TW))
                    oy = u32(oy0 + u)
                    ox = u32(ox0 + u32(p - u32(u * u32(TW))))
                    r0 = i32(0)
                    r1 = i32(0)
                    q0 = i32(0)
                    q1 = i32(0)
                    w00 = ZERO
                    w01 = ZERO
                    w10 = ZERO
                    w11 = ZERO
                    if oy < out_h and ox < out_w:
                        y, x = tap_position_at(offset, offset_group, k, oy, ox, out_w, out_plane, KW, SH_, SW_,
                                               DH_, DW_, pad_h, pad_w)
                        if in_band(y, x, height_i, width_i):
                            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height_i, width_i)
                            if USE_MASK:
                                m = load_at(mask, mask_group, u32(u32(k * out_plane) + u32(u32(oy * out_w) + ox)))
                                w00 *= m
                                w01 *= m
                                w10 *= m
                                w11 *= m
                            r0 = i32(i32(y0) - iy0)
                            r1 = i32(i32(y1) - iy0)
                            q0 = i32(i32(x0) - ix0)
                            q1 = i32(i32(x1) - ix0)
                        elif USE_MASK:  # value 0 times the mask, as torchvision: NaN stays NaN
                            # (the corners stay at staged cell 0, read with weight 0 * m)
                            w00 = ZERO * load_at(mask, mask_group, u32(u32(k * out_plane) + u32(u32(oy * out_w) + ox)))
                            w01 = w00
                            w10 = w00
                            w11 = w00
                    # (the point's CC channel rows of the column tile [P, CC*K])
                    out_at = u32(u32(p * u32(CK)) + k)  # columns[p, cc*K + k] = out_at + cc*K
                    if r0 >= i32(0) and r1 < i32(SHR) and q0 >= i32(0) and q1 < i32(SWR):
                        # all four corners staged (the common case; a branch per point)
                        s00 = u32(i32(r0 * i32(SWR)) + q0)
                        s01 = u32(i32(r0 * i32(SWR)) + q1)
                        s10 = u32(i32(r1 * i32(SWR)) + q0)
                        s11 = u32(i32(r1 * i32(SWR)) + q1)
                        for cc in range(CC):
                            ci = u32(c_first + u32(cc))
                            if REGULAR or (ci >= c and ci < seg_end):
                                # (compile-time offsets added unwrapped: they fold into the loads and the store)
                                columns[out_at + cc * K] = (w00 * staged[s00 + cc * REGION]
                                                            + w01 * staged[s01 + cc * REGION]
                                                            + w10 * staged[s10 + cc * REGION]
                                                            + w11 * staged[s11 + cc * REGION])
                            elif c == c_first and u32(cc) >= nc:
                                columns[u32(out_at + u32(cc * K))] = ZERO
                    else:
                        # phase: w_build_outside (a corner outside the staged region: the values
                        # read from the input, clamped into the image, so never out of bounds; a warp
                        # issues this when any of its lanes' points needs it)
                        row0 = u32(u32(iy0 + r0) * width)
                        row1 = u32(u32(iy0 + r1) * width)
                        o00 = u32(row0 + u32(ix0 + q0))
                        o01 = u32(row0 + u32(ix0 + q1))
                        o10 = u32(row1 + u32(ix0 + q0))
                        o11 = u32(row1 + u32(ix0 + q1))
                        channel_base = image_base + u64(u32(c_first * plane))
                        cc = u32(0)
                        while cc < nc:  # (a loop with a run-time count, not unrolled: this path is rare)
                            ci = u32(c_first + cc)
                            if REGULAR or (ci >= c and ci < seg_end):
                                columns[u32(out_at + u32(cc * u32(K)))] = (
                                    w00 * load(input, channel_base + u64(o00)) + w01 * load(input, channel_base + u64(o01))
                                    + w10 * load(input, channel_base + u64(o10)) + w11 * load(input, channel_base + u64(o11)))
                            channel_base = channel_base + u64(plane)
                            cc = u32(cc + u32(1))
                        if not REGULAR and c == c_first:
                            for cz in range(CC):  # the rows past a partial chunk's channels
                                if u32(cz) >= nc:
                                    columns[u32(out_at + u32(cz * K))] = ZERO
                    # phase: w_build
                    e = u32(e + u32(THREADS))
                c = seg_end
            cuda.syncthreads()  # the column tile is complete

            # phase: weight_gemm (rank-1 updates over the tile's pixels; LDS.128 of RO and RK values)
            ao = a_first
            bo = b_first
            step = u32(0)
            # (two source loops of STEPS_B updates, as the column-gradient GEMM's trip; compile-time
            # offsets added unwrapped: they fold into the LDS)
            while step < u32(P):  # TRIP_B rank-1 updates per trip (unrolled)
                for sub in range(STEPS_B):
                    for i in range(RO):
                        a[i] = staged_grad_out[ao + (sub * OGW + i)]
                    for j in range(RK):
                        b[j] = columns[bo + (sub * CK + j)]
                    for i in range(RO):
                        for j in range(RK):
                            acc[i, j] += a[i] * b[j]
                if TWICE_B:
                    for sub in range(STEPS_B):
                        for i in range(RO):
                            a[i] = staged_grad_out[ao + ((STEPS_B + sub) * OGW + i)]
                        for j in range(RK):
                            b[j] = columns[bo + ((STEPS_B + sub) * CK + j)]
                        for i in range(RO):
                            for j in range(RK):
                                acc[i, j] += a[i] * b[j]
                ao = u32(ao + u32(TRIP_B * OGW))
                bo = u32(bo + u32(TRIP_B * CK))
                step = u32(step + u32(TRIP_B))
            cuda.syncthreads()  # everyone is done with this tile's columns and grad_out
            item = u32(item + splits)

        # epilogue: add this block's partial to the slice of grad_weight, in ticket order
        if tid == u32(0):
            while load_acquire(tickets, u32(counters + u32(1))) != split:
                pass  # tickets 0 .. split-1 are still adding theirs
        cuda.syncthreads()  # (thread 0's acquire) the earlier tickets' sums are visible to all
        row_length = u32(cpg * u32(K))
        for i in range(RO):
            o = u32(o_first + u32(a_first + u32(i)))
            if o < opg:
                for j in range(RK):
                    ck = u32(b_first + u32(j))
                    if ck < u32(nc * u32(K)):
                        flat = u32(u32(u32(u32(g * opg) + o) * row_length) + u32(u32(j_chunk * u32(CK)) + ck))
                        if split == u32(0):
                            grad_weight[flat] = acc[i, j]
                        else:
                            grad_weight[flat] = grad_weight[flat] + acc[i, j]
        cuda.threadfence()  # (release) this thread's sums reach the device before the turn passes
        cuda.syncthreads()  # every thread has added its share
        if tid == u32(0):
            cuda.atomic.add(tickets, u32(counters + u32(1)), u32(1))  # the next ticket's turn

    return kernel


# --------------------------------------------------------------------------- host side
def argument_and_gradient_bytes(geometry) -> int:
    """Bytes of the backward's arguments (grad_output, input, offset, mask, weight) and of its
    gradients (input, offset, mask, weight, bias): the yardstick of the extra-memory target."""
    g = geometry
    shapes = g.shapes
    names = ["input", "offset", "weight"] + (["mask"] if g.has_mask else [])
    elements = sum(math.prod(shapes[k]) for k in names)
    bias = g.out_channels if g.has_bias else 0
    return g.itemsize * (math.prod(shapes["output"]) + 2 * elements + bias)


def choose_splits(geometry, config: BackwardTileConfig, target_blocks: int | None = None) -> int:
    """Blocks ``S`` per slice of ``weight_grad_kernel``: as many as keep the launch within
    ``target_blocks`` (default: ``132 * max(1, WEIGHT_WARPS_PER_SM // warps per block)``
    blocks, about ``WEIGHT_WARPS_PER_SM`` warps on every SM of an H200, enough to cover each
    other's load latencies; 2 in the simulator), at most ``MAX_SPLITS`` and one per (image,
    tile) pair, at least 1."""
    g = geometry
    cpg, opg = g.in_channels // g.groups, g.out_channels // g.groups
    blocks = g.groups * -(-opg // config.w_out_block) * -(-cpg // config.chunk)
    items = g.batch * config.tiles(g)
    if target_blocks is None:
        warps = -(-config.weight_threads(g.taps) // 32)
        target_blocks = 2 if backend.IS_SIMULATOR else 132 * max(1, WEIGHT_WARPS_PER_SM // warps)
    return max(1, min(items, MAX_SPLITS, target_blocks // blocks))


def sort_budget(geometry) -> int:
    """Bytes the deterministic gather's sort may hold at once (``SORT_SHARE`` of
    ``argument_and_gradient_bytes``): it sorts ``backward.sort_part_rows`` output rows at a time."""
    return int(SORT_SHARE * argument_and_gradient_bytes(geometry))


def extra_bytes(geometry, config: BackwardTileConfig | None = None, deterministic: bool = False,
                target_blocks: int | None = None) -> int:
    """Device memory the ``fused`` backward allocates beyond its arguments and gradients.

    Atomic mode: none (grad_input and grad_weight receive ``RED`` additions directly).
    Deterministic mode: the largest sort part of the gather (``backward.sort_part_bytes``:
    packed keys, the sort's scratch, segment starts) and the weight kernel's two ``uint32``
    counters per slice (it adds its blocks' sums into ``grad_weight`` in ticket order, with
    no partials in memory); they are never held at the same time, but are counted together.
    ``target_blocks`` is accepted for symmetry with ``choose_splits`` (the counters do not
    depend on ``S``)."""
    if not deterministic:
        return 0
    from . import backward as column_backward

    g = geometry
    config = config or default_config(g)
    cpg, opg = g.in_channels // g.groups, g.out_channels // g.groups
    counters = 2 * 4 * g.groups * -(-opg // config.w_out_block) * -(-cpg // config.chunk)
    n = min(g.batch, GATHER_IMAGES)
    rows = column_backward.sort_part_rows(g, n, sort_budget(g))
    return counters + column_backward.sort_part_bytes(g, n, rows)


def _flat_view(array, name: str):
    """``array`` as a flat view (the kernels write through it), which needs C order."""
    flat = array.reshape(-1)
    if not array.flags.c_contiguous:
        raise ValueError(f"backward_fused: {name} must be C-contiguous (a preallocated gradient), got strides "
                         f"{array.strides}")
    return flat


def _dims(g, fifth: int) -> tuple:
    """The int32 tuple ``(C, H, W, Co, Cg, fifth, cpo, Ho, Wo)`` (``fifth``: the input kernel's
    channel span, the weight kernel's image count)."""
    cpg = g.in_channels // g.groups
    return tuple(np.int32(v) for v in (g.in_channels, g.height, g.width, g.out_channels, cpg, fifth,
                                       g.in_channels // g.offset_groups, g.out_h, g.out_w))


def backward(geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset, grad_weight,
             grad_bias, grad_mask, deterministic=False, stopwatch=backend.NO_STOPWATCH, plan=None,
             splits: int | None = None):
    """Fill the preallocated gradients with the column-free kernels (see the module docstring).

    Images of 2**32 elements or more (``supported`` is false) run ``fused_columns`` instead,
    whose kernels index in 64 bits.

    ``plan``: a ``BackwardTileConfig`` or ``None`` (``default_config``); ``splits``: the blocks
    per slice of the deterministic mode's weight kernel, whose sums it adds in ticket order
    (``None``: ``choose_splits``; atomic mode reduces the weight gradient with ``RED`` and
    ignores it).
    """
    g = geometry
    if not supported(g):  # an image of 2**32 elements or more: the 64-bit column method instead
        from . import backward as column_backward
        column_backward.backward_fused_columns(g, grad_output, input, offset, weight, mask, grad_input,
                                               grad_offset, grad_weight, grad_bias, grad_mask,
                                               deterministic, stopwatch)
        return
    config = plan if isinstance(plan, BackwardTileConfig) else default_config(g)
    config.check(g.taps)
    xp = backend.array_module(input)
    dtype = precision.compute_dtype(g.dtype)  # of the weights, gradients and partials
    conv = conv_tuple(g)
    input_c = xp.ascontiguousarray(input)
    weight_c = xp.ascontiguousarray(precision.to_compute(weight, g.dtype, xp))  # float32 for halves (small)
    by_vector = config.weights_by_vector(g)
    if by_vector:  # (16-byte vectors: a copy if the caller's weights start elsewhere)
        weight_c = vector_aligned(xp, weight_c)
    grad_output_c = xp.ascontiguousarray(grad_output)
    dummy4 = xp.zeros((1, 1, 1, 1), dtype=input.dtype)  # an absent mask (storage dtype)
    mask_arg = mask if mask is not None else dummy4
    grad_mask_arg = grad_mask if grad_mask is not None else xp.zeros((1, 1, 1, 1), dtype=dtype)
    use_mask = mask is not None
    shape = (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w)

    with stopwatch.section("bias grad"):
        if grad_bias is not None:
            grad_bias[...] = precision.to_compute(grad_output, g.dtype, xp).sum(axis=(0, 2, 3))

    # input, offset and mask gradients
    span = channel_span(g)
    tiles = config.tiles(g)
    go_by_vector = config.grad_out_by_vector(g)
    if go_by_vector:  # (likewise: a copy only if the caller's grad_output starts elsewhere)
        grad_output_c = vector_aligned(xp, grad_output_c)
    kernel = input_grad_kernel(g.dtype, *shape, config, use_mask, not deterministic, config.regular(g), planes(g),
                               by_vector, go_by_vector)
    grad_weight_flat = grad_weight.reshape(-1)
    with stopwatch.section("fused input grads" if deterministic else "fused grads"):
        if not deterministic:  # both receive RED additions
            grad_input[...] = 0
            grad_weight_flat[...] = 0
        grad_input_flat = grad_input.reshape(-1)
        image = g.in_channels * g.height * g.width
        points = g.offset_groups * g.taps * g.out_h * g.out_w  # mask (and grad_mask) elements per image
        offset_flat = xp.ascontiguousarray(offset).reshape(-1)  # (read through handles)
        mask_flat = xp.ascontiguousarray(mask_arg).reshape(-1)
        grad_offset_flat, grad_mask_flat = _flat_view(grad_offset, "grad_offset"), _flat_view(grad_mask_arg, "grad_mask")
        for first in range(0, g.batch, GRID_YZ_LIMIT):
            last = min(g.batch, first + GRID_YZ_LIMIT)
            backend.launch(kernel, (tiles, g.in_channels // span, last - first), config.input_threads(g.taps),
                           input_c[first:last].reshape(-1), offset_flat[2 * first * points:2 * last * points],
                           mask_flat[first * points:last * points] if use_mask else mask_flat, weight_c.reshape(-1),
                           grad_output_c[first:last].reshape(-1), grad_input_flat[first * image:last * image],
                           grad_weight_flat, grad_offset_flat[2 * first * points:2 * last * points],
                           grad_mask_flat[first * points:last * points] if use_mask else grad_mask_flat,
                           conv, _dims(g, span))
    if deterministic:
        from . import backward as column_backward
        dummy2 = xp.zeros((1, 1), dtype=dtype)
        with stopwatch.section("deterministic gather"):
            budget = sort_budget(g)
            for first in range(0, g.batch, GATHER_IMAGES):
                n_chunk = min(GATHER_IMAGES, g.batch - first)
                column_backward._deterministic_input_grad(g, dummy2, grad_output, weight_c, offset, mask_arg,
                                                          grad_input, first, n_chunk, True, xp, conv, budget)
    else:
        return  # atomic mode: the input kernel has added the weight gradient too

    # deterministic mode: the weight gradient from S blocks per slice, added into grad_weight
    # in ticket order (weight_grad_kernel)
    splits = splits or choose_splits(g, config)
    cpg, opg = g.in_channels // g.groups, g.out_channels // g.groups
    grid = (splits, -(-opg // config.w_out_block) * -(-cpg // config.chunk), g.groups)
    kernel = weight_grad_kernel(g.dtype, *shape, config, use_mask, planes(g), config.regular(g))
    with stopwatch.section("fused weight grad"):
        tickets = xp.zeros(2 * grid[1] * grid[2], dtype=np.uint32)  # two counters per slice
        backend.launch(kernel, grid, config.weight_threads(g.taps), input_c.reshape(-1),
                       xp.ascontiguousarray(offset).reshape(-1), xp.ascontiguousarray(mask_arg).reshape(-1),
                       grad_output_c.reshape(-1), grad_weight_flat, tickets, conv, _dims(g, g.batch))


def phase_steps(config=None) -> dict:
    """``{phase: (kind, per_step)}``: how the audit finds one source step of these phases in
    their SASS (``dcn.audit.normalise_steps``): the ``grad_out`` and weight stagings
    (``GO_FAST``, ``W_FAST``, ``W_VECTOR``) are unrolled over a compile-time count of rows or
    columns, one shared store per element (the weight slab is stored transposed: a 16-byte
    vector of ``W_VECTOR`` is four ``STS``)."""
    return {"stage_grad_out": ("sts", 1), "wg_stage": ("sts", 1), "stage_gemm": ("sts", 1),
            "w_stage_grad_out": ("sts", 1)}


def phase_model(geometry, config: BackwardTileConfig | None = None, target_blocks: int | None = None) -> dict:
    """Per thread, how many times each phase's innermost *source* loop body runs in one launch
    (``# phase: NAME`` markers of both kernels; the audit multiplies these by the instructions
    it attributes to each phase's loop body, after dividing a loop that LLVM unrolled by its
    unroll factor).

    * ``table``, ``stage``, ``stage_gemm``, ``stage_grad_out``, ``wg_stage``, ``w_stage``,
      ``w_build`` (the sampling table and the column values of a point): trips of their ``while`` loops (one element, or one (tap,
      pixel) point, per trip); ``stage_grad_out`` and ``wg_stage`` as pairs ``(trips, runs of
      their step code)``: a step stages ``grad_out`` only when it is not still staged;
    * ``grad_cols_gemm``, ``weight_gemm``: trips of the GEMM ``while`` loops, each of
      ``_column_gemm_trip(...)[1]`` or ``_steps(...)`` rank-1 updates (unrolled in the
      source); ``wg_gemm``: ``(trips of its
      pixel loop, runs of its slot code)``; ``wg_red`` (no loop: it sits in the slot loop):
      slot runs;
    * ``scatter``: its point loop (rolled: LLVM keeps a loop of ~170 instructions a point, the
      channel loop unrolled inside) runs once per owned point and chunk, its straight part once
      per chunk; ``scatter_outside`` (a point
      with a corner outside the staged region): its channel loop per owned point and chunk, its
      straight part per chunk, as if every point took it (the audit weighs it by the chance
      that a warp does); ``offset_grad``: the kernel has two copies of this code (their point
      loops unrolled: a bounded trip count), one in the chunk loop (the audit's body), run at
      the end of every offset group of the span but the last, the other after the loop (its
      straight part), run once; ``w_build_outside``
      as ``scatter_outside``, per point.

    Input-kernel counts are for atomic mode (the weight gradient fused in; ``wg_*`` phases),
    exact for spans whose chunks do not stop at a group edge (an upper bound otherwise); the
    weight kernel's (deterministic mode) are for its busiest split (``choose_splits``).
    """
    g = geometry
    config = config or default_config(g)
    k, p = g.taps, config.pixels
    ck, kp = config.rows(k), k * p
    opg = g.out_channels // g.groups
    span = channel_span(g)
    chunks = -(-span // config.chunk)
    groups_per_span = span // (g.in_channels // g.offset_groups)
    t_in = config.input_threads(k)
    t_w = config.weight_threads(k)
    rows, cols = config.staged_shape(g)
    out_steps = -(-opg // config.out_block)
    splits = choose_splits(g, config, target_blocks)
    items = -(-(g.batch * config.tiles(g)) // splits)
    segments = 1 if (g.in_channels // g.offset_groups) % config.chunk == 0 else 2
    steps_a = _column_gemm_trip(config.out_block, config.reg_rows * config.reg_px)[1]
    steps_b = _column_gemm_trip(p, config.w_reg_out * config.w_reg_cols)[1]
    vw = config.pixel_vector()
    steps_w = _steps(p // vw, max(1, (config.wg_reg_out * config.wg_reg_cols * vw) // 2), WG_TRIP_FFMA)
    weight_groups_per_span = max(1, span // (g.in_channels // g.groups))
    # grad_out staging: one pixel (or one vector of pixels) per thread, go_rows rows per pass
    go_span = vector_width(precision.compute_dtype(g.dtype)) if config.grad_out_by_vector(g) else 1
    go_rows = _staging_rows(t_in, p // go_span, config.out_block)
    grad_out_trips = -(-config.out_block // go_rows) if go_rows else -(-config.out_block * p // t_in)
    steps = chunks * out_steps  # output steps of each GEMM pass
    slot_runs = steps * -(-config.fused_weight_slots(k) // t_in)
    # grad_out stagings: the column-gradient pass finds step 0 still staged by the previous
    # chunk's weight pass (which runs last step first) except at a weight group's first chunk
    cols_pass_stagings = chunks * (out_steps - 1) + weight_groups_per_span
    weight_pass_stagings = chunks * (out_steps - 1)
    # stores per thread and output step (one element each, the slab stored transposed): the
    # vectors' elements or the columns of a thread's row, or the elements of the generic loop
    w_cks = t_in // config.out_block
    if config.weights_by_vector(g):
        vw = vector_width(precision.compute_dtype(g.dtype))
        weight_stores = vw * -(-(ck // vw) // w_cks)
    else:
        weight_stores = -(-ck // w_cks) if w_cks else -(-config.out_block * ck // t_in)
    return {
        "table": groups_per_span * -(-kp // t_in),
        "stage": (chunks, chunks),  # (position and channel loops unrolled: the whole copy per chunk)
        "stage_gemm": (steps * weight_stores, steps),
        "stage_grad_out": (cols_pass_stagings * grad_out_trips, steps),
        "grad_cols_gemm": steps * (config.out_block // steps_a),
        "scatter": (chunks * -(-kp // t_in), chunks),
        # as if every owned point had a corner outside the staged region: the audit scales this
        # by the chance that a warp's point does (its out-of-tile share, warp_fraction)
        "scatter_outside": (chunks * -(-kp // t_in) * config.chunk, chunks),
        "wg_stage": (weight_pass_stagings * grad_out_trips, steps),
        "wg_gemm": (slot_runs * (p // (vw * steps_w)), slot_runs),  # vw * steps_w pixels per trip
        "wg_red": slot_runs,
        "offset_grad": (groups_per_span - 1, 1),
        "w_stage": (items, items),  # (position and channel loops unrolled: the whole copy per item)
        "w_stage_grad_out": ((items * -(-config.w_out_block // (t_w // p)) if t_w >= p
                              else items * -(-p * config.w_out_block // t_w)), items),
        "w_build": items * segments * -(-kp // t_w),
        # as if every point had a corner outside the staged region (the audit scales it as
        # scatter_outside): its channel loop per point, its straight part per point
        "w_build_outside": (items * segments * -(-kp // t_w) * config.chunk, items * segments * -(-kp // t_w)),
        "weight_gemm": items * (p // steps_b),
    }


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``)."""
    from numba import types

    configs = {"float32": (GPU_CONFIG, SIMULATOR_CONFIG), "float64": (SIMULATOR_CONFIG,)}
    conv = types.UniTuple(types.int32, 8)
    dims = types.UniTuple(types.int32, 9)
    tickets = types.Array(types.uint32, 1, "C")
    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        flat = types.Array(t, 1, "C")  # (every array argument is flat)
        for cfg in configs[dtype]:
            tag = (f"{cfg.tile_h}x{cfg.tile_w}h{cfg.halo}c{cfg.chunk}o{cfg.out_block}r{cfg.reg_rows}x{cfg.reg_px}"
                   f"w{cfg.w_out_block}r{cfg.w_reg_out}x{cfg.w_reg_cols}")
            for atomic in (True, False):
                yield (f"input_grad[3x3,{tag},atomic={atomic}]", dtype,
                       input_grad_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, atomic, False, (4096, 4096)),
                       (flat, flat, flat, flat, flat, flat, flat, flat, flat, conv, dims))
            yield (f"weight_grad[3x3,{tag}]", dtype, weight_grad_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, (4096, 4096)),
                   (flat, flat, flat, flat, flat, tickets, conv, dims))
    # float16 and bfloat16 (storage in half, arithmetic in float32): the deft64 config; input,
    # offset, mask and grad_out in the storage type, weights and gradients in float32
    cfg = GPU_CONFIG
    tag = (f"{cfg.tile_h}x{cfg.tile_w}h{cfg.halo}c{cfg.chunk}o{cfg.out_block}r{cfg.reg_rows}x{cfg.reg_px}"
           f"w{cfg.w_out_block}r{cfg.w_reg_out}x{cfg.w_reg_cols}")
    f1 = types.Array(types.float32, 1, "C")
    for dtype in ("float16", "bfloat16"):
        s1 = types.Array(precision.numba_type(dtype), 1, "C")
        yield (f"input_grad[3x3,{tag},atomic=True]", dtype,
               input_grad_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, True, False, (4096, 4096)),
               (s1, s1, s1, f1, s1, f1, f1, f1, f1, conv, dims))
        yield (f"weight_grad[3x3,{tag}]", dtype, weight_grad_kernel(dtype, 3, 3, 1, 1, 1, 1, cfg, True, (4096, 4096)),
               (s1, s1, s1, s1, f1, tickets, conv, dims))
