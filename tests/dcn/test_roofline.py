"""Roofline counts against hand-computed small cases and against PAPERS.md's deft64 numbers."""

import pytest

from deftnumba.runtime import backend
from deftnumba.dcn import roofline as rl
from deftnumba.dcn.geometry import Geometry

# N=2, C=4 -> Co=6, 5x7, 3x3, pad 1: P = 35 output pixels, K = 9 taps, float32 (s = 4).
SMALL = Geometry(batch=2, in_channels=4, height=5, width=7, out_channels=6, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=True, has_bias=True)
# By hand: points = N*G*K*P = 2*1*9*35 = 630, samples = N*C*K*P = 2520, output elements 2*6*35 = 420.
INPUT, OFFSET, MASK = 2 * 4 * 35 * 4, 2 * 630 * 4, 630 * 4        # 1120, 5040, 2520 bytes
WEIGHT, BIAS, OUTPUT = 6 * 4 * 9 * 4, 6 * 4, 2 * 6 * 35 * 4         # 864, 24, 1680 bytes
COLUMNS = 2520 * 4                                                   # 10080 bytes
GEMM = 2 * 2 * 35 * 6 * 4 * 9                                        # 30240 FLOPs

# PAPERS.md, "Back-of-envelope for deft64 per image".
DEFT64_IMAGE = Geometry(batch=1, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                        pad_h=1, pad_w=1, has_mask=True, has_bias=False)


def test_small_fused_is_the_minimal_traffic_by_hand():
    t = rl.totals(SMALL, "fused", "fwd")
    assert t.bytes_read == INPUT + OFFSET + MASK + WEIGHT + BIAS == 9568
    assert t.bytes_written == OUTPUT == 1680
    # positions 2 + corner weights 8 + folded mask 4 per point, 7 per sample, the GEMM, the bias adds
    assert t.flops == 14 * 630 + 7 * 2520 + GEMM + 420 == 57120
    assert t.gemm_flops == GEMM
    assert t.intensity == pytest.approx(57120 / 11248)


def test_small_dense_convolution_by_hand():
    (conv,) = rl.operators(SMALL, "cudnn_conv", "fwd")
    assert (conv.bytes_read, conv.bytes_written, conv.flops) == (INPUT + WEIGHT + BIAS, OUTPUT, GEMM + 420)


def test_small_im2col_operators_by_hand():
    ops = {o.name: o for o in rl.operators(SMALL, "im2col", "fwd")}
    assert list(ops) == ["offset sampling", "bilinear columns", "gemm", "transpose + bias"]
    # the points buffer holds (y, x, m) per point: offset- plus mask-sized
    assert (ops["offset sampling"].bytes_read, ops["offset sampling"].bytes_written) == (OFFSET + MASK,) * 2
    assert ops["offset sampling"].flops == 2 * 630
    assert ops["bilinear columns"].bytes_read == OFFSET + MASK + INPUT  # the points
    assert ops["bilinear columns"].bytes_written == COLUMNS
    assert ops["bilinear columns"].flops == (8 + 7 + 1) * 2520           # corner setup per channel
    assert (ops["gemm"].bytes_read, ops["gemm"].bytes_written, ops["gemm"].flops) == (COLUMNS + WEIGHT, OUTPUT, GEMM)
    assert (ops["transpose + bias"].bytes_read, ops["transpose + bias"].bytes_written) == (OUTPUT + BIAS, OUTPUT)


def test_fused_columns_saves_the_positions_buffer_and_per_channel_setup():
    im2col = rl.totals(SMALL, "im2col")
    fused_columns = rl.totals(SMALL, "fused_columns")
    assert im2col.bytes - fused_columns.bytes == 2 * (OFFSET + MASK)      # points written and read
    assert fused_columns.bytes == rl.totals(SMALL, "torchvision").bytes  # torchvision computes them inline
    assert im2col.flops - fused_columns.flops == (16 * 2520 + 2 * 630) - (14 * 630 + 7 * 2520)
    # every column method moves the minimal bytes plus the column buffer twice plus the transpose
    assert fused_columns.bytes == rl.min_bytes(SMALL, "fused") + 2 * COLUMNS + 2 * OUTPUT


