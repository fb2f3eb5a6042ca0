"""Property-based fuzzing of every method, forward and backward, against the float64 reference.

Hypothesis draws whole layers: shapes (1-pixel images, kernels larger than the
image with just enough padding), stride, padding, dilation, groups and offset
groups, mask or not, bias or not, float32 or float64, and offsets from zero to
far outside the image, with some NaN, +-inf and int32-overflowing values mixed
in. Every method in ``dn.METHODS`` (and every backward method, once
``dn.deform_conv2d_backward`` exists) is run on each drawn layer and compared
element by element with ``deftnumba.reference``. In the simulator the kernels run
under ``backend.bounds_checked()``, so an out-of-bounds index fails the case too.

Profiles (hypothesis settings profiles, chosen by ``DEFTNUMBA_FUZZ_PROFILE``):

* ``ci`` (default): derandomized, no example database, a few dozen examples in
  all, so the file takes well under a minute in the simulator;
* ``nightly``: random, with the example database in ``.hypothesis/``, and
  ``DEFTNUMBA_FUZZ_EXAMPLES`` (default 200) examples per method and direction::

      DEFTNUMBA_FUZZ_PROFILE=nightly python -m pytest tests/test_fuzz.py -p no:xdist -q

The number of cases that ran is printed at the end of the module (without
xdist) and written to ``build/fuzz-counts/<worker>.json`` in every case.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import ops, reference
from deftnumba.dcn.geometry import Geometry

# --------------------------------------------------------------------------- profiles
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("nightly", derandomize=False, **_COMMON)
PROFILE = os.environ.get("DEFTNUMBA_FUZZ_PROFILE", "ci").strip() or "ci"
if PROFILE not in ("ci", "nightly"):
    raise ValueError(f"DEFTNUMBA_FUZZ_PROFILE={PROFILE!r}: expected 'ci' or 'nightly'")
settings.load_profile(PROFILE)

# In CI a fixed budget of examples is shared out among the methods, so the file's
# time does not grow with every method that lands (but each gets at least a few).
CI_FORWARD_BUDGET = 36
CI_BACKWARD_BUDGET = 24
NIGHTLY_EXAMPLES = int(os.environ.get("DEFTNUMBA_FUZZ_EXAMPLES", "200"))

# Bounds per example: the simulator runs each GPU thread as a Python thread.
MAX_INPUT_ELEMENTS = 600
MAX_SAMPLES = 1500  # N * C * kh*kw * Ho * Wo


# --------------------------------------------------------------------------- method discovery
def forward_methods() -> list[str]:
    return list(dn.METHODS)


def backward_function():
    return getattr(dn, "deform_conv2d_backward", None)


def backward_methods() -> list[str]:
    """The backward's method names, found by name; ``[]`` while there is no backward."""
    if backward_function() is None:
        return []
    for holder in (dn, ops):
        for name in ("BACKWARD_METHODS", "METHODS_BACKWARD"):
            value = getattr(holder, name, None)
            if isinstance(value, (tuple, list)) and value:
                return list(value)
    registry = getattr(ops, "_BACKWARD", None)
    if isinstance(registry, dict) and registry:
        return list(registry)
    return ["auto"]


def backward_params():
    methods = backward_methods()
    if not methods:
        return [pytest.param(None, marks=pytest.mark.skip(reason="dn.deform_conv2d_backward not there yet"))]
    return methods


GRAD_FIELDS = ("input", "offset", "weight", "bias", "mask")


def grad_fields(grads) -> dict:
    """A gradients tuple as ``{field: array or None}`` (named tuple or plain 5-tuple)."""
    if hasattr(grads, "_fields"):
        return {f: getattr(grads, f) for f in GRAD_FIELDS}
    return dict(zip(GRAD_FIELDS, grads))


def conv_kwargs(g: Geometry) -> dict:
    return dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))


def checked():
    """In the simulator: every kernel index bounds-checked, shared/local memory NaN-poisoned."""
    return backend.bounds_checked() if backend.IS_SIMULATOR else contextlib.nullcontext()


def run_forward(method, g, x, offset, weight, bias, mask):
    with checked():
        out = dn.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask, method=method)
    return backend.to_host(out)


