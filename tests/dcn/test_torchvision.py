"""Differential tests against the real ``torchvision.ops.deform_conv2d``.

torchvision runs on the CPU in float64 on the same values (float32 data upcast,
so sampling positions are identical) and is the oracle for every forward method,
every backward method (atomic and deterministic) and the torch layer, on random
irregular cases and on offsets that put samples exactly on integers and on the
band's edges (``y, x in {-1, -0.5, 0, H-1, H-0.5, H}``), and on zero offsets with
padding 1 (the first step of every DCN layer). A mismatch is an element further
from torchvision than ``rtol`` times the largest magnitude of that tensor.

torchvision itself segfaulted on a NaN dx offset, so it never sees NaN here; our
NaN behaviour is checked on its own.

The last tests compare on a GPU with torchvision's CUDA op (cuda backend only).
"""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.dcn import reference
from deftnumba.runtime import backend

from .cases import CASES, case, conv_kwargs, layer_arrays, tolerance

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
GPU = pytest.mark.skipif(backend.IS_SIMULATOR or not torch.cuda.is_available(),
                         reason="needs a CUDA GPU and the cuda backend")

DIFF_CASES = dict([
    case("tv-basic", n=2, c=3, h=5, w=6, c_out=4),
    case("tv-float64-groups", n=1, c=4, h=6, w=5, c_out=6, groups=2, offset_groups=2, dtype="float64"),
    case("tv-odd", n=2, c=3, h=4, w=7, c_out=2, kh=2, kw=3, stride=(2, 1), pad=(1, 2), dil=(1, 2),
         offset_groups=3, bias=False, dtype="float64"),
    case("tv-no-mask", n=1, c=2, h=3, w=4, c_out=3, mask=False, dtype="float64"),
])
# (case, offsets): border and zero offsets everywhere, random ones on two cases
# (random offsets are compared with the float64 reference by every other test).
PAIRS = [(name, kind) for name in DIFF_CASES for kind in ("border", "zero")] + [
    ("tv-odd", "random"), ("tv-basic", "random")]


def border_offsets(g, rng, fraction=0.8):
    """Offsets whose sampling positions are, for ``fraction`` of the samples, one of
    ``{-1, -0.5, 0, H-1, H-0.5, H}`` in y and the same with W in x (chosen
    independently), an exact integer inside the image otherwise, or a random real."""
    shape = (g.batch, g.offset_groups, g.taps, g.out_h, g.out_w)
    tap_y = np.repeat(np.arange(g.kernel_h) * g.dil_h, g.kernel_w)[:, None, None]
    tap_x = np.tile(np.arange(g.kernel_w) * g.dil_w, g.kernel_h)[:, None, None]
    base_y = np.arange(g.out_h)[:, None] * g.stride_h - g.pad_h + tap_y
    base_x = np.arange(g.out_w)[None, :] * g.stride_w - g.pad_w + tap_x

    def targets(size):
        edge = rng.choice([-1.0, -0.5, 0.0, size - 1.0, size - 0.5, float(size)], shape)
        integer = rng.integers(-1, size + 1, shape).astype(np.float64)
        real = rng.uniform(-1.5, size + 0.5, shape)
        pick = rng.uniform(size=shape)
        return np.where(pick < fraction, edge, np.where(pick < 0.9, integer, real))

    dy = targets(g.height) - base_y
    dx = targets(g.width) - base_x
    return np.stack([dy, dx], axis=3).reshape(g.shapes["offset"]).astype(g.dtype)


def make(g, kind, rng):
    arrays = list(layer_arrays(g, rng))
    if kind == "border":
        arrays[1] = border_offsets(g, rng)
    elif kind == "zero":
        arrays[1] = np.zeros_like(arrays[1])
    return arrays


def torchvision_result(g, arrays, grad_out):
    """torchvision's forward and gradients in float64 on the CPU (``None`` for absent arguments)."""
    ts = [torch.from_numpy(a.astype(np.float64)).requires_grad_() if a is not None else None for a in arrays]
    out = torchvision.ops.deform_conv2d(*ts[:4], **conv_kwargs(g), mask=ts[4])
    out.backward(torch.from_numpy(grad_out.astype(np.float64)))
    grads = [t.grad.numpy() if t is not None else None for t in ts]
    return out.detach().numpy(), dn.DeformConv2dGrads(*grads)


def mismatches(ours, expected, dtype) -> int:
    """Elements further from torchvision than rtol x the tensor's largest magnitude."""
    ours = np.asarray(backend.to_host(ours), dtype=np.float64)
    assert ours.shape == expected.shape
    rtol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return int(np.count_nonzero(~(np.abs(ours - expected) <= rtol * scale)))


def test_border_offsets_hit_every_edge(rng):
    g = DIFF_CASES["tv-basic"]
    y, x = reference.sampling_positions(border_offsets(g, rng), (g.kernel_h, g.kernel_w), (1, 1), (1, 1), (1, 1))
    for value in (-1.0, -0.5, 0.0, g.height - 1.0, g.height - 0.5, float(g.height)):
        assert np.any(y == value), value
    for value in (-1.0, -0.5, 0.0, g.width - 1.0, g.width - 0.5, float(g.width)):
        assert np.any(x == value), value


