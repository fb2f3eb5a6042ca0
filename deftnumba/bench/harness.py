"""The benchmark harness: for each registered op, its shape suites x methods x passes,
timed with CUDA events.

The harness is generic; what it times comes from an **op** (``deftnumba.dcn.bench_op``
is the first), a module or object with:

* ``name``: ``"dcn"``, ``"tucker"``, ``"lean"``: the CSV's ``op`` column and the
  folder ``data/bench/<name>/``;
* ``methods()``: ``{method: one-line description}``, ours and the baselines;
* ``suites()``: ``{shape name: shape parameters (a dict)}``; the parameters become
  the CSV's shape columns;
* ``make_inputs(shape, dtype, seed)``: the inputs of one shape (on the device);
* ``runner(method, pass_, inputs)``: a zero-argument callable to time (or a
  ``runtime.timing.Timed``), or None where that method has no such pass;
* ``operators(shape, method, pass_)``: ``perf.roofline.Operator`` counts, or ``[]``.

Optional, with defaults when absent: ``baselines()`` (speedup columns, ``+tf32``
rows; default none), ``passes(method)`` (default fwd, bwd, fwdbwd, host),
``smoke_suites()`` (the simulator's tiny shapes; an op without them is not run in
the simulator), ``parse_shape(text)`` (``--shape``), ``useful_flops(shape, pass_)``
(what TFLOP/s are quoted in; default the method's counted FLOPs),
``ideal_method`` (``pct_ideal``'s yardstick), ``detail(method, pass_)`` and
``check(method, inputs)`` (a forward's ``(against, relative error)``). The shape
dicts given to ``operators`` and ``useful_flops`` also carry the row's ``dtype``.
``OPS`` lists the ops found (``OP_MODULES``: dcn, tucker, lean; missing ones
are skipped); ``register_op`` adds one. A new op is a module, not a branch here.

Passes: ``fwd``, ``bwd``, ``fwdbwd`` (forward then backward) and ``host``: the host
time of one forward call, Python to launch, with the GPU idle (the target is under
30 us). Each time is the median of ``--reps`` (default 50) runs after warm-up, with
p10 and p90, each run timed with CUDA events and preceded by a write of a buffer of
at least twice the L2 size (``runtime.timing.Timer``). fp32 rows run with TF32 off
in cuDNN, cuBLAS-through-torch and CuPy (checked at start); ``--tf32`` adds baseline
rows with TF32 on, named ``<method>+tf32``.

Every row carries its provenance (``perf.provenance``: device, driver, CUDA, library
versions, commit, timestamp), the op, the shape and its parameters, the roofline floor
of its method and of the op's ideal method (ceilings measured once per run) and its
speedup over each baseline. The CSV goes to ``data/bench/<op>/`` (or
``$DEFTNUMBA_BENCH_DIR/<op>/``) with a speedup chart (PNG) beside it.

Without a GPU the harness runs a **simulator smoke** version on tiny shapes,
labelled ``simulator smoke (not GPU data)`` in every row; its files go to
``build/bench-smoke/`` (or ``--out``), never under ``data/bench/``.

Reusable pieces for notebooks: ``load_results``, ``describe``, ``latest_csv``,
``recorded_note``; the charts are in ``bench.plots``.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..dcn import bench_op as dcn_op
from ..perf import provenance as provenance_
from ..perf.device import H200_LEADS
from ..perf.provenance import GPU_LABEL, SMOKE_LABEL, csv_name, git_commit, provenance, tf32_check  # noqa: F401
from ..perf.roofline import measure_ceilings
from ..runtime import backend, timing
from ..runtime.timing import Timed
from .plots import describe, plot_roofline, plot_speedups  # noqa: F401  (the harness's charts)

REPO = provenance_.REPO
BENCH_DIR = provenance_.bench_dir()
SMOKE_DIR = REPO / "build" / "bench-smoke"

from .ops import (OP_MODULES, OPS, PASSES, as_shape, baselines_of, floor_ms, get_op,  # noqa: F401,E402
                  passes_of, register_op, shape_columns, shape_of, useful_flops)

# The DCN op's suites, kept here under their old names (notebooks and tests read them).
SUITES = dcn_op.SUITES
SMOKE_SUITES = dcn_op.SMOKE_SUITES
parse_shape = dcn_op.parse_shape

BASELINES = dcn_op.BASELINES

_PROVENANCE = ("mode", "device", "compute_capability", "driver", "cuda_runtime", "numba_cuda", "cupy", "torch",
               "torchvision", "numpy", "python", "commit", "timestamp")
_AFTER_SHAPE = (
    # what and how
    "pass", "method", "detail", "status", "reps", "warmup", "l2_flush_bytes", "clock",
    # times and rates
    "median_ms", "p10_ms", "p90_ms", "tflops", "gbps", "bytes_basis", "check_rel_err",
    # roofline
    "ceilings", "ceiling_source", "ceiling_tflops", "ceiling_gbps",
    "floor_ms", "pct_roofline", "ideal_floor_ms", "pct_ideal",
)
_TEXT = set(_PROVENANCE) | {"op", "dtype", "tf32_check", "shape", "pass", "method", "detail", "status", "clock",
                            "bytes_basis", "ceilings", "ceiling_source"}


def columns(op) -> tuple[str, ...]:
    """An op's CSV columns: provenance, op, precision, shape and its parameters, the
    measurement, the roofline, then one speedup column per baseline."""
    baselines = getattr(op, "BASELINES", None) or baselines_of(op)
    return (_PROVENANCE + ("op", "dtype", "tf32", "tf32_check", "shape") + shape_columns(op) + _AFTER_SHAPE
            + tuple(f"speedup_vs_{b}" for b in baselines))


COLUMNS = columns(dcn_op)
"""The DCN op's CSV columns."""


