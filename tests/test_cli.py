"""The command line a new user runs first: ``info`` and ``demo``."""

import os
import subprocess
import sys


def _cli(*args):
    env = dict(os.environ, DEFTNUMBA_QUIET="1")
    return subprocess.run([sys.executable, "-m", "deftnumba", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_info_names_backend_and_versions():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("backend", "device", "numba_cuda", "compute_capability"):
        assert key in proc.stdout


def test_demo_checks_against_reference_and_times_each_operator():
    proc = _cli("demo", "--method", "im2col")
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
    for operator in ("offset sampling", "bilinear columns", "gemm"):
        assert operator in proc.stdout
    if "simulator" in proc.stdout:
        assert "not GPU performance" in proc.stdout


def test_demo_runs_every_method_by_default():
    import deftnumba as dn

    proc = _cli("demo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PASS") == len(dn.METHODS)
    for method in dn.METHODS:
        assert f"method={method}" in proc.stdout


def test_demo_parts_never_exceed_the_whole_call_and_the_run_count_is_shown():
    from deftnumba.dcn import demo

    result = demo.run(method="im2col", repeats=3)
    assert result["repeats"] == 3
    assert sum(result["operator_ms"].values()) <= result["call_ms"]
    text = demo.format_result(result)
    assert "median of 3 calls" in text and "whole call" in text
