"""Bad input raises a clear error naming the argument, never a wrong answer."""

import numpy as np
import pytest

import deftnumba as dn

from .cases import CASES, layer_arrays


@pytest.fixture
def good(rng):
    g = CASES["offset-groups-2"]  # C=4, 2 offset groups, 3x3, pad 1, mask and bias
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    return dict(input=x, offset=offset, weight=weight, bias=bias, padding=1, mask=mask)


def call(args, **change):
    return dn.deform_conv2d(**{**args, **change})


BAD = [
    # (change, error type, message fragment)
    (lambda a: dict(input=a["input"][0]), ValueError, r"input must be 4-D"),
    (lambda a: dict(offset=a["offset"][0]), ValueError, r"offset must be 4-D"),
    (lambda a: dict(weight=a["weight"][0]), ValueError, r"weight must be 4-D"),
    (lambda a: dict(bias=a["bias"][None]), ValueError, r"bias must be 1-D"),
    (lambda a: dict(mask=a["mask"][0]), ValueError, r"mask must be 4-D"),
    (lambda a: dict(weight=a["weight"][:, :3]), ValueError, r"input channels \(4\) must be divisible by weight.shape\[1\] \(3\)"),
    (lambda a: dict(input=a["input"][:, :3], weight=a["weight"][:, :3]), ValueError, r"offset_groups"),
    (lambda a: dict(weight=a["weight"][:, :2][:5], bias=a["bias"][:5]), ValueError, r"Cout=5.*divisible by groups \(2\)"),
    (lambda a: dict(offset=a["offset"][:, :35]), ValueError, r"offset.shape\[1\] \(35\) must be 2\*offset_groups\*kh\*kw"),
    (lambda a: dict(offset=a["offset"][:, :, :4]), ValueError, r"offset must have shape \(2, 36, 5, 7\)"),
    (lambda a: dict(mask=a["mask"][:, :9]), ValueError, r"mask must have shape \(2, 18, 5, 7\)"),
    (lambda a: dict(mask=a["mask"][:, :, :, :6]), ValueError, r"mask must have shape"),
    (lambda a: dict(offset=a["offset"][:1]), ValueError, r"offset.shape\[0\] \(1\) must equal the batch size 2"),
    (lambda a: dict(mask=a["mask"][:1]), ValueError, r"mask.shape\[0\] \(1\) must equal the batch size 2"),
    (lambda a: dict(bias=a["bias"][:5]), ValueError, r"bias must have shape \(6,\)"),
    (lambda a: dict(input=a["input"].astype(np.int32)), TypeError,
     r"input must be float32, float64, float16 or bfloat16, got int32"),
    (lambda a: dict(input=a["input"].astype(np.float16)), TypeError, r"one dtype"),  # halves: test_half.py
    (lambda a: dict(weight=a["weight"].astype(np.float64)), TypeError, r"one dtype"),
    (lambda a: dict(input=a["input"].tolist()), TypeError, r"input must be a NumPy or CuPy array, got list"),
    (lambda a: dict(mask=a["mask"].tolist()), TypeError, r"mask must be a NumPy or CuPy array"),
    (lambda a: dict(stride=0), ValueError, r"stride must be >= 1"),
    (lambda a: dict(stride=(1, -1)), ValueError, r"stride must be >= 1"),
    (lambda a: dict(dilation=(0, 1)), ValueError, r"dilation must be >= 1"),
    (lambda a: dict(padding=-1), ValueError, r"padding must be >= 0"),
    (lambda a: dict(stride=1.5), TypeError, r"stride must be an int or a pair"),
    (lambda a: dict(padding=(1, 1, 1)), TypeError, r"padding must be an int or a pair"),
    (lambda a: dict(padding=0, input=a["input"][:, :, :2, :2]), ValueError, r"output would be empty"),
    (lambda a: dict(input=a["input"][:0]), ValueError, r"offset.shape\[0\] \(2\) must equal the batch size 0"),
    (lambda a: dict(input=a["input"][:, :, :0]), ValueError, r"input must have height and width >= 1"),
    (lambda a: dict(input=a["input"][:, :, :, :0]), ValueError, r"input must have height and width >= 1"),
    (lambda a: dict(weight=a["weight"][:, :, :0]), ValueError, r"kernel size >= 1"),
    (lambda a: dict(offset=a["offset"][:, :0]), ValueError, r"offset_groups >= 1"),
    (lambda a: dict(input=a["input"][:, :0]), ValueError, r"weight.shape\[1\] \(C/groups\) must be 0"),
    (lambda a: dict(weight=a["weight"][:, :0]), ValueError, r"weight.shape\[1\] \(C/groups\) must be >= 1"),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_raises_clear_error(good, index):
    change, error, message = BAD[index]
    with pytest.raises(error, match=message):
        call(good, **change(good))


def test_the_good_arguments_do_run(good):
    assert call(good).shape == (2, 6, 5, 7)


def test_numpy_mixed_with_another_array_kind_is_rejected(good):
    class FakeCupy:  # stands in for a CuPy array on a machine without CuPy
        __module__ = "cupy._core.core"
        ndim, dtype, shape = 4, np.dtype("float32"), good["input"].shape

    FakeCupy.__module__ = "cupy._core.core"
    with pytest.raises(TypeError, match=r"all be NumPy or all be CuPy"):
        call(good, input=FakeCupy())
