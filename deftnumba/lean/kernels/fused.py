"""The fused lean forward on 2-D tiles (``method="fused"`` at strides other than 1; at stride 1
``strip.py`` runs unless this module's ``LeanTileConfig`` is passed): one launch, input read
once, output written once.

Motivation
----------
The lean operator ``y = P x + depthwise(x, stencil) + b`` run as separate passes
(a pointwise GEMM, a depthwise kernel, an add) reads the input twice and writes
and re-reads two intermediate outputs: ~5 tensor-sized transfers instead of 2.
At LeanResNet widths (C = 64..512) the pointwise GEMM has an arithmetic
intensity of about C/4 FLOP per byte in float32, right around the ridge point
of a GPU, so the extra bytes cost real time.

Algorithm (one block = one image ``n``, one ``TH x TW`` tile of output pixels,
``OCB`` output channels)::

    acc[OCB, P] = 0                                   # registers: RO x RP per thread
    for c0 in range(0, C, CC):                        # chunks of input channels
        # stage_input    x[n, c0:c0+CC, tile rows + 1-pixel halo] -> s_in (zero outside);
        #                at stride > 1 the tile's centre pixels also -> s_centre [CC, P]
        # stage_weights  packed pointwise slice P^T[c0:c0+CC, oc0:oc0+OCB] -> s_w [CC, OCB]
        # pointwise      acc += s_w[cc, my channels] (outer) centres[cc, my pixels]
        #                (centres: s_in itself at stride 1, its rows padded so they align; else s_centre)
        # stencil        for my output channels o in [c0, c0+CC): acc[o] += sum_t S[o, t] * s_in[o, p + tap_t]
    # epilogue           out[n, oc, tile] = acc + bias         (written once, NCHW)

Each thread owns ``RO`` *contiguous* output channels and ``RP`` *contiguous*
pixels, and the shared arrays are flat and 16-byte aligned, so its operand
loads are vector loads (``LDS.128`` for float32 quadruples). The stencil term
needs no extra read of device memory: the channel it needs is staged already,
with its halo, for the pointwise product. Deterministic: every output element
is summed by one thread in a fixed order.

Traffic of one launch (N images, C channels, P = Ho*Wo, s = itemsize,
B = ceil(C/OCB) output-channel blocks, T tiles of SHR x SWR staged pixels):

* reads  input   B * N * C * T * SHR*SWR * s   (halo and B > 1 re-reads are L2 hits;
                                                the minimum is N*C*H*W*s)
         weights N * T * B * CC*ceil(C/CC)*OCB * s (the zero-padded packing; L2 hits)
                 + stencil N * T * B * OCB*S * s     (the minimum is (C*C + C*S + C)*s)
* writes output  N * C * P * s, once.
* FLOPs  2*N*C*C*P (pointwise) + 2*N*C*S*P (stencil) + N*C*P (bias).

Shared memory per block: ``LeanTileConfig.shared_bytes`` (the staged tile, its rows padded
to a multiple of 4 at stride 1; the dense centres at other strides; the weight slice).

Either kernel computes the input gradient at stride 1 (``strip.py`` by default): the
adjoint of the lean operator is the lean operator with ``P^T`` and the mirrored taps
(``geometry.flipped``), no bias.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from ...runtime.tiles import RegisterBlockedTile
from . import SHARED_ALIGN

GRID_YZ_LIMIT = 65535  # CUDA's limit on gridDim.y and gridDim.z


def padded_row(cols: int, direct: bool) -> tuple[int, int]:
    """``(left, pitch)`` of a staged row: at stride 1 (``direct``) staged column ``q`` sits at
    ``q + 3`` in a row of a multiple of 4 elements, so centre column 1 starts aligned."""
    if not direct:
        return 0, cols
    return 3, -(-(cols + 3) // 4) * 4


@dataclass(frozen=True)
class LeanTileConfig(RegisterBlockedTile):
    """Compile-time tiling of the fused kernel.

    tile_h, tile_w: output pixels per block (``TH x TW``); edge tiles are masked.
    chunk:    input channels staged per step (``CC``).
    oc_block: output channels per block (``OCB``).
    reg_oc, reg_px: register blocking: each thread owns ``reg_oc`` contiguous channels
              times ``reg_px`` contiguous pixels. threads = (OCB/RO) * (TH*TW/RP).
    The pointwise loop is unrolled by hand, four channels per step (Numba has no unroll
    pragma, and LLVM leaves its loops rolled): ``chunk`` is a multiple of 4.
    """

    tile_h: int = 8
    tile_w: int = 8
    chunk: int = 16
    oc_block: int = 64
    reg_oc: int = 8
    reg_px: int = 4

    def __post_init__(self):
        self.check_blocking("chunk")
        if self.tile_w % self.reg_px:
            raise ValueError(f"tile_w ({self.tile_w}) must be a multiple of reg_px ({self.reg_px}): a thread's "
                             f"pixels lie in one row")
        if self.chunk % 4:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of 4 (the pointwise loop's unrolling)")
        if self.chunk % self.reg_oc:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of reg_oc ({self.reg_oc}): a thread's "
                             f"channels must be staged in one chunk for the stencil term")

    def staged_shape(self, stride_h: int, stride_w: int) -> tuple[int, int]:
        """Rows and columns of the staged input region: the tile's centres plus a 1-pixel halo."""
        return (self.tile_h - 1) * stride_h + 3, (self.tile_w - 1) * stride_w + 3

    def shared_bytes(self, geometry) -> int:
        """Static shared memory of one block: the staged tile (rows padded at stride 1), the
        dense centres (other strides) and the weight slice."""
        rows, cols = self.staged_shape(geometry.stride_h, geometry.stride_w)
        direct = geometry.stride_h == 1 and geometry.stride_w == 1
        left, pitch = padded_row(cols, direct)
        centres = 4 if direct else self.chunk * self.pixels
        return geometry.itemsize * (self.chunk * (rows * pitch + self.oc_block) + centres)

    def blocks(self, geometry) -> tuple[int, int, int]:
        """``(tiles, output-channel blocks, images)`` of the whole layer."""
        tiles = math.ceil(geometry.out_h / self.tile_h) * math.ceil(geometry.out_w / self.tile_w)
        return tiles, math.ceil(geometry.channels / self.oc_block), geometry.batch


