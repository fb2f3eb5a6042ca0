"""Cross-check against the real ``torchvision.ops.deform_conv2d`` on a GPU.

Runs only where torchvision and a CUDA GPU are importable and deftnumba uses the
cuda backend (e.g. ``DEFTNUMBA_BACKEND=cuda python -m pytest tests/test_torchvision.py``
on an H200); skipped elsewhere.
"""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend

from .cases import CASES, conv_kwargs, layer_arrays, tolerance

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(backend.IS_SIMULATOR or not torch.cuda.is_available(),
                                reason="needs a CUDA GPU and the cuda backend")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("method", list(dn.METHODS))
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_torchvision(method, name, rng):
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    cp = backend.cupy()
    tensors = [torch.from_numpy(a).cuda() if a is not None else None for a in arrays]
    expected = torchvision.ops.deform_conv2d(*tensors[:4], **conv_kwargs(g), mask=tensors[4])
    ours = dn.deform_conv2d(*[cp.asarray(a) if a is not None else None for a in arrays],
                            **conv_kwargs(g), mask=cp.asarray(arrays[4]) if arrays[4] is not None else None,
                            method=method)
    expected = expected.double().cpu().numpy()
    err = np.linalg.norm(cp.asnumpy(ours) - expected) / np.linalg.norm(expected)
    print(f"{name} {method}: rel. error vs torchvision {err:.2e}, "
          f"max abs {np.abs(cp.asnumpy(ours) - expected).max():.2e}")
    assert err < tolerance(g.dtype)


@pytest.mark.parametrize("method", list(dn.METHODS))
def test_suite_shape_matches_torchvision(method, rng):
    """The DefT layer itself (deft64, one image), not only tiny cases."""
    from deftnumba.dcn.demo import GPU_LAYER
    from deftnumba.dcn.inputs import random_layer
    from dataclasses import replace

    g = replace(GPU_LAYER, batch=2)
    arrays = random_layer(g, seed=int(rng.integers(1 << 30)))
    cp = backend.cupy()
    tensors = [torch.from_numpy(a).cuda() if a is not None else None for a in arrays]
    expected = torchvision.ops.deform_conv2d(*tensors[:4], padding=1, mask=tensors[4]).double().cpu().numpy()
    ours = dn.deform_conv2d(*[cp.asarray(a) if a is not None else None for a in arrays[:4]], padding=1,
                            mask=cp.asarray(arrays[4]), method=method)
    err = np.linalg.norm(cp.asnumpy(ours) - expected) / np.linalg.norm(expected)
    print(f"deft64(N=2) {method}: rel. error vs torchvision {err:.2e}")
    assert err < 1e-5
