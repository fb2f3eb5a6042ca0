"""Notebook-only helpers: mode, provenance captions, plain messages, small plots."""

import re

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba import notebook


def test_mode_follows_the_backend():
    m = notebook.mode()
    assert m.live == (not backend.IS_SIMULATOR)
    assert m.backend == backend.NAME
    if backend.IS_SIMULATOR:
        assert m.name == "recorded" and "simulator" in m.banner()
    else:
        assert m.name == "live" and m.device in m.banner()


def test_recorded_caption_names_device_commit_and_date():
    rows = [{"device": "NVIDIA H200", "commit": "0123456789abcdef", "timestamp": "2026-11-22T01:02:03Z"},
            {"device": "NVIDIA H200", "commit": "0123456789abcdef", "timestamp": "2026-11-23T01:02:03Z"}]
    assert notebook.recorded_caption(rows) == (
        "recorded on NVIDIA H200, commit 0123456, 2026-11-22 to 2026-11-23")
    assert notebook.recorded_caption(rows[:1]).endswith("2026-11-22")
    with pytest.raises(ValueError, match="nothing was recorded"):
        notebook.recorded_caption([])


def test_captions_and_messages_are_plain():
    assert notebook.live_caption().startswith("measured live on")
    text = notebook.not_recorded("layer speedups")
    assert "Not recorded yet: layer speedups" in text and "data/bench/" in text
    assert "Missing: `x.y`" in notebook.missing_api("x.y", "someone")
    commit = notebook.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{4,40}", commit)


def test_recorded_files(tmp_path):
    assert notebook.recorded_files(directory=tmp_path / "nowhere") == []
    (tmp_path / "b.csv").write_text("x\n")
    (tmp_path / "a.csv").write_text("x\n")
    (tmp_path / "c.txt").write_text("x\n")
    assert [p.name for p in notebook.recorded_files(directory=tmp_path)] == ["a.csv", "b.csv"]


def test_markdown_table():
    text = notebook.markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": 1e-9}])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| 2 | 1e-09 |"]
    assert notebook.markdown_table([]) == "(no rows)"
    # a key only later rows have still gets its column (cells of rows without it stay empty)
    text = notebook.markdown_table([{"a": 1}, {"a": 2, "c": "x"}])
    assert text.splitlines() == ["| a | c |", "|---|---|", "| 1 |  |", "| 2 | x |"]


def test_show_prints_outside_jupyter(capsys):
    notebook.show("hello")
    assert "hello" in capsys.readouterr().out