# 16 threads in the simulator (one Python thread each); 128 on the GPU:
# 8 channels x 4 pixels of accumulators per thread, 64 x 64 per block.
SIMULATOR_CONFIG = LeanTileConfig(tile_h=4, tile_w=4, chunk=4, oc_block=4, reg_oc=2, reg_px=2)
GPU_CONFIG = LeanTileConfig(tile_h=8, tile_w=8, chunk=32, oc_block=64, reg_oc=8, reg_px=4)


WIDE_CONFIG = LeanTileConfig(tile_h=8, tile_w=8, chunk=32, oc_block=128, reg_oc=8, reg_px=4)
"""256 threads, 128 output channels per block: each staged input element serves twice the
FFMAs of ``GPU_CONFIG`` (the static audit: staging costs about as much as the pointwise loop)."""


STATIC_SHARED_LIMIT = 48 * 1024


def default_config(geometry) -> LeanTileConfig:
    """``SIMULATOR_CONFIG`` in the simulator. On the GPU: ``WIDE_CONFIG`` from 128 channels up,
    else ``GPU_CONFIG``, with the channel chunk halved until the block's static shared memory
    fits 48 KB (float64, stride 2)."""
    if backend.IS_SIMULATOR:
        return SIMULATOR_CONFIG
    config = WIDE_CONFIG if geometry.channels >= 128 else GPU_CONFIG
    while config.chunk > 4 and config.shared_bytes(geometry) > STATIC_SHARED_LIMIT:
        config = replace(config, chunk=config.chunk // 2)
    return config


@functools.cache
def fused_kernel(dtype, taps: tuple, stride_h: int, stride_w: int, config: LeanTileConfig, use_bias: bool):
    """Kernel ``(x, packed_pointwise, pitch, stencil, bias, out, channels, height, width, out_h,
    out_w, image0)`` on a grid ``(tiles, ceil(C/OCB), images)`` of ``config.threads`` threads.

    All arrays are flat and C-contiguous: ``x`` ``[N*C*H*W]``; ``packed_pointwise`` from
    ``pack_pointwise`` (row pitch ``pitch``): ``packed[c*pitch + o]`` the weight from input
    channel ``c`` to output channel ``o``, zero-padded to whole chunks and channel blocks
    (pre-packed once per call, so every block stages rows of it coalesced and unchecked);
    ``stencil`` ``[C*S]``; ``bias`` ``[C]`` (a dummy unless ``use_bias``); ``out``
    ``[N*C*Ho*Wo]``. Sizes are int32; ``image0`` (int64) is the launch's first image.
    """
    DT = np.dtype(dtype).type
    ZERO = DT(0)
    U = np.uint32  # unsigned 32-bit indices: no sign extension, no negative-index wraparound
    TH, TW, CC = config.tile_h, config.tile_w, config.chunk
    OCB, RO, RP = config.oc_block, config.reg_oc, config.reg_px
    P = TH * TW
    SH, SW = stride_h, stride_w
    SHR, SWR = config.staged_shape(SH, SW)
    REGION = SHR * SWR
    STAGED = CC * REGION
    WEIGHTS = CC * OCB
    # At stride 1 the tile's centre pixels are a dense block of the staged region: with rows
    # padded to a multiple of 4 and the region shifted right by LEFT = 3, a thread's RP
    # contiguous pixels start 16-byte aligned, and the pointwise product reads them straight
    # from s_in (DIRECT). At other strides the centres are copied to a dense s_centre.
    DIRECT = SH == 1 and SW == 1
    LEFT, SWP = padded_row(SWR, DIRECT)
    REGION_P = SHR * SWP
    STAGED_P = CC * REGION_P
    CENTRES = 4 if DIRECT else CC * P
    PITCH = REGION_P if DIRECT else P  # pointwise operand: distance between staged channels
    ACCUMULATORS = RO * RP
    PX_T = P // RP  # threads along pixels
    THREADS = config.threads
    S = len(taps)
    # a tap's position in the flat staged region, relative to the top-left of the pixel's 3x3 footprint
    TAP_POS = tuple(U((1 + dy) * SWP + (1 + dx) + LEFT) for dy, dx in taps)
    u_TW, u_SH, u_SW, u_SWR, u_REGION, u_P, u_OCB = U(TW), U(SH), U(SW), U(SWR), U(REGION), U(P), U(OCB)
    u_TH, u_CC, u_THREADS, u_PX_T, u_RP, u_RO, u_S = U(TH), U(CC), U(THREADS), U(PX_T), U(RP), U(RO), U(S)
    u_STAGED, u_WEIGHTS, u_SHR = U(STAGED), U(WEIGHTS), U(SHR)
    u_SWP, u_REGION_P, u_LEFT, u_PITCH = U(SWP), U(REGION_P), U(LEFT), U(PITCH)
    # the step THREADS of a thread's staged index, as (channels, rows, columns)
    STEP_CC, STEP_REM = U(THREADS // REGION), THREADS % REGION
    STEP_ROW, STEP_COL = U(STEP_REM // SWR), U(STEP_REM % SWR)
    STEP_W_CC, STEP_W_O = U(THREADS // OCB), U(THREADS % OCB)  # the same for the weight slice
    USE_BIAS = use_bias

    @cuda.jit
    def kernel(x, packed_pointwise, pitch, stencil, bias, out, channels, height, width, out_h, out_w, image0):
        # phase: prologue
        s_in = cuda.shared.array(STAGED_P, dtype=DT, alignment=SHARED_ALIGN)
        s_centre = cuda.shared.array(CENTRES, dtype=DT, alignment=SHARED_ALIGN)
        s_w = cuda.shared.array(WEIGHTS, dtype=DT, alignment=SHARED_ALIGN)
        acc = cuda.local.array(ACCUMULATORS, dtype=DT)
        a = cuda.local.array(RO, dtype=DT)
        b = cuda.local.array(RP, dtype=DT)

        tid = U(cuda.threadIdx.x)
        n = np.uint64(cuda.blockIdx.z) + np.uint64(image0)
        u_channels = U(channels)
        u_pitch = U(pitch)
        u_width = U(width)
        u_height = U(height)
        u_out_w = U(out_w)
        plane_in = u_height * u_width
        plane_out = U(out_h) * u_out_w
        image_in = n * np.uint64(u_channels * plane_in)     # 64-bit image bases ...
        image_out = n * np.uint64(u_channels * plane_out)   # ... 32-bit indices inside the image
        tiles_x = U(U(u_out_w + u_TW) - U(1)) // u_TW  # (32-bit: a multiply-high)
        tile_y = U(cuda.blockIdx.x) // tiles_x
        oy0 = tile_y * u_TH
        ox0 = (U(cuda.blockIdx.x) - tile_y * tiles_x) * u_TW
        iy0 = np.int32(oy0 * u_SH) - np.int32(1)  # first staged input row: the halo row above the tile
        ix0 = np.int32(ox0 * u_SW) - np.int32(1)
        oc0 = U(cuda.blockIdx.y) * u_OCB

        for k in range(ACCUMULATORS):
            acc[k] = ZERO
        oc_t = U(tid // u_PX_T)
        my_px = U((tid - oc_t * u_PX_T) * u_RP)  # first of my RP contiguous pixels
        my_w = U(oc_t * u_RO)                    # first of my RO contiguous channels, within the block
        my_oc = U(oc0 + my_w)
        # where my first pixel's pointwise operand sits in a staged channel
        my_first = U((my_px // u_TW + U(1)) * u_SWP + u_LEFT + U(1) + my_px % u_TW) if DIRECT else my_px
        operand = s_in if DIRECT else s_centre

        c = U(0)
        while c < u_channels:
            nc = U(min(u_CC, U(u_channels - c)))
            # phase: stage_input
            # my staged elements are tid, tid + THREADS, ...; (channel, row, col) advance by carries
            idx = tid
            cc = U(tid // u_REGION)  # every index variable stays uint32 (numba widens otherwise)
            rem = U(tid - cc * u_REGION)
            row = U(rem // u_SWR)
            col = U(rem - row * u_SWR)
            while idx < u_STAGED:
                # as unsigned, a row or column above or left of the image wraps past its size:
                # one compare per axis tests both ends
                gy = U(iy0 + np.int32(row))
                gx = U(ix0 + np.int32(col))
                v = ZERO
                if cc < nc and gy < u_height and gx < u_width:
                    v = x[image_in + np.uint64(U(U(c + cc) * plane_in + gy * u_width + gx))]
                s_in[U(cc * u_REGION_P + row * u_SWP + col + u_LEFT)] = v
                if not DIRECT and row >= U(1) and col >= U(1):
                    r = U(row - U(1))
                    q = U(col - U(1))
                    if r % u_SH == U(0) and q % u_SW == U(0):
                        u = U(r // u_SH)
                        w = U(q // u_SW)
                        if u < u_TH and w < u_TW:  # a centre pixel: also to the dense pointwise operand
                            s_centre[U(cc * u_P + u * u_TW + w)] = v
                idx = U(idx + u_THREADS)
                col = U(col + STEP_COL)
                if col >= u_SWR:
                    col = U(col - u_SWR)
                    row = U(row + U(1))
                row = U(row + STEP_ROW)
                if row >= u_SHR:
                    row = U(row - u_SHR)
                    cc = U(cc + U(1))
                cc = U(cc + STEP_CC)
            # phase: stage_weights
            # the packed matrix is zero-padded to whole chunks and blocks: no bounds tests
            idx = tid
            cc = U(tid // u_OCB)
            o = U(tid - cc * u_OCB)
            while idx < u_WEIGHTS:
                s_w[idx] = packed_pointwise[U(U(c + cc) * u_pitch + oc0 + o)]
                idx = U(idx + u_THREADS)
                o = U(o + STEP_W_O)
                if o >= u_OCB:
                    o = U(o - u_OCB)
                    cc = U(cc + U(1))
                cc = U(cc + STEP_W_CC)
            cuda.syncthreads()  # s_in, s_centre and s_w of this chunk are complete before anyone reads them

            # phase: pointwise
            # Four input channels per step (zero-filled past the last channel), written out four
            # times: Numba has no unroll pragma and LLVM leaves this loop rolled, and the SASS
            # audit attributes instructions to phases by source line (an inlined helper would not).
            cc = U(0)
            while cc < u_CC:
                w0 = cc * u_OCB + my_w  # channel cc + 0
                p0 = cc * u_PITCH + my_first
                for i in range(RO):
                    a[i] = s_w[w0 + U(i)]
                for j in range(RP):
                    b[j] = operand[p0 + U(j)]
                for i in range(RO):
                    for j in range(RP):
                        acc[i * RP + j] += a[i] * b[j]
                w0 = U(cc + U(1)) * u_OCB + my_w  # channel cc + 1
                p0 = U(cc + U(1)) * u_PITCH + my_first
                for i in range(RO):
                    a[i] = s_w[w0 + U(i)]
                for j in range(RP):
                    b[j] = operand[p0 + U(j)]
                for i in range(RO):
                    for j in range(RP):
                        acc[i * RP + j] += a[i] * b[j]
                w0 = U(cc + U(2)) * u_OCB + my_w  # channel cc + 2
                p0 = U(cc + U(2)) * u_PITCH + my_first
                for i in range(RO):
                    a[i] = s_w[w0 + U(i)]
                for j in range(RP):
                    b[j] = operand[p0 + U(j)]
                for i in range(RO):
                    for j in range(RP):
                        acc[i * RP + j] += a[i] * b[j]
                w0 = U(cc + U(3)) * u_OCB + my_w  # channel cc + 3
                p0 = U(cc + U(3)) * u_PITCH + my_first
                for i in range(RO):
                    a[i] = s_w[w0 + U(i)]
                for j in range(RP):
                    b[j] = operand[p0 + U(j)]
                for i in range(RO):
                    for j in range(RP):
                        acc[i * RP + j] += a[i] * b[j]
                cc = U(cc + U(4))

            # phase: stencil
            # My RO channels lie in one chunk (RO divides CC); in that chunk, add each one's own
            # stencil term from the staged tile.
            if my_oc >= c and my_oc < c + nc:
                for t in range(S):
                    tap = TAP_POS[t]
                    for i in range(RO):
                        weight = ZERO
                        if my_oc + U(i) < u_channels:
                            weight = stencil[(my_oc + U(i)) * u_S + U(t)]
                        base = (my_oc + U(i) - c) * u_REGION_P + tap
                        for j in range(RP):
                            p = my_px + U(j)
                            u = p // u_TW
                            w = p - u * u_TW
                            acc[i * RP + j] += weight * s_in[base + u * u_SH * u_SWP + w * u_SW]
            cuda.syncthreads()  # every read of this chunk's tiles is done before the next chunk overwrites them
            c = U(c + u_CC)

        # phase: epilogue
        # my RP pixels lie in one tile row (tile_w is a multiple of RP)
        oy = oy0 + my_px // u_TW
        ox = ox0 + my_px % u_TW
        if oy < U(out_h):
            for i in range(RO):
                oc = my_oc + U(i)
                if oc < u_channels:
                    bias_value = ZERO
                    if USE_BIAS:
                        bias_value = bias[oc]
                    row_start = image_out + np.uint64(U(oc * plane_out + oy * u_out_w + ox))
                    for j in range(RP):
                        if ox + U(j) < u_out_w:
                            out[row_start + np.uint64(j)] = acc[i * RP + j] + bias_value

    return kernel


def pack_pointwise(xp, matrix, config: LeanTileConfig):
    """``(packed, pitch)``: ``matrix[c_in, c_out]`` zero-padded to ``ceil(C/CC)*CC`` rows and
    ``ceil(C/OCB)*OCB`` columns, flattened. The forward packs ``pointwise.T``; the adjoint
    (input gradient) packs ``pointwise`` itself."""
    c = matrix.shape[0]
    rows = -(-c // config.chunk) * config.chunk
    pitch = -(-c // config.oc_block) * config.oc_block
    packed = xp.zeros((rows, pitch), dtype=matrix.dtype)
    packed[:c, :c] = matrix
    return packed.reshape(-1), pitch


def launch(geometry, taps, config, x_flat, matrix, stencil_flat, bias, out_flat,
           out_h: int, out_w: int, stride=(1, 1)):
    """Launch the fused kernel over the whole batch (slices of at most 65535 images).

    ``geometry`` gives N, C, H, W and dtype; ``matrix[c_in, c_out]`` is the pointwise map
    (``pointwise.T`` forward, ``pointwise`` for the adjoint); ``taps``, ``stride`` and
    ``(out_h, out_w)`` are passed explicitly so the backward can run the adjoint (mirrored
    taps, stride 1).
    """
    g = geometry
    xp = backend.array_module(x_flat)
    packed, pitch = pack_pointwise(xp, matrix, config)
    kernel = fused_kernel(g.dtype, tuple(taps), stride[0], stride[1], config, bias is not None)
    bias_arg = bias if bias is not None else xp.zeros(1, dtype=x_flat.dtype)
    tiles = math.ceil(out_h / config.tile_h) * math.ceil(out_w / config.tile_w)
    oc_blocks = math.ceil(g.channels / config.oc_block)
    if oc_blocks > GRID_YZ_LIMIT:
        raise ValueError(f"{g.channels} channels need {oc_blocks} channel blocks; at most {GRID_YZ_LIMIT}")
    sizes = tuple(np.int32(v) for v in (g.channels, g.height, g.width, out_h, out_w))
    for image0 in range(0, g.batch, GRID_YZ_LIMIT):
        images = min(GRID_YZ_LIMIT, g.batch - image0)
        backend.launch(kernel, (tiles, oc_blocks, images), config.threads, x_flat, packed, np.int32(pitch),
                       stencil_flat, bias_arg, out_flat, *sizes, np.int64(image0))


def phase_model(shape, config: LeanTileConfig | None = None) -> dict:
    """Per phase, iterations per thread over the whole launch of the phase's innermost loop
    body, or ``(body iterations, straight-line executions)`` (the audit's convention).

    ``shape``: a ``LeanGeometry`` or a dict with ``channels`` (and optionally ``stride``,
    ``taps`` = S). Innermost bodies: *stage_input* and *stage_weights* one staged element
    (the compiler may unroll these loops; the audit accounts for it); *pointwise* one step of
    four input channels (RO*RP FMAs each, hand-unrolled); *stencil* one tap (RO*RP FMAs,
    in the one chunk that holds my channels; its check runs every chunk); *epilogue* none.
    """
    cfg = config or GPU_CONFIG
    get = shape.get if isinstance(shape, dict) else (lambda k, d=None: getattr(shape, k, d))
    channels = int(get("channels"))
    stride = get("stride_h", None) or get("stride", 1)
    taps = get("taps", 5)
    s = len(taps) if isinstance(taps, tuple) else int(taps)
    rows, cols = cfg.staged_shape(int(stride), int(get("stride_w", None) or stride))
    chunks = math.ceil(channels / cfg.chunk)
    return {
        "prologue": 0,
        "stage_input": (chunks * math.ceil(cfg.chunk * rows * cols / cfg.threads), chunks),
        "stage_weights": (chunks * math.ceil(cfg.chunk * cfg.oc_block / cfg.threads), chunks),
        "pointwise": (chunks * cfg.chunk // 4, chunks),
        "stencil": (s, chunks),
        "epilogue": 0,
    }


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``)."""
    from numba import types

    from types import SimpleNamespace

    from .stencils import PATTERNS

    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a1 = types.Array(t, 1, "C")
        i32 = types.int32
        sig = (a1, a1, i32, a1, a1, a1, i32, i32, i32, i32, i32, types.int64)
        for channels, stride, name, tag in ((64, 1, "star5", ""), (64, 1, "full9", ""), (128, 1, "star5", ",wide"),
                                             (64, 2, "star5", "")):
            g = SimpleNamespace(stride_h=stride, stride_w=stride, itemsize=np.dtype(dtype).itemsize)  # shared_bytes
            config = GPU_CONFIG if channels < 128 else WIDE_CONFIG
            while config.chunk > 4 and config.shared_bytes(g) > STATIC_SHARED_LIMIT:
                config = replace(config, chunk=config.chunk // 2)
            yield (f"fused[{name},s{stride}{tag}]", dtype,
                   fused_kernel(dtype, PATTERNS[name], stride, stride, config, True), sig)
