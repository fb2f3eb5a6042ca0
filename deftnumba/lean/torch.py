"""PyTorch layer for the lean convolution: ``LeanConv2d`` (autograd) and the functions under it.

>>> import torch
>>> from deftnumba.lean.torch import LeanConv2d
>>> layer = LeanConv2d(8, pattern="star5")                 # pointwise [8, 8], stencil [8, 5], bias [8]
>>> y = layer(torch.randn(2, 8, 9, 9))                     # [2, 8, 9, 9]
>>> y.sum().backward()

Two implementations of the same operator (``impl=``):

* ``"deftnumba"`` runs ``deftnumba.lean.lean_conv2d`` / ``lean_conv2d_backward`` (the
  fused kernels). CUDA tensors need the ``cuda`` backend (zero-copy through DLPack,
  on torch's current stream); CPU tensors need the ``simulator`` backend (exact,
  Python-thread speed: tests and tiny models). Any other pairing is an error.
* ``"torch"`` composes it from torch ops (a 1x1 ``conv2d`` plus a grouped 3x3
  ``conv2d`` whose kernel is the stencil placed on its taps): any device, fast on a
  CPU. The training study uses it; tests check that both agree.

This module imports torch; ``import deftnumba.lean`` does not.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..runtime.torch_bridge import check_device, on_device, to_array, to_tensor
from . import ops
from .geometry import pattern_taps

__all__ = ["LeanConv2d", "lean_conv2d", "lean_conv2d_torch", "LeanConv2dFunction"]


class LeanConv2dFunction(torch.autograd.Function):
    """Autograd for ``deftnumba.lean.lean_conv2d`` (first-order; deterministic backward)."""

    @staticmethod
    def forward(ctx, input, pointwise, stencil, bias, stride, pattern, method):
        device = check_device("lean_conv2d", dict(input=input, pointwise=pointwise, stencil=stencil, bias=bias),
                              fix=", or use impl='torch'")
        ctx.stride, ctx.pattern, ctx.method = stride, pattern, method
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, pointwise, stencil, *( (bias,) if bias is not None else ()))
        with on_device(device):
            out = ops.lean_conv2d(to_array(input), to_array(pointwise), to_array(stencil), to_array(bias),
                                  stride, pattern=pattern, method=method)
        return to_tensor(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, pointwise, stencil, *rest = ctx.saved_tensors
        bias = rest[0] if rest else None
        with on_device(check_device("lean_conv2d", dict(grad_output=grad_output, input=input))):
            grads = ops.lean_conv2d_backward(
                to_array(grad_output), to_array(input), to_array(pointwise), to_array(stencil),
                to_array(bias), ctx.stride, pattern=ctx.pattern, method=ctx.method)
        wanted = ctx.needs_input_grad
        out = [to_tensor(g) if (g is not None and wanted[i]) else None
               for i, g in enumerate(grads)]
        return (*out, None, None, None)


def lean_conv2d(input, pointwise, stencil, bias=None, stride=1, *, pattern="star5", method="auto"):
    """``deftnumba.lean.lean_conv2d`` on tensors, with autograd (the fused kernels)."""
    return LeanConv2dFunction.apply(input, pointwise, stencil, bias, stride, pattern, method)


def _stencil_kernel(stencil: torch.Tensor, taps) -> torch.Tensor:
    """The stencil placed on a 3x3 footprint: a depthwise weight ``[C, 1, 3, 3]`` (differentiable)."""
    onehot = torch.zeros(len(taps), 9, dtype=stencil.dtype, device=stencil.device)
    for t, (dy, dx) in enumerate(taps):
        onehot[t, (1 + dy) * 3 + (1 + dx)] = 1
    return (stencil @ onehot).reshape(-1, 1, 3, 3)


def lean_conv2d_torch(input, pointwise, stencil, bias=None, stride=1, *, pattern="star5"):
    """The lean operator from torch ops: ``conv1x1 + depthwise 3x3 (stencil taps only) + bias``."""
    taps = pattern_taps(pattern)
    c = input.shape[1]
    pointwise = pointwise.reshape(c, c, 1, 1)
    return (nn.functional.conv2d(input, pointwise, bias, stride)
            + nn.functional.conv2d(input, _stencil_kernel(stencil, taps), None, stride, 1, 1, c))


class LeanConv2d(nn.Module):
    """A lean convolution layer: ``channels -> channels``, the pointwise 1x1 plus a sparse stencil.

    Parameters: ``pointwise [C, C]``, ``stencil [C, S]`` (S taps of ``pattern``), ``bias [C]``
    (when ``bias=True``), uniform in ``+-1/sqrt(C + S)`` (an output sums C + S products).
    ``impl``: ``"deftnumba"`` (the kernels) or ``"torch"`` (torch ops); see the module docstring.
    """

    def __init__(self, channels: int, pattern="star5", stride=1, bias: bool = True, *, impl: str = "deftnumba",
                 method: str = "auto"):
        super().__init__()
        if impl not in ("deftnumba", "torch"):
            raise ValueError(f"impl must be 'deftnumba' or 'torch', got {impl!r}")
        self.taps = pattern_taps(pattern)
        self.pattern = pattern
        self.channels, self.stride, self.impl, self.method = int(channels), stride, impl, method
        self.pointwise = nn.Parameter(torch.empty(channels, channels))
        self.stencil = nn.Parameter(torch.empty(channels, len(self.taps)))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.channels + len(self.taps))
        for p in (self.pointwise, self.stencil, self.bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)

    def forward(self, x):
        if self.impl == "torch":
            return lean_conv2d_torch(x, self.pointwise, self.stencil, self.bias, self.stride, pattern=self.taps)
        return lean_conv2d(x, self.pointwise, self.stencil, self.bias, self.stride, pattern=self.taps,
                           method=self.method)

    def flops(self, height: int, width: int) -> int:
        """Multiply-add FLOPs per image (2 per product): the pointwise and the stencil."""
        out = ((height - 1) // _pair(self.stride)[0] + 1) * ((width - 1) // _pair(self.stride)[1] + 1)
        return 2 * out * self.channels * (self.channels + len(self.taps))

    def extra_repr(self) -> str:
        return (f"{self.channels}, pattern={self.pattern!r}, stride={self.stride}, bias={self.bias is not None}, "
                f"impl={self.impl!r}")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
