"""Irregular tiny DCN cases shared by every method's tests, and input makers."""

from __future__ import annotations

import numpy as np

from deftnumba.runtime import backend
from deftnumba.dcn.geometry import Geometry
from deftnumba.dcn.inputs import random_layer


def case(name, n=2, c=4, h=5, w=7, c_out=6, kh=3, kw=3, stride=(1, 1), pad=(1, 1), dil=(1, 1),
         groups=1, offset_groups=1, mask=True, bias=True, dtype="float32"):
    return name, Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=kh,
                          kernel_w=kw, stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1],
                          dil_h=dil[0], dil_w=dil[1], groups=groups, offset_groups=offset_groups,
                          has_mask=mask, has_bias=bias, dtype=dtype)


CASES = dict([
    case("basic-3x3"),
    case("float64", dtype="float64"),
    case("no-mask-no-bias", mask=False, bias=False),
    case("stride-pad-dil-pairs", h=9, w=8, stride=(2, 1), pad=(2, 0), dil=(1, 2)),
    case("kernel-1x1", kh=1, kw=1, pad=(0, 0)),
    case("kernel-2x3", kh=2, kw=3, pad=(0, 1), h=6, w=5),
    case("kernel-5x5", n=1, kh=5, kw=5, pad=(2, 2), h=6, w=6, c=2, c_out=3),
    case("groups-2", c=4, c_out=6, groups=2),
    case("offset-groups-2", c=4, offset_groups=2),
    case("groups-and-offset-groups", c=6, c_out=4, groups=2, offset_groups=3, mask=False),
    case("odd-everything", n=3, c=3, h=7, w=3, c_out=5, kh=3, kw=2, stride=(2, 3), pad=(1, 0), dil=(2, 1)),
    case("batch-1-image-1x1", n=1, c=2, h=1, w=1, c_out=2, kh=3, kw=3, pad=(1, 1)),
])


def layer_arrays(geometry: Geometry, rng, offset_scale=2.0):
    """Fresh random NumPy arrays ``(input, offset, weight, bias, mask)`` for a geometry.

    Nothing is zero: the package's one random layer (``deftnumba.dcn.inputs``): inputs
    standard normal, offsets non-integer and up to a few pixels, the mask in (0.1, 1).
    """
    return random_layer(geometry, rng, offset_scale)


def conv_kwargs(g: Geometry) -> dict:
    return dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))


def tolerance(dtype) -> float:
    """Relative-error bound for a kernel result against the float64 reference."""
    return 1e-5 if np.dtype(dtype) == np.float32 else 1e-12


def rel_error(result, expected) -> float:
    result = backend.to_host(result).astype(np.float64)
    assert np.all(np.isfinite(result)), "result has non-finite values"
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(result - expected) / (scale if scale > 0 else 1.0))