def run_backward(method, g, grad_out, x, offset, weight, bias, mask, deterministic=False):
    with checked():
        grads = backward_function()(grad_out, x, offset, weight, bias, **conv_kwargs(g), mask=mask,
                                    method=method, deterministic=deterministic)
    return {k: (backend.to_host(v) if v is not None else None) for k, v in grad_fields(grads).items()}


# --------------------------------------------------------------------------- case counting
CASES_RUN: Counter = Counter()
_nothing = contextlib.nullcontext


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts(request):
    yield
    if not CASES_RUN:
        return
    total = sum(CASES_RUN.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(CASES_RUN.items()))
    line = f"fuzz ({PROFILE} profile): {total} cases ran ({detail})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:  # None in xdist workers: see the JSON file
        with capture.global_and_fixture_disabled() if capture else _nothing():
            reporter.write_line("")
            reporter.write_line(line)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder = Path(request.config.rootpath) / "build" / "fuzz-counts"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{worker}.json").write_text(json.dumps(
            {"profile": PROFILE, "total": total, "cases": dict(CASES_RUN)}, indent=1) + "\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- strategies
SPECIAL_OFFSETS = np.array([np.nan, np.inf, -np.inf, 1e10, -1e10, 2.0**31, -(2.0**31) - 4096, 3e9,
                            -3e9, 1e30, -1e30, 2.0**63, 1e-40, -1.0, 0.0])


