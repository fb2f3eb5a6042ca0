"""Argument checking for ``tucker_conv2d``: the layer's ``TuckerGeometry``.

A Tucker-format convolution replaces one ``conv2d`` weight ``W [Cout, C, kh, kw]``
by three factors, each itself a convolution weight::

    first  [r_in, C, 1, 1]            1x1 conv  C     -> r_in    (no stride, no padding)
    core   [r_out, r_in/groups, kh, kw] conv    r_in  -> r_out   (the layer's stride,
                                                                  padding, dilation, groups)
    last   [Cout, r_out, 1, 1]        1x1 conv  r_out -> Cout    (+ bias)

``check_tucker`` validates the arrays and hyper-parameters and returns the
frozen geometry that kernels, the performance model, the roofline counts and the
benchmark share. Errors name the argument and the shape it should have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.arguments import (FLOAT_DTYPES, ConvWindow, INT32_MAX, check_array,  # noqa: F401
                                  check_output_not_empty, check_same_kind_and_dtype, conv_out_size,
                                  conv_pairs, pair)


@dataclass(frozen=True)
class TuckerGeometry(ConvWindow):
    """Shapes and hyper-parameters of one Tucker-format layer (all plain ints); ``out_h``,
    ``out_w``, ``taps`` and ``itemsize`` come from ``runtime.arguments.ConvWindow``."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    rank_in: int
    rank_out: int
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    dil_h: int = 1
    dil_w: int = 1
    groups: int = 1
    has_bias: bool = False
    dtype: str = "float32"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every argument, of the two intermediates and of the output."""
        n = self.batch
        return {
            "input": (n, self.in_channels, self.height, self.width),
            "first": (self.rank_in, self.in_channels, 1, 1),
            "core": (self.rank_out, self.rank_in // self.groups, self.kernel_h, self.kernel_w),
            "last": (self.out_channels, self.rank_out, 1, 1),
            "bias": (self.out_channels,),
            "hidden_in": (n, self.rank_in, self.height, self.width),
            "hidden_out": (n, self.rank_out, self.out_h, self.out_w),
            "output": (n, self.out_channels, self.out_h, self.out_w),
        }

    def with_batch(self, batch: int) -> "TuckerGeometry":
        from dataclasses import replace

        return replace(self, batch=int(batch))


def check_tucker(input, first, core, last, bias=None, stride=1, padding=0, dilation=1,
                 groups=1) -> TuckerGeometry:
    """Validate ``tucker_conv2d``'s arguments; return the layer's ``TuckerGeometry``."""
    check_array(input, "input", 4, "4-D [N, C, H, W]", nonempty=True)
    check_array(first, "first", 4, "4-D [r_in, C, 1, 1]", nonempty=True)
    check_array(core, "core", 4, "4-D [r_out, r_in/groups, kh, kw]", nonempty=True)
    check_array(last, "last", 4, "4-D [Cout, r_out, 1, 1]", nonempty=True)
    if bias is not None:
        check_array(bias, "bias", 1, "1-D [Cout]", nonempty=True)
    arrays = {"input": input, "first": first, "core": core, "last": last, "bias": bias}
    check_same_kind_and_dtype(arrays)
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = conv_pairs(stride, padding, dilation)
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)

    n, c, h, w = input.shape
    r_in = first.shape[0]
    if tuple(first.shape[1:]) != (c, 1, 1):
        raise ValueError(f"first must have shape [r_in, C, 1, 1] = ({r_in}, {c}, 1, 1) for an input "
                         f"with C={c} channels, got {tuple(first.shape)}")
    r_out, r_in_per_group, kh, kw = core.shape
    if r_in % groups or r_out % groups:
        raise ValueError(f"groups ({groups}) must divide r_in ({r_in}, first.shape[0]) and "
                         f"r_out ({r_out}, core.shape[0])")
    if r_in_per_group != r_in // groups:
        raise ValueError(f"core must have shape [r_out, r_in/groups, kh, kw] = ({r_out}, {r_in // groups}, "
                         f"{kh}, {kw}) (r_in={r_in} from first.shape[0], groups={groups}), "
                         f"got {tuple(core.shape)}")
    c_out = last.shape[0]
    if tuple(last.shape[1:]) != (r_out, 1, 1):
        raise ValueError(f"last must have shape [Cout, r_out, 1, 1] = ({c_out}, {r_out}, 1, 1) "
                         f"(r_out={r_out} from core.shape[0]), got {tuple(last.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must have shape [Cout] = ({c_out},) (Cout from last.shape[0]), "
                         f"got {tuple(bias.shape)}")
    geometry = TuckerGeometry(
        batch=n, in_channels=c, height=h, width=w, out_channels=c_out, rank_in=r_in, rank_out=r_out,
        kernel_h=kh, kernel_w=kw, stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w,
        dil_h=dil_h, dil_w=dil_w, groups=groups, has_bias=bias is not None, dtype=str(input.dtype))
    check_output_not_empty(h, w, (kh, kw), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w))
    check_limits(geometry)
    return geometry


def check_limits(g: TuckerGeometry) -> None:
    """The kernels index one image with 32-bit arithmetic and images through 64-bit bases:
    every per-image tensor (``C*H*W``, ``r*H*W``, ``Cout*Ho*Wo``) must have < 2**31 elements."""
    per_image = {
        "input": g.in_channels * g.height * g.width,
        "hidden_in": g.rank_in * g.height * g.width,
        "output": g.out_channels * g.out_h * g.out_w,
    }
    for name, count in per_image.items():
        if count > INT32_MAX:
            raise ValueError(f"one image of {name} has {count} elements; the kernels index an image with "
                             f"32-bit integers (at most 2**31 - 1)")
    padded = max(g.height + 2 * g.pad_h, g.width + 2 * g.pad_w,
                 (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1,
                 (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1)
    if padded > 2**30:
        raise ValueError(f"padded extent {padded} past 2**30 is not supported")
