"""The benchmark harness: the simulator smoke run end to end, its CSV, its labels, and
the plotting/loading helpers on a synthetic CSV written in a tmp dir (never in data/)."""

import csv
import re

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import roofline
from deftnumba.bench import harness as bench
from deftnumba.__main__ import main as cli

pytestmark = pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the smoke mode is the simulator's")


def _listing(directory):
    return sorted(str(p) for p in directory.rglob("*")) if directory.exists() else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One full smoke run through the CLI: every method and pass, 3 reps each."""
    out = tmp_path_factory.mktemp("bench")
    before = _listing(bench.BENCH_DIR)
    code = cli(["bench", "--out", str(out), "--quiet"])
    after = _listing(bench.BENCH_DIR)
    (path,) = out.glob("*.csv")
    return code, path, before, after


def test_smoke_run_succeeds_and_writes_csv_and_chart(smoke):
    code, path, _, _ = smoke
    assert code == 0
    assert path.name.startswith("smoke_")
    assert path.with_name(path.stem + "_speedup.png").stat().st_size > 1000


def test_smoke_never_writes_into_data_bench(smoke):
    _, _, before, after = smoke
    assert before == after
    for out in (bench.BENCH_DIR, bench.BENCH_DIR / "sub"):
        with pytest.raises(ValueError, match="refusing"):
            bench.output_dir(bench.Config(out=out))
    assert bench.output_dir(bench.Config()) == bench.SMOKE_DIR


def test_smoke_csv_columns_and_provenance(smoke):
    _, path, _, _ = smoke
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == bench.COLUMNS
    rows = bench.load_results(path)
    for row in rows:
        assert row["mode"] == bench.SMOKE_LABEL
        assert row["device"] == "Numba CUDA simulator (CPU)"
        assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?|unknown)", row["commit"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["timestamp"])
        assert row["numba_cuda"] and row["numpy"] and row["torch"]
        assert row["status"] == "ok", row["status"]
        assert row["median_ms"] > 0 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["shape"] == "smoke" and row["batch"] == 1 and row["kernel_h"] == 3 and row["mask"]
    assert "simulator smoke (not GPU data)" in bench.describe(rows)


def test_smoke_covers_every_method_and_pass(smoke):
    rows = bench.load_results(smoke[1])
    by_pass = {}
    for r in rows:
        by_pass.setdefault(r["pass"], set()).add(r["method"])
    assert set(dn.METHODS) <= by_pass["fwd"] and set(dn.METHODS) <= by_pass["host"]
    assert "cudnn_conv" in by_pass["fwd"]  # torch is installed here (on the CPU in smoke mode)
    if hasattr(dn, "deform_conv2d_backward"):
        backward = set(getattr(dn, "BACKWARD_METHODS", dn.METHODS))
        assert backward <= by_pass["bwd"] and backward <= by_pass["fwdbwd"]


def test_smoke_rows_are_checked_and_roofed(smoke):
    rows = bench.load_results(smoke[1])
    g = bench.SMOKE_SUITES["smoke"]
    for r in rows:
        if r["pass"] == "fwd" and r["method"] in dn.METHODS:
            assert r["check_rel_err"] < 1e-5
        if r["pass"] == "host":
            assert r["tflops"] is None and r["floor_ms"] is None
            continue
        assert r["tflops"] == pytest.approx(roofline.conv_flops(g, r["pass"]) / (r["median_ms"] * 1e9))
        assert r["ideal_floor_ms"] == pytest.approx(roofline.floor_ms(g, "fused", r["pass"]))
        if roofline.has_model(r["method"], r["pass"]):
            assert r["pct_roofline"] == pytest.approx(100 * r["floor_ms"] / r["median_ms"])
        else:
            assert r["pct_roofline"] is None and r["pct_ideal"] > 0
        cudnn = next(c for c in rows if c["pass"] == r["pass"] and c["method"] == "cudnn_conv")
        assert r["speedup_vs_cudnn_conv"] == pytest.approx(cudnn["median_ms"] / r["median_ms"])


def test_parse_shape():
    name, g = bench.parse_shape("2,4,6,9,11")
    assert name == "2x4x6x9x11"
    assert (g.batch, g.in_channels, g.out_channels, g.height, g.width, g.kernel_h, g.pad_h) == (2, 4, 6, 9, 11, 3, 1)
    _, g5 = bench.parse_shape("1,2,3,8,8,5")
    assert (g5.kernel_w, g5.pad_w, g5.has_mask) == (5, 2, True)
    for bad in ("1,2,3", "1,2,3,4,x", "0,2,3,4,5"):
        with pytest.raises(ValueError, match="N,C,Cout,H,W"):
            bench.parse_shape(bad)


def test_suites_are_designs_shapes():
    s = bench.SUITES
    assert (s["deft64"].batch, s["deft64"].in_channels, s["deft64"].height) == (8, 64, 64)
    assert (s["res128"].batch, s["res128"].out_channels, s["res128"].width) == (16, 128, 128)
    assert (s["det-c4"].in_channels, s["det-c4"].height, s["det-c4"].width) == (256, 50, 68)
    assert (s["det-c5"].in_channels, s["det-c5"].height, s["det-c5"].width) == (512, 25, 34)
    assert all(g.out_h == g.height and g.has_mask and g.offset_groups == 1 for g in s.values())


# --------------------------------------------------------------------------- synthetic CSV
SYNTHETIC = {"torchvision": 4.0, "im2col": 5.0, "fused_columns": 3.0, "fused": 2.0, "cudnn_conv": 1.0}


def _synthetic_csv(directory):
    """A synthetic GPU-looking CSV (labelled synthetic in its device name), in a tmp dir."""
    rows = []
    for shape in ("deft64", "det-c5"):
        g = bench.SUITES[shape]
        for method, ms in SYNTHETIC.items():
            row = {c: "" for c in bench.COLUMNS}
            row.update(mode=bench.GPU_LABEL, device="SYNTHETIC test device", commit="0" * 40,
                       timestamp="2026-01-02T03:04:05Z", tf32_check="off (synthetic)", dtype="float32",
                       tf32=False, shape=shape, method=method, status="ok", median_ms=ms, p10_ms=0.9 * ms,
                       p90_ms=1.2 * ms, mask=True, bias=False, **{"pass": "fwd"},
                       **{k: getattr(g, k) for k in ("batch", "in_channels", "out_channels", "height", "width",
                                                     "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h",
                                                     "pad_w", "dil_h", "dil_w", "groups", "offset_groups")})
            rows.append(row)
    bench._add_speedups(rows)
    return bench.write_csv(rows, directory)


def test_load_describe_and_recorded_note(tmp_path):
    assert bench.latest_csv(tmp_path) is None
    assert bench.recorded_note(tmp_path).startswith("nothing recorded yet")
    path = _synthetic_csv(tmp_path)
    assert bench.latest_csv(tmp_path) == path
    rows = bench.load_results(path)
    assert rows[0]["median_ms"] == SYNTHETIC["torchvision"] and rows[0]["mask"] is True
    fused = next(r for r in rows if r["method"] == "fused")
    assert fused["speedup_vs_torchvision"] == pytest.approx(2.0)
    assert fused["speedup_vs_cudnn_conv"] == pytest.approx(0.5)
    note = bench.recorded_note(tmp_path)
    assert "recorded on SYNTHETIC test device, commit 000000000000" in note and path.name in note


def test_plot_speedups_on_synthetic_csv(tmp_path):
    rows = bench.load_results(_synthetic_csv(tmp_path))
    fig = bench.plot_speedups(rows, baseline="torchvision")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    expected = sorted([round(4.0 / ms, 6) for m, ms in SYNTHETIC.items() if m != "torchvision"] * 2)
    assert heights == expected
    assert [t.get_text() for t in ax.get_xticklabels()] == ["deft64", "det-c5"]
    assert "SYNTHETIC" in ax.get_title()
    fig.savefig(tmp_path / "speedup.png")
    # without torchvision rows the baseline falls back to im2col
    fallback = bench.plot_speedups([r for r in rows if r["method"] != "torchvision"])
    assert "im2col" in fallback.axes[0].get_ylabel()


def test_plot_roofline_measured_and_predicted(tmp_path):
    rows = bench.load_results(_synthetic_csv(tmp_path))
    fig = bench.plot_roofline(roofline.H200_LEADS, rows=rows)
    points = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert len(points) == len(rows)
    g = bench.SUITES["deft64"]
    tflops = roofline.conv_flops(g) / (SYNTHETIC["fused"] * 1e-3) / 1e12
    assert any(np.isclose(ln.get_ydata()[0], tflops) for ln in points)
    predicted = bench.plot_roofline(roofline.H200_LEADS)
    assert "predicted" in predicted.axes[0].get_title()
    predicted.savefig(tmp_path / "roofline.png")


def test_smoke_leaves_no_partial_csv(smoke):
    assert not list(smoke[1].parent.glob("*.partial.csv"))


def test_cases_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    rows = []
    config = bench.Config(out=tmp_path, max_minutes=0.0, passes=("fwd",), quiet=True)
    result = bench.run(config, on_row=rows.append)
    assert result and len(rows) == len(result)
    assert all(r["status"].startswith("skipped: past the --max-minutes") for r in result)
    assert all(r["median_ms"] == "" for r in result)


def test_simulator_table_leaves_out_throughput_and_says_why_a_baseline_is_missing():
    row = {"op": "dcn", "mode": bench.SMOKE_LABEL, "shape": "smoke", "pass": "fwd", "method": "fused",
           "status": "ok", "median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.2, "tflops": 0.0, "gbps": 0.0,
           "pct_roofline": 0.0, "pct_ideal": "", "speedup_vs_torchvision": "", "speedup_vs_cudnn_conv": 3.0}
    smoke = bench.format_table([row])
    for column in ("TFLOP/s", "GB/s", "%roof", "x cudnn_conv"):
        assert column not in smoke.splitlines()[0]
    assert "left out" in smoke
    gpu = bench.format_table([dict(row, mode="gpu")])
    assert "TFLOP/s" in gpu and "x cudnn_conv" in gpu
    assert "x torchvision" not in gpu.splitlines()[0]  # no timed row: a note instead of a column of '-'
    assert "x torchvision: not measured (" in gpu and bench.missing_baselines()["torchvision"] in gpu
