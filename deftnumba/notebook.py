"""Helpers for the teaching notebooks (``notebooks/``): mode, provenance, messages, checks.

The notebooks run in one of two modes, chosen by the backend ``import deftnumba``
picked:

* **live** (``cuda`` backend): kernels run on the GPU at the suite's shapes and
  the notebook times them itself, with CUDA events;
* **recorded** (simulator): kernels run in Numba's CUDA simulator on tiny shapes,
  for correctness only; every timing chart is drawn from the CSVs that
  ``python -m deftnumba bench`` recorded on a GPU under ``data/bench/``, and says
  where and when they were recorded. Where nothing is recorded, the notebook
  says so instead of drawing a chart.

Nothing here computes a result a notebook reports; it only frames them.
Plots of benchmark CSVs belong to ``deftnumba.bench``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .perf import provenance
from .runtime import backend
from .runtime.timing import time_calls  # noqa: F401  (the notebooks' timer)

REPO = provenance.REPO
BENCH_DIR = provenance.bench_dir()
"""Where the notebooks look for recorded GPU results (``DEFTNUMBA_BENCH_DIR`` overrides it,
e.g. to preview a CSV before committing it)."""

SIMULATOR_NOTE = ("simulator: each GPU thread is a Python thread on the CPU; "
                  "times here say nothing about GPU speed")


@dataclass(frozen=True)
class Mode:
    """Which way a notebook runs, and why."""

    live: bool
    backend: str
    device: str

    @property
    def name(self) -> str:
        return "live" if self.live else "recorded"

    def banner(self) -> str:
        if self.live:
            return (f"**Mode: live on {self.device}.** Kernels run on the GPU at full size and this "
                    "notebook times them itself (CUDA events).")
        return ("**Mode: simulator + recorded data.** No GPU here: kernels run in Numba's CUDA "
                "simulator on tiny shapes, to check them, never to time them. Timing charts come "
                "from the GPU results recorded under `data/bench/`, each labelled with the device "
                "and commit it was recorded on.")


def mode() -> Mode:
    """The notebook mode for this process's backend."""
    live = not backend.IS_SIMULATOR
    device = backend.device_info()["device"] if live else "Numba CUDA simulator (CPU)"
    return Mode(live=live, backend=backend.NAME, device=device)


@functools.cache
def git_commit(short: bool = True) -> str | None:
    """The commit of the working tree the notebook runs from: ``DEFTNUMBA_COMMIT`` if set (a
    copy of the repo without ``.git``, as on a borrowed GPU machine), else git's; ``None``
    when neither is available."""
    commit = provenance.git_commit(short=short)
    return None if commit == "unknown" else commit


_short = provenance.short_commit


def _distinct(rows: Iterable[Mapping], key: str) -> list[str]:
    seen: list[str] = []
    for row in rows:
        value = str(row.get(key, "") or "").strip()
        if value and value not in seen:
            seen.append(value)
    return seen


def recorded_caption(rows: Iterable[Mapping]) -> str:
    """"recorded on <device>, commit <sha>, <date>" for benchmark rows (dicts with
    ``device``, ``commit`` and ``timestamp`` keys, as in the bench CSVs)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no rows: nothing was recorded, so there is nothing to caption")
    devices = _distinct(rows, "device") or ["unknown device"]
    commits = [_short(c) for c in _distinct(rows, "commit")] or ["unknown"]
    dates = sorted({t[:10] for t in _distinct(rows, "timestamp")})
    text = f"recorded on {', '.join(devices)}, commit {', '.join(commits)}"
    if dates:
        text += f", {dates[0]}" if len(dates) == 1 else f", {dates[0]} to {dates[-1]}"
    return text


def live_caption() -> str:
    """"measured live on <device>, commit <sha>" for charts a notebook times itself."""
    m = mode()
    commit = git_commit()
    return f"measured live on {m.device}" + (f", commit {commit}" if commit else "")


def recorded_files(pattern: str = "*.csv", directory: str | Path = BENCH_DIR) -> list[Path]:
    """The recorded CSVs under ``data/bench/`` matching ``pattern``, oldest first."""
    directory = Path(directory)
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


def not_recorded(what: str, command: str = "python -m deftnumba bench") -> str:
    """The plain statement a notebook makes instead of drawing a chart from nothing."""
    return (f"**Not recorded yet: {what}.** No GPU results are in `data/bench/` (this project has "
            f"not had a GPU yet), so this chart is not drawn. On a GPU machine, `{command}` "
            "records them with their provenance; commit the CSV and re-run this notebook.")


def missing_api(name: str, owner: str) -> str:
    """The plain statement a notebook makes when a package API it needs does not exist yet."""
    return (f"**Missing: `{name}`** ({owner}) is not in the package yet, so this step is skipped. "
            "The notebook will show it once that API lands.")


def show(text: str) -> None:
    """Display Markdown in Jupyter; print it elsewhere (scripts, tests)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython ships with the dev extra
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