@dataclass
class Config:
    """What to run. ``smoke`` is forced in the simulator."""

    suites: tuple[str, ...] | None = None            # None: all of the op's suites
    shapes: tuple[tuple[str, object], ...] = ()      # user shapes (name, parameters)
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
    op: str = "dcn"

    @property
    def smoke(self) -> bool:
        return backend.IS_SIMULATOR


# --------------------------------------------------------------------------- cases
def _shapes(config: Config, op) -> list[tuple[str, dict]]:
    if config.smoke:
        smoke = getattr(op, "smoke_suites", None)
        chosen = list(smoke().items()) if smoke is not None else []
    else:
        suites = op.suites()
        names = list(suites) if config.suites is None else list(config.suites)
        unknown = [s for s in names if s not in suites]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown} of op {op.name!r}; suites are {list(suites)}")
        chosen = [(s, suites[s]) for s in names]
    chosen += list(config.shapes)
    return [(name, as_shape(op, params)) for name, params in chosen]


@dataclass
class _Case:
    shape: str
    params: dict
    pass_: str
    method: str
    detail: str = ""
    tf32: bool = False


def _cases(config: Config, op) -> list[_Case]:
    """Every (shape, pass, method) to time, in that order; methods read now."""
    methods = list(op.methods())
    if config.methods is not None:
        methods = [m for m in methods if m in config.methods]
    baselines = baselines_of(op)
    detail = getattr(op, "detail", lambda method, pass_: "")
    cases = []
    for shape, params in _shapes(config, op):
        for pass_ in (p for p in PASSES if p in config.passes):
            for method in methods:
                if pass_ not in passes_of(op, method):
                    continue
                cases.append(_Case(shape, params, pass_, method, detail(method, pass_)))
                if config.tf32_rows and method in baselines and pass_ != "host" and config.dtype == "float32":
                    cases.append(_Case(shape, params, pass_, method + "+tf32", "TF32 on (cuDNN, cuBLAS)", True))
    return cases


_torch = backend.torch_or_none


_disable_tf32 = provenance_.disable_tf32


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


