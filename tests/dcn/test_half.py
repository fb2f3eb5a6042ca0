"""float16 and bfloat16: storage in half, arithmetic in float32 (``runtime.precision``).

* the bf16 (and fp16) device conversions against ``ml_dtypes``/NumPy, bit for bit, on
  edge values: ties, NaN, +-inf, overflow, subnormals, negatives;
* every forward method and every backward method (atomic and deterministic) in float16
  and bfloat16 against the float64 reference computed on the *same half-rounded* inputs;
* the kernels read the caller's half arrays themselves (no host upcast) and the results
  come back in the storage dtype; outputs and gradient buffers are poisoned first;
* argument checks: halves accepted by DCN, still refused (clearly) by Tucker and lean.

Tolerances. With the reference run on the half-rounded inputs, the kernels' only errors
are their float32 arithmetic (a few float32 roundings per sum: ~1e-6 relative here) and
the single rounding of each result to the storage type, at most ``u * |result|`` with
``u`` the unit roundoff (float16 ``2**-11``, bfloat16 ``2**-8``). So every result must
satisfy ``max|err| <= 2 * u * max|ref|`` per array. Measured (random tiny layers, several
seeds, every method): forward <= 0.7 u, gradients <= 0.85 u, in both types.
"""

import ml_dtypes
import numpy as np
import pytest

import deftnumba as dn
from deftnumba.dcn import ops, reference
from deftnumba.dcn.geometry import Geometry
from deftnumba.runtime import backend, precision
from deftnumba.runtime.backend import cuda

from .cases import conv_kwargs, layer_arrays

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
TOLERANCE = {name: 2 * u for name, u in UNIT_ROUNDOFF.items()}
FIELDS = ("input", "offset", "weight", "bias", "mask")


def geometry(dtype: str, which: int) -> Geometry:
    """Two tiny irregular layers: strided, dilated, non-square, v2 with bias; and grouped with
    two offset groups, v1 without bias."""
    if which == 0:
        return Geometry(batch=2, in_channels=3, height=5, width=4, out_channels=4, kernel_h=3, kernel_w=2,
                        stride_h=2, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=2, has_mask=True,
                        has_bias=True, dtype=dtype)
    return Geometry(batch=1, in_channels=4, height=4, width=6, out_channels=6, kernel_h=3, kernel_w=3,
                    pad_h=1, pad_w=0, groups=2, offset_groups=2, has_mask=False, has_bias=False, dtype=dtype)


def half_arrays(g: Geometry, rng):
    """Random layer arrays rounded to ``g.dtype`` (float32 draws, then cast)."""
    arrays = layer_arrays(Geometry(**{**g.__dict__, "dtype": "float32"}), rng)
    return [a.astype(DTYPES[g.dtype]) if a is not None else None for a in arrays]


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def check_close(result, expected, dtype, what):
    assert result.dtype == DTYPES[dtype], f"{what}: dtype {result.dtype}, expected {dtype}"
    got = result.astype(np.float64)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (an element never written?)"
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max()
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max|err| {err:.3g} > {TOLERANCE[dtype]:.3g} * {scale:.3g}"


class _Poisoned:
    """An array module whose ``empty`` arrays start as NaN (bf16 bits: a NaN pattern; other
    integers: -2**30, or the largest value of an unsigned type such as the sort keys)."""

    def __init__(self, xp):
        self.xp = xp

    def __getattr__(self, name):
        return getattr(self.xp, name)

    def empty(self, shape, dtype=None, **kwargs):
        dtype = np.dtype(dtype if dtype is not None else np.float64)
        fill = (np.nan if dtype.kind == "f" else 0x7FC0 if dtype == np.uint16
                else np.iinfo(dtype).max if dtype.kind == "u" else -2**30)
        return self.xp.full(shape, fill, dtype=dtype)


@pytest.fixture
def recorded(monkeypatch, poison_allocations):
    """Poisoned allocations, and every kernel launch's array arguments recorded."""
    real_module, real_launch = backend.array_module, backend.launch
    monkeypatch.setattr(backend, "array_module", lambda like: _Poisoned(real_module(like)))
    poison_allocations(ops)
    launches = []

    def launch(kernel, grid, block, *args, **kwargs):
        launches.append([a for a in args if isinstance(a, np.ndarray)])
        return real_launch(kernel, grid, block, *args, **kwargs)

    monkeypatch.setattr(backend, "launch", launch)
    return launches


