"""PyTorch layer: ``deform_conv2d`` (autograd) and ``DeformConv2d`` (a module).

A drop-in for ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.DeformConv2d``:
same arguments, same offset layout, same parameter names, shapes and
initialisation, so a ``state_dict`` saved from one loads into the other.

>>> import torch
>>> from deftnumba.torch import DeformConv2d
>>> layer = DeformConv2d(4, 8, kernel_size=3, padding=1)        # weight [8, 4, 3, 3], bias [8]
>>> x = torch.randn(2, 4, 9, 9)
>>> offset = torch.randn(2, 2 * 3 * 3, 9, 9)                    # (dy, dx) per tap
>>> mask = torch.rand(2, 3 * 3, 9, 9)                           # DCNv2; omit for DCNv1
>>> y = layer(x, offset, mask)                                  # [2, 8, 9, 9]
>>> y.sum().backward()                                          # grads for x, offset, mask, weight, bias

This module is optional: ``import deftnumba`` never imports torch.

Where the tensors live decides what runs, and it must agree with the backend
``deftnumba`` chose at import (``deftnumba.backend``):

* **CUDA tensors, ``cuda`` backend.** The tensors are handed to the kernels
  through DLPack without a copy (``cupy.from_dlpack``), the results come back
  the same way (``torch.from_dlpack``), and every kernel and CuPy call runs on
  torch's current stream on the tensors' device, so the layer orders correctly
  with the surrounding torch work, without synchronising.
* **CPU tensors, ``simulator`` backend.** The same kernels run in Numba's CUDA
  simulator on ``tensor.detach().numpy()`` views; results are wrapped with
  ``torch.from_numpy`` (no copy either way for contiguous tensors). Exact but
  slow: for tests and tiny models.
* **Any other pairing is an error**, never a silent copy. A CUDA tensor on the
  simulator would be copied to the host and run at Python-thread speed; a CPU
  tensor on the ``cuda`` backend would cross PCIe twice per call, in every layer,
  while the rest of a CPU model stays on the CPU. Both are almost always a
  mistake (a model left on the wrong device, or the wrong ``DEFTNUMBA_BACKEND``),
  and torch itself refuses mixed devices rather than copying, so we do the same,
  with a message that says how to fix it.

Non-contiguous tensors are made contiguous first (one copy), as torchvision does.
Under CUDA autocast (AMP) the layer runs in float32, as torchvision's does: its
inputs are cast to float32 and the output is float32.
The backward is first-order only (``once_differentiable``); it skips the bias
gradient when the bias needs none, and the whole kernel call when only the bias
needs a gradient. With ``deterministic=None`` (the default) it follows
``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..runtime import backend
from . import ops
from .geometry import pair

__all__ = ["DeformConv2d", "deform_conv2d", "DeformConv2dFunction"]


# --------------------------------------------------------------------------- tensors <-> arrays
def _check_tensors(named: dict) -> torch.device:
    """Every given tensor is a torch.Tensor on one device that the backend can run."""
    given = {k: v for k, v in named.items() if v is not None}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    devices = {k: str(v.device) for k, v in given.items()}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"deform_conv2d: all tensors must be on one device, got {devices}")
    device = given["input"].device
    if device.type == "cuda" and backend.IS_SIMULATOR:
        raise RuntimeError(
            f"deform_conv2d got CUDA tensors, but deftnumba runs on the simulator backend "
            f"({backend.REASON}). Set DEFTNUMBA_BACKEND=cuda (with CuPy installed) before "
            f"importing deftnumba, or move the tensors to the CPU."
        )
    if device.type == "cpu" and not backend.IS_SIMULATOR:
        raise RuntimeError(
            "deform_conv2d got CPU tensors, but deftnumba runs on the cuda backend. Move the "
            "model and tensors to the GPU (.cuda()), or set DEFTNUMBA_BACKEND=simulator before "
            "importing deftnumba to run the kernels on the CPU (slow, for testing)."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"deform_conv2d supports CPU and CUDA tensors, got device {device}")
    return device


def _to_array(tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of ``tensor``'s data; a copy only if not contiguous."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.is_cuda:
        return backend.cupy().from_dlpack(tensor)
    return tensor.numpy()


def _to_tensor(array):
    """Wrap a kernel result as a tensor without copying."""
    if array is None:
        return None
    if backend.is_cupy_array(array):
        return torch.from_dlpack(array)
    return torch.from_numpy(array)


@contextlib.contextmanager
def _on_device(device: torch.device):
    """On CUDA: make the tensors' device current for CuPy and Numba, and run on torch's stream."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with backend.cupy().cuda.Device(index), backend.cuda.gpus[index], backend.external_stream(stream):
        yield


# --------------------------------------------------------------------------- autograd
if hasattr(torch.amp, "custom_fwd"):  # torch >= 2.4
    _autocast_to_float32 = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    _autocast_backward = torch.amp.custom_bwd(device_type="cuda")
else:  # pragma: no cover - older torch
    _autocast_to_float32 = torch.cuda.amp.custom_fwd(cast_inputs=torch.float32)
    _autocast_backward = torch.cuda.amp.custom_bwd


