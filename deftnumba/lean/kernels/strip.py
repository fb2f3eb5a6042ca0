"""The fused lean forward at stride 1, on strips of consecutive pixels (``method="fused"``).

Why strips
----------
At stride 1 a lean layer's output pixel ``p`` (row-major in the ``H x W`` plane) reads
input pixels ``p`` (the pointwise product and the centre tap), ``p +- 1`` and ``p +- W``.
So a block that owns a *strip* of ``TP`` consecutive pixels ``[p0, p0 + TP)`` needs, per
input channel, the contiguous run ``[p0 - HALO, p0 + TP + HALO)``, ``HALO >= W + 1``.
Strips run along the whole batch, ``N*H*W`` pixels, crossing row ends and image ends
freely. Compared with a 2-D ``TH x TW`` tile (``fused.py``, which the other strides keep):

* staging is a straight copy of one run per channel: 16-byte loads and stores, each
  vector's source decoded once per block, and no row/column decoding per element;
* no pixel is wasted on tile edges: a 7x7 or 14x14 image is not rounded up to 8x8 tiles
  (31% more work); only the batch's last strip is partial;
* every tap sits at a compile-time distance (``dy*W + dx``) from the pixel, because the
  kernel is compiled per image size ``(H, W)``.

The price: a neighbour across a row end is the other row's edge pixel, and one across an
image end is another image's pixel, not zero. So a tap that can leave the image is
multiplied by a 0/1 mask, computed once per thread. Where a thread's ``RP`` pixels never
cross a row end (``W % RP == 0``: they start at a multiple of ``RP``, and so does every
row) only its first pixel can lack a left neighbour and only its last a right one, and the
vertical mask is one number per tap that multiplies the tap's weight. Where strips divide
the image (``H*W % TP == 0``) a strip lies in one image, the rows outside it are staged as
zeros and no vertical mask is needed.

The centre tap is folded into the pointwise matrix before the launch (``P' = P +
diag(S[:, centre])``, in ``pack_pointwise``), so star5 costs four stencil FFMAs per output.

Algorithm (block = strip ``[p0, p0+TP)`` of the batch, output channels ``[oc0, oc0+OCB)``)::

    acc[o, p] = bias[o]                                  # registers: RO x RP per thread
    for c0 in range(0, C, CC):                           # chunks of input channels
        # stage_input    x[image(q), c0+cc, pixel(q)] for q in [p0-HALO, p0+TP+HALO) -> s_in[cc, :]
        #                (zeros outside the batch, or outside the strip's image)
        # stage_weights  packed P'^T[c0:c0+CC, oc0:oc0+OCB] -> s_w[cc, :]   (one contiguous run)
        # pointwise      acc += s_w[cc, my channels] (outer) s_in[cc, HALO + my pixels]
        # stencil        in the chunk that holds my channels o:
        #                acc[o, p] += sum_{t != centre} S[o, t] * mask_t(p) * s_in[o - c0, HALO + p + dy_t*W + dx_t]
    # epilogue           out[image(p), oc, pixel(p)] = acc          (written once)

Each thread owns ``RO`` contiguous output channels and ``RP`` contiguous pixels; the
shared arrays are flat and 16-byte aligned and ``HALO``, the row pitch ``SPAN`` and ``RP``
are multiples of 4, so every operand load of the pointwise loop is an ``LDS.128``
(float32). Deterministic: each output is summed by one thread in a fixed order.

Traffic (N images, P = H*W, s = itemsize, B = ceil(C/OCB) channel blocks, T =
ceil(N*P/TP) strips): reads input ``B*C*T*(TP + 2*HALO)*s`` (halo and B > 1 re-reads are
L2 hits; the minimum is ``N*C*P*s``), weights ``T*B*ceil(C/CC)*CC*OCB*s`` (L2 hits;
minimum ``(C*C + C*S + C)*s``); writes ``N*C*P*s`` once. FLOPs ``2*N*C*C*P +
2*N*C*(S-1)*P`` (plus the folded centre, inside the first term).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from ...runtime import backend
from ...runtime.backend import cuda
from ...runtime.vector import load_vector, vector_aligned, vector_width
from . import SHARED_ALIGN
from .stencils import PATTERNS

GRID_YZ_LIMIT = 65535  # CUDA's limit on gridDim.y and gridDim.z
REGISTER_BUDGET = 168  # per thread, declared to ptxas through launch bounds
STATIC_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class StripConfig:
    """Compile-time blocking of the strip kernel.

    strip:    output pixels per block (``TP``, consecutive in the row-major plane).
    chunk:    input channels staged per step (``CC``).
    oc_block: output channels per block (``OCB``).
    reg_oc, reg_px: each thread owns ``reg_oc`` contiguous channels times ``reg_px``
              contiguous pixels of a group's partial sums.
    ksplit:   thread groups that split each chunk's input channels between them (``KS``):
              group ``k`` sums channels ``[k*CC/KS, (k+1)*CC/KS)`` of every chunk into its own
              accumulators, and the groups add them in shared memory at the end (a fixed
              order: deterministic). threads = KS * (OCB/RO) * (TP/RP). More warps for a
              layer with few outputs, without shrinking the per-thread register blocking.
              (Any split is correct; the planner takes groups of whole warps, so that a
              group's branches do not diverge inside a warp.)
    """

    strip: int = 224
    chunk: int = 16
    oc_block: int = 64
    reg_oc: int = 8
    reg_px: int = 8
    ksplit: int = 1

    def __post_init__(self):
        for name in ("strip", "chunk", "oc_block", "reg_oc", "reg_px", "ksplit"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"StripConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.oc_block % self.reg_oc:
            raise ValueError(f"oc_block ({self.oc_block}) must be a multiple of reg_oc ({self.reg_oc})")
        if self.strip % self.reg_px:
            raise ValueError(f"strip ({self.strip}) must be a multiple of reg_px ({self.reg_px})")
        if self.reg_px % 4 or self.oc_block % 4:
            raise ValueError(f"reg_px ({self.reg_px}) and oc_block ({self.oc_block}) must be multiples of 4 "
                             f"(16-byte operand loads)")
        if self.reg_oc > 8:
            raise ValueError(f"reg_oc ({self.reg_oc}) must be at most 8 (the stencil is written out per channel)")
        if self.chunk % 4:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of 4 (the pointwise loop takes four "
                             f"channels a step)")
        if self.chunk % self.reg_oc:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of reg_oc ({self.reg_oc}): a thread's "
                             f"channels must be staged in one chunk for the stencil term")
        if self.chunk % (4 * self.ksplit) or (self.chunk // self.ksplit) % self.reg_oc:
            raise ValueError(f"chunk ({self.chunk}) must split into ksplit ({self.ksplit}) parts that are multiples "
                             f"of 4 and of reg_oc ({self.reg_oc})")

    @property
    def pixels(self) -> int:
        return self.strip

    @property
    def group_threads(self) -> int:
        """Threads of one channel group: one per ``reg_oc x reg_px`` outputs of the block."""
        return (self.oc_block // self.reg_oc) * (self.strip // self.reg_px)

    @property
    def threads(self) -> int:
        return self.ksplit * self.group_threads

    def weight_elements(self) -> int:
        """Elements of the weight buffer: a chunk's ``[CC, OCB]`` slice, or a group's partial
        sums where ``ksplit > 1`` (they are added through it at the end), if larger."""
        partial = self.group_threads * self.reg_oc * self.reg_px if self.ksplit > 1 else 0
        return max(self.chunk * self.oc_block, partial)

    def halo(self, width: int) -> int:
        """Staged elements on each side of the strip: ``W + 1`` rounded up to a multiple of 4."""
        return -(-(width + 1) // 4) * 4

    def span(self, width: int) -> int:
        """Staged elements per channel: the strip and a halo on each side."""
        return self.strip + 2 * self.halo(width)

    def shared_bytes(self, geometry) -> int:
        return geometry.itemsize * (self.chunk * self.span(geometry.width) + self.weight_elements())

    def blocks(self, geometry) -> tuple[int, int, int]:
        """``(strips, output-channel blocks, 1)``: the grid of the whole layer (strips run
        through the batch, so a small image does not leave a strip part empty)."""
        strips = math.ceil(geometry.batch * geometry.height * geometry.width / self.strip)
        return strips, math.ceil(geometry.channels / self.oc_block), 1


SIMULATOR_CONFIG = StripConfig(strip=8, chunk=4, oc_block=4, reg_oc=2, reg_px=4)
"""4 threads in the simulator (one Python thread each)."""


def launch_bounds(config: StripConfig) -> tuple[int, int]:
    """``(threads, minimum blocks per SM)`` so that ptxas stays within ``REGISTER_BUDGET``."""
    return config.threads, max(1, 65536 // (REGISTER_BUDGET * config.threads))


def pick_key(geometry) -> tuple:
    """``(N, C, H, W, dtype, taps)``: what ``AUDITED_PICKS`` is keyed by."""
    g = geometry
    return (g.batch, g.channels, g.height, g.width, str(g.dtype), tuple(tuple(t) for t in g.taps))


AUDITED_PICKS = {
    (32, 64, 56, 56, "float32", PATTERNS["star5"]): StripConfig(strip=128, chunk=16, oc_block=64, reg_oc=8, reg_px=8),
    (32, 128, 28, 28, "float32", PATTERNS["star5"]): StripConfig(strip=96, chunk=32, oc_block=128, reg_oc=8,
                                                                  reg_px=8),
    (32, 256, 14, 14, "float32", PATTERNS["star5"]): StripConfig(strip=32, chunk=64, oc_block=128, reg_oc=8, reg_px=4),
    (32, 512, 7, 7, "float32", PATTERNS["star5"]): StripConfig(strip=48, chunk=64, oc_block=128, reg_oc=8, reg_px=4,
                                                                ksplit=2),
}
"""The bench suites' configurations (``planning.default_config`` takes these), chosen by the
SASS audit among the estimate's 8 best (``python -m deftnumba.lean.audit --search 8``, re-run
once the kernel had channel groups and a pre-packed stencil): the estimate cannot see
how ptxas schedules a configuration (its first choice for 56x56x64 was 0.07x the floor
slower than the audited best). Session 38 re-picked 56x56x64 and 28x28x128 among the
estimate's 16-24 best by the larger of the audit's two estimates (issue slots, one warp's
stalls: what ``audit.search`` now ranks by): the old picks held one block of 8 or 12 warps per
SM, which waits on its loads (issue slots / with stalls, us: 16.05 / 20.41, 15.28 / 16.46);
strips of 128 and 96 pixels put 3 and 2 blocks on each busy SM (16.08 / 16.08, 15.36 /
15.36). At 7x7x512 the pick stays (16.00 / 19.26): the candidates that wait less (strips of
16 pixels, 16.61 / 16.61) miss issue 15's target of 1.3x the floor by issue slots (1.34x).
Any configuration is correct; a pick that a later kernel change makes slower is only slower."""


def centre_index(taps) -> int | None:
    """Index of the ``(0, 0)`` tap, or None."""
    return taps.index((0, 0)) if (0, 0) in taps else None


@functools.cache
def strip_kernel(dtype, taps: tuple, height: int, width: int, config: StripConfig, use_bias: bool):
    """Kernel ``(x, packed_pointwise, rows, stencil, bias, out, channels, images)`` on a grid
    ``(ceil(N*H*W/TP), ceil(C/OCB), 1)`` of ``config.threads`` threads, compiled for one
    image size ``height x width`` (stride 1: the output has the input's size).

    All arrays are flat and C-contiguous: ``x`` and ``out`` ``[N*C*H*W]``; ``packed_pointwise``
    from ``pack_pointwise`` (``rows`` padded input channels, block by block, the centre tap
    folded into its diagonal);
    ``packed_stencil`` from ``pack_stencil`` (the off-centre taps, chunk by chunk); ``bias`` ``[ceil(C/OCB)*OCB]``, zero-padded
    (a dummy unless ``use_bias``). ``channels``, ``rows`` and ``images`` (N) are int32.
    """
    DT = np.dtype(dtype).type
    ZERO, ONE = DT(0), DT(1)
    U = np.uint32  # 32-bit unsigned indices inside an image: no sign extension, no wraparound test
    U64 = np.uint64
    TP, CC, OCB, RO, RP = config.strip, config.chunk, config.oc_block, config.reg_oc, config.reg_px
    KS = config.ksplit  # channel groups
    CCK = CC // KS      # channels of a chunk that one group sums
    BASE = config.group_threads
    W, HW = width, height * width
    HALO, SPAN = config.halo(W), config.span(W)
    THREADS = config.threads
    PX_T = TP // RP  # threads along pixels
    # (index in the stencil, dy, dx) of every tap but the centre (folded into the pointwise matrix)
    OFF_CENTRE = tuple((t, dy, dx) for t, (dy, dx) in enumerate(taps) if (dy, dx) != (0, 0))
    if not OFF_CENTRE:  # the centre alone (all in the pointwise matrix): one dummy tap of weight 0
        OFF_CENTRE = ((-1, 0, 0),)
    ROWS = tuple(sorted({dy for _, dy, _ in OFF_CENTRE}))  # the staged rows a thread reads
    NR, NT = len(ROWS), len(OFF_CENTRE)
    # per row: where a thread's window of it starts, relative to its first pixel (dy*W + the
    # least dx, rounded down to a 16-byte vector: the first pixel is vector-aligned) and its
    # length in vectors; the row buffer r holds one window
    VW = vector_width(dtype)
    ROW_FROM = tuple((dy * W + min(dx for _, d, dx in OFF_CENTRE if d == dy)) // VW * VW for dy in ROWS)
    ROW_VECTORS = tuple(-(-(dy * W + RP + max(dx for _, d, dx in OFF_CENTRE if d == dy) - start) // VW)
                        for dy, start in zip(ROWS, ROW_FROM))
    ROW_MAX = VW * max(ROW_VECTORS)
    # per tap: its row, where its
    # pixel-0 value sits in the row buffer, its dx
    TAP_ROW = tuple(ROWS.index(dy) for _, dy, _ in OFF_CENTRE)
    TAP_AT = tuple(dy * W + dx - ROW_FROM[ROWS.index(dy)] for _, dy, dx in OFF_CENTRE)
    TAP_DX = tuple(dx for _, _, dx in OFF_CENTRE)
    TAP_DY = tuple(dy for _, dy, _ in OFF_CENTRE)
    # a thread's RP pixels start at a multiple of RP in the batch (TP is one), and so does
    # every row when RP divides W: they never cross a row end, so only the first can lack a
    # left neighbour and only the last a right one. Taps with dy != 0 leave the image at its
    # first or last row, whose neighbours in the batch are another image's pixels.
    ROW_ALIGNED = W % RP == 0
    # Where strips divide the image (HW % TP == 0), a strip lies in one image and the rows
    # above and below it are staged as zeros: no mask for dy != 0.
    IMAGE_STRIPS = HW % TP == 0
    # Row-aligned, a thread's pixels share a row, so a tap's vertical mask is one number per
    # thread: it multiplies the tap's weight (VERTICAL_IN_WEIGHT), not every pixel.
    VERTICAL = tuple(TAP_DY[u] != 0 and not IMAGE_STRIPS for u in range(len(OFF_CENTRE)))
    VERTICAL_IN_WEIGHT = ROW_ALIGNED
    NEEDS_MASK = tuple((VERTICAL[u] and not VERTICAL_IN_WEIGHT) or (TAP_DX[u] < 0 and not (ROW_ALIGNED and j > 0))
                       or (TAP_DX[u] > 0 and not (ROW_ALIGNED and j < RP - 1))
                       for u in range(len(OFF_CENTRE)) for j in range(RP))
    MASKS = len(OFF_CENTRE) * RP
    STENCIL_WEIGHTS = len(OFF_CENTRE) * RO
    # a thread's RP pixels lie in one image when RP divides HW (images start at multiples of it)
    ONE_IMAGE = HW % RP == 0
    ACCUMULATORS = RO * RP
    UNROLL = 8 if CCK % 8 == 0 else 4  # rank-1 updates per iteration of the pointwise loop
    STAGED, WEIGHTS = CC * SPAN, config.weight_elements()  # shared array sizes must be plain constants
    # 16-byte global loads when every channel plane starts 16-byte aligned
    VEC = vector_width(dtype) if HW % vector_width(dtype) == 0 else 1
    # staging: L lanes copy a channel's run (one VEC each, KQ times), G channel groups
    QPC = SPAN // VEC
    L = min(QPC, THREADS)
    G = THREADS // L
    KQ = -(-QPC // L)
    CH = -(-CC // G)
    # weights: the same for the [CC, OCB] slice
    WVEC = vector_width(dtype)
    WVECTORS = CC * OCB // WVEC  # vectors of one chunk's weight slice
    WREPS = -(-WVECTORS // THREADS)
    u_HW, u_W, u_OCB, u_CC = U(HW), U(W), U(OCB), U(CC)
    u_PX_T, u_RP, u_RO, u_L, u_SPAN = U(PX_T), U(RP), U(RO), U(L), U(SPAN)
    USE_BIAS = use_bias
    jit = cuda.jit if backend.IS_SIMULATOR else cuda.jit(launch_bounds=launch_bounds(config))

    device = cuda.jit(device=True) if backend.IS_SIMULATOR else cuda.jit(device=True, inline="always")

    @device
    def add_stencil(acc, r, s_in, weights, mask, row_mask, at, i):
        """Channel ``my_oc + i``'s off-centre taps for my RP pixels (``i`` a constant;
        ``weights[u*RO + i]`` its weight of tap ``u``)."""
        for ri in range(NR):  # one staged row at a time: few registers beside the accumulators
            for k in range(ROW_VECTORS[ri]):
                # a multiple of VW; a 64-bit sum of a constant: one register and immediate offsets
                v = load_vector(s_in, np.int64(at) + (i * SPAN + ROW_FROM[ri] + k * VW))  # LDS.128
                for e in range(VW):
                    r[k * VW + e] = v[e]
            for u in range(NT):
                if TAP_ROW[u] == ri:
                    weight = weights[u * RO + i]
                    if VERTICAL[u] and VERTICAL_IN_WEIGHT:
                        weight *= row_mask[u]  # my pixels' row: one vertical mask for them all
                    for j in range(RP):
                        value = r[TAP_AT[u] + j]
                        if NEEDS_MASK[u * RP + j]:  # (a compile-time constant)
                            value *= mask[u * RP + j]
                        acc[i * RP + j] += weight * value

    @jit
    def kernel(x, packed_pointwise, rows, packed_stencil, bias, out, channels, images):
        # phase: prologue
        s_in = cuda.shared.array(STAGED, dtype=DT, alignment=SHARED_ALIGN)
        s_w = cuda.shared.array(WEIGHTS, dtype=DT, alignment=SHARED_ALIGN)
        acc = cuda.local.array(ACCUMULATORS, dtype=DT)
        a = cuda.local.array(RO, dtype=DT)
        b = cuda.local.array(RP, dtype=DT)
        mask = cuda.local.array(MASKS, dtype=DT)  # per (tap, pixel): 0 where the tap leaves the image
        row_mask = cuda.local.array(NT, dtype=DT)  # per tap, row-aligned: 0 where it leaves my pixels' row
        r = cuda.local.array(ROW_MAX, dtype=DT)   # one staged row of one channel
        weights = cuda.local.array(STENCIL_WEIGHTS, dtype=DT)  # my channels' off-centre stencil weights
        source = cuda.local.array(KQ, dtype=np.uint64)  # per staged vector: its element of channel 0
        inside = cuda.local.array(KQ, dtype=np.uint32)  # ... and whether it lies in the batch

        tid = U(cuda.threadIdx.x)
        # my channel group (KS > 1) and my place in it (the planner makes groups whole warps)
        grp = U(tid // U(BASE)) if KS > 1 else U(0)
        t = U(tid - U(grp * U(BASE))) if KS > 1 else tid
        u_channels = U(channels)
        u_rows = U(rows)
        image_size = U64(U(u_channels * u_HW))       # elements of one image (64-bit bases)
        total = U64(images) * U64(HW)               # pixels of the whole batch
        # (every index is wrapped in U: numba widens sums and products of uint32 to 64 bits)
        p0 = U64(cuda.blockIdx.x) * U64(TP)          # my block's first pixel in the batch
        oc0 = U(U(cuda.blockIdx.y) * u_OCB)
        oc_t = U(t // u_PX_T)
        my_px = U(U(t - U(oc_t * u_PX_T)) * u_RP)  # first of my RP contiguous pixels, within the strip
        my_w = U(oc_t * u_RO)                        # first of my RO contiguous channels, within the block
        my_oc = U(oc0 + my_w)
        first = p0 + U64(my_px)                      # my first pixel in the batch
        for i in range(RO):  # the accumulators start at the bias (zero-padded to whole blocks)
            value = ZERO
            if USE_BIAS and grp == U(0):  # (group 0's partial sums carry it)
                value = bias[my_oc + i]
            for j in range(RP):
                acc[i * RP + j] = value
        # staging lanes: lane l copies vectors l, l + L, ... of the runs of channels g, g + G, ...
        g = U(tid // u_L)
        lane = U(tid - U(g * u_L))
        to0 = U(U(g * u_SPAN) + U(lane * U(VEC)))  # where my first vector goes in s_in
        block_weights = U(U(cuda.blockIdx.y) * U(OCB * 1) * u_rows)  # this block's slice of the packed matrix
        # My staged vectors: batch positions P = p0 - HALO + (lane + k*L)*VEC, one image each (HW
        # is a multiple of VEC); where each lies in channel 0 of its image, decoded once.
        for k in range(KQ):
            position = np.int64(p0) - np.int64(HALO) + np.int64(U(lane + U(k * L)) * U(VEC))
            inside[k] = U(0)
            source[k] = U64(0)
            if IMAGE_STRIPS:  # the block's strip lies in one image: its halo outside the image is zeros
                low = np.int64(p0 // U64(HW) * U64(HW))
                in_batch = position >= low and position < low + np.int64(HW)
            else:
                in_batch = position >= 0 and U64(position) < total
            if in_batch and (k < KQ - 1 or QPC % L == 0 or U(lane + U(k * L)) < U(QPC)):
                n = U64(position) // U64(HW)
                inside[k] = U(1)
                source[k] = n * image_size + (U64(position) - n * U64(HW))
        # Vectors outside the batch (before the first pixel, past the last; with IMAGE_STRIPS
        # outside the strip's image) are zeros in every chunk: written once, here.
        if g < U(G):
            rep = U(0)
            while rep < U(CH):
                cc = U(g + U(rep * U(G)))
                for k in range(KQ):
                    to = to0 + rep * (G * SPAN) + k * (L * VEC)
                    if (k < KQ - 1 or QPC % L == 0 or U(lane + U(k * L)) < U(QPC)) and inside[k] == U(0):
                        if CC % G == 0 or cc < u_CC:
                            for e in range(VEC):
                                s_in[to + e] = ZERO
                rep = U(rep + U(1))

        c = U(0)
        while c < u_channels:
            nc = U(min(u_CC, U(u_channels - c)))
            # phase: stage_input
            # Lane l of channel group g copies vectors l, l + L, ... of the runs of channels
            # c + g, c + g + G, ...: a compile-time count (a 32-bit counter from 0, so LLVM
            # unrolls it), each at a compile-time distance from one 64-bit address per vector.
            if g < U(G):
                channel_offset = U64(U(c + g) * u_HW)  # channel c + g's plane, from channel 0's
                if nc == u_CC:
                    rep = U(0)
                    while rep < U(CH):
                        cc = U(g + U(rep * U(G)))
                        for k in range(KQ):
                            to = to0 + rep * (G * SPAN) + k * (L * VEC)  # 64-bit sum: immediate offsets
                            if inside[k] != U(0):
                                if CC % G == 0 or cc < u_CC:
                                    at = source[k] + channel_offset + U64(U(rep * U(G * HW)))
                                    if VEC > 1:
                                        v = load_vector(x, at)
                                        for e in range(VEC):
                                            s_in[to + e] = v[e]
                                    else:
                                        s_in[to] = x[at]
                        rep = U(rep + U(1))
                else:
                    # phase: stage_input_partial
                    # The last chunk, with fewer than CC channels left: zeros past them.
                    rep = U(0)
                    while rep < U(CH):
                        cc = U(g + U(rep * U(G)))
                        for k in range(KQ):
                            to = to0 + rep * (G * SPAN) + k * (L * VEC)  # 64-bit sum: immediate offsets
                            if inside[k] != U(0):
                                if cc < nc:
                                    at = source[k] + channel_offset + U64(U(rep * U(G * HW)))
                                    for e in range(VEC):
                                        s_in[to + e] = x[at + U64(e)]
                                elif CC % G == 0 or cc < u_CC:
                                    for e in range(VEC):
                                        s_in[to + e] = ZERO
                        rep = U(rep + U(1))
            # phase: stage_weights
            # This block's slice of the chunk is contiguous in the packed matrix (pack_pointwise):
            # a flat copy of 16-byte vectors, WREPS per thread at compile-time distances.
            w_from = U64(U(block_weights + U(c * u_OCB)) + U(tid * U(WVEC)))
            w_to = U(tid * U(WVEC))
            rep = U(0)
            while rep < U(WREPS):
                if WVECTORS % THREADS == 0 or U(tid + U(rep * U(THREADS))) < U(WVECTORS):
                    v = load_vector(packed_pointwise, w_from + U64(U(rep * U(THREADS * WVEC))))
                    for e in range(WVEC):
                        s_w[U(w_to + U(rep * U(THREADS * WVEC)) + U(e))] = v[e]
                rep = U(rep + U(1))
            cuda.syncthreads()  # this chunk's s_in and s_w are complete before anyone reads them

            # phase: pointwise
            # UNROLL rank-1 updates (input channels) per iteration, written out: LLVM does not
            # unroll a loop over these calls, and few iterations leave few register moves.
            # The offsets are left as (64-bit) sums of constants: they become immediates.
            # My group sums the chunk's channels [grp*CCK, (grp+1)*CCK).
            wp = U(my_w + U(grp * U(CCK * OCB)))
            xq = U(U(my_px + U(HALO)) + U(grp * U(CCK * SPAN)))
            x_stop = U(xq + U(CCK * SPAN))
            while xq < x_stop:
                rank_one_update(acc, a, b, s_w, s_in, wp, xq)
                if UNROLL >= 2:
                    rank_one_update(acc, a, b, s_w, s_in, wp + OCB, xq + SPAN)
                if UNROLL >= 4:
                    rank_one_update(acc, a, b, s_w, s_in, wp + 2 * OCB, xq + 2 * SPAN)
                    rank_one_update(acc, a, b, s_w, s_in, wp + 3 * OCB, xq + 3 * SPAN)
                if UNROLL >= 8:
                    rank_one_update(acc, a, b, s_w, s_in, wp + 4 * OCB, xq + 4 * SPAN)
                    rank_one_update(acc, a, b, s_w, s_in, wp + 5 * OCB, xq + 5 * SPAN)
                    rank_one_update(acc, a, b, s_w, s_in, wp + 6 * OCB, xq + 6 * SPAN)
                    rank_one_update(acc, a, b, s_w, s_in, wp + 7 * OCB, xq + 7 * SPAN)
                wp = U(wp + U(UNROLL * OCB))  # every counter stays uint32 (numba widens sums to 64 bits)
                xq = U(xq + U(UNROLL * SPAN))
            # my channels lie in this chunk (in my group's part of it: one group adds their taps)
            lo = U(c + U(grp * U(CCK)))
            mine = my_oc >= lo and U(my_oc - lo) < U(CCK) and my_oc < u_channels
            # phase: stencil
            # (marked before the branch: the inlined add_stencil's lines lie outside the kernel
            # and take the phase of the code before them, which the compiler may schedule first)
            if mine:
                # My RO channels lie in this chunk (RO divides CCK): each one's own off-centre taps,
                # read from the staged runs at compile-time distances dy*W + dx.
                # Written out per channel (RO <= 8): LLVM leaves a loop this large rolled, and a
                # rolled loop would index the accumulators at run time (local memory).
                at = U(U(U(my_oc - c) * u_SPAN) + U(U(HALO) + my_px))  # my first channel's first pixel in s_in
                # My channels' weights, pre-packed chunk by chunk (pack_stencil): tap u of
                # channel c + k at c*NT + u*CC + k, zero past C and for the dummy tap. The index
                # depends on the chunk, so the compiler cannot hoist these loads out of the
                # loop (into every thread, held in registers through it).
                w_at = np.int64(U(U(c * U(NT)) + U(my_oc - c)))
                for u in range(NT):
                    if RO % VW == 0:  # my RO channels' weights are whole aligned vectors
                        for k in range(RO // VW):
                            v = load_vector(packed_stencil, w_at + (u * CC + k * VW))
                            for e in range(VW):
                                weights[u * RO + k * VW + e] = v[e]
                    else:
                        for i in range(RO):
                            weights[u * RO + i] = packed_stencil[w_at + (u * CC + i)]
                q = U(first % U64(HW))  # my first pixel's place in its image
                for j in range(RP):  # where my pixel j lies in its image: which taps leave it
                    if RP <= HW:  # (compile-time) one image end at most among my pixels
                        p = U(q + U(j))
                        if p >= U(HW):
                            p = U(p - U(HW))
                    else:
                        p = U(U(q + U(j)) % U(HW))
                    xj = U(p % u_W)
                    for u in range(NT):
                        keep = ONE
                        if TAP_DX[u] < 0 and xj == U(0):
                            keep = ZERO
                        if TAP_DX[u] > 0 and xj == U(W - 1):
                            keep = ZERO
                        vertical = ONE
                        if TAP_DY[u] < 0 and p < u_W:
                            vertical = ZERO
                        if TAP_DY[u] > 0 and p >= U(HW - W):
                            vertical = ZERO
                        if VERTICAL_IN_WEIGHT:
                            if j == 0:
                                row_mask[u] = vertical
                        else:
                            keep *= vertical
                        mask[u * RP + j] = keep
                add_stencil(acc, r, s_in, weights, mask, row_mask, at, 0)
                if RO > 1:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 1)
                if RO > 2:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 2)
                if RO > 3:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 3)
                if RO > 4:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 4)
                if RO > 5:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 5)
                if RO > 6:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 6)
                if RO > 7:
                    add_stencil(acc, r, s_in, weights, mask, row_mask, at, 7)
            cuda.syncthreads()  # every read of this chunk's s_in and s_w is done before the next chunk
            c = U(c + u_CC)

        # phase: combine
        # KS > 1: groups 1..KS-1 hand their partial sums to group 0 through s_w, one group a
        # round, in a fixed order (deterministic). Vector q of a thread's sums sits at
        # (q*BASE + t)*VW: consecutive threads, consecutive 16 bytes (no bank conflicts).
        if KS > 1:
            for rnd in range(1, KS):
                if grp == U(rnd):
                    for q in range(ACCUMULATORS // VW):
                        for e in range(VW):
                            s_w[np.int64(U(t * U(VW))) + (q * BASE * VW + e)] = acc[q * VW + e]
                cuda.syncthreads()  # round rnd's partial sums are in s_w before group 0 reads them
                if grp == U(0):
                    for q in range(ACCUMULATORS // VW):
                        v = load_vector(s_w, np.int64(U(t * U(VW))) + q * BASE * VW)
                        for e in range(VW):
                            acc[q * VW + e] += v[e]
                cuda.syncthreads()  # group 0 has read them before the next round overwrites s_w

        # phase: epilogue
        if KS > 1 and grp != U(0):
            return  # group 0 writes the sums
        if ONE_IMAGE or RP <= HW:
            # My first pixel's image n and place q in it are decoded once; my channel planes
            # lie at compile-time distances (i*HW) from my first one.
            if first < total:
                n = first // U64(HW)
                q = U(first - n * U64(HW))
                base = n * image_size + U64(q) + U64(U(my_oc * u_HW))  # my first channel, first pixel
                left = total - first  # pixels of the batch from my first one on
                for j in range(RP):
                    if ONE_IMAGE:  # (N*HW and my first pixel are multiples of RP) all in one image
                        at = base + U64(j)
                        ok = True
                    else:  # RP <= HW: my pixels cross at most one image end, after which they
                        # lie one image further on, HW elements back
                        at = base + U64(j)
                        if q >= U(HW - j):
                            at += image_size - U64(HW)
                        ok = j == 0 or U64(j) < left
                    if ok:
                        for i in range(RO):
                            if U(my_oc + U(i)) < u_channels:
                                out[at + U64(i * HW)] = acc[i * RP + j]
        else:  # images smaller than my pixels (tiny test planes): each pixel decoded on its own
            for j in range(RP):
                pixel = first + U64(j)
                if pixel < total:
                    n = pixel // U64(HW)
                    base = n * image_size + (pixel - n * U64(HW))
                    for i in range(RO):
                        o = U(my_oc + U(i))
                        if o < u_channels:
                            out[base + U64(U(o * u_HW))] = acc[i * RP + j]

    @device
    def rank_one_update(acc, a, b, s_w, s_in, wp, xq):
        """acc += a b^T: my RO weights of one input channel (from s_w[wp]) times my RP pixels
        of it (from s_in[xq]). Defined after the kernel (numba resolves it at compile time),
        so that its lines belong to the pointwise phase."""
        # phase: pointwise
        for i in range(RO):
            a[i] = s_w[wp + i]  # 64-bit sums: the constants fold into the loads' immediate offsets
        for j in range(RP):
            b[j] = s_in[xq + j]
        for i in range(RO):
            for j in range(RP):
                acc[i * RP + j] += a[i] * b[j]

    return kernel


def pack_pointwise(xp, matrix, stencil, taps, config: StripConfig):
    """``(packed, rows)``: ``matrix[c_in, c_out]`` plus the centre tap on its diagonal, zero-padded
    to ``rows = ceil(C/CC)*CC`` input channels and whole blocks of ``OCB`` output channels, and
    laid out block by block: ``packed[b, c, o]`` (flattened) is the weight from input channel
    ``c`` to output channel ``b*OCB + o``, so a block's slice of a chunk is one contiguous run."""
    c = matrix.shape[0]
    rows = -(-c // config.chunk) * config.chunk
    blocks = -(-c // config.oc_block)
    padded = xp.zeros((rows, blocks * config.oc_block), dtype=matrix.dtype)
    padded[:c, :c] = matrix
    centre = centre_index(taps)
    if centre is not None:
        diagonal = xp.arange(c)
        padded[diagonal, diagonal] += stencil.reshape(c, len(taps))[:, centre]
    packed = xp.ascontiguousarray(padded.reshape(rows, blocks, config.oc_block).transpose(1, 0, 2))
    return packed.reshape(-1), rows


def pack_stencil(xp, stencil, taps, config: StripConfig, rows: int):
    """The off-centre stencil weights laid out chunk by chunk for the kernel: ``packed[k, u, cc]``
    (flattened) is the weight of off-centre tap ``u`` (the taps in stencil order, the centre
    skipped) for channel ``k*CC + cc``; zero past the C channels (``rows`` =
    ``ceil(C/CC)*CC``), and a single zero tap where the pattern has no off-centre tap.
    A thread's ``RO`` channels are then contiguous and vector-aligned for each tap."""
    c = stencil.size // len(taps)
    off_centre = [t for t, tap in enumerate(taps) if tuple(tap) != (0, 0)]
    nt = max(1, len(off_centre))
    padded = xp.zeros((rows, nt), dtype=stencil.dtype)
    if off_centre:
        padded[:c] = stencil.reshape(c, len(taps))[:, off_centre]
    packed = padded.reshape(rows // config.chunk, config.chunk, nt).transpose(0, 2, 1)
    return vector_aligned(xp, xp.ascontiguousarray(packed).reshape(-1))


def launch(geometry, taps, config: StripConfig, x_flat, matrix, stencil_flat, bias, out_flat):
    """Launch the strip kernel over the whole batch (stride 1).

    ``geometry`` gives N, C, H, W and dtype; ``matrix[c_in, c_out]`` is the pointwise map
    (``pointwise.T`` forward, ``pointwise`` for the adjoint); ``taps`` is passed explicitly
    so that the backward can run the adjoint (mirrored taps).
    """
    g = geometry
    xp = backend.array_module(x_flat)
    x_flat = vector_aligned(xp, x_flat)  # the staging reads it in 16-byte vectors
    packed, rows = pack_pointwise(xp, matrix, stencil_flat, taps, config)
    packed_stencil = pack_stencil(xp, stencil_flat, taps, config, rows)
    kernel = strip_kernel(g.dtype, tuple(taps), g.height, g.width, config, bias is not None)
    strips, oc_blocks, _ = config.blocks(g)
    bias_arg = xp.zeros(oc_blocks * config.oc_block if bias is not None else 1, dtype=x_flat.dtype)
    if bias is not None:
        bias_arg[:g.channels] = bias
    if oc_blocks > GRID_YZ_LIMIT:
        raise ValueError(f"{g.channels} channels need {oc_blocks} channel blocks; at most {GRID_YZ_LIMIT}")
    if strips >= 2**31 or g.batch >= 2**31:
        raise ValueError(f"{g.batch} images of {g.height}x{g.width} need {strips} strips of {config.strip} "
                         f"pixels; at most 2**31 - 1")
    backend.launch(kernel, (strips, oc_blocks, 1), config.threads, x_flat, packed, np.int32(rows),
                   packed_stencil, bias_arg, out_flat, np.int32(g.channels), np.int32(g.batch))


def staging_steps(geometry, config: StripConfig) -> tuple[int, int]:
    """``(input vectors, weight vectors)`` one thread stages per chunk (the unrolled copy
    steps, counting those its guards skip)."""
    vec = vector_width(geometry.dtype)
    vec_in = vec if (geometry.height * geometry.width) % vec == 0 else 1
    lanes = min(config.span(geometry.width) // vec_in, config.threads)
    steps_in = -(-config.chunk // (config.threads // lanes)) * -(-(config.span(geometry.width) // vec_in) // lanes)
    steps_w = -(-(config.chunk * config.oc_block // vec) // config.threads)
    return steps_in, steps_w


def phase_steps(config=None) -> dict:
    """``{phase: (kind, per_step)}`` for the audit (``dcn.audit.normalise_steps``): a staging
    step stores one vector to shared memory; a pointwise step is one rank-1 update, RO*RP
    FFMAs (however the compiler unrolled them)."""
    cfg = config or SIMULATOR_CONFIG
    return {"stage_input": ("sts", 1), "stage_input_partial": ("sts", 1), "stage_weights": ("sts", 1), "pointwise": ("ffma", cfg.reg_oc * cfg.reg_px)}


def phase_model(shape, config: StripConfig | None = None) -> dict:
    """Per phase, ``(body iterations, straight-line executions)`` per thread over the launch
    (the audit's convention): *stage_input*, *stage_weights*: ``staging_steps`` vectors per
    chunk (``phase_steps`` finds one in the SASS); *pointwise*: one rank-1 update per
    input channel of my group's part of each chunk (``CC/KS``); *stencil*: written out (no
    loop: its code sits in the chunk loop, so the audit reads it as that loop's body), once,
    in the chunk that holds my channels, by one group of ``KS`` (so ``1/KS`` per thread);
    prologue, *combine* (``KS > 1``) and epilogue once. The last two run in group 0 alone
    (the combine's stores in the others) while the other groups' warps are done: charged in
    full to every thread, since an issue slot left idle is not saved."""
    cfg = config or SIMULATOR_CONFIG
    get = shape.get if isinstance(shape, dict) else (lambda k, d=None: getattr(shape, k, d))
    from types import SimpleNamespace

    g = SimpleNamespace(height=int(get("height", 8)), width=int(get("width", 8)), dtype=get("dtype", "float32"))
    chunks = math.ceil(int(get("channels")) / cfg.chunk)
    partial = 1 if int(get("channels")) % cfg.chunk else 0
    full = chunks - partial
    steps_in, steps_w = staging_steps(g, cfg)
    return {
        "prologue": 0,
        "stage_input": (full * steps_in, full),
        "stage_input_partial": (partial * steps_in, partial),
        "stage_weights": (chunks * steps_w, chunks),
        "pointwise": (chunks * cfg.chunk // cfg.ksplit, chunks),
        "stencil": (1 / cfg.ksplit, 1 / cfg.ksplit),
        "combine": 0,
        "epilogue": 0,
    }


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``): the bench
    suite's layers at their audited picks (``AUDITED_PICKS``, float32), and the first of them
    in float64 at 8x4 outputs per thread (the compile check of the other dtype)."""
    from numba import types

    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a1 = types.Array(t, 1, "C")
        sig = (a1, a1, types.int32, a1, a1, a1, types.int32, types.int32)
        for i, ((n, c, h, w, _, taps), config) in enumerate(AUDITED_PICKS.items()):
            if dtype == "float64":
                if i:
                    break
                config = replace(config, reg_px=4, chunk=8)  # 8x4: two registers per accumulator; 48 KB
            yield (f"strip[{h}x{w}x{c}]", dtype, strip_kernel(dtype, taps, h, w, config, True), sig)
