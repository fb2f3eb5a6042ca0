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

from ..runtime import backend

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class TuckerGeometry:
    """Shapes and hyper-parameters of one Tucker-format layer (all plain ints)."""

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
    def out_h(self) -> int:
        return (self.height + 2 * self.pad_h - self.dil_h * (self.kernel_h - 1) - 1) // self.stride_h + 1

    @property
    def out_w(self) -> int:
        return (self.width + 2 * self.pad_w - self.dil_w * (self.kernel_w - 1) - 1) // self.stride_w + 1

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

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


def pair(value, name: str) -> tuple[int, int]:
    """``int`` or a pair of ints -> ``(int, int)``; ``TypeError`` otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_array(a, name: str, ndim: int, layout: str) -> None:
    if not (isinstance(a, np.ndarray) or backend.is_cupy_array(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask the kernels would ignore: "
                        f"pass {name}.filled(value) or np.asarray({name})")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(a.shape)}")
    dtype = np.dtype(a.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (native byte order), got {a.dtype}")
    if 0 in a.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(a.shape)}")


def check_tucker(input, first, core, last, bias=None, stride=1, padding=0, dilation=1,
                 groups=1) -> TuckerGeometry:
    """Validate ``tucker_conv2d``'s arguments; return the layer's ``TuckerGeometry``."""
    _check_array(input, "input", 4, "[N, C, H, W]")
    _check_array(first, "first", 4, "[r_in, C, 1, 1]")
    _check_array(core, "core", 4, "[r_out, r_in/groups, kh, kw]")
    _check_array(last, "last", 4, "[Cout, r_out, 1, 1]")
    if bias is not None:
        _check_array(bias, "bias", 1, "[Cout]")
    arrays = {"input": input, "first": first, "core": core, "last": last, "bias": bias}
    given = {k: v for k, v in arrays.items() if v is not None}
    kinds = {k: ("CuPy" if backend.is_cupy_array(v) else "NumPy") for k, v in given.items()}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays must all be NumPy or all be CuPy, got {kinds}")
    if backend.IS_SIMULATOR and "CuPy" in kinds.values():
        raise TypeError("CuPy arrays need the cuda backend; the simulator backend takes NumPy arrays")
    dtypes = {k: str(v.dtype) for k, v in given.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all arrays must have one dtype, got {dtypes}")

    stride_h, stride_w = pair(stride, "stride")
    pad_h, pad_w = pair(padding, "padding")
    dil_h, dil_w = pair(dilation, "dilation")
    if stride_h < 1 or stride_w < 1:
        raise ValueError(f"stride must be >= 1, got {(stride_h, stride_w)}")
    if dil_h < 1 or dil_w < 1:
        raise ValueError(f"dilation must be >= 1, got {(dil_h, dil_w)}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padding must be >= 0, got {(pad_h, pad_w)}")
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
    if geometry.out_h < 1 or geometry.out_w < 1:
        raise ValueError(
            f"the output would be empty ({geometry.out_h}x{geometry.out_w}): input {h}x{w} with "
            f"padding {(pad_h, pad_w)} is smaller than the dilated kernel "
            f"{(dil_h * (kh - 1) + 1, dil_w * (kw - 1) + 1)}")
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
