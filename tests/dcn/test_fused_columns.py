"""The fused column kernel itself: its column matrix, not only the layer output.

test_forward.py checks the ``fused_columns`` method end to end; here the kernel's
column block is compared with the reference's column matrix element by element,
NaN-poisoned first, for a chunk that does not start at image 0, with several
offset groups, with and without the mask (which the kernel folds into the weights).
"""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.dcn import reference
from deftnumba.dcn.kernels import fused_columns, im2col
from deftnumba.dcn.kernels.sampling import conv_tuple

from .cases import CASES, conv_kwargs, layer_arrays


@pytest.mark.parametrize("name", ["basic-3x3", "no-mask-no-bias", "groups-and-offset-groups",
                                  "stride-pad-dil-pairs", "float64"])
def test_column_block_matches_reference(name, rng):
    g = CASES[name]
    x, offset, _, _, mask = layer_arrays(g, rng)
    first, n_chunk = 1, g.batch - 1  # a chunk that starts at image 1
    pixels = g.out_h * g.out_w
    columns = np.full((g.in_channels * g.taps, n_chunk * pixels), np.nan, dtype=x.dtype)
    mask_arg = mask if mask is not None else np.empty((1, 1, 1, 1), dtype=x.dtype)
    kernel = fused_columns.fused_columns_kernel(g.dtype, mask is not None)
    im2col.launch(kernel, n_chunk * g.offset_groups * g.taps * pixels, x, offset, mask_arg, columns,
                  np.int64(first), conv_tuple(g))
    columns = backend.to_host(columns)
    assert not np.isnan(columns).any(), "some column elements were never written"

    expected = reference.columns(x, offset, (g.kernel_h, g.kernel_w), **conv_kwargs(g), mask=mask)
    # reference [N, C, K, Ho, Wo] -> the kernel's layout [C*K, n_local*P + p]
    expected = expected[first:].reshape(n_chunk, g.in_channels * g.taps, pixels)
    expected = expected.transpose(1, 0, 2).reshape(g.in_channels * g.taps, n_chunk * pixels)
    tol = 1e-6 if g.dtype == "float32" else 1e-13
    np.testing.assert_allclose(columns, expected, rtol=tol, atol=tol * np.abs(expected).max())
