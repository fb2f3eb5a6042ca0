"""Argument checking for every public entry point, in one place.

``check_forward`` turns the user's arrays and ``stride/padding/dilation`` into a
``Geometry``: the frozen description of one deformable-convolution layer that
kernels, plans, roofline counts and benchmarks all share. Every error names the
argument and what was expected, in the style of ``torchvision.ops``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime import precision
from ..runtime.arguments import (FLOAT_DTYPES, HALF_FLOAT_DTYPES, ConvWindow, INT32_MAX, check_array, check_gradient,  # noqa: F401
                                  check_output_not_empty, check_same_kind_and_dtype, conv_out_size,
                                  conv_pairs, pair)


@dataclass(frozen=True)
class Geometry(ConvWindow):
    """Shapes and hyper-parameters of one DCN layer (all plain ints); ``out_h``, ``out_w``,
    ``taps`` and ``itemsize`` come from ``runtime.arguments.ConvWindow``."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    dil_h: int = 1
    dil_w: int = 1
    groups: int = 1
    offset_groups: int = 1
    has_mask: bool = True
    has_bias: bool = False
    dtype: str = "float32"

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to sample or no output channel: a batch of 0,
        no input channels, or no output channels. The output is then empty (or the
        bias alone, when there are no input channels) and nothing is launched."""
        return self.batch == 0 or self.in_channels == 0 or self.out_channels == 0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The expected shape of every array argument and of the output."""
        n, g, k = self.batch, self.offset_groups, self.taps
        return {
            "input": (n, self.in_channels, self.height, self.width),
            "offset": (n, 2 * g * k, self.out_h, self.out_w),
            "weight": (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w),
            "bias": (self.out_channels,),
            "mask": (n, g * k, self.out_h, self.out_w),
            "output": (n, self.out_channels, self.out_h, self.out_w),
        }


DTYPES = HALF_FLOAT_DTYPES
"""The dtypes ``deform_conv2d`` takes: float32, float64, float16 and ``ml_dtypes.bfloat16``
(the halves stored in half, computed in float32: ``runtime.precision``)."""


def check_forward(input, offset, weight, bias, stride, padding, dilation, mask) -> Geometry:
    """Validate ``deform_conv2d`` arguments; return the layer's ``Geometry``."""
    dtypes = DTYPES
    check_array(input, "input", 4, "4-D [N, C, H, W]", dtypes=dtypes)
    check_array(offset, "offset", 4, "4-D [N, 2*offset_groups*kh*kw, Ho, Wo]", dtypes=dtypes)
    check_array(weight, "weight", 4, "4-D [Cout, C/groups, kh, kw]", dtypes=dtypes)
    if bias is not None:
        check_array(bias, "bias", 1, "1-D [Cout]", dtypes=dtypes)
    if mask is not None:
        check_array(mask, "mask", 4, "4-D [N, offset_groups*kh*kw, Ho, Wo]", dtypes=dtypes)

    arrays = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    check_same_kind_and_dtype(arrays)
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = conv_pairs(stride, padding, dilation)

    n, c, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    # Empty is fine along the batch, the channels and the output channels (the
    # result is empty or zero, see ``Geometry.is_empty``); never along a spatial
    # or kernel axis, nor with no offset groups (torchvision refuses those too).
    if h == 0 or w == 0:
        raise ValueError(f"input must have height and width >= 1, got shape {tuple(input.shape)}")
    if kh == 0 or kw == 0:
        raise ValueError(f"weight must have a kernel size >= 1 (weight.shape[2:]), got shape {tuple(weight.shape)}")
    if c_per_group == 0 and c != 0:
        raise ValueError(f"weight.shape[1] (C/groups) must be >= 1 for {c} input channels, "
                         f"got shape {tuple(weight.shape)}")
    if c == 0 and c_per_group != 0:
        raise ValueError(f"weight.shape[1] (C/groups) must be 0 for an input with no channels, "
                         f"got shape {tuple(weight.shape)}")
    if c_per_group != 0 and c % c_per_group != 0:
        raise ValueError(
            f"input channels ({c}) must be divisible by weight.shape[1] ({c_per_group}), "
            f"which is C/groups"
        )
    groups = c // c_per_group if c_per_group else 1  # no input channels: one (empty) group
    if c_out % groups != 0:
        raise ValueError(f"weight.shape[0] (Cout={c_out}) must be divisible by groups ({groups})")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(
            f"offset.shape[1] ({offset.shape[1]}) must be 2*offset_groups*kh*kw with offset_groups >= 1, "
            f"a positive multiple of 2*{kh}*{kw}={2 * taps}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise ValueError(f"input channels ({c}) must be divisible by offset_groups ({offset_groups})")

    geometry = Geometry(
        batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=kh, kernel_w=kw,
        stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dil_h=dil_h, dil_w=dil_w,
        groups=groups, offset_groups=offset_groups, has_mask=mask is not None,
        has_bias=bias is not None, dtype=precision.user_dtype(input).name,
    )
    check_output_not_empty(h, w, (kh, kw), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w))
    expected = geometry.shapes
    for name in ("offset", "mask", "bias"):
        value = arrays[name]
        if value is None:
            continue
        if value.shape[0] != n and name != "bias":
            raise ValueError(f"{name}.shape[0] ({value.shape[0]}) must equal the batch size {n}")
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(value.shape)}")
    check_limits(geometry)
    return geometry