def test_groups_offset_groups_and_no_mask():
    g = Geometry(batch=1, in_channels=6, height=4, width=4, out_channels=4, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, groups=2, offset_groups=3, has_mask=False, has_bias=False)
    (fused,) = rl.operators(g, "fused")
    p, k = 16, 9
    assert rl.conv_flops(g) == 2 * p * 4 * 3 * k                         # C/groups = 3 per output
    assert fused.bytes_read == (6 * 16 + 2 * 3 * k * p + 4 * 3 * k) * 4  # no mask, weights [4, 3, 3, 3]
    assert fused.flops == 10 * 3 * k * p + 7 * 6 * k * p + rl.conv_flops(g)


def test_weights_are_read_once_per_image_chunk():
    g33 = Geometry(batch=33, in_channels=2, height=3, width=3, out_channels=2, kernel_h=1, kernel_w=1)
    gemm = next(o for o in rl.operators(g33, "im2col") if o.name == "gemm")
    assert gemm.bytes_read == 33 * 2 * 9 * 4 + 2 * (2 * 2 * 4)            # columns + weights x 2 chunks
    assert rl.totals(g33, "fused").bytes_read == 2376 + 2376 + 1188 + 16   # the fused kernel: weights once


@pytest.mark.parametrize("method", rl.MODELS)
def test_fwdbwd_is_fwd_plus_bwd_and_gemm_flops_agree(method):
    for g in (SMALL, DEFT64_IMAGE):
        fwd, bwd, both = (rl.totals(g, method, p) for p in rl.PASSES)
        assert both.flops == fwd.flops + bwd.flops
        assert both.bytes == fwd.bytes + bwd.bytes
        for p, t in zip(rl.PASSES, (fwd, bwd, both)):
            assert t.gemm_flops == rl.conv_flops(g, p)
            assert t.flops >= t.gemm_flops


def test_backward_counts_by_hand():
    fused_bwd = rl.totals(SMALL, "fused", "bwd")
    # reads grad_out, input, offset, mask, weight; writes their gradients and the bias gradient
    assert fused_bwd.bytes_read == OUTPUT + INPUT + OFFSET + MASK + WEIGHT
    assert fused_bwd.bytes_written == INPUT + OFFSET + MASK + WEIGHT + BIAS
    conv_bwd = {o.name: o for o in rl.operators(SMALL, "cudnn_conv", "bwd")}
    assert conv_bwd["grad input"].bytes == OUTPUT + WEIGHT + INPUT
    assert conv_bwd["grad weight"].bytes == OUTPUT + INPUT + WEIGHT
    assert conv_bwd["bias grad"].bytes == OUTPUT + BIAS
    im2col_bwd = {o.name: o for o in rl.operators(SMALL, "im2col", "bwd")}
    assert im2col_bwd["grad columns gemm"].bytes_written == COLUMNS
    assert im2col_bwd["col2im"].bytes == COLUMNS + OFFSET + MASK + INPUT
    assert im2col_bwd["offset and mask grad"].bytes == COLUMNS + OFFSET + MASK + INPUT + OFFSET + MASK
    assert im2col_bwd["weight grad gemm"].bytes_read == OUTPUT + COLUMNS
    assert im2col_bwd["zero grad_input"].bytes == INPUT and im2col_bwd["grad_out regroup"].bytes == 2 * OUTPUT
    # fused_columns: one sample pass replaces col2im, the offset/mask kernel and the recompute
    fc = {o.name: o for o in rl.operators(SMALL, "fused_columns", "bwd")}
    assert fc["fused sample grads"].bytes == COLUMNS + (OFFSET + MASK + INPUT) * 2 + COLUMNS
    # the retired fused_gemm (issue 11) has no model: a clear error names the modelled ones
    assert not rl.has_model("fused_gemm", "bwd")
    with pytest.raises(ValueError, match="fused_gemm.*modelled"):
        rl.totals(SMALL, "fused_gemm", "bwd")


