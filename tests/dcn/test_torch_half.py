"""The torch layer in float16 and bfloat16: native half tensors (no upcast), autocast in the
autocast dtype (CPU here; CUDA in test_torch_layer), and torchvision's float16 as an oracle.

Tolerances (u = unit roundoff: float16 2**-11, bfloat16 2**-8; errors as max|err| over
max|ref| of each tensor): against the float64 reference on the same half values our
results are within 2u (measured <= 0.9u, see test_half.py). torchvision's CPU float16 op
computes in half itself: its results were measured up to ~7u from the float64 reference
on these shapes, so ours and torchvision's must agree within 16u (on offsets that make
torchvision's float16 sampling positions exact: see the test).
"""

import numpy as np
import pytest

from deftnumba.dcn import reference
from deftnumba.runtime import backend

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from deftnumba.dcn.torch import DeformConv2d, deform_conv2d  # noqa: E402

pytestmark = pytest.mark.skipif(not backend.IS_SIMULATOR, reason="CPU tensors run on the simulator backend "
                                "(CUDA autocast: test_torch_layer.py)")
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def f64(t):
    return None if t is None else t.detach().double().numpy()


def layer_tensors(seed, dtype, n=2, c=3, h=5, w=4, c_out=4, k=3, mask=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    offset = (torch.randn(n, 2 * k * k, h, w, generator=g) * 1.5).to(dtype)
    m = torch.rand(n, k * k, h, w, generator=g).to(dtype) if mask else None
    weight = (torch.randn(c_out, c, k, k, generator=g) / 5).to(dtype)
    bias = torch.randn(c_out, generator=g).to(dtype)
    grad_out = torch.randn(n, c_out, h, w, generator=g).to(dtype)
    return x, offset, weight, bias, m, grad_out


def forward_backward(op, x, offset, weight, bias, mask, grad_out):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, offset, weight, bias, mask)]
    out = op(leaves[0], leaves[1], leaves[2], leaves[3], padding=1, mask=leaves[4])
    out.backward(grad_out)
    return [out] + [t.grad if t is not None else None for t in leaves]


def max_rel(a, expected):
    return float(np.abs(f64(a) - expected).max() / np.abs(expected).max())


def test_float16_layer_matches_torchvision_float16(rng):
    """torchvision computes the sampling positions in float16 too (``y = h + dy`` rounded to
    half), and the offset gradient jumps where a position crosses an integer: so the offsets
    here are multiples of 1/64 with fractional parts in [1/8, 7/8], which makes every position
    exact in float16 and keeps it away from the kinks (a random float16 offset once gave a
    5% difference in one offset-gradient entry: torchvision's rounded position, not ours)."""
    x, offset, weight, bias, mask, grad_out = layer_tensors(int(rng.integers(2**31)), torch.float16)
    offset = (torch.floor(offset.float()) + torch.from_numpy(rng.integers(8, 57, tuple(offset.shape))) / 64
              ).to(torch.float16)
    tensors = (x, offset, weight, bias, mask, grad_out)
    ours = forward_backward(deform_conv2d, *tensors)
    theirs = forward_backward(torchvision.ops.deform_conv2d, *tensors)
    x, offset, weight, bias, mask, grad_out = tensors
    expected = reference.deform_conv2d(f64(x), f64(offset), f64(weight), f64(bias), 1, 1, 1, f64(mask))
    grads = reference.deform_conv2d_backward(f64(grad_out), f64(x), f64(offset), f64(weight), f64(bias), 1, 1, 1,
                                             f64(mask))
    names = ("output", "input", "offset", "weight", "bias", "mask")
    for name, a, b, e in zip(names, ours, theirs, [expected, *grads]):
        assert a.dtype == torch.float16, name
        assert max_rel(a, f64(b)) <= 16 * U[torch.float16] * np.abs(e).max() / np.abs(f64(b)).max(), name
        assert max_rel(a, e) <= 2 * U[torch.float16], name


@pytest.mark.parametrize("mask", [True, False], ids=["v2", "v1"])
def test_bfloat16_layer_against_float64_reference(mask, rng):
    x, offset, weight, bias, m, grad_out = tensors = layer_tensors(int(rng.integers(2**31)), torch.bfloat16,
                                                                    c=2, h=4, w=5, c_out=3, mask=mask)
    results = forward_backward(deform_conv2d, *tensors)
    expected = reference.deform_conv2d(f64(x), f64(offset), f64(weight), f64(bias), 1, 1, 1, f64(m))
    grads = reference.deform_conv2d_backward(f64(grad_out), f64(x), f64(offset), f64(weight), f64(bias), 1, 1, 1,
                                             f64(m))
    for name, a, e in zip(("output", "input", "offset", "weight", "bias", "mask"), results, [expected, *grads]):
        if e is None:
            assert a is None
            continue
        assert a.dtype == torch.bfloat16, name
        assert max_rel(a, e) <= 2 * U[torch.bfloat16], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_runs_in_the_autocast_dtype(dtype, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    layer = DeformConv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 5, requires_grad=True)
    offset = torch.randn(1, 18, 4, 5)
    mask = torch.rand(1, 9, 4, 5)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x, offset, mask)
    assert out.dtype == dtype
    cast = [t.detach().to(dtype) for t in (x, offset, layer.weight, layer.bias, mask)]
    expected = reference.deform_conv2d(*(f64(t) for t in cast[:4]), 1, 1, 1, f64(cast[4]))
    assert max_rel(out, expected) <= 2 * U[dtype]
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


def test_half_results_are_not_upcast_copies(rng):
    """The op hands the kernels the tensors' own half storage: the result is half, and the
    fake (meta) kernel agrees on the dtype."""
    x, offset, weight, bias, mask, _ = layer_tensors(int(rng.integers(2**31)), torch.bfloat16, n=1, c=2, h=3, w=3,
                                                     c_out=2)
    out = torch.ops.deftnumba.deform_conv2d(x, offset, weight, bias, mask, [1, 1], [1, 1], [1, 1], "auto", None)
    assert out.dtype == torch.bfloat16
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.deftnumba.deform_conv2d(*(mode.from_tensor(t) for t in (x, offset, weight, bias, mask)),
                                                 [1, 1], [1, 1], [1, 1], "auto", None)
    assert fake.dtype == torch.bfloat16 and fake.shape == out.shape