def assert_read_in_place(launches, named):
    """Each named caller array was handed to some kernel as (a view of) itself: no host copy,
    so no upcast, happened on the way. (Simulator only: on a GPU, NumPy arguments are
    necessarily copied to the device; there the storage dtype of the results is checked.)"""
    if not backend.IS_SIMULATOR:
        return
    for name, array in named.items():
        if array is None:
            continue
        assert any(np.shares_memory(a, array) for args in launches for a in args), (
            f"no kernel read the caller's {name} ({array.dtype}) in place: it was copied (upcast?) on the host")


# --------------------------------------------------------------------------- conversions
EDGES = np.array([
    0.0, -0.0, 1.0, -1.0, 0.1, -2.5, 3.0e38, -3.0e38, 3.4028235e38, np.inf, -np.inf, np.nan, -np.nan,
    1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20,  # bf16 ties (to even) and just past
    1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65520.0, 70000.0,  # fp16 ties and overflow
    1e-40, -1e-40, 2**-133, 1.4e-45, 2**-126, 2**-24, 2**-25, 3 * 2**-26, 6.0e-8,  # subnormals
], dtype=np.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 70000 -> float16 inf, on purpose
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_device_store_and_load_match_ml_dtypes_bit_for_bit(dtype, rng):
    prec = precision.precision(dtype)
    load, store = prec.load, prec.store
    values = np.concatenate([EDGES, (rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200))
                             .astype(np.float32)])

    @cuda.jit
    def roundtrip(source, stored, loaded):
        i = cuda.grid(1)
        if i < source.size:
            store(stored, i, source[i])
            loaded[i] = load(stored, i)

    stored = np.zeros(values.size, prec.storage)
    loaded = np.full(values.size, np.nan, np.float32)
    with np.errstate(over="ignore"):
        roundtrip[-(-values.size // 64), 64](values, stored, loaded)
        expected = values.astype(DTYPES[dtype])
    got = precision.user_view(stored, dtype)
    nan = np.isnan(values)
    assert np.isnan(got[nan].astype(np.float32)).all(), "a NaN must stay NaN"
    np.testing.assert_array_equal(got[~nan].view(np.uint16), expected[~nan].view(np.uint16))
    np.testing.assert_array_equal(loaded[~nan], expected[~nan].astype(np.float32))  # load is exact
    assert np.isnan(loaded[nan]).all()


def test_host_bf16_conversions_match_ml_dtypes():
    values = EDGES
    bits = precision.bf16_bits(values)
    expected = values.astype(BF16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(bits[~nan], expected[~nan].view(np.uint16))
    assert np.isnan(bits.view(BF16)[nan].astype(np.float32)).all()
    back = precision.to_compute(bits, "bfloat16", np)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back[~nan], expected[~nan].astype(np.float32))
    # a tie rounds to even, both ways
    assert precision.bf16_bits(np.float32([1 + 2**-8, 1 + 3 * 2**-8])).tolist() == [0x3F80, 0x3F82]


def test_precision_table():
    for name in ("float32", "float64"):
        p = precision.precision(name)
        assert p.storage == p.compute == np.dtype(name) and not p.is_half
    assert precision.precision("float16").storage == np.float16
    assert precision.precision(BF16).storage == np.uint16
    assert all(precision.precision(d).compute == np.float32 for d in DTYPES.values())
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        precision.precision("int8")


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(dn.METHODS))
def test_forward_in_half_against_float64_reference(method, dtype, rng, recorded):
    g = geometry(dtype, which=list(dn.METHODS).index(method) % 2)
    x, offset, weight, bias, mask = arrays = half_arrays(g, rng)
    copies = [a.copy() for a in arrays if a is not None]
    out = dn.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask, method=method)
    expected = reference.deform_conv2d(f64(x), f64(offset), f64(weight), f64(bias), **conv_kwargs(g), mask=f64(mask))
    check_close(out, expected, dtype, f"{method} forward")
    assert_read_in_place(recorded, {"input": x, "offset": offset, "mask": mask})
    for before, after in zip(copies, [a for a in arrays if a is not None]):
        np.testing.assert_array_equal(before.view(np.uint16), after.view(np.uint16))


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(dn.BACKWARD_METHODS))
def test_backward_in_half_against_float64_reference(method, dtype, deterministic, rng, recorded):
    g = geometry(dtype, which=(list(dn.BACKWARD_METHODS).index(method) + deterministic) % 2)
    x, offset, weight, bias, mask = half_arrays(g, rng)
    grad_output = rng.standard_normal(g.shapes["output"]).astype(DTYPES[dtype])
    grads = dn.deform_conv2d_backward(grad_output, x, offset, weight, bias, **conv_kwargs(g), mask=mask,
                                      method=method, deterministic=deterministic)
    ref = reference.deform_conv2d_backward(f64(grad_output), f64(x), f64(offset), f64(weight), f64(bias),
                                           **conv_kwargs(g), mask=f64(mask))
    for field in FIELDS:
        value, expected = getattr(grads, field), getattr(ref, field)
        if expected is None:
            assert value is None, field
            continue
        check_close(value, expected, dtype, f"{method} grad {field}")
    # The column methods regroup grad_output into [Gw, Og, N*P] in the compute dtype for their
    # cuBLAS GEMMs (a copy by design: "grad_out regroup" in dcn.roofline), so no kernel reads
    # it; until session 25 their sample kernel took it as an unused argument, which this check
    # mistook for an in-place read. The column-free fused method reads it in place.
    in_place = {"input": x, "offset": offset, "mask": mask}
    if method == "fused":
        in_place["grad_output"] = grad_output
    assert_read_in_place(recorded, in_place)


