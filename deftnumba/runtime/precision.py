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

* **float32, float64**: ``load(a, i)`` is ``a[i]`` and ``store(a, i, v)`` is ``a[i] = v``
  (on a GPU, intrinsics that lower to Numba's own subscript at the caller's line), so the
  kernels compile to the same code as plain subscripts.
* **float16**: stored as IEEE half; loaded as ``float32(x)`` (exact), stored with a
  round-to-nearest-even cast.
* **bfloat16**: on the NumPy side an ``ml_dtypes.bfloat16`` array; on the device its bits
  travel as ``uint16`` (CuPy has no bfloat16 dtype). Loading is ``bits << 16``
  reinterpreted as float32 (exact); storing rounds float32 to nearest even, a NaN staying
  a NaN. On a GPU the load's reinterpretation is an LLVM ``bitcast`` (a register move)
  and the store is sm_80+'s ``cvt.rn.bf16.f32`` (inline PTX); the simulator cannot run
  intrinsics, so its device functions round on the bits
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

from . import addresses, backend
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
# Simulator: plain Python device functions (NumPy scalars). GPU: Numba intrinsics, whose code
# is emitted at the caller's statement, so the SASS audit attributes a load or store to the
# kernel line that asks for it, exactly as it did a subscript (an inlined device function
# would carry this file's lines); for float32/float64 they lower to Numba's own subscript.
def _simulator_functions(kind: str):
    u32, u16, f32, f16 = np.uint32, np.uint16, np.float32, np.float16
    SHIFT = np.uint32(16)
    HALF_ULP = np.uint32(0x7FFF)
    QUIET = np.uint32(0x40)  # the quiet bit of a bf16 NaN

    if kind == "plain":

        @cuda.jit(device=True)
        def load(array, index):
            """``array[index]``: storage is the compute type."""
            return array[index]

        @cuda.jit(device=True)
        def store(array, index, value):
            """``array[index] = value``."""
            array[index] = value

    elif kind == "float16":

        @cuda.jit(device=True)
        def load(array, index):
            """A float16 element as float32 (exact)."""
            return f32(array[index])

        @cuda.jit(device=True)
        def store(array, index, value):
            """``value`` rounded to the nearest float16 (ties to even)."""
            array[index] = f16(value)

    else:

        @cuda.jit(device=True)
        def load(array, index):
            """The bf16 bits ``array[index]`` (uint16) as float32: ``bits << 16`` (exact)."""
            return u32(u32(array[index]) << SHIFT).view(f32)

        @cuda.jit(device=True)
        def store(array, index, value):
            """``value`` rounded to the nearest bfloat16 (ties to even) into the uint16 ``array``;
            a NaN stays a (quiet) NaN, +-inf and overflow give +-inf (``bf16_bits``'s rule)."""
            bits = f32(value).view(u32)
            if value != value:  # NaN: keep the sign and payload's top bits, set the quiet bit
                array[index] = u16(u32(bits >> SHIFT) | QUIET)
            else:
                array[index] = u16(u32(u32(bits + u32(HALF_ULP + u32(u32(bits >> SHIFT) & u32(1)))) >> SHIFT))

    @cuda.jit(device=True)
    def load_at(array, address, offset):
        """``load`` of the element ``offset`` past the handle ``address`` (simulator: an index)."""
        return load(array, address + offset)

    return load, store, load_at


def _gpu_functions(kind: str):
    """``load``/``store`` intrinsics. ``load``: Numba's ``array[index]``, then for float16
    Numba's cast to float32 (``cvt.f32.f16``) and for bfloat16 ``zext``, ``shl 16`` and a ``bitcast`` (a register
    move). ``store``: the value cast to the storage type -- float16 ``cvt.rn.f16.f32``,
    bfloat16 sm_80+'s ``cvt.rn.bf16.f32`` (inline PTX; to nearest even, NaN kept NaN,
    overflow to inf) -- then Numba's ``array[index] = value``. (A bf16 store that rounded on
    the bits with a NaN branch kept LLVM from unrolling the fused kernel's epilogue: its 64
    accumulators went to local memory.)"""
    import operator

    from llvmlite import ir
    from numba import types
    from numba.core.typing import signature
    from numba.cuda.extending import intrinsic

    f32_ir = ir.FloatType()

    def compute_type(array):
        return array.dtype if kind == "plain" else types.float32

    def to_compute(context, builder, raw, array_type):
        """A loaded storage element as the compute type."""
        if kind == "plain":
            return raw
        if kind == "float16":  # Numba's float16 is an i16 in LLVM: its own cast (cvt.f32.f16)
            return context.cast(builder, raw, array_type.dtype, types.float32)
        word = builder.shl(builder.zext(raw, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(word, f32_ir)

    @intrinsic
    def load(typingctx, array, index):
        if not isinstance(array, types.Array) or not isinstance(index, (types.Integer, types.BaseTuple)):
            return None

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            getitem = context.get_function(operator.getitem, signature(array_type.dtype, array_type, index_type))
            return to_compute(context, builder, getitem(builder, args), array_type)

        return compute_type(array)(array, index), codegen

    @intrinsic
    def load_at(typingctx, array, address, offset):
        """``load`` through a handle (``runtime.addresses``): ``offset`` elements past ``address``."""
        if not isinstance(array, types.Array) or array.ndim != 1 or not isinstance(address, types.Integer) \
                or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            array_type, _, offset_type = sig.args
            pointer = addresses.pointer_at(context, builder, array_type, args[1], args[2], offset_type)
            return to_compute(context, builder, builder.load(pointer), array_type)

        return compute_type(array)(array, address, offset), codegen

    @intrinsic
    def store(typingctx, array, index, value):
        if (not isinstance(array, types.Array) or not isinstance(index, (types.Integer, types.BaseTuple))
                or not isinstance(value, (types.Float, types.Integer))):
            return None

        def codegen(context, builder, sig, args):
            array_type, index_type, value_type = sig.args
            array_value, index_value, value_value = args
            if kind == "plain":
                stored = context.cast(builder, value_value, value_type, array_type.dtype)
            else:
                single = context.cast(builder, value_value, value_type, types.float32)
                if kind == "float16":  # cvt.rn.f16.f32
                    stored = context.cast(builder, single, types.float32, array_type.dtype)
                else:
                    cvt = ir.InlineAsm(ir.FunctionType(ir.IntType(16), [f32_ir]), "cvt.rn.bf16.f32 $0, $1;",
                                       "=h,f")
                    stored = builder.call(cvt, [single])
            setitem = context.get_function(operator.setitem,
                                           signature(types.none, array_type, index_type, array_type.dtype))
            setitem(builder, (array_value, index_value, stored))
            return context.get_dummy_value()

        return types.none(array, index, value), codegen

    return load, store, load_at


def _device_functions(kind: str):
    return _simulator_functions(kind) if backend.IS_SIMULATOR else _gpu_functions(kind)


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
    load_at: object       # device function load_at(array, address, offset) -> T (runtime.addresses)

    @property
    def is_half(self) -> bool:
        return self.user in HALF_DTYPES


@functools.cache
def _precision(name: str) -> Precision:
    user = as_dtype(name)
    if user not in ALL_DTYPES:
        raise TypeError(f"dtype must be one of {dtype_names(ALL_DTYPES)}, got {name}")
    load, store, load_at = _device_functions("float16" if user == FLOAT16 else "bfloat16" if user == BFLOAT16
                                             else "plain")
    compute = compute_dtype(user)
    return Precision(user.name, user, storage_dtype(user), compute, compute.type, load, store, load_at)


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
