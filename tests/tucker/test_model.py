"""Roofline counts, performance model and tuner, bench op, rank choice (no kernels run)."""

import json
import math

import numpy as np
import pytest

from deftnumba.tucker import bench_op, model, ranks, roofline
from deftnumba.tucker.geometry import TuckerGeometry
from deftnumba.tucker.kernels import core_conv, fused, fused_winograd, winograd

L1 = TuckerGeometry(32, 64, 56, 56, 64, 64, 32, 3, 3, 1, 1, 1, 1, has_bias=True)


def test_roofline_counts():
    g = L1
    dense = roofline.totals(g, "cudnn_conv")
    assert dense.gemm_flops == 2 * 32 * 64 * 64 * 9 * 56 * 56
    three = roofline.operators(g, "three_pass")
    assert [o.name for o in three] == ["first 1x1", "core conv", "last 1x1"]
    assert three[1].gemm_flops == 2 * 32 * 32 * 64 * 9 * 56 * 56
    f = roofline.totals(g, "fused")
    assert f.flops == pytest.approx(sum(o.flops for o in three))
    # fused moves only input + factors + output; three passes add the two intermediates twice
    hidden = 4 * 32 * (64 * 56 * 56 + 32 * 56 * 56)
    assert roofline.totals(g, "three_pass").bytes == pytest.approx(f.bytes + 2 * hidden)
    assert f.bytes == pytest.approx(4 * (32 * 64 * 56 * 56 * 2 + 64 * 64 + 32 * 64 * 9 + 64 * 32 + 64))
    for m in roofline.MODELS:
        fb = roofline.totals(g, m, "fwdbwd")
        assert fb.flops == pytest.approx(roofline.totals(g, m, "fwd").flops + roofline.totals(g, m, "bwd").flops)
    with pytest.raises(ValueError, match="method"):
        roofline.operators(g, "nope")


def test_phase_models_cover_the_marked_phases():
    """Every ``# phase: NAME`` in a kernel body has an entry in its phase_model, and back."""
    import inspect
    import re

    for mod, cfg in ((core_conv, core_conv.GPU_TILE), (fused, fused.GPU_CANDIDATES[0]),
                     (winograd, winograd.GPU_TILE), (fused_winograd, fused_winograd.GPU_CANDIDATES[0])):
        marked = set(re.findall(r"# phase: (\w+)", inspect.getsource(mod).split("def phase_model")[0]))
        marked -= {"NAME"}
        body_marked = set(re.findall(r"^\s+# phase: (\w+)$", inspect.getsource(mod), re.M))
        assert set(mod.phase_model(L1, cfg)) == body_marked, mod.__name__
        assert all(v >= 0 for v in mod.phase_model(L1, cfg).values())


