"""Every chart the CLI and the notebooks draw: from bench CSV rows, roofline counts, offsets.

Two drawing primitives serve every chart of their kind:

* ``grouped_bars``: one group per shape, one bar per method (speedups, percent of roofline);
* ``draw_roofs``: the ``min(rate, intensity * bandwidth)`` roofs on log-log axes, with
  points (measured rows or predicted operators).

Charts of simulator smoke rows are stamped so they are never read as GPU results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..perf.device import H200_LEADS
from ..perf.provenance import SMOKE_LABEL
from . import ops


def figure(ax=None):
    """``(fig, ax)``: ``ax``'s figure, or a new Matplotlib Figure (no pyplot state)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def label_smoke(ax, rows) -> None:
    """Stamp simulator-smoke charts so they are never read as GPU results."""
    if rows and rows[0].get("mode") == SMOKE_LABEL:
        ax.text(0.5, 0.5, SMOKE_LABEL.upper(), transform=ax.transAxes, ha="center", va="center",
                fontsize=16, color="red", alpha=0.35, rotation=20)


def describe(rows: list[dict]) -> str:
    """"recorded on NVIDIA H200, commit abc123, 2026-..." (or the smoke label) for rows."""
    if not rows:
        return "nothing recorded"
    first = rows[0]
    where = "simulator smoke (not GPU data), " if first["mode"] == SMOKE_LABEL else ""
    return (f"{where}recorded on {first['device']}, commit {str(first['commit'])[:12]}, "
            f"{first['timestamp']}, TF32 {first.get('tf32_check', '')}")


# --------------------------------------------------------------------------- grouped bars
def grouped_bars(ax, groups: list[str], series: list[str], value, error=None) -> None:
    """Bars per (group, series): ``value(group, series)`` (None: no bar) and, optionally,
    ``error(group, series) -> (below, above)``; the groups on the x axis."""
    width = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, group in enumerate(groups):
            y = value(group, name)
            if y is None:
                continue
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(y)
            if error is not None:
                below, above = error(group, name)
                lo.append(below)
                hi.append(above)
        ax.bar(xs, ys, width, yerr=[lo, hi] if error is not None else None, capsize=3 if error else 0,
               label=name)
    ax.set_xticks(range(len(groups)), groups)


def _ok(rows, pass_, column=None):
    return [r for r in rows if r.get("status") == "ok" and r.get("pass") == pass_ and not r.get("tf32")
            and (column is None or r.get(column) is not None)]


def _find(rows, shape, method):
    return next((r for r in rows if r["shape"] == shape and r["method"] == method), None)


def plot_speedups(rows: list[dict], baseline: str = "torchvision", pass_: str = "fwd", ax=None, title=None,
                  fallback: str = "im2col"):
    """Grouped bars: speedup of each method over ``baseline`` per shape (``baseline``
    median / method median), error bars from the p10/p90 of the method. Falls back to
    ``fallback`` as the baseline when no ``baseline`` rows exist. Returns the Figure."""
    ok = _ok(rows, pass_)
    if not any(r["method"] == baseline for r in ok):
        baseline = fallback
    base = {r["shape"]: r["median_ms"] for r in ok if r["method"] == baseline}
    shapes = [s for s in dict.fromkeys(r["shape"] for r in ok) if s in base]
    methods = [m for m in dict.fromkeys(r["method"] for r in ok) if m != baseline]
    fig, ax = figure(ax)

    def speedup(shape, method):
        r = _find(ok, shape, method)
        return None if r is None else base[shape] / r["median_ms"]

    def spread(shape, method):
        r, s = _find(ok, shape, method), speedup(shape, method)
        return s - base[shape] / r["p90_ms"], base[shape] / r["p10_ms"] - s

    grouped_bars(ax, shapes, methods, speedup, spread)
    ax.axhline(1.0, color="black", linewidth=0.8)
    speedups = [base[r["shape"]] / r["median_ms"] for r in ok if r["shape"] in base]
    if speedups and max(speedups) / min(speedups) > 20:
        ax.set_yscale("log")
    ax.set_ylabel(f"speedup over {baseline} ({pass_}; bars p10-p90)")
    ax.legend(fontsize="small")
    ax.set_title(title or describe(rows), fontsize="small", wrap=True)
    label_smoke(ax, rows)
    return fig


