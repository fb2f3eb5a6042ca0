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

Nothing here computes a result a notebook reports; it only frames them. The
checks and timings the notebooks run live in ``dcn.study``, the timer in
``runtime.timing``, every chart in ``bench.plots``; their names are re-exported
here so a notebook needs one import.
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
from .bench.plots import (TRAIN_ORDER, plot_offset_field, plot_offset_histograms,  # noqa: F401
                          plot_operator_roofline, plot_percent_of_roofline, plot_training)
from .dcn.study import check_methods, time_operators, time_tiles  # noqa: F401

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

    def banner(self, directory: str | Path | None = None) -> str:
        """The mode, the backend line (as normal output: notebooks set ``DEFTNUMBA_QUIET`` so
        it is not a red stderr box), and what the timing charts will come from: "recorded data"
        only when a GPU result is recorded under ``data/bench/`` (or ``directory``)."""
        backend_line = f"Backend: `{self.backend}` ({backend.REASON})."
        if self.live:
            return (f"**Mode: live on {self.device}.** Kernels run on the GPU at full size and this "
                    f"notebook times them itself (CUDA events). {backend_line}")
        found = recorded_results(BENCH_DIR if directory is None else directory)
        files = [f.name for f in (found["layer_file"], found["train_file"]) if f is not None]
        if files:
            return ("**Mode: simulator + recorded data.** No GPU here: kernels run in Numba's CUDA "
                    "simulator on tiny shapes, to check them, never to time them. Timing charts come "
                    f"from the GPU results recorded under `data/bench/` ({', '.join(files)}), each "
                    f"labelled with the device and commit it was recorded on. {backend_line}")
        return ("**Mode: simulator, nothing recorded.** No GPU here: kernels run in Numba's CUDA "
                "simulator on tiny shapes, to check them, never to time them, and no GPU result is "
                "recorded under `data/bench/` yet, so timing charts are replaced by a note saying so. "
                f"Charts from counts are drawn. {backend_line}")


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
    """The recorded CSVs under ``data/bench/`` and its folders (``dcn/``, ``training/`` ...)
    matching ``pattern``, oldest first (names start with the UTC timestamp)."""
    directory = Path(directory)
    return sorted(directory.rglob(pattern), key=lambda p: (p.name, str(p))) if directory.is_dir() else []


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
    """A Markdown table of ``rows`` (dicts), floats formatted with ``floats``. The columns are
    ``columns``, else every key of any row in the order they first appear (a row without one
    leaves its cell empty)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return format(float(value), floats)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


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
