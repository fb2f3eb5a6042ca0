"""Fire-and-forget atomic addition: ``red_add(array, index, value)``.

``cuda.atomic.add`` returns the old value. Even where a kernel ignores it, ptxas
(CUDA 13, sm_90) keeps the value-returning form: ``atom.global.add.f32`` becomes
``ATOMG.E.ADD.F32 ... PT, RZ, ...`` (the result register is RZ, but the
instruction is still a round trip that the warp's scoreboard waits on), never the
reduction ``RED.E.ADD.F32``. The PTX instruction ``red.global.add.f32`` (or
``.f64``) says "add, I do not want the old value"; ptxas lowers it to ``RED``.

``red_add`` is that instruction, emitted by a small Numba intrinsic (inline PTX, as
numba-cuda's own cache-hint stores do). In the simulator, which cannot run inline
PTX, it is a device function calling ``cuda.atomic.add``: the same sum, and the
simulator's atomic lock.

``array`` is a 1-D float32/float64 array and ``index`` an integer (unsigned is best:
no negative-index wraparound code). The caller must keep ``index`` in bounds; as with
every atomic, the order of additions from different threads is unspecified.
"""

from __future__ import annotations

from ...runtime import backend
from ...runtime.backend import cuda

if backend.IS_SIMULATOR:

    @cuda.jit(device=True)
    def red_add(array, index, value):
        """``array[index] += value`` atomically, result unused (simulator fallback)."""
        cuda.atomic.add(array, index, value)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def red_add(typingctx, array, index, value):
        """``red.global.add.f{32,64} [&array[index]], value``: an atomic add with no result."""
        if not isinstance(array, types.Array) or array.ndim != 1 or array.dtype not in (types.float32,
                                                                                        types.float64):
            return None
        if not isinstance(index, types.Integer):
            return None
        signature = types.void(array, index, value)

        def codegen(context, builder, sig, args):
            array_type, index_type, value_type = sig.args
            array_value, index_value, value_value = args
            ary = context.make_array(array_type)(context, builder, array_value)
            index_intp = context.cast(builder, index_value, index_type, types.intp)
            pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [index_intp],
                                               wraparound=False)
            element = context.get_value_type(array_type.dtype)
            stored = context.cast(builder, value_value, value_type, array_type.dtype)
            bits = array_type.dtype.bitwidth
            asm_type = ir.FunctionType(ir.VoidType(), [element.as_pointer(), element])
            constraint = "f" if bits == 32 else "d"
            red = ir.InlineAsm(asm_type, f"red.global.add.f{bits} [$0], $1;", f"l,{constraint},~{{memory}}",
                               side_effect=True)
            builder.call(red, [pointer, stored])

        return signature, codegen
