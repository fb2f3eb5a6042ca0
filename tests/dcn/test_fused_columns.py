"""The column kernels themselves: their column matrix, not only the layer output.

test_forward.py checks the ``fused_columns`` and ``im2col`` methods end to end; here
each column kernel's block is compared with the reference's column matrix element by
element, NaN-poisoned first, for a chunk that does not start at image 0, with several
offset groups, with and without the mask (which fused_columns folds into the weights),
on both index variants (the int64 ``wide`` one forced on tiny shapes).
"""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.dcn import reference
from deftnumba.dcn.kernels import fused_columns, im2col
from deftnumba.dcn.kernels.sampling import conv_tuple

from .cases import CASES, case, conv_kwargs, layer_arrays


def column_block(method, g, x, offset, mask, first, n_chunk, wide=None, monkeypatch=None):
    """The kernel's column block for images ``first .. first + n_chunk - 1``, NaN-poisoned first."""
    pixels = g.out_h * g.out_w
    columns = np.full((g.in_channels * g.taps, n_chunk * pixels), np.nan, dtype=x.dtype)
    module = fused_columns if method == "fused_columns" else im2col
    if wide is not None:  # force the index variant (im2col: of the positions kernel too)
        monkeypatch.setattr(module, "chunk_needs_wide", lambda *args: wide)
        monkeypatch.setattr(im2col, "needs_wide", lambda *sizes: wide)
    if method == "fused_columns":
        fill = fused_columns.column_filler(g, x, offset, mask, np)
    else:
        fill = im2col.column_filler(g, x, im2col.compute_points(g, offset, mask, np), np)
    with backend.bounds_checked():
        fill(columns, first)
    return backend.to_host(columns)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("method", ["fused_columns", "im2col"])
@pytest.mark.parametrize("name", ["basic-3x3", "no-mask-no-bias", "groups-and-offset-groups",
                                  "stride-pad-dil-pairs", "float64", "odd-everything"])
def test_column_block_matches_reference(name, method, wide, rng, monkeypatch):
    g = CASES[name]
    x, offset, _, _, mask = layer_arrays(g, rng)
    first, n_chunk = 1, g.batch - 1  # a chunk that starts at image 1
    pixels = g.out_h * g.out_w
    columns = column_block(method, g, x, offset, mask, first, n_chunk, wide, monkeypatch)
    assert not np.isnan(columns).any(), "some column elements were never written"

    expected = reference.columns(x, offset, (g.kernel_h, g.kernel_w), **conv_kwargs(g), mask=mask)
    # reference [N, C, K, Ho, Wo] -> the kernel's layout [C*K, n_local*P + p]
    expected = expected[first:].reshape(n_chunk, g.in_channels * g.taps, pixels)
    expected = expected.transpose(1, 0, 2).reshape(g.in_channels * g.taps, n_chunk * pixels)
    tol = 1e-6 if g.dtype == "float32" else 1e-13
    np.testing.assert_allclose(columns, expected, rtol=tol, atol=tol * np.abs(expected).max())


ODD_GROUPS = dict([case("odd-channels-per-offset-group", n=3, c=9, h=4, w=5, c_out=3, offset_groups=3),
                   case("one-channel-per-offset-group", n=2, c=3, h=3, w=6, c_out=3, offset_groups=3, mask=False)])


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("name", list(ODD_GROUPS))
def test_im2col_channel_pairs_cover_odd_groups(name, wide, rng, monkeypatch):
    """im2col's column kernel fills two channels of one offset group per thread: a group with
    an odd number of channels ends in a pair whose second channel repeats the first. Every
    element is written once with its own group's points (several groups, so a pair never
    straddles two groups)."""
    g = ODD_GROUPS[name]
    x, offset, _, _, mask = layer_arrays(g, rng)
    first, n_chunk = 1, g.batch - 1
    pixels = g.out_h * g.out_w
    columns = column_block("im2col", g, x, offset, mask, first, n_chunk, wide, monkeypatch)
    assert not np.isnan(columns).any(), "some column elements were never written"
    expected = reference.columns(x, offset, (g.kernel_h, g.kernel_w), **conv_kwargs(g), mask=mask)
    expected = expected[first:].reshape(n_chunk, g.in_channels * g.taps, pixels)
    expected = expected.transpose(1, 0, 2).reshape(g.in_channels * g.taps, n_chunk * pixels)
    np.testing.assert_allclose(columns, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("module", [im2col, fused_columns])
def test_phase_model_covers_every_phase_marker(module):
    """The audit attributes SASS to ``# phase:`` markers and multiplies by ``phase_model``."""
    import inspect
    import re

    markers = set(re.findall(r"# phase: (\w+)", inspect.getsource(module)))
    for name in ("basic-3x3", "groups-and-offset-groups", "odd-everything"):
        model = module.phase_model(CASES[name])
        assert set(model) == markers, name
        # a count, or (body iterations, straight runs)
        assert all(all(isinstance(x, int) and x >= 0 for x in (v if isinstance(v, tuple) else (v,)))
                   for v in model.values()), (name, model)


def test_phase_models_of_deft64_by_hand():
    from deftnumba.bench import SUITES

    g = SUITES["deft64"]  # N=8, 64 -> 64 channels, 64x64, 3x3: one chunk of 8 images
    # im2col: grid (4096 px / (256 threads * 4 px), 64 channels, 8 images): one row, 4 pixels
    # and 4*9 column elements per thread
    assert im2col.phase_model(g) == {"point_rows": 1, "positions": 1, "rows": 1, "pixels": 4, "columns": 36}
    # fused_columns: grid (4096 px / (256 threads * 2 points), 9 taps, 8 images): two points per
    # thread, each walked over 64 channels (the loop's set-up once per point)
    assert fused_columns.POINTS_PER_THREAD == 2
    assert fused_columns.phase_model(g) == {"rows": 1, "points": 2, "columns": (128, 2), "out_of_band_columns": 0}


def test_index_variants_switch_at_2_31_elements():
    from deftnumba.arguments import Geometry

    assert not im2col.needs_wide(2**31 - 1) and im2col.needs_wide(2**31)

    def layer(n, c, h, w, k):
        return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=1, kernel_h=k, kernel_w=k)

    big_image = layer(1, 8, 16400, 16400, 1)  # 2.15e9 input elements in one image
    for module in (im2col, fused_columns):
        assert module.chunk_needs_wide(big_image, 1)
        assert not module.chunk_needs_wide(layer(8, 64, 64, 64, 3), 8)
    # one chunk's column buffer stays below 2**31 unless one image alone is bigger
    wide = layer(40, 4096, 32, 32, 3)
    assert im2col.chunk_images(wide) * 4096 * 9 * 32 * 32 <= 2**31 - 1
    assert not im2col.chunk_needs_wide(wide, im2col.chunk_images(wide))
