"""THE timer: every timing loop of the package goes through runtime.timing."""

import pytest

from deftnumba.runtime import backend, timing


def test_percentiles_are_median_p10_p90():
    median, p10, p90 = timing.percentiles([float(v) for v in range(1, 12)])
    assert (median, p10, p90) == (6.0, 2.0, 10.0)


def test_time_calls_counts_warmups_and_repeats_and_labels_the_clock():
    calls = []
    got = timing.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=3)
    assert calls.count("a") == calls.count("b") == 7
    for row in got.values():
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["unit"] == timing.Stopwatch().unit


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the simulator's clock")
def test_timer_prepares_untimed_and_runs_exactly_reps_after_warmups():
    log = []
    timer = timing.Timer()
    times = timer.time(lambda: log.append("prepare") or len(log), lambda state: log.append(("run", state)),
                       reps=5, warmup=2)
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert sum(1 for e in log if isinstance(e, tuple)) == 7 and log.count("prepare") == 7
    assert timer.flush_bytes == 0 and "simulator" in timer.label
    log.clear()
    # an infinite budget honours warmup=0 exactly (the training benchmark's smoke run)
    timer.time(lambda: None, lambda _: log.append(1), reps=2, warmup=0, case_seconds=float("inf"))
    assert log == [1, 1]


def test_timed_wraps_a_plain_callable():
    seen = []
    work = timing.Timed.of(lambda: seen.append(1))
    work.run(work.prepare())
    assert seen == [1] and work.framework == "cupy"
    explicit = timing.Timed(lambda s: seen.append(s), prepare=lambda: 2, framework="torch")
    assert timing.Timed.of(explicit) is explicit


def test_host_call_ms_times_each_call():
    calls = []
    ms = timing.host_call_ms(lambda: calls.append(1), reps=3)
    assert len(ms) == 3 and len(calls) == 4  # one untimed call first


def test_backend_still_reaches_the_moved_names():
    from deftnumba.runtime import grid, simulator

    assert backend.Stopwatch is timing.Stopwatch and backend.NO_STOPWATCH is timing.NO_STOPWATCH
    assert backend.launch_config is grid.launch_config and backend.GRID_YZ_LIMIT == 65535
    assert backend.bounds_checked is simulator.bounds_checked
    with pytest.raises(AttributeError):
        backend.no_such_name  # noqa: B018
