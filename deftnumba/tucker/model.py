"""Performance model and tile tuner for the Tucker kernels (predictions, never measurements).

TDC's model scores a tile by a compute term ``(th+2)(tw+2)*tc*9 x waves`` and a
data term weighted 0.9 input / 0.1 output, with an occupancy table measured on
the GPU; its artifact reports the modelled pick ~25% slower than exhaustive
search. Ours predicts a *time* per candidate from what the compiled kernel issues:

1. **Issued instructions per thread**, phase by phase: the kernel module's
   ``phase_model(shape, config)`` gives iterations per thread of each phase's
   innermost loop body; ``INSTRUCTIONS`` below gives instructions per iteration.
   The formulas were calibrated on sm_90 SASS (numba-cuda -> NVVM -> nvJitLink ->
   ``nvdisasm``, no GPU) of the ``ptx_cases`` configs; e.g. the core-conv step
   (one input rank, one kernel row) of an 8x8 tile with 8 ranks x 4 pixels per
   thread issues 96 FFMA + 3 LDS.64 + 6 LDS.128 + ~3 other = 108 instructions.
   The SASS audit (``perf/audit.py``) will supply measured per-config counts.
2. **Occupancy and waves** (H200: 132 SMs, 2048 threads, 64K registers, 228 KB
   shared memory and 32 blocks per SM): blocks per SM, waves of blocks.
3. **Issue rate**: 4 warp-instructions per clock per SM (4 schedulers), reached
   only with enough warps: each warp is assumed to issue at most one instruction
   every ``CYCLES_PER_WARP_ISSUE`` clocks (latency hiding; an assumption).
4. **Bytes**: the minimal DRAM bytes (``tucker.roofline``) over the copy
   bandwidth, and the staged re-reads (halos, rank chunks) over an assumed L2 rate.

``predict`` returns ``max(issue time, memory time) + launch overhead`` and all the
terms, labelled ``"prediction"``. ``rank_configs`` sorts candidate tiles by it;
``autotune`` (GPU only) times the top candidates with CUDA events and reports
how far the model's pick trails the measured best.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

from ..perf.device import H200, DeviceModel
from . import roofline
from .geometry import TuckerGeometry
from .kernels import core_conv, fused, fused_winograd, winograd

LABEL = "prediction (static model, no GPU run)"


Device = DeviceModel  # the one device model (perf/device.py); the cuDNN/cuBLAS rows use its gemm_efficiency
CYCLES_PER_WARP_ISSUE = 2.0   # assumed: a warp issues at most every 2 clocks (dependent FFMA chains)
BARRIER_SLOTS = 24            # assumed issue slots a barrier costs each thread (drain + BAR)


def _loads(n: int, contiguous: bool) -> int:
    """Shared loads for ``n`` consecutive floats: 128-bit where contiguous (64/32-bit tail)."""
    if not contiguous:
        return n
    return n // 4 + (n % 4) // 2 + (n % 2)


def instructions(kernel: str, g: TuckerGeometry, config) -> dict[str, float]:
    """Issued instructions per iteration of each phase's innermost loop body (sm_90 SASS,
    calibrated formulas; see the module docstring)."""
    t = config
    seg = (t.reg_px - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1
    if kernel == "core_conv":
        row_loads = _loads(seg, g.stride_w == 1 and g.dil_w == 1)
    else:
        # the fused kernel's loads are vectors only where they start 16-byte aligned: a row
        # segment (fused.hidden_rows), a thread's first-1x1 positions, its last-1x1 pixels
        lay = t.layout(g)
        row_loads = _loads(seg, lay.pitch % 4 == 0 and lay.segment % 4 == 0)
    step = g.kernel_w * t.reg_oc * t.reg_px + row_loads + g.kernel_w * _loads(t.reg_oc, True) + 3.5
    common = {"stage_input": 12.0, "stage_core": 10.0, "multiply": step}
    if kernel == "core_conv":
        return {**common, "epilogue": 6.0}
    pixels_aligned = t.reg_px > 2  # (fused.core_out_pitch: each thread's pixels in an aligned slot)
    return {**common,
            "stage_first": 10.0,
            "first_gemm": lay.first_reg * lay.first_pos + _loads(lay.first_pos, lay.first_pos % 4 == 0)
            + _loads(lay.first_reg, True) + 3.0,
            "store_hidden": 3.0,
            "store_core": 2.0,
            "stage_last": 10.0,
            "last_gemm": t.out_reg * t.reg_px + _loads(t.reg_px, pixels_aligned) + _loads(t.out_reg, True) + 3.0}


def _winograd_instructions(g: TuckerGeometry, t) -> dict[str, float]:
    """Issued instructions per iteration of the Winograd kernel's phases (``winograd.phase_model``),
    calibrated on its sm_90 SASS at layer4 (session 31): a rank step of 10x8 is 80 FFMA, 5
    LDS.128 (the 10 ranks in a 12-value slot) and ~2 others (four ranks a loop trip); a staged
    patch ~9.5 a value; a copied core vector ~5; an output pair ~60 (+3 per split added)."""
    return {"stage_input": 16 * 9.5, "stage_core": 5.0,
            "multiply": t.reg_oc * t.reg_tile + _loads(t.rank_slot, True) + _loads(t.reg_tile, True) + 2.0,
            "epilogue": 60.0 + t.exchange_ranks * _loads(t.reg_tile, True) + (12.0 * t.splits if t.splits > 1 else 0.0)}


def _fused_winograd_instructions(g: TuckerGeometry, t) -> dict[str, float]:
    """Issued instructions per iteration of the fused Winograd kernel's phases
    (``fused_winograd.phase_model``), calibrated on its sm_90 SASS at the audited l2a and l2b
    picks (session 40): a first-1x1 channel is ``UR x UQ`` FFMA, its ranks' loads (128-bit where
    ``UR`` is a multiple of 4, else 64-bit), one load of the thread's position slot and ~3
    others; a multiply rank ``RO x RT`` FFMA, two slot loads each and ~4 others; a transformed
    patch ~65 (16 loads, 32 adds, 16 stores); an output pair ~100 a pass; a last-1x1 rank
    ``EO x LP`` FFMA and ~5 others besides its loads; a staged input value ~8, a copied vector
    ~4-12. Within 5% of the audited per-thread totals of both picks."""
    lay = t.layout(g)
    ur, uq = lay.first_reg, lay.first_pos
    rank_loads = _loads(ur, True) if ur % 4 == 0 else -(-ur // 2)
    return {"stage_input": 8.0, "stage_first": 12.0,
            "first_gemm": ur * uq + rank_loads + _loads(lay.pos_slot, True) + 3.0,
            "store_hidden": 3.0, "transform": 65.0, "stage_core": 4.5,
            "multiply": t.reg_oc * t.reg_tile + _loads(t.rank_slot, True) + _loads(t.tile_slot, True) + 4.0,
            "output_transform": 100.0, "stage_last": 3.0,
            "last_gemm": t.out_reg * t.out_px + _loads(t.out_reg, True) + _loads(t.pixel_slot, True) + 5.0}


def _barriers(kernel: str, g: TuckerGeometry, t) -> int:
    if kernel == "winograd":  # two per chunk, two per exchange pass (and two around the counter)
        return 2 * t.chunks_per_split(g) + 2 * (t.reg_oc // t.exchange_ranks) + (2 if t.splits > 1 else 0)
    if kernel == "core_conv":  # two per chunk (and with rank splits, two around the counter)
        return 2 * t.chunks_per_split(g) + (2 if t.splits > 1 else 0)
    if kernel == "fused_winograd":  # per rank chunk: two a channel step, one after the hidden
        # tile, two a sub-chunk but the last; then one, two an exchange pass, two an output block
        lay = t.layout(g)
        rank_chunks = -(-g.rank_in // t.rank_chunk)
        subs = t.rank_chunk // t.core_ranks
        return (rank_chunks * (2 * -(-g.in_channels // t.in_chunk) + 2 * subs) + 1
                + 2 * (t.reg_oc // lay.exchange_ranks) + 2 * -(-g.out_channels // lay.out_block))
    rank_chunks = -(-g.rank_in // t.rank_chunk)
    in_chunks = -(-g.in_channels // t.in_chunk)
    out_blocks = -(-g.out_channels // t.layout(g).out_block)
    subs = t.rank_chunk // t.core_ranks
    return rank_chunks * (2 * in_chunks + 2 * subs - 1) + 1 + 2 * out_blocks


def _registers(kernel: str, g: TuckerGeometry, t) -> int:
    """Registers per thread, estimated: accumulators + operands + ~30 for addresses and
    loop state (sm_90 ptxas gave 71-80 for the 8x4 core tile, 48-64 for 4x4; the Winograd
    kernel's 8x8 block, 119-123)."""
    if kernel == "winograd":
        live = t.reg_oc * t.reg_tile + t.reg_oc + t.reg_tile + 16
        return int(min(255, 8 * math.ceil((live + 30) / 8)))
    if kernel == "fused_winograd":  # (ptxas gave 96 and 127 for the l2a and l2b picks: 120 here)
        lay = t.layout(g)
        live = t.reg_oc * t.reg_tile + t.reg_oc + t.reg_tile + max(lay.first_reg * lay.first_pos, t.out_reg * t.out_px)
        return int(min(255, 8 * math.ceil((live + 16) / 8)))
    seg = (t.reg_px - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1
    live = t.reg_oc * t.reg_px + seg + t.reg_oc
    if kernel == "fused":
        lay = t.layout(g)
        live += max(lay.first_reg * lay.first_pos, t.out_reg * t.reg_px)
    return int(min(255, 8 * math.ceil((live + 30) / 8)))


@dataclass
class Prediction:
    """One candidate's predicted time and its terms (all predictions)."""

    method: str
    config: object
    ms: float
    issue_ms: float
    memory_ms: float
    launches: int
    threads: int
    blocks: int
    blocks_per_sm: int
    waves: int
    registers: int
    shared_bytes: int
    instructions_per_thread: float
    ffma_fraction: float
    label: str = LABEL

    def row(self) -> dict:
        return {"method": self.method, "config": _tag(self.config), "predicted_ms": self.ms,
                "issue_ms": self.issue_ms, "memory_ms": self.memory_ms, "threads": self.threads,
                "blocks": self.blocks, "blocks_per_sm": self.blocks_per_sm, "waves": self.waves,
                "registers": self.registers, "shared_bytes": self.shared_bytes,
                "ffma_fraction": self.ffma_fraction, "label": self.label}


def _tag(t) -> str:
    if t is None:
        return "-"
    # (a core-conv tile without rank splits keeps the tag it had before splits existed)
    # (and a fused tile without row slots keeps the tag it had before row_slots existed)
    return "/".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in vars(t).items()
                    if not (k == "splits" and v == 1) and not (k == "row_slots" and not v))


def _kernel_time(kernel: str, g: TuckerGeometry, t, device: Device):
    """(issue ms, memory ms, facts) of one launch of our kernel."""
    mod = {"core_conv": core_conv, "fused": fused, "winograd": winograd, "fused_winograd": fused_winograd}[kernel]
    iters = mod.phase_model(g, t)
    per_iter = (_winograd_instructions(g, t) if kernel == "winograd" else
                _fused_winograd_instructions(g, t) if kernel == "fused_winograd" else instructions(kernel, g, t))
    instr = sum(iters[p] * per_iter[p] for p in iters) + BARRIER_SLOTS * _barriers(kernel, g, t)
    if kernel == "winograd":
        threads = t.threads
        gx, gy = t.grid(g)
        blocks = gx * gy
        shared = t.shared_bytes(g)
        ffma = iters["multiply"] * t.reg_oc * t.reg_tile
    elif kernel == "core_conv":
        threads = t.threads
        tiles, rank_blocks, batch = t.blocks(g)
        blocks = tiles * rank_blocks * batch
        shared = t.shared_bytes(g)
        ffma = iters["multiply"] * g.kernel_w * t.reg_oc * t.reg_px
    elif kernel == "fused_winograd":
        lay = t.layout(g)
        threads = lay.threads
        blocks = -(-g.out_h // t.tile_h) * -(-g.out_w // t.tile_w) * g.batch
        shared = lay.shared_bytes(g)
        ffma = (iters["multiply"] * t.reg_oc * t.reg_tile + iters["first_gemm"] * lay.first_reg * lay.first_pos
                + iters["last_gemm"] * t.out_reg * t.out_px)
    else:
        lay = t.layout(g)
        threads = lay.threads
        blocks = -(-g.out_h // t.tile_h) * -(-g.out_w // t.tile_w) * g.batch
        shared = lay.shared_bytes(g)
        ffma = (iters["multiply"] * g.kernel_w * t.reg_oc * t.reg_px
                + iters["first_gemm"] * lay.first_reg * lay.first_pos + iters["last_gemm"] * t.out_reg * t.reg_px)
    warps = -(-threads // 32)
    regs = _registers(kernel, g, t)
    per_sm = min(device.blocks_per_sm, device.threads_per_sm // (warps * 32),
                 device.shared_per_sm // (shared + 1024),
                 device.registers_per_sm // (regs * warps * 32))
    per_sm = max(per_sm, 0)
    if per_sm == 0:
        return math.inf, math.inf, dict(threads=threads, blocks=blocks, per_sm=0, waves=0, regs=regs,
                                         shared=shared, instr=instr, ffma=ffma / max(instr, 1))
    slots = per_sm * device.sms
    waves = -(-blocks // slots)
    cycles = 0.0
    remaining = blocks
    for _ in range(waves):
        in_wave = min(remaining, slots)
        blocks_on_sm = -(-in_wave // device.sms)
        active_warps = blocks_on_sm * warps
        rate = min(device.schedulers, active_warps / CYCLES_PER_WARP_ISSUE)
        cycles += blocks_on_sm * warps * instr / rate
        remaining -= in_wave
    issue_ms = 1e3 * cycles / device.clock_hz
    # bytes: minimal DRAM traffic + staged re-reads from L2
    s = g.itemsize
    if kernel == "winograd":
        dram = sum(o.bytes for o in roofline.operators(g, "three_pass")[1:2])
        p = winograd.POSITIONS
        l2 = blocks * t.chunks_per_split(g) * t.chunk * (p * t.tiles + p * t.oc_block) * s
        if t.splits > 1:
            l2 += 2 * t.splits * g.batch * g.rank_out * g.out_h * g.out_w * s
    elif kernel == "fused_winograd":
        dram = roofline.totals(g, "fused").bytes
        rank_chunks = -(-g.rank_in // t.rank_chunk)
        l2 = blocks * (rank_chunks * -(-g.in_channels // t.in_chunk) * t.in_chunk * lay.region
                       + g.in_channels * g.rank_in + winograd.POSITIONS * rank_chunks * t.rank_chunk
                       * lay.padded_block + lay.ranks_padded * g.out_channels) * s
    elif kernel == "core_conv":
        dram = sum(o.bytes for o in roofline.operators(g, "three_pass")[1:2])
        rows, cols = t.staged_shape(g)
        l2 = blocks * t.chunks_per_split(g) * t.chunk * (rows * cols + g.taps * t.oc_block) * s
        if t.splits > 1:  # the splits' partial outputs: S stored, S read back by the last block
            l2 += 2 * t.splits * g.batch * g.rank_out * g.out_h * g.out_w * s
    else:
        dram = roofline.totals(g, "fused").bytes
        l2 = blocks * (-(-g.rank_in // t.rank_chunk) * (-(-g.in_channels // t.in_chunk) * t.in_chunk)
                       * lay.region + g.in_channels * g.rank_in + g.rank_in * g.taps * lay.weights_padded
                       + lay.ranks_padded * g.out_channels) * s
    memory_ms = 1e3 * max(dram / device.dram_bandwidth, l2 / device.l2_bandwidth)
    return issue_ms, memory_ms, dict(threads=threads, blocks=blocks, per_sm=per_sm, waves=waves, regs=regs,
                                     shared=shared, instr=instr, ffma=ffma / instr)


def _vendor_ms(ops, device: Device) -> float:
    """A vendor library (cuDNN/cuBLAS) operator at an assumed fraction of its roofline."""
    return sum(1e3 * max(o.flops / (device.fp32_flops * device.gemm_efficiency), o.bytes / device.dram_bandwidth)
               + device.launch_us / 1e3 for o in ops)


def predict(g: TuckerGeometry, method: str, config=None, device: Device = H200) -> Prediction:
    """Predicted forward time of ``method`` on ``device`` (fp32), a labelled prediction.

    ``method``: ``fused``, ``three_pass``, ``winograd`` or ``fused_winograd`` (our kernels;
    ``config`` a ``FusedTile`` / ``CoreTile`` / ``WinogradTile`` / ``FusedWinogradTile``, default:
    the best ranked; the Winograd methods take 3x3 cores at stride 1 and dilation 1) or
    ``cudnn_conv`` / ``cudnn_tucker`` (vendor libraries, modelled as their roofline at
    ``device.gemm_efficiency``).
    """
    if method in ("cudnn_conv", "cudnn_tucker"):
        ops = roofline.operators(g, method)
        ms = _vendor_ms(ops, device)
        mem = sum(1e3 * o.bytes / device.dram_bandwidth for o in ops)
        return Prediction(method, None, ms, ms - mem, mem, len(ops), 0, 0, 0, 0, 0, 0, 0.0, 0.0,
                          LABEL + f"; vendor library at an assumed {device.gemm_efficiency:.0%} of roofline")
    if config is None:
        ranked = rank_configs(g, method, device=device)
        if not ranked:
            raise ValueError(f"no {method} tile fits this layer")
        return ranked[0]
    if method in ("fused", "fused_winograd"):
        if method == "fused_winograd" and not winograd.eligible(g):
            raise ValueError("fused_winograd takes 3x3 cores with stride 1 and dilation 1")
        issue, memory, f = _kernel_time(method, g, config, device)
        ms = max(issue, memory) + device.launch_us / 1e3
        return Prediction(method, config, ms, issue, memory, 1, f["threads"], f["blocks"], f["per_sm"],
                          f["waves"], f["regs"], f["shared"], f["instr"], f["ffma"])
    if method in ("three_pass", "winograd"):
        if method == "winograd" and not winograd.eligible(g):
            raise ValueError("winograd takes 3x3 cores with stride 1 and dilation 1")
        issue, memory, f = _kernel_time("core_conv" if method == "three_pass" else "winograd", g, config, device)
        first, _, last = roofline.operators(g, "three_pass")
        ms = max(issue, memory) + device.launch_us / 1e3 + _vendor_ms([first, last], device)
        return Prediction(method, config, ms, issue, memory, 3, f["threads"], f["blocks"], f["per_sm"],
                          f["waves"], f["regs"], f["shared"], f["instr"], f["ffma"])
    raise ValueError(f"method must be fused, three_pass, winograd, fused_winograd, cudnn_conv or cudnn_tucker, "
                     f"got {method!r}")


@dataclass(frozen=True)
class FusedBound:
    """The least issue-bound time any one-launch fused kernel of ``fused``'s design could have
    (``fused_bound``): a prediction under the audit's issue-slot model, never a measurement."""

    us: float            # microseconds, at the best tile shape
    tile: tuple          # (tile_h, tile_w) of that shape
    blocks: int          # its grid: tiles x images
    recompute: float     # its first-1x1 FLOPs over the layer's (halo recomputation)
    floor_us: float      # the layer's roofline floor (tucker.roofline, the fused operator)

    @property
    def ratio(self) -> float:
        """The bound over the floor: no kernel of this design gets under it."""
        return self.us / self.floor_us

    def ffma_share_for(self, ratio: float = 1.5) -> float:
        """The share of issued instructions that must be useful FFMAs for a kernel to reach
        ``ratio`` times the floor (above 1: out of reach)."""
        return self.ratio / ratio


def _needed(out_size: int, tile: int, stride: int, pad: int, dil: int, kernel: int, size: int) -> list:
    """Per tile along one axis: (output rows of the tile, input rows in the image it reads)."""
    out = []
    for start in range(0, out_size, tile):
        rows = range(start, min(start + tile, out_size))
        read = {o * stride - pad + k * dil for o in rows for k in range(kernel)}
        out.append((len(rows), sum(1 for r in read if 0 <= r < size)))
    return out


@functools.lru_cache(maxsize=64)
def fused_bound(g: TuckerGeometry, device: Device = H200, core: str = "direct") -> FusedBound:
    """How close to the roofline floor *any* one-launch kernel of ``fused``'s design can get.

    The design (the issue's, kept for determinism): a block owns one image's ``TH x TW``
    output tile with all ``r_out`` core ranks and all ``Cout`` outputs, so nothing is summed
    across blocks; it computes the first 1x1 at every in-image input position its core
    conv reads (the halo, computed again by the neighbouring tile). The bound grants it
    everything else: every issued instruction is an FFMA on 32 useful lanes, 4 warp
    instructions a clock per SM (``perf/sass.py``'s model), no loads, no barriers, zero
    padding free. The busiest SM runs at least the heaviest block, at least ``ceil(blocks /
    SMs)`` blocks and at least an even share of the total. Minimised over every tile shape. Two costs remain,
    and they are what fusion pays: the halo recomputation and the grid's quantisation
    over the SMs (a 7x7 image has few tiles, each with a large halo).

    ``core="winograd"``: the same design with the core conv by F(2x2, 3x3) (``kernels/winograd.py``;
    3x3, stride 1, dilation 1 only): 16 multiplies a 2x2 output tile and rank pair instead of 36,
    tiles of even sides (or the whole image side), the transforms granted free like the loads.
    Its FLOPs are fewer than the floor's (direct) FLOPs, so its ratio can fall below 1. No kernel
    of this kind exists yet: the bound says how far one could go.

    One physical limit is kept for both cores: a block's core accumulators (``r_out`` per output
    pixel direct, 16 per 2x2 output tile with Winograd: 4x as many) live through the whole
    reduction, so they must fit one SM's register file."""
    if core not in ("direct", "winograd"):
        raise ValueError(f"core must be 'direct' or 'winograd', got {core!r}")
    winograd_core = core == "winograd"
    if winograd_core and not winograd.eligible(g):
        raise ValueError("core='winograd' needs a 3x3 core of stride 1 and dilation 1 "
                         f"(got {g.kernel_h}x{g.kernel_w}, stride {g.stride_h}x{g.stride_w}, "
                         f"dilation {g.dil_h}x{g.dil_w})")
    totals = roofline.totals(g, "fused")
    floor = 1e6 * max(totals.flops / device.fp32_flops, totals.bytes / device.dram_bandwidth)
    rank_pairs = g.rank_out * (g.rank_in // g.groups)
    last_per_pixel = 2.0 * g.out_channels * g.rank_out
    per_input = 2.0 * g.rank_in * g.in_channels
    ffma_per_s = device.fp32_flops  # FMA = 2 FLOPs: the whole device's FFMA lanes at the model's clock
    first_flops = per_input * g.height * g.width

    def core_flops(ro, co):
        if winograd_core:  # 2x2 output tiles (a tile's odd edge padded), 16 multiplies a rank pair
            return 2.0 * rank_pairs * winograd.POSITIONS * -(-ro // 2) * -(-co // 2)
        return 2.0 * rank_pairs * g.taps * ro * co

    def sides(n):
        return [t for t in range(1, n + 1) if not winograd_core or t % 2 == 0 or t == n]

    def accumulators_fit(th, tw):
        per_rank = winograd.POSITIONS * -(-th // 2) * -(-tw // 2) if winograd_core else th * tw
        return g.rank_out * per_rank * g.itemsize <= 4 * device.registers_per_sm

    best = None
    cols_of = {tw: _needed(g.out_w, tw, g.stride_w, g.pad_w, g.dil_w, g.kernel_w, g.width)
               for tw in sides(g.out_w)}
    for th in sides(g.out_h):
        rows = _needed(g.out_h, th, g.stride_h, g.pad_h, g.dil_h, g.kernel_h, g.height)
        for tw, cols in cols_of.items():
            if not accumulators_fit(th, tw):
                continue
            work = sorted(per_input * ri * ci + core_flops(ro, co) + last_per_pixel * ro * co
                          for ro, ri in rows for co, ci in cols)
            blocks = len(work) * g.batch
            busiest = -(-blocks // device.sms)
            # the busiest SM: at least the heaviest block, at least ceil(blocks / SMs) blocks
            # (the lightest ones, for a bound) and at least an even share of all the work
            light, left, i = 0.0, busiest, 0
            while left > 0:
                take = min(left, g.batch)
                light += take * work[i]
                left -= take
                i += 1
            total = g.batch * sum(work)
            flops = max(work[-1], light, total / device.sms)
            us = 1e6 * flops * device.sms / ffma_per_s
            if best is None or us < best[0]:
                recompute = (sum(per_input * ri * ci for _, ri in rows for _, ci in cols) / first_flops
                             if first_flops else 1.0)
                best = (us, (th, tw), blocks, recompute)
    if best is None:
        raise ValueError(f"no tile of this design holds its core accumulators ({g.rank_out} ranks, "
                         f"{g.itemsize}-byte values) in one SM's {device.registers_per_sm} registers")
    return FusedBound(best[0], best[1], best[2], best[3], floor)


def _fitting_tiles(g: TuckerGeometry) -> tuple:
    """Tiles whose sides divide the output image (7x7, 7x14, 4x28, ...): ResNet's 28, 14 and 7
    are not multiples of 8, and a power-of-two tile there computes up to 31% padding."""
    hs = [d for d in range(1, min(g.out_h, 16) + 1) if g.out_h % d == 0]
    ws = [d for d in range(4, min(g.out_w, 32) + 1) if g.out_w % d == 0]
    return tuple((h, w) for h in hs for w in ws if 16 <= h * w <= 256 and (h, w) not in
                 ((4, 4), (4, 8), (8, 8), (8, 16), (2, 8)))


def _whole_warp_group_tiles(g: TuckerGeometry) -> list:
    """Fused tiles of exactly 128 threads (4 warps) built the other way round: ranks a thread
    ``RO`` between 3 and 12 and a row of ``TW`` pixels in ``TW / RP`` threads, then as many
    tile rows as make ``ceil(r_out / RO) * rows * TW / RP = 128`` (96 ranks, 6 a thread, rows
    of 7: 8x7 tiles; 160 ranks, 5 a thread, 2x8 tiles of 4 pixels a thread: session 35's
    layer3-4 picks), with the rank chunks, first-1x1 ranks, outputs a thread and core chunks
    those picks took. Where the grid is one block an SM, a block of 3 or 6 warps leaves
    schedulers idle under the issue-slot model."""
    out = []
    widths = sorted({tw for _, tw in _fitting_tiles(g)} | {8})
    for ro in range(3, 13):
        oc_threads = -(-g.rank_out // ro)
        for tw in widths:
            for rp in (1, 2, 4, 7, 8):
                if tw % rp or 128 % (oc_threads * (tw // rp)):
                    continue
                th = 128 // (oc_threads * (tw // rp))
                if th > g.out_h:
                    continue
                for cr, ur in ((32, 4), (32, 8), (48, 12), (64, 8), (64, 16)):
                    for cx, eo, ck in itertools.product((8, 16), (1, 2, 4), (2, 4)):
                        t = fused.FusedTile(th, tw, cr, cx, ro, rp, eo, ur, ck)
                        if fused.fits(t, g):
                            out.append(t)
    return out


def candidates(g: TuckerGeometry, method: str, coarse: bool = False) -> list:
    """Candidate tiles that fit the layer (48 KB static shared memory, <= 1024 threads);
    ``coarse``: a ~10x smaller grid (for sweeps over many rank pairs)."""
    out = []
    if method == "three_pass":
        tiles = ((2, 4), (4, 8), (8, 8)) if coarse else ((2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (2, 8), (1, 8))
        if not coarse:
            tiles += _fitting_tiles(g)
        for th, tw in tiles:
            for rp in ((2, 4) if coarse else (1, 2, 4, 7, 8)):
                if tw % rp:
                    continue
                for ro in ((4, 8) if coarse else (2, 4, 8)):
                    for ocb in ((16, 32) if coarse else (8, 16, 32, 64)):
                        if ocb % ro or ocb > 4 * g.rank_out:
                            continue
                        for cc in ((4, 8) if coarse else (2, 4, 8)):
                            for splits in ((1, 4) if coarse else (1, 2, 4, 8)):
                                if splits > -(-g.rank_in // cc):
                                    continue
                                t = core_conv.CoreTile(th, tw, cc, ocb, ro, rp, splits)
                                # >= 28 threads: a 7x7 tile's four rank groups of 7 pixels are one
                                # warp with 4 lanes idle (the audit charges the whole warp)
                                if 28 <= t.threads <= 1024 and t.shared_bytes(g) <= fused.STATIC_SHARED_LIMIT:
                                    out.append(t)
        return out
    if method == "fused":
        tiles = ((1, 4), (2, 4), (4, 8), (8, 8)) if coarse else ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (2, 8))
        if not coarse:
            tiles += _fitting_tiles(g)
        for th, tw in tiles:
            for rp in ((2, 4) if coarse else (1, 2, 4, 7, 8)):
                if tw % rp:
                    continue
                px = th * tw // rp
                # and, where they exist, ranks a thread that make the block whole groups of 4
                # warps (the issue-slot model's best: 6 at 96 ranks and 7x7 rows of 8, 5 at 160;
                # fused.weight_pitch keeps their weights 16-byte aligned)
                filling = () if coarse else tuple(ro for ro in range(3, 13) if ro not in (4, 8)
                                                  and (-(-g.rank_out // ro) * px) in (128, 256))
                for ro in ((4, 8) if coarse else (2, 4, 8) + filling):
                    for cr, ck in (((8, 0), (16, 4), (32, 4)) if coarse else
                                   ((2, 0), (4, 0), (8, 0), (16, 0), (16, 4), (32, 4), (32, 8), (64, 4))):
                        for cx in ((8, 16) if coarse else (4, 8, 16)):
                            # first-1x1 ranks a thread: 4 as well as 8 for large rank chunks
                            # (layer4's audited picks take 4 with chunks of 32 and 64)
                            first_regs = (8,) if cr >= 16 else (4,)
                            if not coarse and cr >= 16:
                                first_regs = (8, 4)
                            for eo, ur in itertools.product((4, 8) if coarse else (2, 4, 8), first_regs):
                                t = fused.FusedTile(th, tw, cr, cx, ro, rp, eo, ur, ck)
                                if t.layout(g).threads >= 32 and fused.fits(t, g):
                                    out.append(t)
                                # the same with each thread's hidden row segment in an aligned
                                # slot, where that changes the layout (fused.hidden_rows)
                                slotted = dataclasses.replace(t, row_slots=True)
                                if (not coarse and slotted.layout(g).segment != rp * g.stride_w
                                        and slotted.layout(g).threads >= 32 and fused.fits(slotted, g)):
                                    out.append(slotted)
        if not coarse:
            seen = set(out)
            out += [t for t in _whole_warp_group_tiles(g) if t not in seen]
        return out
    if method == "winograd":
        if not winograd.eligible(g):
            return out
        for tb in ((16, 32) if coarse else (8, 16, 32)):
            for ob, ro in (((32, 8), (16, 4)) if coarse else
                           ((16, 4), (32, 8), (48, 6), (64, 8), (40, 10), (80, 10), (96, 12))):
                for cc in ((8,) if coarse else (4, 8)):
                    for splits in ((1, 2, 4) if coarse else (1, 2, 3, 4, 8)):  # (3: layer4's picks)
                        if splits > -(-g.rank_in // cc) or ob > 2 * g.rank_out:
                            continue
                        try:
                            t = winograd.WinogradTile(tb, ob, cc, ro, 8, splits)
                        except ValueError:
                            continue
                        if t.shared_bytes(g) <= fused.STATIC_SHARED_LIMIT:
                            out.append(t)
        return out
    if method == "fused_winograd":
        if not winograd.eligible(g):
            return out
        # tile sides (even), tiles and ranks a thread in the multiply, the last 1x1's pixels a
        # thread (the largest that makes whole groups of threads), then the rank chunk and what
        # the first 1x1, the sub-chunks, the channel steps and the output block take of it
        heights = (2, 4) if coarse else (2, 4, 6, 8)
        widths = (4, 8, 14) if coarse else (4, 6, 8, 14, 16, 28)
        chunks = (32, 48, 64) if coarse else (16, 32, 48, 64, 96)
        most = max(16, -(-g.rank_in // 16) * 16)  # (no chunk past the ranks rounded up to 16)
        for th, tw in itertools.product(heights, widths):
            if th > g.out_h + g.out_h % 2 or tw > g.out_w + g.out_w % 2:
                continue
            tb = (th // 2) * (tw // 2)
            for rt, ro in itertools.product((2, 4, 7) if coarse else (2, 3, 4, 7, 8),
                                            (4, 8) if coarse else (4, 6, 8, 10, 12, 16)):
                threads = winograd.POSITIONS * -(-g.rank_out // ro) * (tb // rt)
                if tb % rt or ro * rt > 96 or not 32 <= threads <= fused_winograd.MAX_THREADS:
                    continue
                lp = next((lp for lp in (8, 7, 4, 2, 1) if tw % lp == 0 and threads % (th * tw // lp) == 0), 0)
                if not lp:
                    continue
                for cr in chunks:
                    if cr > most:
                        continue
                    for ur, cx in itertools.product((4, 8) if coarse else (4, 6, 8, 12), (8,) if coarse else (4, 8, 16)):
                        # (4 ranks a sub-chunk and 4 outputs a thread where they fit, else 2)
                        for ck, eo in ((4, 4), (4, 2), (2, 4), (2, 2)):
                            try:
                                t = fused_winograd.FusedWinogradTile(th, tw, cr, cx, ur, ck, ro, rt, eo, lp)
                            except ValueError:
                                break
                            if t.layout(g).first_reg != ur:
                                break
                            if fused_winograd.fits(t, g):
                                out.append(t)
                                break
        return out
    raise ValueError(f"method must be fused, three_pass, winograd or fused_winograd, got {method!r}")


# TDC's ResNet-18 layers at batch 32, made by
#   DEFTNUMBA_BACKEND=cuda python -m deftnumba.tucker.audit --search K --shapes <the batch-32 layers>
# with K = 8 and 10 (session 21; the best of the runs, and at layer4 the 7x7 core-conv tile with
# 16 ranks per block, audited by hand: 28 threads, below the candidates' old 32-thread minimum).
# Session 22 counted the staging per shared store (it had been charged once per chunk where
# the compiler kept a loop of a few channels a pass) and made the core conv's staging cheaper;
# a `three_pass` search with K = 4 then moved layer3 to 7x7 tiles of 32 ranks (2x7 outputs per
# thread) and kept the other picks (they beat everything the search audited). Session 25
# copied the packed slices in 16-byte vectors; a search with K = 4 on layers 2-4 then moved
# `fused` at l2a to 4x14 tiles of 64-rank chunks, and at layer4 to channel chunks of 16 (the
# first factor's slice, 4 ranks a thread, is a vector copy), and kept the other picks.
# Session 28 split the core conv's input ranks over several blocks per tile (CoreTile.splits;
# the last block to finish adds the sums in split order); `three_pass` searches (K = 6 on
# layers 3-4, K = 4 on layer1 and layer2) moved layers 2-4 to split tiles (layer2: 14x14 tiles of
# 64 ranks, 4x7 outputs a thread, 2 splits; layer3: 14x14, 8x7 outputs a thread, 4 splits;
# layer4: 7x7 tiles of 4-rank chunks, 4x7 outputs a thread, 8 splits: at l4b this tile, tried by
# hand, beat the search's best) and kept layer1's.
# Session 31 added `winograd` (the core conv by Winograd's F(2x2, 3x3)): picks from a scan of
# 2x2-tile counts 8-32, rank blocks of 32-96 (10 or 12 ranks a thread where that divides the
# layer's ranks), chunks of 4 and 8, 1 or 2 splits, every candidate audited (not the formulas).
# Session 32 aligned the fused kernel's hidden row segments (fused.hidden_rows): layer1's picks
# from `--search 6 --methods fused` (l1a: 8x8 tiles of 8-pixel rows) and from slotted variants of
# the old pick tried by hand (l1b: 8 input channels a chunk make room for the slots); layer2's
# search moved l2a to 4 ranks a thread (70.47 -> 70.16 µs) and kept l2b; slotted variants of the
# layer2-3 picks tried by hand did not fit or were slower; layers 3-4 were not searched again.
# Session 34 put each thread's core outputs in aligned slots (fused.core_out_pitch); `--search 5
# --methods fused` on layers 2-3 then moved l2a to slotted rows and 4 input channels a chunk
# (68.88 -> 66.79 µs; its first, 7x7 tiles of 2 ranks a thread at 66.28 µs, took the multiply loop
# under the 85% FFMA that l2a meets: 84.8%) and l3b to slotted 7x7 tiles of 4 ranks (82.16 ->
# 77.50 µs), and kept l2b and l3a. At layer4, tiles of 4 pixels a thread tried by hand around
# the search's 2-pixel ones (the formulas rank 1- and 2-pixel tiles first there) beat the old
# 1-pixel pick and take the multiply loop from 70.6% to 89.4% FFMA: l4a 91.80 -> 82.19 µs (rank
# chunks of 32, 8 channels a chunk, 4 ranks a thread in the first 1x1), l4b 91.80 -> 90.96 µs.
# Session 37 re-picked `winograd` at layers 3-4 by the larger of the audit's two estimates, issue
# slots and one warp's stalls (perf.sass.stall_charges): the session-31 picks held one or two
# blocks of 4 warps on each busy SM and waited on their loads (l3a 12.96 us by issue slots,
# 35.93 with stalls; l4a 9.68 and 27.51). About 25 tiles audited by hand around them (tiles of 8
# and 16, rank blocks of 32-96, 1-8 splits, 3 included, now among the candidates too): 16 tiles
# of 32 ranks in 2 splits at layer3 (l3a 13.68 / 17.58 us), 16 tiles of 40 ranks in 3 splits at
# layer4 (l4a 11.18 / 11.18: three blocks a busy SM cover every wait). Issue slots rise 0.7-1.5
# us; the estimate with stalls falls by half or more (docs/tucker-notes.md, "Session 37").
# Keys: (batch, C, r_in, r_out, Cout, kh, kw, sh, sw, ph, pw, dh, dw, dtype); FusedTile(th, tw,
# rank_chunk, in_chunk, RO, RP, EO, UR, core_chunk), CoreTile(th, tw, chunk, OCB, RO, RP, splits) and
# WinogradTile(tiles, OB, CC, RO, RT, splits).
# Session 39 added `fused_winograd` (one launch, the core conv by F(2x2, 3x3)) at l2a only: the
# best of 25 tiles audited at l2a (4x14 tiles, all 64 input ranks in one chunk, 8 a thread in the
# first 1x1; 4 ranks transformed and multiplied at a time; 8 ranks x 7 tiles a thread), 53.64 us
# by issue slots and with stalls, against `fused`'s 66.79; at l2b and layer3 the tiles audited
# so far trail `fused` (docs/tucker-notes.md, "A one-launch layer with a Winograd core"). It has no formulas in this module:
# `best` and `choose_ranks` do not price it yet. FusedWinogradTile(th, tw, CR, CX, UR, CK, RO, RT,
# EO, LP).
# Session 40 picked it at l2b: the 96 input ranks in two chunks of 48 (6 a thread in the first
# 1x1), where session 39's 64-rank chunks padded them to 128 (98.37 us); by hand 4x14 tiles of 8
# channels a step (78.36 us with each thread's staged positions in slots), then
# `--search 4 --methods fused_winograd` (the formulas' 16 best) 2x14 tiles of 16 channels a step:
# 73.98 us by issue slots and with stalls, 1.30x the floor. It kept l2a's pick (52.59 us) and
# found nothing under 2.3x at layer3. At layer1 (`--search 4`) it picked 8x8 tiles: l1a 75.18 us
# (1.02x the floor), l1b 46.23 (1.16x), by issue slots and with stalls, where `fused` is at 1.45x;
# and at batch 1 8x4 tiles (l1a 9.52 us, l1b 6.41, the estimate with stalls).
AUDITED_PICKS: dict = {
    (32, 64, 64, 32, 64, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l1a-n32
        'fused': fused.FusedTile(8, 8, 64, 16, 4, 8, 8, 8, 4),  # 8-pixel rows, padded to 12 floats
        'three_pass': core_conv.CoreTile(8, 8, 8, 32, 8, 8),
        'winograd': winograd.WinogradTile(32, 32, 8, 8, 8),
        'fused_winograd': fused_winograd.FusedWinogradTile(8, 8, 64, 8, 4, 4, 16, 4, 4, 8),  # session 40
    },
    (32, 64, 32, 32, 64, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l1b-n32
        'fused': fused.FusedTile(8, 14, 32, 8, 4, 7, 8, 8, 8, row_slots=True),
        'three_pass': core_conv.CoreTile(8, 8, 8, 32, 8, 8),
        'winograd': winograd.WinogradTile(32, 32, 8, 8, 8),
        'fused_winograd': fused_winograd.FusedWinogradTile(8, 8, 32, 16, 4, 4, 8, 8, 4, 8),  # session 40
    },
    # batch 1, layer1: only `fused_winograd`'s picks (session 40), where `auto` runs it (`best`)
    (1, 64, 64, 32, 64, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l1a-n1
        'fused_winograd': fused_winograd.FusedWinogradTile(8, 4, 64, 16, 8, 4, 4, 4, 4, 4),
    },
    (1, 64, 32, 32, 64, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l1b-n1
        'fused_winograd': fused_winograd.FusedWinogradTile(8, 4, 32, 8, 4, 4, 4, 4, 4, 4),
    },
    (32, 128, 64, 64, 128, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l2a-n32
        'fused': fused.FusedTile(4, 14, 64, 4, 4, 7, 8, 8, 4, row_slots=True),
        'three_pass': core_conv.CoreTile(14, 14, 8, 64, 4, 7, splits=2),
        'winograd': winograd.WinogradTile(16, 64, 8, 8, 8),
        'fused_winograd': fused_winograd.FusedWinogradTile(4, 14, 64, 4, 8, 4, 8, 7, 4, 7),  # session 39
    },
    (32, 128, 96, 64, 128, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l2b-n32
        'fused': fused.FusedTile(8, 14, 48, 8, 8, 7, 4, 12, 4),  # 128 threads, 256 blocks (session 35)
        'three_pass': core_conv.CoreTile(14, 14, 8, 64, 4, 7, splits=2),
        'winograd': winograd.WinogradTile(16, 64, 8, 8, 8),
        'fused_winograd': fused_winograd.FusedWinogradTile(2, 14, 48, 16, 6, 4, 8, 7, 4, 7),  # session 40
    },
    (32, 256, 96, 96, 256, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l3a-n32
        'fused': fused.FusedTile(8, 7, 48, 8, 6, 7, 4, 12, 4),  # 128 threads; 6 ranks in 8-float slots
        'three_pass': core_conv.CoreTile(14, 14, 8, 32, 8, 7, splits=4),
        'winograd': winograd.WinogradTile(16, 32, 8, 8, 8, splits=2),  # 588 blocks (session 37)
    },
    (32, 256, 128, 96, 256, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l3b-n32
        'fused': fused.FusedTile(8, 7, 64, 8, 6, 7, 4, 16, 4),  # 128 threads; 6 ranks in 8-float slots
        'three_pass': core_conv.CoreTile(14, 14, 8, 32, 8, 7, splits=4),
        'winograd': winograd.WinogradTile(16, 32, 8, 8, 8, splits=2),  # 588 blocks (session 37)
    },
    (32, 512, 160, 160, 512, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l4a-n32
        'fused': fused.FusedTile(2, 8, 32, 16, 5, 4, 1, 4, 2),  # 128 threads; 5 ranks in 8-float slots
        'three_pass': core_conv.CoreTile(7, 7, 4, 32, 4, 7, splits=8),
        'winograd': winograd.WinogradTile(16, 40, 8, 10, 8, splits=3),  # 384 blocks (session 37)
    },
    (32, 512, 192, 160, 512, 3, 3, 1, 1, 1, 1, 1, 1, 'float32'): {  # r18-l4b-n32
        'fused': fused.FusedTile(2, 8, 64, 8, 5, 4, 1, 8, 2),  # 128 threads; 5 ranks in 8-float slots
        'three_pass': core_conv.CoreTile(7, 7, 4, 32, 4, 7, splits=8),
        'winograd': winograd.WinogradTile(16, 40, 8, 10, 8, splits=3),  # 384 blocks (session 37)
    },
}
"""``pick_key(g) -> {method: tile}``: the tile the SASS audit ranked first among the hand
model's best (``python -m deftnumba.tucker.audit --search K``), for the suite layers.
``rank_configs`` puts it first: the formulas above are fast enough for ``choose_ranks``'
sweeps but miss costs the compiled code shows (see ``tucker/audit.py``)."""


def pick_key(g: TuckerGeometry) -> tuple:
    """What a tile pick depends on: the layer and the batch (the grid's waves)."""
    return (g.batch, g.in_channels, g.rank_in, g.rank_out, g.out_channels, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
            g.pad_h, g.pad_w, g.dil_h, g.dil_w, str(g.dtype))


def rank_configs(g: TuckerGeometry, method: str, device: Device = H200, top: int | None = None,
                 coarse: bool = False, audited: bool = True) -> list[Prediction]:
    """Candidates of ``method`` sorted by predicted time (predictions); with ``audited``, the
    audit's pick for this layer (``AUDITED_PICKS``) comes first."""
    preds = [predict(g, method, t, device) for t in candidates(g, method, coarse)]
    preds = [p for p in preds if math.isfinite(p.ms)]
    preds.sort(key=lambda p: p.ms)
    pick = AUDITED_PICKS.get(pick_key(g), {}).get(method) if audited else None
    if pick is not None:
        preds = [predict(g, method, pick, device)] + [p for p in preds if p.config != pick]
    return preds[:top] if top else preds


@functools.lru_cache(maxsize=256)
def best(g: TuckerGeometry, device: Device = H200) -> tuple[str, object]:
    """``(method, tile)`` with the lowest predicted time among ``fused``, ``three_pass``, ``winograd``
    and ``fused_winograd`` (coarse tile grid, audited picks first; cached per layer). What
    ``tucker_conv2d(method="auto")`` runs on a GPU."""
    picks = []
    for method in ("fused", "three_pass", "winograd", "fused_winograd"):
        ranked = rank_configs(g, method, device=device, top=1, coarse=True)
        if ranked:
            picks.append(ranked[0])
    if not picks:
        return "three_pass", None
    p = min(picks, key=lambda p: p.ms)
    return p.method, p.config


def autotune(g: TuckerGeometry, method: str = "fused", top: int = 8, reps: int = 20, seed: int = 0) -> list[dict]:
    """GPU only: time the ``top`` predicted candidates (CUDA events, median of ``reps``)
    and return rows with ``predicted_ms`` and ``measured_ms``; the model's pick is the
    first row, ``trail`` = its measured time over the best measured, minus 1."""
    import numpy as np

    from ..runtime import backend
    from .ops import tucker_conv2d

    if backend.IS_SIMULATOR:
        raise RuntimeError("autotune measures on a GPU (DEFTNUMBA_BACKEND=cuda); use rank_configs for predictions")
    cp = backend.cupy()
    rng = np.random.default_rng(seed)
    shapes = g.shapes
    arrays = [cp.asarray(rng.standard_normal(shapes[k]).astype(g.dtype)) for k in ("input", "first", "core", "last")]
    kw = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))
    rows = []
    for p in rank_configs(g, method)[:top]:
        def call(config=p.config):
            return tucker_conv2d(*arrays, None, **kw, method=method, config=config)
        call()
        times = []
        for _ in range(reps):
            sw = backend.Stopwatch()
            with sw.section("run"):
                call()
            times.append(sw.milliseconds()["run"][0])
        rows.append({**p.row(), "measured_ms": float(np.median(times))})
    best = min(r["measured_ms"] for r in rows)
    for r in rows:
        r["trail"] = r["measured_ms"] / best - 1
    return rows