def test_deterministic_half_backward_is_bit_identical(rng):
    g = geometry("bfloat16", 0)
    arrays = half_arrays(g, rng)
    grad_output = rng.standard_normal(g.shapes["output"]).astype(BF16)
    runs = []
    for seed in (1, 2):
        with backend.order_varying(seed):
            runs.append(dn.deform_conv2d_backward(grad_output, *arrays[:4], **conv_kwargs(g), mask=arrays[4],
                                                  method="fused", deterministic=True))
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(runs[0], field).view(np.uint16), getattr(runs[1], field).view(np.uint16))


# --------------------------------------------------------------------------- arguments
def test_mixed_half_dtypes_are_refused(rng):
    g = geometry("float16", 0)
    x, offset, weight, bias, mask = half_arrays(g, rng)
    with pytest.raises(TypeError, match="one dtype"):
        dn.deform_conv2d(x, offset.astype(BF16), weight, bias, **conv_kwargs(g), mask=mask)
    with pytest.raises(TypeError, match=r"grad_output must have the dtype of input \(float16\), got bfloat16"):
        dn.deform_conv2d_backward(np.zeros(g.shapes["output"], BF16), x, offset, weight, bias,
                                  **conv_kwargs(g), mask=mask)


def test_error_lists_the_accepted_dtypes(rng):
    g = geometry("float16", 0)
    x, offset, weight, bias, mask = half_arrays(g, rng)
    with pytest.raises(TypeError, match=r"input must be float32, float64, float16 or bfloat16, got int16"):
        dn.deform_conv2d(x.view(np.int16), offset, weight, bias, **conv_kwargs(g), mask=mask)
    with pytest.raises(TypeError, match=r"in native byte order"):
        dn.deform_conv2d(x.astype(">f2"), offset, weight, bias, **conv_kwargs(g), mask=mask)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tucker_and_lean_still_refuse_halves_clearly(dtype):
    from deftnumba.lean.geometry import check_forward as lean_check
    from deftnumba.tucker.geometry import check_tucker

    d = DTYPES[dtype]
    x = np.zeros((1, 2, 4, 4), d)
    with pytest.raises(TypeError, match=rf"input must be float32 or float64, got {dtype}"):
        check_tucker(x, np.zeros((2, 2, 1, 1), d), np.zeros((2, 2, 3, 3), d), np.zeros((2, 2, 1, 1), d))
    with pytest.raises(TypeError, match=rf"input must be float32 or float64, got {dtype}"):
        lean_check(x, np.zeros((2, 2), d), np.zeros((2, 2), d), None, 1, ((0, 0), (0, 1)))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_empty_layers_in_half(dtype, rng):
    """A batch of 0 and no input channels: the right shapes, the storage dtype, the bias alone."""
    d = DTYPES[dtype]
    for changes in ({"batch": 0}, {"in_channels": 0}):
        g = Geometry(**{**geometry(dtype, 0).__dict__, **changes})
        shapes = g.shapes
        x, offset, mask = (np.zeros(shapes[k], d) for k in ("input", "offset", "mask"))
        weight = np.zeros(shapes["weight"], d)
        bias = rng.standard_normal(shapes["bias"]).astype(d)
        out = dn.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
        assert out.shape == shapes["output"] and out.dtype == d
        expected = np.broadcast_to(bias.reshape(1, -1, 1, 1), shapes["output"])
        np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))
        grad_output = rng.standard_normal(shapes["output"]).astype(d)
        grads = dn.deform_conv2d_backward(grad_output, x, offset, weight, bias, **conv_kwargs(g), mask=mask)
        for field in FIELDS:
            value = getattr(grads, field)
            assert value.dtype == d and value.shape == shapes[field], field
        np.testing.assert_allclose(grads.bias.astype(np.float64),
                                   grad_output.astype(np.float64).sum(axis=(0, 2, 3)), rtol=UNIT_ROUNDOFF[dtype])
