"""THE timer: every time deftnumba reports comes from here.

* ``Stopwatch``: named sections inside one call (``ops`` times each operator with it);
* ``Timer``: a benchmark's repeated runs: CUDA events (CuPy's, or torch's for torch
  work), an L2 flush before every run, a warm-up, and a per-case time budget;
* ``time_calls``: median / p10 / p90 of a few zero-argument callables (notebooks,
  autotuning, ceilings);
* ``host_call_ms``: host time from Python to return (launch overhead).

On a GPU these are CUDA-event times. In the simulator every one of them is a host
wall clock over Python threads, labelled so (``unit``/``label``): never a GPU time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backend


@dataclass
class Timed:
    """What to time when a plain zero-argument callable is not enough: ``run(state)`` is
    timed, ``state = prepare()`` before it is not (e.g. a forward whose backward is timed);
    ``framework`` picks whose CUDA events (``"torch"`` or ``"cupy"``)."""

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None
    framework: str = "cupy"

    @classmethod
    def of(cls, what) -> "Timed":
        """A ``Timed`` as is; a zero-argument callable as ``Timed(lambda _: what())``."""
        return what if isinstance(what, Timed) else cls(lambda _: what())


def percentiles(ms) -> tuple[float, float, float]:
    """``(median, p10, p90)`` of a list of milliseconds."""
    a = np.asarray(ms, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90))


class Stopwatch:
    """Times named sections: CUDA events on the GPU, the host clock in the simulator.

    >>> sw = Stopwatch()
    >>> with sw.section("gemm"):
    ...     pass
    >>> sw.milliseconds()   # {'gemm': [...]}   (call after the work is done)

    ``sw.unit`` says which clock was used, so simulator times are never taken
    for GPU times.
    """

    def __init__(self):
        self.unit = "simulator wall-clock ms" if backend.IS_SIMULATOR else "GPU ms (CUDA events)"
        self._records: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def section(self, name: str):
        if backend.IS_SIMULATOR:
            start = time.perf_counter()
            yield
            self._records.append((name, start, time.perf_counter()))
            return
        cp = backend.cupy()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        yield
        stop.record()
        self._records.append((name, start, stop))

    def milliseconds(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name, start, stop in self._records:
            if backend.IS_SIMULATOR:
                ms = (stop - start) * 1e3
            else:
                stop.synchronize()
                ms = backend.cupy().cuda.get_elapsed_time(start, stop)
            out.setdefault(name, []).append(ms)
        return out


class _NoStopwatch:
    """Stand-in used when the caller does not time anything."""

    @contextlib.contextmanager
    def section(self, name: str):
        yield


NO_STOPWATCH = _NoStopwatch()


_torch = backend.torch_or_none


class Timer:
    """Repeated runs of one case: CUDA events with an L2 flush before every run on a
    GPU (CuPy's events for deftnumba and CuPy work, torch's for torch work; both on the
    legacy default stream); the host clock in the simulator.

    ``flush_l2=False`` skips the flush (runs that stream far more than L2 anyway).
    """

    def __init__(self, flush_l2: bool = True):
        self.flush_bytes = 0
        self.label = "host clock (simulator)" if backend.IS_SIMULATOR else (
            "CUDA events, L2 flushed" if flush_l2 else "CUDA events")
        if not backend.IS_SIMULATOR and flush_l2:
            cp = backend.cupy()
            try:
                l2 = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["l2CacheSize"])
            except (KeyError, TypeError, AttributeError):
                l2 = 60 << 20  # an H200's, a lead from outside the project (not measured here)
            self.flush_bytes = max(128 << 20, 2 * l2)
            self._flush = cp.empty(self.flush_bytes // 4, dtype=cp.float32)
            self._count = 0

    def flush(self) -> None:
        if self.flush_bytes:
            self._count += 1
            self._flush.fill(self._count)  # a write of >= 2x L2 evicts the previous run's data

    def time(self, prepare, run, reps: int, warmup: int, framework: str = "cupy",
             case_seconds: float = 30.0) -> list[float]:
        """Milliseconds of ``run(state)`` per repetition; ``state = prepare()`` is untimed.

        ``warmup`` untimed runs come first (at least one unless ``warmup`` is 0 and
        ``case_seconds`` is infinite). A case whose last warm-up call (compiled by then)
        says ``reps`` runs would take over ``case_seconds`` gets fewer runs (never under
        10): the caller records ``len(result)``.
        """
        def synchronize():
            backend.synchronize()
            torch = _torch() if framework == "torch" else None
            if torch is not None and torch.cuda.is_available():
                torch.cuda.synchronize()

        warmups = warmup if math.isinf(case_seconds) else max(warmup, 1)
        per_call = 0.0
        for _ in range(warmups):
            start = time.perf_counter()
            run(prepare())
            synchronize()
            per_call = time.perf_counter() - start
        if not backend.IS_SIMULATOR and per_call * reps > case_seconds:
            reps = max(10, int(case_seconds / per_call))
        torch_events = framework == "torch" and (_torch() is not None and _torch().cuda.is_available())
        if backend.IS_SIMULATOR and not torch_events:
            times = []
            for _ in range(reps):
                state = prepare()
                start = time.perf_counter()
                run(state)
                synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        if framework == "torch":
            torch = _torch()
            new_event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            cp = backend.cupy()
            new_event = cp.cuda.Event
            elapsed = cp.cuda.get_elapsed_time
        pairs = []
        for _ in range(reps):
            state = prepare()
            self.flush()
            start, stop = new_event(), new_event()
            start.record()
            run(state)
            stop.record()
            pairs.append((start, stop))
        pairs[-1][1].synchronize()
        return [elapsed(a, b) for a, b in pairs]


def host_call_ms(call, reps: int) -> list[float]:
    """Host time of ``call()`` from Python to return (to launch), the GPU idle before each."""
    call()
    times = []
    for _ in range(reps):
        backend.synchronize()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    backend.synchronize()
    return times


def time_calls(calls: Mapping, repeats: int = 20, warmup: int = 2) -> dict[str, dict]:
    """Time zero-argument callables: ``{name: {"median_ms", "p10_ms", "p90_ms", "unit"}}``.

    Each call runs ``warmup`` times untimed (compilation, caches), then ``repeats``
    times, each inside a ``Stopwatch`` section (CUDA events on a GPU, the host clock
    in the simulator; ``unit`` says which).
    """
    results = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        backend.synchronize()
        watch = Stopwatch()
        for _ in range(repeats):
            with watch.section(name):
                call()
        median, p10, p90 = percentiles(watch.milliseconds()[name])
        results[name] = {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "unit": watch.unit}
    return results