def test_deft64_matches_papers_back_of_envelope():
    g = DEFT64_IMAGE
    assert rl.conv_flops(g) == 301_989_888                               # "0.302 GFLOP"
    fused = rl.min_bytes(g, "fused")
    assert fused == 2_686_976 and round(fused / 1e6, 2) == 2.69          # "2.69 MB" (weights included)
    assert rl.conv_flops(g) / fused == pytest.approx(112.4, abs=0.1)     # "about 112 FLOP/B"
    assert round(rl.column_buffer_bytes(g) / 1e6, 1) == 9.4              # "the 9.4 MB column buffer"
    papers_im2col = fused + 2 * rl.column_buffer_bytes(g)
    assert round(papers_im2col / 1e6, 1) == 21.6                         # "about 21.6 MB in total"
    assert rl.conv_flops(g) / papers_im2col == pytest.approx(14.0, abs=0.1)  # "an intensity of about 14"
    # Our im2col model adds the points buffer (y, x, m: written, read) and the GEMM-result transpose.
    extra = rl.min_bytes(g, "im2col") - papers_im2col
    assert extra == 2 * ((2 + g.has_mask) * 9 * 4096 * 4) + 2 * (64 * 4096 * 4)


def test_floors_and_percent_of_roofline():
    g8 = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                  pad_h=1, pad_w=1)
    c = rl.H200_LEADS
    (fused,) = rl.operators(g8, "fused")
    assert fused.flops / c.flops_per_s > fused.bytes / c.bytes_per_s   # fused fp32 is compute-bound
    assert rl.floor_ms(g8, "fused", "fwd", c) == pytest.approx(1e3 * fused.flops / 67e12)
    columns = next(o for o in rl.operators(g8, "im2col") if o.name == "bilinear columns")
    assert columns.intensity < c.ridge                                  # the column build is memory-bound
    floor = rl.floor_ms(g8, "im2col", "fwd", c)
    assert floor == pytest.approx(sum(rl.floor_ms_of(o.flops, o.bytes, c) for o in rl.operators(g8, "im2col")))
    assert rl.percent_of_roofline(floor, g8, "im2col", "fwd", c) == pytest.approx(100.0)
    assert rl.percent_of_roofline(4 * floor, g8, "im2col", "fwd", c) == pytest.approx(25.0)
    assert rl.floor_ms(g8, "fused", "fwd", rl.H200_DATASHEET) <= rl.floor_ms(g8, "im2col", "fwd", rl.H200_DATASHEET)


def test_ceilings_are_labelled_leads():
    assert rl.H200_LEADS.flops_per_s == 67e12 and rl.H200_LEADS.bytes_per_s == 4.3e12
    assert rl.H200_DATASHEET.bytes_per_s == 4.8e12
    assert "lead" in rl.H200_LEADS.source and "datasheet" in rl.H200_DATASHEET.source
    assert rl.H200_LEADS.ridge == pytest.approx(67 / 4.3)


def test_unknown_method_or_pass_is_rejected():
    with pytest.raises(ValueError, match="model"):
        rl.totals(SMALL, "nope")
    with pytest.raises(ValueError, match="pass"):
        rl.totals(SMALL, "fused", "sideways")


def test_table_rows():
    rows = rl.table({"small": SMALL}, pass_="fwd")
    assert [r["method"] for r in rows] == list(rl.MODELS)
    assert all(r["floor_ms"] > 0 and r["conv_gflop"] == GEMM / 1e9 for r in rows)
    assert rl.format_table(rows).count("\n") == len(rows) + 1


@pytest.mark.skipif(backend.IS_SIMULATOR, reason="measures the GPU with CuPy")
def test_measure_ceilings_on_the_gpu():
    c = rl.measure_ceilings(copy_bytes=256 << 20, gemm_n=2048, repeats=3)
    assert c.source == "measured" and c.flops_per_s > 1e12 and c.bytes_per_s > 1e11
