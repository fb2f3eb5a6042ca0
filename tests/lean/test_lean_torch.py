"""The torch layer: gradcheck through the kernels, and agreement with the torch-ops implementation."""

import pytest

torch = pytest.importorskip("torch")

from deftnumba.lean import PATTERNS  # noqa: E402
from deftnumba.lean.torch import LeanConv2d, lean_conv2d, lean_conv2d_torch  # noqa: E402


@pytest.mark.parametrize("method, stride", [("fused", 1), ("separate", 2)])
def test_gradcheck_through_the_kernels(rng, method, stride):
    c, taps = 2, PATTERNS["star5"]
    x = torch.from_numpy(rng.standard_normal((1, c, 3, 4))).requires_grad_()
    pw = torch.from_numpy(rng.standard_normal((c, c))).requires_grad_()
    st = torch.from_numpy(rng.standard_normal((c, len(taps)))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(c)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: lean_conv2d(*a, stride, pattern="star5", method=method), (x, pw, st, b),
        eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_kernels_and_torch_ops_agree(rng, pattern):
    torch.manual_seed(int(rng.integers(2**31)))
    layer = LeanConv2d(3, pattern=pattern, stride=2).double()
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 4))).requires_grad_()
    y = layer(x)
    y_torch = lean_conv2d_torch(x, layer.pointwise, layer.stencil, layer.bias, 2, pattern=pattern)
    torch.testing.assert_close(y, y_torch)
    gy = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    ours = torch.autograd.grad(y, (x, layer.pointwise, layer.stencil, layer.bias), gy)
    theirs = torch.autograd.grad(y_torch, (x, layer.pointwise, layer.stencil, layer.bias), gy)
    for u, v in zip(ours, theirs):
        torch.testing.assert_close(u, v)


def test_no_bias_and_only_some_gradients(rng):
    layer = LeanConv2d(2, bias=False).double()
    layer.pointwise.requires_grad_(False)
    x = torch.from_numpy(rng.standard_normal((1, 2, 3, 3)))
    layer(x).sum().backward()
    assert layer.bias is None and layer.pointwise.grad is None and layer.stencil.grad is not None


def test_flops_and_errors():
    layer = LeanConv2d(4, pattern="plus4", impl="torch")
    assert layer.flops(6, 6) == 2 * 36 * 4 * (4 + 4)
    with pytest.raises(ValueError, match="impl must be"):
        LeanConv2d(4, impl="cudnn")
