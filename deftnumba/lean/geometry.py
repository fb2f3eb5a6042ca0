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

from ..runtime import backend

from .kernels.stencils import PATTERNS  # noqa: E402  (the kernels' audit cases draw them too)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INT32_MAX = 2**31 - 1


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


def _stride_pair(stride) -> tuple[int, int]:
    if isinstance(stride, (int, np.integer)) and not isinstance(stride, bool):
        pair = (int(stride), int(stride))
    elif (isinstance(stride, (tuple, list)) and len(stride) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in stride)):
        pair = (int(stride[0]), int(stride[1]))
    else:
        raise TypeError(f"stride must be an int or a pair of ints, got {stride!r}")
    if min(pair) < 1:
        raise ValueError(f"stride must be >= 1, got {pair}")
    return pair


def _check_array(a, name: str, ndims: tuple[int, ...], layout: str):
    if not (isinstance(a, np.ndarray) or backend.is_cupy_array(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask the kernels would ignore: "
                        f"pass {name}.filled(value) or np.asarray({name})")
    if a.ndim not in ndims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(a.shape)}")
    dtype = np.dtype(a.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (native byte order), got {dtype.str}")


def check_forward(input, pointwise, stencil, bias, stride, pattern) -> LeanGeometry:
    """Validate ``lean_conv2d`` arguments; return the layer's ``LeanGeometry``."""
    taps = pattern_taps(pattern)
    _check_array(input, "input", (4,), "4-D [N, C, H, W]")
    _check_array(pointwise, "pointwise", (2, 4), "[C, C] or [C, C, 1, 1]")
    _check_array(stencil, "stencil", (2,), f"2-D [C, S] (S = {len(taps)} taps of the pattern)")
    if bias is not None:
        _check_array(bias, "bias", (1,), "1-D [C]")
    arrays = {"input": input, "pointwise": pointwise, "stencil": stencil, "bias": bias}
    given = {k: v for k, v in arrays.items() if v is not None}
    kinds = {k: ("CuPy" if backend.is_cupy_array(v) else "NumPy") for k, v in given.items()}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays must all be NumPy or all be CuPy, got {kinds}")
    if backend.IS_SIMULATOR and "CuPy" in kinds.values():
        raise TypeError("CuPy arrays need the cuda backend; the simulator backend takes NumPy arrays")
    dtypes = {k: str(v.dtype) for k, v in given.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all arrays must have one dtype, got {dtypes}")
    stride_h, stride_w = _stride_pair(stride)

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
    _check_array(grad_output, "grad_output", (4,), "4-D [N, C, Ho, Wo]")
    if backend.is_cupy_array(grad_output) != backend.is_cupy_array(input):
        raise TypeError("grad_output and input must both be NumPy or both be CuPy arrays")
    if np.dtype(grad_output.dtype) != np.dtype(input.dtype):
        raise TypeError(f"grad_output must have the dtype of input ({input.dtype}), got {grad_output.dtype}")
    expected = geometry.shapes["output"]
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output must have the output's shape [N, C, Ho, Wo] = {expected}, "
                         f"got {tuple(grad_output.shape)}")
    return geometry
