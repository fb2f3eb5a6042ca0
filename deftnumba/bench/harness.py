"""The benchmark harness: shape suites x methods x passes, timed with CUDA events.

``python -m deftnumba bench`` times, for every suite shape (DESIGN.md's
"Benchmark conventions"):

* every forward method in ``deftnumba.METHODS`` (read when the run starts, so
  methods added later are timed too), plus the baselines ``torchvision``
  (``torchvision.ops.deform_conv2d``, on CUDA when importable) and
  ``cudnn_conv`` (a dense ``torch.nn.functional.conv2d`` of the same shape: the
  slowdown denominator);
* the passes ``fwd``, and ``bwd`` / ``fwdbwd`` when ``deftnumba`` has
  ``deform_conv2d_backward`` (the baselines' backward goes through torch
  autograd), and ``host``: the host time of one call, Python to launch, with the
  GPU idle (the target is under 30 us).

Each time is the median of ``--reps`` (default 50) runs after warm-up, with
p10 and p90, each run timed with CUDA events and preceded by a write of a
buffer of at least twice the L2 size (128 MiB or more), so no run finds its
inputs in L2. Offsets are random (a few pixels), never zeros. fp32 rows run
with TF32 off in cuDNN, cuBLAS-through-torch and CuPy (checked at start: an
fp32 GEMM through each is compared with float64); ``--tf32`` adds baseline rows
with TF32 on, named ``<method>+tf32``.

Every row carries its provenance (device, driver, CUDA, library versions,
commit, timestamp), the shape, the roofline floor of its method and of the
ideal fused layer (``deftnumba.roofline``, with ceilings measured once per run)
and its speedup over ``torchvision`` and ``cudnn_conv``. The CSV goes to
``data/bench/`` with a speedup chart (PNG) beside it.

Without a GPU the harness runs a **simulator smoke** version on a tiny shape,
labelled ``simulator smoke (not GPU data)`` in every row; its files go to
``build/bench-smoke/`` (or ``--out``), never to ``data/bench/``.

Reusable pieces for notebooks: ``load_results``, ``describe``, ``latest_csv``,
``recorded_note``, ``plot_speedups``, ``plot_roofline``.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..dcn import roofline
from ..perf import provenance as provenance_
from ..perf.provenance import GPU_LABEL, SMOKE_LABEL, csv_name, git_commit, provenance, tf32_check  # noqa: F401
from ..runtime import backend, timing
from ..dcn.geometry import Geometry

REPO = provenance_.REPO
BENCH_DIR = provenance_.bench_dir()
SMOKE_DIR = REPO / "build" / "bench-smoke"


def _layer(n, c, c_out, h, w, k=3) -> Geometry:
    """3x3 (or kxk), stride 1, 'same' padding, one offset group, DCNv2 with mask, no bias."""
    return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=k, kernel_w=k,
                    pad_h=k // 2, pad_w=k // 2, has_mask=True, has_bias=False)


SUITES: dict[str, Geometry] = {
    "deft64": _layer(8, 64, 64, 64, 64),      # the DefT paper's layer
    "res128": _layer(16, 128, 128, 128, 128),
    "det-c4": _layer(4, 256, 256, 50, 68),
    "det-c5": _layer(4, 512, 512, 25, 34),
}
SMOKE_SUITES: dict[str, Geometry] = {"smoke": _layer(1, 2, 3, 5, 6)}

BASELINES = ("torchvision", "cudnn_conv")
PASSES = ("fwd", "bwd", "fwdbwd", "host")

COLUMNS = (
    # provenance
    "mode", "device", "compute_capability", "driver", "cuda_runtime", "numba_cuda", "cupy", "torch",
    "torchvision", "numpy", "python", "commit", "timestamp",
    # precision
    "dtype", "tf32", "tf32_check",
    # shape
    "shape", "batch", "in_channels", "out_channels", "height", "width", "kernel_h", "kernel_w",
    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "groups", "offset_groups", "mask", "bias",
    # what and how
    "pass", "method", "detail", "status", "reps", "warmup", "l2_flush_bytes", "clock",
    # times and rates
    "median_ms", "p10_ms", "p90_ms", "tflops", "gbps", "bytes_basis", "check_rel_err",
    # roofline
    "ceilings", "ceiling_source", "ceiling_tflops", "ceiling_gbps",
    "floor_ms", "pct_roofline", "ideal_floor_ms", "pct_ideal",
    # comparisons
    "speedup_vs_torchvision", "speedup_vs_cudnn_conv",
)
_NUMERIC = {"batch", "in_channels", "out_channels", "height", "width", "kernel_h", "kernel_w", "stride_h",
            "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "groups", "offset_groups", "reps", "warmup",
            "l2_flush_bytes", "median_ms", "p10_ms", "p90_ms", "tflops", "gbps", "check_rel_err",
            "ceiling_tflops", "ceiling_gbps", "floor_ms", "pct_roofline", "ideal_floor_ms", "pct_ideal",
            "speedup_vs_torchvision", "speedup_vs_cudnn_conv"}


@dataclass
class Config:
    """What to run. ``smoke`` is forced in the simulator."""

    suites: tuple[str, ...] = tuple(SUITES)
    shapes: tuple[tuple[str, Geometry], ...] = ()   # user shapes (name, geometry)
    methods: tuple[str, ...] | None = None           # None: all available
    passes: tuple[str, ...] = PASSES
    dtype: str = "float32"
    reps: int = 50
    warmup: int = 5
    out: Path | None = None
    plot: bool = True
    tf32_rows: bool = False
    measure: bool = True
    commit: str | None = None
    seed: int = 0
    quiet: bool = False
    max_minutes: float = 8.0   # cases not started by then are recorded as skipped

    @property
    def smoke(self) -> bool:
        return backend.IS_SIMULATOR


# --------------------------------------------------------------------------- shapes
def parse_shape(text: str) -> tuple[str, Geometry]:
    """``N,C,Cout,H,W[,k]`` -> ``("N,C,Cout,H,W,k", Geometry)`` (stride 1, same padding, mask)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (5, 6) or min(values) < 1:
        raise ValueError(f"--shape expects N,C,Cout,H,W[,k] (positive ints), got {text!r}")
    g = _layer(*values)
    return "x".join(str(v) for v in values), g


