"""Storage precision: how a user's dtype is stored on the device and computed with.

One place decides, for every kernel of every system, what a dtype means:

==========  =========================  ==================  ========================
user dtype  device storage             compute (registers,  ``load`` / ``store``
                                       shared memory, sums)
==========  =========================  ==================  ========================
float64     float64                    float64             plain subscripts
float32     float32                    float32             plain subscripts
float16     float16                    float32             ``float32(x)`` / RNE cast
bfloat16    uint16 (the bf16 bits)     float32             bit shift / RNE rounding
==========  =========================  ==================  ========================

* **float32, float64**: ``load(a, i)`` is ``a[i]`` and ``store(a, i, v)`` is ``a[i] = v``,
  inlined by Numba, so the kernels compile to the same code as plain subscripts.
* **float16**: stored as IEEE half; loaded as ``float32(x)`` (exact), stored with a
  round-to-nearest-even cast.
* **bfloat16**: on the NumPy side an ``ml_dtypes.bfloat16`` array; on the device its bits
  travel as ``uint16`` (CuPy has no bfloat16 dtype). Loading is ``bits << 16``
  reinterpreted as float32 (exact); storing rounds float32 to nearest even, a NaN staying
  a NaN. On a GPU the load's reinterpretation is an LLVM ``bitcast`` (a Numba intrinsic:
  a register move) and the store is sm_80+'s ``cvt.rn.bf16.f32`` (inline PTX); the
  simulator cannot run either, so its device functions round on the bits
  (``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, the quiet bit set on a NaN, as the host's
  ``bf16_bits``) and reinterpret NumPy scalars (``.view``). Which one is chosen when the
  precision is first asked for, by the backend.

Kernels take ``dtype`` (the user's dtype name) in their factories and get ``T`` (the
compute type) and ``load``/``store`` from ``precision(dtype)``; for float32/float64
nothing changes. The host helpers move arrays between the user's view and the device's
(``device_view``, ``user_view``) and convert between storage and compute arrays in the
array module (``to_compute``, ``to_storage``), e.g. a float32 gradient buffer to the
storage dtype once at the end of a backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import backend
from .backend import cuda

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FULL_DTYPES = (FLOAT32, FLOAT64)
HALF_DTYPES = (FLOAT16, BFLOAT16)
ALL_DTYPES = FULL_DTYPES + HALF_DTYPES
BF16_BITS = np.dtype(np.uint16)  # bfloat16's device storage


def as_dtype(dtype) -> np.dtype:
    """``np.dtype`` of a dtype, a scalar type or a name (``"bfloat16"`` included)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return BFLOAT16
    return np.dtype(dtype)


def is_half(dtype) -> bool:
    return as_dtype(dtype) in HALF_DTYPES


def compute_dtype(dtype) -> np.dtype:
    """The arithmetic dtype of ``dtype``: float32 for the halves, else ``dtype`` itself."""
    d = as_dtype(dtype)
    return FLOAT32 if d in HALF_DTYPES else d


def storage_dtype(dtype) -> np.dtype:
    """The device array dtype of ``dtype``: ``uint16`` for bfloat16, else ``dtype`` itself."""
    d = as_dtype(dtype)
    return BF16_BITS if d == BFLOAT16 else d


def numba_type(dtype):
    """The Numba scalar type of ``dtype``'s device storage (for audit signatures)."""
    from numba import types

    return getattr(types, storage_dtype(dtype).name)


# --------------------------------------------------------------------------- device functions
def _plain():
    @cuda.jit(device=True, inline="always")
    def load(array, index):
        """``array[index]``: storage is the compute type."""
        return array[index]

    @cuda.jit(device=True, inline="always")
    def store(array, index, value):
        """``array[index] = value``."""
        array[index] = value

    return load, store


def _float16():
    f32, f16 = np.float32, np.float16

    @cuda.jit(device=True, inline="always")
    def load(array, index):
        """A float16 element as float32 (exact)."""
        return f32(array[index])

    @cuda.jit(device=True, inline="always")
    def store(array, index, value):
        """``value`` rounded to the nearest float16 (ties to even)."""
        array[index] = f16(value)

    return load, store


