"""The PyTorch layer: values, gradients, module behaviour, DDP, and a tiny model that trains.

Tensors live where the backend runs: on the CPU with the simulator, on CUDA with
the ``cuda`` backend (``DEFTNUMBA_BACKEND=cuda``), so the same tests run in both
places. Comparisons with ``torchvision.ops`` and the DLPack zero-copy checks need
a GPU and torchvision, and skip otherwise.
"""

import copy
import math
import socket

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.dcn import reference

from .cases import CASES, conv_kwargs, layer_arrays, tolerance

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from deftnumba.dcn import torch_reference  # noqa: E402
from deftnumba.dcn.torch import DeformConv2d, deform_conv2d  # noqa: E402

DEVICE = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")
GPU = pytest.mark.skipif(backend.IS_SIMULATOR or not torch.cuda.is_available(),
                         reason="needs a GPU and the cuda backend")

FORWARD_CASES = ["basic-3x3", "float64", "no-mask-no-bias", "stride-pad-dil-pairs", "groups-2",
                 "groups-and-offset-groups", "odd-everything"]
GRAD_CASES = ["basic-3x3", "no-mask-no-bias", "stride-pad-dil-pairs", "groups-and-offset-groups",
              "offset-groups-2"]


def tensors(arrays, dtype=None, requires_grad=False):
    """NumPy arrays -> tensors on DEVICE (None stays None)."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        t = torch.from_numpy(a.astype(dtype) if dtype else a).to(DEVICE)
        out.append(t.requires_grad_(requires_grad))
    return out


def rel(a, b) -> float:
    a = a.detach().cpu().double()
    b = b.detach().cpu().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def small_layer(n=2, c=4, c_out=3, h=5, w=6, seed=0, dtype=torch.float32):
    """A module and inputs (x, offset, mask) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = DeformConv2d(c, c_out, 3, padding=1).to(device=DEVICE, dtype=dtype)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(DEVICE)
    offset = (torch.randn(n, 18, h, w, generator=gen, dtype=dtype) * 1.5).to(DEVICE)
    mask = torch.rand(n, 9, h, w, generator=gen, dtype=dtype).to(DEVICE)
    return layer, x, offset, mask


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_matches_both_references(name, rng):
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    x, offset, weight, bias, mask = tensors(arrays)
    out = deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    assert out.shape == g.shapes["output"] and out.dtype == x.dtype and out.device == x.device
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    assert rel(out, torch.from_numpy(expected)) < tolerance(g.dtype)
    x64, o64, w64, b64, m64 = tensors(arrays, np.float64)
    via_torch = torch_reference.deform_conv2d(x64, o64, w64, b64, **conv_kwargs(g), mask=m64)
    assert rel(out, via_torch) < tolerance(g.dtype)


def test_module_forward_equals_functional(rng):
    layer, x, offset, mask = small_layer()
    out = layer(x, offset, mask)
    expected = reference.deform_conv2d(x.cpu().numpy(), offset.cpu().numpy(),
                                       layer.weight.detach().cpu().numpy(), layer.bias.detach().cpu().numpy(),
                                       padding=1, mask=mask.cpu().numpy())
    assert rel(out, torch.from_numpy(expected)) < 1e-5
    assert out.requires_grad and out.grad_fn is not None


def test_non_contiguous_inputs(rng):
    layer, x, offset, mask = small_layer()
    expected = layer(x, offset, mask)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    offset_nc = torch.cat([offset, offset], 1)[:, :18]  # a slice of a bigger tensor, like o[:, :18]
    assert not x_nc.is_contiguous() and not offset_nc.is_contiguous()
    out = layer(x_nc, offset_nc, mask)
    assert torch.equal(out, expected)


def test_errors_are_clear(rng):
    layer, x, offset, mask = small_layer()
    with pytest.raises(ValueError, match="offset"):
        layer(x, offset[:, :10], mask)
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double(), offset, mask)
    with pytest.raises(TypeError, match="offset must be a torch.Tensor"):
        layer(x, offset.cpu().numpy(), mask)
    with pytest.raises(ValueError, match="divisible by groups"):
        DeformConv2d(3, 4, 3, groups=2)


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the simulator's device rule")
def test_cuda_tensors_on_the_simulator_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make a CUDA tensor")
    layer, x, offset, mask = small_layer()
    with pytest.raises(RuntimeError, match="simulator backend"):
        deform_conv2d(x.cuda(), offset.cuda(), layer.weight.cuda())