def _geometries(config: Config) -> list[tuple[str, Geometry]]:
    if config.smoke:
        chosen = list(SMOKE_SUITES.items())
    else:
        unknown = [s for s in config.suites if s not in SUITES]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; suites are {list(SUITES)}")
        chosen = [(s, SUITES[s]) for s in config.suites]
    chosen += list(config.shapes)
    return [(name, replace(g, dtype=config.dtype)) for name, g in chosen]


# --------------------------------------------------------------------------- environment
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


_disable_tf32 = provenance_.disable_tf32


def _torchvision_deform():
    """``torchvision.ops.deform_conv2d`` if importable and usable on CUDA, else None."""
    torch = _torch()
    if torch is None or backend.IS_SIMULATOR or not torch.cuda.is_available():
        return None
    try:
        from torchvision.ops import deform_conv2d
    except Exception:  # noqa: BLE001 - missing or broken install
        return None
    return deform_conv2d


# --------------------------------------------------------------------------- the cases
class _Layer:
    """One shape's arrays: deftnumba's (NumPy in the simulator, CuPy on the GPU) and
    torch views of the same memory (DLPack on the GPU, ``from_numpy`` in the simulator)."""

    def __init__(self, g: Geometry, seed: int):
        from ..dcn.demo import random_layer

        self.g = g
        host = random_layer(g, seed=seed, offset_scale=2.0)  # random offsets of a few pixels
        rng = np.random.default_rng(seed + 1)
        grad = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
        self.arrays = [backend.to_device(a) if a is not None else None for a in host]
        self.grad_output = backend.to_device(grad)
        self.kwargs = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w),
                           dilation=(g.dil_h, g.dil_w))
        torch = _torch()
        self.tensors = None
        if torch is not None:
            convert = torch.from_numpy if backend.IS_SIMULATOR else torch.from_dlpack
            self.tensors = [convert(a) if a is not None else None for a in self.arrays]
            self.grad_tensor = convert(self.grad_output)

    # deftnumba --------------------------------------------------------------
    def dn_forward(self, method):
        import deftnumba as dn

        x, offset, weight, bias, mask = self.arrays
        return lambda: dn.deform_conv2d(x, offset, weight, bias, **self.kwargs, mask=mask, method=method)

    def dn_backward(self, method):
        import deftnumba as dn

        x, offset, weight, bias, mask = self.arrays
        return lambda: dn.deform_conv2d_backward(self.grad_output, x, offset, weight, bias, **self.kwargs,
                                                 mask=mask, method=method)

    # torch ------------------------------------------------------------------
    def torch_forward(self, method, requires_grad=False):
        """A function running the baseline forward; with ``requires_grad`` it returns
        ``(output, leaf tensors)`` for autograd."""
        torch = _torch()
        x, offset, weight, bias, mask = self.tensors
        g = self.g
        tv = _torchvision_deform()

        def forward():
            leaves = (x, offset, weight, bias, mask)
            if requires_grad:  # fresh leaves per call, so every backward has its own graph
                leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
            xi, oi, wi, bi, mi = leaves
            if method == "torchvision":
                out = tv(xi, oi, wi, bi, mask=mi, **self.kwargs)
            else:  # cudnn_conv: the dense convolution of the same shape
                out = torch.nn.functional.conv2d(xi, wi, bi, stride=self.kwargs["stride"],
                                                 padding=self.kwargs["padding"],
                                                 dilation=self.kwargs["dilation"], groups=g.groups)
                leaves = [xi, wi, bi]
            return out, [t for t in leaves if t is not None]

        return forward