@functools.cache
def _bitcasts():
    """GPU only: ``(bits_to_float, float_to_bits)``, uint32 <-> float32 reinterpretations as
    Numba intrinsics (one LLVM ``bitcast``: a register move). Not libdevice's
    ``int_as_float``/``float_as_int``: those stay opaque calls until libdevice is linked
    after optimisation, and a call in the fused kernel's epilogue kept LLVM from unrolling
    it, leaving the accumulators in local memory."""
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def bits_to_float(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            word = context.cast(builder, args[0], sig.args[0], types.uint32)
            return builder.bitcast(word, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def float_to_bits(typingctx, value):
        if not isinstance(value, types.Float):
            return None

        def codegen(context, builder, sig, args):
            single = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(single, ir.IntType(32))

        return types.uint32(value), codegen

    @intrinsic
    def round_to_bf16(typingctx, value):
        """``cvt.rn.bf16.f32``: float32 -> bfloat16 bits, to nearest even, NaN kept NaN (sm_80+)."""
        if not isinstance(value, types.Float):
            return None

        def codegen(context, builder, sig, args):
            single = context.cast(builder, args[0], sig.args[0], types.float32)
            cvt = ir.InlineAsm(ir.FunctionType(ir.IntType(16), [ir.FloatType()]), "cvt.rn.bf16.f32 $0, $1;",
                               "=h,f")
            return builder.call(cvt, [single])

        return types.uint16(value), codegen

    return bits_to_float, float_to_bits, round_to_bf16


def _bfloat16():
    u32, u16, f32 = np.uint32, np.uint16, np.float32
    SHIFT = np.uint32(16)
    HALF_ULP = np.uint32(0x7FFF)
    QUIET = np.uint32(0x40)  # the quiet bit of a bf16 NaN

    if backend.IS_SIMULATOR:  # no intrinsics there: reinterpret NumPy scalars

        @cuda.jit(device=True)
        def bits_to_float(bits):
            return u32(bits).view(f32)

        @cuda.jit(device=True)
        def float_to_bits(value):
            return f32(value).view(u32)
    else:
        bits_to_float, float_to_bits, round_to_bf16 = _bitcasts()

    @cuda.jit(device=True, inline="always")
    def load(array, index):
        """The bf16 bits ``array[index]`` (uint16) as float32: ``bits << 16`` (exact)."""
        return bits_to_float(u32(u32(array[index]) << SHIFT))

    if backend.IS_SIMULATOR:

        @cuda.jit(device=True)
        def store(array, index, value):
            """``value`` rounded to the nearest bfloat16 (ties to even) into the uint16 ``array``;
            a NaN stays a (quiet) NaN, +-inf and overflow give +-inf."""
            bits = float_to_bits(value)
            if value != value:  # NaN: keep the sign and payload's top bits, set the quiet bit
                array[index] = u16(u32(bits >> SHIFT) | QUIET)
            else:
                array[index] = u16(u32(u32(bits + u32(HALF_ULP + u32(u32(bits >> SHIFT) & u32(1)))) >> SHIFT))
    else:

        @cuda.jit(device=True, inline="always")
        def store(array, index, value):
            """``value`` rounded to the nearest bfloat16 (ties to even, NaN kept NaN, overflow to
            +-inf) into the uint16 ``array``: sm_80+'s ``cvt.rn.bf16.f32``, one instruction.
            (The simulator's version does the same rounding on the bits, as ``bf16_bits``; a
            branchy version here kept LLVM from unrolling the fused kernel's epilogue.)"""
            array[index] = round_to_bf16(value)

    return load, store


@dataclass(frozen=True)
class Precision:
    """What a user dtype means on the device (see the module docstring)."""

    name: str             # "float16", "bfloat16", "float32", "float64"
    user: np.dtype        # the NumPy dtype the user passes
    storage: np.dtype     # the device arrays' dtype (uint16 for bfloat16)
    compute: np.dtype     # registers, shared memory, accumulators
    T: type               # the compute scalar type (np.float32 / np.float64)
    load: object          # device function load(array, index) -> T
    store: object         # device function store(array, index, value)

    @property
    def is_half(self) -> bool:
        return self.user in HALF_DTYPES


@functools.cache
def _precision(name: str) -> Precision:
    user = as_dtype(name)
    if user not in ALL_DTYPES:
        raise TypeError(f"dtype must be one of {dtype_names(ALL_DTYPES)}, got {name}")
    maker = _float16 if user == FLOAT16 else _bfloat16 if user == BFLOAT16 else _plain
    load, store = maker()
    compute = compute_dtype(user)
    return Precision(user.name, user, storage_dtype(user), compute, compute.type, load, store)


def precision(dtype) -> Precision:
    """The ``Precision`` of a dtype (a ``np.dtype``, scalar type or name), cached per dtype."""
    return _precision(as_dtype(dtype).name)


def dtype_names(dtypes) -> str:
    """``"float32, float64, float16 or bfloat16"``: for error messages."""
    names = [as_dtype(d).name for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# --------------------------------------------------------------------------- host helpers
_CUPY_BF16 = contextvars.ContextVar("deftnumba_cupy_bfloat16", default=False)


@contextlib.contextmanager
def cupy_uint16_is_bfloat16():
    """Inside this block a CuPy ``uint16`` array is taken as bfloat16 bits (``user_dtype``).

    CuPy has no bfloat16 dtype, so the torch layer passes a CUDA ``torch.bfloat16`` tensor
    as a zero-copy ``uint16`` view and says so with this context; outside it a ``uint16``
    array is what it looks like (and is rejected)."""
    token = _CUPY_BF16.set(True)
    try:
        yield
    finally:
        _CUPY_BF16.reset(token)


def user_dtype(a) -> np.dtype:
    """The dtype an argument array stands for: its own, except a CuPy ``uint16`` array inside
    ``cupy_uint16_is_bfloat16``, which is bfloat16."""
    d = np.dtype(a.dtype)
    if d == BF16_BITS and _CUPY_BF16.get() and backend.is_cupy_array(a):
        return BFLOAT16
    return d


def device_view(a):
    """The array the kernels get for a user array: a bfloat16 NumPy array as its uint16 bits
    (a view, no copy); every other array as it is."""
    if a is not None and isinstance(a, np.ndarray) and a.dtype == BFLOAT16:
        return a.view(BF16_BITS)
    return a


def user_view(a, dtype):
    """The inverse of ``device_view`` for a result of user dtype ``dtype``: uint16 NumPy bits
    viewed as ``ml_dtypes.bfloat16``; anything else (a CuPy array included) unchanged."""
    if a is not None and as_dtype(dtype) == BFLOAT16 and isinstance(a, np.ndarray) and a.dtype == BF16_BITS:
        return a.view(BFLOAT16)
    return a


def to_compute(a, dtype, xp):
    """A device (storage) array of user dtype ``dtype`` as a new compute-dtype array (float32
    for the halves; a float32/float64 array is returned as it is)."""
    d = as_dtype(dtype)
    if d == BFLOAT16:
        return (xp.asarray(a).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if d == FLOAT16:
        return xp.asarray(a).astype(np.float32)
    return a


def bf16_bits(values, xp=np):
    """float32 ``values`` -> bfloat16 bits (uint16), rounded to nearest even, NaN kept NaN (the
    device ``store``'s rule, for whole arrays in the array module)."""
    bits = xp.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    high = bits >> np.uint32(16)
    rounded = (bits + (np.uint32(0x7FFF) + (high & np.uint32(1)))) >> np.uint32(16)
    return xp.where(values != values, high | np.uint32(0x40), rounded).astype(np.uint16)


def to_storage(a, dtype, xp):
    """A compute-dtype device array as a new storage array of user dtype ``dtype`` (float16:
    RNE cast; bfloat16: RNE bits as uint16; float32/float64: cast only if it differs)."""
    d = as_dtype(dtype)
    if d == BFLOAT16:
        return bf16_bits(a.astype(np.float32, copy=False), xp)
    return a.astype(d, copy=False)


def store_into(target, values, dtype, xp) -> None:
    """``target[...] = values`` (compute dtype) in the storage of user dtype ``dtype``."""
    if as_dtype(dtype) == BFLOAT16:
        target[...] = bf16_bits(values, xp)
    else:
        target[...] = values
