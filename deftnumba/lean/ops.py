"""The public lean functions: validate once, pick a method, allocate, launch.

``lean_conv2d`` computes ``conv1x1(x, pointwise, stride) + depthwise(x, stencil,
pattern, stride) + bias`` (see ``deftnumba.lean.geometry``), in two ways:

* ``separate``: a pointwise GEMM (cuBLAS through CuPy; NumPy in the simulator),
  then the depthwise kernel, then an add (+ bias): the honest unfused baseline;
* ``fused``: one launch (input read once, output written once): ``kernels.strip`` at
  stride 1 (blocks own strips of consecutive pixels), ``kernels.fused`` (2-D tiles) at
  other strides.
"""

from __future__ import annotations

from ..runtime import backend
from . import planning
from .geometry import check_backward, check_forward, flipped
from .kernels import depthwise as _depthwise
from .kernels import fused as _fused
from .kernels import strip as _strip
from .reference import LeanGrads

METHODS: tuple[str, ...] = ("separate", "fused")
BACKWARD_METHODS: tuple[str, ...] = ("separate", "fused")


def _pick(method: str, methods: tuple[str, ...]) -> str:
    if method == "auto":
        return "fused"
    if method not in methods:
        raise ValueError(f"method must be 'auto' or one of {methods}, got {method!r}")
    return method


def _empty(xp, shape, dtype):
    """Allocation of every result (a seam for tests that poison outputs)."""
    return xp.empty(shape, dtype=dtype)


def _flat(xp, a):
    return xp.ascontiguousarray(a).reshape(-1)


def _centres(x, geometry):
    """``x[n, c, oy*sh, ox*sw]`` as ``[N, C, Ho*Wo]`` (a view at stride 1, else a copy)."""
    g = geometry
    xs = x[:, :, ::g.stride_h, ::g.stride_w]
    return xs.reshape(g.batch, g.channels, g.out_h * g.out_w)


def _launch_fused(g, taps, config, x_flat, matrix, stencil_flat, bias, out_flat, out_h, out_w, stride):
    """One fused launch: the strip kernel at stride 1 unless a 2-D ``LeanTileConfig`` is given,
    the tiled kernel otherwise. ``matrix[c_in, c_out]`` is the pointwise map."""
    if config is None:
        config = planning.default_config(g) if stride == (1, 1) else _fused.default_config(g)
    if isinstance(config, _strip.StripConfig):
        if stride != (1, 1):
            raise ValueError(f"config: a StripConfig runs stride 1 only, got stride {stride}; pass a "
                             f"LeanTileConfig or None")
        _strip.launch(g, taps, config, x_flat, matrix, stencil_flat, bias, out_flat)
    elif isinstance(config, _fused.LeanTileConfig):
        _fused.launch(g, taps, config, x_flat, matrix, stencil_flat, bias, out_flat, out_h, out_w, stride)
    else:
        raise TypeError(f"config must be a kernels.strip.StripConfig, a kernels.fused.LeanTileConfig or None, "
                        f"got {type(config).__name__}")


def lean_conv2d(input, pointwise, stencil, bias=None, stride=1, *, pattern="star5", method: str = "auto",
                config=None, stopwatch=None):
    """The lean convolution (LeanResNet): a full 1x1 plus a sparse depthwise stencil.

    input:     ``[N, C, H, W]``
    pointwise: ``[C, C]`` (``[Cout, Cin]``, as torch) or ``[C, C, 1, 1]``. The width is kept:
               width changes are not lean operators (use a plain strided 1x1 convolution).
    stencil:   ``[C, S]``: one weight per channel and tap of ``pattern``
    bias:      ``[C]`` or None
    stride:    int or pair; output ``Ho = (H - 1) // sh + 1``, pixel ``(oy, ox)`` centred on
               input pixel ``(oy*sh, ox*sw)``, taps outside the image read zero
    pattern:   a name in ``deftnumba.lean.PATTERNS`` (``star5``, ``plus4``, ``cross3h``,
               ``cross3v``, ``full9``) or a tuple of ``(dy, dx)`` taps in {-1, 0, 1}
    method:    ``"auto"`` (= ``"fused"``), ``"separate"`` or ``"fused"``
    config:    optional blocking for ``fused``: a ``kernels.strip.StripConfig`` (stride 1) or a
               ``kernels.fused.LeanTileConfig`` (any stride); None picks one
    stopwatch: optional ``deftnumba.runtime.timing.Stopwatch`` that times each operator

    All arrays share one dtype (float32 or float64) and one kind: CuPy in, CuPy out
    (``cuda`` backend); NumPy in, NumPy out on either backend. Deterministic.
    Returns ``[N, C, Ho, Wo]``.
    """
    g = check_forward(input, pointwise, stencil, bias, stride, pattern)
    name = _pick(method, METHODS)
    sw = stopwatch or backend.NO_STOPWATCH
    host_result = not backend.is_cupy_array(input)
    x, pw, st = (backend.to_device(a) for a in (input, pointwise, stencil))
    b = backend.to_device(bias) if bias is not None else None
    xp = backend.array_module(x)
    pw = pw.reshape(g.channels, g.channels)
    out = _empty(xp, g.shapes["output"], x.dtype)
    if name == "separate":
        with sw.section("pointwise gemm"):
            products = xp.matmul(pw, _centres(x, g))
        stencil_term = _empty(xp, g.shapes["output"], x.dtype)
        with sw.section("depthwise"):
            _depthwise.depthwise(g, _flat(xp, x), _flat(xp, st), stencil_term.reshape(-1))
        with sw.section("add + bias"):
            xp.add(products.reshape(g.shapes["output"]), stencil_term, out=out)
            if b is not None:
                out += b[None, :, None, None]
    else:
        with sw.section("fused"):
            # pointwise.T[c, o]: the weight from input channel c to output channel o
            _launch_fused(g, g.taps, config, _flat(xp, x), pw.T, _flat(xp, st), b, out.reshape(-1),
                          g.out_h, g.out_w, (g.stride_h, g.stride_w))
    return backend.to_host(out) if host_result and not backend.IS_SIMULATOR else out