@dataclass
class _Case:
    shape: str
    g: Geometry
    pass_: str
    method: str
    detail: str = ""
    tf32: bool = False


def _methods(config: Config) -> dict[str, list[str]]:
    """Methods per pass, read now: deftnumba's own, then the available baselines."""
    import deftnumba as dn

    torch = _torch()
    baselines = []
    if _torchvision_deform() is not None:
        baselines.append("torchvision")
    if torch is not None:
        baselines.append("cudnn_conv")
    forward = list(dn.METHODS)
    has_backward = hasattr(dn, "deform_conv2d_backward")
    backward = list(getattr(dn, "BACKWARD_METHODS", dn.METHODS)) if has_backward else []
    chosen = {
        "fwd": forward + baselines,
        "bwd": backward + baselines if has_backward else [],
        "fwdbwd": backward + baselines if has_backward else [],
        "host": forward + baselines,
    }
    if config.methods is not None:
        chosen = {p: [m for m in ms if m in config.methods] for p, ms in chosen.items()}
    return {p: ms for p, ms in chosen.items() if p in config.passes}


def _cases(config: Config) -> list[_Case]:
    cases = []
    methods = _methods(config)
    import deftnumba as dn

    for shape, g in _geometries(config):
        for pass_ in (p for p in PASSES if p in methods):
            for method in methods[pass_]:
                detail = ""
                if pass_ == "fwdbwd" and method not in BASELINES:
                    detail = f"fwd={method if method in dn.METHODS else 'auto'} bwd={method}"
                cases.append(_Case(shape, g, pass_, method, detail))
                if config.tf32_rows and method in BASELINES and pass_ != "host" and g.dtype == "float32":
                    cases.append(_Case(shape, g, pass_, method + "+tf32", "TF32 on (cuDNN, cuBLAS)", True))
    return cases


