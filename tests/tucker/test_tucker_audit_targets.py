"""Issue 14's static targets for the Tucker kernels, read from the SASS audit
(``deftnumba.tucker.audit``: the ``fused`` and ``core_conv`` kernels at the tiles
``tucker.model`` picks for TDC's ResNet-18 layers at batch 32, compiled for sm_90 by
numba-cuda's real compiler in a compile job, tests/conftest.py; no GPU). Deterministic static
instruction counts through the issue-slot model, never a timer.

A met target is asserted as the issue states it. A missed one is pinned at today's figure
plus a little slack, and docs/perf-notes.md says by how much it is missed. Never loosen a
met target.
"""

import pytest

from deftnumba.tucker import audit

SHAPES = audit.TARGET_SHAPES
RATIO_TARGET = 1.5
FFMA_TARGET = 85.0
# Missed today (see docs/tucker-notes.md, "The SASS audit of the picks"): pinned at today's figure + ~3%.
# (Session 22 raised most pins: the staging had been charged once per chunk where the compiler
# kept a loop of a few channels a pass, so the earlier figures were too low; the kernels did
# not get slower. docs/tucker-notes.md, "Staging counted per store". Session 25 lowered them:
# the packed slices copied in 16-byte vectors, unsigned epilogue indices, new fused picks at l2a
# and layer4; l1b's three_pass now meets the target, by 0.2%. Session 26 lowered layer4's fused
# pins: a block with more threads than staged positions splits each channel chunk over lanes, and
# the multiply loop takes two staged ranks per trip; that trip took the fused multiply loop at
# l1a and l1b from 84.8% and 84.6% to 86%, meeting the 85% target there. Session 28 lowered the
# three_pass pins of layers 2-4: the core conv splits its input ranks over 2-8 blocks per tile
# there, and its multiply loop now meets the 85% target on every layer. It also found that the
# audit divided a staging loop that stores a value on one path and a zero on another by both
# paths' stores, charging the copy about half its cost; counted per executed store, l1b's
# three_pass, "met" by 0.2% before, misses by 1.3% (pinned), and l2b's now meets it, by 0.1%.
# Session 29 lowered the pins again: both kernels stage their input through one 64-bit handle
# per position, the channel step a uniform offset, not a 64-bit index per element; and the
# audit gives a phase's few stray instructions in an outer loop to that loop's phase
# (perf/sass.reassign_strays), which had charged six of them per staged element. l1b's
# three_pass meets the target, by 0.6%. The core conv compiles out its per-pixel width tests
# where the tile divides the width; and a rank loop that ptxas keeps in the split epilogue
# (layers 3-4), charged zero times before, is now counted: layers 3-4's three_pass pins rose.
# Session 30: NVVM is not deterministic. From the same IR it compiles l3a's fused kernel two
# ways, 63.95 us (about 5 compiles in 6) and 65.36 us (python -m deftnumba.tucker.audit
# --variants 40); CI drew the slower one and failed the 2.61 pin. That pin now covers both
# (2.640 + 0.8%); every other pick gave one PTX in 40 compiles. l2a's three_pass meets the
# target (1.499): the offsets of the staged positions and the tile count in 32 bits.)
# Session 32: the fused kernel's hidden row segments start 16-byte aligned (fused.hidden_rows);
# layer1's fused picks meet the target (l1a 1.454, l1b 1.485). In 6 NVVM compiles of each, l1b
# gave one PTX and l1a one 0.2% faster compile besides (before store_hidden's last rewrite).
# Session 34: the core outputs each thread's last 1x1 reads sit in 16-byte slots
# (fused.core_out_pitch), and new picks at l2a and l3b (model.AUDITED_PICKS): layer2-3 pins lowered.
# In 8 NVVM compiles of each pick, l3a gave two PTXs (61.64 and 62.82 us: the pin covers both,
# 2.537 + 0.8%), l2a and l3b two within 0.05%, l2b one. Layer4's new picks (4 pixels a thread)
# take its multiply loop to 89.4% FFMA: the 85% target is met on every layer, FFMA_MISSED is empty.
# l4b's pick compiled to 90.96 us in 7 of 8 compiles and to 93.24 us (4.359x) in one: its pin,
# 4.34 for the old pick, covers both.
# Session 35: blocks of 128 threads at layers 3-4 (6 and 5 ranks a thread, their core weights in
# 16-byte slots: fused.weight_pitch); l3a 2.49 -> 1.82, l3b 2.46 -> 1.81, l4a 4.45 -> 3.46, l4b
# 4.25 -> 3.25. 8 NVVM compiles of each new pick gave one PTX; pins at the figure + ~1%. l2b's new
# pick (8x14 tiles, 256 blocks of 128 threads): 1.744 -> 1.713 in 7 of 8 compiles, 1.729 in one.
# Session 37: `winograd`'s picks at layers 3-4 chosen by the larger of the issue-slot estimate and
# the one with stalls; their issue-slot ratios rose (l3a 1.26 -> 1.29, l3b 1.18 -> 1.20, l4a
# 1.40 -> 1.485, l4b 1.35 -> 1.39), all under the target; 6 NVVM compiles of each gave one PTX.
FUSED_RATIO = {"r18-l2a-n32": 1.69, "r18-l2b-n32": 1.745,
               "r18-l3a-n32": 1.84, "r18-l3b-n32": 1.83, "r18-l4a-n32": 3.50, "r18-l4b-n32": 3.29}
