"""The fused Tucker layer with a Winograd core (``method="fused_winograd"``): one launch.

Motivation
----------
``fused`` (``kernels/fused.py``) keeps the hidden tensors out of device memory but computes
the core conv directly: on ResNet's 28x28 and smaller images its multiply loop runs at
85-92% FFMA and the layer still needs 1.7-3.5x its roofline floor (``docs/tucker-notes.md``).
``winograd`` (``kernels/winograd.py``) multiplies 2.25x fewer but writes and re-reads both
hidden tensors. This kernel does both: ``fused``'s design (one block = one image, one
``TH x TW`` output tile, *all* core ranks and all outputs, nothing summed across blocks, so
deterministic), with the core conv by F(2x2, 3x3) on the tile's ``TB = TH/2 * TW/2``
Winograd tiles. ``model.fused_bound(g, core="winograd")`` is the bound this design aims at.

Only for 3x3 cores at stride 1 and dilation 1 (any padding, batch, ranks): ``winograd.eligible``.

Blocked algorithm (threads = 16 positions x ``ceil(Q/RO)`` rank slots x ``TB/RT`` tile slots)::

    acc[RO x RT] = 0                    # one Winograd position a thread, RO ranks x RT tiles
    for each chunk of CR input ranks:
        first_acc[UR x UQ] = 0
        for each chunk of CX input channels:
            # phase: stage_input   staged_x [CX, region]  (the tile's (TH+2) x (TW+2) input, zeros outside;
            #                      each first-1x1 thread's UQ positions in a 16-byte slot)
            # phase: stage_first   staged_first [CX, CR]
            barrier
            # phase: first_gemm    first_acc += staged_first^T staged_x
            barrier
        # phase: store_hidden      hidden [CR, region] <- first_acc (zero where the core pads:
        #                          the first 1x1 of a zero is zero)
        barrier
        for each sub-chunk of CK of those ranks:
            # phase: transform     V[16][CK][TB] <- B^T d B of each rank's 4x4 patch of each tile
            # phase: stage_core    U[16][CK][Q slots] (pre-transformed G g G^T, pre-packed)
            barrier
            # phase: multiply      acc[i, j] += U[pos, c, o_i] * V[pos, c, t_j]
            barrier (between sub-chunks)
    barrier
    # phase: output_transform  in passes of EX of each thread's ranks: acc -> M[16][.][TB],
    #                          barrier, Y = A^T M A -> core_out [Q, TH*TW], barrier
    for each block of OB outputs:
        # phase: stage_last    staged_last [Q, OB]
        barrier
        # phase: last_gemm     out = staged_last^T core_out + bias -> device memory (EO outputs
        #                      x LP pixels of one tile row a thread)
        barrier

Only ``input`` and ``output`` touch device memory (plus the packed factors, which every
block re-reads from L2). Indices are 32-bit unsigned inside an image, 64-bit for the image
bases; shared indices of the hot loops are 64-bit bases plus constants (they fold into the
loads). The transforms only add and subtract (``G``'s halves are applied on the host).

Traffic and FLOPs of one launch (N images, T tiles an image, region SH*SW = (TH+2)(TW+2),
P = TH*TW, s = itemsize):
  reads   input   ceil(R/CR) * N * T * C * SH*SW * s  (the minimum is N*C*H*W*s; the rest hits L2)
  writes  output  N * Cout * Ho*Wo * s once.
  FLOPs   2*N*T*R*C*SH*SW (first 1x1 on the region) + 2*N*T*Q*R*16*TB (core)
          + 2*N*T*Cout*Q*P (last 1x1), plus the transforms' adds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...runtime.addresses import element_address, read_at
from ...runtime.backend import cuda
from ...runtime.vector import load_vector, slice_vector_width, vector_width
from . import fused, winograd
from .winograd import POSITIONS

GRID_Z_LIMIT = fused.GRID_Z_LIMIT
STATIC_SHARED_LIMIT = fused.STATIC_SHARED_LIMIT
MAX_THREADS = fused.MAX_THREADS


def _round4(n: int) -> int:
    return -(-n // 4) * 4


@dataclass(frozen=True)
class FusedWinogradTile:
    """Compile-time tile of the fused Winograd kernel.

    tile_h, tile_w: output pixels per block (TH x TW, both even: TH/2 x TW/2 Winograd tiles);
    rank_chunk: input ranks of the hidden tile computed per pass of the first 1x1 (CR);
    in_chunk: input channels staged per step of the first 1x1 (CX); first_reg: ranks per
    thread in the first 1x1 (UR; falls back to CR where it does not divide); core_chunk:
    ranks transformed and multiplied at a time (CK, divides CR; 0 = CR): the transformed
    core slice ``16 x CK x Q`` is the largest shared buffer; reg_oc, reg_tile: core ranks and
    Winograd tiles per thread in the multiply (RO, RT; RT divides TB); out_reg, out_px:
    outputs and pixels (of one tile row) per thread in the last 1x1 (EO, LP; LP divides TW).
    threads = 16 * ceil(r_out / RO) * (TB / RT): the layer's r_out sets the block size.
    """

    tile_h: int = 2
    tile_w: int = 2
    rank_chunk: int = 4
    in_chunk: int = 4
    first_reg: int = 2
    core_chunk: int = 0
    reg_oc: int = 2
    reg_tile: int = 1
    out_reg: int = 2
    out_px: int = 2

    def __post_init__(self):
        for name in ("tile_h", "tile_w", "rank_chunk", "in_chunk", "first_reg", "reg_oc", "reg_tile",
                     "out_reg", "out_px"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FusedWinogradTile.{name} must be >= 1, got {getattr(self, name)}")
        if self.tile_h % 2 or self.tile_w % 2:
            raise ValueError(f"FusedWinogradTile's tile sides must be even (2x2 Winograd tiles), "
                             f"got {self.tile_h}x{self.tile_w}")
        if self.tiles % self.reg_tile:
            raise ValueError(f"reg_tile ({self.reg_tile}) must divide the tile's {self.tiles} Winograd tiles")
        if self.tile_w % self.out_px:
            raise ValueError(f"out_px ({self.out_px}) must divide tile_w ({self.tile_w})")
        if self.core_chunk < 0 or self.rank_chunk % self.core_ranks:
            raise ValueError(f"core_chunk ({self.core_chunk}) must divide rank_chunk ({self.rank_chunk})")

    @property
    def tiles(self) -> int:
        """TB: 2x2 Winograd tiles of a block's output tile."""
        return (self.tile_h // 2) * (self.tile_w // 2)

    @property
    def core_ranks(self) -> int:
        """CK: input ranks transformed and multiplied at a time."""
        return self.core_chunk or self.rank_chunk

    @property
    def rank_slot(self) -> int:
        """Shared floats per thread's RO ranks in the staged core: RO, or RO rounded up to 4
        where RO > 2 is not a multiple of 4 (so each thread's ranks load as 128-bit vectors)."""
        return _round4(self.reg_oc) if self.reg_oc > 2 and self.reg_oc % 4 else self.reg_oc

    @property
    def tile_slot(self) -> int:
        """Shared floats per thread's RT tiles in V: as ``rank_slot`` (RT = 7: two LDS.128, not
        seven LDS)."""
        return _round4(self.reg_tile) if self.reg_tile > 2 and self.reg_tile % 4 else self.reg_tile

    @property
    def pixel_slot(self) -> int:
        """Shared floats per thread's LP pixels of a rank in ``core_out``: as ``rank_slot``."""
        return _round4(self.out_px) if self.out_px > 2 and self.out_px % 4 else self.out_px

    def layout(self, g) -> "Layout":
        return Layout.of(self, g)


@dataclass(frozen=True)
class Layout:
    """Everything the kernel derives from a tile and a layer (compile-time ints)."""

    threads: int
    oc_threads: int          # OT = ceil(Q / RO)
    ranks_padded: int        # OT * RO: core ranks in the block (zeros past Q)
    tile_threads: int        # TT = TB / RT
    rows: int                # staged region: TH + 2 rows
    cols: int                # TW + 2 columns
    region: int
    first_reg: int           # UR
    first_rank_threads: int  # CR / UR
    first_pos_threads: int
    first_pos: int           # UQ
    region_padded: int       # first_pos_threads * UQ: staged positions; hidden's rank stride
    padded_block: int        # OT * rank_slot: staged core floats per (position, rank)
    padded_tiles: int        # TT * tile_slot: V floats per (position, rank)
    out_block: int           # OB = out_threads * EO
    px_threads: int          # P / LP
    exchange_ranks: int      # EX: ranks per thread per output-transform pass
    offsets: dict
    shared_floats: int
    pos_slot: int            # floats per first-1x1 thread's UQ positions in staged_x (16-byte slots)
    region_slots: int        # first_pos_threads * pos_slot: staged_x's channel stride

    @classmethod
    def of(cls, t: FusedWinogradTile, g) -> "Layout":
        q = g.rank_out
        ot = -(-q // t.reg_oc)
        tt = t.tiles // t.reg_tile
        threads = POSITIONS * ot * tt
        rows, cols = t.tile_h + 2, t.tile_w + 2
        region = rows * cols
        ur = t.first_reg
        if t.rank_chunk % ur or threads % (t.rank_chunk // ur):
            ur = t.rank_chunk
        rank_threads = t.rank_chunk // ur
        pos_threads = threads // rank_threads
        uq = -(-region // pos_threads)
        region_padded = pos_threads * uq
        # each thread's UQ staged positions in a 16-byte slot (UQ = 3: one LDS.128, not three
        # LDS); hidden keeps the plain region order the transform reads
        pos_slot = _round4(uq) if uq > 2 and uq % 4 else uq
        region_slots = pos_threads * pos_slot
        obp = ot * t.rank_slot
        pixels = t.tile_h * t.tile_w
        px_threads = pixels // t.out_px
        out_threads = threads // px_threads if threads % px_threads == 0 else 0
        out_block = out_threads * t.out_reg
        ck = t.core_ranks
        staging, at = {}, 0
        for name, size in (("x", t.in_chunk * region_slots), ("first", t.in_chunk * t.rank_chunk),
                           ("hidden", t.rank_chunk * region_padded), ("v", POSITIONS * ck * tt * t.tile_slot),
                           ("u", POSITIONS * ck * obp)):
            staging[name] = at
            at += _round4(size)
        ranks_padded = ot * t.reg_oc
        core_out = _round4(ranks_padded * px_threads * t.pixel_slot)
        last = _round4(ranks_padded * out_block)
        # EX: the most of a thread's RO ranks a pass whose exchange buffer, beside core_out,
        # fits the staging area (at least one)
        ex = max(d for d in range(1, t.reg_oc + 1)
                 if t.reg_oc % d == 0 and (d == 1 or core_out + _round4(POSITIONS * ot * d * t.tiles) <= at))
        staging["core_out"] = 0
        staging["m"] = staging["last"] = core_out  # (the exchange and the last factor alias: a barrier apart)
        epilogue = core_out + max(_round4(POSITIONS * ot * ex * t.tiles), last)
        return cls(threads, ot, ranks_padded, tt, rows, cols, region, ur, rank_threads, pos_threads, uq,
                   region_padded, obp, tt * t.tile_slot, out_block, px_threads, ex, staging, max(at, epilogue),
                   pos_slot, region_slots)

    def shared_bytes(self, g) -> int:
        return self.shared_floats * g.itemsize


def check(t: FusedWinogradTile, g) -> None:
    """``ValueError`` unless the layer is ``winograd.eligible`` and the tile makes a block."""
    if not winograd.eligible(g):
        raise ValueError("method='fused_winograd' takes a 3x3 core with stride 1 and dilation 1, got "
                         f"{g.kernel_h}x{g.kernel_w}, stride ({g.stride_h}, {g.stride_w}), "
                         f"dilation ({g.dil_h}, {g.dil_w}): use method='fused' or 'three_pass'")
    lay = t.layout(g)
    if lay.out_block == 0:
        raise ValueError(f"the last 1x1's {lay.px_threads} pixel threads (tile {t.tile_h}x{t.tile_w}, "
                         f"out_px {t.out_px}) must divide the block's {lay.threads} threads")
    if lay.threads > MAX_THREADS:
        raise ValueError(f"FusedWinogradTile makes {lay.threads} threads a block at {g.rank_out} core ranks "
                         f"(at most {MAX_THREADS}): raise reg_oc or reg_tile")
    if lay.shared_bytes(g) > STATIC_SHARED_LIMIT:
        raise ValueError(f"FusedWinogradTile needs {lay.shared_bytes(g)} bytes of shared memory at these ranks "
                         f"(at most {STATIC_SHARED_LIMIT}): lower rank_chunk, core_chunk or in_chunk")


def fits(t: FusedWinogradTile, g) -> bool:
    """Whether ``check`` passes (the layer eligible, the block within the limits)."""
    try:
        check(t, g)
    except ValueError:
        return False
    return True


SIMULATOR_TILE = FusedWinogradTile(2, 2, 4, 4, 2, 0, 2, 1, 2, 2)
GPU_CANDIDATES = (
    FusedWinogradTile(4, 14, 32, 8, 8, 4, 8, 7, 4, 7),
    FusedWinogradTile(4, 8, 16, 8, 4, 4, 8, 4, 4, 4),
    FusedWinogradTile(2, 8, 16, 8, 4, 4, 8, 4, 4, 4),
    FusedWinogradTile(2, 4, 8, 4, 4, 4, 8, 2, 2, 4),
    FusedWinogradTile(2, 2, 8, 4, 4, 4, 8, 1, 2, 2),
)


def default_config(g, pick: FusedWinogradTile | None = None) -> FusedWinogradTile | None:
    """In the simulator the small tile; on the GPU ``pick`` (the audited one, which ``ops`` looks
    up in ``model.AUDITED_PICKS``) where it fits, else the first of ``GPU_CANDIDATES`` that fits;
    None if none fits."""
    from ... import backend

    if backend.IS_SIMULATOR:
        candidates = (SIMULATOR_TILE, FusedWinogradTile(2, 2, 2, 2, 1, 0, 1, 1, 1, 1))
    else:
        candidates = ((pick,) if pick is not None else ()) + GPU_CANDIDATES
    for t in candidates:
        if fits(t, g):
            return t
    return None


# --------------------------------------------------------------------------- packing
def pack_core(core, t: FusedWinogradTile, xp=np):
    """Dense ``core [Q, R, 3, 3]`` -> transformed (``U = G g G^T``) and flat
    ``[core chunk][pos][ck][rank thread][slot]`` (R padded to whole rank chunks, Q to whole
    rank threads, each thread's RO ranks in ``rank_slot`` floats): one contiguous
    ``16 * CK * padded_block`` slice per core chunk."""
    q, r, _, _ = core.shape
    ranks = -(-r // t.rank_chunk) * t.rank_chunk
    return winograd.pack_transformed(core, t.core_ranks, -(-q // t.reg_oc) * t.reg_oc, t.reg_oc, t.rank_slot,
                                     ranks, xp)



# --------------------------------------------------------------------------- the kernel
@functools.cache
def fused_winograd_kernel(dtype, in_channels, rank_in, rank_out, out_channels, pad_h, pad_w, t: FusedWinogradTile):
    """Kernel ``(input, packed_first, packed_core, packed_last, bias, out, height, width, out_h,
    out_w)``: grid ``(tiles, 1, images)``, ``layout.threads`` threads. input ``[n*C*H*W]`` and
    out ``[n*Cout*Ho*Wo]`` flat and C-contiguous; ``packed_first`` from ``fused.pack_first``,
    ``packed_core`` from ``pack_core``, ``packed_last`` and ``bias`` from ``fused.pack_last``
    with this layout; sizes are int32."""
    from types import SimpleNamespace

    g = SimpleNamespace(rank_out=rank_out, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, dil_h=1, dil_w=1)
    lay = Layout.of(t, g)
    DT = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    ZERO = DT(0)
    U = np.uint32
    TH, TW, CR, CX, CK = t.tile_h, t.tile_w, t.rank_chunk, t.in_chunk, t.core_ranks
    TB, TX = t.tiles, t.tile_w // 2
    RO, RT, EO, LP = t.reg_oc, t.reg_tile, t.out_reg, t.out_px
    UR, UQ = lay.first_reg, lay.first_pos
    OT, TT, EX = lay.oc_threads, lay.tile_threads, lay.exchange_ranks
    PASSES = RO // EX
    THREADS = lay.threads
    COLS, REGION, REGION_P = lay.cols, lay.region, lay.region_padded
    QSLOT, REGION_S = lay.pos_slot, lay.region_slots  # staged_x: a thread's UQ positions in a slot
    SLOT, OBP = t.rank_slot, lay.padded_block
    LPS = t.pixel_slot                  # a thread's LP pixels of core_out in a 16-byte slot
    ROW_P = (TW // LP) * LPS            # core_out floats a tile row
    PIX = TH * ROW_P                    # core_out floats a rank
    TSLOT, TBP = t.tile_slot, lay.padded_tiles  # a thread's RT tiles in a 16-byte slot; V's rank stride
    QP, OB = lay.ranks_padded, lay.out_block
    P = TH * TW
    X_OFF, F_OFF, H_OFF, V_OFF, U_OFF = (lay.offsets[k] for k in ("x", "first", "hidden", "v", "u"))
    C_OFF, M_OFF, L_OFF = lay.offsets["core_out"], lay.offsets["m"], lay.offsets["last"]
    SMEM = lay.shared_floats
    SUBS = CR // CK
    RANK_CHUNKS = -(-rank_in // CR)
    IN_CHUNKS = -(-in_channels // CX)
    OUT_BLOCKS = -(-out_channels // OB)
    CORE_SLICE = POSITIONS * CK * OBP
    ITEMS = CK * TB                       # (rank, tile) patches transformed per sub-chunk
    ITEMS_T = -(-ITEMS // THREADS)
    PAIRS = OT * EX * TB                  # (rank, tile) outputs per output-transform pass
    PAIRS_T = -(-PAIRS // THREADS)
    M_RANKS = OT * EX                     # ranks in the exchange buffer per pass
    PAD_H, PAD_W = np.int32(pad_h), np.int32(pad_w)
    C_IN, C_OUT = in_channels, out_channels
    C_FULL = in_channels % CX == 0
    u_THREADS, u_TB, u_TX, u_TT, u_OT, u_EX, u_COLS = (U(THREADS), U(TB), U(TX), U(TT), U(OT), U(EX), U(COLS))
    u_CX, u_CR, u_UR, u_UQ, u_CK, u_TW, u_TH, u_LP, u_EO = U(CX), U(CR), U(UR), U(UQ), U(CK), U(TW), U(TH), U(LP), U(EO)
    u_Q_T = U(lay.first_pos_threads)
    u_REGION, u_REGION_P = U(REGION), U(REGION_P)
    u_C, u_COUT, u_OB, u_QP, u_P = U(in_channels), U(out_channels), U(OB), U(QP), U(P)
    u_RANK_CHUNKS, u_IN_CHUNKS, u_OUT_BLOCKS, u_SUBS = U(RANK_CHUNKS), U(IN_CHUNKS), U(OUT_BLOCKS), U(SUBS)
    u_PX_T, u_ROW_T = U(lay.px_threads), U(TW // LP)
    # The packed slices are copied unrolled: each thread's REPS copies at immediate offsets
    # from one global and one shared index (a rolled `while` copy cost ~24 instructions a
    # vector here), in 16-byte vectors where a slice is a whole number of them, the last
    # copy guarded where partial.
    VW_F, VW_K, VW_L = (slice_vector_width(n, DT) for n in (CX * CR, CORE_SLICE, QP * OB))
    SLICE_F, SLICE_K, SLICE_L = CX * CR, CORE_SLICE, QP * OB
    SPAN_F, SPAN_K, SPAN_L = THREADS * VW_F, THREADS * VW_K, THREADS * VW_L
    REPS_F, REPS_K, REPS_L = -(-SLICE_F // SPAN_F), -(-SLICE_K // SPAN_K), -(-SLICE_L // SPAN_L)
    EXACT_F, EXACT_K, EXACT_L = SLICE_F % SPAN_F == 0, SLICE_K % SPAN_K == 0, SLICE_L % SPAN_L == 0
    DST_F, DST_K, DST_L = np.uint64(F_OFF), np.uint64(U_OFF), np.uint64(L_OFF)
    LANES, CH_T, POS_T = fused.input_staging(lay, CX)
    u_LANES, u_LANE_THREADS = U(LANES), U(LANES * REGION_P)
    ACC, FIRST_ACC, OUT_ACC = RO * RT, UR * UQ, EO * LP  # (local-array sizes must be plain constants)
    CH_STEP = 2 if CX % 2 == 0 else 1       # channels a trip of the first 1x1
    RANK_STEP = 2 if CK % 2 == 0 else 1     # ranks a trip of the multiply
    input_transform = winograd.input_transform_of(CK * TBP)
    output_transform = winograd.output_transform

    @cuda.jit
    def kernel(input, packed_first, packed_core, packed_last, bias, out, height, width, out_h, out_w):
        smem = cuda.shared.array(SMEM, dtype=DT, alignment=16)
        acc = cuda.local.array(ACC, dtype=DT)
        w = cuda.local.array(RO, dtype=DT)
        x = cuda.local.array(RT, dtype=DT)
        d = cuda.local.array(POSITIONS, dtype=DT)
        first_acc = cuda.local.array(FIRST_ACC, dtype=DT)
        b = cuda.local.array(UQ, dtype=DT)
        out_acc = cuda.local.array(OUT_ACC, dtype=DT)
        row = cuda.local.array(LP, dtype=DT)
        offsets = cuda.local.array(POS_T, dtype=np.int32)
        slots = cuda.local.array(POS_T, dtype=np.uint32)
        handles = cuda.local.array(POS_T, dtype=np.uint64)

        tid = U(cuda.threadIdx.x)
        n = cuda.blockIdx.z
        height_u = U(height)
        width_u = U(width)
        plane_in = U(height_u * width_u)
        plane_out = U(U(out_h) * U(out_w))
        image_in_u = np.uint64(np.int64(n) * np.int64(C_IN * np.int64(plane_in)))  # 64-bit image bases
        image_out_u = np.uint64(np.int64(n) * np.int64(C_OUT * np.int64(plane_out)))
        tiles_x = U(U(U(out_w) + u_TW) - U(1)) // u_TW
        tile_y = U(cuda.blockIdx.x) // tiles_x
        oy0 = U(tile_y * u_TH)
        ox0 = U(U(U(cuda.blockIdx.x) - U(tile_y * tiles_x)) * u_TW)
        iy0 = np.int32(oy0) - PAD_H  # first staged input row (may be negative)
        ix0 = np.int32(ox0) - PAD_W

        # first-1x1 ownership: UR ranks x UQ region positions
        r_t = tid // u_Q_T
        q_t = U(tid - U(r_t * u_Q_T))
        q0 = U(q_t * u_UQ)                # first owned region position (hidden's order)
        x0 = U(q_t * U(QSLOT))            # its slot in staged_x
        # input staging ownership (fused.input_staging): lane `lane` of position `base`
        lane = tid // u_REGION_P if LANES > 1 else U(0)
        base = U(tid - U(lane * u_REGION_P))
        stager = LANES == 1 or tid < u_LANE_THREADS
        # offsets[k]: in-image offset of staged position base + k*THREADS, or -1 (zero padding
        # or a padded position past the region); unsigned: one test per axis
        for k in range(POS_T):
            pos = U(base + U(k * THREADS))
            rr = pos // u_COLS
            gy = U(U(iy0) + rr)
            gx = U(U(ix0) + U(pos - U(rr * u_COLS)))
            offsets[k] = -1
            if pos < u_REGION and gy < height_u and gx < width_u:
                offsets[k] = np.int32(U(gy * width_u) + gx)
            owner = pos // u_UQ
            slots[k] = U(U(owner * U(QSLOT)) + U(pos - U(owner * u_UQ)))  # pos's place in staged_x
        # multiply ownership: position pos, ranks ot*RO.., tiles tt*RT..
        tt = tid % u_TT
        rest_t = tid // u_TT
        ot = rest_t % u_OT
        pos = rest_t // u_OT
        v_base = U(U(V_OFF) + U(U(pos * U(CK * TBP)) + U(tt * U(TSLOT))))
        u_base = U(U(U_OFF) + U(U(pos * U(CK * OBP)) + U(ot * U(SLOT))))
        for i in range(RO * RT):
            acc[i] = ZERO

        rank_chunk = U(0)
        while rank_chunk < u_RANK_CHUNKS:
            for i in range(UR * UQ):
                first_acc[i] = ZERO
            in_chunk = U(0)
            while in_chunk < u_IN_CHUNKS:
                c0 = U(in_chunk * u_CX)
                # phase: stage_input
                # (as fused.py's: a 64-bit handle per position, the channel's step a 32-bit
                # offset, an unconditional load and a select that zeroes padding and missing
                # channels)
                if stager:
                    first_channel = U(c0 + lane)
                    if not C_FULL and first_channel >= u_C:
                        first_channel = U(u_C - U(1))
                    lane_at = image_in_u + np.uint64(U(first_channel * plane_in))
                    for k in range(POS_T):
                        at = U(offsets[k]) if offsets[k] >= 0 else U(0)
                        handles[k] = element_address(input, lane_at + np.uint64(at))
                    j = U(0)
                    while j < U(CH_T):
                        ch = U(lane + U(j * u_LANES))
                        if CX % LANES == 0 or ch < u_CX:
                            channel_ok = C_FULL or U(c0 + ch) < u_C
                            step = U(U(j * u_LANES) * plane_in) if channel_ok else U(0)
                            for k in range(POS_T):
                                p_k = U(base + U(k * THREADS))
                                if (k + 1) * THREADS <= REGION_P or p_k < u_REGION_P:
                                    value = read_at(input, handles[k], step)
                                    if not (channel_ok and offsets[k] >= 0):
                                        value = ZERO
                                    smem[U(U(U(X_OFF) + U(lane * U(REGION_S))) + slots[k]) + int(j) * (LANES * REGION_S)] = value
                        j = U(j + U(1))
                # phase: stage_first
                slice0 = np.uint64(U(rank_chunk * u_IN_CHUNKS + in_chunk)) * np.uint64(CX * CR)
                src = slice0 + np.uint64(U(tid * U(VW_F)))
                for r in range(REPS_F):
                    if EXACT_F or U(U(tid * U(VW_F)) + U(r * SPAN_F)) < U(SLICE_F):
                        if VW_F > 1:
                            v = load_vector(packed_first, src + np.uint64(r * SPAN_F))
                            for e in range(VW_F):
                                smem[DST_F + np.uint64(U(U(tid * U(VW_F)) + U(r * SPAN_F + e)))] = v[e]
                        else:
                            smem[DST_F + np.uint64(U(tid + U(r * SPAN_F)))] = packed_first[src + np.uint64(r * SPAN_F)]
                cuda.syncthreads()  # staged input and first-factor slice complete before the GEMM

                # phase: first_gemm
                # (two channels a trip where CX is even, the second written out: the trip's
                # bookkeeping paid once; a `for cx in range(CX)` was re-rolled by LLVM into a
                # loop with 64-bit counters, 25 integer instructions a trip)
                f_at = np.uint64(U(U(F_OFF) + U(r_t * u_UR)))  # staged_first index of (cx, first owned rank)
                x_at = np.uint64(U(U(X_OFF) + x0))             # staged_x index of (cx, first owned position)
                cx = U(0)
                while cx < u_CX:
                    for j in range(UQ):
                        b[j] = smem[x_at + np.uint64(j)]
                    for i in range(UR):
                        fi = smem[f_at + np.uint64(i)]
                        for j in range(UQ):
                            first_acc[i * UQ + j] += fi * b[j]
                    if CH_STEP == 2:
                        for j in range(UQ):
                            b[j] = smem[x_at + np.uint64(REGION_S + j)]
                        for i in range(UR):
                            fi = smem[f_at + np.uint64(CR + i)]
                            for j in range(UQ):
                                first_acc[i * UQ + j] += fi * b[j]
                    f_at += np.uint64(CH_STEP * CR)
                    x_at += np.uint64(CH_STEP * REGION_S)
                    cx = U(cx + U(CH_STEP))
                cuda.syncthreads()  # every thread is done reading the staged input before it is restaged
                in_chunk = U(in_chunk + U(1))

            # phase: store_hidden
            # hidden[rank][region position], rank stride REGION_P (padded positions hold zeros)
            h0 = np.uint64(U(U(H_OFF) + U(U(U(r_t * u_UR) * u_REGION_P) + q0)))
            for i in range(UR):
                for j in range(UQ):
                    smem[h0 + np.uint64(i * REGION_P + j)] = first_acc[i * UQ + j]
            cuda.syncthreads()  # the hidden tile of this rank chunk is complete before it is transformed

            sub = U(0)
            while sub < u_SUBS:
                # phase: transform
                # each item: one rank's 4x4 patch of one Winograd tile, read from the hidden
                # tile (zeros where the core pads), V = B^T d B (adds only) -> V[pos][c][t]
                for k in range(ITEMS_T):
                    item = U(tid + U(k * THREADS))
                    if (k + 1) * THREADS <= ITEMS or item < U(ITEMS):
                        c_local = item // u_TB
                        t_local = U(item - U(c_local * u_TB))
                        ty = t_local // u_TX
                        tx = U(t_local - U(ty * u_TX))
                        h_at = np.uint64(U(U(H_OFF) + U(U(U(U(sub * u_CK) + c_local) * u_REGION_P)
                                                         + U(U(U(ty * u_COLS) + tx) << U(1)))))
                        for a in range(4):
                            for e in range(4):
                                d[a * 4 + e] = smem[h_at + np.uint64(a * COLS + e)]
                        t_slot = t_local // U(RT)  # (V[pos][c][tile slot][tile]: tile_slot)
                        v_at = U(U(c_local * U(TBP)) + U(U(t_slot * U(TSLOT)) + U(t_local - U(t_slot * U(RT)))))
                        input_transform(smem, np.uint64(U(U(V_OFF) + v_at)), d)
                # phase: stage_core
                slice0 = np.uint64(U(U(rank_chunk * u_SUBS) + sub)) * np.uint64(CORE_SLICE)
                src = slice0 + np.uint64(U(tid * U(VW_K)))
                for r in range(REPS_K):
                    if EXACT_K or U(U(tid * U(VW_K)) + U(r * SPAN_K)) < U(SLICE_K):
                        if VW_K > 1:
                            v = load_vector(packed_core, src + np.uint64(r * SPAN_K))
                            for e in range(VW_K):
                                smem[DST_K + np.uint64(U(U(tid * U(VW_K)) + U(r * SPAN_K + e)))] = v[e]
                        else:
                            smem[DST_K + np.uint64(U(tid + U(r * SPAN_K)))] = packed_core[src + np.uint64(r * SPAN_K)]
                cuda.syncthreads()  # V and U of this sub-chunk are complete before anyone multiplies

                # phase: multiply
                # per input rank: RO contiguous U values and RT contiguous V values (128-bit
                # loads: both in 16-byte slots), RO x RT FFMAs; two ranks a trip where CK is even
                # (the second written out, as in the first 1x1)
                w_at = np.uint64(u_base)
                x_at = np.uint64(v_base)
                c = U(0)
                while c < u_CK:
                    for i in range(RO):
                        w[i] = smem[w_at + np.uint64(i)]
                    for j in range(RT):
                        x[j] = smem[x_at + np.uint64(j)]
                    for i in range(RO):
                        for j in range(RT):
                            acc[i * RT + j] += w[i] * x[j]
                    if RANK_STEP == 2:
                        for i in range(RO):
                            w[i] = smem[w_at + np.uint64(OBP + i)]
                        for j in range(RT):
                            x[j] = smem[x_at + np.uint64(TBP + j)]
                        for i in range(RO):
                            for j in range(RT):
                                acc[i * RT + j] += w[i] * x[j]
                    w_at += np.uint64(RANK_STEP * OBP)
                    x_at += np.uint64(RANK_STEP * TBP)
                    c = U(c + U(RANK_STEP))
                sub = U(sub + U(1))
                if sub < u_SUBS:
                    cuda.syncthreads()  # all reads of V and U done before the next sub-chunk rewrites them
            # No barrier here for the next rank chunk: it first restages staged_x/staged_first,
            # which the multiply does not read; its barriers come before hidden, V and U are rewritten.
            rank_chunk = U(rank_chunk + U(1))
        cuda.syncthreads()  # the epilogue's buffers alias the staging area: all reads done

        # phase: output_transform
        # in passes of EX ranks a thread: accumulators -> M[pos][ot*EX + e][tile]; then each
        # thread takes (rank, tile) pairs, Y = A^T M A, and stores the 2x2 outputs to
        # core_out[rank][pixel] (the tile's TH x TW pixels, row-major in slots: pixel_slot)
        m_store = np.uint64(U(U(M_OFF) + U(U(pos * U(M_RANKS * TB)) + U(U(U(ot * u_EX) * u_TB) + U(tt * U(RT))))))
        for h in range(PASSES):
            for e in range(EX):
                for j in range(RT):
                    smem[m_store + np.uint64(e * TB + j)] = acc[(h * EX + e) * RT + j]
            cuda.syncthreads()  # M of this pass is complete before the transform reads it
            for k in range(PAIRS_T):
                pair = U(tid + U(k * THREADS))
                if (k + 1) * THREADS <= PAIRS or pair < U(PAIRS):
                    ol = pair // u_TB
                    t_out = U(pair - U(ol * u_TB))
                    ty_out = t_out // u_TX
                    o = U(U(U(ol // u_EX) * U(RO)) + U(U(h * EX) + U(ol % u_EX)))
                    # its pixels' places in core_out: row r, column c at r * ROW_P + (c // LP) *
                    # LPS + c % LP (each thread's LP pixels of the last 1x1 in a 16-byte slot)
                    y_at = U(U(C_OFF) + U(U(o * U(PIX)) + U(U(ty_out << U(1)) * U(ROW_P))))
                    c0 = U(U(t_out - U(ty_out * u_TX)) << U(1))
                    c1 = U(c0 + U(1))
                    at0 = U(y_at + U(U(U(c0 // u_LP) * U(LPS)) + U(c0 % u_LP)))
                    at1 = U(y_at + U(U(U(c1 // u_LP) * U(LPS)) + U(c1 % u_LP)))
                    m_at = np.uint64(U(U(M_OFF) + pair))
                    for p in range(POSITIONS):
                        d[p] = smem[m_at + np.uint64(p * M_RANKS * TB)]
                    output_transform(smem, np.uint64(at0), np.uint64(at1), np.uint64(U(at0 + U(ROW_P))),
                                     np.uint64(U(at1 + U(ROW_P))), d)
            cuda.syncthreads()  # the transform is done reading M before it is rewritten (or the last slice staged)

        # last-1x1 ownership: EO outputs x LP pixels of one tile row
        lo_t = tid // u_PX_T
        px_t = U(tid - U(lo_t * u_PX_T))
        p_row = px_t // u_ROW_T
        p_col = U(U(px_t - U(p_row * u_ROW_T)) * u_LP)
        oy = U(oy0 + p_row)
        ox = U(ox0 + p_col)
        out_block = U(0)
        while out_block < u_OUT_BLOCKS:
            # phase: stage_last
            slice0 = np.uint64(out_block) * np.uint64(QP * OB)
            src = slice0 + np.uint64(U(tid * U(VW_L)))
            for r in range(REPS_L):
                if EXACT_L or U(U(tid * U(VW_L)) + U(r * SPAN_L)) < U(SLICE_L):
                    if VW_L > 1:
                        v = load_vector(packed_last, src + np.uint64(r * SPAN_L))
                        for e in range(VW_L):
                            smem[DST_L + np.uint64(U(U(tid * U(VW_L)) + U(r * SPAN_L + e)))] = v[e]
                    else:
                        smem[DST_L + np.uint64(U(tid + U(r * SPAN_L)))] = packed_last[src + np.uint64(r * SPAN_L)]
            cuda.syncthreads()  # core outputs (first block) and last-factor slice complete

            # phase: last_gemm
            for i in range(EO * LP):
                out_acc[i] = ZERO
            l_ptr = np.uint64(U(U(L_OFF) + U(lo_t * u_EO)))   # staged_last index of (rank a, first owned output)
            v_ptr = np.uint64(U(U(C_OFF) + U(px_t * U(LPS))))  # core_out index of (rank a, first owned pixel)
            rank = U(0)
            while rank < u_QP:
                for j in range(LP):
                    row[j] = smem[v_ptr + np.uint64(j)]
                for i in range(EO):
                    li = smem[l_ptr + np.uint64(i)]
                    for j in range(LP):
                        out_acc[i * LP + j] += li * row[j]
                l_ptr += np.uint64(OB)
                v_ptr += np.uint64(PIX)
                rank = U(rank + U(1))
            if oy < U(out_h):
                for i in range(EO):
                    o = U(U(out_block * u_OB) + U(U(lo_t * u_EO) + U(i)))
                    if o < u_COUT:
                        bias_o = bias[o]
                        at = image_out_u + np.uint64(U(U(o * plane_out) + U(U(oy * U(out_w)) + ox)))
                        for j in range(LP):
                            if U(ox + U(j)) < U(out_w):
                                out[at + np.uint64(j)] = out_acc[i * LP + j] + bias_o
            cuda.syncthreads()  # everyone is done reading staged_last before it is restaged
            out_block = U(out_block + U(1))

    return kernel


def forward(g, t: FusedWinogradTile, x, first, core, last, bias, out, xp) -> None:
    """Fill ``out`` with the fused Winograd kernel. ``first [R, C]``, dense ``core [Q, R, 3, 3]``,
    ``last [Cout, Q]``, ``x`` contiguous ``[N, C, H, W]``."""
    from ... import backend

    check(t, g)
    lay = t.layout(g)
    kernel = fused_winograd_kernel(g.dtype, g.in_channels, g.rank_in, g.rank_out, g.out_channels, g.pad_h,
                                   g.pad_w, t)
    packed_first = fused.pack_first(first, t, xp)
    packed_core = pack_core(core, t, xp)
    packed_last, bias_padded = fused.pack_last(last, bias, lay, xp)
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


def _counts(g, t: FusedWinogradTile) -> dict:
    lay = t.layout(g)
    rank_chunks = -(-g.rank_in // t.rank_chunk)
    return {"lay": lay, "rank_chunks": rank_chunks, "steps": rank_chunks * -(-g.in_channels // t.in_chunk),
            "subs": rank_chunks * (t.rank_chunk // t.core_ranks),
            "out_blocks": -(-g.out_channels // lay.out_block)}


def phase_model(shape, config: FusedWinogradTile) -> dict[str, int]:
    """Iterations per thread of each phase's innermost loop body, for one block: staging
    phases count stored elements (vectors for the packed slices), first_gemm staged channels
    (UQ + UR loads, UR*UQ FFMA each), transform patches, multiply input ranks (RO + RT loads,
    RO*RT FFMA), output_transform (rank, tile) outputs, last_gemm core ranks per output block
    (LP + EO loads, EO*LP FFMA)."""
    g, t = shape, config
    k = _counts(g, t)
    lay = k["lay"]
    _, ch_t, pos_t = fused.input_staging(lay, t.in_chunk)

    def copies(elements):
        return -(-elements // (lay.threads * slice_vector_width(elements, g.dtype)))

    return {"stage_input": k["steps"] * ch_t * pos_t,
            "stage_first": k["steps"] * copies(t.in_chunk * t.rank_chunk),
            "first_gemm": k["steps"] * t.in_chunk,
            "store_hidden": k["rank_chunks"] * lay.first_reg * lay.first_pos,
            "transform": k["subs"] * -(-t.core_ranks * t.tiles // lay.threads),
            "stage_core": k["subs"] * copies(POSITIONS * t.core_ranks * lay.padded_block),
            "multiply": k["subs"] * t.core_ranks,
            "output_transform": (t.reg_oc // lay.exchange_ranks)
            * -(-(lay.oc_threads * lay.exchange_ranks * t.tiles) // lay.threads),
            "stage_last": k["out_blocks"] * copies(lay.ranks_padded * lay.out_block),
            "last_gemm": k["out_blocks"] * lay.ranks_padded}


def sass_iterations(shape, config: FusedWinogradTile) -> dict[str, tuple]:
    """Per phase, ``(source steps of its innermost SASS loop, runs of its code outside that
    loop)`` per thread, for the SASS audit (``tucker/audit.py``): the staging phases and
    ``store_hidden`` and ``transform`` count shared stores (a transformed patch stores 16;
    the packed slices' copies count vectors), the GEMM-like phases their ``phase_model``
    steps; the output transform is straight code."""
    g, t = shape, config
    k = _counts(g, t)
    body = phase_model(g, t)
    return {"prologue": (0, 1), "stage_input": (body["stage_input"], k["steps"]),
            "stage_first": (body["stage_first"], k["steps"]), "first_gemm": (body["first_gemm"], k["steps"]),
            "store_hidden": (body["store_hidden"], k["rank_chunks"]),
            "transform": (POSITIONS * body["transform"], k["subs"]),
            "stage_core": (body["stage_core"], k["subs"]), "multiply": (body["multiply"], k["subs"]),
            "output_transform": (0, 1),
            "stage_last": (body["stage_last"], k["out_blocks"]), "last_gemm": (body["last_gemm"], k["out_blocks"])}


def phase_steps(shape, config: FusedWinogradTile) -> dict[str, tuple]:
    """Per source step of ``sass_iterations``, what SASS shows (``perf.sass.normalise_steps``)."""
    g, t = shape, config
    lay = t.layout(g)
    return {"stage_input": ("sts", 1), "stage_first": ("sts", 1), "store_hidden": ("sts", 1),
            "transform": ("sts", 1), "stage_core": ("sts", 1), "stage_last": ("sts", 1),
            "first_gemm": ("ffma", lay.first_reg * lay.first_pos),
            "multiply": ("ffma", t.reg_oc * t.reg_tile), "last_gemm": ("ffma", t.out_reg * t.out_px)}