@pytest.mark.skipif(backend.IS_SIMULATOR, reason="the cuda backend's device rule")
def test_cpu_tensors_on_the_cuda_backend_are_refused():
    layer, x, offset, mask = small_layer()
    with pytest.raises(RuntimeError, match="CPU tensors"):
        deform_conv2d(x.cpu(), offset.cpu(), layer.weight.detach().cpu())
    with pytest.raises(RuntimeError, match="one device"):
        deform_conv2d(x, offset.cpu(), layer.weight)


# --------------------------------------------------------------------------- module plumbing
def test_parameters_and_init_match_nn_conv2d():
    """Same names, shapes and (under one seed) values as nn.Conv2d, whose init torchvision's layer shares."""
    for kwargs in (dict(), dict(groups=2, bias=False), dict(kernel_size=(3, 2), stride=2, padding=(1, 0))):
        kernel = kwargs.pop("kernel_size", 3)
        torch.manual_seed(7)
        ours = DeformConv2d(4, 6, kernel, **kwargs)
        torch.manual_seed(7)
        conv = nn.Conv2d(4, 6, kernel, **kwargs)
        assert list(ours.state_dict()) == list(conv.state_dict())
        for key, value in conv.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    layer = DeformConv2d(8, 5, 3)
    bound = 1 / math.sqrt(8 * 9)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    assert layer.bias.abs().max() <= bound
    assert "8, 5, kernel_size=(3, 3)" in repr(layer)


def test_state_dict_round_trip_double_and_to(rng):
    layer, x, offset, mask = small_layer()
    clone = DeformConv2d(4, 3, 3, padding=1).to(DEVICE)
    assert not torch.equal(clone.weight, layer.weight)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x, offset, mask), layer(x, offset, mask))

    double = copy.deepcopy(layer).double()
    assert double.weight.dtype == torch.float64 and double.bias.dtype == torch.float64
    out64 = double(x.double(), offset.double(), mask.double())
    assert out64.dtype == torch.float64
    assert rel(out64, layer(x, offset, mask)) < 1e-5

    moved = copy.deepcopy(layer).to(torch.device("cpu")).to(DEVICE, torch.float64)
    assert moved.weight.device.type == DEVICE.type and moved.weight.dtype == torch.float64


def test_loads_a_torchvision_style_state_dict():
    """A state_dict with torchvision DeformConv2d's keys and shapes (saved and re-loaded from bytes)."""
    import io

    saved = {"weight": torch.randn(6, 2, 3, 3), "bias": torch.randn(6)}  # DeformConv2d(4, 6, 3, groups=2)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    layer = DeformConv2d(4, 6, 3, groups=2)
    layer.load_state_dict(torch.load(buffer))
    assert torch.equal(layer.weight, saved["weight"]) and torch.equal(layer.bias, saved["bias"])
    no_bias = DeformConv2d(4, 6, 3, groups=2, bias=False)
    with pytest.raises(RuntimeError, match="bias"):
        no_bias.load_state_dict(saved)


# --------------------------------------------------------------------------- gradients
NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.mark.parametrize("name", GRAD_CASES + ["float64"])
def test_gradients_match_float64_autograd_reference(name, rng):
    """Every gradient against autograd through the pure-torch DCN in float64."""
    g = CASES[name]
    arrays = layer_arrays(g, rng, offset_scale=1.0)
    grad_out = rng.standard_normal(g.shapes["output"])
    ours = tensors(arrays, requires_grad=True)
    out = deform_conv2d(*ours[:4], **conv_kwargs(g), mask=ours[4])
    out.backward(torch.from_numpy(grad_out.astype(g.dtype)).to(DEVICE))
    ref = tensors(arrays, np.float64, requires_grad=True)
    torch_reference.deform_conv2d(*ref[:4], **conv_kwargs(g), mask=ref[4]).backward(
        torch.from_numpy(grad_out).to(DEVICE))
    bound = 1e-4 if g.dtype == "float32" else 1e-10
    checked = 0
    for label, a, b in zip(NAMES, ours, ref):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, label
        assert float(b.grad.norm()) > 0, label
        assert rel(a.grad, b.grad) < bound, (label, rel(a.grad, b.grad))
        checked += 1
    assert checked == 3 + g.has_bias + g.has_mask


