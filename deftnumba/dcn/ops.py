"""The public functions: validate once, pick a method, allocate, launch.

``deform_conv2d`` has the signature, argument order and semantics of
``torchvision.ops.deform_conv2d``; see ``deftnumba.reference`` for the rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..runtime import backend, precision, timing
from .planning import plan as tiling
from .geometry import check_backward, check_forward
from .kernels import backward as _backward
from .kernels import backward_fused as _backward_fused
from .kernels import fused_columns, fused_tiled, im2col

# Forward methods by name. Each takes
# (geometry, input, offset, weight, bias, mask, out, stopwatch) and fills ``out``.
_FORWARD = {
    "im2col": im2col.forward,
    "fused_columns": fused_columns.forward,
    "fused": fused_tiled.forward,  # takes plan= too (its tile); see deftnumba.tiling
}
METHODS: tuple[str, ...] = tuple(_FORWARD)


def _pick_method(method: str, geometry, plan=None):
    """``(method name, plan)``. ``"auto"`` runs the plan's method (the given plan, or the
    cost model's: ``tiling.plan_for``); ``"fused"`` needs a plan with a tile."""
    if method == "auto":
        plan = plan if plan is not None else tiling.plan_for(geometry)
        method = plan.method
    elif method not in _FORWARD:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if method == "fused" and (plan is None or plan.tile is None):
        plan = tiling.plan_for(geometry, methods=("fused",))
    return method, plan


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  *, method: str = "auto", stopwatch=None, plan=None):
    """Deformable convolution (DCN v1, or v2 when ``mask`` is given).

    Arguments match ``torchvision.ops.deform_conv2d``:

    input:    ``[N, C, H, W]``
    offset:   ``[N, 2*offset_groups*kh*kw, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    weight:   ``[Cout, C/groups, kh, kw]``; groups = ``C // weight.shape[1]``
    bias:     ``[Cout]`` or ``None``
    stride, padding, dilation: int or pair
    mask:     ``[N, offset_groups*kh*kw, Ho, Wo]`` or ``None`` (DCN v1)

    All arrays share one dtype and one kind: CuPy arrays on the ``cuda`` backend give
    a CuPy result; NumPy arrays give a NumPy result on either backend (on the GPU they
    are copied over and back). The dtypes:

    * float32, float64: computed in that type;
    * float16 (NumPy or CuPy) and bfloat16 (NumPy ``ml_dtypes.bfloat16``; CuPy has no
      bfloat16 dtype, torch tensors go through ``deftnumba.DeformConv2d``): input, offset
      and mask are read in half by the kernels and the output is written in half, but
      every product and sum is float32. The weights (and bias) are converted to float32
      once per call (small), and the column methods' buffers and GEMMs are float32.
      The result is within a few half-precision roundings of the float64 result on the
      same (half) inputs; see docs/guarantees.md for the measured tolerances.

    method:    ``"auto"`` or one of ``deftnumba.METHODS``.
    stopwatch: optional ``deftnumba.runtime.timing.Stopwatch`` that times each operator.
    plan:      optional ``deftnumba.tiling.Plan`` (e.g. ``tiling.plan_for(geometry, offset)``):
               ``"auto"`` runs its method, and ``"fused"`` its tile.

    Returns ``[N, Cout, Ho, Wo]``. A batch of 0 or ``Cout = 0`` gives that empty
    shape, and ``C = 0`` (weight ``[Cout, 0, kh, kw]``) gives the bias alone (or
    zeros), all without launching a kernel.
    """
    geometry = check_forward(input, offset, weight, bias, stride, padding, dilation, mask)
    if geometry.is_empty:
        return _empty_forward(geometry, input, bias)
    name, plan = _pick_method(method, geometry, plan)
    host_result = not backend.is_cupy_array(input)
    arrays = [backend.to_device(precision.device_view(a)) if a is not None else None
              for a in (input, offset, weight, bias, mask)]
    xp = backend.array_module(arrays[0])
    out = xp.empty(geometry.shapes["output"], dtype=precision.storage_dtype(geometry.dtype))
    extra = {"plan": plan} if name == "fused" else {}
    _FORWARD[name](geometry, *arrays, out, stopwatch or timing.NO_STOPWATCH, **extra)
    out = backend.to_host(out) if host_result and not backend.IS_SIMULATOR else out
    return precision.user_view(out, geometry.dtype)


def _empty_forward(geometry, input, bias):
    """The result of a layer with nothing to sample (``geometry.is_empty``): zeros
    of the output's shape plus the bias, in the input's array kind. No kernel runs."""
    xp = backend.array_module(input)
    if precision.is_half(geometry.dtype):  # sum in float32, round once (bf16 bits on CuPy)
        out = xp.zeros(geometry.shapes["output"], dtype=np.float32)
        if bias is not None and out.size:
            out += precision.to_compute(xp.asarray(precision.device_view(bias)), geometry.dtype, xp).reshape(1, -1, 1, 1)
        out = precision.to_storage(out, geometry.dtype, xp)
        return precision.user_view(backend.to_host(out) if isinstance(input, np.ndarray) else out, geometry.dtype)
    out = xp.zeros(geometry.shapes["output"], dtype=input.dtype)
    if bias is not None and out.size:
        out += xp.asarray(bias).reshape(1, -1, 1, 1)
    return out


# --------------------------------------------------------------------------- backward
class DeformConv2dGrads(NamedTuple):
    """Gradients from ``deform_conv2d_backward``; ``bias``/``mask`` are None when not given."""

    input: Any
    offset: Any
    weight: Any
    bias: Any
    mask: Any


