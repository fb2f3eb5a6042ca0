"""The column kernels themselves: their column matrix, not only the layer output.

test_forward.py checks the ``fused_columns`` and ``im2col`` methods end to end; here
each column kernel's block is compared with the reference's column matrix element by
element, NaN-poisoned first, for a chunk that does not start at image 0, with several
offset groups, with and without the mask (which fused_columns folds into the weights),
on both index variants (the int64 ``wide`` one forced on tiny shapes).
"""

import numpy as np
import pytest

from deftnumba import backend, reference
from deftnumba.kernels import fused_columns, im2col
from deftnumba.kernels.sampling import conv_tuple

from .cases import CASES, conv_kwargs, layer_arrays


def column_block(method, g, x, offset, mask, first, n_chunk, wide=None, monkeypatch=None):
    """The kernel's column block for images ``first .. first + n_chunk - 1``, NaN-poisoned first."""
    pixels = g.out_h * g.out_w
    columns = np.full((g.in_channels * g.taps, n_chunk * pixels), np.nan, dtype=x.dtype)
    module = fused_columns if method == "fused_columns" else im2col
    if wide is not None:  # force the index variant
        monkeypatch.setattr(module, "chunk_needs_wide", lambda *args: wide)
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