def check_limits(geometry: Geometry) -> None:
    """Sizes the kernels cannot handle get a clear ``ValueError`` before any launch.

    Index arithmetic in the kernels is 64-bit, so tensors may have more than 2**31
    elements. What stays 32-bit or float is bounded here:

    * stride, padding, dilation and kernel size travel as int32 (``conv_tuple``);
    * sampling positions are computed in the input's float type, and a float32
      holds integer pixel coordinates exactly only up to 2**24 (float64: the
      corner index is an int32, so up to 2**31);
    * one image's output pixels ``Ho*Wo`` are a GEMM dimension (cuBLAS takes int32).
    """
    g = geometry
    params = {"stride": (g.stride_h, g.stride_w), "padding": (g.pad_h, g.pad_w),
              "dilation": (g.dil_h, g.dil_w), "kernel size": (g.kernel_h, g.kernel_w)}
    for name, value in params.items():
        if max(value) > INT32_MAX:
            raise ValueError(f"{name} must be < 2**31, got {value}")
    # halves compute positions in float32 (runtime.precision)
    compute = precision.compute_dtype(g.dtype).name
    coordinate_limit = 2**24 if compute == "float32" else INT32_MAX
    extent = max(g.height + g.pad_h, g.width + g.pad_w,
                 (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h,
                 (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w)
    if extent > coordinate_limit:
        raise ValueError(
            f"input {g.height}x{g.width} with padding {(g.pad_h, g.pad_w)} has pixel coordinates up to "
            f"{extent}, past what {g.dtype} sampling positions hold exactly ({coordinate_limit})"
            + ("; use float64" if compute == "float32" else ""))
    if g.out_h * g.out_w > INT32_MAX:
        raise ValueError(f"one image's output has {g.out_h}x{g.out_w} = {g.out_h * g.out_w} pixels; "
                         f"at most 2**31 - 1 are supported")


def check_backward(grad_output, input, offset, weight, bias, stride, padding, dilation, mask) -> Geometry:
    """Validate ``deform_conv2d_backward`` arguments; return the layer's ``Geometry``.

    The forward's arguments are checked by ``check_forward``; ``grad_output`` must
    be an array of the same kind and dtype with the output's shape ``[N, Cout, Ho, Wo]``.
    """
    geometry = check_forward(input, offset, weight, bias, stride, padding, dilation, mask)
    check_gradient(grad_output, "grad_output", input, "[N, Cout, Ho, Wo]", geometry.shapes["output"],
                   dtypes=DTYPES)
    if geometry.height * geometry.width >= 2**32:
        # the column methods' scatter indexes inside one input plane in 32 bits
        raise ValueError(f"input planes of {geometry.height}x{geometry.width} = {geometry.height * geometry.width} "
                         f"pixels: the backward supports planes below 2**32 pixels")
    return geometry