# Backward methods by name (see ``deftnumba.kernels.backward``). Each takes
# (geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
#  grad_weight, grad_bias, grad_mask, deterministic, stopwatch) and fills the grads.
_BACKWARD = {
    "im2col": _backward.backward_im2col,
    "fused_columns": _backward.backward_fused_columns,
    "fused": _backward_fused.backward,  # column-free; see kernels/backward_fused.py
}
# (``fused_gemm``, grad_cols recomputed per element on CUDA cores with no shared-memory
# tiling, 1.8-9.1% FFMA in its main loop, was retired in favour of ``fused``: issue 11.)
BACKWARD_METHODS: tuple[str, ...] = tuple(_BACKWARD)


def _pick_backward_method(method: str, geometry) -> str:
    if method == "auto":
        # Column-free (no [C*K, N*P] buffer) wherever its 32-bit in-image indexing holds;
        # otherwise one pass over the samples with the GEMMs in cuBLAS. Unmeasured: no GPU yet.
        return "fused" if _backward_fused.supported(geometry) else "fused_columns"
    if method not in _BACKWARD:
        raise ValueError(f"method must be 'auto' or one of {BACKWARD_METHODS}, got {method!r}")
    return method


def _empty(xp, shape, dtype):
    """Allocation of the gradients (a seam for tests that poison outputs)."""
    return xp.empty(shape, dtype=dtype)


def _empty_backward(geometry, grad_output, input, bias):
    """Gradients of a layer with nothing to sample (``geometry.is_empty``): every
    sample's contribution is an empty sum, so all are zero except the bias's,
    ``sum(grad_output)`` (itself zero for a batch of 0). No kernel runs."""
    xp = backend.array_module(input)
    shapes, dtype = geometry.shapes, input.dtype
    half = precision.is_half(geometry.dtype)
    if half:  # zeros in the storage dtype (bf16 bits on CuPy), in the input's array kind
        xp = np if isinstance(input, np.ndarray) else xp
        dtype = precision.storage_dtype(geometry.dtype)

    def zeros(name):
        return precision.user_view(xp.zeros(shapes[name], dtype=dtype), geometry.dtype)

    grad_bias = None
    if bias is not None and half:
        values = precision.to_compute(xp.asarray(precision.device_view(grad_output)), geometry.dtype, xp)
        grad_bias = precision.user_view(precision.to_storage(
            values.sum(axis=(0, 2, 3), dtype=np.float64).astype(np.float32), geometry.dtype, xp), geometry.dtype)
    elif bias is not None:
        grad_bias = xp.asarray(grad_output).sum(axis=(0, 2, 3), dtype=np.float64).astype(dtype)
    return DeformConv2dGrads(input=zeros("input"), offset=zeros("offset"), weight=zeros("weight"),
                             bias=grad_bias, mask=zeros("mask") if geometry.has_mask else None)


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                           mask=None, *, method: str = "auto", deterministic: bool = False, stopwatch=None):
    """Gradients of ``deform_conv2d`` with respect to all its array arguments.

    ``grad_output`` is ``dL/d out`` (``[N, Cout, Ho, Wo]``, the forward's dtype
    and array kind); the other arguments are the forward's, checked the same way.

    method:        ``"auto"`` or one of ``deftnumba.BACKWARD_METHODS``.
    deterministic: ``False`` scatters the input gradient with atomics (fast, run-to-run
                   float differences); ``True`` uses a sorted, order-fixed reduction and
                   gives bit-identical results on every run.
    stopwatch:     optional ``deftnumba.runtime.timing.Stopwatch`` that times each operator.

    Returns ``DeformConv2dGrads(input, offset, weight, bias, mask)``; ``bias`` and
    ``mask`` are None when those arguments are None. With a batch of 0, no input
    channels or ``Cout = 0`` the gradients are zeros of the right (possibly empty)
    shapes, the bias gradient the sum of ``grad_output``, without launching a kernel.
    """
    geometry = check_backward(grad_output, input, offset, weight, bias, stride, padding, dilation, mask)
    name = _pick_backward_method(method, geometry)
    if geometry.is_empty:
        return _empty_backward(geometry, grad_output, input, bias)
    host_result = not backend.is_cupy_array(input)
    arrays = [backend.to_device(precision.device_view(a)) if a is not None else None
              for a in (grad_output, input, offset, weight, mask)]
    xp = backend.array_module(arrays[1])
    shapes = geometry.shapes
    # float16/bfloat16: the kernels accumulate into float32 buffers, rounded once below
    prec = precision.precision(geometry.dtype)
    grads = DeformConv2dGrads(
        input=_empty(xp, shapes["input"], prec.compute),
        offset=_empty(xp, shapes["offset"], prec.compute),
        weight=_empty(xp, shapes["weight"], prec.compute),
        bias=_empty(xp, shapes["bias"], prec.compute) if bias is not None else None,
        mask=_empty(xp, shapes["mask"], prec.compute) if mask is not None else None,
    )
    _BACKWARD[name](geometry, *arrays, *grads, deterministic=bool(deterministic),
                    stopwatch=stopwatch or timing.NO_STOPWATCH)
    if prec.is_half:
        grads = DeformConv2dGrads(*(precision.to_storage(a, geometry.dtype, xp) if a is not None else None
                                    for a in grads))
    if host_result and not backend.IS_SIMULATOR:
        grads = DeformConv2dGrads(*(backend.to_host(a) if a is not None else None for a in grads))
    return DeformConv2dGrads(*(precision.user_view(a, geometry.dtype) for a in grads))
