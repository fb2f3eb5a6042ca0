"""Stencil patterns, the frozen description of one lean layer, and argument checks.

A *lean operator* (LeanResNet, Ephrath et al. 2019/2020) keeps the width ``C``
of a feature map and replaces a dense 3x3 convolution by a sum:

    y = conv1x1(x, pointwise, stride) + depthwise(x, stencil on a 3x3 footprint, padding 1, stride) + bias

``pointwise`` is ``[C, C]`` (torch's ``[Cout, Cin]`` order, or ``[C, C, 1, 1]``),
``stencil`` is ``[C, S]``: one weight per channel and per tap of the pattern.
A pattern is a tuple of ``(dy, dx)`` taps with ``dy, dx`` in ``{-1, 0, 1}``, in
the order of the stencil's columns. Output pixel ``(oy, ox)`` is centred on input
pixel ``(oy*stride_h, ox*stride_w)``; a tap outside the image reads zero.

``check_forward`` turns the user's arrays into a ``LeanGeometry``; every error
names the argument and the shape expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.arguments import (FLOAT_DTYPES, INT32_MAX, check_array, check_gradient,  # noqa: F401
                                  check_same_kind_and_dtype, pair)
from .kernels.stencils import PATTERNS  # noqa: E402  (the kernels' audit cases draw them too)


def pattern_taps(pattern) -> tuple[tuple[int, int], ...]:
    """The taps of ``pattern``: a name in ``PATTERNS`` or a tuple of ``(dy, dx)`` pairs."""
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {tuple(PATTERNS)} or a tuple of (dy, dx) taps, "
                             f"got {pattern!r}")
        return PATTERNS[pattern]
    try:
        taps = tuple((int(dy), int(dx)) for dy, dx in pattern)
    except (TypeError, ValueError):
        raise ValueError(f"pattern must be one of {tuple(PATTERNS)} or a tuple of (dy, dx) taps, "
                         f"got {pattern!r}") from None
    if not taps:
        raise ValueError("pattern must have at least one tap")
    if any(abs(dy) > 1 or abs(dx) > 1 for dy, dx in taps):
        raise ValueError(f"pattern taps must lie on the 3x3 footprint (dy, dx in -1, 0, 1), got {taps}")
    if len(set(taps)) != len(taps):
        raise ValueError(f"pattern taps must be distinct, got {taps}")
    return taps


def flipped(taps) -> tuple[tuple[int, int], ...]:
    """The taps mirrored through the centre: the adjoint stencil (input gradient at stride 1)."""
    return tuple((-dy, -dx) for dy, dx in taps)


@dataclass(frozen=True)
class LeanGeometry:
    """Shapes and hyper-parameters of one lean layer (plain ints and a taps tuple)."""

    batch: int
    channels: int
    height: int
    width: int
    taps: tuple = PATTERNS["star5"]
    stride_h: int = 1
    stride_w: int = 1
    has_bias: bool = False
    dtype: str = "float32"

    @property
    def out_h(self) -> int:
        return (self.height - 1) // self.stride_h + 1

    @property
    def out_w(self) -> int:
        return (self.width - 1) // self.stride_w + 1

    @property
    def stencil_size(self) -> int:
        """``S``: taps of the pattern (columns of ``stencil``)."""
        return len(self.taps)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The expected shape of every array argument and of the output."""
        n, c = self.batch, self.channels
        return {"input": (n, c, self.height, self.width), "pointwise": (c, c),
                "stencil": (c, self.stencil_size), "bias": (c,),
                "output": (n, c, self.out_h, self.out_w)}


def check_forward(input, pointwise, stencil, bias, stride, pattern) -> LeanGeometry:
    """Validate ``lean_conv2d`` arguments; return the layer's ``LeanGeometry``."""
    taps = pattern_taps(pattern)
    check_array(input, "input", (4,), "4-D [N, C, H, W]")
    check_array(pointwise, "pointwise", (2, 4), "[C, C] or [C, C, 1, 1]")
    check_array(stencil, "stencil", (2,), f"2-D [C, S] (S = {len(taps)} taps of the pattern)")
    if bias is not None:
        check_array(bias, "bias", (1,), "1-D [C]")
    arrays = {"input": input, "pointwise": pointwise, "stencil": stencil, "bias": bias}
    check_same_kind_and_dtype(arrays)
    stride_h, stride_w = pair(stride, "stride", minimum=1)

    n, c, h, w = (int(v) for v in input.shape)
    if 0 in input.shape:
        raise ValueError(f"input must not be empty, got shape {tuple(input.shape)}")
    if pointwise.ndim == 4 and tuple(pointwise.shape[2:]) != (1, 1):
        raise ValueError(f"pointwise must be [C, C] or [C, C, 1, 1], got shape {tuple(pointwise.shape)}")
    c_out, c_in = int(pointwise.shape[0]), int(pointwise.shape[1])
    if c_in != c:
        raise ValueError(f"pointwise must be [C, C] = {(c, c)} for input with C={c} channels, "
                         f"got shape {tuple(pointwise.shape)}")
    if c_out != c:
        raise ValueError(
            f"pointwise has {c_out} output channels for {c} input channels: a lean operator keeps "
            f"the width (pointwise [C, C] = {(c, c)}). Width changes are not lean operators: use a "
            f"plain 1x1 convolution with stride for them.")
    geometry = LeanGeometry(batch=n, channels=c, height=h, width=w, taps=taps, stride_h=stride_h,
                            stride_w=stride_w, has_bias=bias is not None, dtype=str(input.dtype))
    expected = geometry.shapes
    if tuple(stencil.shape) != expected["stencil"]:
        raise ValueError(f"stencil must have shape [C, S] = {expected['stencil']} (S = {len(taps)} taps "
                         f"of the pattern {taps}), got {tuple(stencil.shape)}")
    if bias is not None and tuple(bias.shape) != expected["bias"]:
        raise ValueError(f"bias must have shape [C] = {expected['bias']}, got {tuple(bias.shape)}")
    if c * h * w > INT32_MAX:
        raise ValueError(f"one image has C*H*W = {c}*{h}*{w} = {c * h * w} elements; the kernels "
                         f"index inside an image with 32-bit integers (at most 2**31 - 1)")
    if n > INT32_MAX:
        raise ValueError(f"batch size {n} is larger than 2**31 - 1")
    return geometry


def check_backward(grad_output, input, pointwise, stencil, bias, stride, pattern) -> LeanGeometry:
    """Validate ``lean_conv2d_backward`` arguments; return the layer's ``LeanGeometry``."""
    geometry = check_forward(input, pointwise, stencil, bias, stride, pattern)
    check_gradient(grad_output, "grad_output", input, "[N, C, Ho, Wo]", geometry.shapes["output"])
    return geometry
