"""Empty batches, no input channels and no output channels: right shapes, no launch.

torchvision returns empty outputs and gradients for a batch of 0 and for
``Cout = 0``; so do we, for every forward and backward method, without running a
kernel. With no input channels (weight ``[Cout, 0, kh, kw]``) the output is the
bias alone. Output sizes below 1, zero height/width and zero offset groups stay
errors (``test_arguments.py``).
"""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.dcn import ops, reference
from deftnumba.dcn.kernels import backward as backward_kernels
from deftnumba.dcn.kernels import fused_columns, fused_tiled, im2col

EMPTY = {  # name: (N, C, Cout, groups)
    "batch-0": (0, 4, 6, 2),
    "cout-0": (2, 4, 0, 2),
    "channels-0": (2, 0, 6, 1),
    "all-0": (0, 0, 0, 1),
}


def arrays(n, c, c_out, groups, rng, dtype=np.float32, h=5, w=4, offset_groups=2):
    offset_groups = offset_groups if c else 1
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    offset = rng.standard_normal((n, 2 * offset_groups * 9, h, w)).astype(dtype)
    weight = rng.standard_normal((c_out, c // groups, 3, 3)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    mask = rng.uniform(0.1, 1, (n, offset_groups * 9, h, w)).astype(dtype)
    return x, offset, weight, bias, mask


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel entry point raises if called."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty layer")

    for module in (im2col, fused_columns, fused_tiled, backward_kernels):
        for name in dir(module):
            if name.endswith("_kernel") or name in ("forward", "launch") or name.startswith("backward_"):
                monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(ops, "_FORWARD", {k: boom for k in ops._FORWARD})
    monkeypatch.setattr(ops, "_BACKWARD", {k: boom for k in ops._BACKWARD})


@pytest.mark.parametrize("bias_and_mask", [True, False])
@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_forward_and_backward(name, bias_and_mask, rng, no_launch):
    x, offset, weight, bias, mask = arrays(*EMPTY[name], rng)
    if not bias_and_mask:
        bias = mask = None
    n, c_out = x.shape[0], weight.shape[0]
    expected = np.zeros((n, c_out, 5, 4))
    if bias is not None:
        expected += bias.astype(np.float64)[None, :, None, None]
    for method in ("auto", *dn.METHODS):
        out = dn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, method=method)
        assert out.shape == (n, c_out, 5, 4) and out.dtype == x.dtype
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    grad_out = rng.standard_normal(out.shape).astype(x.dtype)
    for method in ("auto", *dn.BACKWARD_METHODS):
        for deterministic in (False, True):
            g = dn.deform_conv2d_backward(grad_out, x, offset, weight, bias, padding=1, mask=mask,
                                          method=method, deterministic=deterministic)
            for field, given in zip(g._fields, (x, offset, weight, bias, mask)):
                value = getattr(g, field)
                if given is None:
                    assert value is None, field
                    continue
                assert value.shape == given.shape and value.dtype == x.dtype, field
                if field != "bias":
                    assert not np.any(value), field
            if bias is not None:
                np.testing.assert_allclose(g.bias, grad_out.astype(np.float64).sum(axis=(0, 2, 3)),
                                           rtol=1e-5, atol=1e-5)


def test_empty_matches_the_reference_where_it_runs(rng):
    """The reference has no empty special case: ``Cout = 0`` and a batch of 0 go
    through its ordinary einsums, and must agree with the short cut."""
    for name in ("batch-0", "cout-0"):
        x, offset, weight, bias, mask = arrays(*EMPTY[name], rng, dtype=np.float64)
        out = dn.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
        np.testing.assert_array_equal(out, reference.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask))
        grad_out = rng.standard_normal(out.shape)
        ours = dn.deform_conv2d_backward(grad_out, x, offset, weight, bias, padding=1, mask=mask)
        ref = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, padding=1, mask=mask)
        for field in ours._fields:
            np.testing.assert_allclose(getattr(ours, field), getattr(ref, field), rtol=1e-12, atol=0)


def test_output_size_below_one_stays_an_error(rng):
    x, offset, weight, bias, mask = arrays(0, 4, 6, 2, rng, h=2, w=2)
    with pytest.raises(ValueError, match="output would be empty"):
        dn.deform_conv2d(x, offset[:, :, :0, :0], weight, bias, padding=0, mask=mask[:, :, :0, :0])
