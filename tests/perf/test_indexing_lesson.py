"""The indexing lesson (``deftnumba.perf.indexing_lesson``, notebook 01 section 8): both teaching
kernels are right, and the SASS says what the lesson claims.

The kernels run in the simulator against a float64 NumPy product, bounds-checked, on
irregular shapes (partial tiles, a partial last slice). The SASS figures are static and
deterministic: both kernels are compiled once for sm_90 in one ``DEFTNUMBA_BACKEND=cuda``
subprocess (a few seconds, no GPU), shared by the tests through ``lesson_figures``'s cache.
"""

import contextlib

import numpy as np
import pytest

from deftnumba.perf import indexing_lesson as lesson
from deftnumba.perf import sass
from deftnumba.runtime import backend


# --------------------------------------------------------------------------- the kernels run
@pytest.mark.parametrize("variant", lesson.VARIANTS)
@pytest.mark.parametrize("m, k, n", [(37, 19, 29), (5, 3, 7), (33, 8, 1)])
def test_kernel_matches_numpy(variant, m, k, n, rng):
    """Partial tiles in M and N (37 = 32 + 5), a partial last slice (19 = 8 + 8 + 3), a slice
    depth under the 4 steps per trip (3), a single column; NaN-poisoned output."""
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    # the simulator's sanitizer: index checks, NaN-filled shared and local memory
    checked = backend.bounds_checked() if backend.IS_SIMULATOR else contextlib.nullcontext()
    with checked:
        got = lesson.multiply(a, b, variant)
    assert got.shape == (m, n) and got.dtype == np.float32
    assert np.isfinite(got).all(), f"{variant}: {np.isnan(got).sum()} outputs never written"
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_multiply_rejects_bad_arguments():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="matching K"):
        lesson.multiply(a, np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match="variant"):
        lesson.multiply(a, np.ones((4, 2), np.float32), "middle")
    with pytest.raises(ValueError, match="at least 1"):
        lesson.multiply(np.ones((3, 0), np.float32), np.ones((0, 2), np.float32))


# --------------------------------------------------------------------------- the SASS says so
@pytest.fixture(scope="module")
def figures():
    """Both variants compiled for sm_90 (in a subprocess under the simulator); without a
    compiler here, the stored reading (whose own tests below say whether it is current)."""
    return lesson.lesson_figures()


def test_after_is_the_better_multiply_loop(figures):
    before, after = figures["variants"]["before"], figures["variants"]["after"]
    # the same arithmetic: 16 FFMA per rank-1 update in both loops
    assert before["loop_ffma"] % lesson.FMA_PER_STEP == 0 and after["loop_ffma"] % lesson.FMA_PER_STEP == 0
    assert after["loop_ffma_share"] > before["loop_ffma_share"] + 0.2
    assert after["loop_ffma_share"] >= 0.8  # the house's ~85% target, on a 4x4 block
    assert after["loop_per_step"] < 0.6 * before["loop_per_step"]
    # contiguous ownership + aligned flat shared arrays: only 128-bit shared loads, 2 per update
    assert set(after["loop_lds_widths"]) == {"128"}
    assert after["loop_lds_widths"]["128"] == 2 * after["loop_steps"]
    assert set(before["loop_lds_widths"]) == {"32"}  # strided ownership: scalar loads
    # 64-bit index arithmetic: none in the after loop, far less in the after kernel
    assert after["loop_int64"] == 0 < before["loop_int64"]
    assert after["kernel_int64"] * 3 < before["kernel_int64"]
    assert after["staging_per_element"] * 3 < before["staging_per_element"]
    assert after["registers"] < before["registers"]
    assert lesson.slice_model(after)["total"] * 2 < lesson.slice_model(before)["total"]
    for v in (before, after):
        assert v["f64"] == 0 and v["local"] == 0 and v["spill_bytes"] == 0 and v["div64_calls"] == 0
        assert 10 <= len(v["excerpt"]) <= 31 and any("FFMA" in line for line in v["excerpt"])
        assert sum(v["loop_mix"].values()) == v["loop_instructions"]
        assert sum(v["kernel_mix"].values()) == v["kernel_instructions"]


def test_comparison_rows_name_both_variants(figures):
    rows = lesson.comparison_rows(figures)
    assert len(rows) >= 10 and all(set(r) == {"figure (static SASS, sm_90)", "before", "after"} for r in rows)
    assert any("LDS" in str(r["after"]) or "128-bit" in str(r["after"]) for r in rows)


@pytest.mark.parametrize("opcode, wide", [
    ("IMAD.WIDE", True), ("IMAD.WIDE.U32", True), ("IADD3.X", True), ("LEA.HI.X.SX32", True),
    ("UIADD3.X", True), ("ISETP.GE.AND.EX", True), ("SHF.R.S64", True), ("SHF.L.U64.HI", True),
    ("IMAD.HI.U32", False), ("IADD3", False), ("LEA", False), ("ULDC.64", False), ("LDS.64", False),
    ("FFMA", False),
])
def test_64_bit_integer_instructions(opcode, wide):
    assert lesson.is_int64(sass.Instruction(0, opcode)) is wide


# --------------------------------------------------------------------------- the stored reading
REFRESH = "refresh it: DEFTNUMBA_BACKEND=cuda python -m deftnumba.perf.indexing_lesson --write (no GPU needed)"


def test_stored_reading_is_current(figures):
    stored = lesson.load_stored()
    assert stored is not None, f"{lesson.DATA} is missing; {REFRESH}"
    assert stored["source_hash"] == lesson.kernel_source_hash(), f"the kernels changed since it was read; {REFRESH}"
    if figures["source"] != "compiled":
        pytest.skip("nothing compiled here to compare the stored reading with")
    if stored["numba_cuda"] != figures["numba_cuda"]:
        pytest.skip(f"stored with numba-cuda {stored['numba_cuda']}, compiled with {figures['numba_cuda']}")
    # every figure but the excerpts (their text also depends on nvdisasm's version)
    for variant in lesson.VARIANTS:
        got = {k: v for k, v in figures["variants"][variant].items() if k != "excerpt"}
        kept = {k: v for k, v in stored["variants"][variant].items() if k != "excerpt"}
        assert kept == got, f"the stored reading of {variant!r} differs from today's SASS; {REFRESH}"


def test_without_a_compiler_the_stored_reading_is_used_and_said(monkeypatch):
    monkeypatch.setenv(sass.NVDISASM_ENV, "/nonexistent/nvdisasm")
    got = lesson.figures()
    assert got["source"] == "stored" and "stored reading" in got["note"] and "nvdisasm" in got["note"]
    assert set(got["variants"]) == set(lesson.VARIANTS)
    with pytest.raises(FileNotFoundError):
        lesson.figures(allow_stored=False)