def stamp(ax, text: str, corner: str = "lower right", color: str = "0.35") -> None:
    """Write a provenance or caveat label inside a Matplotlib axes corner."""
    x = 0.99 if "right" in corner else 0.01
    y = 0.02 if "lower" in corner else 0.98
    ax.text(x, y, text, transform=ax.transAxes, fontsize=8, color=color,
            ha="right" if "right" in corner else "left", va="bottom" if "lower" in corner else "top",
            bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8", alpha=0.9))


def caption(fig, text: str) -> None:
    """Write a provenance or caveat line under a Matplotlib figure (kept by ``bbox_inches="tight"``,
    which Jupyter's inline backend uses)."""
    fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=8, color="0.35", wrap=True)


def markdown_table(rows: list[Mapping], columns: list[str] | None = None, floats: str = ".3g") -> str:
    """A Markdown table of ``rows`` (dicts), floats formatted with ``floats``."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return format(float(value), floats)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- offset plots
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


# --------------------------------------------------------------------------- recorded results
def recorded_results(directory: str | Path = BENCH_DIR) -> dict:
    """The newest GPU results under ``data/bench/``, split by kind.

    Returns ``{"layer": rows, "layer_file": Path | None, "train": rows, "train_file": Path | None}``:
    ``layer`` rows come from the newest CSV of ``python -m deftnumba bench`` (passes fwd, bwd,
    fwdbwd, host), ``train`` rows from the newest training-benchmark CSV (pass ``train``).
    Simulator smoke files (``smoke_*``) and the rows of runs cut short (``*.partial.csv``, which
    lack the speedup columns) are never read. Empty lists where nothing is recorded.
    """
    from .bench import harness as bench

    found = {"layer": ([], None, ""), "train": ([], None, "")}
    for path in recorded_files("*.csv", directory):
        if path.name.startswith("smoke_") or path.name.endswith(".partial.csv"):
            continue
        rows = bench.load_results(path)
        rows = [r for r in rows if r.get("mode", bench.GPU_LABEL) != bench.SMOKE_LABEL]
        for kind in ("layer", "train"):
            mine = [r for r in rows if (r.get("pass") == "train") == (kind == "train")]
            if not mine:
                continue
            if kind == "train":
                for r in mine:
                    for key in ("normalized", "images_per_s", "dcn_layers"):
                        if r.get(key) not in (None, ""):
                            r[key] = float(r[key])
            newest = max(str(r.get("timestamp", "")) for r in mine)
            if newest >= found[kind][2]:
                found[kind] = (mine, path, newest)
    return {"layer": found["layer"][0], "layer_file": found["layer"][1],
            "train": found["train"][0], "train_file": found["train"][1]}


# --------------------------------------------------------------------------- correctness checks
def check_methods(geometry=None, seed: int = 0, deterministic=(False, True)) -> list[dict]:
    """Every forward method and every backward method against the float64 reference.

    Runs on the current backend (in the simulator: keep ``geometry`` tiny). Forward
    outputs are compared with ``reference.deform_conv2d``; backward gradients (each of
    input, offset, weight, bias, mask; the worst is reported) with
    ``reference.deform_conv2d_backward``, for the atomic and the deterministic input
    gradient. One row per (pass, method): ``rel_error`` is ``||got - ref|| / ||ref||``.
    """
    import deftnumba as dn

    from .dcn import reference
    from .dcn.geometry import Geometry
    from .dcn.inputs import random_layer

    g = geometry or Geometry(batch=2, in_channels=3, height=6, width=7, out_channels=4, kernel_h=3,
                             kernel_w=3, pad_h=1, pad_w=1, has_mask=True, has_bias=True)
    rng = np.random.default_rng(seed)
    shapes, dtype = g.shapes, np.dtype(g.dtype)
    x, offset, weight, bias, mask = random_layer(g, rng, offset_scale=1.5)
    grad_out = rng.standard_normal(shapes["output"]).astype(dtype)
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))
    tolerance = 1e-5 if dtype == np.float32 else 1e-12

    def rel(got, ref):
        got = backend.to_host(got).astype(np.float64)
        scale = float(np.linalg.norm(ref))
        return float(np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0))

    def device(a):
        return backend.to_device(a) if a is not None else None

    rows = []
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv, mask=mask)
    for method in dn.METHODS:
        out = dn.deform_conv2d(device(x), device(offset), device(weight), device(bias), **conv,
                               mask=device(mask), method=method)
        err = rel(out, expected)
        rows.append({"pass": "fwd", "method": method, "rel_error": err, "tolerance": tolerance,
                     "ok": bool(err < tolerance)})
    if hasattr(dn, "deform_conv2d_backward"):
        ref = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv, mask=mask)
        for method in dn.BACKWARD_METHODS:
            for det in deterministic:
                grads = dn.deform_conv2d_backward(device(grad_out), device(x), device(offset), device(weight),
                                                  device(bias), **conv, mask=device(mask), method=method,
                                                  deterministic=det)
                errs = {name: rel(getattr(grads, name), getattr(ref, name))
                        for name in ("input", "offset", "weight", "bias", "mask")
                        if getattr(ref, name) is not None}
                worst = max(errs, key=errs.get)
                # Gradients sum over more terms than the forward: allow 10x the forward's bound.
                rows.append({"pass": "bwd" + (" (deterministic)" if det else " (atomic)"), "method": method,
                             "rel_error": errs[worst], "worst_gradient": worst, "tolerance": 10 * tolerance,
                             "ok": bool(errs[worst] < 10 * tolerance)})
    return rows


# --------------------------------------------------------------------------- per-operator timing and roofline
def time_operators(geometry, method: str = "im2col", repeats: int = 20, seed: int = 0) -> dict:
    """Median time of each operator of ``method`` on random data of ``geometry``.

    Uses ``backend.Stopwatch``: CUDA events on a GPU, the host clock in the simulator
    (the result's ``unit`` says which). One untimed call first (compilation, caches).
    Returns ``{"unit": str, "operator_ms": {name: median ms per call}, "device": str}``.
    """
    import deftnumba as dn

    from .dcn.inputs import random_layer

    g = geometry
    arrays = [backend.to_device(a) if a is not None else None for a in random_layer(g, seed)]
    x, offset, weight, bias, mask = arrays
    kwargs = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w),
                  mask=mask, method=method)
    dn.deform_conv2d(x, offset, weight, bias, **kwargs)
    backend.synchronize()
    watch = backend.Stopwatch()
    for _ in range(repeats):
        dn.deform_conv2d(x, offset, weight, bias, **kwargs, stopwatch=watch)
    backend.synchronize()
    # An operator may run several times per call (one per image chunk): report per call.
    per_call = {name: float(np.median(ms)) * len(ms) / repeats for name, ms in watch.milliseconds().items()}
    return {"unit": watch.unit, "operator_ms": per_call, "device": mode().device}


def plot_operator_roofline(ax, operators, ceilings, dtype: str = "float32", layers=()) -> list[str]:
    """Place operators on a roofline: x = arithmetic intensity (FLOP/B), y = the best FLOP/s
    the roofs allow at that intensity, ``min(rate, intensity * bandwidth)``.

    operators: ``deftnumba.roofline.Operator`` records (or anything with ``name``, ``flops``,
    ``bytes`` and ``intensity``); ceilings: one ``roofline.Ceilings`` or a list (the first
    is drawn solid, the rest dashed). Operators with no FLOPs cannot sit on a log axis:
    their names are returned (and left off the chart). ``layers``: optional whole-layer
    totals (``roofline.totals``), drawn as hollow squares for context.
    """
    ceilings = ceilings if isinstance(ceilings, (list, tuple)) else [ceilings]
    shown = [op for op in operators if op.flops > 0 and op.bytes > 0]
    skipped = [op.name for op in operators if not (op.flops > 0 and op.bytes > 0)]
    layers = [op for op in layers if op.flops > 0 and op.bytes > 0]
    xs = ([op.intensity for op in shown] + [op.intensity for op in layers]
          + [c.rate(dtype) / c.bytes_per_s for c in ceilings])
    grid = np.logspace(np.log10(min(xs)) - 0.7, np.log10(max(xs)) + 0.7, 400)
    for i, c in enumerate(ceilings):
        roof = np.minimum(c.rate(dtype), grid * c.bytes_per_s) / 1e12
        ax.plot(grid, roof, color="black", ls="-" if i == 0 else "--", lw=1.2 if i == 0 else 0.9,
                label=f"roof: {c.name}")
    best = ceilings[0]
    ridge = best.rate(dtype) / best.bytes_per_s
    ax.axvline(ridge, color="0.7", lw=0.8, ls=":")
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, best.rate(dtype) / 1e12), fontsize=7, color="0.4",
                xytext=(4, -12), textcoords="offset points")
    for k, op in enumerate(shown):
        y = min(best.rate(dtype), op.intensity * best.bytes_per_s) / 1e12
        ax.plot([op.intensity], [y], "o", ms=8, color=f"C{k}", label=f"{op.name}: {op.intensity:.2g} FLOP/B")
    for k, op in enumerate(layers, start=len(shown)):
        y = min(best.rate(dtype), op.intensity * best.bytes_per_s) / 1e12
        ax.plot([op.intensity], [y], "s", ms=9, mfc="none", mew=1.6, color=f"C{k}",
                label=f"whole layer, {op.name}: {op.intensity:.3g} FLOP/B")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of device memory)")
    ax.set_ylabel("attainable TFLOP/s (roofline bound)")
    ax.legend(fontsize=7, loc="lower right")
    return skipped


# --------------------------------------------------------------------------- charts of recorded results
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


def plot_percent_of_roofline(ax, rows, pass_: str = "fwd", column: str = "pct_ideal") -> None:
    """Grouped bars: percent of roofline per shape and method, from bench rows.

    ``column``: ``pct_ideal`` (against the ideal fused layer's floor: the same yardstick
    for every method) or ``pct_roofline`` (against the method's own operators' floor).
    """
    ok = [r for r in rows if r.get("status") == "ok" and r.get("pass") == pass_ and r.get(column) is not None
          and not r.get("tf32")]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, shape in enumerate(shapes):
            r = next((r for r in ok if r["shape"] == shape and r["method"] == method), None)
            if r is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(float(r[column]))
        ax.bar(xs, ys, width, label=method)
    ax.axhline(100.0, color="black", lw=0.8, ls="--")
    top = max([100.0] + [float(r[column]) for r in ok])
    ax.set_ylim(0, 1.3 * top)  # headroom for the legend
    ax.set_xticks(range(len(shapes)), shapes)
    basis = "the ideal fused layer's floor" if column == "pct_ideal" else "the method's own floor"
    ax.set_ylabel(f"% of roofline ({pass_})\n100 = {basis}")
    ax.legend(fontsize=8, ncol=min(3, max(len(methods), 1)), loc="upper center")


def time_tiles(geometry, offset, device=None, repeats: int = 50, warmup: int = 3, seed: int = 0) -> dict[str, dict]:
    """Time the fused forward with the planned tile against other tiles, and im2col.

    The tiles come from ``tiling.rank_tiles`` for the statistics of ``offset`` on
    ``device`` (a ``tiling.DeviceModel``): the planner's pick, the best tile without a
    halo, the biggest tile and the last-ranked one. Inputs are random
    (``dcn.inputs.random_layer``); ``offset`` is used as given. Returns ``time_calls``'s dict,
    keyed ``"<pick>: <TH>x<TW>, halo <h>"`` and ``"im2col (no tiles)"``.
    """
    import deftnumba as dn

    from .dcn.planning import plan as tiling
    from .dcn.inputs import random_layer

    g = geometry
    x, _, weight, bias, mask = (backend.to_device(a) if a is not None else None for a in random_layer(g, seed))
    offset = backend.to_device(np.asarray(backend.to_host(offset), dtype=g.dtype))
    ranking = [tile for tile, _ in tiling.rank_tiles(g, tiling.offset_statistics(offset), top=1000, device=device)]
    if not ranking:
        raise ValueError("no feasible fused tile for this geometry and device")
    picks = {"planned": ranking[0],
             "best without halo": next((t for t in ranking if t.halo == 0), None),
             "biggest tile": max(ranking, key=lambda t: t.pixels),
             "ranked last": ranking[-1]}
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w),
                mask=mask)
    calls, seen = {}, set()
    for name, tile in picks.items():
        if tile is None or tile in seen:
            continue
        seen.add(tile)
        plan = tiling.Plan("fused", tile)
        calls[f"{name}: {tile.tile_h}x{tile.tile_w}, halo {tile.halo}"] = (
            lambda plan=plan: dn.deform_conv2d(x, offset, weight, bias, **conv, method="fused", plan=plan))
    calls["im2col (no tiles)"] = lambda: dn.deform_conv2d(x, offset, weight, bias, **conv, method="im2col")
    return time_calls(calls, repeats=repeats, warmup=warmup)