def _runner(case: _Case, layer: _Layer):
    """``(prepare, run, framework)`` for a timed case."""
    import deftnumba as dn

    method = case.method.removesuffix("+tf32")
    if method not in BASELINES:
        fwd_method = method if method in dn.METHODS else "auto"
        forward, backward = layer.dn_forward(fwd_method), None
        if case.pass_ != "fwd":
            backward = layer.dn_backward(method)
        run = {"fwd": lambda _: forward(), "bwd": lambda _: backward(),
               "fwdbwd": lambda _: (forward(), backward())}[case.pass_]
        return (lambda: None), run, "deftnumba"
    torch = _torch()
    forward = layer.torch_forward(method, requires_grad=case.pass_ != "fwd")

    def grads(out, leaves):
        return torch.autograd.grad(out, leaves, layer.grad_tensor)

    if case.pass_ == "fwd":
        return (lambda: None), (lambda _: forward()), "torch"
    if case.pass_ == "bwd":
        return forward, (lambda state: grads(*state)), "torch"
    return (lambda: None), (lambda _: grads(*forward())), "torch"


class _TF32:
    """Context: TF32 on in torch for a labelled row, off again afterwards."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        torch = _torch()
        if self.on and torch is not None:
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        _disable_tf32(_torch())


def _forward_output(layer: _Layer, method: str) -> np.ndarray:
    """One forward of ``method`` as a float64 host array."""
    import deftnumba as dn

    if method in BASELINES:
        out, _ = layer.torch_forward(method)()
        return out.detach().double().cpu().numpy()
    x, offset, weight, bias, mask = layer.arrays
    out = dn.deform_conv2d(x, offset, weight, bias, **layer.kwargs, mask=mask, method=method)
    return np.asarray(backend.to_host(out), dtype=np.float64)


def _reference_output(layer: _Layer) -> tuple[str, np.ndarray]:
    """What forward outputs are checked against: torchvision where it runs, else the
    float64 NumPy reference for small layers, else deftnumba's im2col baseline."""
    if _torchvision_deform() is not None:
        return "torchvision", _forward_output(layer, "torchvision")
    g = layer.g
    if g.batch * g.in_channels * g.taps * g.out_h * g.out_w <= 2e6:
        from ..dcn import reference

        host = [backend.to_host(a) if a is not None else None for a in layer.arrays]
        return "float64 reference", reference.deform_conv2d(*host[:4], **layer.kwargs, mask=host[4])
    return "im2col", _forward_output(layer, "im2col")


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-300))


# --------------------------------------------------------------------------- the run
def _roofline_columns(case: _Case, median_ms: float, ceilings: roofline.Ceilings) -> dict:
    if case.pass_ == "host":
        return {}
    method = case.method.removesuffix("+tf32")
    model = method if roofline.has_model(method, case.pass_) else None
    basis = model or "fused (ideal)"
    conv = roofline.conv_flops(case.g, case.pass_)
    moved = roofline.min_bytes(case.g, model or "fused", case.pass_)
    cols = {"tflops": conv / (median_ms * 1e-3) / 1e12, "gbps": moved / (median_ms * 1e-3) / 1e9,
            "bytes_basis": basis,
            "ideal_floor_ms": roofline.floor_ms(case.g, "fused", case.pass_, ceilings)}
    cols["pct_ideal"] = 100.0 * cols["ideal_floor_ms"] / median_ms
    if model:
        cols["floor_ms"] = roofline.floor_ms(case.g, model, case.pass_, ceilings)
        cols["pct_roofline"] = 100.0 * cols["floor_ms"] / median_ms
    return cols


