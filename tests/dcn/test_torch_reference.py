"""The pure-torch DCN against the NumPy reference (values) and finite differences (gradients)."""

import numpy as np
import pytest

from deftnumba.dcn import reference

from .cases import CASES, conv_kwargs, layer_arrays

torch = pytest.importorskip("torch")
from deftnumba.dcn import torch_reference  # noqa: E402


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_numpy_reference(name, rng):
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    tensors = [torch.from_numpy(a.astype(np.float64)) if a is not None else None for a in arrays]
    out = torch_reference.deform_conv2d(*tensors[:4], **conv_kwargs(g), mask=tensors[4])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_gradients_pass_gradcheck(rng):
    g = CASES["offset-groups-2"]
    x, offset, weight, bias, mask = layer_arrays(g, rng, offset_scale=0.7)
    first_image = (x[:1], offset[:1], weight, bias, mask[:1])  # one image keeps gradcheck quick
    x, offset, weight, bias, mask = [torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in first_image]
    assert torch.autograd.gradcheck(
        lambda *t: torch_reference.deform_conv2d(t[0], t[1], t[2], t[3], **conv_kwargs(g), mask=t[4]),
        (x, offset, weight, bias, mask), eps=1e-6, atol=1e-5)