# --------------------------------------------------------------------------- the run
def _roofline_columns(op, case: _Case, dtype: str, median_ms: float, ceilings) -> dict:
    if case.pass_ == "host":
        return {}
    method = case.method.removesuffix("+tf32")
    shape = dict(case.params, dtype=dtype)
    counted = op.operators(shape, method, case.pass_)
    ideal = getattr(op, "ideal_method", None)
    ideal_ops = op.operators(shape, ideal, case.pass_) if ideal else []
    basis = method if counted else (f"{ideal} (ideal)" if ideal_ops else "")
    moved = sum(o.bytes for o in (counted or ideal_ops))
    useful = useful_flops(op, shape, method, case.pass_)
    cols = {"bytes_basis": basis}
    if useful:
        cols["tflops"] = useful / (median_ms * 1e-3) / 1e12
    if moved:
        cols["gbps"] = moved / (median_ms * 1e-3) / 1e9
    if ideal_ops:
        cols["ideal_floor_ms"] = floor_ms(ideal_ops, ceilings, dtype)
        cols["pct_ideal"] = 100.0 * cols["ideal_floor_ms"] / median_ms
    if counted:
        cols["floor_ms"] = floor_ms(counted, ceilings, dtype)
        cols["pct_roofline"] = 100.0 * cols["floor_ms"] / median_ms
    return cols


def _add_speedups(rows: list[dict], baselines=BASELINES) -> None:
    """``speedup_vs_<baseline> = baseline median / row median`` for the same op, shape,
    dtype and pass (fp32 rows against the TF32-off baseline)."""
    index = {(r.get("op"), r["shape"], r["dtype"], r["pass"], r["method"]): r["median_ms"]
             for r in rows if r["status"] == "ok"}
    for r in rows:
        for base in baselines:
            ref = index.get((r.get("op"), r["shape"], r["dtype"], r["pass"], base))
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
    """Time every case of ``config`` (one op, ``config.op``); return the rows (dicts keyed
    by ``columns(op)``).

    ``on_row(row)`` is called after each case (the CLI appends it to a partial CSV, so
    a run cut short still leaves its rows). Cases not started within
    ``config.max_minutes`` are recorded as skipped.
    """
    started = time.perf_counter()
    op = get_op(config.op)
    cols = columns(op)
    torch = _torch()
    _disable_tf32(torch)
    if not backend.IS_SIMULATOR and torch is not None and torch.cuda.is_available():
        torch.set_float32_matmul_precision("highest")
    reps, warmup = (min(config.reps, 3), min(config.warmup, 1)) if config.smoke else (config.reps, config.warmup)
    if not config.smoke and reps < 50:
        print(f"warning: --reps {reps} < 50: below the benchmark convention", file=sys.stderr)
    ceilings = H200_LEADS if config.smoke or not config.measure else measure_ceilings()
    base = provenance(config.commit)
    base["tf32_check"] = tf32_check()
    clock = timing.Timer()
    cases = _cases(config, op)
    check = getattr(op, "check", None)
    rows, inputs = [], {}
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.shape} {case.pass_} {case.method}", config.quiet)
        over_budget = time.perf_counter() - started > 60 * config.max_minutes
        if case.shape not in inputs and not over_budget:
            inputs.clear()  # one shape's inputs at a time
            inputs[case.shape] = op.make_inputs(case.params, config.dtype, config.seed)
        made = inputs.get(case.shape)
        row = dict(base, op=op.name, dtype=config.dtype, tf32=case.tf32, shape=case.shape, **case.params,
                   method=case.method, detail=case.detail, reps=reps, warmup=warmup,
                   l2_flush_bytes=clock.flush_bytes if case.pass_ != "host" else 0,
                   clock="host clock" if case.pass_ == "host" else clock.label,
                   ceilings=ceilings.name, ceiling_source=ceilings.source,
                   ceiling_tflops=ceilings.flops_per_s / 1e12, ceiling_gbps=ceilings.bytes_per_s / 1e9)
        row["pass"] = case.pass_
        method = case.method.removesuffix("+tf32")
        try:
            if over_budget:
                raise TimeoutError(f"skipped: past the --max-minutes {config.max_minutes} budget")
            with _TF32(case.tf32):
                work = op.runner(method, "fwd" if case.pass_ == "host" else case.pass_, made)
                if work is None:
                    raise LookupError(f"{op.name} has no {case.pass_} pass for {method}")
                work = Timed.of(work)
                if case.pass_ == "host":
                    ms = timing.host_call_ms(lambda: work.run(work.prepare()), reps)
                else:
                    if case.pass_ == "fwd" and not case.tf32 and check is not None:
                        checked = check(method, made)
                        if checked is not None:
                            against, row["check_rel_err"] = checked
                            row["detail"] = f"output checked against {against}"
                    ms = clock.time(work.prepare, work.run, reps, warmup, work.framework)
                row["reps"] = len(ms)
            row["median_ms"], row["p10_ms"], row["p90_ms"] = timing.percentiles(ms)
            row.update(_roofline_columns(op, case, config.dtype, row["median_ms"], ceilings))
            row["status"] = "ok"
        except TimeoutError as err:
            row["status"] = str(err)
        except Exception as err:  # noqa: BLE001 - one failing case must not end the run
            row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        if on_row is not None:
            on_row({c: row.get(c, "") for c in cols})
    _progress(len(cases), len(cases), "done", config.quiet)
    _add_speedups(rows, baselines_of(op))
    return [{c: row.get(c, "") for c in cols} for row in rows]