def _add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_<baseline> = baseline median / row median`` for the same shape,
    dtype and pass (fp32 rows against the TF32-off baseline)."""
    index = {(r["shape"], r["dtype"], r["pass"], r["method"]): r["median_ms"]
             for r in rows if r["status"] == "ok"}
    for r in rows:
        for base in BASELINES:
            ref = index.get((r["shape"], r["dtype"], r["pass"], base))
            if r["status"] == "ok" and ref:
                r[f"speedup_vs_{base}"] = ref / r["median_ms"]


def _progress(done: int, total: int, text: str, quiet: bool) -> None:
    if quiet:
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(config: Config, on_row=None) -> list[dict]:
    """Time every case of ``config``; return the rows (dicts keyed by ``COLUMNS``).

    ``on_row(row)`` is called after each case (the CLI appends it to a partial CSV, so
    a run cut short still leaves its rows). Cases not started within
    ``config.max_minutes`` are recorded as skipped.
    """
    started = time.perf_counter()
    torch = _torch()
    _disable_tf32(torch)
    if not backend.IS_SIMULATOR and torch is not None and torch.cuda.is_available():
        torch.set_float32_matmul_precision("highest")
    reps, warmup = (min(config.reps, 3), min(config.warmup, 1)) if config.smoke else (config.reps, config.warmup)
    if not config.smoke and reps < 50:
        print(f"warning: --reps {reps} < 50: below the benchmark convention", file=sys.stderr)
    if config.smoke or not config.measure:
        ceilings = roofline.H200_LEADS
    else:
        ceilings = roofline.measure_ceilings()
    base = provenance(config.commit)
    base["tf32_check"] = tf32_check()
    clock = timing.Timer()
    cases = _cases(config)
    rows, layers, refs = [], {}, {}
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.shape} {case.pass_} {case.method}", config.quiet)
        over_budget = time.perf_counter() - started > 60 * config.max_minutes
        if case.shape not in layers and not over_budget:
            layers.clear()  # one shape's arrays at a time
            layers[case.shape] = _Layer(case.g, config.seed)
        layer = layers.get(case.shape)
        g = case.g
        row = dict(base, dtype=g.dtype, tf32=case.tf32, shape=case.shape, batch=g.batch,
                   in_channels=g.in_channels, out_channels=g.out_channels, height=g.height, width=g.width,
                   kernel_h=g.kernel_h, kernel_w=g.kernel_w, stride_h=g.stride_h, stride_w=g.stride_w,
                   pad_h=g.pad_h, pad_w=g.pad_w, dil_h=g.dil_h, dil_w=g.dil_w, groups=g.groups,
                   offset_groups=g.offset_groups, mask=g.has_mask, bias=g.has_bias,
                   method=case.method, detail=case.detail, reps=reps, warmup=warmup,
                   l2_flush_bytes=clock.flush_bytes if case.pass_ != "host" else 0,
                   clock="host clock" if case.pass_ == "host" else clock.label,
                   ceilings=ceilings.name, ceiling_source=ceilings.source,
                   ceiling_tflops=ceilings.flops_per_s / 1e12, ceiling_gbps=ceilings.bytes_per_s / 1e9)
        row["pass"] = case.pass_
        try:
            if over_budget:
                raise TimeoutError(f"skipped: past the --max-minutes {config.max_minutes} budget")
            with _TF32(case.tf32):
                if case.pass_ == "host":
                    if case.method in BASELINES:
                        forward = layer.torch_forward(case.method)
                    else:
                        forward = layer.dn_forward(case.method)
                    ms = timing.host_call_ms(forward, reps)
                else:
                    if case.pass_ == "fwd" and not case.tf32 and case.method != "cudnn_conv":
                        if case.shape not in refs:
                            refs[case.shape] = _reference_output(layer)
                        against, ref = refs[case.shape]
                        row["check_rel_err"] = _rel_err(_forward_output(layer, case.method), ref)
                        row["detail"] = f"output checked against {against}"
                    prepare, timed, framework = _runner(case, layer)
                    ms = clock.time(prepare, timed, reps, warmup, framework)
                row["reps"] = len(ms)
            row["median_ms"], row["p10_ms"], row["p90_ms"] = timing.percentiles(ms)
            row.update(_roofline_columns(case, row["median_ms"], ceilings))
            row["status"] = "ok"
        except TimeoutError as err:
            row["status"] = str(err)
        except Exception as err:  # noqa: BLE001 - one failing case must not end the run
            row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        if on_row is not None:
            on_row({c: row.get(c, "") for c in COLUMNS})
    _progress(len(cases), len(cases), "done", config.quiet)
    _add_speedups(rows)
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


# --------------------------------------------------------------------------- files
def output_dir(config: Config) -> Path:
    """``data/bench/`` for GPU runs; ``build/bench-smoke/`` for the simulator. Simulator
    output is refused anywhere under ``data/bench/``."""
    out = Path(config.out) if config.out else (SMOKE_DIR if config.smoke else BENCH_DIR)
    if config.smoke:
        provenance_.refuse_smoke_output(out, BENCH_DIR)
    return out


def write_csv(rows: list[dict], directory: Path) -> Path:
    """Write ``rows`` as ``csv_name(rows[0])`` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / csv_name(rows[0] if rows else provenance())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def load_results(path) -> list[dict]:
    """Rows of a bench CSV, numbers as floats (``None`` where empty)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            for key in _NUMERIC & row.keys():
                row[key] = float(row[key]) if row[key] not in ("", None) else None
            for key in ("mask", "bias", "tf32"):
                if key in row:
                    row[key] = row[key] == "True"
            rows.append(row)
    return rows


def describe(rows: list[dict]) -> str:
    """"recorded on NVIDIA H200, commit abc123, 2026-..." (or the smoke label) for rows."""
    if not rows:
        return "nothing recorded"
    first = rows[0]
    where = "simulator smoke (not GPU data), " if first["mode"] == SMOKE_LABEL else ""
    return (f"{where}recorded on {first['device']}, commit {str(first['commit'])[:12]}, "
            f"{first['timestamp']}, TF32 {first.get('tf32_check', '')}")


def latest_csv(directory=BENCH_DIR) -> Path | None:
    """The newest GPU CSV under ``directory`` (names start with the UTC timestamp)."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.csv")
                   if not p.name.startswith("smoke_") and not p.name.endswith(".partial.csv")) \
        if directory.is_dir() else []
    return files[-1] if files else None


