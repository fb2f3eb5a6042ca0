"""Fire-and-forget atomic addition: ``red_add(array, index, value)`` and
``red_add_at(array, address, offset, value)`` (at a ``runtime.addresses`` handle), and
``keep_if``.

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

``red_add_at(array, address, offset, value)`` adds at ``array[i + offset]``, where
``address`` is the handle of ``array[i]`` (``runtime.addresses``): one 64-bit multiply-add
per addition where ``red_add(array, i + offset, ...)`` rebuilt the whole address.

``load_acquire(array, index)`` reads ``array[index]`` (a 1-D ``uint32`` array) with
``ld.acquire.gpu``: once it returns the value another block stored before a
release (``cuda.threadfence()``, then the atomic that publishes it), this thread's later
loads see that block's earlier stores, and the SM's L1 holds no stale copy of them. The
weight kernel's fixed-order reduction (``backward_fused.weight_grad_kernel``) waits on it.
In the simulator, which runs one block at a time, it is a plain load.

``arrives_last(counters, counter, arrivals)`` is the hand-off of a fixed-order reduction over
blocks: each block counts itself once its stores are released, and the last to arrive (and
only it) goes on to add everyone's partial sums in a fixed order.

``keep_if(value, mask)`` is ``value`` where the unsigned ``mask`` (of the value's width) is
all ones and an exact ``+0`` where it is zero: a bitwise AND, one ``LOP3``, where
``value if flag else 0`` cost a compare and a select at every use once the predicate
registers ran out. (Multiplying by 0 is no substitute: ``inf * 0`` is NaN.)
"""

from __future__ import annotations

import numpy as np

from . import backend
from .addresses import handle_arguments, pointer_at
from .backend import cuda

if backend.IS_SIMULATOR:

    @cuda.jit(device=True)
    def red_add(array, index, value):
        """``array[index] += value`` atomically, result unused (simulator fallback)."""
        cuda.atomic.add(array, index, value)

    @cuda.jit(device=True)
    def keep_if(value, mask):
        """``value`` where ``mask`` is all ones, an exact ``+0`` where it is zero (simulator)."""
        return value if mask != 0 else type(value)(0)

    @cuda.jit(device=True)
    def red_add_at(array, address, offset, value):
        """``array[address + offset] += value`` atomically, result unused (simulator fallback)."""
        cuda.atomic.add(array, address + offset, value)

    @cuda.jit(device=True)
    def load_acquire(array, index):
        """``array[index]`` (simulator: blocks run one at a time, a plain load sees every
        earlier block's stores)."""
        return array[index]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _red(builder, pointer, stored, bits):
        """Emit ``red.global.add.f{bits} [pointer], stored``."""
        element = stored.type
        asm_type = ir.FunctionType(ir.VoidType(), [pointer.type, element])
        constraint = "f" if bits == 32 else "d"
        red = ir.InlineAsm(asm_type, f"red.global.add.f{bits} [$0], $1;", f"l,{constraint},~{{memory}}",
                           side_effect=True)
        builder.call(red, [pointer, stored])

    def _float_array(array):
        return isinstance(array, types.Array) and array.ndim == 1 and array.dtype in (types.float32, types.float64)

    @intrinsic
    def red_add(typingctx, array, index, value):
        """``red.global.add.f{32,64} [&array[index]], value``: an atomic add with no result."""
        if not _float_array(array) or not isinstance(index, types.Integer):
            return None
        signature = types.void(array, index, value)

        def codegen(context, builder, sig, args):
            array_type, index_type, value_type = sig.args
            ary = context.make_array(array_type)(context, builder, args[0])
            index_intp = context.cast(builder, args[1], index_type, types.intp)
            pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [index_intp], wraparound=False)
            _red(builder, pointer, context.cast(builder, args[2], value_type, array_type.dtype),
                 array_type.dtype.bitwidth)

        return signature, codegen

    @intrinsic
    def keep_if(typingctx, value, mask):
        """``value``'s bits AND ``mask`` (a float and an unsigned integer of its width): ``value``
        where ``mask`` is all ones, ``+0`` where it is zero, NaN or infinity included (one
        ``LOP3``, where a compare and a select per use cost two)."""
        if value not in (types.float32, types.float64) or not isinstance(mask, types.Integer) \
                or mask.bitwidth != value.bitwidth:
            return None
        signature = value(value, mask)

        def codegen(context, builder, sig, args):
            word = ir.IntType(sig.args[0].bitwidth)
            bits = builder.and_(builder.bitcast(args[0], word), args[1])
            return builder.bitcast(bits, context.get_value_type(sig.args[0]))

        return signature, codegen

    @intrinsic
    def red_add_at(typingctx, array, address, offset, value):
        """``red.global.add.f{32,64}`` at the handle ``address`` (``runtime.addresses``) plus
        ``offset`` elements: ``array[i + offset] += value``, result unused."""
        if not _float_array(array) or not handle_arguments(array, address, offset):
            return None
        signature = types.void(array, address, offset, value)

        def codegen(context, builder, sig, args):
            array_type, _, offset_type, value_type = sig.args
            pointer = pointer_at(context, builder, array_type, args[1], args[2], offset_type)
            _red(builder, pointer, context.cast(builder, args[3], value_type, array_type.dtype),
                 array_type.dtype.bitwidth)

        return signature, codegen

    @intrinsic
    def load_acquire(typingctx, array, index):
        """``ld.acquire.gpu.global.u32`` of ``array[index]`` (a 1-D ``uint32`` array): later
        loads of this thread see what the block that released the value had stored."""
        if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype == types.uint32) \
                or not isinstance(index, types.Integer):
            return None
        signature = types.uint32(array, index)

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            ary = context.make_array(array_type)(context, builder, args[0])
            index_intp = context.cast(builder, args[1], index_type, types.intp)
            pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [index_intp], wraparound=False)
            asm_type = ir.FunctionType(ir.IntType(32), [pointer.type])
            load = ir.InlineAsm(asm_type, "ld.acquire.gpu.global.u32 $0, [$1];", "=r,l,~{memory}",
                                side_effect=True)
            return builder.call(load, [pointer])

        return signature, codegen


@cuda.jit(device=True, inline=True)
def arrives_last(counters, counter, arrivals):
    """For one thread of a block whose threads have all stored their share (a barrier after
    each thread's ``cuda.threadfence()``): publish the block's stores and count it in
    ``counters[counter]`` (a ``uint32`` array, zeroed before the launch); ``True`` in the block
    that arrives last of ``arrivals`` (uint32). The fence after the barrier releases the
    whole block's stores before the count; the last block's acquire load then makes every
    other block's stores visible to it (and leaves no stale copy in its SM's L1). The value
    it reads is always ``arrivals``. Nobody waits: whichever block is last carries on, the
    others return. (The rank splits of ``tucker.kernels.core_conv`` and ``winograd``.)"""
    cuda.threadfence()  # (release, after the barrier) the whole block's stores before the count
    last = False
    if cuda.atomic.add(counters, counter, np.uint32(1)) == np.uint32(arrivals - np.uint32(1)):
        last = load_acquire(counters, counter) == arrivals
    return last