THREE_PASS_RATIO = {"r18-l3a-n32": 1.80, "r18-l3b-n32": 1.74, "r18-l4a-n32": 1.97, "r18-l4b-n32": 1.91}
FFMA_MISSED: dict = {}
# Session 31: `winograd`, three_pass with the core conv by Winograd's F(2x2, 3x3) (2.25x fewer
# multiplies than the direct FLOPs the floor counts; 3x3, stride 1, dilation 1), audited at
# its picks (model.AUDITED_PICKS) on every layer. Missed where WINOGRAD_RATIO pins it.
WINOGRAD_RATIO: dict = {}


@pytest.fixture(scope="module")
def figures(job_tucker_targets):
    return job_tucker_targets.figures()


def test_every_target_shape_is_audited(figures):
    assert set(figures["suites"]) == set(SHAPES)
    assert "predict" in figures["label"] and "measured" in figures["label"]


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_discipline(figures, shape):
    r = figures["suites"][shape]
    for k in (r["fused"], r["three_pass"]["core_conv"], r["winograd"]["core_conv"]):
        assert k["f64"] == 0
        if k["spill_bytes"] is not None:
            assert k["spill_bytes"] == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_core_loops_ffma_share(figures, shape):
    """The core-conv multiply loop of both kernels at >= 85% FFMA (issue 14)."""
    r = figures["suites"][shape]
    for kernel, k in (("fused", r["fused"]), ("core_conv", r["three_pass"]["core_conv"]),
                      ("winograd", r["winograd"]["core_conv"])):
        assert k["ffma_percent"]["multiply"] >= FFMA_MISSED.get((shape, kernel), FFMA_TARGET), kernel


@pytest.mark.parametrize("shape", SHAPES)
def test_predicted_time_against_the_floor(figures, shape):
    """Predicted issue-bound time over the layer's fp32 roofline floor: <= 1.5x (issue 14); for
    ``winograd`` the floor's FLOPs are the direct convolution's (its core multiplies 2.25x fewer)."""
    r = figures["suites"][shape]
    assert r["fused"]["ratio"] <= FUSED_RATIO.get(shape, RATIO_TARGET)
    assert r["three_pass"]["ratio"] <= THREE_PASS_RATIO.get(shape, RATIO_TARGET)
    assert r["winograd"]["ratio"] <= WINOGRAD_RATIO.get(shape, RATIO_TARGET)
    assert r["winograd"]["core_conv"]["kernel"] == "winograd"