def recorded_note(directory=BENCH_DIR) -> str:
    """What a notebook says about recorded GPU results: their provenance, or that none exist."""
    path = latest_csv(directory)
    if path is None:
        return f"nothing recorded yet: no GPU benchmark CSV under {directory} (run `python -m deftnumba bench` on a GPU)"
    return f"{describe(load_results(path))} ({path.name})"


# --------------------------------------------------------------------------- plots
def _figure(ax):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def plot_speedups(rows: list[dict], baseline: str = "torchvision", pass_: str = "fwd", ax=None, title=None):
    """Grouped bars: speedup of each method over ``baseline`` per shape (``baseline``
    median / method median), error bars from the p10/p90 of the method. Falls back to
    ``im2col`` as the baseline when no ``baseline`` rows exist. Returns the Figure."""
    ok = [r for r in rows if r["status"] == "ok" and r["pass"] == pass_ and not r.get("tf32")]
    if not any(r["method"] == baseline for r in ok):
        baseline = "im2col"
    base = {r["shape"]: r["median_ms"] for r in ok if r["method"] == baseline}
    shapes = [s for s in dict.fromkeys(r["shape"] for r in ok) if s in base]
    methods = [m for m in dict.fromkeys(r["method"] for r in ok) if m != baseline]
    fig, ax = _figure(ax)
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, shape in enumerate(shapes):
            r = next((r for r in ok if r["shape"] == shape and r["method"] == method), None)
            if r is None:
                continue
            s = base[shape] / r["median_ms"]
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(s)
            lo.append(s - base[shape] / r["p90_ms"])
            hi.append(base[shape] / r["p10_ms"] - s)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    speedups = [base[r["shape"]] / r["median_ms"] for r in ok if r["shape"] in base]
    if speedups and max(speedups) / min(speedups) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel(f"speedup over {baseline} ({pass_}; bars p10-p90)")
    ax.legend(fontsize="small")
    ax.set_title(title or describe(rows), fontsize="small", wrap=True)
    _label_smoke(ax, rows)
    return fig


