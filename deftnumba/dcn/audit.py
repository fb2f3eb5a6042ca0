"""The SASS audit applied to this package's DCN kernels: the kernel table, the per-layer
issue-slot model and the planner's table of measured per-phase counts.

``perf/sass.py`` knows nothing about deformable convolution; this module knows which
kernels a forward or backward method launches, with which signature and GPU grid, and how
many iterations each phase runs (``phase_model`` of the kernel module; the loop nest for
the unmarked kernels of ``kernels/backward.py``; ``before_phase_model`` keeps the model of
the kernels as they stood before issue 10). Everything it prints about time is a
**prediction** from static instruction counts, never a measurement.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..perf import sass
from ..perf.sass import normalise_steps  # noqa: F401  (generic: it lives with the issue model)

PLANNER_TABLE = Path(__file__).resolve().parent / "data" / "fused_phase_counts.json"
"""The committed per-config phase counts the planner reads (``python -m deftnumba audit
--planner-table`` writes it)."""


# --------------------------------------------------------------------------- registered kernels
def cases():
    """``(name, dtype, kernel, signature)`` of every kernel module's ``ptx_cases()``."""
    from ..perf import audit

    for name, dtype, kernel, signature in audit.registered_cases():
        yield name, dtype, kernel, tuple(signature)


def progress(i: int, n: int, name: str) -> None:
    print(f"[{i}/{n}] compiling {name}", file=sys.stderr, flush=True)


def audit_cases(pattern: str | None = None, cc=sass.CC, report=progress) -> list:
    """``KernelAudit`` of every registered kernel whose name contains ``pattern``."""
    chosen = [c for c in cases() if not pattern or pattern in c[0]]
    out = []
    for i, (name, dtype, kernel, signature) in enumerate(chosen, 1):
        if report:
            report(i, len(chosen), f"{name} {dtype}")
        out.append(sass.audit_kernel(kernel, signature, name, dtype, cc))
    return out


KERNEL_COLUMNS = ("kernel", "dtype", "regs", "spill_B", "smem_B", "threads", "warps/SM", "instr",
                  "hot_loop_instr", "hot_ffma_%", "hot_lds_bits", "hot_ldg_bits", "f64", "ldl/stl", "div64_calls")


def kernel_row(a: sass.KernelAudit) -> dict:
    h = a.hottest
    widest = lambda widths: max((int(w) for w in widths), default=0) if widths else 0  # noqa: E731
    return {
        "kernel": a.kernel, "dtype": a.dtype, "regs": a.registers, "spill_B": a.spill_bytes,
        "smem_B": a.shared_bytes, "threads": a.block_threads, "warps/SM": a.warps_per_sm,
        "instr": a.instructions, "hot_loop_instr": h.instructions if h else 0,
        "hot_ffma_%": round(100 * h.ffma_fraction, 1) if h else 0.0,
        "hot_lds_bits": widest(h.lds_widths) if h else 0, "hot_ldg_bits": widest(h.ldg_widths) if h else 0,
        "f64": a.f64, "ldl/stl": a.local, "div64_calls": a.div64_calls,
    }


def format_table(rows: list, columns=None) -> str:
    """Aligned text table (text left, numbers right)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) for r in rows) for c in columns]
    line = lambda vals: "  ".join(v.rjust(w) if num else v.ljust(w)  # noqa: E731
                                  for v, w, num in zip(vals, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(v) -> bool:
    return v is None or isinstance(v, (int, float))


def _fmt(v) -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


KERNEL_HEADER = """\
SASS audit, sm_90 (static; compiled with numba-cuda + nvJitLink, read with nvdisasm; no GPU).
smem_B is ptxas's figure: the declared static shared memory plus the 1 KB per block that
sm_80+ reserves for the system. warps/SM: theoretical occupancy from registers, shared memory
and the block size (256 threads for grid-stride kernels). hot loop: the innermost loop with
the most FFMA; its FFMA share and its widest shared (LDS) and global (LDG) loads in bits.
div64_calls: CALLs to the 64-bit integer division/modulo routines."""


# --------------------------------------------------------------------------- launches of a layer
@dataclass
class Launch:
    """One kernel launch of a forward method, as the audit models it."""

    label: str
    module: object
    kernel: object
    signature: tuple
    blocks: int
    threads: int
    config: object = None       # what ``phase_model`` gets
    repeats: int = 1            # identical launches (image chunks)
    operator: str = ""          # its roofline operator (``roofline.operators`` name)
    extra: dict = field(default_factory=dict)


def _array_types(dtype):
    from numba import types

    t = getattr(types, str(dtype))
    # contiguous arrays, as CuPy passes them (the layer's arrays and their batch slices)
    return types.Array(t, 4, "C"), types.Array(t, 2, "C"), types.Array(t, 1, "C"), types


def fused_launch(g, tile) -> Launch:
    """The fused kernel's launches for ``g`` and ``tile`` (``TileConfig.launches``: one per
    65535 images or block rows; all have the same kernel), modelled as one launch of all
    the layer's blocks."""
    from .kernels import fused_tiled

    kernel = fused_tiled.fused_kernel(g.dtype, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                                      tile, g.has_mask, g.has_bias, False, fused_tiled.needs_wide_index(g))
    tiles, blocks_y, batch = tile.blocks(g)
    return Launch("fused", fused_tiled, kernel, tuple(fused_tiled.kernel_signature(g.dtype)),
                  tiles * blocks_y * batch, tile.threads, tile, operator="fused",
                  extra={"weight_vector": fused_tiled._weight_vector(tile, g.taps, g.dtype)})


def _grid_stride(total):
    """``(blocks, threads)`` of a grid-stride launch over ``total`` items on the GPU."""
    from ..runtime import grid

    return grid.launch_config(total)


def _flat_types(dtype):
    from numba import types

    return types.Array(getattr(types, str(dtype)), 1, "C"), types


def _blocks(grid) -> int:
    (bx, by, bz), _ = grid
    return bx * by * bz