@st.composite
def layers(draw):
    """A small random ``Geometry`` within the simulator's budget."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dil_h, dil_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride_h, stride_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    # Enough padding for a non-empty output, so kernels larger than the image are drawn too.
    need_h = max(0, math.ceil((dil_h * (kh - 1) + 1 - h) / 2))
    need_w = max(0, math.ceil((dil_w * (kw - 1) + 1 - w) / 2))
    pad_h, pad_w = draw(st.integers(need_h, need_h + 2)), draw(st.integers(need_w, need_w + 2))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    offset_groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = math.lcm(groups, offset_groups) * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    g = Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=kh, kernel_w=kw,
                 stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dil_h=dil_h, dil_w=dil_w,
                 groups=groups, offset_groups=offset_groups, has_mask=draw(st.booleans()),
                 has_bias=draw(st.booleans()), dtype=dtype)
    assume(g.out_h >= 1 and g.out_w >= 1)
    assume(n * c * h * w <= MAX_INPUT_ELEMENTS)
    assume(n * c * g.taps * g.out_h * g.out_w <= MAX_SAMPLES)
    return g


OFFSET_KINDS = ("zero", "small", "integer", "band", "far", "mixed", "specials")


def make_offsets(rng, g: Geometry, kind: str) -> np.ndarray:
    """Offsets of one ``kind``, from all zero to far outside the image."""
    shape = g.shapes["offset"]
    reach = max(g.height, g.width) + max(g.kernel_h * g.dil_h, g.kernel_w * g.dil_w) + 2
    small = rng.standard_normal(shape) * 0.7
    integer = rng.integers(-reach, reach + 1, shape).astype(np.float64)
    band = rng.uniform(-reach, reach, shape)
    far = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(2, 12, shape)
    specials = rng.choice(SPECIAL_OFFSETS, shape)
    if kind == "zero":
        values = np.zeros(shape)
    elif kind == "small":
        values = small
    elif kind == "integer":  # exact corners, and exactly on the band's edges -1 and H
        values = integer
    elif kind == "band":
        values = band
    elif kind == "far":
        values = far
    else:
        pick = rng.integers(0, 5, shape)
        values = np.choose(pick, [small, integer, band, far, specials])
        if kind == "specials":  # mostly special values, a few ordinary ones
            values = np.where(rng.random(shape) < 0.7, specials, values)
    return values.astype(g.dtype)


def make_arrays(rng, g: Geometry, offset_kind: str):
    dtype = np.dtype(g.dtype)
    shapes = g.shapes
    x = rng.standard_normal(shapes["input"]).astype(dtype)
    weight = rng.standard_normal(shapes["weight"]).astype(dtype)
    bias = rng.standard_normal(shapes["bias"]).astype(dtype) if g.has_bias else None
    mask = rng.uniform(-0.5, 1.5, shapes["mask"]).astype(dtype) if g.has_mask else None
    return x, make_offsets(rng, g, offset_kind), weight, bias, mask


def _abs(a):
    return None if a is None else np.abs(a)


def check_close(result, expected, bound, dtype, what):
    """``|result - expected| <= rtol * bound`` element by element (``bound`` >= |terms|)."""
    assert result.shape == expected.shape, f"{what}: shape {result.shape} != {expected.shape}"
    assert np.all(np.isfinite(result)), f"{what}: non-finite values {result[~np.isfinite(result)][:5]}"
    rtol = 2e-5 if np.dtype(dtype) == np.float32 else 1e-11
    err = np.abs(result.astype(np.float64) - expected)
    limit = rtol * bound + 1e-30
    bad = err > limit
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements off, worst error "
                           f"{err.max():.3g} vs limit {limit[bad].min():.3g}")


# --------------------------------------------------------------------------- forward
def forward_examples() -> int:
    if PROFILE == "nightly":
        return NIGHTLY_EXAMPLES
    return max(4, CI_FORWARD_BUDGET // max(1, len(forward_methods())))


@pytest.mark.parametrize("method", forward_methods())
@settings(max_examples=forward_examples())
@given(g=layers(), offset_kind=st.sampled_from(OFFSET_KINDS), seed=st.integers(0, 2**32 - 1))
def test_forward_matches_reference(method, g, offset_kind, seed):
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask = make_arrays(rng, g, offset_kind)
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    # Sum of |terms|: bounds the rounding error of every output element. The float32
    # sampling position itself is rounded (to ~1e-7 * |y|), which moves a sample by up
    # to ~2e-7 * max|x|: that is the second, per-output-channel term.
    bound = reference.deform_conv2d(np.abs(x), offset, np.abs(weight), _abs(bias), **conv_kwargs(g),
                                    mask=_abs(mask))
    scale = np.abs(weight).sum(axis=(1, 2, 3)) * np.abs(x).max() * (np.abs(mask).max() if mask is not None else 1)
    bound = bound + 0.1 * scale[None, :, None, None]
    out = run_forward(method, g, x, offset, weight, bias, mask)
    assert out.dtype == np.dtype(g.dtype)
    check_close(out, expected, bound, g.dtype, f"forward[{method}]")
    CASES_RUN[f"forward[{method}]"] += 1


# --------------------------------------------------------------------------- backward
def backward_examples() -> int:
    if PROFILE == "nightly":
        return NIGHTLY_EXAMPLES
    return max(4, CI_BACKWARD_BUDGET // max(1, len(backward_methods())))


def grad_bound(field, ref, dtype):
    """Elementwise bound on a gradient's rounding error: the tensor's largest value.

    The gradients are sums with cancellation (the offset gradient is a difference
    of corner values), so the scale is the tensor's own maximum, not each element.
    """
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    # float32 accumulates up to a few hundred terms: a looser relative bound than forward
    factor = 10.0 if np.dtype(dtype) == np.float32 else 1.0
    return np.full(ref.shape, factor * max(scale, 1e-6))


@pytest.mark.parametrize("method", backward_params())
@settings(max_examples=backward_examples())
@given(g=layers(), offset_kind=st.sampled_from(OFFSET_KINDS), seed=st.integers(0, 2**32 - 1),
       deterministic=st.booleans())
def test_backward_matches_reference(method, g, offset_kind, seed, deterministic):
    ref_backward = getattr(reference, "deform_conv2d_backward", None)
    if ref_backward is None:
        pytest.skip("reference.deform_conv2d_backward not there yet")
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask = make_arrays(rng, g, offset_kind)
    grad_out = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
    expected = grad_fields(ref_backward(grad_out, x, offset, weight, bias, **conv_kwargs(g), mask=mask))
    result = run_backward(method, g, grad_out, x, offset, weight, bias, mask, deterministic)
    for field in GRAD_FIELDS:
        want = {"bias": bias, "mask": mask}.get(field, x)
        if want is None:
            assert result[field] is None, f"grad {field} should be None"
            continue
        ref = np.asarray(expected[field], dtype=np.float64)
        got = result[field]
        assert got.dtype == np.dtype(g.dtype), f"grad {field} dtype {got.dtype}"
        check_close(got, ref, grad_bound(field, ref, g.dtype), g.dtype,
                    f"backward[{method}, deterministic={deterministic}].{field}")
    CASES_RUN[f"backward[{method}]"] += 1