def per_image_weight_gradient(geometry) -> bool:
    """The pointwise gradient's GEMM, per image and then summed (``N`` partial ``C x C``
    products written and read back) when ``C <= Ho*Wo``; else one GEMM over all images after
    transposing ``gy`` and the centres (two tensor-sized copies). The cheaper of the two in
    bytes (``roofline`` models both)."""
    return geometry.channels <= geometry.out_h * geometry.out_w


def lean_conv2d_backward(grad_output, input, pointwise, stencil, bias=None, stride=1, *, pattern="star5",
                         method: str = "auto", config=None, stopwatch=None) -> LeanGrads:
    """Gradients of ``lean_conv2d`` for all its array arguments: ``LeanGrads(input, pointwise,
    stencil, bias)`` (``bias`` None when the layer has none; ``pointwise`` in the shape given).

    ``grad_output`` is ``dL/d out`` ``[N, C, Ho, Wo]``; the other arguments are the forward's.
    Every method is deterministic (no atomics: bit-identical results on every run):

    * the pointwise gradient is ``gy x centres^T`` summed over images and pixels: per-image
      GEMMs summed in image order, or one GEMM (``per_image_weight_gradient``);
    * the stencil and bias gradients come from one reduction kernel (a block per channel,
      fixed-order partial sums and a fixed tree);
    * the input gradient: ``fused`` at stride 1 runs the fused forward kernel on ``gy`` with
      the transposed pointwise matrix and the mirrored stencil (the operator's adjoint);
      otherwise (``separate``, or any stride > 1) a GEMM ``P^T gy`` and a gathering
      adjoint kernel that adds the stencil term and writes the input gradient once.
    """
    g = check_backward(grad_output, input, pointwise, stencil, bias, stride, pattern)
    name = _pick(method, BACKWARD_METHODS)
    sw = stopwatch or backend.NO_STOPWATCH
    host_result = not backend.is_cupy_array(input)
    gy, x, pw, st = (backend.to_device(a) for a in (grad_output, input, pointwise, stencil))
    xp = backend.array_module(x)
    dtype = x.dtype
    c, p = g.channels, g.out_h * g.out_w
    pw2 = pw.reshape(c, c)
    gy_flat = _flat(xp, gy)
    gy3 = gy_flat.reshape(g.batch, c, p)
    x_flat = _flat(xp, x)
    st_flat = _flat(xp, st)

    grad_pw = _empty(xp, (c, c), dtype)
    with sw.section("pointwise gradient gemm"):
        centres = _centres(x, g)
        if per_image_weight_gradient(g):
            # sum over images of gy[n] @ centres[n]^T, in image order (N partial C x C products)
            xp.sum(xp.matmul(gy3, centres.transpose(0, 2, 1)), axis=0, out=grad_pw)
        else:
            # one GEMM over all images and pixels: [C, N*P] @ [N*P, C] (two transposed copies)
            rows = xp.ascontiguousarray(gy3.transpose(1, 0, 2)).reshape(c, -1)
            cols = xp.ascontiguousarray(centres.transpose(0, 2, 1)).reshape(-1, c)
            xp.matmul(rows, cols, out=grad_pw)
    grad_st = _empty(xp, g.shapes["stencil"], dtype)
    grad_b = _empty(xp, g.shapes["bias"], dtype) if bias is not None else None
    with sw.section("stencil + bias reduction"):
        _depthwise.reduce_stencil_bias(g, gy_flat, x_flat, grad_st.reshape(-1), grad_b)
    grad_x = _empty(xp, g.shapes["input"], dtype)
    if name == "fused" and g.stride_h == 1 and g.stride_w == 1:
        with sw.section("fused adjoint"):
            # the adjoint maps output channel o to input channel c by pointwise[o, c]; mirrored taps
            _launch_fused(g, flipped(g.taps), config, gy_flat, pw2, st_flat, None,
                          grad_x.reshape(-1), g.height, g.width, (1, 1))
    else:
        with sw.section("input gradient gemm"):
            centre = xp.matmul(pw2.T, gy3)
        with sw.section("depthwise adjoint"):
            _depthwise.adjoint(g, gy_flat, _flat(xp, centre), st_flat, grad_x.reshape(-1))
    grads = LeanGrads(grad_x, grad_pw.reshape(pointwise.shape), grad_st, grad_b)
    if host_result and not backend.IS_SIMULATOR:
        grads = LeanGrads(*(backend.to_host(a) if a is not None else None for a in grads))
    return grads