def _label_smoke(ax, rows) -> None:
    """Stamp simulator-smoke charts so they are never read as GPU results."""
    if rows and rows[0].get("mode") == SMOKE_LABEL:
        ax.text(0.5, 0.5, SMOKE_LABEL.upper(), transform=ax.transAxes, ha="center", va="center",
                fontsize=16, color="red", alpha=0.35, rotation=20)


def plot_roofline(ceilings: roofline.Ceilings = roofline.H200_LEADS, rows: list[dict] | None = None,
                  geometries: dict | None = None, pass_: str = "fwd", ax=None, title=None):
    """Log-log roofline: ``min(rate, intensity * bandwidth)``, with one point per row
    (intensity of its method's modelled bytes, achieved conv FLOP/s) or, without rows,
    each modelled method of ``geometries`` at its predicted floor. Returns the Figure."""
    fig, ax = _figure(ax)
    points = []
    if rows:
        for r in rows:
            if r["status"] != "ok" or r["pass"] != pass_ or not roofline.has_model(r["method"], pass_):
                continue
            g = Geometry(**{k: int(r[k]) for k in ("batch", "in_channels", "height", "width", "out_channels",
                                                    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h",
                                                    "pad_w", "dil_h", "dil_w", "groups", "offset_groups")},
                         has_mask=bool(r["mask"]), has_bias=bool(r["bias"]), dtype=r["dtype"])
            conv = roofline.conv_flops(g, pass_)
            points.append((f"{r['shape']} {r['method']}",
                           conv / roofline.min_bytes(g, r["method"], pass_), conv / (r["median_ms"] * 1e-3)))
    else:
        for shape, g in (geometries or SUITES).items():
            for method in roofline.MODELS:
                conv = roofline.conv_flops(g, pass_)
                floor = roofline.floor_ms(g, method, pass_, ceilings)
                points.append((f"{shape} {method}", conv / roofline.min_bytes(g, method, pass_),
                               conv / (floor * 1e-3)))
    intensities = [p[1] for p in points] or [1.0]
    xs = np.logspace(math.log10(min(intensities + [1.0])) - 0.5, math.log10(max(intensities + [1e3])) + 0.5, 200)
    ax.loglog(xs, np.minimum(ceilings.flops_per_s, xs * ceilings.bytes_per_s) / 1e12, color="black",
              label=f"roof: {ceilings.name}")
    for label, x, y in points:
        ax.loglog([x], [y / 1e12], "o")
        ax.annotate(label, (x, y / 1e12), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("intensity (conv FLOP per modelled byte)")
    ax.set_ylabel("TFLOP/s (conv FLOPs)")
    what = describe(rows) if rows else "predicted floors (no measurement)"
    ax.set_title(title or what, fontsize="small", wrap=True)
    ax.legend(fontsize="small")
    _label_smoke(ax, rows)
    return fig


# --------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    head = (f"{'shape':<10} {'pass':<7} {'method':<18} {'median ms':>10} {'p10':>9} {'p90':>9} "
            f"{'TFLOP/s':>8} {'GB/s':>8} {'%roof':>6} {'%ideal':>6} {'x tv':>6} {'x cudnn':>7}")
    lines = [head, "-" * len(head)]

    def f(v, width, digits):
        return f"{v:{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:<10} {r['pass']:<7} {r['method']:<18} {r['status'][:70]}")
            continue
        lines.append(f"{r['shape']:<10} {r['pass']:<7} {r['method']:<18} {f(r['median_ms'], 10, 4)} "
                     f"{f(r['p10_ms'], 9, 4)} {f(r['p90_ms'], 9, 4)} {f(r['tflops'], 8, 2)} "
                     f"{f(r['gbps'], 8, 1)} {f(r['pct_roofline'], 6, 1)} {f(r['pct_ideal'], 6, 1)} "
                     f"{f(r['speedup_vs_torchvision'], 6, 2)} {f(r['speedup_vs_cudnn_conv'], 7, 3)}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The ``bench`` verb's options (``deftnumba.__main__`` adds the subparser)."""
    parser.add_argument("--suite", action="append", choices=list(SUITES),
                        help="suite shape(s) to run (default: all); repeatable")
    parser.add_argument("--shape", action="append", default=[], metavar="N,C,Cout,H,W[,k]",
                        help="an extra shape (stride 1, same padding, mask); repeatable")
    parser.add_argument("--only-shapes", action="store_true", help="run only the --shape shapes")
    parser.add_argument("--method", action="append", help="limit to these methods; repeatable")
    parser.add_argument("--pass", dest="passes", action="append", choices=PASSES,
                        help="limit to these passes; repeatable (default: all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--reps", type=int, default=50, help="timed runs per case (>= 50 on a GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="output directory (default data/bench, or build/bench-smoke "
                                                  "in the simulator)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="add baseline rows with TF32 on, named <method>+tf32")
    parser.add_argument("--no-measure", action="store_true",
                        help="use the H200 lead ceilings instead of measuring them")
    parser.add_argument("--commit", help="commit to record (default $DEFTNUMBA_COMMIT or git rev-parse HEAD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="cases not started within this budget are recorded as skipped (default 8)")


def config_from_args(args) -> Config:
    shapes = tuple(parse_shape(s) for s in args.shape)
    suites = () if args.only_shapes else tuple(args.suite or SUITES)
    return Config(suites=suites, shapes=shapes, methods=tuple(args.method) if args.method else None,
                  passes=tuple(args.passes or PASSES), dtype=args.dtype, reps=args.reps, warmup=args.warmup,
                  out=args.out, plot=not args.no_plot, tf32_rows=args.tf32, measure=not args.no_measure,
                  commit=args.commit, seed=args.seed, quiet=args.quiet, max_minutes=args.max_minutes)


class _PartialCsv:
    """Rows appended as they are timed, to ``<name>.partial.csv`` (removed once the full
    CSV, with the speedup columns, is written), so a run that is cut short keeps its rows."""

    def __init__(self, directory: Path):
        self.directory, self.path = directory, None

    def append(self, row: dict) -> None:
        if self.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / csv_name(row).replace(".csv", ".partial.csv")
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def main(args) -> int:
    """``python -m deftnumba bench``: run, print the table, write the CSV and chart."""
    config = config_from_args(args)
    directory = output_dir(config)  # refuse a bad --out before spending any time
    if config.smoke:
        print(f"{SMOKE_LABEL}: no GPU, so kernels run in Numba's CUDA simulator on a tiny shape; "
              f"these times say nothing about GPU speed. Output goes to {directory}.", file=sys.stderr)
    start = time.perf_counter()
    partial = _PartialCsv(directory)
    rows = run(config, on_row=partial.append)
    print(describe(rows))
    print(format_table(rows))
    path = write_csv(rows, directory)
    partial.remove()
    print(f"csv: {path}")
    if config.plot:
        fig = plot_speedups(rows)
        png = path.with_name(path.stem + "_speedup.png")
        fig.savefig(png, dpi=120)
        print(f"chart: {png}")
    print(f"{len(rows)} rows in {time.perf_counter() - start:.1f} s"
          + (f" ({SMOKE_LABEL})" if config.smoke else ""))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