# --------------------------------------------------------------------------- files
def output_dir(config: Config) -> Path:
    """``data/bench/<op>/`` (``$DEFTNUMBA_BENCH_DIR/<op>/``) for GPU runs; ``build/bench-smoke/``
    for the simulator; ``config.out`` if given. Simulator output is refused anywhere under
    the recorded-results folder."""
    out = Path(config.out) if config.out else (SMOKE_DIR if config.smoke else BENCH_DIR / config.op)
    if config.smoke:
        provenance_.refuse_smoke_output(out, BENCH_DIR)
    return out


def write_csv(rows: list[dict], directory: Path) -> Path:
    """Write ``rows`` as ``csv_name(rows[0])`` under ``directory``, in their op's columns."""
    directory.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else provenance()
    fields = columns(OPS[first["op"]]) if first.get("op") in OPS else list(first)
    path = directory / csv_name(first)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _value(key: str, text: str):
    if key in _TEXT:
        return text
    if text in ("", None):
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def load_results(path) -> list[dict]:
    """Rows of a bench CSV: numbers as floats (``None`` where empty), ``True``/``False`` as
    booleans, provenance and names as text."""
    with open(path, newline="") as f:
        return [{k: _value(k, v) for k, v in raw.items()} for raw in csv.DictReader(f)]


def latest_csv(directory=None) -> Path | None:
    """The newest GPU CSV under ``directory`` (default ``data/bench/dcn/``; names start with
    the UTC timestamp)."""
    directory = Path(directory) if directory is not None else BENCH_DIR / dcn_op.name
    files = sorted(p for p in directory.glob("*.csv")
                   if not p.name.startswith("smoke_") and not p.name.endswith(".partial.csv")) \
        if directory.is_dir() else []
    return files[-1] if files else None


def recorded_note(directory=None) -> str:
    """What a notebook says about recorded GPU results: their provenance, or that none exist."""
    directory = Path(directory) if directory is not None else BENCH_DIR / dcn_op.name
    path = latest_csv(directory)
    if path is None:
        return f"nothing recorded yet: no GPU benchmark CSV under {directory} (run `python -m deftnumba bench` on a GPU)"
    return f"{describe(load_results(path))} ({path.name})"


# --------------------------------------------------------------------------- report
_THROUGHPUT = (("TFLOP/s", "tflops", 8, 2), ("GB/s", "gbps", 8, 1), ("%roof", "pct_roofline", 6, 1),
               ("%ideal", "pct_ideal", 6, 1))


def missing_baselines(op=None) -> dict[str, str]:
    """The op's declared baselines that this run cannot time, each with the reason (what is
    missing), so a table's empty ``x <baseline>`` column says why it is empty."""
    op = op if op is not None else dcn_op
    declared = tuple(getattr(op, "BASELINES", ()))
    available = set(baselines_of(op))
    why = getattr(op, "baseline_missing_reason", None)
    return {b: (why(b) if why is not None else "not available here") for b in declared if b not in available}


