"""TuckerConv2d: from_conv, forward against torch, state_dict round trip, gradcheck."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deftnumba.tucker.torch import TuckerConv2d, tucker_conv2d  # noqa: E402


def seeded(rng):
    torch.manual_seed(int(rng.integers(2**31)))


@pytest.mark.parametrize("method", ["three_pass", "fused", "torch"])
def test_from_conv_full_rank_equals_conv(rng, method):
    seeded(rng)
    conv = torch.nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)).double()
    layer = TuckerConv2d.from_conv(conv, ranks=(4, 3), method=method)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.weight, conv.weight, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["fused", "winograd"])
def test_kernels_match_torch_convs(rng, method):
    seeded(rng)
    layer = TuckerConv2d(5, 6, 3, ranks=(2, 3), padding=1, groups=1, method=method)
    x = torch.randn(1, 5, 5, 4)
    y = layer(x)
    layer.method = "torch"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip(rng):
    seeded(rng)
    a = TuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1, method="torch")
    b = TuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1, method="torch")
    assert set(a.state_dict()) == {"first", "core", "last", "bias"}
    assert a.state_dict()["core"].shape == (3, 2, 3, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("method", ["three_pass", "fused"])
def test_gradcheck(rng, method):
    """Gradients of input and all factors (float64, the kernels' forward, torch backward)."""
    seeded(rng)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    first = torch.randn(2, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    core = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    last = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, first, core, last, bias):
        return tucker_conv2d(x, first, core, last, bias, stride=(1, 2), padding=1, method=method)

    assert torch.autograd.gradcheck(f, (x, first, core, last, bias), fast_mode=True)


def test_backward_matches_torch(rng):
    seeded(rng)
    layer = TuckerConv2d(3, 4, 3, ranks=(2, 3), padding=1, method="three_pass").double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer.method = "torch"
    layer(x).square().sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)


def test_errors():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        TuckerConv2d.from_conv(torch.nn.Linear(2, 3), ranks=(1, 1))
    with pytest.raises(ValueError, match="groups"):
        TuckerConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2), ranks=(2, 2))
    with pytest.raises(ValueError, match="method"):
        tucker_conv2d(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 1, 1), torch.randn(1, 1, 1, 1),
                      torch.randn(2, 1, 1, 1), method="cudnn")
