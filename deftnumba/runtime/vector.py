"""128-bit global loads: ``load_vector(array, index)``.

Numba types a global array's elements with the alignment of one element, so LLVM may
not fuse four consecutive float32 loads into one ``LDG.E.128``: it cannot prove that
their address is a multiple of 16. Where the caller knows better (an array that the
array module allocated, 256-byte aligned, read at an index that is a multiple of the
vector width), ``load_vector`` says so: one LLVM load of a ``<n x T>`` vector with
``align 16`` (n = 4 for float32, 2 for float64), returned as a ``UniTuple`` of n
elements. ptxas emits one ``LDG.E.128`` for it. The shared-memory side needs no help:
``cuda.shared.array(..., alignment=16)`` lets LLVM fuse the n stores into one
``STS.128`` when the index is visibly a multiple of n.

``VECTOR_BYTES // itemsize`` is the width (``vector_width``); ``vector_aligned`` makes a
caller's array safe to read so. In the simulator, which
cannot run an intrinsic, ``load_vector`` is a device function that reads the n
elements one by one and raises ``IndexError`` for an index that is not a multiple of
n (the alignment the GPU version assumes), so the tests check the claim.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import cuda

VECTOR_BYTES = 16


def vector_aligned(xp, array):
    """``array`` itself when its data starts on a 16-byte boundary (``load_vector``'s contract:
    CuPy's and NumPy's own allocations do), else an aligned copy. A view into a larger array
    (``x[1:]``) may start anywhere; a misaligned ``LDG.128`` is a fault on the GPU."""
    address = array.data.ptr if backend.is_cupy_array(array) else array.__array_interface__["data"][0]
    return array if address % VECTOR_BYTES == 0 else xp.array(array, copy=True)


def vector_width(dtype) -> int:
    """Elements in one 16-byte vector of ``dtype``: 4 for float32, 2 for float64."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def slice_vector_width(elements: int, dtype) -> int:
    """Elements per step of a kernel's copy of a contiguous slice of ``elements``: a 16-byte
    vector where the slice is a whole number of them, else one (the kernels' rule)."""
    vw = vector_width(dtype)
    return vw if elements % vw == 0 else 1


if backend.IS_SIMULATOR:

    @cuda.jit(device=True)
    def load_vector(array, index):
        """``array[index : index + n]`` as a tuple (simulator: element by element, index checked
        to be a multiple of n)."""
        n = VECTOR_BYTES // array.itemsize
        index = int(index)
        if index % n:
            raise IndexError(f"load_vector: index {index} is not a multiple of {n} (16-byte alignment)")
        return tuple(array[index + k] for k in range(n))

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def load_vector(typingctx, array, index):
        """One 16-byte load of ``array[index : index + n]`` (``align 16``): the caller
        guarantees that ``index`` is a multiple of n and the array 16-byte aligned."""
        if not isinstance(array, types.Array) or array.ndim != 1 or array.dtype not in (types.float32,
                                                                                        types.float64):
            return None
        if not isinstance(index, types.Integer):
            return None
        n = VECTOR_BYTES * 8 // array.dtype.bitwidth
        signature = types.UniTuple(array.dtype, n)(array, index)

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            array_value, index_value = args
            ary = context.make_array(array_type)(context, builder, array_value)
            index_intp = context.cast(builder, index_value, index_type, types.intp)
            pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [index_intp], wraparound=False)
            element = context.get_value_type(array_type.dtype)
            vector = ir.VectorType(element, n)
            loaded = builder.load(builder.bitcast(pointer, vector.as_pointer()), align=VECTOR_BYTES)
            items = [builder.extract_element(loaded, ir.Constant(ir.IntType(32), k)) for k in range(n)]
            return context.make_tuple(builder, sig.return_type, items)

        return signature, codegen
