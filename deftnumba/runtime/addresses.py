"""Element addresses a kernel computes once and offsets many times.

``element_address(array, index)`` is ``&array[index]`` as a 64-bit integer (a *handle*);
``offset_address(array, address, j)`` is the handle ``j`` elements further. Readers and
writers that take a handle and a run-time offset (``read_at`` here, ``precision``'s
``load_at``, ``runtime.atomics.red_add_at``) then cost one 64-bit multiply-add per access
(``IMAD.WIDE.U32``: the offset times the element size, plus the handle).

Why: a kernel that reads or updates the same few elements in every channel of a chunk
(``array[base + cc * plane]``, ``plane`` known only at run time) hands LLVM a sum it folds
into one index, and every access then rebuilds its address from scratch: a 64-bit add of
the index, then a shift-and-add onto the array's pointer (often reloaded from the constant
bank when registers are short), four to six instructions. The handle is opaque to the
optimiser (an inline ``mov.b64``), so the sum stays split: the handle per element, the
offset per access.

Handles are plain unsigned integers: the caller keeps every access inside the array, as
with a subscript. In the simulator a handle is the index itself and ``offset_address`` is
an index sum, so the simulator checks the same element arithmetic.
"""

from __future__ import annotations

from . import backend
from .backend import cuda

if backend.IS_SIMULATOR:

    @cuda.jit(device=True)
    def element_address(array, index):
        """The handle of ``array[index]`` (simulator: the index itself)."""
        return index

    @cuda.jit(device=True)
    def offset_address(array, address, offset):
        """The handle of the element ``offset`` past ``address`` (simulator: an index sum)."""
        return address + offset

    @cuda.jit(device=True)
    def read_at(array, address, offset):
        """The element ``offset`` past the handle ``address``, as stored (simulator: an index)."""
        return array[address + offset]

    pointer_at = handle_arguments = None

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _advance(context, builder, array_type, address, offset, offset_type):
        """``address + offset * itemsize`` as a 64-bit integer. A 32-bit unsigned offset goes
        through an inline ``mad.wide.u32`` (one ``IMAD.WIDE.U32``): LLVM, seeing a zero-extended
        32-bit sum multiplied in 64 bits, would otherwise redo the sum in 64 bits."""
        word = ir.IntType(64)
        itemsize = context.get_abi_sizeof(context.get_data_type(array_type.dtype))
        if isinstance(offset_type, types.Integer) and offset_type.bitwidth <= 32 and not offset_type.signed:
            narrow = context.cast(builder, offset, offset_type, types.uint32)
            mad = ir.InlineAsm(ir.FunctionType(word, [ir.IntType(32), word]),
                               f"mad.wide.u32 $0, $1, {itemsize}, $2;", "=l,r,l")
            return builder.call(mad, [narrow, address])
        step = builder.mul(context.cast(builder, offset, offset_type, types.uint64), ir.Constant(word, itemsize))
        return builder.add(address, step)

    def pointer_at(context, builder, array_type, address, offset, offset_type):
        """LLVM pointer (global address space: ``ld.global``) to the element ``offset`` past the
        handle ``address``, for intrinsics that read or write through a handle."""
        element = context.get_data_type(array_type.dtype)
        return builder.inttoptr(_advance(context, builder, array_type, address, offset, offset_type),
                                ir.PointerType(element, addrspace=1))

    def _one_dimensional(array):
        return isinstance(array, types.Array) and array.ndim == 1

    def handle_arguments(array, address, offset) -> bool:
        """Whether ``(array, address, offset)`` type as a handle access: a 1-D array, an integer
        handle and an integer offset (the typing check of every intrinsic that takes a handle)."""
        return _one_dimensional(array) and isinstance(address, types.Integer) and isinstance(offset, types.Integer)

    @intrinsic
    def element_address(typingctx, array, index):
        """``&array[index]`` as a uint64 handle, opaque to the optimiser."""
        if not _one_dimensional(array) or not isinstance(index, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            ary = context.make_array(array_type)(context, builder, args[0])
            index_intp = context.cast(builder, args[1], index_type, types.intp)
            pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [index_intp], wraparound=False)
            word = ir.IntType(64)
            move = ir.InlineAsm(ir.FunctionType(word, [word]), "mov.b64 $0, $1;", "=l,l")
            return builder.call(move, [builder.ptrtoint(pointer, word)])

        return types.uint64(array, index), codegen

    @intrinsic
    def offset_address(typingctx, array, address, offset):
        """The handle of the element ``offset`` past the handle ``address``."""
        if not handle_arguments(array, address, offset):
            return None

        def codegen(context, builder, sig, args):
            return _advance(context, builder, sig.args[0], args[1], args[2], sig.args[2])

        return types.uint64(array, address, offset), codegen

    @intrinsic
    def read_at(typingctx, array, address, offset):
        """The element ``offset`` past the handle ``address``, as stored (``ld.global``)."""
        if not handle_arguments(array, address, offset):
            return None

        def codegen(context, builder, sig, args):
            array_type, _, offset_type = sig.args
            return builder.load(pointer_at(context, builder, array_type, args[1], args[2], offset_type))

        return array.dtype(array, address, offset), codegen