def im2col_launches(g) -> list:
    """The positions launch and the column launch of the first (largest) image chunk,
    repeated once per chunk; the grids are the GPU's (``point_grid``, ``column_grid``)."""
    from .kernels import im2col

    a1, types = _flat_types(g.dtype)
    conv = types.UniTuple(types.int32, 8)
    chunk = im2col.chunk_images(g)
    points = g.batch * g.offset_groups * g.taps * g.out_h * g.out_w
    pgrid, cgrid = im2col.point_grid(g, gpu=True), im2col.column_grid(g, chunk, gpu=True)
    wide_points = im2col.needs_wide(g.batch * 3 * g.offset_groups * g.taps * g.out_h * g.out_w,
                                    g.batch * 2 * g.offset_groups * g.taps * g.out_h * g.out_w)
    cols = chunk * g.out_h * g.out_w * g.in_channels
    return [
        Launch("im2col.positions", im2col, im2col.positions_kernel(g.dtype, g.has_mask, wide_points),
               (a1, a1, a1, types.UniTuple(types.int32, 6), conv), _blocks(pgrid), pgrid[1], None,
               operator="offset sampling", extra={"items": points, "phases": ("point_rows", "positions")}),
        Launch("im2col.columns", im2col, im2col.columns_kernel(g.dtype, g.has_mask, im2col.chunk_needs_wide(g, chunk)),
               (a1, a1, a1, types.UniTuple(types.int32, 8)), _blocks(cgrid), cgrid[1], None,
               repeats=-(-g.batch // chunk), operator="bilinear columns",
               extra={"items": cols, "column_elements": cols * g.taps, "phases": ("rows", "pixels", "columns")}),
    ]


def fused_columns_launches(g) -> list:
    from .kernels import fused_columns, im2col

    a1, types = _flat_types(g.dtype)
    conv = types.UniTuple(types.int32, 8)
    chunk = im2col.chunk_images(g)
    points = chunk * g.offset_groups * g.taps * g.out_h * g.out_w
    grid = fused_columns.launch_grid(g, chunk, gpu=True)
    kernel = fused_columns.fused_columns_kernel(g.dtype, g.has_mask, fused_columns.chunk_needs_wide(g, chunk))
    return [Launch("fused_columns", fused_columns, kernel, (a1, a1, a1, a1, types.UniTuple(types.int32, 8), conv),
                   _blocks(grid), grid[1], None, repeats=-(-g.batch // chunk), operator="fused columns",
                   extra={"items": points,
                          "column_elements": chunk * g.in_channels * g.taps * g.out_h * g.out_w})]


# --------------------------------------------------------------------------- backward launches
BACKWARD_METHODS = ("fused", "fused_deterministic", "fused_columns", "im2col", "deterministic")
"""Backward methods the audit models (``--method bwd-NAME``). ``deterministic`` is the
deterministic input-gradient path (``entries`` + ``gather``) that every method's
``deterministic=True`` runs instead of its scatter (``fused`` runs the column-free
``gather_staged``); ``fused_deterministic`` is the rest of ``fused``'s deterministic mode (the input
kernel without its RED phases, then the weight kernel)."""


def fused_backward_launches(g, config=None, deterministic: bool = False) -> list:
    """The column-free backward's launches (``backward_fused.backward``). Atomic mode (the
    default, ``bwd-fused``): one kernel, input, offset, mask and weight gradients (the weight
    gradient's block partials reduced with ``RED``). Deterministic mode: the input kernel
    without its ``RED`` phases, then the weight kernel (its blocks' additions to grad_weight
    in ticket order, a serial tail, are not modelled; nor is the gather, ``bwd-deterministic``)."""
    from numba import types

    from .kernels import backward_fused as bf

    config = config or bf.default_config(g)
    k = g.taps
    shape = (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w)
    flat = types.Array(getattr(types, str(g.dtype)), 1, "C")  # (every array argument is flat)
    conv, dims = types.UniTuple(types.int32, 8), types.UniTuple(types.int32, 9)
    span = bf.channel_span(g)
    prefix = "bwd.fused_deterministic" if deterministic else "bwd.fused"
    input_phases = ("table", "stage", "stage_gemm", "stage_grad_out", "grad_cols_gemm", "scatter", "scatter_outside",
                    "offset_grad")
    if not deterministic:
        input_phases += ("wg_stage", "wg_gemm", "wg_red")
    launches = [
        Launch(f"{prefix}.input_grad", bf, bf.input_grad_kernel(g.dtype, *shape, config, g.has_mask, not deterministic,
                                                                    config.regular(g), bf.planes(g),
                                                                    config.weights_by_vector(g),
                                                                    config.grad_out_by_vector(g)),
               (flat, flat, flat, flat, flat, flat, flat, flat, flat, conv, dims),
               config.tiles(g) * (g.in_channels // span) * g.batch, config.input_threads(k), config,
               operator="fused backward", extra={"phases": input_phases, "out_of_tile_phases": ("scatter_outside",)})]
    if deterministic:
        cpg, opg = g.in_channels // g.groups, g.out_channels // g.groups
        splits = bf.choose_splits(g, config)
        w_blocks = splits * -(-opg // config.w_out_block) * -(-cpg // config.chunk) * g.groups
        launches.append(
            Launch(f"{prefix}.weight_grad", bf, bf.weight_grad_kernel(g.dtype, *shape, config, g.has_mask, bf.planes(g),
                                                                     config.regular(g)),
                   (flat, flat, flat, flat, flat, types.Array(types.uint32, 1, "C"), conv, dims), w_blocks,
                   config.weight_threads(k), config,
                   operator="fused backward",
                   extra={"phases": ("w_stage", "w_stage_grad_out", "w_build", "w_build_outside", "weight_gemm"),
                          "out_of_tile_phases": ("w_build_outside",), "splits": splits}))
    return launches


def _column_backward_types(dtype):
    from numba import types

    t = getattr(types, str(dtype))
    return types.Array(t, 4, "A"), types.Array(t, 2, "A"), types.Array(t, 1, "C"), types


def column_backward_launches(g, method: str) -> list:
    """The kernels ``kernels/backward.py`` launches for ``method`` (atomic mode) per image
    chunk, or the deterministic path's ``entries`` and ``gather`` (``method`` =
    ``"deterministic"``). The cuBLAS GEMMs and the host-side sort are not modelled.

    These kernels carry no ``# phase:`` markers: their model is the loop nest
    (``loop_nest``): per-thread trips of each loop depth."""
    from .kernels import backward as bk
    from .kernels import im2col

    a4, a2, a1, types = _column_backward_types(g.dtype)
    conv, i64 = types.UniTuple(types.int32, 8), types.int64
    chunk = im2col.chunk_images(g)
    repeats = -(-g.batch // chunk)
    pixels = g.out_h * g.out_w
    cpo = g.in_channels // g.offset_groups
    outs = g.out_channels // g.groups
    narrow = bk.index_is_narrow(g.batch * g.in_channels * g.taps * pixels)
    points = chunk * g.offset_groups * g.taps * pixels
    launches = []

    def grid_stride(label, kernel, signature, items, trips, operator, dot_depth=None):
        blocks, threads = _grid_stride(items)
        per_thread = _per_thread(items, blocks * threads)
        launches.append(Launch(label, bk, kernel, signature, blocks, threads, None, repeats, operator,
                               extra={"items": items, "loop_trips": (per_thread,) + tuple(trips),
                                      "dot_depth": dot_depth, "gemm_depth": 3 if dot_depth == 3 else None}))

    sample_sig = (a2, a4, a4, a4, a1, a4, a4, a2, conv, i64, i64)
    if method == "im2col":
        grid_stride("bwd.im2col.col2im", bk.col2im_kernel(g.dtype, g.has_mask, narrow),
                    (a2, a4, a4, a4, a1, conv, i64), chunk * g.in_channels * g.taps * pixels, (), "col2im")
        grid_stride("bwd.im2col.sample", bk.sample_kernel(g.dtype, g.has_mask, False, False, narrow),
                    sample_sig, points, (cpo,), "offset and mask grad")
        return launches + [replace_label(im2col_launches(g)[1], "bwd.im2col.columns (recompute)",
                                         "bilinear columns (recompute)")]
    if method == "fused_columns":
        grid_stride(f"bwd.{method}.sample", bk.sample_kernel(g.dtype, g.has_mask, True, True, narrow),
                    sample_sig, points, (cpo,), "fused sample grads")
        return launches
    if method == "deterministic":
        k1 = types.Array(types.int64, 1, "C")
        rows = bk.sort_part_rows(g, chunk)  # the column methods sort a chunk whole (fused: backward_fused)
        _, wide = bk.sort_key_layout(g, chunk, rows)
        keys = types.Array(types.uint64 if wide else types.uint32, 1, "C")
        i32 = types.int32
        grid_stride("bwd.deterministic.entries", bk.entries_kernel(g.dtype, wide, narrow),
                    (a4, keys, conv, i64, i64, i32, i32, i32, i32, i32), points, (), "")
        # entries per destination pixel: 4 corners of every (tap, pixel) of the group, spread
        # over the image (the average; a thread's own segment varies with the offsets)
        per_segment = -(-4 * g.taps * pixels // (g.height * g.width))
        cb = bk.gather_block_channels(g)
        grid_stride("bwd.deterministic.gather", bk.gather_kernel(g.dtype, g.has_mask, cb, wide, narrow),
                    (a2, a4, a4, k1, keys, a4, conv, i64, i64, i64, i32, i32, i32, types.boolean),
                    chunk * (g.in_channels // cb) * g.height * g.width, (per_segment,), "")
        # the column-free gather (fused in deterministic mode): a block per (image, CB channels,
        # pixel block); loops: output chunks (depth 1), the taps (2), and in each tap two loops
        # (3): its entries (one load and one FMA per output into the tap's sums), then the
        # product of its weights and the block's sums (CB FMAs per output and pixel, both from
        # shared memory: the GEMM-like loop), 4*UNROLL outputs a trip
        cb = bk.gather_staged_channels(g)
        out_chunk = bk.gather_out_chunk(g)
        out_chunks = -(-outs // out_chunk)
        product_trips = -(-out_chunk // 4) // bk.gather_product_unroll(out_chunk)
        flat_storage = types.Array(getattr(types, str(g.dtype)), 1, "C")
        blocks = -(-(g.height * g.width) // bk.GATHER_THREADS) * (g.in_channels // cb) * chunk
        launches.append(Launch(
            "bwd.deterministic.gather_staged",
            bk, bk.gather_staged_kernel(g.dtype, g.has_mask, cb, wide, g.taps, out_chunk, outs % out_chunk == 0,
                                    g.out_h * g.out_w, bk.staged_tap_geometry(g), g.out_w),
            (flat_storage, a1, flat_storage, flat_storage, k1, keys, a4, conv, i32, i32, i32, i32, i32, types.boolean,
             i32, i32, i32, i32),
            blocks, bk.GATHER_THREADS, None, repeats, "",
            extra={"items": blocks * bk.GATHER_THREADS,
                   "loop_trips": (out_chunks, g.taps, (-(-per_segment // g.taps), product_trips)),
                   "dot_depth": None, "gemm_depth": 3, "gemm_from_shared": True}))
        return launches
    raise ValueError(f"no backward launch model for method {method!r}; modelled: {BACKWARD_METHODS}")


def replace_label(launch: Launch, label: str, operator: str) -> Launch:
    from dataclasses import replace

    return replace(launch, label=label, operator=operator)


def loop_nest(a: sass.KernelAudit, trips: tuple, dot_depth: int | None = None) -> dict:
    """Per-thread instructions of a kernel without phase markers from its loop nest:
    ``trips[d]`` source iterations of the depth-``d+1`` loop per iteration of its parent
    (``trips[0]``: the grid-stride loop's, per thread). Each depth counts the largest loop
    of that depth, less the largest one nested in it (a chain nest; LLVM's remainder or
    branch copies count once, the largest: an upper bound), its trips divided by its
    unroll factor (``unroll_factor``; for the loop at ``dot_depth``, a dot product with
    one FMA per source iteration, by its FFMA count).

    The last depth may hold sibling loops, one after the other in the parent: ``trips[-1]``
    is then a tuple of their trips, in source order (by address), and the parent counts
    less all of them. Returns ``{"outside": n, "depth1": n, ...}`` (instructions per thread;
    siblings as ``depthD.1``, ``depthD.2``, ...)."""
    by_depth: dict = {}
    for lp in a.loops:
        if lp.instructions > 2:  # not the trap after EXIT (a branch to itself)
            by_depth.setdefault(lp.depth, []).append(lp)
    out = {}
    biggest = {d: max(lps, key=lambda lp: lp.instructions) for d, lps in by_depth.items()}
    out["outside"] = a.instructions - (biggest[1].instructions if 1 in biggest else 0)
    runs = 1.0
    for d in sorted(biggest):
        if d > len(trips):
            break
        trip = trips[d - 1]
        if isinstance(trip, tuple):  # sibling innermost loops (docstring)
            for k, (lp, t) in enumerate(zip(sibling_loops(a, d, len(trip)), trip), 1):
                out[f"depth{d}.{k}"] = lp.instructions * runs * -(-t // ((lp.ffma if d == dot_depth else lp.unroll) or 1))
            break
        lp = biggest[d]
        if d < len(trips) and isinstance(trips[d], tuple):
            nested = sum(x.instructions for x in sibling_loops(a, d + 1, len(trips[d])))
        else:
            inner = biggest.get(d + 1)
            nested = inner.instructions if inner is not None and d + 1 <= len(trips) else 0
        exclusive = lp.instructions - nested
        per_pass = (lp.ffma if d == dot_depth else lp.unroll) or 1
        trip = -(-trip // per_pass)  # source iterations per pass through an unrolled body
        runs *= trip
        out[f"depth{d}"] = exclusive * runs
    return out


def sibling_loops(a: sass.KernelAudit, depth: int, count: int) -> list:
    """The ``count`` loops at ``depth``, in address order (``loop_nest``'s siblings); an error
    when the compiled kernel has another number of them (the model would count wrongly)."""
    loops = sorted((lp for lp in a.loops if lp.depth == depth and lp.instructions > 2), key=lambda lp: lp.first_offset)
    if len(loops) != count:
        raise ValueError(f"{a.name}: {len(loops)} loops at depth {depth}, the launch model expects {count}")
    return loops


# --------------------------------------------------------------------------- phase models of today's kernels
def normalise_multiply(phases: dict, fma_per_step: int) -> dict:
    """Divide the ``multiply`` phase's counts by the unroll factor the store rule cannot see.

    The multiply loop has a compile-time trip count and no stores; LLVM unrolls it by 2 or
    4 when its body is small. One source step issues ``reg_oc * reg_px`` FMAs, so a body
    with k times that many is k steps. ``phases`` maps names to ``PhaseCount``; returns a
    copy with ``multiply`` rescaled (unchanged when the ratio is not an integer > 1)."""
    from dataclasses import replace

    m = phases.get("multiply")
    if m is None or not fma_per_step:
        return dict(phases)
    fma = m.body_ffma + m.body_dfma
    k = fma / fma_per_step
    if k > 1 and abs(k - round(k)) < 1e-9:
        k = int(round(k))
        m = replace(m, body=m.body / k, body_ffma=m.body_ffma / k, body_dfma=m.body_dfma / k, unroll=m.unroll * k,
                    body_cycles=None if m.body_cycles is None else m.body_cycles / k)
    return {**phases, "multiply": m}


def _per_thread(items: int, threads_total: int) -> int:
    """Iterations of a grid-stride or block-stride loop for the busiest thread."""
    return -(-int(items) // int(threads_total))


def _offset_segments(g) -> int:
    """Offset-group segments one block's weight group crosses (sampling tables it builds)."""
    cpg = g.in_channels // g.groups
    cpo = g.in_channels // g.offset_groups
    return max(1, -(-cpg // cpo)) if cpg >= cpo else 1


def warp_fraction(f: float, lanes: int = 32) -> float:
    """Probability that a warp issues a branch taken by a fraction ``f`` of its lanes
    (independent lanes): ``1 - (1 - f)**32``."""
    return 1.0 - (1.0 - min(max(f, 0.0), 1.0)) ** lanes


def before_phase_model(label: str, g, config, out_of_tile: float = 0.0) -> dict:
    """Iterations per thread of each phase of the kernels *as they stood before issue 10's
    rewrites* (their sources carry ``# phase:`` markers). Used when a kernel module does
    not define ``phase_model`` itself."""
    if label == "fused":
        from .planning.plan import _chunks_per_block

        t = config
        k = g.taps
        p = t.pixels
        ck = t.chunk * k
        rows, cols = t.staged_shape(g)
        chunks = _chunks_per_block(g, t.chunk)
        seg = _offset_segments(g)
        column_iters = chunks * _per_thread(ck * p, t.threads)
        return {
            "chunk": chunks,
            "table": (seg * _per_thread(k * p, t.threads), seg),
            "staging": (chunks * _per_thread(t.chunk * rows * cols, t.threads), chunks),
            "weights": (chunks * _per_thread(t.oc_block * ck, t.threads), chunks),
            "columns": (column_iters, chunks),
            "out_of_tile": (column_iters * warp_fraction(out_of_tile), 0),
            "multiply": (chunks * ck, chunks),
            "epilogue": 0,
        }
    blocks, threads = config
    if label == "im2col.positions":
        it = _per_thread(g.batch * g.offset_groups * g.taps * g.out_h * g.out_w, blocks * threads)
        return {"positions": it}
    if label == "im2col.columns":
        chunk = _chunk_images(g)
        it = _per_thread(chunk * g.in_channels * g.out_h * g.out_w, blocks * threads)
        return {"pixel": it, "sample": it * g.taps}
    if label == "fused_columns":
        chunk = _chunk_images(g)
        it = _per_thread(chunk * g.offset_groups * g.taps * g.out_h * g.out_w, blocks * threads)
        return {"point": it, "channel": it * (g.in_channels // g.offset_groups)}
    raise KeyError(label)


def _chunk_images(g) -> int:
    from .kernels import im2col

    return max(1, min(g.batch, im2col.CHUNK_IMAGES, (2**31 - 1) // (g.in_channels * g.taps * g.out_h * g.out_w)))


def fused_iterations(g, tile) -> dict:
    """``fused_tiled.phase_model``: the iterations of each phase in the units that
    ``normalise_fused`` reduces the measured loop bodies to (a rank-1 update, a staged
    position, a weight vector, a table entry...), so that counts measured at one config
    apply to another with the same loop bodies."""
    from .kernels import fused_tiled

    return dict(fused_tiled.phase_model(g, tile))


def fused_steps(tile, taps: int) -> dict:
    """``{phase: (kind, per_step)}``: how ``normalise_fused`` finds one source iteration of
    each phase of ``fused_tiled`` in its SASS: a step issues ``per_step`` global loads
    (``"ldg"``) or shared stores (``"sts"``), counted in the SASS loop body. The audit's
    store-per-line rule (``sass.unroll_factor``) cannot tell a source loop's own unrolled
    statements (``for cc in range(chunk)``) from LLVM's unrolling; the loads and stores a
    step must issue can."""
    from .kernels import fused_tiled

    _, slab_group = fused_tiled._slab_copy(tile, taps)
    # per channel where a step's work grows with the chunk (staging, columns), so that the
    # planner's counts, measured at a chunk of 4, scale with the chunk it prices
    return {"staging": ("ldg", 1),            # a (position, channel): one load (none outside)
            "staging_partial": ("ldg", 1),
            "weights": ("ldg", 1),            # one vector (LDG.128), unrolled into the chunk loop
            "weights_partial": ("ldg", slab_group),
            "columns": ("sts", 1),            # an (entry, channel): the in-tile path (out-of-band
                                              # entries read the zero window the same way)
            "columns_partial": ("sts", 2),    # in-tile and out-of-tile paths
            "out_of_tile": ("ldg", 4)}        # four corners


def normalise_fused(phases: dict, tile, taps: int) -> dict:
    """The fused kernel's measured ``PhaseCount``s per source iteration of ``phase_model``:
    the multiply phase per rank-1 update (``normalise_multiply``), the others by the loads
    or stores one step issues (``fused_steps``, ``normalise_steps``)."""
    return normalise_steps(normalise_multiply(phases, tile.reg_oc * tile.reg_px), fused_steps(tile, taps))


def out_of_tile_phase(g, tile, out_of_tile: float, measured=None):
    """``(count, iterations)`` of the out-of-tile path of the column build (phase
    ``out_of_tile``, one table entry of one channel): a warp issues it when any
    of its 32 lanes has an out-of-tile sample (``warp_fraction``), in the full chunks' column
    loops (a partial chunk's loop charges its out-of-tile code every iteration)."""
    columns = fused_iterations(g, tile)["columns"]  # (count, straight runs)
    it = (columns[0] if isinstance(columns, tuple) else columns) * warp_fraction(out_of_tile)
    if measured is None:
        measured = sass.PhaseCount(body=0.0, straight=0, depth=2, body_ffma=0.0, body_lds_widths={},
                                   body_ldg_widths={}, calls=0, div64_calls=0, body_cycles=0.0,
                                   body_cycles_sass=0.0, straight_cycles=0.0)
    return measured, it


def phase_iterations(launch: Launch, g, out_of_tile: float = 0.0) -> dict:
    """The launch's phase model (the kernel module's ``phase_model``), restricted to the
    phases of this launch's kernel when the module models several (``extra["phases"]``)."""
    if launch.label == "fused":
        return {**fused_iterations(g, launch.config), "out_of_tile": out_of_tile_phase(g, launch.config, out_of_tile)[1]}
    model = getattr(launch.module, "phase_model", None)
    if model is None:
        return before_phase_model(launch.label, g, launch.config, out_of_tile)
    it = dict(model(g, launch.config))
    share = warp_fraction(out_of_tile)  # a warp issues an out-of-tile path if any lane needs it
    for name in launch.extra.get("out_of_tile_phases", ()):
        trips, runs = it[name]
        it[name] = (trips * share, runs * share)
    names = launch.extra.get("phases")
    return {k: v for k, v in it.items() if k in names} if names else it


# --------------------------------------------------------------------------- the layer model
def prior_out_of_tile(g, tile) -> float:
    from .planning import plan as tiling

    return tiling.out_of_tile_fraction(g, tiling.normal_statistics(1.0), tile.tile_h, tile.tile_w, tile.halo)


def model_launch(launch: Launch, g, out_of_tile: float = 0.0, cc=sass.CC) -> dict:
    """Audit one launch's kernel and run the issue-slot model: a dict with the audit, the
    per-phase rows and the predicted issue-bound seconds (a prediction)."""
    a = sass.audit_kernel(launch.kernel, launch.signature, launch.label, str(g.dtype), cc)
    if "loop_trips" in launch.extra:
        return _model_loop_nest(launch, a)
    counts = a.phases
    if launch.label == "fused":
        counts = normalise_fused(counts, launch.config, g.taps)
        counts["out_of_tile"] = out_of_tile_phase(g, launch.config, out_of_tile, counts.get("out_of_tile"))[0]
    elif hasattr(launch.module, "phase_steps"):  # phases counted by the loads/stores of a step
        counts = normalise_steps(counts, launch.module.phase_steps(launch.config))
    mean = launch.extra.get("mean_body_phases", ())
    if mean:  # the phase model sums the trips of the phase's loops: one mean body per trip
        from dataclasses import replace

        counts = {k: (replace(c, body=c.body / c.loops, body_ffma=c.body_ffma / c.loops,
                              body_cycles=None if c.body_cycles is None else c.body_cycles / c.loops)
                      if k in mean else c)
                  for k, c in counts.items()}
    iterations = phase_iterations(launch, g, out_of_tile)
    per_thread = sass.per_thread_instructions(counts, iterations)
    cycles = sass.per_thread_cycles(counts, iterations)  # one warp alone, its stalls included
    model = sass.issue_model(per_thread, launch.blocks, launch.threads, a.registers, a.shared_bytes or 0,
                             cycles=cycles)
    seconds = model["seconds"] * launch.repeats
    latency = model.get("latency_seconds")
    phases = []
    for name, count in counts.items():
        it = iterations.get(name, 0)
        body_it, runs = it if isinstance(it, (tuple, list)) else (it, 1)
        phases.append({"phase": name, "body": round(count.body, 2), "unroll": count.unroll,
                       "iterations": body_it, "straight": count.straight,
                       "straight_runs": runs, "per_thread": per_thread[name],
                       "body_ffma_%": round(100 * count.body_ffma / count.body, 1) if count.body else 0.0,
                       "body_lds_bits": "/".join(sorted(count.body_lds_widths, key=int)) or "-",
                       "div64_calls": count.div64_calls,
                       "predicted_us": 1e6 * model["phases_s"].get(name, 0.0) * launch.repeats,
                       "one_warp_clocks": round(cycles[name]) if cycles else None})
    missing = sorted(set(iterations) - set(a.phases))
    return {"launch": launch.label, "audit": a, "blocks": launch.blocks, "threads": launch.threads,
            "repeats": launch.repeats, "model": model, "phases": phases, "predicted_s": seconds,
            "latency_s": None if latency is None else latency * launch.repeats,
            "per_thread": model["per_thread"], "unknown_phases": missing, "extra": launch.extra}


def _model_loop_nest(launch: Launch, a: sass.KernelAudit) -> dict:
    """``model_launch`` for a kernel modelled by its loop nest (``loop_nest``)."""
    per_thread = loop_nest(a, launch.extra["loop_trips"], launch.extra.get("dot_depth"))
    model = sass.issue_model(per_thread, launch.blocks, launch.threads, a.registers, a.shared_bytes or 0)
    trips = (1,) + tuple(launch.extra["loop_trips"])
    loops = {}
    for lp in a.loops:
        if lp.instructions > 2 and (lp.depth not in loops or lp.instructions > loops[lp.depth].instructions):
            loops[lp.depth] = lp
    phases = []
    for name, n in per_thread.items():
        depth, _, sibling = ("0" if name == "outside" else name[5:]).partition(".")
        depth = int(depth)
        lp = loops.get(depth)
        iterations = trips[depth] if depth < len(trips) else 0
        if sibling:  # one of the last depth's sibling loops (loop_nest)
            lp = sibling_loops(a, depth, len(iterations))[int(sibling) - 1]
            iterations = iterations[int(sibling) - 1]
        phases.append({"phase": name, "body": lp.instructions if lp else a.instructions, "unroll": lp.unroll if lp else 1,
                       "iterations": iterations, "straight": 0, "straight_runs": 0,
                       "per_thread": n, "body_ffma_%": round(100 * lp.ffma_fraction, 1) if lp else 0.0,
                       "body_lds_bits": "/".join(sorted(lp.lds_widths, key=int)) or "-" if lp else "-",
                       "div64_calls": a.div64_in_loops if lp else a.div64_calls,
                       "predicted_us": 1e6 * model["phases_s"].get(name, 0.0) * launch.repeats,
                       "one_warp_clocks": "-"})  # (not priced for a loop nest)
    return {"launch": launch.label, "audit": a, "blocks": launch.blocks, "threads": launch.threads,
            "repeats": launch.repeats, "model": model, "phases": phases,
            "predicted_s": model["seconds"] * launch.repeats, "latency_s": None, "per_thread": model["per_thread"],
            "unknown_phases": [], "extra": launch.extra}


def layer_launches(g, method: str, tile=None) -> list:
    if method == "fused":
        from .planning import plan as tiling

        tile = tile or tiling.plan_for(g, methods=("fused",), device=tiling.H200).tile
        return [fused_launch(g, tile)]
    if method == "im2col":
        return im2col_launches(g)
    if method == "fused_columns":
        return fused_columns_launches(g)
    if method == "bwd-fused":
        return fused_backward_launches(g)
    if method == "bwd-fused_deterministic":
        return fused_backward_launches(g, deterministic=True)
    if method.startswith("bwd-"):
        return column_backward_launches(g, method[4:])
    raise ValueError(f"no launch model for method {method!r}")


def model_layer(g, method: str = "fused", tile=None, cc=sass.CC) -> dict:
    """Every launch of ``method`` on geometry ``g``: per-launch models and their sum, next
    to the method's roofline floor (fp32 rate and bytes, H200 leads)."""
    from . import roofline

    launches = layer_launches(g, method, tile)
    # the out-of-tile share of samples under the prior (N(0,1) offsets): the forward's tile, or
    # the fused backward's (its scatter_outside path)
    f = prior_out_of_tile(g, launches[0].config) if method in ("fused", "bwd-fused", "bwd-fused_deterministic") else 0.0
    models = [model_launch(launch, g, f, cc) for launch in launches]
    backward = method.startswith("bwd-")
    base = method[4:] if backward else method
    pass_ = "bwd" if backward else "fwd"
    modelled = roofline.has_model(base, pass_)
    ops = {op.name: op for op in roofline.operators(g, base, pass_)} if modelled else {}
    for m, launch in zip(models, launches):
        op = ops.get(launch.operator)
        m["floor_ms"] = roofline.floor_ms_of(op.flops, op.bytes, dtype=g.dtype) if op else None
        elements = launch.extra.get("column_elements")
        if elements:
            # thread instructions of all launches over column elements (every thread counted
            # as the busiest one: an upper bound for uneven grid strides)
            total = m["per_thread"] * launch.blocks * launch.threads * launch.repeats
            m["per_column_element"] = total / (elements * launch.repeats)
    return {"method": method, "tile": launches[0].config if method == "fused" else None,
            "out_of_tile": f, "launches": models,
            "predicted_ms": 1e3 * sum(m["predicted_s"] for m in models),
            # with one warp's stalls (perf.sass.stall_charges, assumed latencies); None where a
            # launch is modelled by its loop nest
            "latency_ms": (None if any(m["latency_s"] is None for m in models)
                           else 1e3 * sum(m["latency_s"] for m in models)),
            "floor_ms": roofline.floor_ms(g, base, pass_) if modelled else None,
            "fused_floor_ms": roofline.floor_ms(g, "fused", pass_), "pass": pass_}


PHASE_COLUMNS = ("phase", "body", "unroll", "iterations", "straight", "straight_runs", "per_thread", "body_ffma_%",
                 "body_lds_bits", "div64_calls", "predicted_us", "one_warp_clocks")


def format_layer(name: str, g, result: dict) -> str:
    """Text of one layer's model (each launch: its phases, then the totals)."""
    out = []
    tile = result["tile"]
    head = f"{name}: {g.batch} x {g.in_channels}->{g.out_channels}, {g.height}x{g.width}, method {result['method']}"
    if tile is not None:
        head += (f", tile {tile.tile_h}x{tile.tile_w} halo {tile.halo} chunk {tile.chunk} oc_block {tile.oc_block}"
                 f" reg {tile.reg_oc}x{tile.reg_px} ({tile.threads} threads)"
                 f", modelled out-of-tile {100 * result['out_of_tile']:.2f}% (prior N(0,1) offsets)")
    elif result["method"].startswith("bwd-fused"):
        head += (f", modelled out-of-tile {100 * result['out_of_tile']:.2f}% of samples, a warp's scatter_outside"
                 f" {100 * warp_fraction(result['out_of_tile']):.0f}% of the time (prior N(0,1) offsets)")
    out.append(head)
    for m in result["launches"]:
        a, mo = m["audit"], m["model"]
        line = (f"  launch {m['launch']}: {m['blocks']} blocks x {m['threads']} threads"
                + (f" x {m['repeats']} launches" if m["repeats"] > 1 else "")
                + f", {a.registers} registers, smem {a.shared_bytes} B, {mo.get('blocks_per_sm')} blocks"
                  f" = {mo.get('warps_per_sm')} warps/SM (limited by {mo.get('limited_by')}), "
                  f"{mo.get('waves')} wave(s)")
        out.append(line)
        out.append(_indent(format_table(m["phases"], PHASE_COLUMNS), 4))
        extra = f"    {m['per_thread']:,.0f} instructions per thread; PREDICTED issue-bound {1e3 * m['predicted_s']:.4f} ms"
        if m.get("latency_s") is not None:
            extra += f", {1e3 * m['latency_s']:.4f} ms with one warp's stalls"
        if m.get("floor_ms") is not None:
            extra += f" (roofline floor of this operator {m['floor_ms']:.4f} ms)"
        if m.get("per_column_element") is not None:
            extra += f"; {m['per_column_element']:.1f} instructions per column element"
        out.append(extra)
        if m["unknown_phases"]:
            out.append(f"    note: phase_model names phases the SASS lacks: {m['unknown_phases']}")
    floor = f"{result['floor_ms']:.4f} ms" if result["floor_ms"] is not None else "(none modelled)"
    gemm_free = result["method"] in ("fused", "bwd-fused")
    out.append(f"  PREDICTED issue-bound time {result['predicted_ms']:.4f} ms (a prediction from static SASS counts, "
               f"not a measurement) vs fp32 roofline floor {floor} of '{result['method']}'"
               + (f" = {result['predicted_ms'] / result['floor_ms']:.2f}x" if result["floor_ms"] else "")
               + ("" if result.get("latency_ms") is None
                  else f"; with one warp's stalls (assumed latencies) {result['latency_ms']:.4f} ms"
                       + (f" = {result['latency_ms'] / result['floor_ms']:.2f}x" if result["floor_ms"] else ""))
               + ("" if gemm_free
                                     else f"; the fused ideal's floor is {result['fused_floor_ms']:.4f} ms"
                                          " (the cuBLAS GEMMs and host sorts are not modelled)"))
    return "\n".join(out)


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + ln for ln in text.splitlines())


def layer_rows(name: str, g, result: dict) -> list:
    """CSV rows: one per (launch, phase), plus a total row per launch."""
    rows = []
    for m in result["launches"]:
        a = m["audit"]
        for ph in m["phases"]:
            rows.append({"shape": name, "method": result["method"], "launch": m["launch"], **ph,
                         "registers": a.registers, "warps_per_sm": m["model"].get("warps_per_sm"),
                         "kind": "prediction (static SASS issue-slot model)"})
        rows.append({"shape": name, "method": result["method"], "launch": m["launch"], "phase": "TOTAL",
                     "per_thread": m["per_thread"], "predicted_us": 1e6 * m["predicted_s"],
                     "latency_us": None if m["latency_s"] is None else 1e6 * m["latency_s"],
                     "floor_us": 1e3 * m["floor_ms"] if m.get("floor_ms") is not None else None,
                     "registers": a.registers, "warps_per_sm": m["model"].get("warps_per_sm"),
                     "kind": "prediction (static SASS issue-slot model)"})
    return rows


def write_csv(path, rows: list) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- the planner's table
def planner_key(dtype: str, reg_oc: int, reg_px: int) -> str:
    return f"{dtype}/{reg_oc}x{reg_px}"


PLANNER_DTYPES = ("float32", "float64")
PLANNER_REG = (1, 2, 4, 8)


def planner_base_tile(reg_oc: int, reg_px: int, dtype: str = "float32"):
    """The representative config measured for a register blocking: 64 output channels and a
    chunk of 4 channels, an 8x8 tile with halo 2 (float64: 4x8, halo 1, to fit 48 KB of
    static shared memory): deft64's plan family. The other parameters only change
    compile-time constants (divisors, trip counts): the loop bodies keep their shape, and
    the staging and weight copies, unrolled over a compile-time count of positions or
    vectors per thread, are divided by their loads (``normalise_fused``), so one
    position or vector costs about the same at another count. (With a chunk of 1 and a
    3x3 kernel, 9 rank-1 updates, LLVM unrolls the multiply loop completely and no loop
    is left to measure: hence the chunk of 4.)"""
    from .kernels.fused_tiled import TileConfig

    if dtype == "float32":
        return TileConfig(8, 8, 2, 4, 64, reg_oc, reg_px)
    return TileConfig(4, 8, 1, 4, 64, reg_oc, reg_px)


def planner_table(cc=sass.CC, report=progress, dtypes=PLANNER_DTYPES) -> dict:
    """Measure per-phase counts of the fused kernel for every (dtype, reg_oc, reg_px) the
    planner can pick: ``{"source_hash", "configs": {key: {registers, shared_bytes,
    phases: {name: {body, straight}}}}}``. Deterministic for a given kernel source and
    compiler."""
    from . import bench_op as bench
    from .kernels import fused_tiled

    g0 = bench.SUITES["deft64"]
    keys = [(d, ro, rp) for d in dtypes for ro in PLANNER_REG for rp in PLANNER_REG]
    configs = {}
    for i, (dtype, ro, rp) in enumerate(keys, 1):
        if report:
            report(i, len(keys), f"fused {dtype} reg {ro}x{rp}")
        tile = planner_base_tile(ro, rp, dtype)
        g = _with_dtype(g0, dtype)
        launch = fused_launch(g, tile)
        a = sass.audit_kernel(launch.kernel, launch.signature, f"fused[{planner_key(dtype, ro, rp)}]", dtype, cc)
        counts = normalise_fused(a.phases, tile, g.taps)
        configs[planner_key(dtype, ro, rp)] = {
            "tile": [tile.tile_h, tile.tile_w, tile.halo, tile.chunk, tile.oc_block, tile.reg_oc, tile.reg_px],
            "registers": a.registers, "spill_bytes": a.spill_bytes,
            "phases": {name: {"body": c.body, "straight": c.straight, "ffma": c.body_ffma, "dfma": c.body_dfma,
                              "unroll": c.unroll} for name, c in sorted(counts.items())},
        }
    from ..runtime import backend  # noqa: F401  (versions of the compiler that measured)
    import numba

    return {"what": "per-phase SASS instruction counts of kernels/fused_tiled.py (sm_90), "
                    "from python -m deftnumba audit --planner-table",
            "source_hash": kernel_source_hash(), "cc": list(cc), "numba": numba.__version__,
            "configs": configs}


def kernel_source_hash() -> str:
    """Hash of the source the fused kernel's SASS depends on: its factory, the compile-time
    helpers and the config class it reads, the sampling device functions and the storage
    loads/stores (``runtime.precision``) (host code such
    as ``phase_model`` or docstrings elsewhere in the module may change without a new table)."""
    from ..runtime import precision, vector
    from .kernels import fused_tiled, sampling

    return sass.source_hash(fused_tiled.fused_kernel, fused_tiled.TileConfig, fused_tiled._vector,
                            fused_tiled.launch_bounds, fused_tiled._slab_copy, fused_tiled._multiply_unroll,
                            fused_tiled._weight_vector, vector,
                            sampling.sampling_functions, sampling._sampling_functions,
                            precision._gpu_functions)


def _with_dtype(g, dtype):
    from dataclasses import replace

    return replace(g, dtype=dtype)


def write_planner_table(table: dict, path=PLANNER_TABLE) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")


def load_planner_table(path=PLANNER_TABLE) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def env_for_compiler() -> dict:
    """Environment for a child process that compiles (the cuda backend, no simulator)."""
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return env


# --------------------------------------------------------------------------- issue 10's targets
def weights_per_element(launch_model: dict) -> float | None:
    """Instructions per staged weight element of the fused kernel's full-chunk copy: the
    ``weights`` phase's body per 16-byte vector (``normalise_fused``) over the vector's
    elements. (The partial-chunk copy, phase ``weights_partial``, runs only for a chunk cut
    short by an offset-group or group end.)"""
    row = next((p for p in launch_model["phases"] if p["phase"] == "weights"), None)
    width = launch_model["extra"].get("weight_vector")
    return row["body"] / width if row and width and row["body"] else None


def gemm_loops(a: sass.KernelAudit, phases=None, min_ffma: int = 4) -> list:
    """The GEMM-like loops of a kernel: innermost loops with at least ``min_ffma`` FFMA
    (restricted to loops mostly of ``phases`` when given)."""
    out = []
    for lp in a.loops:
        if lp.innermost and lp.ffma >= min_ffma:
            if phases is None or max(lp.phases, key=lp.phases.get) in phases:
                out.append(lp)
    return out


def target_rows(name: str, results: dict) -> list:
    """Issues 10 and 11's static targets, checked on the audit's figures. ``results`` maps a
    method (``bwd-NAME`` for a backward) to ``model_layer``'s result for one layer."""
    rows = []

    def add(what, value, limit, ok):
        rows.append({"shape": name, "target": what, "value": value, "limit": limit,
                     "status": "n/a" if value is None else ("meets" if ok(value) else "MISSES")})

    fused = results.get("fused")
    if fused:
        m = fused["launches"][0]
        a = m["audit"]
        tile = fused["tile"]
        phases = {p["phase"]: p for p in m["phases"]}
        mult = phases.get("multiply")
        add("fused multiply FFMA %", mult and mult["body_ffma_%"], ">= 85", lambda v: v >= 85)
        widest = max((int(w) for w in (a.phases["multiply"].body_lds_widths if "multiply" in a.phases else {})),
                     default=None)
        add("fused multiply widest LDS bits", widest, ">= 64", lambda v: v >= 64)
        columns = phases.get("columns")
        add("fused columns instr per in-tile sample", columns and round(columns["body"], 2), "<= 25",
            lambda v: v <= 25)
        w = weights_per_element(m)
        add("fused weights instr per element", w and round(w, 2), "<= 4", lambda v: v <= 4)
        add("fused registers", a.registers, "<= 128", lambda v: v <= 128)
        loops_bad = sum(lp.mix["f64"] + lp.mix["local"] for lp in a.loops)
        add("fused F64 + LDL/STL in loops", loops_bad, "0", lambda v: v == 0)
        add("fused 64-bit div calls in loops", a.div64_in_loops, "0", lambda v: v == 0)
        ratio = fused["predicted_ms"] / fused["floor_ms"]
        add("fused predicted / fp32 floor", round(ratio, 2), "<= 1.5", lambda v: v <= 1.5)
    for method, limit in (("fused_columns", 25), ("im2col", 60)):
        r = results.get(method)
        if r:
            per = next((m.get("per_column_element") for m in r["launches"] if m.get("per_column_element")), None)
            add(f"{method} instr per column element", per and round(per, 1), f"<= {limit}",
                lambda v, limit=limit: v <= limit)
    for method, r in results.items():
        if not method.startswith("bwd-"):
            continue
        for m in r["launches"]:
            a, label = m["audit"], m["launch"]
            if method in ("bwd-fused", "bwd-fused_deterministic"):
                gemm = [(lp, lp.ffma_fraction) for lp in gemm_loops(a, ("grad_cols_gemm", "weight_gemm", "wg_gemm"))]
            else:  # innermost loops with FFMA at the launch's GEMM depth (with gemm_from_shared:
                # those that read shared memory, not the column-free gather's entries loop)
                depth, shared = m["extra"].get("gemm_depth"), m["extra"].get("gemm_from_shared")
                gemm = [(lp, lp.ffma_fraction) for lp in a.loops if depth and lp.depth == depth and lp.innermost
                        and lp.ffma and (not shared or lp.mix["lds"])]
            for lp, fraction in gemm:
                add(f"{label} GEMM-like loop @{lp.first_offset:#x} FFMA %", round(100 * fraction, 1),
                    ">= 80", lambda v: v >= 80)
            add(f"{label} 64-bit div calls in loops", a.div64_in_loops, "0", lambda v: v == 0)
            add(f"{label} value-returning atomics in loops", a.returning_atomics_in_loops, "0", lambda v: v == 0)
        if method == "bwd-fused" and r["floor_ms"]:
            add("bwd fused predicted / fp32 floor", round(r["predicted_ms"] / r["floor_ms"], 2), "<= 1.5",
                lambda v: v <= 1.5)
    if "fused" in results and "bwd-fused" in results:
        from .bench_op import SUITES

        if name in SUITES:
            f = fwd_bwd(SUITES[name], results)
            rows.append({"shape": name, "target": "fused fwd+bwd predicted / torchvision fwd+bwd floor",
                         "value": round(f["predicted_ms"] / f["torchvision_floor_ms"], 2),
                         "limit": "(GPU target: 2.5x faster than torchvision, unmeasured)", "status": "info"})
    return rows


FORWARD_METHODS = ("fused", "im2col", "fused_columns")


def fwd_bwd(g, results: dict) -> dict:
    """Predicted fused forward + fused backward (issue-bound, a prediction) against the
    fp32 roofline floors of the same and of torchvision's forward + backward."""
    from . import roofline

    predicted = results["fused"]["predicted_ms"] + results["bwd-fused"]["predicted_ms"]
    return {"predicted_ms": predicted, "fused_floor_ms": roofline.floor_ms(g, "fused", "fwdbwd"),
            "torchvision_floor_ms": roofline.floor_ms(g, "torchvision", "fwdbwd")}


def format_fwd_bwd(name: str, g, results: dict) -> str:
    r = fwd_bwd(g, results)
    return (f"{name}: fused forward + fused backward PREDICTED issue-bound {r['predicted_ms']:.4f} ms (a prediction, "
            f"not a measurement); fp32 roofline floor {r['fused_floor_ms']:.4f} ms (fused fwd+bwd), "
            f"{r['torchvision_floor_ms']:.4f} ms (torchvision fwd+bwd): predicted/torchvision floor "
            f"{r['predicted_ms'] / r['torchvision_floor_ms']:.2f}x")


# --------------------------------------------------------------------------- figures for the tests
COLUMN_KERNELS = ("im2col.positions[", "im2col.columns[", "fused_columns.fused_columns[")


def target_figures(shapes=("deft64", "res128", "det-c4", "det-c5"), backward_shape: str = "deft64") -> dict:
    """What the target tests read, JSON-ready: ``targets`` (``target_rows`` of the fused
    forward at every shape in ``shapes``, of every method and backward at
    ``backward_shape``), ``column_kernels`` (every float32 column-kernel case of
    ``ptx_cases``: registers, F64, local memory, calls, its largest innermost loop),
    ``predicted_ms`` per (shape, method), and ``latency_ms``: the same with one warp's stalls
    (``None`` where a launch is modelled by its loop nest). Run in a compiler process
    (``env_for_compiler``)."""
    from . import bench_op as bench

    out = {"targets": [], "predicted_ms": {}, "latency_ms": {}, "column_kernels": {}}
    for name in shapes:
        g = bench.SUITES[name]
        methods = (list(FORWARD_METHODS) + ["bwd-" + m for m in BACKWARD_METHODS]
                   if name == backward_shape else ["fused"])
        results = {}
        for method in methods:
            progress(len(results) + 1, len(methods), f"{name} {method}")  # on stderr
            results[method] = r = model_layer(g, method)
            out["predicted_ms"][f"{name}/{method}"] = r["predicted_ms"]
            out["latency_ms"][f"{name}/{method}"] = r["latency_ms"]
        out["targets"] += target_rows(name, results)
    for name, dtype, kernel, signature in cases():
        if dtype == "float32" and name.startswith(COLUMN_KERNELS):
            a = sass.audit_kernel(kernel, signature, name, dtype)
            inner = [lp.instructions for lp in a.loops if lp.innermost and lp.instructions > 2]
            out["column_kernels"][name] = {"registers": a.registers, "f64": a.f64, "local": a.local,
                                           "calls": sum(a.calls.values()), "hot_loop": max(inner, default=0)}
    return out


# --------------------------------------------------------------------------- command line
def main(args) -> int:
    """``python -m deftnumba audit`` (run in a process with the cuda backend)."""
    if args.planner_table:
        table = planner_table()
        path = args.planner_table if isinstance(args.planner_table, str) else PLANNER_TABLE
        write_planner_table(table, path)
        print(f"wrote {path}: {len(table['configs'])} configs, kernel source hash {table['source_hash']}")
        return 0
    audits = audit_cases(args.kernels)
    rows = [kernel_row(a) for a in audits]
    csv_rows = [{"table": "kernels", **r} for r in rows]
    if args.json:
        print(json.dumps([a.to_json() for a in audits]))
    else:
        print(KERNEL_HEADER)
        print(format_table(rows, KERNEL_COLUMNS))
    from . import bench_op as bench

    names = list(bench.SUITES) if args.layer == ["all"] else (args.layer or [])
    methods = {"all": list(FORWARD_METHODS), "bwd-all": ["bwd-" + m for m in BACKWARD_METHODS],
               "everything": list(FORWARD_METHODS) + ["bwd-" + m for m in BACKWARD_METHODS]}.get(
        args.method, [args.method])
    targets = []
    for name in names:
        if name not in bench.SUITES:
            raise SystemExit(f"--layer: unknown shape {name!r}; shapes are {list(bench.SUITES)} or 'all'")
        g = bench.SUITES[name]
        results = {}
        tile = None
        if getattr(args, "tile", None):
            from .kernels.fused_tiled import TileConfig

            tile = TileConfig(*(int(v) for v in args.tile.split(",")))
        for i, method in enumerate(methods, 1):
            print(f"[layer {name}: {method}] compiling", file=sys.stderr, flush=True)
            results[method] = r = model_layer(g, method, tile if method == "fused" else None)
            if not args.json:
                print()
                print(format_layer(name, g, r))
            csv_rows += [{"table": "layer", **row} for row in layer_rows(name, g, r)]
        if "fused" in results and "bwd-fused" in results and not args.json:
            print()
            print(format_fwd_bwd(name, g, results))
        t = target_rows(name, results)
        targets += t
        csv_rows += [{"table": "targets", **row} for row in t]
    if targets and not args.json:
        print("\nIssues 10 and 11's static targets (figures from the audit above; predictions, not measurements):")
        print(format_table(targets))
    if args.csv:
        write_csv(args.csv, csv_rows)
        print(f"wrote {args.csv}", file=sys.stderr)
    bad = sum(r["dtype"] == "float32" and r["f64"] > 0 for r in rows)
    if not args.json:
        print(f"\n{len(rows)} kernels compiled for sm_90; float32 kernels with float64 instructions: {bad}")
    return 1 if bad else 0
