"""Argument checks every system's public entry points share.

Each system (``dcn``, ``tucker``, ``lean``) turns its user's arrays into a frozen
geometry in its own ``geometry.py``; the checks that do not depend on the layer
live here once: what counts as an array, "all NumPy or all CuPy", "one dtype",
``int``-or-pair hyper-parameters, the convolution output size, and the gradient
that must look like the input. Every error names the argument and what was
expected.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .precision import ALL_DTYPES, FULL_DTYPES, as_dtype, dtype_names, user_dtype

FLOAT_DTYPES = FULL_DTYPES
"""What every entry point accepts unless it says otherwise (Tucker, lean)."""
HALF_FLOAT_DTYPES = ALL_DTYPES
"""float32, float64, float16 and bfloat16 (``ml_dtypes.bfloat16``): the DCN entry points
(storage in half, arithmetic in float32: see ``runtime.precision``)."""
INT32_MAX = 2**31 - 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def pair(value, name: str, minimum: int | None = None) -> tuple[int, int]:
    """``int`` or a pair of ints -> ``(int, int)``; ``TypeError`` otherwise.

    With ``minimum``, a value below it is a ``ValueError`` ("stride must be >= 1").
    """
    if _is_int(value):
        result = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    return result


def conv_pairs(stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``stride, padding, dilation`` -> three ``(h, w)`` pairs, checked as ``torch.nn.functional.conv2d``
    does: stride and dilation >= 1, padding >= 0. All three are parsed before any value is judged."""
    strides, pads, dilations = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(strides) < 1:
        raise ValueError(f"stride must be >= 1, got {strides}")
    if min(dilations) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilations}")
    if min(pads) < 0:
        raise ValueError(f"padding must be >= 0, got {pads}")
    return strides, pads, dilations


def conv_out_size(size: int, kernel: int, stride: int = 1, pad: int = 0, dil: int = 1) -> int:
    """Output length of a convolution along one axis (``conv2d``'s formula)."""
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


class ConvWindow:
    """What a convolution layer's frozen geometry derives from its window: mixed into a
    dataclass with ``height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dil_h, dil_w`` and ``dtype`` (a NumPy dtype name)."""

    @property
    def out_h(self) -> int:
        return conv_out_size(self.height, self.kernel_h, self.stride_h, self.pad_h, self.dil_h)

    @property
    def out_w(self) -> int:
        return conv_out_size(self.width, self.kernel_w, self.stride_w, self.pad_w, self.dil_w)

    @property
    def taps(self) -> int:
        """Kernel taps ``kh * kw``."""
        return self.kernel_h * self.kernel_w

    @property
    def itemsize(self) -> int:
        """Bytes per element in memory (2 for float16 and bfloat16)."""
        return as_dtype(self.dtype).itemsize


def check_output_not_empty(height, width, kernel, stride, padding, dilation) -> None:
    """``ValueError`` when the padded input is smaller than the dilated kernel (all arguments
    but ``height, width`` are ``(h, w)`` pairs)."""
    out_h = conv_out_size(height, kernel[0], stride[0], padding[0], dilation[0])
    out_w = conv_out_size(width, kernel[1], stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be empty ({out_h}x{out_w}): input {height}x{width} with "
            f"padding {tuple(padding)} is smaller than the dilated kernel "
            f"{(dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)}")


def check_array(a, name: str, ndims, layout: str, *, nonempty: bool = False, dtypes=FLOAT_DTYPES) -> None:
    """``a`` must be a NumPy or CuPy array of one of ``dtypes`` (default float32/float64; native
    byte order) with ``ndims`` dimensions (an int or a tuple of allowed ones); ``layout`` names
    the expected shape in the error, e.g. ``"4-D [N, C, H, W]"``. With ``nonempty``, a
    zero-length axis is a ``ValueError``."""
    if not (isinstance(a, np.ndarray) or backend.is_cupy_array(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask the kernels would ignore: "
                        f"pass {name}.filled(value) or np.asarray({name})")
    if a.ndim not in ((ndims,) if isinstance(ndims, int) else tuple(ndims)):
        raise ValueError(f"{name} must be {layout}, got shape {tuple(a.shape)}")
    dtype = user_dtype(a)
    accepted = dtype_names(dtypes)
    if dtype.kind == "f" and not dtype.isnative and dtype.newbyteorder() in dtypes:
        raise TypeError(f"{name} must be {accepted} in native byte order, got {dtype.str}: "
                        f"pass {name}.astype({dtype.newbyteorder().name})")
    if dtype not in dtypes:
        raise TypeError(f"{name} must be {accepted}, got {a.dtype}")
    if nonempty and 0 in a.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(a.shape)}")


def check_same_kind_and_dtype(arrays: dict) -> None:
    """The arrays given (``None`` values are skipped) are all NumPy or all CuPy, CuPy only on
    the cuda backend, and share one dtype; ``TypeError`` naming each argument otherwise."""
    given = {k: v for k, v in arrays.items() if v is not None}
    kinds = {k: ("CuPy" if backend.is_cupy_array(v) else "NumPy") for k, v in given.items()}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays must all be NumPy or all be CuPy, got {kinds}")
    if backend.IS_SIMULATOR and "CuPy" in kinds.values():
        raise TypeError("CuPy arrays need the cuda backend; the simulator backend takes NumPy arrays")
    dtypes = {k: str(user_dtype(v)) for k, v in given.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all arrays must have one dtype, got {dtypes}")


def check_gradient(grad, name: str, input, layout: str, expected: tuple[int, ...], dtypes=FLOAT_DTYPES) -> None:
    """A gradient argument (``grad_output``) is an array of the input's kind and dtype whose shape
    is the output's, ``expected``; ``layout`` names it, e.g. ``"[N, Cout, Ho, Wo]"``."""
    check_array(grad, name, len(expected), f"{len(expected)}-D {layout}", dtypes=dtypes)
    if backend.is_cupy_array(grad) != backend.is_cupy_array(input):
        kind = "CuPy" if backend.is_cupy_array(grad) else "NumPy"
        raise TypeError(f"{name} is a {kind} array but input is not: arrays must all be NumPy or all be CuPy")
    if user_dtype(grad) != user_dtype(input):
        raise TypeError(f"{name} must have the dtype of input ({user_dtype(input)}), got {user_dtype(grad)}")
    if tuple(grad.shape) != tuple(expected):
        raise ValueError(f"{name} must have the output's shape {layout} = {tuple(expected)}, "
                         f"got {tuple(grad.shape)}")
