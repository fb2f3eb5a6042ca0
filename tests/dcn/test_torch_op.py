"""The torch layer as a registered op: fx, torch.compile, torch.export, TorchScript,
opcheck, double backward, error types, method= and empty tensors.

CPU tensors on the simulator (CUDA tensors with the cuda backend). torch.compile
uses the ``aot_eager`` backend: it traces forward and backward through the fake
kernels exactly as inductor does, without inductor's C++ code generation, which
takes minutes on CI's two cores and adds nothing about our op.
"""

import numpy as np
import pytest

from deftnumba.runtime import backend

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import deftnumba.torch as dt  # noqa: E402
from deftnumba.torch import DeformConv2d, deform_conv2d  # noqa: E402

DEVICE = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")
OP = torch.ops.deftnumba.deform_conv2d.default


class TinyDCN(nn.Module):
    """conv -> (offsets, mask) predictor -> DCNv2: the usual DCN block, tiny."""

    def __init__(self, c=2, c_out=3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.predict = nn.Conv2d(c, 27, 3, padding=1)
        self.dcn = DeformConv2d(c, c_out, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        o = self.predict(x)
        return self.dcn(x, o[:, :18], torch.sigmoid(o[:, 18:]))


def tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyDCN().to(DEVICE, dtype)
    with torch.no_grad():  # non-zero offsets (a zero-initialised predictor would hit only the grid)
        model.predict.weight.mul_(3.0)
    x = torch.randn(2, 1, 5, 4, dtype=dtype, device=DEVICE)
    return model, x


def grads_of(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, rtol=1e-10):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=rtol)


def test_fx_symbolic_trace_sees_one_op():
    model, x = tiny()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert sum(t in (OP, torch.ops.deftnumba.deform_conv2d) for t in targets) == 1, targets
    assert_same(grads_of(traced, x), grads_of(model, x))  # the default backward scatters with atomics: last bits vary


def test_torch_compile_fullgraph_forward_and_backward():
    model, x = tiny()
    expected = grads_of(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same(grads_of(compiled, x), expected)
    torch._dynamo.reset()


def test_torch_export_round_trip():
    model, x = tiny()
    batch = torch.export.Dim("batch", min=1, max=64)  # the fake kernel handles symbolic sizes
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert OP in targets, targets
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)
    x3 = torch.randn(3, 1, 5, 4, dtype=x.dtype, device=DEVICE)
    torch.testing.assert_close(exported.module()(x3), model(x3), rtol=0, atol=0)


def test_torchscript_default_path():
    model, x = tiny()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("with_mask_and_bias", [True, False])
def test_opcheck(with_mask_and_bias):
    gen = torch.Generator().manual_seed(1)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE).requires_grad_()

    x, offset, weight = t(1, 2, 4, 3), t(1, 2 * 2 * 4, 3, 2, scale=1.5), t(4, 1, 2, 2)
    bias, mask = (t(4), t(1, 2 * 4, 3, 2)) if with_mask_and_bias else (None, None)
    args = (x, offset, weight, bias, mask, [1, 1], [0, 0], [1, 1], "auto", None)
    torch.library.opcheck(OP, args)
    # stride 2, padding and the other methods too
    args = (x, offset, weight, bias, mask, [2, 1], [1, 0], [1, 1], "fused_columns", True)  # Ho = 3, Wo = 2
    torch.library.opcheck(OP, args)


def test_double_backward_raises_clearly():
    model, x = tiny()
    x.requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_method_stays_reachable_and_scriptable():
    model, x = tiny()
    expected = model(x)
    for method in ("im2col", "fused_columns", "fused"):
        model.dcn.method = method
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    o = torch.randn(2, 18, 5, 4, dtype=torch.float64, device=DEVICE)
    y = deform_conv2d(x.expand(2, 2, 5, 4), o, model.dcn.weight, padding=1, method="im2col", deterministic=True)
    assert y.shape == (2, 3, 5, 4)
    model.dcn.method = "fused_columns"
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-12, atol=1e-12)


def test_errors_are_value_or_type_errors_and_runtime_errors():
    layer = DeformConv2d(2, 3, 3, padding=1).to(DEVICE)
    x = torch.randn(1, 2, 4, 4, device=DEVICE)
    offset = torch.randn(1, 18, 4, 4, device=DEVICE)
    assert issubclass(dt.DeformConvValueError, ValueError) and issubclass(dt.DeformConvValueError, RuntimeError)
    assert issubclass(dt.DeformConvTypeError, TypeError) and issubclass(dt.DeformConvTypeError, RuntimeError)
    cases = [
        (lambda: layer(x, offset[:, :10]), dt.DeformConvValueError, "offset.shape\\[1\\] \\(10\\)"),
        (lambda: layer(x.double(), offset.double(), offset[:, :9]), dt.DeformConvTypeError, "one dtype"),
        (lambda: layer(x, offset.numpy() if DEVICE.type == "cpu" else [1]), dt.DeformConvTypeError,
         "offset must be a torch.Tensor"),
        (lambda: deform_conv2d(x, offset, layer.weight, stride=1.5), dt.DeformConvTypeError, "stride"),
        (lambda: deform_conv2d(x[:, :, :2, :2], offset[:, :, :1, :1], layer.weight), dt.DeformConvValueError,
         "output would be empty"),
        (lambda: DeformConv2d(3, 4, 3, groups=2), dt.DeformConvValueError, "divisible by groups"),
    ]
    for call, error, message in cases:
        for catch in (error, RuntimeError, error.__mro__[2]):  # ours, torchvision's, deftnumba's
            with pytest.raises(catch, match=message):
                call()


@pytest.mark.parametrize("n, c_out", [(0, 3), (2, 0)])
def test_empty_batch_and_no_output_channels(n, c_out):
    layer = DeformConv2d(2, c_out, 3, padding=1).to(DEVICE, torch.float64)
    x = torch.randn(n, 2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    offset = torch.randn(n, 18, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.rand(n, 9, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = layer(x, offset, mask)
    assert out.shape == (n, c_out, 4, 5)
    out.sum().backward()
    for t in (x, offset, mask, layer.weight, layer.bias):
        assert t.grad.shape == t.shape and not torch.any(t.grad)