def test_gradcheck_tiny_float64(rng):
    g = CASES["basic-3x3"]
    gen = np.random.default_rng(3)
    shapes = dict(input=(1, 2, 3, 3), offset=(1, 8, 2, 2), weight=(2, 2, 2, 2), bias=(2,), mask=(1, 4, 2, 2))
    arrays = [gen.standard_normal(s) * (0.7 if k == "offset" else 1.0) for k, s in shapes.items()]
    arrays[4] = gen.uniform(0.1, 1.0, shapes["mask"])
    inputs = tuple(tensors(arrays, np.float64, requires_grad=True))
    assert g is not None
    # The default backward scatters with atomics: its sums may change order between two runs
    # (the simulator's threads interleave too), so reentrancy holds to rounding only; the
    # deterministic backward must be exactly reentrant.
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d(*t[:4], padding=0, mask=t[4]), inputs,
                                    eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d(*t[:4], padding=0, mask=t[4], deterministic=True),
                                    inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_only_needed_gradients_are_computed(monkeypatch):
    import deftnumba.dcn.ops as ops

    layer, x, offset, mask = small_layer()
    calls = []
    real = ops.deform_conv2d_backward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "deform_conv2d_backward", spy)
    # Only the parameters need gradients (inputs are data): the kernels run once.
    layer(x, offset, mask).sum().backward()
    assert len(calls) == 1 and x.grad is None and offset.grad is None
    assert layer.weight.grad is not None and layer.bias.grad is not None
    # Only the bias needs one: no kernel call at all; the bias gradient is a sum.
    layer.weight.requires_grad_(False)
    layer.bias.grad = None
    grad = torch.randn(2, 3, 5, 6, dtype=x.dtype).to(DEVICE)
    layer(x, offset, mask).backward(grad)
    assert len(calls) == 1
    assert torch.allclose(layer.bias.grad, grad.sum((0, 2, 3)))
    # Offsets and mask without grad (e.g. detached predictions) but input with: fine.
    x.requires_grad_(True)
    layer(x, offset, mask).sum().backward()
    assert len(calls) == 2 and x.grad is not None and offset.grad is None and mask.grad is None


def test_deterministic_flag_follows_torch(monkeypatch):
    import deftnumba.dcn.ops as ops

    seen = []
    real = ops.deform_conv2d_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "deform_conv2d_backward", spy)
    layer, x, offset, mask = small_layer(n=1, h=4, w=4)
    x.requires_grad_(True)
    layer(x, offset, mask).sum().backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        layer(x, offset, mask).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    layer.deterministic = True
    first = torch.autograd.grad(layer(x, offset, mask).sum(), x)[0]
    second = torch.autograd.grad(layer(x, offset, mask).sum(), x)[0]
    assert seen == [False, True, True, True]
    assert torch.equal(first, second)


def test_double_backward_is_refused():
    layer, x, offset, mask = small_layer(n=1, h=3, w=3, dtype=torch.float64)
    x.requires_grad_(True)
    out = layer(x, offset, mask)
    v = torch.ones_like(out, requires_grad=True)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --------------------------------------------------------------------------- DDP and training
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_world_size_1(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        layer, x, offset, mask = small_layer()
        plain = copy.deepcopy(layer)
        ddp = DistributedDataParallel(layer, device_ids=None if DEVICE.type == "cpu" else [DEVICE.index or 0])
        grad = torch.randn(2, 3, 5, 6).to(DEVICE)
        out = ddp(x, offset, mask)
        out.backward(grad)
        expected = plain(x, offset, mask)
        expected.backward(grad)
        assert torch.equal(out, expected)
        for (key, p), q in zip(ddp.module.named_parameters(), plain.parameters()):
            assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6), key
        before = ddp.module.weight.detach().clone()
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        assert not torch.equal(before, ddp.module.weight)
        assert list(ddp.module.state_dict()) == ["weight", "bias"]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="gloo on CPU tensors: the simulator backend")
