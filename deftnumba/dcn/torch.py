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
float16 and bfloat16 tensors run natively: the kernels read and write half precision and
compute in float32 (``deftnumba.runtime.precision``); bfloat16 travels as its bits
(no copy). Under autocast (``torch.autocast("cuda")`` or ``("cpu")``) the op runs in the
autocast dtype (float16 or bfloat16): its floating inputs other than float64 are cast to
it and the output has it (torchvision's op instead runs in float32 under autocast).

The layer is the registered ``torch.library`` op ``torch.ops.deftnumba.deform_conv2d``
with a fake (meta) kernel and registered autograd, so ``torch.fx`` tracing,
``torch.compile(fullgraph=True)``, ``torch.export``, TorchScript and
``torch.library.opcheck`` see it as one op (like ``torchvision::deform_conv2d``).
The backward is the op ``deftnumba::deform_conv2d_backward``; it is first-order
only (a double backward raises ``RuntimeError``), skips the bias gradient when
the bias needs none, and the whole kernel call when only the bias needs a
gradient. With ``deterministic=None`` (the default) it follows
``torch.are_deterministic_algorithms_enabled()``.

Empty batches, ``Cout = 0`` and ``C = 0`` give correctly shaped (empty or bias-only)
results and gradients without a kernel launch. Argument errors are
``DeformConvValueError``/``DeformConvTypeError``: ``ValueError``/``TypeError`` as
in ``deftnumba``, and ``RuntimeError`` as in torchvision (see ``DeformConvError``).
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..runtime import precision
from ..runtime.arguments import conv_out_size
from ..runtime.torch_bridge import check_device, on_device as _on_device, to_array as _to_array
from ..runtime.torch_bridge import to_tensor as _to_tensor
from . import ops
from .geometry import pair

__all__ = ["DeformConv2d", "deform_conv2d", "DeformConvError", "DeformConvValueError", "DeformConvTypeError"]


# --------------------------------------------------------------------------- tensors <-> arrays
# (shared by every system's torch layer: ``deftnumba.runtime.torch_bridge``)
def _check_tensors(named: dict) -> torch.device:
    """Every given tensor is a torch.Tensor on one device that the backend can run."""
    return check_device("deform_conv2d", named)


# --------------------------------------------------------------------------- errors
class DeformConvError(RuntimeError):
    """Base of every argument error the torch layer raises.

    torchvision's ``deform_conv2d`` raises ``RuntimeError`` for a bad shape;
    ``deftnumba`` raises ``ValueError`` (bad value or shape) and ``TypeError``
    (bad type or dtype) with messages that name the argument. The torch layer
    raises ``DeformConvValueError`` and ``DeformConvTypeError``, which are both
    at once: code that catches ``RuntimeError`` (written for torchvision),
    ``ValueError``/``TypeError`` (written for ``deftnumba``) or
    ``DeformConvError`` keeps working. Device mismatches stay plain
    ``RuntimeError``, as in torch.
    """


class DeformConvValueError(DeformConvError, ValueError):
    """A bad argument value or shape (a ``ValueError`` and a ``RuntimeError``)."""


class DeformConvTypeError(DeformConvError, TypeError):
    """A bad argument type or dtype (a ``TypeError`` and a ``RuntimeError``)."""


@contextlib.contextmanager
def _torch_errors():
    """Re-raise ``ValueError``/``TypeError`` from ``deftnumba`` as the layer's errors
    (same message), so they are ``RuntimeError``s too."""
    try:
        yield
    except DeformConvError:
        raise
    except ValueError as error:
        raise DeformConvValueError(str(error)).with_traceback(error.__traceback__) from None
    except TypeError as error:
        raise DeformConvTypeError(str(error)).with_traceback(error.__traceback__) from None


# --------------------------------------------------------------------------- the torch.library ops
# ``deftnumba::deform_conv2d`` and its backward ``deftnumba::deform_conv2d_backward``
# are registered custom ops: the dispatcher, autograd, fake tensors (shapes without
# data), torch.fx, torch.compile, torch.export and TorchScript all see one opaque op
# with a schema, as they see ``torchvision::deform_conv2d``.

@torch.library.custom_op("deftnumba::deform_conv2d", mutates_args=())
def _deform_conv2d_op(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], stride: List[int],
                      padding: List[int], dilation: List[int], method: str,
                      deterministic: Optional[bool]) -> torch.Tensor:
    """The forward on real tensors: check, view as arrays, run ``ops.deform_conv2d``.
    ``deterministic`` is only recorded for the backward."""
    device = _check_tensors(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    with _torch_errors(), _on_device(device), _bfloat16_bits(input):
        arrays = [_to_array(t) for t in (input, offset, weight, bias, mask)]
        out = ops.deform_conv2d(*arrays[:4], stride=tuple(stride), padding=tuple(padding),
                                dilation=tuple(dilation), mask=arrays[4], method=method)
        return _to_tensor(out, input.dtype)


def _bfloat16_bits(input: torch.Tensor):
    """A CUDA bfloat16 call passes uint16 CuPy views of the bits: say so to the checks."""
    if input.dtype == torch.bfloat16 and input.is_cuda:
        return precision.cupy_uint16_is_bfloat16()
    return contextlib.nullcontext()


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride, padding, dilation, method, deterministic):
    """Shape and dtype only (fake and meta tensors, symbolic sizes): ``[N, Cout, Ho, Wo]``."""
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise DeformConvValueError(
            f"input, offset and weight must be 4-D, got shapes {tuple(input.shape)}, "
            f"{tuple(offset.shape)}, {tuple(weight.shape)}")
    out_h = conv_out_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = conv_out_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    torch._check(out_h >= 1 and out_w >= 1,
                 lambda: f"deform_conv2d: the output would be empty ({out_h}x{out_w})")
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.custom_op("deftnumba::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor,
                               weight: torch.Tensor, mask: Optional[torch.Tensor], stride: List[int],
                               padding: List[int], dilation: List[int], method: str,
                               deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Gradients ``(input, offset, weight, mask)`` from ``ops.deform_conv2d_backward``;
    the mask gradient is an empty ``[0]`` tensor when ``mask`` is None. ``method``
    is used when it names a backward method, otherwise ``"auto"``."""
    device = _check_tensors(dict(grad_output=grad_output, input=input, offset=offset, weight=weight,
                                 mask=mask))
    method = method if method in ops.BACKWARD_METHODS else "auto"
    with _torch_errors(), _on_device(device), _bfloat16_bits(input):
        g, x, o, w, m = (_to_array(t) for t in (grad_output, input, offset, weight, mask))
        result = ops.deform_conv2d_backward(g, x, o, w, None, stride=tuple(stride), padding=tuple(padding),
                                            dilation=tuple(dilation), mask=m, method=method,
                                            deterministic=bool(deterministic))
        dtype = input.dtype
        grad_mask = _to_tensor(result.mask, dtype) if mask is not None else input.new_empty(0)
        return (_to_tensor(result.input, dtype), _to_tensor(result.offset, dtype), _to_tensor(result.weight, dtype),
                grad_mask)


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, mask, stride, padding, dilation,
                                 method, deterministic):
    grad_mask = mask.new_empty(mask.shape) if mask is not None else input.new_empty(0)
    return input.new_empty(input.shape), offset.new_empty(offset.shape), weight.new_empty(weight.shape), grad_mask


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation, method, deterministic = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation)
    ctx.method = method
    ctx.deterministic = deterministic


def _backward(ctx, grad_output):
    """First-order gradients. The bias gradient is a sum in torch; the kernels run
    only when one of input, offset, weight or mask needs a gradient."""
    input, offset, weight, mask = ctx.saved_tensors
    need_input, need_offset, need_weight, need_bias, need_mask = ctx.needs_input_grad[:5]
    grads = [None] * 5
    if need_bias:
        grads[3] = grad_output.sum(dim=(0, 2, 3))
    if need_input or need_offset or need_weight or (need_mask and mask is not None):
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        stride, padding, dilation = ctx.conv
        grad_input, grad_offset, grad_weight, grad_mask = torch.ops.deftnumba.deform_conv2d_backward(
            grad_output, input, offset, weight, mask, stride, padding, dilation, ctx.method,
            bool(deterministic))
        grads[0] = grad_input if need_input else None
        grads[1] = grad_offset if need_offset else None
        grads[2] = grad_weight if need_weight else None
        grads[4] = grad_mask if need_mask and mask is not None else None
    return (*grads, None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "deftnumba's deform_conv2d has first-order gradients only: double backward (a gradient of "
        "its gradient, e.g. create_graph=True followed by another backward) is not supported, "
        "as in torchvision")


torch.library.register_autograd("deftnumba::deform_conv2d", _backward, setup_context=_setup_context)
torch.library.register_autograd("deftnumba::deform_conv2d_backward", _no_double_backward)


def _autocast_kernel(device_type: str):
    """The op's autocast rule for ``device_type``: run in the autocast dtype of the moment
    (``torch.get_autocast_dtype``: float16 or bfloat16). Floating tensors on that device other
    than float64 are cast to it, then the op runs with autocast off, so the kernels read and
    write half precision and accumulate in float32. (``torch.library.register_autocast``
    fixes one dtype at registration; AMP users pick theirs per region.)"""

    def cast(value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device_type:
            return value.to(dtype)
        return value

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return torch.ops.deftnumba.deform_conv2d.default(*(cast(a, dtype) for a in args))

    return kernel


_AUTOCAST = torch.library.Library("deftnumba", "IMPL")  # kept alive: the registrations live with it
for _device_type, _key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
    _AUTOCAST.impl("deform_conv2d", _autocast_kernel(_device_type), _key, with_keyset=True)


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: Tuple[int, int] = (1, 1),
                  padding: Tuple[int, int] = (0, 0), dilation: Tuple[int, int] = (1, 1),
                  mask: Optional[torch.Tensor] = None, method: str = "auto",
                  deterministic: Optional[bool] = None) -> torch.Tensor:
    """Deformable convolution (DCN v1, or v2 with ``mask``), differentiable.

    The arguments, shapes and semantics are ``torchvision.ops.deform_conv2d``'s:

    input:    ``[N, C, H, W]``
    offset:   ``[N, 2*offset_groups*kh*kw, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    weight:   ``[Cout, C/groups, kh, kw]``
    bias:     ``[Cout]`` or ``None``
    stride, padding, dilation: int or pair
    mask:     ``[N, offset_groups*kh*kw, Ho, Wo]`` or ``None``

    float32, float64, float16 or bfloat16 (one dtype; the halves computed in float32), all on
    one device: CUDA tensors with the ``cuda`` backend
    (zero-copy, torch's current stream), CPU tensors with the ``simulator``
    backend. Returns ``[N, Cout, Ho, Wo]``. Empty batches and ``Cout = 0`` give
    empty results, as in torchvision.

    Extras after torchvision's eight arguments: ``method`` (``"auto"`` or one of
    ``deftnumba.METHODS``; the backward uses the same name when it is one of
    ``deftnumba.BACKWARD_METHODS``, otherwise its own ``"auto"``) and
    ``deterministic`` (``None`` follows ``torch.are_deterministic_algorithms_enabled()``;
    ``True`` asks for a backward without floating-point atomics).

    It calls the registered op ``torch.ops.deftnumba.deform_conv2d``, so it works
    under ``torch.fx`` tracing, ``torch.compile(fullgraph=True)``, ``torch.export``
    and TorchScript (pass pairs there). First-order gradients only: a double
    backward raises ``RuntimeError``. Argument errors are ``DeformConvValueError``
    / ``DeformConvTypeError``: ``ValueError``/``TypeError`` and ``RuntimeError`` at once.
    """
    if not torch.jit.is_scripting():
        with _torch_errors():
            named = dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
            for name, value in named.items():
                if value is not None and not isinstance(value, (torch.Tensor, torch.fx.Proxy)):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    return torch.ops.deftnumba.deform_conv2d(input, offset, weight, bias, mask, [stride[0], stride[1]],
                                             [padding[0], padding[1]], [dilation[0], dilation[1]],
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
            raise DeformConvValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise DeformConvValueError("out_channels must be divisible by groups")
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

    def forward(self, input: torch.Tensor, offset: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input [N, C, H, W]``, ``offset [N, 2*G*kh*kw, Ho, Wo]``, ``mask [N, G*kh*kw, Ho, Wo]``."""
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask, self.method, self.deterministic)

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
