"""The Tucker *core* convolution ``r_in -> r_out`` (the middle pass of ``three_pass``).

Motivation
----------
After the first 1x1 convolution the layer's input has only ``r_in`` channels,
and the core convolution has only ``r_out`` outputs: a small-channel direct
convolution, exactly the case where cuDNN's GEMM-shaped algorithms waste work
(TDC's observation). TDC's kernel fixes 3x3, stride 1, pad 1 and batch 1, gives
each block one chunk of input channels and adds the chunks with ``atomicAdd``
(non-deterministic). This one takes any kernel size, stride, padding, dilation,
groups (through a block-diagonal dense core) and batch, and each block loops
over *all* input channels, so every output is summed in one fixed order:
bit-identical results run to run.

Blocked algorithm (one block = one image ``n``, a ``TH x TW`` tile of output
pixels, ``OCB`` output ranks)::

    acc[RO x RP] = 0                                   # registers of each thread
    for each chunk of CC input ranks:
        # phase: stage_input  -> staged [CC, SH, SW]  (zeros outside the image)
        # phase: stage_core   -> staged_core [CC*K, OCB] (pre-packed on the host)
        barrier
        # phase: multiply
        for cc, ky:  load the SEG staged values of the thread's row segment once
            for kx:  acc[i, j] += core[cc, ky, kx, oc_i] * row[j*sw + kx*dw]
        barrier
    # phase: epilogue -> out[n, oc, oy, ox]

Each thread owns ``RO`` *contiguous* output ranks (one ``LDS.128`` per 4 core
values) and ``RP`` *contiguous* pixels of one tile row. A row of
``SEG = (RP-1)*sw + (KW-1)*dw + 1`` staged values is loaded once per (cc, ky)
and reused by all ``KW`` taps of that row (a register sliding window).

Indices: 32-bit unsigned inside an image, 64-bit only for the image bases of
the flat input and output. Arrays are flat and C-contiguous.

Traffic of one launch (N images, R = r_in, Q = r_out, K = kh*kw taps, T tiles,
SH x SW the staged region, B = ceil(Q/OCB) rank blocks, s = itemsize):
  reads   hidden_in  B * N * T * ceil(R/CC)*CC * SH*SW * s   (halo re-reads hit L2)
          core       N * T * B * ceil(R/CC)*CC*K*OCB * s     (every block: L2 hits)
  writes  hidden_out N * Q * Ho*Wo * s once
  FLOPs   2 * N * Q * R * K * Ho*Wo (padded chunks and ranks compute zeros: counted
          in ``useful_fraction``)
The roofline module counts the minimal bytes (each tensor once): ``tucker.roofline``.

Rank splits (``splits = S > 1``)
--------------------------------
On small images the grid is too small for the GPU: at ResNet-18's layer4 (7x7, batch 32)
a tile of the whole image and 16 ranks per block makes 320 one-warp blocks for 132 SMs.
With ``S`` splits, ``S`` blocks share each output tile and each sums a contiguous slice
of the input-rank chunks (split-K): split ``s = blockIdx.x % S`` takes chunks
``s*CHUNKS//S .. (s+1)*CHUNKS//S - 1``. The sums meet in a fixed order, with no atomics
on the data:

* every split stores its sum in ``partials[s]`` (same flat index as the output), fences
  (release) and counts itself in the tile's counter (``cuda.atomic.add``, which returns
  how many came before);
* the block that arrives last (count ``S - 1``) reads the counter with an acquire load
  (``runtime.atomics.load_acquire``: the other splits' stores are visible and its SM's L1
  holds no stale copy), then adds ``partials[0] + partials[1] + ... + partials[S-1]``
  in split order and writes the output.

Whichever block arrives last, the additions and their order are the same, so the output
is bit-identical run to run. Nobody waits for anybody: no deadlock whatever the order
blocks run in, and the tail after the last split is one hand-off, not ``S`` in a row (a
ticket queue, where each split adds into the output in turn, would need no partials
but serialises ``S`` hand-offs of a few hundred nanoseconds each through L2). The price
is ``S`` partial outputs in device memory (``S x N x r_out x Ho x Wo``; 8 MB at layer4,
batch 32, ``S = 8``), mostly served by L2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...runtime.addresses import element_address, read_at
from ...runtime.atomics import arrives_last
from ...runtime.backend import cuda
from ...runtime.tiles import RegisterBlockedTile, staged_extent
from ...runtime.vector import load_vector, slice_vector_width, vector_width

uint32 = np.uint32  # the 32-bit index type inside kernels (see the module docstring)

GRID_Z_LIMIT = 65535


@dataclass(frozen=True)
class CoreTile(RegisterBlockedTile):
    """Compile-time tile of the core-conv kernel.

    tile_h, tile_w: output pixels per block; chunk: input ranks staged per step (CC);
    oc_block: output ranks per block (OCB); reg_oc: ranks per thread (RO, contiguous);
    reg_px: pixels per thread (RP, contiguous in one tile row; divides tile_w);
    splits: blocks that share one output tile (S), each summing a contiguous slice of the
    input-rank chunks; the last to finish adds their sums in split order (see the module
    docstring, "Rank splits"). threads = (oc_block // reg_oc) * (tile_h * tile_w // reg_px).
    """

    tile_h: int = 4
    tile_w: int = 4
    chunk: int = 2
    oc_block: int = 4
    reg_oc: int = 2
    reg_px: int = 2
    splits: int = 1

    def __post_init__(self):
        self.check_blocking("chunk", "splits")
        if self.tile_w % self.reg_px:
            raise ValueError(f"tile_w ({self.tile_w}) must be a multiple of reg_px ({self.reg_px})")

    def staged_shape(self, g) -> tuple[int, int]:
        """Rows and columns of the staged input region (the tile's footprint, no halo)."""
        return (staged_extent(self.tile_h, g.stride_h, g.kernel_h, g.dil_h),
                staged_extent(self.tile_w, g.stride_w, g.kernel_w, g.dil_w))

    def shared_bytes(self, g) -> int:
        rows, cols = self.staged_shape(g)
        staged = _round4(self.chunk * rows * cols)
        return g.itemsize * (staged + self.chunk * g.taps * self.oc_block)

    def blocks(self, g) -> tuple[int, int, int]:
        """The grid: ``(tiles x splits, rank blocks, images)``."""
        tiles = -(-g.out_h // self.tile_h) * -(-g.out_w // self.tile_w)
        return tiles * self.splits, -(-g.rank_out // self.oc_block), g.batch

    def chunks_per_split(self, g) -> int:
        """Input-rank chunks the busiest block sums: split ``s`` takes chunks
        ``s*chunks//splits .. (s+1)*chunks//splits - 1``, ``ceil(chunks / splits)`` at most."""
        return -(-(-(-g.rank_in // self.chunk)) // self.splits)

    def check_splits(self, g) -> None:
        """``ValueError`` unless every split has at least one chunk of input ranks."""
        chunks = -(-g.rank_in // self.chunk)
        if self.splits > chunks:
            raise ValueError(f"CoreTile.splits ({self.splits}) must be at most the chunks of input ranks: "
                             f"{g.rank_in} ranks make {chunks} chunks of {self.chunk}")


def _round4(n: int) -> int:
    return -(-n // 4) * 4


SIMULATOR_TILE = CoreTile(tile_h=2, tile_w=4, chunk=2, oc_block=4, reg_oc=2, reg_px=2)
GPU_TILE = CoreTile(tile_h=8, tile_w=8, chunk=4, oc_block=32, reg_oc=8, reg_px=4)


def pack_core(dense_core: np.ndarray, config: CoreTile, xp=np) -> np.ndarray:
    """The core ``[Q, R, kh, kw]`` in the order the kernel stages it, flat:
    ``[rank block][chunk][cc][ky][kx][o]`` with ``o`` fastest (zero-padded to whole
    blocks and chunks), so a block copies one contiguous ``CC*K*OCB`` slice per chunk."""
    q, r, kh, kw = dense_core.shape
    cc, ocb = config.chunk, config.oc_block
    nb, nc = -(-q // ocb), -(-r // cc)
    padded = xp.zeros((nb * ocb, nc * cc, kh, kw), dtype=dense_core.dtype)
    padded[:q, :r] = dense_core
    # [nb, ocb, nc, cc, kh, kw] -> [nb, nc, cc, kh, kw, ocb]
    packed = padded.reshape(nb, ocb, nc, cc, kh, kw).transpose(0, 2, 3, 4, 5, 1)
    return xp.ascontiguousarray(packed).reshape(-1)


@functools.cache
def core_conv_kernel(dtype, rank_in, rank_out, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                     dil_h, dil_w, config: CoreTile, whole_rows: bool = False):
    """Kernel ``(hidden, packed_core, out, partials, counters, height, width, out_h, out_w)``:
    grid ``config.blocks(geometry)`` (images in z, at most 65535 per launch), ``config.threads``
    threads. hidden ``[n*R*H*W]``, packed_core from ``pack_core``, out ``[n*Q*Ho*Wo]``
    (flat, C-contiguous); with ``config.splits = S > 1``, partials ``[S*n*Q*Ho*Wo]`` (any
    contents) and counters a zeroed ``uint32`` array of one counter per output tile of the
    launch (``tiles * rank blocks * images``), else both unused; the sizes are int32 scalars.
    ``whole_rows`` (``out_w % tile_w == 0``, see ``launch``): every tile row lies inside the
    image, so the epilogue tests no pixel against the width (it must only be passed where it
    holds)."""
    DT = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    ZERO = DT(0)
    U = np.uint32
    TH, TW, CC, OCB, RO, RP = (config.tile_h, config.tile_w, config.chunk, config.oc_block,
                               config.reg_oc, config.reg_px)
    KH, KW, K = kernel_h, kernel_w, kernel_h * kernel_w
    SH, SW, DH, DW = stride_h, stride_w, dil_h, dil_w
    ROWS = (TH - 1) * SH + (KH - 1) * DH + 1
    COLS = (TW - 1) * SW + (KW - 1) * DW + 1
    REGION = ROWS * COLS
    STAGED = CC * REGION
    STAGED_ALLOC = _round4(STAGED)
    CORE_SLICE = CC * K * OCB
    SEG = (RP - 1) * SW + (KW - 1) * DW + 1  # staged values one thread reads per (cc, ky)
    PX_T = TH * TW // RP                      # threads along pixels
    ROW_T = TW // RP                          # threads along one tile row
    THREADS = (OCB // RO) * PX_T
    CHUNKS = -(-rank_in // CC)
    SPLITS = config.splits  # blocks per output tile, each summing a slice of the chunks
    R_IN = rank_in
    R_FULL = rank_in % CC == 0  # every chunk of ranks is whole: no rank test in the staging
    WHOLE_ROWS = whole_rows  # every tile row inside the image: no width test per pixel
    u_R_OUT = U(rank_out)
    # Compile-time constants as uint32, so index arithmetic stays 32-bit.
    u_THREADS, u_REGION, u_COLS, u_CORE_SLICE = U(THREADS), U(REGION), U(COLS), U(CORE_SLICE)
    u_PX_T, u_ROW_T, u_TW, u_TH, u_RP, u_RO, u_OCB = U(PX_T), U(ROW_T), U(TW), U(TH), U(RP), U(RO), U(OCB)
    u_SH, u_SW, u_CC, u_R_IN, u_CHUNKS = U(SH), U(SW), U(CC), U(R_IN), U(CHUNKS)
    u_KH, u_ROW_STEP, u_KW_OCB = U(KH), U(DH * COLS), U(KW * OCB)
    PAD_H, PAD_W = np.int32(pad_h), np.int32(pad_w)

    CORE_ACC = RO * RP  # local-array sizes must be plain constants
    POS_T = -(-REGION // THREADS)  # staged positions per thread
    VW = vector_width(DT)
    VEC_CORE = slice_vector_width(CORE_SLICE, DT) == VW  # the core slice copied in 16-byte vectors
    u_VEC_STEP = U(THREADS * VW)

    @cuda.jit
    def kernel(hidden, packed_core, out, partials, counters, height, width, out_h, out_w):
        staged = cuda.shared.array(STAGED_ALLOC, dtype=DT, alignment=16)
        staged_core = cuda.shared.array(CORE_SLICE, dtype=DT, alignment=16)
        last = cuda.shared.array(1, dtype=np.uint32)  # (rank splits only: 1 in the last block to finish)
        acc = cuda.local.array(CORE_ACC, dtype=DT)
        weights = cuda.local.array(RO, dtype=DT)
        row = cuda.local.array(SEG, dtype=DT)
        offsets = cuda.local.array(POS_T, dtype=np.int32)
        handles = cuda.local.array(POS_T, dtype=np.uint64)

        tid = uint32(cuda.threadIdx.x)
        n = cuda.blockIdx.z
        rank_block = uint32(cuda.blockIdx.y)
        height_u = uint32(height)
        width_u = uint32(width)
        plane_in = height_u * width_u
        plane_out = uint32(out_h) * uint32(out_w)
        image_in = np.int64(n) * np.int64(R_IN * np.int64(plane_in))      # 64-bit image bases
        image_in_u = np.uint64(image_in)
        image_out_u = np.uint64(np.int64(n) * np.int64(rank_out * np.int64(plane_out)))
        tiles_x = U(U(uint32(out_w) + u_TW) - U(1)) // u_TW  # (32-bit: a multiply-high)
        tile = uint32(cuda.blockIdx.x) // U(SPLITS)  # (a compile-time divisor: a multiply-high)
        tile_y = tile // tiles_x
        oy0 = tile_y * u_TH
        ox0 = (tile - tile_y * tiles_x) * u_TW
        iy0 = np.int32(oy0 * u_SH) - PAD_H  # first staged input row (may be negative)
        ix0 = np.int32(ox0 * u_SW) - PAD_W

        oc_t = tid // u_PX_T        # this thread owns ranks oc_t*RO ... oc_t*RO + RO-1
        px_t = tid - oc_t * u_PX_T  # ... and pixels px_t*RP ... of the tile (one tile row)
        u_row = px_t // u_ROW_T
        v0 = (px_t - u_row * u_ROW_T) * u_RP
        window = u_row * u_SH * u_COLS + v0 * u_SW  # first staged value of the thread's window
        core_base = oc_t * u_RO
        for i in range(RO * RP):
            acc[i] = ZERO
        # offsets[k]: in-image offset of staged position tid + k*THREADS, or -1 (zero padding)
        # (32-bit and unsigned: a row or column above or left of the image wraps to a huge
        # value, so one unsigned test per axis; a signed sum would be widened to 64 bits)
        for k in range(POS_T):
            pos = U(tid + U(k * THREADS))
            rr = pos // u_COLS
            gy = U(U(iy0) + rr)
            gx = U(U(ix0) + U(pos - U(rr * u_COLS)))
            offsets[k] = -1
            if gy < height_u and gx < width_u:
                offsets[k] = np.int32(U(gy * width_u) + gx)

        # Rank splits: split s of an output tile sums chunks s*CHUNKS//S .. (s+1)*CHUNKS//S - 1
        # (the epilogue adds the S sums in split order).
        chunk = U(0)
        chunk_end = u_CHUNKS
        split = U(0)
        if SPLITS > 1:
            split = uint32(cuda.blockIdx.x) - U(tile * U(SPLITS))
            chunk = U(U(split * u_CHUNKS) // U(SPLITS))
            chunk_end = U(U(U(split + U(1)) * u_CHUNKS) // U(SPLITS))
        while chunk < chunk_end:
            c0 = chunk * u_CC
            # phase: stage_input
            # Each thread copies its own POS_T region positions (offsets computed once,
            # above) for each of the CC channels. Per position, one 64-bit handle to its
            # element in channel c0 (element 0 of that channel where the position is
            # padding); channel ch is ch * plane further, a uniform offset, so an element
            # costs its address (IMAD.WIDE.U32 or a 64-bit add), the load, a select that zeroes
            # padding and a missing rank, and the store. The load is unconditional (a branch
            # around it cost a convergence barrier per element). Where CC divides r_in every
            # rank exists: no rank test at all. A 64-bit index sum per element cost about five
            # instructions more (l1b: 1812 staging instructions per thread, now 992).
            # (Sums are wrapped in U: numba widens a sum of uint32 to 64 bits. A 32-bit counter
            # from 0 to a compile-time count: LLVM unrolls the channel loop.)
            chunk_at = image_in_u + np.uint64(U(c0 * plane_in))
            for k in range(POS_T):
                # (a conditional is its own statement: docs/contributing.md, "One value per join")
                at = U(offsets[k]) if offsets[k] >= 0 else U(0)
                handles[k] = element_address(hidden, chunk_at + np.uint64(at))
            ch = U(0)
            while ch < U(CC):
                rank = U(c0 + ch)
                channel_ok = R_FULL or rank < u_R_IN
                step = U(ch * plane_in) if channel_ok else U(0)  # (a missing rank: channel c0, zeroed)
                for k in range(POS_T):
                    pos = U(tid + U(k * THREADS))
                    if (k + 1) * THREADS <= REGION or pos < u_REGION:
                        value = read_at(hidden, handles[k], step)
                        if not (channel_ok and offsets[k] >= 0):
                            value = ZERO
                        staged[pos + int(ch) * REGION] = value  # (the channel's step folds into the STS)
                ch = U(ch + U(1))
            # phase: stage_core
            # One contiguous slice (pack_core), copied in 16-byte vectors (LDG.128, STS.128)
            # where it is a whole number of them. Unsigned indices: a signed one costs
            # Numba's wraparound test per load.
            slice0 = np.uint64(U(rank_block * u_CHUNKS + chunk)) * np.uint64(CORE_SLICE)
            if VEC_CORE:
                # (a while loop: a compile-time count of reps in a Python range, 18 at l1b, was
                # left rolled with uniform-register bookkeeping, 2.3x the instructions)
                idx = U(tid * U(VW))
                while idx < u_CORE_SLICE:
                    v = load_vector(packed_core, slice0 + np.uint64(idx))
                    for t in range(VW):
                        staged_core[U(idx + U(t))] = v[t]
                    idx = U(idx + u_VEC_STEP)
            else:
                idx = tid
                while idx < u_CORE_SLICE:
                    staged_core[idx] = packed_core[slice0 + np.uint64(idx)]
                    idx = U(idx + u_THREADS)
            cuda.syncthreads()  # staged and staged_core are complete before anyone reads them

            # phase: multiply
            x_channel = window  # staged index of (cc, ky=0) for this thread's window
            w_ptr = core_base   # staged_core index of (cc, ky, kx=0, first owned rank)
            cc = U(0)
            while cc < u_CC:
                x_ptr = x_channel
                ky = U(0)
                while ky < u_KH:
                    for q in range(SEG):
                        row[q] = staged[x_ptr + uint32(q)]
                    for kx in range(KW):
                        for i in range(RO):
                            weights[i] = staged_core[w_ptr + uint32(kx * OCB + i)]
                        for j in range(RP):
                            x = row[j * SW + kx * DW]
                            for i in range(RO):
                                acc[i * RP + j] += weights[i] * x
                    x_ptr += u_ROW_STEP
                    w_ptr += u_KW_OCB
                    ky += U(1)
                x_channel += u_REGION
                cc += U(1)
            cuda.syncthreads()  # everyone is done reading staged/staged_core before the next chunk
            chunk = U(chunk + U(1))

        # phase: epilogue
        oy = oy0 + u_row
        ox = ox0 + v0
        # (unsigned indices and 32-bit tests: a signed 64-bit index cost a wraparound fix-up and
        # a 64-bit compare per store, ~14 instructions where 3 do)
        if SPLITS > 1:
            # every split stores its sum in partials[split]; the last to arrive adds them
            out_size = np.uint64(uint32(cuda.gridDim.z)) * np.uint64(u_R_OUT * plane_out)
            mine = np.uint64(split) * out_size
            if oy < uint32(out_h):
                for i in range(RO):
                    oc = U(U(rank_block * u_OCB) + U(core_base + U(i)))
                    if oc < u_R_OUT:
                        base = image_out_u + np.uint64(U(U(oc * plane_out) + U(U(oy * uint32(out_w)) + ox)))
                        for j in range(RP):
                            if WHOLE_ROWS or U(ox + U(j)) < uint32(out_w):
                                partials[mine + base + np.uint64(j)] = acc[i * RP + j]
            cuda.threadfence()  # (release) this block's sums reach the device before it counts itself
            cuda.syncthreads()  # every thread has stored its sums
            if tid == U(0):
                counter = U(tile + U(uint32(cuda.gridDim.x) // U(SPLITS)
                                     * U(rank_block + U(uint32(cuda.blockIdx.z) * uint32(cuda.gridDim.y)))))
                last[0] = U(0)
                if arrives_last(counters, counter, U(SPLITS)):  # (release, count, acquire: runtime.atomics)
                    last[0] = U(1)
            cuda.syncthreads()  # every thread reads whether its block is the last
            if last[0] == U(0):
                return
        if oy < uint32(out_h):
            for i in range(RO):
                oc = U(U(rank_block * u_OCB) + U(core_base + U(i)))
                if oc < u_R_OUT:
                    base = image_out_u + np.uint64(U(U(oc * plane_out) + U(U(oy * uint32(out_w)) + ox)))
                    for j in range(RP):
                        if WHOLE_ROWS or U(ox + U(j)) < uint32(out_w):
                            if SPLITS > 1:
                                # the S sums in split order (this block's own read back too: the
                                # same bits as its registers, and no branch per split)
                                total = partials[base + np.uint64(j)]
                                for k in range(1, SPLITS):
                                    total += partials[np.uint64(k) * out_size + base + np.uint64(j)]
                                out[base + np.uint64(j)] = total
                            else:
                                out[base + np.uint64(j)] = acc[i * RP + j]

    return kernel


def phase_model(shape, config: CoreTile) -> dict[str, int]:
    """Iterations per thread of each phase's innermost loop body, for one launch (a block
    of the busiest split: ``config.chunks_per_split`` chunks).

    ``shape``: a ``TuckerGeometry``. stage_input and stage_core count staged elements
    per thread; multiply counts (cc, ky) steps (each: SEG loads, KW*(RO loads +
    RO*RP FFMA)); epilogue counts stored outputs per thread.
    """
    g = shape
    rows, cols = config.staged_shape(g)
    chunks = config.chunks_per_split(g)
    t = config.threads
    return {
        "stage_input": chunks * -(-config.chunk * rows * cols // t),
        "stage_core": chunks * -(-config.chunk * g.taps * config.oc_block // t),
        "multiply": chunks * config.chunk * g.kernel_h,
        "epilogue": config.reg_oc * config.reg_px,
    }


def sass_iterations(shape, config: CoreTile) -> dict[str, tuple]:
    """Per phase, ``(source steps of its innermost SASS loop, runs of its code outside that
    loop)`` per thread, for the SASS audit (``tucker/audit.py``). ``stage_input`` counts
    stored elements (``CC x POS_T`` per chunk, guarded ones included) and ``phase_steps``
    names it, so the audit divides its SASS loop by its shared stores: right whether the
    compiler unrolled the copy into the chunk loop or kept a loop of a few channels a pass
    (it does at 7x7 tiles of 28 threads: 4 channels x 3 positions a pass, two passes a
    chunk, which the old count of one pass per chunk charged 20x too little). ``stage_core``
    counts stored vectors (``slice_vector_width``: 16 bytes, or one element where the slice is
    not a whole number of vectors). ``epilogue`` is straight code or a loop over the ranks
    (see below); with rank splits, every block is charged the last block's additions. A block sums ``config.chunks_per_split`` chunks."""
    body = phase_model(shape, config)
    chunks = config.chunks_per_split(shape)
    rows, cols = config.staged_shape(shape)
    stores = chunks * config.chunk * -(-(rows * cols) // config.threads)  # CC x POS_T a chunk
    vw = slice_vector_width(config.chunk * shape.taps * config.oc_block, shape.dtype)
    core_stores = chunks * -(-(config.chunk * shape.taps * config.oc_block) // (config.threads * vw))
    # epilogue: straight code where LLVM unrolls it; where it keeps a loop over the thread's RO
    # ranks (4-8 rank splits, or per-pixel width tests), each pass stores (and, with splits,
    # adds) the rank's RP pixels, which the store-per-line rule reads as RP source steps: RO * RP
    # steps a thread (charged zero times before session 29: 588 instructions at l4a, batch 32)
    return {"prologue": (0, 1), "stage_input": (stores, chunks), "stage_core": (core_stores, chunks),
            "multiply": (body["multiply"], chunks * config.chunk),
            "epilogue": (config.reg_oc * config.reg_px, 1)}


def phase_steps(shape, config: CoreTile) -> dict[str, tuple]:
    """Per source step of ``phase_model``, what SASS shows (``perf.sass.normalise_steps``)."""
    return {"stage_input": ("sts", 1), "stage_core": ("sts", 1),
            "multiply": ("ffma", shape.kernel_w * config.reg_oc * config.reg_px)}


def whole_rows(g, config: CoreTile) -> bool:
    """Whether every tile row lies inside the output image (``out_w % tile_w == 0``): the
    kernel then compiles out its per-pixel width tests (at l2a, 28 of them per thread in the
    split epilogue, each with the 64-bit address of the other split's sum it guarded)."""
    return g.out_w % config.tile_w == 0


def launch(geometry, config: CoreTile, hidden_in, packed_core, hidden_out) -> None:
    """Run the core convolution: flat contiguous ``hidden_in [N*R*H*W]`` -> ``hidden_out``."""
    from ... import backend

    g = geometry
    config.check_splits(g)
    kernel = core_conv_kernel(g.dtype, g.rank_in, g.rank_out, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
                              g.pad_h, g.pad_w, g.dil_h, g.dil_w, config, whole_rows(g, config))
    blocks_x, rank_blocks, batch = config.blocks(g)
    per_in = g.rank_in * g.height * g.width
    per_out = g.rank_out * g.out_h * g.out_w
    xp = backend.array_module(hidden_out)
    splits = config.splits
    for first in range(0, batch, GRID_Z_LIMIT):
        images = min(GRID_Z_LIMIT, batch - first)
        # rank splits: S partial outputs and one zeroed counter per output tile of this launch
        # (a placeholder of each without splits)
        partials = xp.empty(splits * images * per_out if splits > 1 else 1, dtype=hidden_out.dtype)
        counters = xp.zeros(blocks_x // splits * rank_blocks * images if splits > 1 else 1, dtype=np.uint32)
        backend.launch(kernel, (blocks_x, rank_blocks, images), config.threads,
                       hidden_in[first * per_in:(first + images) * per_in], packed_core,
                       hidden_out[first * per_out:(first + images) * per_out], partials, counters,
                       np.int32(g.height), np.int32(g.width), np.int32(g.out_h), np.int32(g.out_w))


def ptx_cases():
    """Kernels and signatures for the PTX/SASS audit (``deftnumba.perf.audit``)."""
    from numba import types

    a1 = {d: types.Array(getattr(types, d), 1, "C") for d in ("float32", "float64")}
    u1 = types.Array(types.uint32, 1, "C")
    i32 = types.int32
    shapes = {  # (rank_in, rank_out, kh, kw, stride, pad, dil): TDC's ResNet-18 layer1 core, a strided one
        "r64-32_3x3": (64, 32, 3, 3, 1, 1, 1),
        "r96-64_3x3s2": (96, 64, 3, 3, 2, 1, 1),
    }
    for dtype, tiles in (("float32", (GPU_TILE, CoreTile(4, 8, 4, 32, 4, 4), CoreTile(4, 8, 4, 32, 4, 4, splits=4))),
                         ("float64", (SIMULATOR_TILE,))):
        a = a1[dtype]
        for name, (r, q, kh, kw, s, p, d) in shapes.items():
            for cfg in tiles:
                tag = f"{cfg.tile_h}x{cfg.tile_w}c{cfg.chunk}o{cfg.oc_block}r{cfg.reg_oc}x{cfg.reg_px}"
                tag += f"s{cfg.splits}" if cfg.splits > 1 else ""
                yield (f"core_conv[{name},{tag}]", dtype,
                       core_conv_kernel(dtype, r, q, kh, kw, s, s, p, p, d, d, cfg),
                       (a, a, a, a, u1, i32, i32, i32, i32))
