"""The public functions: validate once, pick a method, allocate, launch.

``deform_conv2d`` has the signature, argument order and semantics of
``torchvision.ops.deform_conv2d``; see ``deftnumba.reference`` for the rule.
"""

from __future__ import annotations

from . import backend
from .arguments import check_forward
from .kernels import fused_columns, im2col

# Forward methods by name. Each takes
# (geometry, input, offset, weight, bias, mask, out, stopwatch) and fills ``out``.
_FORWARD = {
    "im2col": im2col.forward,
    "fused_columns": fused_columns.forward,
}
METHODS: tuple[str, ...] = tuple(_FORWARD)


def _pick_method(method: str, geometry) -> str:
    if method == "auto":
        return "im2col"
    if method not in _FORWARD:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    return method


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  *, method: str = "auto", stopwatch=None):
    """Deformable convolution (DCN v1, or v2 when ``mask`` is given).

    Arguments match ``torchvision.ops.deform_conv2d``:

    input:    ``[N, C, H, W]``
    offset:   ``[N, 2*offset_groups*kh*kw, Ho, Wo]``, ``(dy, dx)`` interleaved per tap
    weight:   ``[Cout, C/groups, kh, kw]``; groups = ``C // weight.shape[1]``
    bias:     ``[Cout]`` or ``None``
    stride, padding, dilation: int or pair
    mask:     ``[N, offset_groups*kh*kw, Ho, Wo]`` or ``None`` (DCN v1)

    All arrays share one dtype (float32 or float64) and one kind: CuPy arrays on
    the ``cuda`` backend give a CuPy result; NumPy arrays give a NumPy result on
    either backend (on the GPU they are copied over and back).

    method:    ``"auto"`` or one of ``deftnumba.METHODS``.
    stopwatch: optional ``deftnumba.backend.Stopwatch`` that times each operator.

    Returns ``[N, Cout, Ho, Wo]``.
    """
    geometry = check_forward(input, offset, weight, bias, stride, padding, dilation, mask)
    name = _pick_method(method, geometry)
    host_result = not backend.is_cupy_array(input)
    arrays = [backend.to_device(a) if a is not None else None for a in (input, offset, weight, bias, mask)]
    xp = backend.array_module(arrays[0])
    out = xp.empty(geometry.shapes["output"], dtype=arrays[0].dtype)
    _FORWARD[name](geometry, *arrays, out, stopwatch or backend.NO_STOPWATCH)
    return backend.to_host(out) if host_result and not backend.IS_SIMULATOR else out