def test_distributed_data_parallel_two_processes(tmp_path):
    """Two processes (gloo, CPU), each with half the batch: after one step the
    gradients and parameters equal one process's on the whole batch."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from . import ddp_worker

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    got = torch.load(result)

    model, x, target = ddp_worker.model_and_batch()
    ddp_worker.loss_fn(model(x), target).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for key, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][key], p.grad, rtol=1e-10, atol=1e-12, msg=key)
        torch.testing.assert_close(got["params"][key], p.detach(), rtol=1e-10, atol=1e-12, msg=key)
    assert any(key.startswith("dcn.") for key in got["grads"])


def test_tiny_model_trains():
    """A conv -> DCNv2 (offsets and mask from a zero-initialised conv) -> linear net learns a fixed batch."""
    from deftnumba.dcn.models import ModulatedDeformConv3x3

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ModulatedDeformConv3x3(4, 4, 1, DeformConv2d), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 6, 6, generator=gen).to(DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).to(DEVICE)
    predictor = model[2].offset_mask
    assert predictor.weight.abs().max() == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        assert predictor.weight.grad.abs().max() > 0  # gradients reach the offsets and the mask
        optimizer.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:3], losses[1:4])), losses
    assert predictor.weight.abs().max() > 0


# --------------------------------------------------------------------------- torchvision (where installed)
def torchvision_ops():
    return pytest.importorskip("torchvision.ops")


def test_init_and_state_dict_interchange_with_torchvision():
    tv = torchvision_ops()
    for kwargs in (dict(), dict(groups=2, bias=False, stride=2, dilation=(2, 1))):
        torch.manual_seed(5)
        theirs = tv.DeformConv2d(4, 6, 3, **kwargs)
        torch.manual_seed(5)
        ours = DeformConv2d(4, 6, 3, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        ours.reset_parameters()
        theirs.load_state_dict(ours.state_dict())
        ours.load_state_dict(theirs.state_dict())


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["basic-3x3", "stride-pad-dil-pairs", "groups-and-offset-groups", "kernel-2x3"])
def test_cuda_forward_and_backward_match_torchvision(name, dtype, rng):
    tv = torchvision_ops()
    g = CASES[name]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    arrays = layer_arrays(g, rng, offset_scale=1.0)
    grad_out = torch.from_numpy(rng.standard_normal(g.shapes["output"]).astype(np_dtype)).cuda()
    ours = tensors(arrays, np_dtype, requires_grad=True)
    theirs = tensors(arrays, np_dtype, requires_grad=True)
    out = deform_conv2d(*ours[:4], **conv_kwargs(g), mask=ours[4])
    expected = tv.deform_conv2d(*theirs[:4], **conv_kwargs(g), mask=theirs[4])
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel(out, expected) < bound
    out.backward(grad_out)
    expected.backward(grad_out)
    for label, a, b in zip(NAMES, ours, theirs):
        if a is not None:
            assert rel(a.grad, b.grad) < (1e-4 if dtype == torch.float32 else 1e-10), label


def pointer(array) -> int:
    """Device address of a CuPy array, host address of a NumPy array."""
    return array.data.ptr if backend.is_cupy_array(array) else array.ctypes.data


def test_zero_copy_both_ways(monkeypatch):
    """DLPack on CUDA (CuPy views of torch memory), NumPy views on the CPU: no copies."""
    import deftnumba.dcn.ops as ops
    from deftnumba.dcn.torch import _to_array

    layer, x, offset, mask = small_layer()
    for t in (x, offset, mask, layer.weight):
        assert pointer(_to_array(t)) == t.data_ptr()
        assert backend.is_cupy_array(_to_array(t)) == (DEVICE.type == "cuda")
    seen = {}
    real_fwd, real_bwd = ops.deform_conv2d, ops.deform_conv2d_backward

    def forward(*args, **kwargs):
        seen["inputs"] = [pointer(a) for a in args[:3]] + [pointer(kwargs["mask"])]
        out = real_fwd(*args, **kwargs)
        seen["out"] = pointer(out)
        return out

    def backward(*args, **kwargs):
        grads = real_bwd(*args, **kwargs)
        seen["grads"] = {"input": pointer(grads.input), "offset": pointer(grads.offset)}
        return grads

    monkeypatch.setattr(ops, "deform_conv2d", forward)
    monkeypatch.setattr(ops, "deform_conv2d_backward", backward)
    x.requires_grad_(True)
    offset.requires_grad_(True)
    produced = {}
    x.register_hook(lambda g: produced.update(input=g.data_ptr()))  # returns None: g unchanged
    offset.register_hook(lambda g: produced.update(offset=g.data_ptr()))
    out = layer(x, offset, mask)
    assert seen["inputs"] == [x.data_ptr(), offset.data_ptr(), layer.weight.data_ptr(), mask.data_ptr()]
    assert out.data_ptr() == seen["out"]
    out.sum().backward()
    assert produced == seen["grads"]


@GPU
def test_runs_on_torchs_current_stream():
    """On a side stream the result is right without any synchronisation by the caller."""
    layer, x, offset, mask = small_layer(n=4, c=4, h=33, w=35)
    expected = layer(x, offset, mask)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x2 = x * 1.0  # queued on the side stream, read by our kernels on the same stream
            out = layer(x2, offset, mask)
        done = out.sum()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)
    assert torch.isfinite(done)


@GPU
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    dtype = getattr(torch, dtype)
    layer, x, offset, mask = small_layer()
    expected = layer(x, offset, mask)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x, offset, mask)
    assert out.dtype == dtype  # half storage, float32 arithmetic (deftnumba.runtime.precision)
    assert rel(out.float(), expected) < 2e-2
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