class DeformConv2dFunction(torch.autograd.Function):
    """Autograd glue around ``deftnumba.deform_conv2d`` and ``deftnumba.deform_conv2d_backward``.

    ``apply(input, offset, weight, bias, mask, stride, padding, dilation, method, deterministic)``;
    use ``deform_conv2d`` rather than calling this directly.
    """

    @staticmethod
    @_autocast_to_float32
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation, method, deterministic):
        device = _check_tensors(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
        with _on_device(device):
            arrays = [_to_array(t) for t in (input, offset, weight, bias, mask)]
            out = ops.deform_conv2d(*arrays[:4], stride=stride, padding=padding, dilation=dilation,
                                    mask=arrays[4], method=method)
            result = _to_tensor(out)
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.has_bias = bias is not None
        ctx.conv = (stride, padding, dilation)
        ctx.method = method
        ctx.deterministic = deterministic
        return result

    @staticmethod
    @once_differentiable
    @_autocast_backward
    def backward(ctx, grad_output):
        input, offset, weight, mask = ctx.saved_tensors
        need_input, need_offset, need_weight, need_bias, need_mask = ctx.needs_input_grad[:5]
        grads = [None] * 5
        if need_bias:  # cheap in torch; never ask the kernels for it
            grads[3] = grad_output.sum(dim=(0, 2, 3))
        if need_input or need_offset or need_weight or need_mask:
            backward = getattr(ops, "deform_conv2d_backward", None)
            if backward is None:  # pragma: no cover - only before the backward lands
                raise NotImplementedError("this deftnumba has no deform_conv2d_backward")
            deterministic = ctx.deterministic
            if deterministic is None:
                deterministic = torch.are_deterministic_algorithms_enabled()
            stride, padding, dilation = ctx.conv
            method = ctx.method if ctx.method in getattr(ops, "BACKWARD_METHODS", ()) else "auto"
            with _on_device(grad_output.device):
                g, x, o, w, m = (_to_array(t) for t in (grad_output, input, offset, weight, mask))
                result = backward(g, x, o, w, None, stride=stride, padding=padding, dilation=dilation,
                                  mask=m, method=method, deterministic=bool(deterministic))
                for i, (name, needed) in enumerate((("input", need_input), ("offset", need_offset),
                                                    ("weight", need_weight))):
                    if needed:
                        grads[i] = _to_tensor(getattr(result, name))
                if need_mask and mask is not None:
                    grads[4] = _to_tensor(result.mask)
        return (*grads, None, None, None, None, None)


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                  mask=None, *, method: str = "auto", deterministic: bool | None = None):
    """Deformable convolution (DCN v1, or v2 with ``mask``), differentiable.

    The arguments, shapes and semantics are ``torchvision.ops.deform_conv2d``'s:

    input:    ``[N, C, H, W]``
    offset:   ``[N, 2*offset_groups*kh*kw, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    weight:   ``[Cout, C/groups, kh, kw]``
    bias:     ``[Cout]`` or ``None``
    stride, padding, dilation: int or pair
    mask:     ``[N, offset_groups*kh*kw, Ho, Wo]`` or ``None``

    float32 or float64, all on one device: CUDA tensors with the ``cuda`` backend
    (zero-copy, torch's current stream), CPU tensors with the ``simulator``
    backend. Returns ``[N, Cout, Ho, Wo]``.

    Keyword-only extras: ``method`` (``"auto"`` or one of ``deftnumba.METHODS``;
    the backward uses the same name when it is one of ``deftnumba.BACKWARD_METHODS``,
    otherwise its own ``"auto"``) and ``deterministic`` (``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``; ``True`` asks for a backward
    without floating-point atomics).
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    return DeformConv2dFunction.apply(input, offset, weight, bias, mask, stride, padding, dilation,
                                      method, deterministic)


# --------------------------------------------------------------------------- module
class DeformConv2d(nn.Module):
    """A drop-in for ``torchvision.ops.DeformConv2d`` on deftnumba's kernels.

    Same constructor, parameters (``weight`` ``[out_channels, in_channels/groups,
    kh, kw]``, ``bias`` ``[out_channels]`` or none), initialisation and
    ``forward(input, offset, mask=None)``. The number of offset groups is read
    from ``offset.shape[1]``, as in torchvision.

    ``method`` and ``deterministic`` are keyword-only extras (see
    ``deftnumba.torch.deform_conv2d``); they are attributes, not state, so
    ``state_dict`` keys are torchvision's: ``weight`` and ``bias``.

    Usage::

        import torch
        from deftnumba.torch import DeformConv2d

        layer = DeformConv2d(64, 64, kernel_size=3, padding=1).cuda()
        predictor = torch.nn.Conv2d(64, 3 * 9, 3, padding=1).cuda()   # offsets + mask
        o = predictor(x)
        y = layer(x, o[:, :18], torch.sigmoid(o[:, 18:]))

        layer.load_state_dict(torchvision_layer.state_dict())     # and the other way round

    It is an ordinary module: ``.to()``, ``.double()``, ``state_dict``,
    ``DistributedDataParallel`` all work. Tensors must be on the device the
    backend serves: CUDA with the ``cuda`` backend, CPU with the ``simulator``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, method: str = "auto",
                 deterministic: bool | None = None):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.method = method
        self.deterministic = deterministic
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The usual conv initialisation (as ``nn.Conv2d`` and torchvision's layer).

        The weight is uniform in ``±1/sqrt(fan_in)`` (``kaiming_uniform_`` with
        ``a=sqrt(5)``), then the bias uniform in ``±1/sqrt(fan_in)``, where
        ``fan_in = in_channels/groups * kh * kw``. Drawn in that order, so under
        one seed the values equal ``nn.Conv2d``'s and torchvision's.
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None):
        """``input [N, C, H, W]``, ``offset [N, 2*G*kh*kw, Ho, Wo]``, ``mask [N, G*kh*kw, Ho, Wo]``."""
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask,
                             method=self.method, deterministic=self.deterministic)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