def format_table(rows: list[dict], smoke: bool | None = None) -> str:
    """The run's table: one line per row, a speedup column per baseline (``x <baseline>``).

    In a simulator smoke run (``smoke``; default: rows whose ``mode`` says so) the throughput columns
    (TFLOP/s, GB/s, %roof, %ideal) and the speedup columns are left out: a simulator time
    says nothing about a GPU, so those ratios would be noise. A footer says so.
    """
    if smoke is None:
        smoke = any(r.get("mode") == SMOKE_LABEL for r in rows)
    speedups = [] if smoke else [c for c in (rows[0] if rows else {}) if c.startswith("speedup_vs_")]
    empty = [c for c in speedups if not any(isinstance(r.get(c), (int, float)) for r in rows)]
    speedups = [c for c in speedups if c not in empty]
    throughput = () if smoke else _THROUGHPUT
    time_head = "sim ms" if smoke else "median ms"
    head = (f"{'shape':<10} {'pass':<7} {'method':<18} {time_head:>10} {'p10':>9} {'p90':>9}"
            + "".join(f" {name:>{w}}" for name, _, w, _ in throughput)
            + "".join(f" {'x ' + c.removeprefix('speedup_vs_')[:10]:>12}" for c in speedups))
    lines = [head, "-" * len(head)]

    def f(v, width, digits):
        return f"{v:{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:<10} {r['pass']:<7} {r['method']:<18} {r['status'][:70]}")
            continue
        lines.append(f"{r['shape']:<10} {r['pass']:<7} {r['method']:<18} {f(r['median_ms'], 10, 4)} "
                     f"{f(r['p10_ms'], 9, 4)} {f(r['p90_ms'], 9, 4)}"
                     + "".join(f" {f(r.get(key), w, d)}" for _, key, w, d in throughput)
                     + "".join(f" {f(r[c], 12, 3)}" for c in speedups))
    if smoke:
        lines.append("simulator smoke: times are the CPU simulator's (checks only, not GPU speed); "
                     "TFLOP/s, GB/s, %roof and speedups are left out.")
        if any(r["method"] == "cudnn_conv" for r in rows):
            lines.append("cudnn_conv here is PyTorch's dense conv on the CPU, not cuDNN.")
    for c in empty:
        base = c.removeprefix("speedup_vs_")
        reason = missing_baselines().get(base, "no timed rows") if rows and rows[0].get("op", "dcn") == "dcn" \
            else "no timed rows"
        lines.append(f"x {base}: not measured ({reason}).")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The ``bench`` verb's options (``deftnumba.__main__`` adds the subparser)."""
    parser.add_argument("--op", default="dcn", choices=list(OPS),
                        help="the op to benchmark (default dcn)")
    parser.add_argument("--suite", action="append",
                        help="suite shape(s) of the op to run (default: all); repeatable; "
                             f"dcn: {', '.join(SUITES)}")
    parser.add_argument("--shape", action="append", default=[], metavar="N,C,Cout,H,W[,k]",
                        help="an extra shape in the op's notation (dcn: stride 1, same padding, mask); repeatable")
    parser.add_argument("--only-shapes", action="store_true", help="run only the --shape shapes")
    parser.add_argument("--method", action="append", metavar="METHOD",
                        help="limit to these methods and baselines; repeatable. dcn: "
                             + ", ".join(dcn_op.methods()) + " (baselines run where available: "
                             + ", ".join(dcn_op.BASELINES) + "). With --training: conv, torchvision, deftnumba")
    parser.add_argument("--pass", dest="passes", action="append", choices=PASSES,
                        help="limit to these passes; repeatable (default: all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="default float32")
    parser.add_argument("--reps", type=int, default=50, help="timed runs per case (>= 50 on a GPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (default 5)")
    parser.add_argument("--out", type=Path, help="output directory (default data/bench/<op>, or "
                                                  "build/bench-smoke in the simulator)")
    parser.add_argument("--no-plot", action="store_true", help="write no chart (charts need matplotlib)")
    parser.add_argument("--tf32", action="store_true", help="add baseline rows with TF32 on, named <method>+tf32")
    parser.add_argument("--no-measure", action="store_true",
                        help="use the H200 lead ceilings instead of measuring them")
    parser.add_argument("--commit", help="commit to record (default $DEFTNUMBA_COMMIT or git rev-parse HEAD)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="cases not started within this budget are recorded as skipped (default 8)")


def config_from_args(args) -> Config:
    op = get_op(getattr(args, "op", "dcn"))
    if args.shape and not hasattr(op, "parse_shape"):
        raise SystemExit(f"op {op.name!r} takes no --shape")
    shapes = tuple(op.parse_shape(s) for s in args.shape)
    suites = () if args.only_shapes else (tuple(args.suite) if args.suite else None)
    return Config(suites=suites, shapes=shapes, methods=tuple(args.method) if args.method else None,
                  passes=tuple(args.passes or PASSES), dtype=args.dtype, reps=args.reps, warmup=args.warmup,
                  out=args.out, plot=not args.no_plot, tf32_rows=args.tf32, measure=not args.no_measure,
                  commit=args.commit, seed=args.seed, quiet=args.quiet, max_minutes=args.max_minutes, op=op.name)


class _PartialCsv:
    """Rows appended as they are timed, to ``<name>.partial.csv`` (removed once the full
    CSV, with the speedup columns, is written), so a run that is cut short keeps its rows."""

    def __init__(self, directory: Path, fields):
        self.directory, self.path, self.fields = directory, None, fields

    def append(self, row: dict) -> None:
        if self.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / csv_name(row).replace(".csv", ".partial.csv")
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _save_chart(rows: list[dict], path: Path, config: Config) -> None:
    """The speedup chart beside the CSV; skipped with a message when matplotlib is missing
    (plots are optional: the table and the CSV are the results)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("chart: skipped, matplotlib is not installed (pip install matplotlib, or the "
              "\".[dev]\" extra; --no-plot silences this)")
        return
    op = get_op(config.op)
    baselines = baselines_of(op) or tuple(getattr(op, "BASELINES", ()))
    ours = [m for m in op.methods() if m not in baselines]
    if config.smoke:  # a CPU torch conv against simulated kernels is no speedup: chart ours only
        rows = [r for r in rows if r["method"] not in baselines]
    fig = plot_speedups(rows, **({} if op.name == "dcn" else
                                 {"baseline": (baselines or ours)[0], "fallback": ours[0] if ours else ""}))
    png = path.with_name(path.stem + "_speedup.png")
    fig.savefig(png, dpi=120)
    print(f"chart: {png}")


def main(args) -> int:
    """``python -m deftnumba bench``: run, print the table, write the CSV and chart."""
    config = config_from_args(args)
    directory = output_dir(config)  # refuse a bad --out before spending any time
    if config.smoke and not hasattr(get_op(config.op), "smoke_suites"):
        print(f"{SMOKE_LABEL}: op {config.op!r} has no smoke suite; nothing to run without a GPU.",
              file=sys.stderr)
        return 0
    if config.smoke:
        print(f"{SMOKE_LABEL}: no GPU, so kernels run in Numba's CUDA simulator on a tiny shape; "
              f"these times say nothing about GPU speed. Output goes to {directory}.", file=sys.stderr)
    start = time.perf_counter()
    partial = _PartialCsv(directory, columns(get_op(config.op)))
    rows = run(config, on_row=partial.append)
    print(describe(rows))
    print(format_table(rows, smoke=config.smoke))
    path = write_csv(rows, directory)
    partial.remove()
    print(f"csv: {path}")
    if config.plot:
        _save_chart(rows, path, config)
    print(f"{len(rows)} rows in {time.perf_counter() - start:.1f} s"
          + (f" ({SMOKE_LABEL})" if config.smoke else ""))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