@pytest.mark.parametrize("name, kind", PAIRS)
def test_every_method_matches_torchvision(name, kind, rng):
    g = DIFF_CASES[name]
    arrays = make(g, kind, rng)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    expected_out, expected = torchvision_result(g, arrays, grad_out)
    device = [backend.to_device(a) if a is not None else None for a in arrays]
    bad = {}
    for method in dn.METHODS:
        out = dn.deform_conv2d(*device[:4], **conv_kwargs(g), mask=device[4], method=method)
        bad[f"forward {method}"] = mismatches(out, expected_out, g.dtype)
    for method in dn.BACKWARD_METHODS:
        for deterministic in (False, True):
            grads = dn.deform_conv2d_backward(backend.to_device(grad_out), *device[:4], **conv_kwargs(g),
                                              mask=device[4], method=method, deterministic=deterministic)
            for field in grads._fields:
                if getattr(expected, field) is not None:
                    bad[f"backward {method} det={deterministic} {field}"] = mismatches(
                        getattr(grads, field), getattr(expected, field), g.dtype)
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("kind", ["border", "zero"])
def test_torch_layer_matches_torchvision(kind, rng):
    from deftnumba.torch import deform_conv2d

    g = DIFF_CASES["tv-basic"]
    arrays = make(g, kind, rng)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    expected_out, expected = torchvision_result(g, arrays, grad_out)
    device = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")
    ts = [torch.from_numpy(a).to(device).requires_grad_() if a is not None else None for a in arrays]
    out = deform_conv2d(*ts[:4], **conv_kwargs(g), mask=ts[4])
    out.backward(torch.from_numpy(grad_out).to(device))
    bad = {"output": mismatches(out.detach().cpu().numpy(), expected_out, g.dtype)}
    for field, t in zip(expected._fields, ts):
        if t is not None:
            bad[field] = mismatches(t.grad.cpu().numpy(), getattr(expected, field), g.dtype)
    assert not any(bad.values()), bad


@pytest.mark.parametrize("n, c_out", [(0, 3), (2, 0)])
def test_empty_tensors_like_torchvision(n, c_out):
    from deftnumba.torch import deform_conv2d

    device = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")
    results = []
    for fn, dev in ((torchvision.ops.deform_conv2d, torch.device("cpu")), (deform_conv2d, device)):
        gen = torch.Generator().manual_seed(0)
        ts = [torch.randn(*s, generator=gen, dtype=torch.float64).to(dev).requires_grad_()
              for s in ((n, 2, 4, 5), (n, 18, 4, 5), (c_out, 2, 3, 3), (c_out,), (n, 9, 4, 5))]
        out = fn(*ts[:4], padding=(1, 1), mask=ts[4])
        out.sum().backward()
        results.append([out.detach().cpu()] + [t.grad.cpu() for t in ts])
    for theirs, ours in zip(*results):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)


def test_nan_dx_offset_stays_finite(rng):
    """torchvision segfaulted on a NaN dx; we sample zero there (not run against torchvision)."""
    g = DIFF_CASES["tv-basic"]
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    offset[0, 1, 2, 3] = np.nan  # dx of tap 0 at output pixel (2, 3)
    offset[1, 3, 0, 0] = np.nan  # dx of tap 1 at output pixel (0, 0)
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    for method in dn.METHODS:
        out = backend.to_host(dn.deform_conv2d(*[backend.to_device(a) for a in (x, offset, weight, bias)],
                                               **conv_kwargs(g), mask=backend.to_device(mask), method=method))
        assert np.all(np.isfinite(out)), method
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    for method in dn.BACKWARD_METHODS:
        grads = dn.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv_kwargs(g), mask=mask,
                                          method=method)
        for field in grads._fields:
            assert np.all(np.isfinite(backend.to_host(getattr(grads, field)))), (method, field)
        assert backend.to_host(grads.offset)[0, 0:2, 2, 3].tolist() == [0.0, 0.0]
        assert backend.to_host(grads.mask)[0, 0, 2, 3] == 0.0


def test_nonfinite_grad_output_reaches_only_weighted_corners(rng):
    """An infinite or NaN ``grad_output`` element reaches the input corners of non-zero
    bilinear weight only, as in torchvision: a corner of weight 0 (clamped into the image at a
    border, or the far corner of a sample on an integer position) gets nothing, not
    ``gc * 0 = NaN``. Every backward method, atomic and deterministic, against torchvision's
    ``grad_input`` (its non-finite pattern exactly, its finite values to tolerance)."""
    g = DIFF_CASES["tv-basic"]
    arrays = make(g, "border", rng)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    grad_out[0, 1, 2, 3], grad_out[1, 0, 0, 0], grad_out[1, 3, 4, 5] = np.inf, -np.inf, np.nan
    _, expected = torchvision_result(g, arrays, grad_out)
    want = expected.input
    assert np.any(np.isfinite(want)) and not np.all(np.isfinite(want))
    device = [backend.to_device(a) if a is not None else None for a in arrays]
    for method in dn.BACKWARD_METHODS:
        for deterministic in (False, True):
            grads = dn.deform_conv2d_backward(backend.to_device(grad_out), *device[:4], **conv_kwargs(g),
                                              mask=device[4], method=method, deterministic=deterministic)
            got = np.asarray(backend.to_host(grads.input), dtype=np.float64)
            where = (method, deterministic)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaN pattern {where}")
            np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"+inf pattern {where}")
            np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"-inf pattern {where}")
            finite = np.isfinite(want)
            assert mismatches(np.where(finite, got, 0.0), np.where(finite, want, 0.0), g.dtype) == 0, where


@pytest.fixture(autouse=True)
def no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@GPU
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


@GPU
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
