"""PyTorch layer: ``TuckerConv2d``, a convolution stored as three Tucker factors.

>>> import torch
>>> from deftnumba.tucker.torch import TuckerConv2d
>>> dense = torch.nn.Conv2d(16, 32, 3, padding=1)
>>> layer = TuckerConv2d.from_conv(dense, ranks=(8, 6))     # HOSVD of dense.weight
>>> y = layer(torch.randn(2, 16, 9, 9))                      # [2, 32, 9, 9]
>>> y.sum().backward()                                       # grads for x, first, core, last, bias

Parameters (as convolution weights, so ``state_dict`` names say what they are):
``first [r_in, C, 1, 1]``, ``core [r_out, r_in/groups, kh, kw]``,
``last [Cout, r_out, 1, 1]``, ``bias [Cout]``.

**Forward**: ``method`` ``"auto"`` or one of ``tucker.METHODS`` runs our kernels
(``deftnumba.tucker.tucker_conv2d``): CUDA tensors with the ``cuda`` backend
(through DLPack, on torch's current stream), CPU tensors with the ``simulator``
backend (slow, exact; for tests). ``method="torch"`` runs the three convolutions
with ``torch.nn.functional.conv2d`` on any device (what ADMM training on the CPU uses).

**Backward**: always through three torch convolutions. The forward's three
convolutions are recomputed under autograd (``torch.nn.functional.conv2d``) and
differentiated; the intermediates are not kept from the kernel forward (the
fused kernel never materialises them). So the backward costs one extra forward
of the three small convolutions plus their gradients, in cuDNN on a GPU. Our
kernels have no backward of their own yet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.torch_bridge import check_device, on_device, to_array, to_tensor
from . import ops
from .decompose import decompose

__all__ = ["TuckerConv2d", "tucker_conv2d", "TuckerConv2dFunction"]

KERNEL_METHODS = ops.METHODS + ("auto",)


def _three_convs(input, first, core, last, bias, stride, padding, dilation, groups):
    hidden = F.conv2d(input, first)
    hidden = F.conv2d(hidden, core, None, stride, padding, dilation, groups)
    return F.conv2d(hidden, last, bias)


def _check_device(tensors: dict) -> torch.device:
    return check_device("tucker_conv2d", tensors, fix=", or use method='torch'")


class TuckerConv2dFunction(torch.autograd.Function):
    """Forward through our kernels, backward through three torch convolutions (recomputed)."""

    @staticmethod
    def forward(ctx, input, first, core, last, bias, stride, padding, dilation, groups, method):
        device = _check_device(dict(input=input, first=first, core=core, last=last, bias=bias))
        with on_device(device):
            arrays = [to_array(t) for t in (input, first, core, last, bias)]
            out = ops.tucker_conv2d(*arrays, stride=stride, padding=padding, dilation=dilation,
                                    groups=groups, method=method)
            result = to_tensor(out)
        ctx.save_for_backward(input, first, core, last, bias)
        ctx.conv = (stride, padding, dilation, groups)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(saved, needs)]
            out = _three_convs(*leaves, *ctx.conv)
            wanted = [t for t, need in zip(leaves, needs) if t is not None and need]
            grads = iter(torch.autograd.grad(out, wanted, grad_output) if wanted else ())
        result = [next(grads) if (t is not None and need) else None for t, need in zip(leaves, needs)]
        return (*result, None, None, None, None, None)


def tucker_conv2d(input, first, core, last, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  *, method: str = "auto"):
    """Differentiable Tucker-format convolution (see ``deftnumba.tucker.tucker_conv2d``);
    ``method="torch"`` runs three ``torch.nn.functional.conv2d`` calls instead of our kernels."""
    if method == "torch":
        return _three_convs(input, first, core, last, bias, stride, padding, dilation, groups)
    if method not in KERNEL_METHODS:
        raise ValueError(f"method must be 'torch' or one of {KERNEL_METHODS}, got {method!r}")
    return TuckerConv2dFunction.apply(input, first, core, last, bias, stride, padding, dilation, groups, method)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class TuckerConv2d(nn.Module):
    """A ``Conv2d`` whose weight is kept as Tucker-2 factors ``(first, core, last)``.

    ``ranks = (r_out, r_in)``. Initialised as the HOSVD of a dense weight drawn
    like ``nn.Conv2d``'s (so it starts as the best rank-limited approximation of
    a standard initialisation). ``from_conv`` converts a trained ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, ranks, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, method: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        r_out, r_in = (int(r) for r in ranks)
        if r_in % groups or r_out % groups:
            raise ValueError(f"groups ({groups}) must divide both ranks {(r_out, r_in)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.ranks = (r_out, r_in)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        self.method = method
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())
        self.first = nn.Parameter(torch.empty(r_in, in_channels, 1, 1, **factory))
        self.core = nn.Parameter(torch.empty(r_out, r_in // groups, kh, kw, **factory))
        self.last = nn.Parameter(torch.empty(out_channels, r_out, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dense = torch.empty(self.out_channels, self.in_channels, *self.kernel_size)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        if self.groups == 1:
            self._load_factors(decompose(dense.double().numpy(), self.ranks))
        else:  # grouped core: a random start with the dense layer's fan-in scale
            for p in (self.first, self.core, self.last):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_factors(self, factors) -> None:
        with torch.no_grad():
            for name in ("first", "core", "last"):
                param = getattr(self, name)
                param.copy_(torch.as_tensor(getattr(factors, name)).to(param.dtype))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks, method: str = "auto", decomposition: str = "hosvd") -> "TuckerConv2d":
        """A ``TuckerConv2d`` whose factors are the Tucker-2 decomposition of ``conv.weight``
        (``decomposition``: ``"hosvd"`` or ``"hooi"``); the bias is copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"from_conv supports groups=1 convolutions, got groups={conv.groups}")
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("from_conv needs numeric zero padding (not 'same'/'valid' or another padding_mode)")
        w = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, ranks, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, method, device=w.device, dtype=w.dtype)
        layer._load_factors(decompose(w.double().cpu().numpy(), ranks, decomposition))
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias.detach())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[Cout, C, kh, kw]`` the factors represent (a grouped core as block-diagonal)."""
        core = _dense_core_torch(self.core, self.groups) if self.groups > 1 else self.core
        return torch.einsum("oa,abhw,bc->ochw", self.last[:, :, 0, 0], core, self.first[:, :, 0, 0])

    def forward(self, input):
        return tucker_conv2d(input, self.first, self.core, self.last, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, method=self.method)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, method={self.method!r}")


def _dense_core_torch(core, groups):
    r_out, rpg, kh, kw = core.shape
    dense = core.new_zeros(r_out, rpg * groups, kh, kw)
    opg = r_out // groups
    for g in range(groups):
        dense[g * opg:(g + 1) * opg, g * rpg:(g + 1) * rpg] = core[g * opg:(g + 1) * opg]
    return dense
