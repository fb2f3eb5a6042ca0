"""The op protocol: an op the harness has never seen runs by registering one module-like object."""

import importlib.util
import types

import pytest

from deftnumba.bench import harness as bench
from deftnumba.bench import ops
from deftnumba.perf.roofline import Operator
from deftnumba.runtime import backend


def _toy_op(calls):
    """A minimal op: two methods (one a baseline), one smoke shape, fwd only for 'slow'."""
    def runner(method, pass_, inputs):
        if method == "slow" and pass_ != "fwd":
            return None
        return lambda: calls.append((method, pass_, inputs["n"]))

    return types.SimpleNamespace(
        name="toy",
        methods=lambda: {"fast": "ours", "slow": "the baseline"},
        suites=lambda: {"big": {"n": 1000, "wide": True}},
        smoke_suites=lambda: {"tiny": {"n": 3, "wide": False}},
        make_inputs=lambda shape, dtype, seed: {"n": shape["n"], "dtype": dtype},
        runner=runner,
        operators=lambda shape, method, pass_: [Operator("all", 2.0 * shape["n"], 8.0 * shape["n"], 4.0 * shape["n"])]
        if method == "fast" else [],
        baselines=lambda: ("slow",),
        passes=lambda method: ("fwd", "bwd", "host") if method == "fast" else ("fwd",),
    )


@pytest.fixture
def toy(monkeypatch):
    calls = []
    monkeypatch.setitem(ops.OPS, "toy", _toy_op(calls))
    return calls


def test_dcn_is_registered_and_missing_ops_are_skipped():
    assert "dcn" in ops.OPS and ops.get_op("dcn").name == "dcn"
    for module in ops.OP_MODULES:
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its system's package does not exist here
            present = False
        assert (module.split(".")[1] in ops.OPS) == present, module
    with pytest.raises(ValueError, match="unknown op"):
        ops.get_op("no-such-op")


def test_columns_follow_the_op(toy):
    columns = bench.columns(ops.get_op("toy"))
    assert columns[columns.index("op") + 1:columns.index("shape")] == ("dtype", "tf32", "tf32_check")
    assert columns[columns.index("shape") + 1:columns.index("pass")] == ("n", "wide")
    assert columns[-1] == "speedup_vs_slow"
    assert bench.COLUMNS == bench.columns(ops.get_op("dcn"))
    assert "op" in bench.COLUMNS and bench.COLUMNS.index("op") < bench.COLUMNS.index("shape")


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the smoke suite is the simulator's")
def test_a_new_op_runs_through_the_harness(toy, tmp_path):
    rows = bench.run(bench.Config(op="toy", out=tmp_path, quiet=True))
    assert {r["op"] for r in rows} == {"toy"} and {r["shape"] for r in rows} == {"tiny"}
    assert [(r["pass"], r["method"]) for r in rows] == [("fwd", "fast"), ("fwd", "slow"), ("bwd", "fast"),
                                                         ("host", "fast")]
    assert all(r["status"] == "ok" and r["n"] == 3 and r["wide"] is False for r in rows), rows
    fast = rows[0]
    assert fast["floor_ms"] > 0 and fast["pct_roofline"] == pytest.approx(100 * fast["floor_ms"] / fast["median_ms"])
    assert fast["tflops"] == pytest.approx(6.0 / (fast["median_ms"] * 1e-3) / 1e12)  # its counted FLOPs
    assert fast["speedup_vs_slow"] == pytest.approx(rows[1]["median_ms"] / fast["median_ms"])
    assert rows[1]["floor_ms"] == "" and rows[1]["speedup_vs_slow"] == pytest.approx(1.0)
    assert ("fast", "bwd", 3) in toy and not any(m == "slow" and p != "fwd" for m, p, _ in toy)
    path = bench.write_csv(rows, tmp_path)
    loaded = bench.load_results(path)
    assert [r["method"] for r in loaded] == [r["method"] for r in rows] and loaded[0]["n"] == 3.0


def test_results_land_under_the_op_folder(toy, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.Config, "smoke", property(lambda self: False))
    assert bench.output_dir(bench.Config(op="toy")) == bench.BENCH_DIR / "toy"
    assert bench.output_dir(bench.Config()) == bench.BENCH_DIR / "dcn"
    assert bench.output_dir(bench.Config(op="toy", out=tmp_path)) == tmp_path