def test_plots_draw(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field = np.random.default_rng(0).standard_normal((1, 18, 6, 7)).astype(np.float32)
    fig, (a, b) = plt.subplots(1, 2)
    notebook.plot_offset_histograms(a, {"noise": field})
    notebook.plot_offset_field(b, field, title="tap 4")
    notebook.stamp(a, "simulator", corner="upper left")
    notebook.caption(fig, "recorded on nowhere")
    fig.savefig(tmp_path / "x.png")
    plt.close(fig)
    assert a.get_xlabel().endswith("(input pixels)")


def test_check_methods_covers_every_method_and_passes():
    import deftnumba as dn

    rows = notebook.check_methods()
    fwd = [r["method"] for r in rows if r["pass"] == "fwd"]
    assert fwd == list(dn.METHODS)
    if hasattr(dn, "deform_conv2d_backward"):
        bwd = {r["method"] for r in rows if r["pass"].startswith("bwd")}
        assert bwd == set(dn.BACKWARD_METHODS)
    assert all(r["ok"] for r in rows), rows


def test_recorded_results_split_layer_and_training_csvs(tmp_path):
    from deftnumba.bench import harness as bench

    assert notebook.recorded_results(tmp_path) == {"layer": [], "layer_file": None, "train": [],
                                                   "train_file": None}
    layer = {c: "" for c in bench.COLUMNS}
    layer.update(mode="gpu", device="NVIDIA H200", commit="abc", timestamp="2026-01-01T00:00:00Z",
                 shape="deft64", method="im2col", status="ok", median_ms="1.5", p10_ms="1.4", p90_ms="1.6",
                 mask="True", bias="False", tf32="False", dtype="float32")
    layer["pass"] = "fwd"
    bench.write_csv([layer], tmp_path)
    (tmp_path / "smoke_x.csv").write_text("mode,pass\nsimulator smoke (not GPU data),fwd\n")
    (tmp_path / "20990101T000000Z_x.partial.csv").write_text(
        "mode,device,commit,timestamp,pass,method,status\ngpu,H200,abc,2099-01-01T00:00:00Z,fwd,fused,ok\n")
    (tmp_path / "train-2026.csv").write_text(
        "mode,device,commit,timestamp,pass,method,median_ms,p10_ms,p90_ms,normalized\n"
        "gpu,NVIDIA H200,abc,2026-01-02T00:00:00Z,train,conv,10,9,11,1.0\n")
    got = notebook.recorded_results(tmp_path)
    assert [r["method"] for r in got["layer"]] == ["im2col"] and got["layer"][0]["median_ms"] == 1.5
    assert got["train"][0]["normalized"] == 1.0 and got["train_file"].name == "train-2026.csv"


def test_recorded_charts_draw(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [{"method": m, "normalized": v, "median_ms": 10 * v, "p10_ms": 9 * v, "p90_ms": 11 * v,
              "shape": "resnet50"} for m, v in (("deftnumba", 1.4), ("conv", 1.0), ("torchvision", 2.0))]
    layer = [{"status": "ok", "pass": "fwd", "shape": s, "method": m, "pct_ideal": p, "tf32": False}
             for s in ("deft64", "res128") for m, p in (("im2col", 20.0), ("fused", 55.0))]
    fig, (a, b) = plt.subplots(1, 2)
    notebook.plot_training(a, train)
    notebook.plot_percent_of_roofline(b, layer)
    fig.savefig(tmp_path / "x.png")
    plt.close(fig)
    assert [t.get_text() for t in a.get_xticklabels()] == ["conv", "torchvision", "deftnumba"]
    assert [t.get_text() for t in b.get_xticklabels()] == ["deft64", "res128"]


def test_time_calls_reports_percentiles_and_unit():
    calls = []
    got = notebook.time_calls({"a": lambda: calls.append(1)}, repeats=5, warmup=2)
    assert len(calls) == 7
    r = got["a"]
    assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["unit"] == backend.Stopwatch().unit


def test_time_tiles_runs_the_planned_and_other_tiles():
    from deftnumba.dcn import offsets
    from deftnumba.dcn.planning import plan as tiling
    from deftnumba.dcn.geometry import Geometry

    g = Geometry(batch=1, in_channels=2, height=4, width=5, out_channels=2, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1)
    got = notebook.time_tiles(g, offsets.for_geometry(g, magnitude=1.0), tiling.SIMULATOR, repeats=1, warmup=0)
    names = list(got)
    assert names[0].startswith("planned: ") and names[-1] == "im2col (no tiles)"
    assert all(r["median_ms"] > 0 for r in got.values())


def test_commit_can_be_given_by_environment(monkeypatch):
    notebook.git_commit.cache_clear()
    monkeypatch.setenv("DEFTNUMBA_COMMIT", "0123456789abcdef")
    try:
        assert notebook.git_commit() == "0123456" and notebook.git_commit(short=False) == "0123456789abcdef"
        assert notebook.live_caption().endswith("commit 0123456")
    finally:
        notebook.git_commit.cache_clear()


def test_banner_says_recorded_data_only_when_something_is_recorded(tmp_path):
    m = notebook.Mode(live=False, backend="simulator", device="Numba CUDA simulator (CPU)")
    empty = m.banner(tmp_path)
    assert "recorded data" not in empty and "nothing recorded" in empty
    assert f"Backend: `simulator` ({backend.REASON})" in empty  # printed as output, not on stderr
    rows = [{"device": "NVIDIA H200", "commit": "0123456789abcdef", "timestamp": "2026-11-22T01:02:03Z"}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(notebook, "recorded_results",
                      lambda directory: {"layer": rows, "layer_file": tmp_path / "x.csv", "train": [],
                                         "train_file": None})
        assert "simulator + recorded data" in m.banner(tmp_path) and "x.csv" in m.banner(tmp_path)
