"""The fused Tucker layer (``method="fused"``): three convolutions in one launch.

Motivation
----------
``three_pass`` writes the intermediate ``hidden_in [N, r_in, H, W]`` to device
memory and reads it back for the core convolution, then writes and re-reads
``hidden_out [N, r_out, Ho, Wo]`` for the last 1x1. At TDC's ResNet-18 layer1
shape that is ~2x the bytes of the layer's own input and output. Here a block
computes its slice of ``hidden_in`` while staging the core convolution's input
tile (the first 1x1 is a small GEMM in shared memory), and applies the last
1x1 to the core's accumulators in its epilogue. Only ``input`` and ``output``
touch device memory (plus the pre-packed factors, which every block re-reads
from L2). TDC's kernels do not fuse the 1x1s.

Blocked algorithm (one block = one image ``n``, one ``TH x TW`` output tile,
*all* ``r_out`` core ranks and *all* ``Cout`` outputs, so nothing is summed
across blocks and the result is deterministic)::

    core_acc[RO x RP] = 0
    for each chunk of CR input ranks:                      # the core's reduction
        first_acc[UR x UQ] = 0
        for each chunk of CX input channels:               # the first 1x1's reduction
            # phase: stage_input  staged_x [CX, SH*SW] (the tile's input region, zeros outside)
            # phase: stage_first  staged_first [CX, CR]    (pre-packed first factor)
            barrier
            # phase: first_gemm   first_acc += staged_first^T staged_x
            barrier
        # phase: store_hidden     staged_hidden [CR, SH rows] <- first_acc (rows padded or
        #                         slotted so each thread's row segment is aligned: hidden_rows)
        for each sub-chunk of CK of those ranks:
            # phase: stage_core   staged_core [CK*K, r_out] (each thread's RO ranks 16-byte
            #                     aligned where RO > 2: weight_pitch)
            barrier
            # phase: multiply     core_acc += core * staged_hidden (as kernels/core_conv.py)
            barrier (between sub-chunks)
    barrier
    # phase: store_core           staged_core_out [r_out, P] <- core_acc (each thread's RP
    #                             pixels 16-byte aligned where RP > 2: core_out_pitch)
    for each block of OB outputs:
        # phase: stage_last       staged_last [r_out, OB]
        barrier
        # phase: last_gemm        out = staged_last^T staged_core_out + bias -> device memory
        barrier

Zero padding commutes with the first 1x1 (no bias; ``first @ 0 = 0``), so
staging zeros outside the image for ``input`` is exactly the core's padding.

All shared buffers live in one flat aligned array at compile-time offsets; the
epilogue's buffers reuse the staging area (after a barrier). Thread ownership is
contiguous (``RO`` ranks, ``RP`` pixels of one tile row, ``UR`` ranks x ``UQ``
region positions in the first GEMM, ``EO`` outputs in the last), so the shared
loads can be 128-bit. Indices are 32-bit inside an image, 64-bit only for the
image bases.

Traffic of one launch (N images, C -> Cout, ranks R = r_in, Q = r_out, T tiles,
SH x SW the staged region of a tile, P = Ho*Wo, s = itemsize):
  reads   input   ceil(R/CR) * N * T * C * SH*SW * s  (halo re-reads and the
                  re-reads per rank chunk hit L2; the minimum is N*C*H*W*s)
          factors N * T * (|first| + |core| + |last|) padded * s  (L2 hits)
  writes  output  N * Cout * P * s once; nothing else.
  FLOPs   2*N*T*R*C*SH*SW (first, on the staged region incl. halo)
          + 2*N*Q*R*K*P (core) + 2*N*Cout*Q*P (last).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...runtime.addresses import element_address, read_at
from ...runtime.backend import cuda
from ...runtime.vector import load_vector, slice_vector_width, vector_width

uint32 = np.uint32  # the 32-bit index type inside kernels (see the module docstring)

GRID_Z_LIMIT = 65535
STATIC_SHARED_LIMIT = 48 * 1024
MAX_THREADS = 1024


def _round4(n: int) -> int:
    return -(-n // 4) * 4


@dataclass(frozen=True)
class FusedTile:
    """Compile-time tile of the fused kernel.

    tile_h, tile_w: output pixels per block (TH x TW); rank_chunk: input ranks per
    step (CR); in_chunk: input channels staged per step of the first 1x1 (CX);
    reg_oc: core ranks per thread (RO); reg_px: pixels per thread (RP, contiguous in
    a tile row); out_reg: outputs per thread in the epilogue (EO); first_reg: ranks
    per thread in the first 1x1 (UR; falls back to rank_chunk when it does not fit);
    core_chunk: input ranks of core weights staged at a time (divides rank_chunk; 0 =
    all of it): a large rank_chunk feeds the first 1x1 a big GEMM while the staged
    core slice stays small; row_slots: where RP * SW is not a multiple of 4, each
    thread's row segment of the hidden tile in its own 16-byte-aligned slot
    (``hidden_rows``: more shared memory, vector loads in the multiply).
    threads = ceil(r_out / RO) * (TH*TW / RP): the layer's r_out sets the block size.
    """

    tile_h: int = 2
    tile_w: int = 4
    rank_chunk: int = 4
    in_chunk: int = 4
    reg_oc: int = 2
    reg_px: int = 2
    out_reg: int = 2
    first_reg: int = 2
    core_chunk: int = 0  # 0: the whole rank chunk
    row_slots: bool = False  # each thread's row segment of staged_hidden in its own slot (hidden_rows)

    @property
    def core_ranks(self) -> int:
        """Input ranks of core weights staged at a time (``core_chunk`` or ``rank_chunk``)."""
        return self.core_chunk or self.rank_chunk

    def __post_init__(self):
        for name in ("tile_h", "tile_w", "rank_chunk", "in_chunk", "reg_oc", "reg_px", "out_reg", "first_reg"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FusedTile.{name} must be >= 1, got {getattr(self, name)}")
        if self.tile_w % self.reg_px:
            raise ValueError(f"tile_w ({self.tile_w}) must be a multiple of reg_px ({self.reg_px})")
        if self.core_chunk < 0 or self.rank_chunk % self.core_ranks:
            raise ValueError(f"core_chunk ({self.core_chunk}) must divide rank_chunk ({self.rank_chunk})")

    def layout(self, g) -> "FusedLayout":
        return FusedLayout.of(self, g)


@dataclass(frozen=True)
class FusedLayout:
    """Everything the kernel derives from a tile and a layer (all compile-time ints)."""

    threads: int
    oc_threads: int      # ceil(r_out / RO)
    ranks_padded: int    # oc_threads * RO
    px_threads: int      # P / RP
    rows: int            # staged region SH
    cols: int            # staged region SW
    region: int          # SH*SW
    first_reg: int       # UR
    first_rank_threads: int  # CR / UR
    first_pos_threads: int   # threads / (CR / UR)
    first_pos: int       # UQ: region positions per thread
    region_padded: int   # first_pos_threads * UQ
    out_block: int       # OB = oc_threads * EO
    offsets: dict        # float offsets of the shared buffers
    shared_floats: int
    pitch: int           # floats per staged_hidden row (hidden_rows)
    segment: int         # floats from one thread's row segment to the next in a row (hidden_rows)
    hidden_region: int   # floats per staged_hidden rank: SH * pitch, rounded up to 4
    core_out_pixels: int  # floats per thread's pixels in a staged_core_out rank (core_out_pitch)
    weight_slot: int     # floats per thread's RO core weights of a tap in staged_core (weight_pitch)
    weights_padded: int  # floats per tap in staged_core: oc_threads * weight_slot

    @classmethod
    def of(cls, t: FusedTile, g) -> "FusedLayout":
        oc_threads = -(-g.rank_out // t.reg_oc)
        px_threads = t.tile_h * t.tile_w // t.reg_px
        threads = oc_threads * px_threads
        rows = (t.tile_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1
        cols = (t.tile_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1
        region = rows * cols
        ur = t.first_reg
        if t.rank_chunk % ur or threads % (t.rank_chunk // ur):
            ur = t.rank_chunk
        rank_threads = t.rank_chunk // ur
        pos_threads = threads // rank_threads
        uq = -(-region // pos_threads)
        region_padded = pos_threads * uq
        pitch, segment = hidden_rows(t, g, cols)
        hidden_region = _round4(rows * pitch) if pitch != cols else region
        ranks_padded = oc_threads * t.reg_oc
        weight_slot = weight_pitch(t)
        weights_padded = oc_threads * weight_slot
        out_block = oc_threads * t.out_reg
        pixels = t.tile_h * t.tile_w
        staging = {}
        at = 0
        for name, size in (("x", t.in_chunk * region_padded), ("first", t.in_chunk * t.rank_chunk),
                           ("hidden", t.rank_chunk * hidden_region),
                           ("core", t.core_ranks * g.taps * weights_padded)):
            staging[name] = at
            at += _round4(size)
        epilogue_at = 0
        core_out_pixels = core_out_pitch(t)
        for name, size in (("core_out", ranks_padded * px_threads * core_out_pixels),
                           ("last", ranks_padded * out_block)):
            staging[name] = epilogue_at
            epilogue_at += _round4(size)
        return cls(threads, oc_threads, ranks_padded, px_threads, rows, cols, region, ur, rank_threads,
                   pos_threads, uq, region_padded, out_block, staging, max(at, epilogue_at), pitch,
                   segment, hidden_region, core_out_pixels, weight_slot, weights_padded)

    def shared_bytes(self, g) -> int:
        return self.shared_floats * g.itemsize


def hidden_rows(t: FusedTile, g, cols: int) -> tuple[int, int]:
    """``(pitch, segment)``: floats per row of ``staged_hidden``, and from one thread's row
    segment to the next. In the core conv a thread reads ``SEG`` consecutive values of a row
    from column ``v * RP * SW``; they load as 128-bit vectors only if that start is 16-byte
    aligned. Three layouts (the staged input and the first 1x1 keep the dense ``SH * SW``
    region; only ``store_hidden`` and the multiply see these):

    * ``RP * SW`` a multiple of 4: rows padded to a multiple of 4 floats (``pitch``), segments
      ``RP * SW`` apart as in the dense row (``RP = 8``: LDS.128, LDS.128, LDS.64 instead of
      10 scalar LDS);
    * otherwise, with ``row_slots`` and where a segment holds at least 4 values: each of a
      row's ``TW / RP`` segments in its own slot of ``SEG`` rounded up to 4 floats, the columns
      two segments share stored in both (``RP = 7``, 3x3: 9 values in 12-float slots, LDS.128,
      LDS.128, LDS instead of 9 LDS; a 14-wide tile's rows take 24 floats, not 16);
    * else the dense row (``pitch = SW``)."""
    step = t.reg_px * g.stride_w
    seg = (t.reg_px - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1
    if step % 4 == 0:
        return _round4(cols), step
    if t.row_slots and seg >= 4:
        return (t.tile_w // t.reg_px) * _round4(seg), _round4(seg)
    return cols, step


def core_out_pitch(t: FusedTile) -> int:
    """Floats from one thread's pixels to the next in a rank of ``staged_core_out``. The last
    1x1 reads a thread's ``RP`` pixels of every rank; they load as 128-bit vectors only if they
    start 16-byte aligned. Where ``RP > 2`` is not a multiple of 4 each thread's pixels get a
    slot of ``RP`` rounded up to 4 (``RP = 7``: ``LDS.128``, ``LDS.64``, ``LDS`` instead of 7
    ``LDS``, 8/7 of the buffer); ``RP = 1, 2`` load as one scalar or ``LDS.64`` already, and
    padding would double or quadruple the buffer."""
    return _round4(t.reg_px) if t.reg_px > 2 else t.reg_px


def weight_pitch(t: FusedTile) -> int:
    """Floats from one thread's core weights of a tap to the next in ``staged_core``. The
    multiply reads a thread's ``RO`` weights of every tap; they load as 128-bit vectors only if
    they start 16-byte aligned. Where ``RO > 2`` is not a multiple of 4 each thread's weights get
    a slot of ``RO`` rounded up to 4, zero-padded (``RO = 6``: ``LDS.128 + LDS.64`` instead of
    three ``LDS.64``; 8/6 of the slice). ``RO = 6`` and ``5`` make blocks of exactly 4 warps at
    ResNet's 96 and 160 ranks: 16 x 8 = 128 threads for 8x7 tiles of 7-pixel rows, 32 x 4 for
    2x8 tiles of 4 pixels a thread."""
    return _round4(t.reg_oc) if t.reg_oc > 2 and t.reg_oc % 4 else t.reg_oc


def input_staging(lay: FusedLayout, in_chunk: int) -> tuple[int, int, int]:
    """``(lanes, channels, positions)`` of the input staging: ``lanes`` threads per staged
    position (``threads // region_padded`` where the block has at least twice as many threads
    as positions, else 1), each copying ``channels`` of the chunk's ``in_chunk`` channels at
    ``positions`` positions. One lane per position made a 2x8 tile of 320 threads (layer4,
    7x7) copy all 16 channels of its 40 positions on 40 threads: 16 elements per thread
    where 2 do with 8 lanes."""
    lanes = max(1, min(in_chunk, lay.threads // lay.region_padded))
    return lanes, -(-in_chunk // lanes), -(-lay.region_padded // lay.threads)


def fits(t: FusedTile, g) -> bool:
    """Static shared memory within 48 KB and at most 1024 threads."""
    lay = t.layout(g)
    return lay.threads <= MAX_THREADS and lay.shared_bytes(g) <= STATIC_SHARED_LIMIT


SIMULATOR_TILE = FusedTile(2, 4, 4, 4, 2, 2, 2, 2)
GPU_CANDIDATES = (
    FusedTile(8, 8, 32, 16, 4, 4, 8, 8, 4),
    FusedTile(4, 8, 16, 16, 4, 4, 8, 8, 4),
    FusedTile(8, 8, 8, 16, 4, 4, 8, 4),
    FusedTile(4, 8, 8, 16, 4, 4, 8, 4),
    FusedTile(4, 8, 4, 16, 8, 4, 8, 4),
    FusedTile(4, 4, 4, 8, 8, 4, 8, 4),
    FusedTile(2, 4, 4, 8, 8, 4, 8, 2),
    FusedTile(2, 4, 2, 4, 8, 2, 8, 2),
    FusedTile(1, 4, 1, 4, 8, 2, 8, 1),
    FusedTile(4, 4, 16, 16, 8, 4, 2, 8, 4),   # wide r_out (e.g. 160): small output blocks
    FusedTile(2, 4, 16, 16, 8, 2, 2, 8, 4),
)


def default_config(g) -> FusedTile | None:
    """The simulator's small tile; on the GPU the first of ``GPU_CANDIDATES`` that
    fits (the tuner in ``tucker.model`` ranks them instead); None if none fits."""
    from ... import backend

    candidates = (SIMULATOR_TILE, FusedTile(1, 2, 1, 2, 2, 2, 2, 1)) if backend.IS_SIMULATOR else GPU_CANDIDATES
    for t in candidates:
        if fits(t, g):
            return t
    return None


# --------------------------------------------------------------------------- packing
def pack_first(first, t: FusedTile, xp=np):
    """``first [R, C]`` -> flat ``[rank chunk][channel chunk][cx][cr]`` (zero-padded)."""
    r, c = first.shape
    cr, cx = t.rank_chunk, t.in_chunk
    nr, nc = -(-r // cr), -(-c // cx)
    padded = xp.zeros((nr * cr, nc * cx), dtype=first.dtype)
    padded[:r, :c] = first
    return xp.ascontiguousarray(padded.reshape(nr, cr, nc, cx).transpose(0, 2, 3, 1)).reshape(-1)


def pack_core(core, t: FusedTile, lay: FusedLayout, xp=np):
    """Dense ``core [Q, R, kh, kw]`` -> flat ``[core chunk][ck][ky][kx][oc thread][slot]`` (R padded
    to whole rank chunks; thread ``v``'s ranks ``v*RO ...`` in a slot of ``weight_slot`` floats,
    zeros past ``Q`` and past ``RO``: weight_pitch); core chunk ``i`` holds ranks ``i*CK ...``."""
    q, r, kh, kw = core.shape
    ck = t.core_ranks
    nr = -(-r // t.rank_chunk) * (t.rank_chunk // ck)
    ro, slot, threads = t.reg_oc, lay.weight_slot, lay.oc_threads
    padded = xp.zeros((threads, slot, nr * ck, kh, kw), dtype=core.dtype)
    dense = xp.zeros((lay.ranks_padded, nr * ck, kh, kw), dtype=core.dtype)
    dense[:q, :r] = core
    padded[:, :ro] = dense.reshape(threads, ro, nr * ck, kh, kw)
    return xp.ascontiguousarray(padded.reshape(lay.weights_padded, nr, ck, kh * kw).transpose(1, 2, 3, 0)).reshape(-1)


def pack_last(last, bias, lay: FusedLayout, xp=np):
    """``last [Cout, Q]`` -> flat ``[out block][a][o]`` and the bias padded to whole blocks."""
    c_out, q = last.shape
    ob = lay.out_block
    nb = -(-c_out // ob)
    padded = xp.zeros((nb * ob, lay.ranks_padded), dtype=last.dtype)
    padded[:c_out, :q] = last
    packed = xp.ascontiguousarray(padded.reshape(nb, ob, lay.ranks_padded).transpose(0, 2, 1)).reshape(-1)
    bias_padded = xp.zeros(nb * ob, dtype=last.dtype)
    if bias is not None:
        bias_padded[:c_out] = bias
    return packed, bias_padded


# --------------------------------------------------------------------------- the kernel
@functools.cache
def fused_kernel(dtype, in_channels, rank_in, rank_out, out_channels, kernel_h, kernel_w,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, t: FusedTile):
    """Kernel ``(input, packed_first, packed_core, packed_last, bias, out, height, width,
    out_h, out_w)``; grid ``(tiles, 1, images)``, ``layout.threads`` threads. input
    ``[n*C*H*W]`` and out ``[n*Cout*Ho*Wo]`` flat and C-contiguous; the packed factors
    from ``pack_first``/``pack_core``/``pack_last``; sizes are int32."""
    from types import SimpleNamespace

    g = SimpleNamespace(rank_out=rank_out, stride_h=stride_h, stride_w=stride_w, kernel_h=kernel_h,
                        kernel_w=kernel_w, dil_h=dil_h, dil_w=dil_w, taps=kernel_h * kernel_w)
    lay = FusedLayout.of(t, g)
    DT = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    ZERO = DT(0)
    U = np.uint32
    TH, TW, CR, CX = t.tile_h, t.tile_w, t.rank_chunk, t.in_chunk
    CK = t.core_ranks            # ranks of core weights staged at a time (divides CR)
    SUBS = CR // CK
    u_CK, u_SUBS = U(CK), U(SUBS)
    RO, RP, EO = t.reg_oc, t.reg_px, t.out_reg
    UR, UQ = lay.first_reg, lay.first_pos
    KH, KW, K = kernel_h, kernel_w, kernel_h * kernel_w
    SH, SW, DH, DW = stride_h, stride_w, dil_h, dil_w
    COLS, REGION, REGION_P = lay.cols, lay.region, lay.region_padded
    PITCH, HREGION = lay.pitch, lay.hidden_region  # staged_hidden's row and rank strides
    SEGMENT = lay.segment                          # from one thread's row segment to the next
    PADDED_ROWS = PITCH != COLS
    STEP = RP * SW                                 # segments' first columns in the dense row
    SLOTS = SEGMENT != STEP                        # each segment in its own slot (hidden_rows)
    P = TH * TW
    RPV = lay.core_out_pixels                      # a thread's pixels' slot in staged_core_out
    VP = lay.px_threads * RPV                      # staged_core_out's rank stride
    ROP, OB = lay.ranks_padded, lay.out_block
    ROPW, u_RW = lay.weights_padded, U(lay.weight_slot)  # staged_core's tap stride, a thread's slot
    SEG = (RP - 1) * SW + (KW - 1) * DW + 1
    SHARED_BY = -(-SEG // STEP)                    # at most this many segments hold a column
    X_OFF, F_OFF, H_OFF, K_OFF = (lay.offsets[k] for k in ("x", "first", "hidden", "core"))
    V_OFF, L_OFF = lay.offsets["core_out"], lay.offsets["last"]
    SMEM = lay.shared_floats
    RANK_CHUNKS = -(-rank_in // CR)
    IN_CHUNKS = -(-in_channels // CX)
    OUT_BLOCKS = -(-out_channels // OB)
    u_THREADS = U(lay.threads)
    u_F_SLICE, u_K_SLICE, u_L_SLICE = U(CX * CR), U(CK * K * ROPW), U(ROP * OB)
    u_REGION, u_REGION_P, u_COLS = U(REGION), U(REGION_P), U(COLS)
    u_PITCH, u_HREGION, u_SEGMENT, u_STEP, u_SEG = U(PITCH), U(HREGION), U(SEGMENT), U(STEP), U(SEG)
    LAST_SEGMENT = TW // RP - 1
    u_PX_T, u_ROW_T, u_TW, u_TH, u_RP, u_RO, u_EO = (U(lay.px_threads), U(TW // RP), U(TW), U(TH), U(RP),
                                                    U(RO), U(EO))
    u_SH, u_SW, u_CX, u_CR, u_UR, u_UQ = U(SH), U(SW), U(CX), U(CR), U(UR), U(UQ)
    u_Q_T = U(lay.first_pos_threads)
    u_C, u_COUT, u_OB, u_VP, u_RPV = U(in_channels), U(out_channels), U(OB), U(VP), U(RPV)
    u_RANK_CHUNKS, u_IN_CHUNKS, u_OUT_BLOCKS = U(RANK_CHUNKS), U(IN_CHUNKS), U(OUT_BLOCKS)
    u_KH, u_ROW_STEP, u_KW_ROP, u_ROP = U(KH), U(DH * PITCH), U(KW * ROPW), U(ROP)
    PAD_H, PAD_W = np.int32(pad_h), np.int32(pad_w)
    C_IN, C_OUT = in_channels, out_channels
    C_FULL = in_channels % CX == 0  # every channel chunk is whole: no channel test in the staging

    # The packed slices are copied in 16-byte vectors (LDG.128, STS.128) where a slice is a whole
    # number of them (the packed arrays are the array module's own, aligned; the shared offsets
    # are multiples of 4 floats): slice_vector_width
    VW = vector_width(DT)
    VEC_F, VEC_K, VEC_L = (slice_vector_width(n, DT) == VW for n in (CX * CR, CK * K * ROPW, ROP * OB))
    u_VW, u_VEC_STEP = U(VW), U(lay.threads * VW)
    # at most one step per thread: the copy loop ends after its first trip (compile time), so
    # the compiler emits a test, not a loop unrolled for trips that never come
    ONCE_F, ONCE_K, ONCE_L = (n <= lay.threads * slice_vector_width(n, DT) for n in (CX * CR, CK * K * ROPW, ROP * OB))

    CORE_ACC = RO * RP  # local-array sizes must be plain constants
    # the multiply loop's trip takes two staged ranks (its body written twice) where they pair up
    # and a rank's body is short (at most 256 FFMA: layer1's 4x7 outputs, 252; layer4's 8x1, 72);
    # at 8x7 outputs (504 FFMA) the trip's ~9 instructions are under 2% and pairing changed only
    # ptxas's schedule (+0.2-0.4% predicted)
    TWO_RANKS = CK % 2 == 0 and KH * KW * RO * RP <= 256
    RANKS_PER_TRIP = 2 if TWO_RANKS else 1
    THREADS = lay.threads
    # input staging: LANES threads per staged position split the chunk's CX channels (more
    # threads than positions: a 7x7 image's 2x8 tile stages 40 positions with 320 threads),
    # each copying CH_T channels of POS_T positions (input_staging)
    LANES, CH_T, POS_T = input_staging(lay, CX)
    u_LANES, u_LANE_THREADS = U(LANES), U(LANES * REGION_P)
    FIRST_ACC = UR * UQ
    OUT_ACC = EO * RP

    @cuda.jit
    def kernel(input, packed_first, packed_core, packed_last, bias, out, height, width, out_h, out_w):
        smem = cuda.shared.array(SMEM, dtype=DT, alignment=16)
        core_acc = cuda.local.array(CORE_ACC, dtype=DT)
        first_acc = cuda.local.array(FIRST_ACC, dtype=DT)
        out_acc = cuda.local.array(OUT_ACC, dtype=DT)
        a = cuda.local.array(RO, dtype=DT)
        b = cuda.local.array(UQ, dtype=DT)
        row = cuda.local.array(SEG, dtype=DT)
        offsets = cuda.local.array(POS_T, dtype=np.int32)
        handles = cuda.local.array(POS_T, dtype=np.uint64)

        tid = uint32(cuda.threadIdx.x)
        n = cuda.blockIdx.z
        height_u = uint32(height)
        width_u = uint32(width)
        plane_in = height_u * width_u
        plane_out = uint32(out_h) * uint32(out_w)
        image_in = np.int64(n) * np.int64(C_IN * np.int64(plane_in))      # 64-bit image bases
        image_in_u = np.uint64(image_in)
        image_out_u = np.uint64(np.int64(n) * np.int64(C_OUT * np.int64(plane_out)))
        tiles_x = U(U(uint32(out_w) + u_TW) - U(1)) // u_TW  # (32-bit: a multiply-high)
        tile_y = uint32(cuda.blockIdx.x) // tiles_x
        oy0 = tile_y * u_TH
        ox0 = (uint32(cuda.blockIdx.x) - tile_y * tiles_x) * u_TW
        iy0 = np.int32(oy0 * u_SH) - PAD_H  # first staged input row (may be negative)
        ix0 = np.int32(ox0 * u_SW) - PAD_W

        # core and epilogue ownership: RO ranks x RP pixels of one tile row
        oc_t = tid // u_PX_T
        px_t = tid - oc_t * u_PX_T
        u_row = px_t // u_ROW_T
        v0 = (px_t - u_row * u_ROW_T) * u_RP
        # (a multiple of 4 where the rows are padded or slotted: hidden_rows)
        if SLOTS:
            window = u_row * u_SH * u_PITCH + (px_t - u_row * u_ROW_T) * u_SEGMENT
        else:
            window = u_row * u_SH * u_PITCH + v0 * u_SW
        core_base = oc_t * u_RO
        # first-1x1 ownership: UR ranks x UQ region positions
        r_t = tid // u_Q_T
        q0 = (tid - r_t * u_Q_T) * u_UQ
        for i in range(RO * RP):
            core_acc[i] = ZERO
        # input staging ownership: lane `lane` of position `base` (tid itself when LANES = 1);
        # threads past LANES * REGION_P stage nothing
        lane = tid // u_REGION_P if LANES > 1 else U(0)
        base = U(tid - lane * u_REGION_P)
        stager = LANES == 1 or tid < u_LANE_THREADS
        # offsets[k]: in-image offset of staged position base + k*THREADS, or -1 (zero
        # padding, or one of the padded positions past the region)
        # (32-bit and unsigned: a row or column above or left of the image wraps to a huge
        # value, so one unsigned test per axis; a signed sum would be widened to 64 bits)
        for k in range(POS_T):
            pos = U(base + U(k * THREADS))
            rr = pos // u_COLS
            gy = U(U(iy0) + rr)
            gx = U(U(ix0) + U(pos - U(rr * u_COLS)))
            offsets[k] = -1
            if pos < u_REGION and gy < height_u and gx < width_u:
                offsets[k] = np.int32(U(gy * width_u) + gx)

        rank_chunk = U(0)
        while rank_chunk < u_RANK_CHUNKS:
            for i in range(UR * UQ):
                first_acc[i] = ZERO
            in_chunk = U(0)
            while in_chunk < u_IN_CHUNKS:
                c0 = in_chunk * u_CX
                # phase: stage_input
                # Each thread copies its own POS_T region positions (offsets computed once,
                # above) for CH_T of the CX channels (lane, lane + LANES, ...). As in
                # core_conv.py: one 64-bit handle per position, the channel's step a uniform
                # offset (read_at), an unconditional load and a select that zeroes padding and
                # missing channels, 32-bit sums wrapped in U, a 32-bit counter of compile-time
                # trips (so LLVM unrolls the loop). Where CX divides C every channel exists: no
                # channel test at all. (l1b: 6.2 -> 3.1 µs predicted, 91 -> 86 registers.)
                if stager:
                    # per position, a 64-bit handle to its element in this lane's first channel
                    # (clamped into the image where the chunk is partial; element 0 of the
                    # channel for padding): channel lane + j*LANES is j*LANES planes further
                    first_channel = U(c0 + lane)
                    if not C_FULL and first_channel >= u_C:
                        first_channel = U(u_C - U(1))
                    lane_at = image_in_u + np.uint64(U(first_channel * plane_in))
                    for k in range(POS_T):
                        # (a conditional is its own statement: docs/contributing.md, "One value per join")
                        at = U(offsets[k]) if offsets[k] >= 0 else U(0)
                        handles[k] = element_address(input, lane_at + np.uint64(at))
                    j = U(0)
                    while j < U(CH_T):
                        ch = U(lane + U(j * u_LANES))
                        if CX % LANES == 0 or ch < u_CX:
                            channel_in = U(c0 + ch)
                            channel_ok = C_FULL or channel_in < u_C
                            step = U(U(j * u_LANES) * plane_in) if channel_ok else U(0)
                            for k in range(POS_T):
                                pos = U(base + U(k * THREADS))
                                if (k + 1) * THREADS <= REGION_P or pos < u_REGION_P:
                                    value = read_at(input, handles[k], step)
                                    if not (channel_ok and offsets[k] >= 0):
                                        value = ZERO
                                    smem[U(U(U(X_OFF) + U(lane * U(REGION_P))) + pos) + int(j) * (LANES * REGION_P)] = value
                        j = U(j + U(1))
                # phase: stage_first
                # (unsigned indices: a signed one costs Numba's wraparound test per load)
                slice0 = np.uint64(U(rank_chunk * u_IN_CHUNKS + in_chunk)) * np.uint64(CX * CR)
                if VEC_F:
                    idx = U(tid * u_VW)
                    while idx < u_F_SLICE:
                        v = load_vector(packed_first, slice0 + np.uint64(idx))
                        for e in range(VW):
                            smem[U(U(F_OFF) + U(idx + U(e)))] = v[e]
                        idx = U(idx + u_VEC_STEP)
                        if ONCE_F:
                            break
                else:
                    idx = tid
                    while idx < u_F_SLICE:
                        smem[U(U(F_OFF) + idx)] = packed_first[slice0 + np.uint64(idx)]
                        idx = U(idx + u_THREADS)
                        if ONCE_F:
                            break
                cuda.syncthreads()  # staged input and first-factor slice complete before the GEMM

                # phase: first_gemm
                f_ptr = uint32(F_OFF) + r_t * u_UR   # staged_first index of (cx, first owned rank)
                x_ptr = uint32(X_OFF) + q0           # staged_x index of (cx, first owned position)
                cx = U(0)
                while cx < u_CX:
                    for j in range(UQ):
                        b[j] = smem[x_ptr + uint32(j)]
                    for i in range(UR):
                        fi = smem[f_ptr + uint32(i)]
                        for j in range(UQ):
                            first_acc[i * UQ + j] += fi * b[j]
                    f_ptr += u_CR
                    x_ptr += u_REGION_P
                    cx += U(1)
                cuda.syncthreads()  # every thread is done reading the staged input before it is restaged
                in_chunk += U(1)

            # phase: store_hidden
            # (region position q0 + j is row (q0 + j) // SW, column (q0 + j) % SW of the tile's
            # hidden rows, PITCH floats apart: hidden_rows)
            if SLOTS or PADDED_ROWS:
                h_rank = uint32(H_OFF) + r_t * u_UR * u_HREGION
                for j in range(UQ):
                    q = U(q0 + U(j))
                    if q < u_REGION:
                        q_row = q // u_COLS
                        col = U(q - U(q_row * u_COLS))
                        h_row = U(h_rank + U(q_row * u_PITCH))
                        if SLOTS:
                            # column c goes to the slot of every segment s holding it (s * STEP
                            # <= c < s * STEP + SEG): the last segment starting at or before c
                            # and up to SHARED_BY - 1 before it
                            s_hi = col // u_STEP
                            if s_hi > U(LAST_SEGMENT):
                                s_hi = U(LAST_SEGMENT)
                            for k in range(SHARED_BY):
                                if U(k) <= s_hi:
                                    s_k = U(s_hi - U(k))
                                    within = U(col - U(s_k * u_STEP))
                                    if within < u_SEG:
                                        h_at = U(h_row + U(U(s_k * u_SEGMENT) + within))
                                        for i in range(UR):  # (a 64-bit base: ranks at immediate offsets)
                                            smem[np.uint64(h_at) + np.uint64(i * HREGION)] = first_acc[i * UQ + j]
                        else:
                            for i in range(UR):
                                smem[np.uint64(U(h_row + col)) + np.uint64(i * HREGION)] = first_acc[i * UQ + j]
            else:
                for i in range(UR):
                    h0 = uint32(H_OFF) + (r_t * u_UR + uint32(i)) * u_REGION + q0
                    for j in range(UQ):
                        if q0 + uint32(j) < u_REGION:
                            smem[h0 + uint32(j)] = first_acc[i * UQ + j]
            x_channel = uint32(H_OFF) + window  # staged_hidden index of (cr, ky=0) for this thread
            sub = U(0)
            while sub < u_SUBS:  # the rank chunk's core weights, CK ranks at a time
                # phase: stage_core
                slice0 = np.uint64(U(rank_chunk * u_SUBS + sub)) * np.uint64(CK * K * ROPW)
                if VEC_K:
                    idx = U(tid * u_VW)
                    while idx < u_K_SLICE:
                        v = load_vector(packed_core, slice0 + np.uint64(idx))
                        for e in range(VW):
                            smem[U(U(K_OFF) + U(idx + U(e)))] = v[e]
                        idx = U(idx + u_VEC_STEP)
                        if ONCE_K:
                            break
                else:
                    idx = tid
                    while idx < u_K_SLICE:
                        smem[U(U(K_OFF) + idx)] = packed_core[slice0 + np.uint64(idx)]
                        idx = U(idx + u_THREADS)
                        if ONCE_K:
                            break
                cuda.syncthreads()  # hidden tile (first sub-chunk) and core slice complete

                # phase: multiply
                w_ptr = uint32(K_OFF) + oc_t * u_RW  # staged_core index of (cr, ky, kx=0, this thread's slot)
                cr = U(0)
                while cr < u_CK:
                    x_ptr = x_channel
                    ky = U(0)
                    while ky < u_KH:
                        for q in range(SEG):
                            row[q] = smem[x_ptr + uint32(q)]
                        for kx in range(KW):
                            for i in range(RO):
                                a[i] = smem[w_ptr + uint32(kx * ROPW + i)]
                            for j in range(RP):
                                x = row[j * SW + kx * DW]
                                for i in range(RO):
                                    core_acc[i * RP + j] += a[i] * x
                        x_ptr += u_ROW_STEP
                        w_ptr += u_KW_ROP
                        ky += U(1)
                    x_channel += u_HREGION
                    if TWO_RANKS:  # the next rank in the same trip (the trip's overhead paid once)
                        x_ptr = x_channel
                        ky = U(0)
                        while ky < u_KH:
                            for q in range(SEG):
                                row[q] = smem[x_ptr + uint32(q)]
                            for kx in range(KW):
                                for i in range(RO):
                                    a[i] = smem[w_ptr + uint32(kx * ROPW + i)]
                                for j in range(RP):
                                    x = row[j * SW + kx * DW]
                                    for i in range(RO):
                                        core_acc[i * RP + j] += a[i] * x
                            x_ptr += u_ROW_STEP
                            w_ptr += u_KW_ROP
                            ky += U(1)
                        x_channel += u_HREGION
                    cr += U(RANKS_PER_TRIP)
                sub += U(1)
                if sub < u_SUBS:
                    cuda.syncthreads()  # all reads of staged_core done before the next sub-chunk restages it
            # No barrier needed here for the next rank chunk: it first restages only
            # staged_x/staged_first, which the multiply does not read, and its own two
            # barriers come before staged_hidden/staged_core are overwritten.
            rank_chunk += U(1)
        cuda.syncthreads()  # the epilogue's buffers alias the staging area: all reads done

        # phase: store_core
        for i in range(RO):
            v_row = uint32(V_OFF) + (core_base + uint32(i)) * u_VP + px_t * u_RPV
            for j in range(RP):
                smem[v_row + uint32(j)] = core_acc[i * RP + j]
        oy = oy0 + u_row
        ox = ox0 + v0
        out_block = U(0)
        while out_block < u_OUT_BLOCKS:
            # phase: stage_last
            slice0 = np.uint64(out_block) * np.uint64(ROP * OB)
            if VEC_L:
                idx = U(tid * u_VW)
                while idx < u_L_SLICE:
                    v = load_vector(packed_last, slice0 + np.uint64(idx))
                    for e in range(VW):
                        smem[U(U(L_OFF) + U(idx + U(e)))] = v[e]
                    idx = U(idx + u_VEC_STEP)
                    if ONCE_L:
                        break
            else:
                idx = tid
                while idx < u_L_SLICE:
                    smem[U(U(L_OFF) + idx)] = packed_last[slice0 + np.uint64(idx)]
                    idx = U(idx + u_THREADS)
                    if ONCE_L:
                        break
            cuda.syncthreads()  # core outputs (first block) and last-factor slice complete

            # phase: last_gemm
            for i in range(EO * RP):
                out_acc[i] = ZERO
            l_ptr = uint32(L_OFF) + oc_t * u_EO   # staged_last index of (rank a, first owned output)
            v_ptr = uint32(V_OFF) + px_t * u_RPV  # staged_core_out index of (rank a, first owned pixel)
            rank = U(0)
            while rank < u_ROP:
                for j in range(RP):
                    row[j] = smem[v_ptr + uint32(j)]
                for i in range(EO):
                    li = smem[l_ptr + uint32(i)]
                    for j in range(RP):
                        out_acc[i * RP + j] += li * row[j]
                l_ptr += u_OB
                v_ptr += u_VP
                rank += U(1)
            # (unsigned indices and 32-bit tests: a signed 64-bit index cost a wraparound fix-up
            # and a 64-bit compare per store)
            if oy < uint32(out_h):
                for i in range(EO):
                    o = U(U(out_block * u_OB) + U(U(oc_t * u_EO) + U(i)))
                    if o < u_COUT:
                        bias_o = bias[o]
                        base = image_out_u + np.uint64(U(U(o * plane_out) + U(U(oy * uint32(out_w)) + ox)))
                        for j in range(RP):
                            if U(ox + U(j)) < uint32(out_w):
                                out[base + np.uint64(j)] = out_acc[i * RP + j] + bias_o
            cuda.syncthreads()  # everyone is done reading staged_last before it is restaged
            out_block += U(1)

    return kernel


def forward(g, t: FusedTile, x, first, core, last, bias, out, xp) -> None:
    """Fill ``out`` with the fused kernel. ``first [R, C]``, dense ``core [Q, R, kh, kw]``,
    ``last [Cout, Q]``, ``x`` contiguous ``[N, C, H, W]``."""
    from ... import backend

    lay = t.layout(g)
    kernel = fused_kernel(g.dtype, g.in_channels, g.rank_in, g.rank_out, g.out_channels, g.kernel_h,
                          g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, t)
    packed_first = pack_first(first, t, xp)
    packed_core = pack_core(core, t, lay, xp)
    packed_last, bias_padded = pack_last(last, bias, lay, xp)
    tiles = -(-g.out_h // t.tile_h) * -(-g.out_w // t.tile_w)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    per_in = g.in_channels * g.height * g.width
    per_out = g.out_channels * g.out_h * g.out_w
    for first_image in range(0, g.batch, GRID_Z_LIMIT):
        images = min(GRID_Z_LIMIT, g.batch - first_image)
        backend.launch(kernel, (tiles, 1, images), lay.threads,
                       flat_in[first_image * per_in:(first_image + images) * per_in],
                       packed_first, packed_core, packed_last, bias_padded,
                       flat_out[first_image * per_out:(first_image + images) * per_out],
                       np.int32(g.height), np.int32(g.width), np.int32(g.out_h), np.int32(g.out_w))


def phase_model(shape, config: FusedTile) -> dict[str, int]:
    """Iterations per thread of each phase's innermost loop body, for one block.

    ``shape``: a ``TuckerGeometry``. Staging phases count elements per thread;
    first_gemm counts staged channels (each: UQ + UR loads, UR*UQ FFMA); multiply
    counts (cr, ky) steps (each: SEG loads, KW*(RO loads + RO*RP FFMA));
    last_gemm counts core ranks per output block (each: RP + EO loads, EO*RP FFMA).
    """
    g, t = shape, config
    lay = t.layout(g)
    rank_chunks = -(-g.rank_in // t.rank_chunk)
    in_chunks = -(-g.in_channels // t.in_chunk)
    out_blocks = -(-g.out_channels // lay.out_block)
    th = lay.threads
    return {
        "stage_input": rank_chunks * in_chunks * -(-t.in_chunk * lay.region_padded // th),
        "stage_first": rank_chunks * in_chunks * -(-t.in_chunk * t.rank_chunk // th),
        "first_gemm": rank_chunks * in_chunks * t.in_chunk,
        "store_hidden": rank_chunks * lay.first_reg * lay.first_pos,
        "stage_core": rank_chunks * (t.rank_chunk // t.core_ranks) * -(-t.core_ranks * g.taps * lay.weights_padded // th),
        "multiply": rank_chunks * t.rank_chunk * g.kernel_h,
        "store_core": t.reg_oc * t.reg_px,
        "stage_last": out_blocks * -(-lay.ranks_padded * lay.out_block // th),
        "last_gemm": out_blocks * lay.ranks_padded,
    }


def sass_iterations(shape, config: FusedTile) -> dict[str, tuple]:
    """Per phase, ``(source steps of its innermost SASS loop, runs of its code outside that
    loop)`` per thread, for the SASS audit (``tucker/audit.py``). ``stage_input`` and
    ``store_hidden`` count stored elements (each thread's ``CH_T x POS_T`` per channel chunk,
    ``UR x UQ`` per rank chunk, guarded ones included) and ``phase_steps`` names them, so
    the audit divides their SASS loop by its shared stores: right whether the compiler
    unrolled the staging completely (its loop is then the enclosing chunk loop) or kept a
    loop of a few channels a pass (seen in the core conv). The copies of the packed slices
    (``stage_first``, ``stage_core``, ``stage_last``) count stored vectors (``slice_vector_width``).
    The other phases' innermost loops are ``phase_model``'s."""
    g, t = shape, config
    lay = t.layout(g)
    body = phase_model(g, t)
    rank_chunks = -(-g.rank_in // t.rank_chunk)
    steps = rank_chunks * -(-g.in_channels // t.in_chunk)
    out_blocks = -(-g.out_channels // lay.out_block)
    _, ch_t, pos_t = input_staging(lay, t.in_chunk)
    per_step = ch_t * pos_t  # CH_T x POS_T stores

    def copies(elements):  # vector stores per thread of one slice copy
        return -(-elements // (lay.threads * slice_vector_width(elements, g.dtype)))

    core_runs = rank_chunks * (t.rank_chunk // t.core_ranks)
    return {"prologue": (0, 1), "stage_input": (steps * per_step, steps),
            "stage_first": (steps * copies(t.in_chunk * t.rank_chunk), steps),
            "first_gemm": (body["first_gemm"], steps), "store_hidden": (body["store_hidden"], rank_chunks),
            "stage_core": (core_runs * copies(t.core_ranks * g.taps * lay.weights_padded), core_runs),
            "multiply": (body["multiply"], rank_chunks * t.rank_chunk), "store_core": (0, 1),
            "stage_last": (out_blocks * copies(lay.ranks_padded * lay.out_block), out_blocks),
            "last_gemm": (body["last_gemm"], out_blocks)}


def phase_steps(shape, config: FusedTile) -> dict[str, tuple]:
    """Per source step of ``phase_model``: what one step issues that SASS shows (``perf.sass.
    normalise_steps``): a staged element (one shared store) or a rank-1 update (FFMAs)."""
    g, t = shape, config
    lay = t.layout(g)
    return {"stage_input": ("sts", 1), "store_hidden": ("sts", 1),
            "stage_first": ("sts", 1), "stage_core": ("sts", 1), "stage_last": ("sts", 1),
            "first_gemm": ("ffma", lay.first_reg * lay.first_pos),
            "multiply": ("ffma", g.kernel_w * t.reg_oc * t.reg_px),
            "last_gemm": ("ffma", t.out_reg * t.reg_px)}


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``)."""
    from numba import types

    i32 = types.int32
    # (C, r_in, r_out, Cout, kh, kw, stride, pad, dil): TDC's ResNet-18 layer1 and layer4 Tucker layers
    shapes = {"l1_64-64-32-64": (64, 64, 32, 64, 3, 3, 1, 1, 1),
              "l4_512-192-160-512": (512, 192, 160, 512, 3, 3, 1, 1, 1)}
    from types import SimpleNamespace

    for dtype, tiles in (("float32", GPU_CANDIDATES), ("float64", (SIMULATOR_TILE,))):
        a = types.Array(getattr(types, dtype), 1, "C")
        for name, (c, r, q, co, kh, kw, s, p, d) in shapes.items():
            g = SimpleNamespace(rank_out=q, stride_h=s, stride_w=s, kernel_h=kh, kernel_w=kw, dil_h=d, dil_w=d,
                                taps=kh * kw, itemsize=np.dtype(dtype).itemsize)
            for t in [t for t in tiles if fits(t, g)][:2]:  # the first two tiles that fit the layer
                tag = (f"{t.tile_h}x{t.tile_w}cr{t.rank_chunk}ck{t.core_ranks}cx{t.in_chunk}r{t.reg_oc}x{t.reg_px}"
                       f"e{t.out_reg}u{t.first_reg}")
                yield (f"fused[{name},{tag}]", dtype,
                       fused_kernel(dtype, c, r, q, co, kh, kw, s, s, p, p, d, d, t),
                       (a, a, a, a, a, a, i32, i32, i32, i32))