def test_sass_iterations_cover_the_phases():
    """The SASS audit's iteration counts name every marked phase (and the prologue), each as
    (passes through the innermost loop, runs of the rest), and the normalised steps name
    looped phases only."""
    for mod, cfg in ((core_conv, core_conv.GPU_TILE), (fused, fused.GPU_CANDIDATES[0]),
                     (winograd, winograd.GPU_TILE), (fused_winograd, fused_winograd.GPU_CANDIDATES[0])):
        its = mod.sass_iterations(L1, cfg)
        assert set(its) == set(mod.phase_model(L1, cfg)) | {"prologue"}, mod.__name__
        assert all(len(v) == 2 and v[0] >= 0 and v[1] >= 1 for v in its.values())
        assert set(mod.phase_steps(L1, cfg)) <= set(its)
    # input staging counts stored elements (CX x POS_T per (rank chunk, channel chunk)), its
    # other code runs once per such step; the audit divides its SASS loop by its stores
    t = fused.GPU_CANDIDATES[0]
    lay = t.layout(L1)
    steps = -(-L1.rank_in // t.rank_chunk) * -(-L1.in_channels // t.in_chunk)
    assert fused.sass_iterations(L1, t)["stage_input"] == (
        steps * t.in_chunk * -(-lay.region_padded // lay.threads), steps)
    c = core_conv.GPU_TILE
    rows, cols = c.staged_shape(L1)
    chunks = -(-L1.rank_in // c.chunk)
    assert core_conv.sass_iterations(L1, c)["stage_input"] == (chunks * c.chunk * -(-rows * cols // c.threads), chunks)
    for mod, cfg in ((core_conv, c), (fused, t)):
        assert mod.phase_steps(L1, cfg)["stage_input"] == ("sts", 1)


def test_audited_picks_come_first():
    for key, picks in model.AUDITED_PICKS.items():
        g = next(bench_op.geometry(s) for s in bench_op.suites().values()
                 if model.pick_key(bench_op.geometry(s)) == key)
        for method, tile in picks.items():
            assert model.rank_configs(g, method, top=1)[0].config == tile
            assert tile in model.candidates(g, method)
    assert model.AUDITED_PICKS, "the suite layers' audited tiles (python -m deftnumba.tucker.audit --search 8)"


def test_bench_predictions_prefer_the_recorded_audit():
    import json

    suites = bench_op.suites()
    recorded = json.loads(bench_op.AUDIT_PATH.read_text())
    assert "predict" in recorded["label"] and "measured" in recorded["label"]
    for name, r in recorded["suites"].items():
        preds = bench_op.predictions(suites[name])
        assert preds["fused"] == pytest.approx(r["fused"]["predicted_us"] / 1e3)
        assert preds["three_pass"] == pytest.approx(r["three_pass"]["predicted_us"] / 1e3)
        assert preds["winograd"] == pytest.approx(r["winograd"]["predicted_us"] / 1e3)
        assert preds["cudnn_conv"] == pytest.approx(model.predict(bench_op.geometry(suites[name]), "cudnn_conv").ms)
    assert bench_op.predictions(suites["r18-l1a-n32"], "float64")["fused"] == pytest.approx(
        model.predict(bench_op.geometry(suites["r18-l1a-n32"], "float64"), "fused").ms)


def test_predictions_are_labelled_and_ranked():
    ranked = model.rank_configs(L1, "fused", top=5, coarse=True)
    assert ranked and all(a.ms <= b.ms for a, b in zip(ranked, ranked[1:]))
    p = ranked[0]
    assert "prediction" in p.label and math.isfinite(p.ms) and p.ms > 0
    assert 0 < p.ffma_fraction < 1 and p.blocks_per_sm >= 1 and p.waves >= 1
    assert fused.fits(p.config, L1)
    assert "prediction" in model.predict(L1, "cudnn_conv").label
    # the issue-bound time can never beat the FFMA-only time at full issue rate
    ffma_ms = 1e3 * roofline.totals(L1, "fused").gemm_flops / model.H200.fp32_flops
    assert p.ms >= ffma_ms * 0.99


def test_fused_winograd_formulas_match_the_recorded_audit():
    """The fused Winograd kernel's per-iteration formulas (``model._fused_winograd_instructions``,
    calibrated at its l2a and l2b picks; layer1's, picked later, held out) against the SASS audit
    recorded for them (``data/tucker/static_audit.json``): per-thread instructions outside the
    prologue within 5% (barriers apart: the formulas charge each ``BARRIER_SLOTS``, the audit one
    instruction). Session 40: within 1% at all four."""
    recorded = json.loads(bench_op.AUDIT_PATH.read_text())["suites"]
    for name in ("r18-l1a-n32", "r18-l1b-n32", "r18-l2a-n32", "r18-l2b-n32"):
        g = bench_op.geometry(bench_op.suites()[name])
        t = model.AUDITED_PICKS[model.pick_key(g)]["fused_winograd"]
        iters, per = fused_winograd.phase_model(g, t), model._fused_winograd_instructions(g, t)
        formula = sum(iters[p] * per[p] for p in iters)
        r = recorded[name]["fused_winograd"]
        audited = r["instructions_per_thread"] - r["phases"]["prologue"]["per_thread"]
        assert formula == pytest.approx(audited, rel=0.05), name
        p = model.predict(g, "fused_winograd", t)
        assert p.method == "fused_winograd" and p.launches == 1 and "prediction" in p.label
        assert p.instructions_per_thread == formula + model.BARRIER_SLOTS * model._barriers("fused_winograd", g, t)
    # the Winograd methods take only 3x3 cores at stride 1 and dilation 1
    strided = TuckerGeometry(2, 8, 9, 9, 8, 4, 4, 3, 3, 2, 2, 1, 1)
    assert model.candidates(strided, "fused_winograd") == []
    with pytest.raises(ValueError, match="fused_winograd takes 3x3"):
        model.predict(strided, "fused_winograd", fused_winograd.GPU_CANDIDATES[0])


def test_instruction_model_matches_recorded_sass():
    """The multiply step formula against sm_90 SASS recorded for two core-conv tiles
    (loop bodies of 3 unrolled kernel rows: 325 and 172 instructions)."""
    g = TuckerGeometry(1, 64, 56, 56, 64, 64, 32, 3, 3, 1, 1, 1, 1)
    for tile, sass_three_rows in ((core_conv.GPU_TILE, 325), (core_conv.CoreTile(4, 8, 4, 32, 4, 4), 172)):
        step = model.instructions("core_conv", g, tile)["multiply"]
        assert abs(3 * step - sass_three_rows) <= 0.05 * sass_three_rows


def test_bench_op_protocol():
    assert bench_op.name == "tucker"
    assert {"fused", "three_pass", "winograd", "cudnn_conv", "cudnn_tucker"} <= set(bench_op.methods())
    suites = bench_op.suites()
    assert "r18-l1a-n1" in suites and "r18-l4b-n32" in suites
    assert suites["core-64-32-56-n1"]["core_only"] and suites["core-192-160-7-n1"]["rank_in"] == 192
    for shape in (suites["r18-l1a-n32"], suites["core-64-32-56-n1"]):
        ops = bench_op.operators(shape, "cudnn_conv", "fwd")
        assert ops and ops[0].flops > 0
    preds = bench_op.predictions(suites["r18-l2a-n32"])
    assert set(preds) == {"fused", "three_pass", "winograd", "fused_winograd", "cudnn_conv", "cudnn_tucker"}
    recorded = json.loads(bench_op.AUDIT_PATH.read_text())["suites"]["r18-l2a-n32"]["fused_winograd"]
    assert preds["fused_winograd"] == recorded["predicted_us"] / 1e3  # the recorded audit first
    g3 = bench_op.geometry(suites["r18-l3a-n32"])  # no audited pick there: the formulas' best
    assert bench_op.predictions(suites["r18-l3a-n32"])["fused_winograd"] == model.predict(g3, "fused_winograd").ms
    # layer4's 160 core ranks: no tile of the one-launch Winograd design fits 48 KB
    assert "fused_winograd" not in bench_op.predictions(suites["r18-l4a-n32"])


def test_bench_op_runs_tiny_shape_in_simulator():
    shape = dict(batch=1, in_channels=3, out_channels=4, height=4, width=5, kernel=3, stride=1, padding=1,
                 rank_out=2, rank_in=2, core_only=False)
    inputs = bench_op.make_inputs(shape, "float32", seed=1)
    run = bench_op.runner("fused", "fwd", inputs)
    out = run()
    from deftnumba.tucker.reference import tucker_conv2d_reference
    h = inputs["host"]
    ref = tucker_conv2d_reference(h["input"], h["first"], h["core"], h["last"], h["bias"], padding=1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert bench_op.runner("fused", "bwd", inputs) is None
    assert bench_op.runner("core_conv", "fwd", inputs) is None


def test_hosvd_errors_match_decompose(rng):
    from deftnumba.tucker import decompose

    w = rng.standard_normal((7, 5, 3, 2))
    table = ranks.hosvd_errors(w)
    for r in ((1, 1), (3, 2), (7, 5), (4, 5)):
        assert table[r[0] - 1, r[1] - 1] == pytest.approx(decompose(w, r).rel_error, abs=1e-7)


def test_choose_ranks_meets_budget_and_differs_by_objective(rng):
    layers = [ranks.Layer("a", 64, 64, 28, 28, batch=32, weight=rng.standard_normal((64, 64, 3, 3))),
              ranks.Layer("b", 128, 128, 7, 7, batch=32, weight=rng.standard_normal((128, 128, 3, 3)))]
    fr = (0.25, 0.5, 1.0)
    table = {l.name: ranks.candidates(l, fractions=fr) for l in layers}
    lat = ranks.choose_ranks(layers, speedup=1.5, by="latency", _candidates=table)
    dense_ms = sum(c.dense_ms for c in lat)
    assert sum(c.predicted_ms for c in lat) <= dense_ms / 1.5 * (1 + 1e-9)
    flops = ranks.choose_ranks(layers, speedup=1.5, by="flops", _candidates=table)
    assert sum(c.flops for c in flops) <= sum(c.dense_flops for c in flops) / 1.5 * (1 + 1e-9)
    assert all("prediction" in c.label for c in lat)
    with pytest.raises(ValueError, match="exactly one"):
        ranks.choose_ranks(layers, by="latency", _candidates=table)


def _layer(batch, channels, size, ranks, kernel, pad):
    return TuckerGeometry(batch=batch, in_channels=channels, height=size, width=size, out_channels=channels,
                          rank_in=ranks, rank_out=ranks, kernel_h=kernel, kernel_w=kernel, pad_h=pad, pad_w=pad)


def test_fused_bound_is_the_floor_where_fusion_costs_nothing():
    """One block per image, one image per SM and no halo (a 1x1 core, or a 3x3 core whose tile
    is the whole image): the bound is the compute floor itself."""
    for kernel, pad, size in ((1, 0, 2), (3, 1, 3)):
        g = _layer(132, 512, size, 256, kernel, pad)
        b = model.fused_bound(g)
        assert roofline.totals(g, "fused").flops / model.H200.fp32_flops > \
            roofline.totals(g, "fused").bytes / model.H200.dram_bandwidth  # compute-bound
        assert b.recompute == pytest.approx(1.0)
        if kernel == 3:  # (a 1x1 core: any tile shape ties)
            assert b.tile == (size, size) and b.blocks == 132
        assert b.ratio == pytest.approx(1.0, rel=1e-9)


def test_fused_bound_counts_halo_and_quantisation_by_hand():
    """A 4x4 image, 3x3 core, pad 1, batch 33: whole-image tiles give 33 blocks (one an SM,
    no halo: the floor's FLOPs on a quarter of the SMs, 4x the floor); 2x2 tiles give 132 blocks
    of 3x3 in-image halos (9/4 of the first 1x1 each); 1x1 tiles need up to 9 halo positions a
    pixel. The bound is the best of all shapes, by hand."""
    g = _layer(33, 64, 4, 32, 3, 1)
    b = model.fused_bound(g)
    per_input, per_pixel = 2 * 32 * 64, 2 * 32 * 32 * 9 + 2 * 64 * 32
    whole = 16 * (per_input + per_pixel)                 # one block an image, 33 SMs busy
    quarter = 9 * per_input + 4 * per_pixel              # 2x2 tiles: 132 blocks, one an SM
    assert b.tile == (2, 2) and b.blocks == 132
    assert b.us == pytest.approx(1e6 * quarter * 132 / model.H200.fp32_flops)
    assert b.us < 1e6 * whole * 132 / model.H200.fp32_flops
    assert b.recompute == pytest.approx(4 * 9 / 16)


def test_fused_bound_with_a_winograd_core_by_hand():
    """The layer above with the core by F(2x2, 3x3): 16 multiplies a 2x2 output tile and rank
    pair (36 direct), tiles of even sides or the whole image: 2x2 tiles (132 blocks) win again."""
    g = _layer(33, 64, 4, 32, 3, 1)
    b = model.fused_bound(g, core="winograd")
    per_input, last = 2 * 32 * 64, 2 * 64 * 32
    quarter = 9 * per_input + 2 * 32 * 32 * 16 + 4 * last
    assert b.tile == (2, 2) and b.blocks == 132
    assert b.us == pytest.approx(1e6 * quarter * 132 / model.H200.fp32_flops)
    assert b.recompute == pytest.approx(4 * 9 / 16)
    assert b.us < model.fused_bound(g).us  # 16 multiplies where the direct core has 36
    assert b.floor_us == model.fused_bound(g).floor_us  # the floor stays the direct layer's


def test_fused_bound_keeps_a_blocks_accumulators_in_one_register_file():
    """The bound's tiles hold their core accumulators (r_out a pixel direct, 16 a 2x2 tile with
    Winograd) in one SM's 64K registers: at layer1 the unconstrained Winograd tile (20x34 outputs:
    32 ranks x 16 x 170 tiles = 87,040 floats) would not fit."""
    for name in ("r18-l1a-n32", "r18-l2a-n32", "r18-l4a-n32"):
        g = bench_op.geometry(bench_op.suites()[name])
        th, tw = model.fused_bound(g).tile
        assert g.rank_out * th * tw <= model.H200.registers_per_sm
        th, tw = model.fused_bound(g, core="winograd").tile
        assert g.rank_out * 16 * -(-th // 2) * -(-tw // 2) <= model.H200.registers_per_sm
    assert model.fused_bound(bench_op.geometry(bench_op.suites()["r18-l1a-n32"]), core="winograd").tile == (14, 30)
    with pytest.raises(ValueError, match="accumulators"):  # 2x2 outputs of 8192 ranks: 131,072 sums
        model.fused_bound(_layer(1, 16, 4, 8192, 3, 1), core="winograd")


def test_fused_bound_with_a_winograd_core_needs_its_layers():
    g = TuckerGeometry(batch=2, in_channels=8, height=6, width=6, out_channels=8, rank_in=4, rank_out=4,
                       kernel_h=3, kernel_w=3, stride_h=2, stride_w=2, pad_h=1, pad_w=1)
    with pytest.raises(ValueError, match="stride 2x2"):
        model.fused_bound(g, core="winograd")
    with pytest.raises(ValueError, match="core must be"):
        model.fused_bound(g, core="fft")


def test_fused_bound_of_tdc_layers():
    """Never under the floor; layer4 (7x7 images) the costliest to fuse. Deterministic counts
    (a prediction under the issue-slot model, not a timing)."""
    ratios = {}
    for name in ("r18-l1a-n32", "r18-l2a-n32", "r18-l3a-n32", "r18-l4a-n32"):
        b = model.fused_bound(bench_op.geometry(bench_op.suites()[name]))
        assert b.ratio >= 1.0
        ratios[name] = b.ratio
    assert ratios["r18-l4a-n32"] == pytest.approx(1.237, abs=0.001)
    assert ratios["r18-l1a-n32"] < ratios["r18-l2a-n32"] < ratios["r18-l3a-n32"] < ratios["r18-l4a-n32"]
    assert model.fused_bound(bench_op.geometry(bench_op.suites()["r18-l4a-n32"])).ffma_share_for(1.5) > 0.8


def test_a_winograd_core_would_leave_room_for_1_5x_at_batch_32():
    """With the core by F(2x2, 3x3) a one-launch kernel would reach issue 14's 1.5x at TDC's
    batch-32 layers with 40-50% of its issued instructions useful FFMAs on layers 1-3,
    70% on layer4 (over 80% with the direct core). Deterministic counts, not a timing."""
    shares = {name: model.fused_bound(bench_op.geometry(bench_op.suites()[name]), core="winograd").ffma_share_for(1.5)
              for name in ("r18-l1a-n32", "r18-l2a-n32", "r18-l3a-n32", "r18-l4a-n32")}
    assert max(shares[n] for n in ("r18-l1a-n32", "r18-l2a-n32", "r18-l3a-n32")) == pytest.approx(0.50, abs=0.01)
    assert shares["r18-l4a-n32"] == pytest.approx(0.70, abs=0.01)