def plot_percent_of_roofline(ax, rows, pass_: str = "fwd", column: str = "pct_ideal") -> None:
    """Grouped bars: percent of roofline per shape and method, from bench rows.

    ``column``: ``pct_ideal`` (against the ideal layer's floor: the same yardstick for
    every method) or ``pct_roofline`` (against the method's own operators' floor).
    """
    ok = _ok(rows, pass_, column)
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))

    def percent(shape, method):
        r = _find(ok, shape, method)
        return None if r is None else float(r[column])

    grouped_bars(ax, shapes, methods, percent)
    ax.axhline(100.0, color="black", lw=0.8, ls="--")
    top = max([100.0] + [float(r[column]) for r in ok])
    ax.set_ylim(0, 1.3 * top)  # headroom for the legend
    basis = "the ideal fused layer's floor" if column == "pct_ideal" else "the method's own floor"
    ax.set_ylabel(f"% of roofline ({pass_})\n100 = {basis}")
    ax.legend(fontsize=8, ncol=min(3, max(len(methods), 1)), loc="upper center")


TRAIN_ORDER = ("conv", "torchvision", "deftnumba")


def plot_training(ax, rows) -> None:
    """Normalised training-step time per variant (plain-conv step = 1), bars from p10 to p90.

    ``rows``: the training benchmark's CSV rows (``pass`` = ``train``; ``method`` is the
    variant, ``normalized`` the median step time over the plain-conv one).
    """
    rows = sorted(rows, key=lambda r: (TRAIN_ORDER.index(r["method"]) if r["method"] in TRAIN_ORDER else 99,
                                       r["method"]))
    names = [r["method"] for r in rows]
    values = [float(r["normalized"]) for r in rows]
    lo = [v - v * float(r["p10_ms"]) / float(r["median_ms"]) for v, r in zip(values, rows)]
    hi = [v * float(r["p90_ms"]) / float(r["median_ms"]) - v for v, r in zip(values, rows)]
    bars = ax.bar(names, values, yerr=[lo, hi], capsize=4, color=[f"C{i}" for i in range(len(rows))])
    ax.bar_label(bars, [f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("training step time / plain-conv step\n(median; bars p10-p90)")
    shape = rows[0].get("shape", "") if rows else ""
    ax.set_title(f"Normalised training time{', ' + shape if shape else ''}", fontsize=10)


# --------------------------------------------------------------------------- rooflines
def draw_roofs(ax, ceilings, intensities, dtype: str = "float32", ridge: bool = False) -> None:
    """The roofs ``min(rate, intensity * bandwidth)`` in TFLOP/s over a log range covering
    ``intensities``; ``ceilings``: one ``Ceilings`` or a list (the first solid, the rest dashed)."""
    ceilings = ceilings if isinstance(ceilings, (list, tuple)) else [ceilings]
    xs = list(intensities) + [c.rate(dtype) / c.bytes_per_s for c in ceilings]
    grid = np.logspace(math.log10(min(xs)) - 0.7, math.log10(max(xs)) + 0.7, 400)
    for i, c in enumerate(ceilings):
        roof = np.minimum(c.rate(dtype), grid * c.bytes_per_s) / 1e12
        ax.plot(grid, roof, color="black", ls="-" if i == 0 else "--", lw=1.2 if i == 0 else 0.9,
                label=f"roof: {c.name}")
    if ridge:
        best = ceilings[0]
        at = best.rate(dtype) / best.bytes_per_s
        ax.axvline(at, color="0.7", lw=0.8, ls=":")
        ax.annotate(f"ridge {at:.0f} FLOP/B", (at, best.rate(dtype) / 1e12), fontsize=7, color="0.4",
                    xytext=(4, -12), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")


def plot_roofline(ceilings=H200_LEADS, rows: list[dict] | None = None, geometries: Mapping | None = None,
                  pass_: str = "fwd", ax=None, title=None, op=None):
    """Log-log roofline with one point per row (intensity of its method's modelled bytes,
    achieved useful FLOP/s) or, without rows, each modelled method of each shape (default:
    the op's suites) at its predicted floor. ``op``: the bench op whose counts are used
    (default: the rows' op, else DCN). Returns the Figure."""
    fig, ax = figure(ax)
    points = []
    if rows:
        for r in rows:
            if r["status"] != "ok" or r["pass"] != pass_:
                continue
            row_op = op or ops.get_op(r.get("op") or "dcn")
            shape = dict(ops.shape_of(r, row_op), dtype=r["dtype"])
            moved = sum(o.bytes for o in row_op.operators(shape, r["method"], pass_))
            if not moved:
                continue
            useful = ops.useful_flops(row_op, shape, r["method"], pass_)
            points.append((f"{r['shape']} {r['method']}", useful / moved, useful / (r["median_ms"] * 1e-3)))
    else:
        op = op or ops.get_op("dcn")
        shapes = geometries if geometries is not None else op.suites()
        for name, shape in shapes.items():
            shape = ops.as_shape(op, shape)
            for method in op.methods():
                counted = op.operators(shape, method, pass_)
                if not counted:
                    continue
                useful = ops.useful_flops(op, shape, method, pass_)
                floor = ops.floor_ms(counted, ceilings, shape.get("dtype", "float32"))
                points.append((f"{name} {method}", useful / sum(o.bytes for o in counted), useful / (floor * 1e-3)))
    intensities = [p[1] for p in points] or [1.0]
    draw_roofs(ax, [ceilings], [min(intensities + [1.0]), max(intensities + [1e3])])
    for label, x, y in points:
        ax.loglog([x], [y / 1e12], "o")
        ax.annotate(label, (x, y / 1e12), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("intensity (useful FLOP per modelled byte)")
    ax.set_ylabel("TFLOP/s (useful FLOPs)")
    what = describe(rows) if rows else "predicted floors (no measurement)"
    ax.set_title(title or what, fontsize="small", wrap=True)
    ax.legend(fontsize="small")
    label_smoke(ax, rows)
    return fig


def plot_operator_roofline(ax, operators, ceilings, dtype: str = "float32", layers=()) -> list[str]:
    """Place operators on a roofline: x = arithmetic intensity (FLOP/B), y = the best FLOP/s
    the roofs allow at that intensity, ``min(rate, intensity * bandwidth)``.

    operators: ``perf.roofline.Operator`` records (or anything with ``name``, ``flops``,
    ``bytes`` and ``intensity``); ceilings: one ``Ceilings`` or a list (the first is drawn
    solid, the rest dashed). Operators with no FLOPs cannot sit on a log axis: their names
    are returned (and left off the chart). ``layers``: optional whole-layer totals
    (e.g. ``dcn.roofline.totals``), drawn as hollow squares for context.
    """
    ceilings = ceilings if isinstance(ceilings, (list, tuple)) else [ceilings]
    shown = [op for op in operators if op.flops > 0 and op.bytes > 0]
    skipped = [op.name for op in operators if not (op.flops > 0 and op.bytes > 0)]
    layers = [op for op in layers if op.flops > 0 and op.bytes > 0]
    draw_roofs(ax, ceilings, [op.intensity for op in shown] + [op.intensity for op in layers], dtype, ridge=True)
    best = ceilings[0]
    for k, op in enumerate(shown):
        y = min(best.rate(dtype), op.intensity * best.bytes_per_s) / 1e12
        ax.plot([op.intensity], [y], "o", ms=8, color=f"C{k}", label=f"{op.name}: {op.intensity:.2g} FLOP/B")
    for k, op in enumerate(layers, start=len(shown)):
        y = min(best.rate(dtype), op.intensity * best.bytes_per_s) / 1e12
        ax.plot([op.intensity], [y], "s", ms=9, mfc="none", mew=1.6, color=f"C{k}",
                label=f"whole layer, {op.name}: {op.intensity:.3g} FLOP/B")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of device memory)")
    ax.set_ylabel("attainable TFLOP/s (roofline bound)")
    ax.legend(fontsize=7, loc="lower right")
    return skipped


# --------------------------------------------------------------------------- offsets
def plot_offset_histograms(ax, fields: Mapping[str, np.ndarray], limit: float = 6.0, bins: int = 61) -> None:
    """Histograms (density) of every ``dy`` and ``dx`` value, one line per named field."""
    edges = np.linspace(-limit, limit, bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    for label, offset in fields.items():
        values = np.asarray(offset, dtype=np.float64).ravel()
        density, _ = np.histogram(np.clip(values, -limit, limit), bins=edges, density=True)
        ax.plot(centres, density, label=label, drawstyle="steps-mid")
    ax.set_xlabel("offset component dy or dx (input pixels)")
    ax.set_ylabel("density")
    ax.set_xlim(-limit, limit)
    ax.legend(fontsize=8)


def plot_offset_field(ax, offset: np.ndarray, image: int = 0, tap: int = 4, title: str = "") -> None:
    """Arrows of one tap's ``(dy, dx)`` over the output pixels of one image."""
    dy = np.asarray(offset[image, 2 * tap], dtype=np.float64)
    dx = np.asarray(offset[image, 2 * tap + 1], dtype=np.float64)
    h, w = dy.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ax.imshow(np.hypot(dy, dx), cmap="Greys", origin="upper")
    ax.quiver(xx, yy, dx, dy, color="tab:red", angles="xy", scale_units="xy", scale=1, width=0.006)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
