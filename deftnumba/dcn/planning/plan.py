"""Offset statistics -> out-of-tile model -> a tiling plan (DefT's second idea).

The fused kernel (``kernels/fused_tiled.py``) stages, per block, the input region
that a tile of output pixels would read with *zero* offsets, widened by a
``halo``. A deformed sample whose 2x2 bilinear footprint leaves that region is
an *out-of-tile* sample and is read from global memory instead (the exact rule:
``kernels.fused_tiled.OUT_OF_TILE``). Bigger tiles and halos catch more samples
but cost shared memory, occupancy and redundant halo loads. The right trade-off
depends on how far the offsets move, which this module measures.

The pipeline, each step usable on its own from a notebook:

1. ``offset_statistics(offset)`` -> ``OffsetStats`` (``planning/stats.py``): the distribution of
   ``floor(dy)`` and ``floor(dx)`` (all the out-of-tile rule depends on), the
   quantiles of ``|dy|`` and ``|dx|`` and their spatial correlation length.
2. ``out_of_tile_fraction(geometry, stats, tile_h, tile_w, halo)`` (``planning/out_of_tile.py``): the expected
   fraction of in-band samples that are out-of-tile, from the statistics alone.
   ``brute_force_counts(geometry, offset, tile)`` counts the real thing in NumPy
   (the kernel's counting build, ``fused_tiled.count_out_of_tile``, must agree).
3. ``predict(geometry, stats, method, tile)`` (here, with the plan): a cost model (FLOPs, staged and
   out-of-tile bytes, shared memory, occupancy) giving a predicted time.
4. ``choose_plan(geometry, stats)`` -> ``Plan``: the cheapest (method, tile) by
   that model. ``plan_for`` adds a cache; ``autotune`` times candidates on a GPU.

Plans are deterministic: equal statistics give equal plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


from ...runtime import backend, precision
from ...perf.device import H200, SIMULATOR, DeviceModel
from ...runtime.timing import time_calls
from ..kernels import fused_tiled
from ..kernels.fused_tiled import OUT_OF_TILE, TileConfig, count_out_of_tile
from .out_of_tile import brute_force_counts, out_of_tile_fraction, out_of_tile_sweep, out_of_tile_table  # noqa: F401
from .stats import CLIP, OffsetStats, normal_statistics, offset_statistics  # noqa: F401
from ...perf import sass
from .. import audit as dcn_audit

__all__ = [
    "DeviceModel", "H200", "SIMULATOR", "OffsetStats", "Plan", "TileConfig", "OUT_OF_TILE",
    "offset_statistics", "normal_statistics", "out_of_tile_fraction", "out_of_tile_table",
    "brute_force_counts", "count_out_of_tile", "predict", "candidate_tiles", "choose_plan", "plan_for",
    "clear_plan_cache", "plan_cache_info", "autotune", "rank_tiles", "out_of_tile_sweep",
]

# --------------------------------------------------------------------------- cost model
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
        table = dcn_audit.load_planner_table()
        if table is None:
            raise RuntimeError(f"the planner's measured SASS counts are missing ({dcn_audit.PLANNER_TABLE}); "
                               "make them with: python -m deftnumba audit --planner-table (no GPU needed)")
        _MEASURED["table"] = table
    # float16/bfloat16 kernels compute in float32: the float32 counts stand in for them
    compute = precision.compute_dtype(dtype).name
    return _MEASURED["table"]["configs"].get(dcn_audit.planner_key(compute, reg_oc, reg_px))


TIE_BREAK_MEMORY = 0.01  # ranking: 1% of the memory time breaks ties in issue time toward fewer bytes


def _phase_iterations(geometry, tile: TileConfig, fraction: float) -> dict:
    """Iterations per thread of each phase: the kernel's ``phase_model`` in the units of the
    measured counts (``dcn.audit.fused_iterations``, ``dcn.audit.normalise_fused``)."""
    return dcn_audit.fused_iterations(geometry, tile)


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
    # the out-of-tile path of the column build (warps with an out-of-tile lane issue it)
    # (its body is measured too: phase ``out_of_tile``)
    _, oot_iterations = dcn_audit.out_of_tile_phase(g, tile, fraction)
    phases = dict(measured["phases"])
    per_thread = sass.per_thread_instructions(phases, {**_phase_iterations(g, tile, fraction),
                                                       "out_of_tile": oot_iterations})
    issue = sass.issue_model(per_thread, blocks, tile.threads, regs, shared + sass.SYSTEM_SHARED_RESERVE, device)
    per_sm = issue["blocks_per_sm"]
    if per_sm < 1 or shared > device.shared_per_block:
        return {"feasible": False, "shared_bytes": shared}
    slots = issue["per_thread"] * tile.threads * blocks  # thread instructions of the launch
    peak = device.fp32_flops if precision.compute_dtype(g.dtype).name == "float32" else device.fp64_flops
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
    peak = device.fp32_flops if precision.compute_dtype(g.dtype).name == "float32" else device.fp64_flops
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


_POWERS = (1, 2, 4, 8, 16, 32)
_FIT_MIN = 3  # smallest non-power-of-two side considered
_FIT_STRIPS = 8  # fitted sides cut the output into at most this many strips


def candidate_tiles(geometry, device: DeviceModel = H200):
    """The tile configs the planner considers, in a fixed order (deterministic plans)."""
    g = geometry
    opg = g.out_channels // g.groups
    max_h = min(32, 1 << max(0, (g.out_h - 1).bit_length()))
    max_w = min(32, 1 << max(0, (g.out_w - 1).bit_length()))
    # powers of two, and the sides that cut the output into k equal strips (25 rows: 25, 13,
    # 9, 7, 5; 68 columns: 23, 17, 14, 12, ...): edge tiles are masked, so a side that fits
    # the output wastes fewer threads than the next power of two
    # (at most _FIT_STRIPS strips: a big image has every small side, and little to gain)
    fit_h = sorted({-(-g.out_h // k) for k in range(1, min(g.out_h, _FIT_STRIPS) + 1)} - set(_POWERS))
    fit_w = sorted({-(-g.out_w // k) for k in range(1, min(g.out_w, _FIT_STRIPS) + 1)} - set(_POWERS))
    sides_h = sorted(set(_POWERS) | {s for s in fit_h if _FIT_MIN <= s <= 32})
    sides_w = sorted(set(_POWERS) | {s for s in fit_w if _FIT_MIN <= s <= 32})
    oc_blocks = sorted({min(b, 1 << max(0, (opg - 1).bit_length())) for b in (4, 8, 16, 32, 64, 128, 256)})
    # tiny layers cannot fill min_threads: then the largest block they allow is accepted
    most = min(device.max_threads, oc_blocks[-1] * max_h * max_w)
    for th in sides_h:
        if th > max_h:
            continue
        for tw in sides_w:
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
            # ties in the issue-bound time (staging rounds up to whole rounds of the block)
            # go to the tile that moves fewer bytes: a 1% share of the memory time decides
            scored.append((terms["seconds"] + TIE_BREAK_MEMORY * terms["memory_s"], len(scored), tile, terms))
    scored.sort(key=lambda item: item[:2])
    return [(tile, terms) for _, _, tile, terms in scored[:top]]


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
        elif methods == ("fused",):
            # no candidate the cost model can price (e.g. a 1x1 float64 layer whose blockings
            # the measured table lacks): the kernel's own default, which always fits, unpriced
            tile = fused_tiled.default_config(geometry)
            best = (math.inf, Plan("fused", tile, math.nan, shared_bytes=tile.shared_bytes(geometry),
                                   device=device.name))
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
    model plus ``im2col``. Each runs through ``dcn.ops.deform_conv2d`` (the path a caller
    takes, checks included) ``warmup`` times, then ``repeats`` times timed with CUDA events
    (``runtime.timing.time_calls``; host clock in the simulator, where this is only a smoke
    test). The winner is returned with ``measured_ms`` (median) set.
    """
    from .. import ops  # ops imports this module: a call-time import

    stats = stats or offset_statistics(offset)
    device = SIMULATOR if backend.IS_SIMULATOR else H200
    if candidates is None:
        candidates = [t for t, _ in rank_tiles(geometry, stats, top, device)] + [Plan("im2col", device=device.name)]
    x, off, w, b, m = (backend.to_device(a) if a is not None else None for a in (input, offset, weight, bias, mask))
    g = geometry
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w), mask=m)
    best = None
    for cand in candidates:
        plan = cand if isinstance(cand, Plan) else Plan(
            "fused", cand, out_of_tile=out_of_tile_fraction(geometry, stats, cand.tile_h, cand.tile_w, cand.halo),
            shared_bytes=cand.shared_bytes(geometry), device=device.name)
        run = lambda: ops.deform_conv2d(x, off, w, b, **conv, method=plan.method, plan=plan)  # noqa: E731
        ms = time_calls({"run": run}, repeats, warmup)["run"]["median_ms"]
        if best is None or ms < best.measured_ms:
            best = replace(plan, measured_ms=ms)
    _PLAN_CACHE[(geometry, stats.key(), device, ("fused", "im2col"))] = best
    return best
