"""One provenance source: commit, bench folder, CSV names."""

from pathlib import Path

import pytest

from deftnumba import notebook
from deftnumba.bench import harness
from deftnumba.dcn import training
from deftnumba.perf import device, provenance


def test_bench_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DEFTNUMBA_BENCH_DIR", raising=False)
    assert provenance.bench_dir() == provenance.REPO / "data" / "bench"
    assert provenance.bench_dir("dcn") == provenance.REPO / "data" / "bench" / "dcn"
    monkeypatch.setenv("DEFTNUMBA_BENCH_DIR", str(tmp_path))
    assert provenance.bench_dir("tucker") == tmp_path / "tucker"


def test_every_reader_uses_the_one_bench_dir():
    assert harness.BENCH_DIR == training.BENCH_DIR == notebook.BENCH_DIR == provenance.bench_dir()


def test_smoke_output_is_refused_under_the_bench_dir(tmp_path):
    for inside in (tmp_path, tmp_path / "dcn" / "x"):
        with pytest.raises(ValueError, match="refusing"):
            provenance.refuse_smoke_output(inside, tmp_path)
    provenance.refuse_smoke_output(tmp_path.parent / "elsewhere", tmp_path)


def test_git_commit_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEFTNUMBA_COMMIT", "0123456789abcdef")
    assert provenance.git_commit() == "0123456789abcdef"
    assert provenance.git_commit(short=True) == "0123456"
    assert provenance.git_commit("feedbeef00") == "feedbeef00"
    monkeypatch.delenv("DEFTNUMBA_COMMIT")
    commit = provenance.git_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40


def test_csv_name_carries_time_device_and_commit():
    row = {"timestamp": "2026-01-02T03:04:05Z", "device": "NVIDIA H200", "mode": provenance.GPU_LABEL,
           "commit": "0123456789abcdef0123"}
    assert provenance.csv_name(row) == "20260102T030405Z_nvidia-h200_0123456789ab.csv"
    assert provenance.csv_name(dict(row, mode=provenance.SMOKE_LABEL)).startswith("smoke_")


def test_one_device_model_feeds_the_roofs_and_the_planner():
    from deftnumba.dcn import roofline
    from deftnumba.dcn.planning import plan

    assert plan.H200 is device.H200 and roofline.H200_LEADS is device.H200_LEADS
    assert device.H200_LEADS.flops_per_s == device.H200.fp32_flops
    assert device.H200_LEADS.bytes_per_s == device.H200.dram_bandwidth
    assert device.H200_LEADS.rate("float64") == device.H200.fp64_flops
    assert isinstance(provenance.REPO, Path) and (provenance.REPO / "deftnumba").is_dir()
