"""The Tucker core convolution by Winograd's minimal filtering, F(2x2, 3x3).

Motivation
----------
On ResNet's small images (layer3: 14x14, layer4: 7x7) the direct core conv
(``core_conv.py``) issues FFMAs at ~85% of its instructions and still needs
1.6-1.8x the core's FLOP time: what is left is arithmetic. Winograd's F(2x2, 3x3)
(Lavin & Gray, CVPR 2016; what cuDNN's ``WINOGRAD`` algorithms do) computes a 2x2
block of outputs of a 3x3 filter from a 4x4 input patch with 16 multiplies instead of
36: 2.25x fewer. For one output rank ``o`` and one 2x2 output tile::

    Y = A^T [ sum_c (G g[o,c] G^T) * (B^T d[c] B) ] A          (* elementwise, 4x4)

``U = G g G^T`` (4x4 per rank pair) is the core transformed once, on the host (or
device) side, by ``pack_core``; ``V = B^T d B`` is the input patch transformed while it
is staged; the sum over input ranks, for each of the 16 positions, is a small matrix
product ``M[pos] = U[pos] (OB x R) @ V[pos] (R x tiles)``: a GEMM-shaped loop of FFMAs,
and the only part that grows with ``R * Q``. The output transform ``A^T M A`` happens
once per output.

Only for 3x3 kernels, stride 1, dilation 1 (any padding, batch, ranks): ``eligible``.
The FLOPs are fewer than the direct convolution's: where this kernel's predicted time is
compared with the layer's roofline floor (direct FLOPs), the ratio can go below what a
direct kernel could reach; the audit labels it.

Blocked algorithm (one block = ``TB`` 2x2 output tiles, counted across the batch, and
``OB`` output ranks; threads = 16 positions x ``OB/RO`` x ``TB/RT``)::

    acc[RO x RT] = 0               # one Winograd position per thread, RO ranks x RT tiles
    for each chunk of CC input ranks (of this block's split):
        # phase: stage_input -> V[16][CC][TB] (each item: one 4x4 patch of one rank, transformed)
        # phase: stage_core  -> U[16][CC][OB] (pre-transformed and pre-packed, one contiguous slice)
        barrier
        # phase: multiply     acc[i, j] += U[pos, c, o_i] * V[pos, c, t_j]   (RO + RT loads, RO*RT FFMA)
        barrier
    # phase: epilogue: in passes of EX ranks a thread: accumulators -> shared M[16][.][TB],
    # barrier, each thread takes (rank, tile) pairs: Y = A^T M A, 2x2 outputs stored.

Rounding: the transforms add and subtract (no multiplies in the kernel; ``G``'s halves
are exact), so float32 results differ from the direct sum by a few units of the last
place of the magnitudes involved, as any other order of summation would.

Rank splits (``splits = S > 1``) work as ``core_conv``'s ("Rank splits" there): the S
blocks of a (tile block, rank block) each sum a contiguous slice of the chunks, store
their (linear, so already output-transformed) sums in ``partials[s]``, and the last to
arrive adds them in split order: bit-identical results run to run, no atomics on data.

Indices are 32-bit unsigned inside an image; image bases are 64-bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...runtime.addresses import element_address, read_at
from ...runtime.atomics import arrives_last
from ...runtime.backend import cuda
from ...runtime.vector import load_vector, slice_vector_width, vector_width

POSITIONS = 16  # the 4x4 Winograd domain of F(2x2, 3x3)


@dataclass(frozen=True)
class WinogradTile:
    """Compile-time tile of the Winograd core conv.

    tiles: 2x2 output tiles per block (TB, counted across images); oc_block: output ranks
    per block (OB); chunk: input ranks staged per step (CC); reg_oc, reg_tile: ranks and
    tiles per thread (RO, RT; a thread owns one of the 16 positions); splits: blocks that
    share one (tile block, rank block), each summing a slice of the chunks.
    threads = 16 * (oc_block // reg_oc) * (tiles // reg_tile).
    """

    tiles: int = 8
    oc_block: int = 8
    chunk: int = 2
    reg_oc: int = 2
    reg_tile: int = 2
    splits: int = 1

    def __post_init__(self):
        for name in ("tiles", "oc_block", "chunk", "reg_oc", "reg_tile", "splits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WinogradTile.{name} must be >= 1, got {getattr(self, name)}")
        if self.oc_block % self.reg_oc:
            raise ValueError(f"oc_block ({self.oc_block}) must be a multiple of reg_oc ({self.reg_oc})")
        if self.tiles % self.reg_tile:
            raise ValueError(f"tiles ({self.tiles}) must be a multiple of reg_tile ({self.reg_tile})")
        if self.threads % self.tiles:
            raise ValueError(f"threads ({self.threads}) must be a multiple of tiles ({self.tiles}): "
                             "each thread's output tile is fixed")
        if self.threads > 1024:
            raise ValueError(f"threads ({self.threads}) must be at most 1024")

    @property
    def threads(self) -> int:
        return POSITIONS * (self.oc_block // self.reg_oc) * (self.tiles // self.reg_tile)

    @property
    def exchange_ranks(self) -> int:
        """EX: accumulator rows (ranks) a thread hands to the output transform per pass, the
        most that fit the shared buffer the staging already needs (at least one)."""
        ot = self.oc_block // self.reg_oc
        room = max(self.staging_elements, POSITIONS * ot * self.tiles)
        return max(d for d in range(1, self.reg_oc + 1)
                   if self.reg_oc % d == 0 and POSITIONS * ot * d * self.tiles <= room)

    @property
    def rank_slot(self) -> int:
        """Shared slots per thread's RO ranks: RO rounded up to 4, so each thread's ranks start
        16-byte aligned and load as 128-bit vectors (RO = 10: two LDS.128 and an LDS.64, not
        five LDS.64)."""
        return -(-self.reg_oc // 4) * 4

    @property
    def padded_block(self) -> int:
        """Staged core values per (position, input rank): ``OB / RO`` threads' slots."""
        return (self.oc_block // self.reg_oc) * self.rank_slot

    @property
    def staging_elements(self) -> int:
        return POSITIONS * self.chunk * (self.tiles + self.padded_block)

    @property
    def buffer_elements(self) -> int:
        ot = self.oc_block // self.reg_oc
        return max(self.staging_elements, POSITIONS * ot * self.exchange_ranks * self.tiles)

    def shared_bytes(self, g) -> int:
        return g.itemsize * self.buffer_elements + 4

    def grid(self, g) -> tuple[int, int]:
        """``(tile blocks x splits, rank blocks)``."""
        return -(-output_tiles(g) // self.tiles) * self.splits, -(-g.rank_out // self.oc_block)

    def chunks_per_split(self, g) -> int:
        """Input-rank chunks the busiest block sums (``core_conv.CoreTile``'s rule)."""
        return -(-(-(-g.rank_in // self.chunk)) // self.splits)

    def check(self, g) -> None:
        """``ValueError`` unless the layer is ``eligible`` and every split has a chunk."""
        if not eligible(g):
            raise ValueError("the Winograd core conv takes 3x3 kernels, stride 1 and dilation 1, got "
                             f"{g.kernel_h}x{g.kernel_w}, stride ({g.stride_h}, {g.stride_w}), "
                             f"dilation ({g.dil_h}, {g.dil_w}): use method='three_pass' or 'fused'")
        chunks = -(-g.rank_in // self.chunk)
        if self.splits > chunks:
            raise ValueError(f"WinogradTile.splits ({self.splits}) must be at most the chunks of input ranks: "
                             f"{g.rank_in} ranks make {chunks} chunks of {self.chunk}")


def eligible(g) -> bool:
    """Whether the layer's core is what F(2x2, 3x3) computes: 3x3, stride 1, dilation 1."""
    return (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w) == (3, 3, 1, 1, 1, 1)


def output_tiles(g) -> int:
    """2x2 output tiles of the whole batch."""
    return g.batch * -(-g.out_h // 2) * -(-g.out_w // 2)


SIMULATOR_TILE = WinogradTile(tiles=4, oc_block=4, chunk=2, reg_oc=2, reg_tile=2)
GPU_TILE = WinogradTile(tiles=16, oc_block=32, chunk=8, reg_oc=8, reg_tile=8, splits=2)

# F(2x2, 3x3): B^T d B, G g G^T, A^T m A (Lavin & Gray's matrices)
FILTER_TRANSFORM = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def pack_core(dense_core, config: WinogradTile, xp=np):
    """The core ``[Q, R, 3, 3]`` transformed (``U = G g G^T``, 4x4 per rank pair) and laid out
    as the kernel stages it, flat: ``[rank block][chunk][pos][cc][o]`` with ``o`` fastest
    (zero-padded to whole blocks and chunks, and each thread's ``RO`` ranks to ``rank_slot``):
    one contiguous ``16*CC*padded_block`` slice per chunk."""
    return pack_transformed(dense_core, config.chunk, config.oc_block, config.reg_oc, config.rank_slot, xp=xp)


def pack_transformed(dense_core, chunk, oc_block, reg_oc, slot, ranks=None, xp=np):
    """``pack_core``'s layout for any kernel with a Winograd core (``fused_winograd`` too):
    ``[rank block of oc_block][chunk][pos][cc][rank thread][slot]``, input ranks padded to
    ``ranks`` (default: whole chunks), each thread's ``reg_oc`` ranks in ``slot`` floats."""
    q, r, kh, kw = dense_core.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"core must be [r_out, r_in, 3, 3] for a Winograd core conv, got {tuple(dense_core.shape)}")
    cc, ocb = chunk, oc_block
    ranks = ranks or -(-r // cc) * cc
    nb, nc = -(-q // ocb), ranks // cc
    gt = xp.asarray(FILTER_TRANSFORM, dtype=dense_core.dtype)
    u = xp.einsum("ak,qrkl,bl->abqr", gt, dense_core, gt).reshape(POSITIONS, q, r)
    padded = xp.zeros((POSITIONS, nb * ocb, nc * cc), dtype=dense_core.dtype)
    padded[:, :q, :r] = u
    # [16, nb, OT, RO, nc, cc] -> [nb, nc, 16, cc, OT, RO], then each RO padded to its slot
    ot, ro = ocb // reg_oc, reg_oc
    packed = padded.reshape(POSITIONS, nb, ot, ro, nc, cc).transpose(1, 4, 0, 5, 2, 3)
    slots = xp.zeros((nb, nc, POSITIONS, cc, ot, slot), dtype=dense_core.dtype)
    slots[..., :ro] = packed
    return slots.reshape(-1)


@functools.cache
def input_transform_of(stride: int):
    """Device function ``input_transform(buf, at, d)``: ``V = B^T d B`` of the 4x4 patch ``d``
    (row-major; overwritten), adds only, position ``p`` of V stored at ``buf[at + p*stride]``."""

    @cuda.jit(device=True, inline=True)
    def input_transform(buf, at, d):
        for j in range(4):  # B^T d: the rows
            r0 = d[j] - d[8 + j]
            r1 = d[4 + j] + d[8 + j]
            r2 = d[8 + j] - d[4 + j]
            r3 = d[4 + j] - d[12 + j]
            d[j] = r0
            d[4 + j] = r1
            d[8 + j] = r2
            d[12 + j] = r3
        for i in range(4):  # (B^T d) B: the columns, stored
            buf[at + np.uint64((4 * i + 0) * stride)] = d[4 * i] - d[4 * i + 2]
            buf[at + np.uint64((4 * i + 1) * stride)] = d[4 * i + 1] + d[4 * i + 2]
            buf[at + np.uint64((4 * i + 2) * stride)] = d[4 * i + 2] - d[4 * i + 1]
            buf[at + np.uint64((4 * i + 3) * stride)] = d[4 * i + 1] - d[4 * i + 3]

    return input_transform


@cuda.jit(device=True, inline=True)
def output_transform(buf, y00, y01, y10, y11, d):
    """``Y = A^T M A`` of the 4x4 sums ``d`` (row-major), adds only; the 2x2 outputs stored at
    ``buf[y00]``, ``buf[y01]`` (its row), ``buf[y10]``, ``buf[y11]`` (the next row)."""
    s00 = d[0] + d[4] + d[8]
    s01 = d[1] + d[5] + d[9]
    s02 = d[2] + d[6] + d[10]
    s03 = d[3] + d[7] + d[11]
    s10 = d[4] - d[8] - d[12]
    s11 = d[5] - d[9] - d[13]
    s12 = d[6] - d[10] - d[14]
    s13 = d[7] - d[11] - d[15]
    buf[y00] = s00 + s01 + s02
    buf[y01] = s01 - s02 - s03
    buf[y10] = s10 + s11 + s12
    buf[y11] = s11 - s12 - s13


@functools.cache
def winograd_kernel(dtype, rank_in, rank_out, pad_h, pad_w, config: WinogradTile):
    """Kernel ``(hidden, packed, out, partials, counters, height, width, out_h, out_w, tiles_total)``:
    grid ``config.grid(geometry)``, ``config.threads`` threads. hidden ``[n*R*H*W]``, packed
    from ``pack_core``, out ``[n*Q*Ho*Wo]`` (flat, C-contiguous); with ``splits = S > 1``,
    partials ``[S*n*Q*Ho*Wo]`` (any contents) and counters a zeroed ``uint32`` array of one
    counter per (tile block, rank block), else both unused; the sizes and ``tiles_total``
    (``output_tiles(geometry)``) are int32 scalars."""
    DT = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    ZERO = DT(0)
    U = np.uint32
    TB, OB, CC, RO, RT, S = (config.tiles, config.oc_block, config.chunk, config.reg_oc, config.reg_tile,
                             config.splits)
    OT, TT = OB // RO, TB // RT  # threads along ranks, along tiles (per position)
    THREADS = config.threads
    EX = config.exchange_ranks
    PASSES = RO // EX
    BUF = config.buffer_elements
    SLOT = config.rank_slot       # a thread's RO ranks padded to a 16-byte multiple
    OBP = config.padded_block     # staged core values per (position, rank): OT slots
    V_SIZE = POSITIONS * CC * TB  # V[16][CC][TB] at 0, U[16][CC][OT][SLOT] after it
    CORE_SLICE = POSITIONS * CC * OBP
    ITEMS = CC * TB               # (rank, tile) patches staged per chunk
    ITEMS_T = -(-ITEMS // THREADS)
    PAIRS = OT * EX * TB          # (rank, tile) outputs per epilogue pass
    PAIRS_T = -(-PAIRS // THREADS)
    CHUNKS = -(-rank_in // CC)
    R_FULL = rank_in % CC == 0
    u_R_IN, u_R_OUT = U(rank_in), U(rank_out)
    u_TB, u_OB, u_CC, u_CHUNKS, u_THREADS = U(TB), U(OB), U(CC), U(CHUNKS), U(THREADS)
    u_OT, u_TT, u_EX = U(OT), U(TT), U(EX)
    u_CORE_SLICE = U(CORE_SLICE)
    PAD_H, PAD_W = np.int32(pad_h), np.int32(pad_w)
    ACC = RO * RT
    STEP = 4 if CC % 4 == 0 else (2 if CC % 2 == 0 else 1)  # input ranks a trip of the multiply loop
    PATCH_OFFSETS = ITEMS_T * POSITIONS
    VW = vector_width(DT)
    VEC_CORE = slice_vector_width(CORE_SLICE, DT) == VW
    u_VEC_STEP = U(THREADS * VW)
    CORE_REPS = -(-CORE_SLICE // (THREADS * VW))     # vector copies per thread (the last may be partial)
    COPY_UNROLL = copy_unroll(CORE_REPS)
    CORE_EXACT = CORE_SLICE % (THREADS * VW) == 0

    @cuda.jit(device=True, inline=True)
    def rank_step(buf, w_at, x_at, w, x, acc):
        # one input rank: RO core values and RT transformed inputs, RO x RT FFMAs
        for i in range(RO):
            w[i] = buf[w_at + np.uint64(i)]
        for j in range(RT):
            x[j] = buf[x_at + np.uint64(j)]
        for i in range(RO):
            for j in range(RT):
                acc[i * RT + j] += w[i] * x[j]

    @cuda.jit(device=True, inline=True)
    def store_tile(target, at, out_w, row2, col2, y00, y01, y10, y11):
        # a 2x2 output tile at target[at]: its second column and row where the image has them
        target[at] = y00
        if col2:
            target[at + np.uint64(1)] = y01
        if row2:
            target[at + np.uint64(out_w)] = y10
            if col2:
                target[at + np.uint64(U(out_w + U(1)))] = y11

    @cuda.jit(device=True, inline=True)
    def add_splits(partials, out, at, out_size):
        # the S sums of one output, in split order
        total = partials[at]
        for s in range(1, S):
            total += partials[np.uint64(s) * out_size + at]
        out[at] = total

    @cuda.jit
    def kernel(hidden, packed, out, partials, counters, height, width, out_h, out_w, tiles_total):
        buf = cuda.shared.array(BUF, dtype=DT, alignment=16)
        last = cuda.shared.array(1, dtype=np.uint32)  # (rank splits only: 1 in the last block to finish)
        acc = cuda.local.array(ACC, dtype=DT)
        w = cuda.local.array(RO, dtype=DT)
        x = cuda.local.array(RT, dtype=DT)
        d = cuda.local.array(POSITIONS, dtype=DT)
        offsets = cuda.local.array(PATCH_OFFSETS, dtype=np.uint32)
        bases = cuda.local.array(ITEMS_T, dtype=np.uint64)
        masks = cuda.local.array(ITEMS_T, dtype=np.uint32)

        tid = U(cuda.threadIdx.x)
        height_u = U(height)
        width_u = U(width)
        out_h_u = U(out_h)
        out_w_u = U(out_w)
        total_u = U(tiles_total)
        plane_in = U(height_u * width_u)
        plane_out = U(out_h_u * out_w_u)
        tiles_x = U(U(out_w_u + U(1)) >> U(1))
        per_image = U(tiles_x * U(U(out_h_u + U(1)) >> U(1)))
        rank_block = U(cuda.blockIdx.y)
        tile_block = U(cuda.blockIdx.x) // U(S)  # (a compile-time divisor: a multiply-high)
        split = U(U(cuda.blockIdx.x) - U(tile_block * U(S)))
        first_tile = U(tile_block * u_TB)

        # Prologue: for each staged item of this thread (the same tile and rank slot every
        # chunk), the 64-bit image base, the 16 in-image offsets of its 4x4 patch (0 where
        # the position is zero padding, or the tile lies past the batch) and a mask of the
        # positions inside the image (bit e: position e). Unsigned wrap: a row or column above
        # or left of the image is a huge value, so one unsigned test per axis.
        for k in range(ITEMS_T):
            item = U(tid + U(k * THREADS))
            tile = U(first_tile + U(item % u_TB))
            n = tile // per_image
            rest = U(tile - U(n * per_image))
            ty = rest // tiles_x
            tx = U(rest - U(ty * tiles_x))
            inside = tile < total_u
            if not inside:
                n = U(0)
            bases[k] = np.uint64(n) * np.uint64(U(u_R_IN * plane_in))
            iy0 = U(U(ty << U(1)) - U(PAD_H))
            ix0 = U(U(tx << U(1)) - U(PAD_W))
            mask = U(0)
            for a in range(4):
                gy = U(iy0 + U(a))
                for b in range(4):
                    gx = U(ix0 + U(b))
                    offsets[k * POSITIONS + a * 4 + b] = U(0)
                    if inside and gy < height_u and gx < width_u:
                        offsets[k * POSITIONS + a * 4 + b] = U(U(gy * width_u) + gx)
                        mask = U(mask | U(1 << (a * 4 + b)))
            masks[k] = mask

        for i in range(ACC):
            acc[i] = ZERO
        # this thread's multiply slot: position pos, ranks ot*RO.., tiles tt*RT..
        tt = tid % u_TT
        rest_t = tid // u_TT
        ot = rest_t % u_OT
        pos = rest_t // u_OT
        v_base = U(U(pos * U(CC * TB)) + U(tt * U(RT)))
        u_base = U(U(V_SIZE) + U(U(pos * U(CC * OBP)) + U(ot * U(SLOT))))

        # Rank splits: split s sums chunks s*CHUNKS//S .. (s+1)*CHUNKS//S - 1
        chunk = U(0)
        chunk_end = u_CHUNKS
        if S > 1:
            chunk = U(U(split * u_CHUNKS) // U(S))
            chunk_end = U(U(U(split + U(1)) * u_CHUNKS) // U(S))
        while chunk < chunk_end:
            c0 = U(chunk * u_CC)
            # phase: stage_input
            # Each item: one input rank's 4x4 patch of one tile, loaded (zero outside the image
            # or past the last rank), transformed (V = B^T d B, adds only) and stored to
            # V[pos][c][t]. The loads are unconditional: padding reads the channel's element 0.
            # Per value: a 32-bit offset from the item's 64-bit handle (one IMAD.WIDE.U32; a
            # 64-bit index sum cost four instructions), the load, a mask bit test and a select.
            for k in range(ITEMS_T):
                item = U(tid + U(k * THREADS))
                if (k + 1) * THREADS <= ITEMS or item < U(ITEMS):
                    c_local = item // u_TB
                    t_local = U(item - U(c_local * u_TB))
                    rank = U(c0 + c_local)
                    channel_ok = R_FULL or rank < u_R_IN
                    step = U(rank * plane_in)
                    if not channel_ok:
                        step = U(0)  # (a missing rank: channel 0, zeroed below)
                    handle = element_address(hidden, bases[k] + np.uint64(step))
                    mask = masks[k]
                    for e in range(POSITIONS):
                        value = read_at(hidden, handle, offsets[k * POSITIONS + e])
                        if not (channel_ok and U(mask & U(1 << e)) != U(0)):
                            value = ZERO
                        d[e] = value
                    for j in range(4):  # B^T d: the rows
                        r0 = d[j] - d[8 + j]
                        r1 = d[4 + j] + d[8 + j]
                        r2 = d[8 + j] - d[4 + j]
                        r3 = d[4 + j] - d[12 + j]
                        d[j] = r0
                        d[4 + j] = r1
                        d[8 + j] = r2
                        d[12 + j] = r3
                    # (shared indices: a 64-bit base plus constants, which fold into the STS)
                    slot = np.uint64(U(U(c_local * u_TB) + t_local))
                    for i in range(4):  # (B^T d) B: the columns, stored
                        buf[slot + np.uint64((4 * i + 0) * CC * TB)] = d[4 * i] - d[4 * i + 2]
                        buf[slot + np.uint64((4 * i + 1) * CC * TB)] = d[4 * i + 1] + d[4 * i + 2]
                        buf[slot + np.uint64((4 * i + 2) * CC * TB)] = d[4 * i + 2] - d[4 * i + 1]
                        buf[slot + np.uint64((4 * i + 3) * CC * TB)] = d[4 * i + 1] - d[4 * i + 3]
            # phase: stage_core
            # one contiguous slice of the packed, transformed core, in 16-byte vectors where whole
            slice0 = np.uint64(U(rank_block * u_CHUNKS + chunk)) * np.uint64(CORE_SLICE)
            if VEC_CORE:
                # (a counted loop: a while loop on the index made NVVM emit a branch to a label
                # it never wrote, at 3 splits: ptxas "Unknown symbol")
                # (COPY_UNROLL vectors a pass at immediate offsets from one global and one shared
                # index: a vector cost ~9.5 instructions rolled)
                idx = U(tid * U(VW))
                rep = U(0)
                while rep < U(CORE_REPS):
                    at = slice0 + np.uint64(idx)
                    to = np.uint64(U(V_SIZE) + idx)
                    for r in range(COPY_UNROLL):
                        if CORE_EXACT or U(idx + U(r * THREADS * VW)) < u_CORE_SLICE:
                            v = load_vector(packed, at + np.uint64(r * THREADS * VW))
                            for q in range(VW):
                                buf[to + np.uint64(r * THREADS * VW + q)] = v[q]
                    idx = U(idx + U(COPY_UNROLL * THREADS * VW))
                    rep = U(rep + U(COPY_UNROLL))
            else:
                idx = tid
                while idx < u_CORE_SLICE:
                    buf[U(U(V_SIZE) + idx)] = packed[slice0 + np.uint64(idx)]
                    idx = U(idx + u_THREADS)
            cuda.syncthreads()  # V and U of this chunk are complete before anyone multiplies

            # phase: multiply
            # per input rank (rank_step): RO contiguous U values and RT contiguous V values
            # (128-bit loads), RO x RT FFMAs; STEP ranks a trip, written as calls of one device
            # function (a `for r in range(STEP)` stayed a loop with 64-bit bookkeeping, worse;
            # 4 ranks a trip: 75 -> 69.8 instructions a rank at 8x8, 92 -> 87 at 10x8).
            # (64-bit unsigned shared indices: the loads take immediate offsets from one
            # address; a 32-bit index sum cost an IADD3 + LEA per load)
            w_at = np.uint64(u_base)
            x_at = np.uint64(v_base)
            c = U(0)
            while c < u_CC:
                rank_step(buf, w_at, x_at, w, x, acc)
                if STEP >= 2:
                    rank_step(buf, w_at + np.uint64(OBP), x_at + np.uint64(TB), w, x, acc)
                if STEP == 4:
                    rank_step(buf, w_at + np.uint64(2 * OBP), x_at + np.uint64(2 * TB), w, x, acc)
                    rank_step(buf, w_at + np.uint64(3 * OBP), x_at + np.uint64(3 * TB), w, x, acc)
                w_at += np.uint64(STEP * OBP)
                x_at += np.uint64(STEP * TB)
                c = U(c + U(STEP))
            cuda.syncthreads()  # everyone is done reading V and U before the next chunk's staging
            chunk = U(chunk + U(1))

        # phase: epilogue
        # This thread's output tile, the same in every pass (threads is a multiple of TB).
        t_out = tid % u_TB
        tile = U(first_tile + t_out)
        tile_ok = tile < total_u
        n = tile // per_image
        rest = U(tile - U(n * per_image))
        ty = rest // tiles_x
        oy = U(ty << U(1))
        ox = U(U(rest - U(ty * tiles_x)) << U(1))
        row2 = U(oy + U(1)) < out_h_u
        col2 = U(ox + U(1)) < out_w_u
        image_out = np.uint64(n) * np.uint64(U(u_R_OUT * plane_out))
        pixel = U(U(oy * out_w_u) + ox)
        out_size = np.uint64(0)
        mine = np.uint64(0)
        if S > 1:
            out_size = np.uint64(total_u // per_image) * np.uint64(U(u_R_OUT * plane_out))  # one split's outputs
            mine = np.uint64(split) * out_size
        ol0 = tid // u_TB  # rank slot of this thread's first pair; pair k is k*THREADS/TB further
        m_store = np.uint64(U(U(pos * U(OT * EX * TB)) + U(U(U(ot * u_EX) * u_TB) + U(tt * U(RT)))))
        for h in range(PASSES):
            # accumulators of ranks h*EX .. h*EX+EX-1 -> M[pos][ot*EX + e][tile]
            for e in range(EX):
                for j in range(RT):
                    buf[m_store + np.uint64(e * TB + j)] = acc[(h * EX + e) * RT + j]
            cuda.syncthreads()  # M of this pass is complete before the output transform reads it
            for k in range(PAIRS_T):
                ol = U(ol0 + U(k * (THREADS // TB)))
                if (k + 1) * THREADS <= PAIRS or ol < U(OT * EX):
                    o = U(U(U(ol // u_EX) * U(RO)) + U(U(h * EX) + U(ol % u_EX)))
                    m_at = np.uint64(U(U(ol * u_TB) + t_out))
                    for p in range(POSITIONS):
                        d[p] = buf[m_at + np.uint64(p * OT * EX * TB)]
                    # Y = A^T M A (adds only)
                    s00 = d[0] + d[4] + d[8]
                    s01 = d[1] + d[5] + d[9]
                    s02 = d[2] + d[6] + d[10]
                    s03 = d[3] + d[7] + d[11]
                    s10 = d[4] - d[8] - d[12]
                    s11 = d[5] - d[9] - d[13]
                    s12 = d[6] - d[10] - d[14]
                    s13 = d[7] - d[11] - d[15]
                    if tile_ok and U(U(rank_block * u_OB) + o) < u_R_OUT:
                        at = image_out + np.uint64(U(U(U(U(rank_block * u_OB) + o) * plane_out) + pixel))
                        if S > 1:  # this split's sums, for the last split to add
                            store_tile(partials, at + mine, out_w_u, row2, col2, s00 + s01 + s02,
                                       s01 - s02 - s03, s10 + s11 + s12, s11 - s12 - s13)
                        else:
                            store_tile(out, at, out_w_u, row2, col2, s00 + s01 + s02,
                                       s01 - s02 - s03, s10 + s11 + s12, s11 - s12 - s13)
            cuda.syncthreads()  # the transform is done reading M before the next pass overwrites it

        if S > 1:
            # every split stored its sums in partials[split]; the last to arrive adds them
            cuda.threadfence()  # (release) this thread's sums reach the device before the count
            cuda.syncthreads()  # every thread has stored and fenced its sums
            if tid == U(0):
                counter = U(tile_block + U(U(U(cuda.gridDim.x) // U(S)) * rank_block))
                last[0] = U(0)
                if arrives_last(counters, counter, U(S)):  # (release, count, acquire: runtime.atomics)
                    last[0] = U(1)
            cuda.syncthreads()  # every thread reads whether its block is the last
            if last[0] == U(0):
                return
            # the S sums of each of this block's outputs, in split order
            for h in range(PASSES):
                for k in range(PAIRS_T):
                    ol = U(ol0 + U(k * (THREADS // TB)))
                    if (k + 1) * THREADS <= PAIRS or ol < U(OT * EX):
                        o = U(U(U(U(ol // u_EX) * U(RO)) + U(U(h * EX) + U(ol % u_EX))) + U(rank_block * u_OB))
                        if tile_ok and o < u_R_OUT:
                            at = image_out + np.uint64(U(U(o * plane_out) + pixel))
                            add_splits(partials, out, at, out_size)
                            if col2:
                                add_splits(partials, out, at + np.uint64(1), out_size)
                            if row2:
                                add_splits(partials, out, at + np.uint64(out_w_u), out_size)
                                if col2:
                                    add_splits(partials, out, at + np.uint64(U(out_w_u + U(1))), out_size)

    return kernel


def launch(geometry, config: WinogradTile, hidden_in, packed, hidden_out) -> None:
    """Run the Winograd core convolution: flat contiguous ``hidden_in [N*R*H*W]`` ->
    ``hidden_out [N*Q*Ho*Wo]`` (``packed`` from ``pack_core`` with the same ``config``)."""
    from ... import backend

    g = geometry
    config.check(g)
    total = output_tiles(g)
    if total >= 2 ** 31:
        raise ValueError(f"the Winograd core conv indexes tiles in 32 bits: {total} 2x2 tiles is too many; "
                         "split the batch")
    kernel = winograd_kernel(g.dtype, g.rank_in, g.rank_out, g.pad_h, g.pad_w, config)
    grid = config.grid(g)
    xp = backend.array_module(hidden_out)
    s = config.splits
    # rank splits: S partial outputs and one zeroed counter per (tile block, rank block)
    partials = xp.empty(s * hidden_out.size if s > 1 else 1, dtype=hidden_out.dtype)
    counters = xp.zeros(grid[0] // s * grid[1] if s > 1 else 1, dtype=np.uint32)
    backend.launch(kernel, grid, config.threads, hidden_in, packed, hidden_out, partials, counters,
                   np.int32(g.height), np.int32(g.width), np.int32(g.out_h), np.int32(g.out_w), np.int32(total))


def phase_model(shape, config: WinogradTile) -> dict[str, int]:
    """Iterations per thread of each phase's innermost loop body for one launch (a block of
    the busiest split): stage_input counts staged patches, stage_core stored vectors,
    multiply input ranks (each: RO + RT loads, RO*RT FFMA), epilogue (rank, tile) outputs."""
    g, t = shape, config
    chunks = t.chunks_per_split(g)
    vw = slice_vector_width(POSITIONS * t.chunk * t.padded_block, g.dtype)
    ot = t.oc_block // t.reg_oc
    return {
        "stage_input": chunks * -(-t.chunk * t.tiles // t.threads),
        "stage_core": chunks * -(-(POSITIONS * t.chunk * t.padded_block) // (t.threads * vw)),
        "multiply": chunks * t.chunk,
        "epilogue": (t.reg_oc // t.exchange_ranks) * -(-(ot * t.exchange_ranks * t.tiles) // t.threads),
    }


def sass_iterations(shape, config: WinogradTile) -> dict[str, tuple]:
    """Per phase, ``(source steps of its innermost SASS loop, runs of its code outside it)``
    per thread, for the SASS audit: stage_input counts stored values (16 a patch),
    stage_core stored vectors, multiply input ranks; the epilogue is straight code."""
    body = phase_model(shape, config)
    chunks = config.chunks_per_split(shape)
    return {"prologue": (0, 1), "stage_input": (POSITIONS * body["stage_input"], chunks),
            "stage_core": (body["stage_core"], chunks), "multiply": (body["multiply"], chunks),
            "epilogue": (0, 1)}


def phase_steps(shape, config: WinogradTile) -> dict[str, tuple]:
    """Per source step of ``sass_iterations``, what SASS shows (``perf.sass.normalise_steps``)."""
    return {"stage_input": ("sts", 1), "stage_core": ("sts", 1),
            "multiply": ("ffma", config.reg_oc * config.reg_tile)}


def copy_unroll(reps: int) -> int:
    """Vectors a pass of the core-slice copy: 4 or 2 where they divide the copies per thread."""
    return 4 if reps % 4 == 0 else (2 if reps % 2 == 0 else 1)


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``)."""
    from numba import types

    a1 = {d: types.Array(getattr(types, d), 1, "C") for d in ("float32", "float64")}
    u1 = types.Array(types.uint32, 1, "C")
    i32 = types.int32
    shapes = {"r160-160_pad1": (160, 160, 1), "r96-64_pad0": (96, 64, 0)}
    for dtype, tiles in (("float32", (GPU_TILE, WinogradTile(16, 40, 8, 10, 8))), ("float64", (SIMULATOR_TILE,))):
        a = a1[dtype]
        for name, (r, q, p) in shapes.items():
            for cfg in tiles:
                tag = f"t{cfg.tiles}o{cfg.oc_block}c{cfg.chunk}r{cfg.reg_oc}x{cfg.reg_tile}"
                tag += f"s{cfg.splits}" if cfg.splits > 1 else ""
                yield (f"winograd[{name},{tag}]", dtype, winograd_kernel(dtype, r, q, p, p, cfg),
                       (a, a, a, a, u1, i32, i32, i32, i32, i32))
