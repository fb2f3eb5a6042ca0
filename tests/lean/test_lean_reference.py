"""The float64 reference of the lean operator against an independent dense convolution (torch)."""

import numpy as np
import pytest

from deftnumba.lean import PATTERNS
from deftnumba.lean.reference import (dense_equivalent, lean_conv2d_backward_reference,
                                      lean_conv2d_reference)

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (2, 1)])
def test_reference_is_a_dense_conv_with_the_lean_weight(rng, pattern, stride):
    taps = PATTERNS[pattern]
    n, c, h, w = 2, 3, 5, 6
    x = rng.standard_normal((n, c, h, w))
    pw = rng.standard_normal((c, c))
    st = rng.standard_normal((c, len(taps)))
    b = rng.standard_normal(c)
    dense = F.conv2d(torch.from_numpy(x), torch.from_numpy(dense_equivalent(pw, st, taps)),
                     torch.from_numpy(b), stride=stride, padding=1).numpy()
    ours = lean_conv2d_reference(x, pw, st, b, stride, taps)
    np.testing.assert_allclose(ours, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", ["star5", "plus4", "full9"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_backward_reference_matches_autograd(rng, pattern, stride):
    taps = PATTERNS[pattern]
    n, c, h, w = 2, 3, 5, 4
    x = torch.from_numpy(rng.standard_normal((n, c, h, w))).requires_grad_()
    pw = torch.from_numpy(rng.standard_normal((c, c))).requires_grad_()
    st = torch.from_numpy(rng.standard_normal((c, len(taps)))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(c)).requires_grad_()
    # the dense weight built from (pw, st) with torch ops, so autograd reaches pw and st
    weight = torch.zeros(c, c, 3, 3, dtype=torch.float64)
    weight = weight.index_put((torch.arange(c)[:, None], torch.arange(c)[None, :],
                               torch.tensor(1), torch.tensor(1)), pw)
    for t, (dy, dx) in enumerate(taps):
        weight = weight.index_put((torch.arange(c), torch.arange(c), torch.tensor(1 + dy),
                                   torch.tensor(1 + dx)), st[:, t], accumulate=True)
    y = F.conv2d(x, weight, b, stride=stride, padding=1)
    gy = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    (y * gy).sum().backward()
    ref = lean_conv2d_backward_reference(gy.numpy(), x.detach().numpy(), pw.detach().numpy(),
                                         st.detach().numpy(), b.detach().numpy(), stride, taps)
    for name, ours, theirs in zip(("input", "pointwise", "stencil", "bias"), ref, (x.grad, pw.grad, st.grad, b.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
