"""Offset statistics -> out-of-tile model -> a tiling plan (DefT's second idea).

The fused kernel (``kernels/fused_tiled.py``) stages, per block, the input region
that a tile of output pixels would read with *zero* offsets, widened by a
``halo``. A deformed sample whose 2x2 bilinear footprint leaves that region is
an *out-of-tile* sample and is read from global memory instead (the exact rule:
``kernels.fused_tiled.OUT_OF_TILE``). Bigger tiles and halos catch more samples
but cost shared memory, occupancy and redundant halo loads. The right trade-off
depends on how far the offsets move, which this module measures.

The pipeline, each step usable on its own from a notebook:

1. ``offset_statistics(offset)`` -> ``OffsetStats``: the distribution of
   ``floor(dy)`` and ``floor(dx)`` (all the out-of-tile rule depends on), the
   quantiles of ``|dy|`` and ``|dx|`` and their spatial correlation length.
2. ``out_of_tile_fraction(geometry, stats, tile_h, tile_w, halo)``: the expected
   fraction of in-band samples that are out-of-tile, from the statistics alone.
   ``brute_force_counts(geometry, offset, tile)`` counts the real thing in NumPy
   (the kernel's counting build, ``fused_tiled.count_out_of_tile``, must agree).
3. ``predict(geometry, stats, method, tile)``: a cost model (FLOPs, staged and
   out-of-tile bytes, shared memory, occupancy) giving a predicted time.
4. ``choose_plan(geometry, stats)`` -> ``Plan``: the cheapest (method, tile) by
   that model. ``plan_for`` adds a cache; ``autotune`` times candidates on a GPU.

Plans are deterministic: equal statistics give equal plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import backend
from .kernels import fused_tiled
from .kernels.fused_tiled import OUT_OF_TILE, TileConfig, count_out_of_tile
from .perf import layer_audit, sass

__all__ = [
    "DeviceModel", "H200", "SIMULATOR", "OffsetStats", "Plan", "TileConfig", "OUT_OF_TILE",
    "offset_statistics", "normal_statistics", "out_of_tile_fraction", "out_of_tile_table",
    "brute_force_counts", "count_out_of_tile", "predict", "candidate_tiles", "choose_plan", "plan_for",
    "clear_plan_cache", "plan_cache_info", "autotune", "rank_tiles", "out_of_tile_sweep",
]

CLIP = 64
"""``floor(dy)`` and ``floor(dx)`` beyond +-CLIP are lumped at +-(CLIP+1): always out-of-tile
(or outside the band) for any tile the planner considers."""


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class OffsetStats:
    """Statistics of one layer's offsets (hashable, so they can key the plan cache).

    floor_y, floor_x: probability of each ``floor(d)`` value for ``d = dy`` / ``dx``, a
        tuple over the integers ``-CLIP-1 .. CLIP+1`` (the ends hold the far tails).
    nonfinite: fraction of (dy, dx) pairs with a NaN or inf (those sample zero).
    quantiles: ``(q, |dy| quantile, |dx| quantile)`` rows for q in 0.5, 0.9, 0.99, 1.
    mean_y, mean_x, rms_y, rms_x: moments of dy and dx (finite values).
    corr_y, corr_x: correlation length of dy and dx along output rows (y) and columns
        (x), in output pixels: the lag where the autocorrelation first falls below 1/e
        (interpolated; ``inf`` if it never does within the map, 0 for white noise).
    samples: how many (dy, dx) pairs were measured.
    """

    floor_y: tuple
    floor_x: tuple
    nonfinite: float = 0.0
    quantiles: tuple = ()
    mean_y: float = 0.0
    mean_x: float = 0.0
    rms_y: float = 0.0
    rms_x: float = 0.0
    corr_y: float = 0.0
    corr_x: float = 0.0
    samples: int = 0

    @property
    def support(self) -> np.ndarray:
        """The integers ``floor_y`` / ``floor_x`` are indexed by."""
        return np.arange(-CLIP - 1, CLIP + 2)

    def key(self, decimals: int = 3) -> tuple:
        """The plan-cache key: the floor distributions rounded to ``decimals``."""
        return (tuple(round(p, decimals) for p in self.floor_y),
                tuple(round(p, decimals) for p in self.floor_x), round(self.nonfinite, decimals))

    def summary(self) -> dict:
        """The few numbers a notebook quotes."""
        q = {f"|dy| q{int(row[0] * 100)}": row[1] for row in self.quantiles}
        q.update({f"|dx| q{int(row[0] * 100)}": row[2] for row in self.quantiles})
        return dict(samples=self.samples, mean_y=self.mean_y, mean_x=self.mean_x, rms_y=self.rms_y,
                    rms_x=self.rms_x, corr_y=self.corr_y, corr_x=self.corr_x,
                    nonfinite=self.nonfinite, **q)


def _floor_pmf(d: np.ndarray) -> tuple:
    f = np.floor(d[np.isfinite(d)])
    f = np.clip(f, -CLIP - 1, CLIP + 1).astype(np.int64) + CLIP + 1
    counts = np.bincount(f, minlength=2 * CLIP + 3).astype(np.float64)
    total = d.size
    return tuple(float(v) for v in counts / total) if total else tuple([0.0] * (2 * CLIP + 3))


def _correlation_length(maps: np.ndarray, axis: int, max_lag: int = 16) -> float:
    """Lag (in pixels) at which the mean autocorrelation of ``maps[..., H, W]`` along ``axis``
    first drops below 1/e, linearly interpolated."""
    maps = np.where(np.isfinite(maps), maps, 0.0)
    maps = maps - maps.mean(axis=(-2, -1), keepdims=True)
    var = float(np.mean(maps * maps))
    if var == 0.0:
        return 0.0
    n = maps.shape[axis]
    previous = 1.0
    for lag in range(1, min(max_lag, n - 1) + 1):
        a = np.take(maps, np.arange(n - lag), axis=axis)
        b = np.take(maps, np.arange(lag, n), axis=axis)
        rho = float(np.mean(a * b)) / var
        if rho < 1.0 / math.e:
            return lag - 1 + (previous - 1.0 / math.e) / (previous - rho)
        previous = rho
    return math.inf


def offset_statistics(offset, max_maps: int = 256) -> OffsetStats:
    """Measure ``OffsetStats`` of one layer's offsets ``[N, 2*G*K, Ho, Wo]`` (NumPy or CuPy).

    The floor distributions and quantiles use every value; the correlation lengths
    use at most ``max_maps`` (image, tap) maps, chosen evenly.
    """
    off = np.asarray(backend.to_host(offset), dtype=np.float64)
    if off.ndim != 4 or off.shape[1] % 2:
        raise ValueError(f"offset must be [N, 2*G*K, Ho, Wo], got shape {off.shape}")
    dy, dx = off[:, 0::2], off[:, 1::2]
    finite = np.isfinite(dy) & np.isfinite(dx)
    ay, ax = np.abs(dy[finite]), np.abs(dx[finite])
    qs = (0.5, 0.9, 0.99, 1.0)
    quantiles = tuple((q, float(np.quantile(ay, q)) if ay.size else 0.0,
                       float(np.quantile(ax, q)) if ax.size else 0.0) for q in qs)
    maps_y = dy.reshape(-1, *dy.shape[2:])
    maps_x = dx.reshape(-1, *dx.shape[2:])
    pick = np.unique(np.linspace(0, maps_y.shape[0] - 1, min(max_maps, maps_y.shape[0])).astype(int))
    return OffsetStats(
        floor_y=_floor_pmf(dy), floor_x=_floor_pmf(dx), nonfinite=float(1.0 - finite.mean()),
        quantiles=quantiles,
        mean_y=float(dy[finite].mean()) if ay.size else 0.0,
        mean_x=float(dx[finite].mean()) if ax.size else 0.0,
        rms_y=float(np.sqrt(np.mean(dy[finite] ** 2))) if ay.size else 0.0,
        rms_x=float(np.sqrt(np.mean(dx[finite] ** 2))) if ax.size else 0.0,
        corr_y=_correlation_length(maps_y[pick], axis=-2),
        corr_x=_correlation_length(maps_x[pick], axis=-1),
        samples=int(dy.size),
    )


def normal_statistics(sigma: float = 1.0, mean: tuple = (0.0, 0.0)) -> OffsetStats:
    """``OffsetStats`` of independent ``dy ~ N(mean[0], sigma^2)``, ``dx ~ N(mean[1], sigma^2)``,
    computed exactly (no sampling). The default prior of ``plan_for`` when no offsets are
    given: trained DCN layers typically move taps by about a pixel."""
    ks = np.arange(-CLIP - 1, CLIP + 2, dtype=np.float64)

    def pmf(mu):
        if sigma <= 0:
            p = (ks == np.clip(math.floor(mu), -CLIP - 1, CLIP + 1)).astype(np.float64)
            return tuple(float(v) for v in p)
        cdf = lambda t: 0.5 * (1.0 + np.vectorize(math.erf)((t - mu) / (sigma * math.sqrt(2.0))))
        lo = np.where(ks == -CLIP - 1, -np.inf, ks)
        hi = np.where(ks == CLIP + 1, np.inf, ks + 1)
        return tuple(float(v) for v in cdf(hi) - cdf(lo))

    half = lambda q: sigma * math.sqrt(2.0) * _erfinv(q) if q < 1 else math.inf
    quantiles = tuple((q, half(q), half(q)) for q in (0.5, 0.9, 0.99, 1.0)) if mean == (0.0, 0.0) else ()
    return OffsetStats(floor_y=pmf(mean[0]), floor_x=pmf(mean[1]), quantiles=quantiles,
                       mean_y=float(mean[0]), mean_x=float(mean[1]), rms_y=math.hypot(sigma, mean[0]),
                       rms_x=math.hypot(sigma, mean[1]))


def _erfinv(q: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(100):  # bisection: plenty for a quantile
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erf(mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- the out-of-tile rule
def _axis_terms(size, out_size, stride, pad, dil, taps, tile, halo, support, pmf):
    """Per axis: expected in-band and in-tile probability mass, summed over (output index, tap).

    For output index o, tap t: row r = o*stride - pad + t*dil; a floor f = floor(d) puts the
    footprint at rows r+f, r+f+1, clamped into [0, size-1]. The tile of o stages rows
    [o0*stride - pad - halo, ... + span) with o0 = (o // tile) * tile.
    """
    span = (tile - 1) * stride + (taps - 1) * dil + 1 + 2 * halo
    o = np.arange(out_size)[:, None, None]
    t = np.arange(taps)[None, :, None]
    f = support[None, None, :]
    first = o * stride - pad + t * dil + f
    band = (first >= -1) & (first <= size - 1)
    lo = np.maximum(first, 0)
    hi = np.minimum(first + 1, size - 1)
    start = (o // tile) * tile * stride - pad - halo
    inside = band & (lo >= start) & (hi <= start + span - 1)
    p = np.asarray(pmf, dtype=np.float64)[None, None, :]
    return float((band * p).sum()), float((inside * p).sum())


def out_of_tile_fraction(geometry, stats: OffsetStats, tile_h: int, tile_w: int, halo: int) -> float:
    """Expected fraction of in-band samples that are out-of-tile, from the statistics alone.

    Model: every (pixel, tap) draws ``floor(dy)`` and ``floor(dx)`` independently from
    ``stats.floor_y`` / ``stats.floor_x``. Under that assumption the expected numbers of
    in-band and in-tile samples factor into a row sum times a column sum over
    (output index, tap), image borders and ragged edge tiles included, and the fraction is
    ``1 - E[in-tile] / E[in-band]``. It is exact in expectation for independent offsets;
    spatial correlation does not change the expectation (only how it varies from tile to
    tile), correlation *between* dy and dx does. One convention differs from the kernel
    on a set of measure zero: a position exactly on ``y = -1`` (or ``x = -1``) is outside
    the band for the kernel but counted by its floor (-1) here; it matters only for
    offsets that put samples exactly there (integer offsets next to a padded border).
    """
    g = geometry
    support = stats.support
    band_y, in_y = _axis_terms(g.height, g.out_h, g.stride_h, g.pad_h, g.dil_h, g.kernel_h,
                               tile_h, halo, support, stats.floor_y)
    band_x, in_x = _axis_terms(g.width, g.out_w, g.stride_w, g.pad_w, g.dil_w, g.kernel_w,
                               tile_w, halo, support, stats.floor_x)
    band = band_y * band_x
    return 0.0 if band <= 0 else max(0.0, 1.0 - (in_y * in_x) / band)


def out_of_tile_table(geometry, stats: OffsetStats, tiles=(2, 4, 8, 16, 32), halos=(0, 1, 2, 3, 4)):
    """``out_of_tile_fraction`` for square tiles x halos: a ``[len(tiles), len(halos)]`` array
    (rows: tile side, columns: halo), ready for a heat map or one line per halo."""
    return np.array([[out_of_tile_fraction(geometry, stats, t, t, h) for h in halos] for t in tiles])


def brute_force_counts(geometry, offset, tile: TileConfig) -> dict:
    """Count in-tile, out-of-tile and outside-band samples in NumPy, by the kernel's rule.

    Uses the same float arithmetic as the kernel (position = float(base) + offset in the
    layer's dtype), so the counts equal ``fused_tiled.count_out_of_tile`` exactly.
    Returns the same dict as that function.
    """
    g = geometry
    dt = np.dtype(g.dtype).type
    off = np.asarray(backend.to_host(offset)).astype(dt, copy=False)
    n, k, ho, wo = g.batch, g.taps, g.out_h, g.out_w
    off = off.reshape(n, g.offset_groups, k, 2, ho, wo)
    ti, tj = np.divmod(np.arange(k), g.kernel_w)
    oy = np.arange(ho)
    ox = np.arange(wo)
    base_y = (oy[None, :] * g.stride_h - g.pad_h + ti[:, None] * g.dil_h).astype(dt)[:, :, None]  # [K,Ho,1]
    base_x = (ox[None, :] * g.stride_w - g.pad_w + tj[:, None] * g.dil_w).astype(dt)[:, None, :]  # [K,1,Wo]
    y = base_y + off[:, :, :, 0]
    x = base_x + off[:, :, :, 1]
    with np.errstate(invalid="ignore"):
        band = (y > dt(-1)) & (y < dt(g.height)) & (x > dt(-1)) & (x < dt(g.width))
    fy = np.floor(np.where(band, y, 0)).astype(np.int64)
    fx = np.floor(np.where(band, x, 0)).astype(np.int64)
    rows, cols = tile.staged_shape(g)
    iy0 = ((oy // tile.tile_h) * tile.tile_h * g.stride_h - g.pad_h - tile.halo)[None, :, None]
    ix0 = ((ox // tile.tile_w) * tile.tile_w * g.stride_w - g.pad_w - tile.halo)[None, None, :]
    inside = (band & (np.maximum(fy, 0) >= iy0) & (np.minimum(fy + 1, g.height - 1) <= iy0 + rows - 1)
              & (np.maximum(fx, 0) >= ix0) & (np.minimum(fx + 1, g.width - 1) <= ix0 + cols - 1))
    per_position = g.in_channels // g.offset_groups
    in_tile = int(inside.sum()) * per_position
    inband = int(band.sum()) * per_position
    total = n * g.offset_groups * k * ho * wo * per_position
    out_tile = inband - in_tile
    return {"in_tile": in_tile, "out_of_tile": out_tile, "outside_band": total - inband,
            "out_of_tile_fraction": out_tile / inband if inband else 0.0}


# --------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class DeviceModel:
    """The device facts the cost model uses. Numbers not from a datasheet are marked."""

    name: str
    sms: int
    fp32_flops: float           # FLOP/s, FMA = 2
    fp64_flops: float
    dram_bandwidth: float       # B/s (copy bandwidth measured on the H200: ~4.3 TB/s)
    l2_bandwidth: float         # B/s (assumed ~2.5x DRAM; not measured)
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 48 * 1024   # static shared memory limit per block
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    blocks_per_sm: int = 32
    max_threads: int = 512      # largest block the planner considers
    min_threads: int = 64
    gemm_efficiency: float = 0.75  # vendor GEMM fraction of peak (assumed)
    simulated: bool = False     # cost = the simulator's Python work, not GPU time


H200 = DeviceModel("H200", sms=132, fp32_flops=67e12, fp64_flops=34e12, dram_bandwidth=4.3e12,
                   l2_bandwidth=11e12)
SIMULATOR = replace(H200, name="simulator", max_threads=64, min_threads=16, simulated=True)
"""The simulator: small blocks, and the cost is Python work (~100 us per simulated thread plus
~1 us per thread instruction), so plans made there keep the test suite fast."""


def _chunks_per_block(geometry, chunk: int) -> float:
    """Channel chunks one block steps through (mean over weight groups): the group's channels
    split at offset-group boundaries, each piece in steps of ``chunk``."""
    g = geometry
    cpg = g.in_channels // g.groups
    cpo = g.in_channels // g.offset_groups
    total = 0
    for group in range(g.groups):
        c, end = group * cpg, (group + 1) * cpg
        while c < end:
            seg_end = min(end, (c // cpo + 1) * cpo)
            total += -(-(seg_end - c) // chunk)
            c = seg_end
    return total / g.groups


_MEASURED: dict = {}


def _measured_counts(dtype, reg_oc: int, reg_px: int) -> dict | None:
    """``{registers, spill_bytes, phases: {name: {body, straight}}}`` of the fused kernel with
    this register blocking, measured from its SASS (the committed planner table), or ``None``
    when the table lacks it. The table is read once per process."""
    if "table" not in _MEASURED:
        table = layer_audit.load_planner_table()
        if table is None:
            raise RuntimeError(f"the planner's measured SASS counts are missing ({layer_audit.PLANNER_TABLE}); "
                               "make them with: python -m deftnumba audit --planner-table (no GPU needed)")
        _MEASURED["table"] = table
    return _MEASURED["table"]["configs"].get(layer_audit.planner_key(str(dtype), reg_oc, reg_px))


def _phase_iterations(geometry, tile: TileConfig, fraction: float) -> dict:
    """Iterations per thread of each phase: the kernel module's ``phase_model`` if it has one,
    else the model of today's kernel (``perf.layer_audit.before_phase_model``)."""
    model = getattr(fused_tiled, "phase_model", None)
    if model is not None:
        return dict(model(geometry, tile))
    return layer_audit.before_phase_model("fused", geometry, tile, fraction)


def _fused_terms(geometry, tile: TileConfig, fraction: float, device: DeviceModel) -> dict:
    g = geometry
    s = g.itemsize
    k = g.taps
    cpg = g.in_channels // g.groups
    opg = g.out_channels // g.groups
    tiles, gy, _ = tile.blocks(g)
    oc_blocks = gy // g.groups
    blocks = tiles * gy * g.batch
    rows, cols = tile.staged_shape(g)
    p_tile = tile.pixels
    # issue slots: per-phase instruction counts measured in the compiled kernel's SASS for this
    # register blocking (data/fused_phase_counts.json, from `python -m deftnumba audit
    # --planner-table`), times the iterations each phase runs per thread (the kernel's phase
    # model), through the audit's issue-slot model; registers measured by ptxas too.
    samples = blocks * cpg * k * p_tile
    staged = blocks * cpg * rows * cols
    shared = tile.shared_bytes(g)
    measured = _measured_counts(g.dtype, tile.reg_oc, tile.reg_px)
    if measured is None:
        return {"feasible": False, "shared_bytes": shared, "reason": "no measured phase counts for this blocking"}
    regs = measured["registers"]
    if measured.get("spill_bytes"):  # spills to local memory: not a candidate
        return {"feasible": False, "shared_bytes": shared, "registers": regs}
    per_thread = sass.per_thread_instructions(measured["phases"], _phase_iterations(g, tile, fraction))
    issue = sass.issue_model(per_thread, blocks, tile.threads, regs, shared + sass.SYSTEM_SHARED_RESERVE, device)
    per_sm = issue["blocks_per_sm"]
    if per_sm < 1 or shared > device.shared_per_block:
        return {"feasible": False, "shared_bytes": shared}
    slots = issue["per_thread"] * tile.threads * blocks  # thread instructions of the launch
    peak = device.fp32_flops if g.dtype == "float32" else device.fp64_flops
    warps = issue["warps_per_sm"]
    # ~8 resident warps keep an SM busy when each thread has many independent FMAs in
    # flight (register-blocked GEMM loops reach near peak at 8 warps/SM); assumed
    latency_hiding = min(1.0, warps / 8.0)
    waves = issue["waves"]
    wave_efficiency = blocks / (waves * per_sm * device.sms)
    flops_total = 2 * g.batch * g.out_channels * cpg * k * g.out_h * g.out_w
    # the issue-bound time, or the arithmetic rate where it is lower (float64: half rate)
    compute_s = max(issue["seconds"], flops_total / (peak * wave_efficiency)) / latency_hiding
    # bytes: DRAM sees each array once (the halo re-reads and per-block weight slices hit L2);
    # L2 sees the staged tiles, the table inputs per output-channel block and the out-of-tile
    # sectors (4 corners x 32 B).
    dram = s * (g.batch * g.in_channels * g.height * g.width
                + g.batch * g.offset_groups * k * g.out_h * g.out_w * (3 if g.has_mask else 2)
                + g.out_channels * cpg * k + g.batch * g.out_channels * g.out_h * g.out_w)
    l2 = (s * staged + s * blocks * cpg * k * tile.oc_block
          + oc_blocks * s * g.batch * g.offset_groups * k * g.out_h * g.out_w * 3 * max(1, g.groups // g.offset_groups)
          + samples * fraction * 4 * 32)
    memory_s = max(dram / device.dram_bandwidth, l2 / device.l2_bandwidth)
    flops = 2 * g.batch * g.out_channels * cpg * k * g.out_h * g.out_w
    seconds = max(compute_s, memory_s)
    if device.simulated:
        seconds = 1e-4 * blocks * tile.threads + 1e-6 * slots
    return {"feasible": True, "seconds": seconds, "compute_s": compute_s,
            "memory_s": memory_s, "flops": flops, "dram_bytes": dram, "l2_bytes": l2,
            "staged_bytes": s * staged, "halo_redundancy": staged / max(1, blocks * cpg * p_tile),
            "out_of_tile": fraction, "shared_bytes": shared, "blocks": blocks,
            "blocks_per_sm": per_sm, "waves": waves, "wave_efficiency": wave_efficiency,
            "registers": regs, "instructions_per_thread": issue["per_thread"], "issue_s": issue["seconds"]}


def _im2col_terms(geometry, device: DeviceModel) -> dict:
    g = geometry
    s = g.itemsize
    k = g.taps
    cols = g.in_channels * k * g.batch * g.out_h * g.out_w
    positions = g.batch * g.offset_groups * k * g.out_h * g.out_w * 2
    dram = s * (2 * positions * 2 + g.batch * g.in_channels * g.height * g.width
                + (positions // 2 if g.has_mask else 0) + 2 * cols
                + 3 * g.batch * g.out_channels * g.out_h * g.out_w)  # GEMM out, transpose, bias
    flops = 2 * g.batch * g.out_channels * (g.in_channels // g.groups) * k * g.out_h * g.out_w
    peak = device.fp32_flops if g.dtype == "float32" else device.fp64_flops
    seconds = dram / device.dram_bandwidth + flops / (peak * device.gemm_efficiency)
    if device.simulated:  # <= 512 simulated threads per launch; ~30 instructions per sample
        seconds = 2 * 1e-4 * min(512, cols // k + 1) + 1e-6 * 30 * cols
    return {"feasible": True, "seconds": seconds, "flops": flops, "dram_bytes": dram,
            "column_bytes": s * cols}


def predict(geometry, stats: OffsetStats, method: str = "fused", tile: TileConfig | None = None,
            device: DeviceModel = H200) -> dict:
    """The cost model's breakdown for one (method, tile): predicted ``seconds`` and its terms.

    ``fused`` terms: ``compute_s`` (the SASS audit's issue-slot model: per-phase instruction
    counts measured in the compiled kernel, ``data/fused_phase_counts.json``, times each
    phase's iterations; derated by occupancy and wave quantisation), ``memory_s`` (max of DRAM and L2 time),
    ``out_of_tile`` (the modelled fraction), ``shared_bytes``, ``blocks_per_sm``,
    ``halo_redundancy`` (staged elements per output pixel and channel). ``im2col``: the
    column buffer written and read at DRAM bandwidth plus a vendor GEMM.
    Infeasible tiles (shared memory over the per-block limit) give ``feasible: False``.
    """
    if method == "im2col":
        return _im2col_terms(geometry, device)
    if method != "fused":
        raise ValueError(f"the cost model knows 'fused' and 'im2col', got {method!r}")
    tile = tile or fused_tiled.default_config(geometry)
    fraction = out_of_tile_fraction(geometry, stats, tile.tile_h, tile.tile_w, tile.halo)
    return _fused_terms(geometry, tile, fraction, device)


def candidate_tiles(geometry, device: DeviceModel = H200):
    """The tile configs the planner considers, in a fixed order (deterministic plans)."""
    g = geometry
    opg = g.out_channels // g.groups
    sides = (1, 2, 4, 8, 16, 32)
    max_h = min(32, 1 << max(0, (g.out_h - 1).bit_length()))
    max_w = min(32, 1 << max(0, (g.out_w - 1).bit_length()))
    oc_blocks = sorted({min(b, 1 << max(0, (opg - 1).bit_length())) for b in (4, 8, 16, 32, 64, 128)})
    # tiny layers cannot fill min_threads: then the largest block they allow is accepted
    most = min(device.max_threads, oc_blocks[-1] * max_h * max_w)
    for th in sides:
        if th > max_h:
            continue
        for tw in sides:
            if tw > max_w or (th * tw < 4 and max_h * max_w >= 4):
                continue
            for ocb in oc_blocks:
                for ro in (1, 2, 4, 8):
                    for rp in (1, 2, 4, 8):
                        if ocb % ro or (th * tw) % rp:
                            continue
                        threads = (ocb // ro) * (th * tw // rp)
                        if threads > device.max_threads or threads < min(device.min_threads, most):
                            continue
                        if threads % 16 and threads != most:
                            continue
                        for chunk in (1, 2, 4, 8):
                            for halo in (0, 1, 2, 3, 4):
                                yield TileConfig(th, tw, halo, chunk, ocb, ro, rp)


def rank_tiles(geometry, stats: OffsetStats | None = None, top: int = 10,
               device: DeviceModel | None = None) -> list:
    """The ``top`` fused tiles by predicted time: ``[(TileConfig, predict-terms dict), ...]``,
    fastest first (ties in ``candidate_tiles`` order). Shows a notebook reader what the
    planner weighed: ``terms["out_of_tile"]``, ``["shared_bytes"]``, ``["blocks_per_sm"]``,
    ``["halo_redundancy"]``, ``["compute_s"]``, ``["memory_s"]``."""
    stats = stats or _PRIOR
    device = device or (SIMULATOR if backend.IS_SIMULATOR else H200)
    fractions, scored = {}, []
    for tile in candidate_tiles(geometry, device):
        if tile.shared_bytes(geometry) > device.shared_per_block:
            continue
        key = (tile.tile_h, tile.tile_w, tile.halo)
        if key not in fractions:
            fractions[key] = out_of_tile_fraction(geometry, stats, *key)
        terms = _fused_terms(geometry, tile, fractions[key], device)
        if terms["feasible"]:
            scored.append((terms["seconds"], len(scored), tile, terms))
    scored.sort(key=lambda item: item[:2])
    return [(tile, terms) for _, _, tile, terms in scored[:top]]


def out_of_tile_sweep(geometry, offset, tiles=((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)),
                      halos=(0, 1, 2, 3, 4), count: str = "numpy") -> dict:
    """Model against measurement over tile shapes x halos, for one layer's offsets.

    Returns ``{"tiles", "halos", "model", "measured"}``; ``model`` and ``measured`` are
    ``[len(tiles), len(halos)]`` out-of-tile fractions. ``model`` comes from
    ``offset_statistics(offset)`` alone; ``measured`` counts the real samples with
    ``brute_force_counts`` (``count="numpy"``) or the kernel's counting build
    (``count="kernel"``: the same numbers, slow in the simulator, so small layers only).
    """
    if count not in ("numpy", "kernel"):
        raise ValueError(f"count must be 'numpy' or 'kernel', got {count!r}")
    stats = offset_statistics(offset)
    model = np.zeros((len(tiles), len(halos)))
    measured = np.zeros_like(model)
    for a, (th, tw) in enumerate(tiles):
        for b, halo in enumerate(halos):
            model[a, b] = out_of_tile_fraction(geometry, stats, th, tw, halo)
            tile = TileConfig(th, tw, halo, 1, 1, 1, 1)
            counter = brute_force_counts if count == "numpy" else count_out_of_tile
            measured[a, b] = counter(geometry, offset, tile)["out_of_tile_fraction"]
    return {"tiles": tuple(tiles), "halos": tuple(halos), "model": model, "measured": measured}


@dataclass(frozen=True)
class Plan:
    """A forward plan: which method, and for ``fused`` which tile. Frozen and hashable.

    method:        ``"fused"`` or ``"im2col"``.
    tile:          the fused kernel's ``TileConfig`` (``None`` for other methods).
    predicted_ms:  the cost model's time on ``device`` (not a measurement).
    out_of_tile:   modelled out-of-tile fraction of in-band samples for ``tile``.
    shared_bytes:  static shared memory per block.
    device:        the ``DeviceModel`` name the plan was made for.
    measured_ms:   set by ``autotune`` (CUDA-event median), else ``None``.
    """

    method: str
    tile: TileConfig | None = None
    predicted_ms: float = math.nan
    out_of_tile: float = math.nan
    shared_bytes: int = 0
    device: str = "H200"
    measured_ms: float | None = field(default=None, compare=False)


def choose_plan(geometry, stats: OffsetStats | None = None, device: DeviceModel | None = None,
                methods=("fused", "im2col")) -> Plan:
    """The cheapest (method, tile) for ``geometry`` under the cost model. Deterministic.

    ``stats`` defaults to ``normal_statistics(1.0)``; ``device`` to ``SIMULATOR`` in the
    simulator (small blocks) and ``H200`` otherwise. Ties go to the earlier candidate
    in ``candidate_tiles`` order. A fused tile must fit the per-block shared limit.
    """
    stats = stats or normal_statistics(1.0)
    device = device or (SIMULATOR if backend.IS_SIMULATOR else H200)
    best = None
    if "fused" in methods:
        ranked = rank_tiles(geometry, stats, 1, device)
        if ranked:
            tile, terms = ranked[0]
            best = (terms["seconds"], Plan("fused", tile, terms["seconds"] * 1e3, terms["out_of_tile"],
                                           terms["shared_bytes"], device.name))
    if "im2col" in methods:
        seconds = _im2col_terms(geometry, device)["seconds"]
        if best is None or seconds < best[0]:
            best = (seconds, Plan("im2col", None, seconds * 1e3, device=device.name))
    if best is None:
        raise ValueError(f"no feasible plan among methods {methods}")
    return best[1]


_PLAN_CACHE: dict = {}
_CACHE_STATS = {"hits": 0, "misses": 0}


def plan_for(geometry, offset=None, stats: OffsetStats | None = None,
             device: DeviceModel | None = None, methods=("fused", "im2col")) -> Plan:
    """``choose_plan`` with a cache keyed by (geometry, rounded statistics, device, methods).

    Pass ``offset`` (measured with ``offset_statistics``) or ``stats``; with neither, the
    prior ``normal_statistics(1.0)`` is used (what ``method="auto"`` does).
    """
    if stats is None:
        stats = offset_statistics(offset) if offset is not None else _PRIOR
    device = device or (SIMULATOR if backend.IS_SIMULATOR else H200)
    key = (geometry, stats.key(), device, tuple(methods))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        _CACHE_STATS["misses"] += 1
        plan = _PLAN_CACHE[key] = choose_plan(geometry, stats, device, methods)
    else:
        _CACHE_STATS["hits"] += 1
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan (and reset the hit/miss counters)."""
    _PLAN_CACHE.clear()
    _CACHE_STATS.update(hits=0, misses=0)


def plan_cache_info() -> dict:
    """``{"size", "hits", "misses"}`` of the plan cache."""
    return {"size": len(_PLAN_CACHE), **_CACHE_STATS}


_PRIOR = normal_statistics(1.0)


# --------------------------------------------------------------------------- autotuning
def autotune(geometry, input, offset, weight, bias=None, mask=None, candidates=None,
             top: int = 8, repeats: int = 20, warmup: int = 2, stats: OffsetStats | None = None) -> Plan:
    """Time candidate plans and cache the fastest for (geometry, statistics of ``offset``).

    candidates: ``Plan``s or ``TileConfig``s; by default the ``top`` fused tiles by the cost
    model plus ``im2col``. Each runs ``warmup`` times, then ``repeats`` times timed with
    CUDA events (``backend.Stopwatch``; host clock in the simulator, where this is only a
    smoke test). The winner is returned with ``measured_ms`` (median) set.
    """
    from .kernels import im2col

    stats = stats or offset_statistics(offset)
    device = SIMULATOR if backend.IS_SIMULATOR else H200
    if candidates is None:
        candidates = [t for t, _ in rank_tiles(geometry, stats, top, device)] + [Plan("im2col", device=device.name)]
    arrays = [backend.to_device(a) if a is not None else None for a in (input, offset, weight, bias, mask)]
    xp = backend.array_module(arrays[0])
    out = xp.empty(geometry.shapes["output"], dtype=arrays[0].dtype)
    best = None
    for cand in candidates:
        plan = cand if isinstance(cand, Plan) else Plan(
            "fused", cand, out_of_tile=out_of_tile_fraction(geometry, stats, cand.tile_h, cand.tile_w, cand.halo),
            shared_bytes=cand.shared_bytes(geometry), device=device.name)
        run = ((lambda sw: fused_tiled.forward(geometry, *arrays, out, sw, plan=plan)) if plan.method == "fused"
               else (lambda sw: im2col.forward(geometry, *arrays, out, sw)))
        for _ in range(warmup):
            run(backend.NO_STOPWATCH)
        watch = backend.Stopwatch()
        for _ in range(repeats):
            with watch.section("run"):
                run(backend.NO_STOPWATCH)
        ms = float(np.median(watch.milliseconds()["run"]))
        if best is None or ms < best.measured_ms:
            best = replace(plan, measured_ms=ms)
    _PLAN_CACHE[(geometry, stats.key(), device, ("fused", "im2col"))] = best
    return best