def test_phases_add_up_to_the_prediction(figures):
    for r in figures["suites"].values():
        for k in (r["fused"], r["three_pass"]["core_conv"], r["winograd"]["core_conv"]):
            assert sum(p["predicted_us"] for p in k["phases"].values()) == pytest.approx(k["predicted_us"], rel=1e-3)
        assert r["floor_us"] > 0
        assert r["fused"]["ratio"] == pytest.approx(r["fused"]["predicted_us"] / r["floor_us"])


def test_no_audited_kernel_beats_the_fused_bound(figures):
    """``model.fused_bound`` grants a fused kernel nothing but useful FFMAs at the SMs' full issue
    rate: an audited fused kernel under it would mean the audit or the bound undercounts."""
    from deftnumba.tucker import bench_op, model

    for shape, r in figures["suites"].items():
        b = model.fused_bound(bench_op.geometry(bench_op.suites()[shape]))
        assert b.floor_us == pytest.approx(r["floor_us"], rel=1e-9)
        assert r["fused"]["predicted_us"] >= b.us, shape


def test_stalls_only_add_time(figures):
    """The estimate with one warp's stalls (``perf.sass.stall_charges``) is never below the
    issue-slot one; it equals it where enough warps share an SM to cover the waits, and it is
    larger where one block of 4 warps holds an SM (the fused picks at layers 3-4)."""
    for shape, r in figures["suites"].items():
        for k in (r["fused"], r["three_pass"]["core_conv"], r["winograd"]["core_conv"]):
            assert k["latency_us"] >= k["predicted_us"] * (1 - 1e-9), shape
            assert set(k["one_warp_clocks"]) == set(k["phases"])
        assert r["three_pass"]["latency_us"] == pytest.approx(
            r["three_pass"]["core_conv"]["latency_us"] + r["three_pass"]["gemms_us_assumed"])
    lone = figures["suites"]["r18-l3a-n32"]["fused"]
    assert lone["blocks"] <= 132 and lone["threads"] == 128  # one block of 4 warps a busy SM
    assert lone["latency_us"] > 1.5 * lone["predicted_us"]


@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_meets_the_target_with_stalls_too(figures, shape):
    """Session 37 picked `winograd`'s tiles at layers 3-4 by the larger of the two estimates
    (model.AUDITED_PICKS): with one warp's stalls counted as well, the method `auto` runs is
    within 1.5x the floor on every layer (before: 2.0-2.4x at layers 3-4). A prediction on
    assumed load latencies, not the issue's target itself, which is the issue-slot figure."""
    r = figures["suites"][shape]
    assert r["winograd"]["latency_us"] <= RATIO_TARGET * r["floor_us"]


FUSED_WINOGRAD_SHAPES = ("r18-l1a-n32", "r18-l1b-n32", "r18-l2a-n32", "r18-l2b-n32")


@pytest.mark.parametrize("shape", FUSED_WINOGRAD_SHAPES)
def test_fused_winograd_meets_the_targets_at_layers_1_and_2(figures, shape):
    """``fused_winograd``, the one-launch layer with an F(2x2, 3x3) core, at its audited picks
    (``model.AUDITED_PICKS``; l2a since session 39, layer1 and l2b since session 40): its
    multiply loop at >= 85% FFMA and the layer within 1.5x the floor (the same direct-FLOP floor
    as ``fused``), where ``fused`` is at 1.45x on layer1 and misses on layer2 (1.67x and 1.71x);
    also with one warp's stalls. No pick at layers 3-4 yet."""
    picked = {name for name, r in figures["suites"].items() if "fused_winograd" in r}
    assert picked == set(FUSED_WINOGRAD_SHAPES)
    r = figures["suites"][shape]
    fw = r["fused_winograd"]
    assert fw["kernel"] == "fused_winograd" and fw["f64"] == 0 and fw["spill_bytes"] in (0, None)
    assert fw["ffma_percent"]["multiply"] >= FFMA_TARGET
    assert fw["ratio"] <= RATIO_TARGET and fw["latency_us"] / r["floor_us"] <= RATIO_TARGET
    assert fw["predicted_us"] < r["fused"]["predicted_us"]
    assert sum(p["predicted_us"] for p in fw["phases"].values()) == pytest.approx(fw["predicted_us"], rel=1e-3)
