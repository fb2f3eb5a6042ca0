"""Roofline counts of the lean operator: FLOPs and minimal bytes per operator of each method.

Counts are functions of a ``LeanGeometry``, a method and a pass (``fwd``, ``bwd`` =
all four gradients from ``grad_output``, ``fwdbwd``). Each operator's inputs are
read once and its outputs written once (the fewest bytes it can move); halo and
weight re-reads that stay in L2 are not counted. Notation: ``N`` images, ``C``
channels, ``S`` stencil taps, ``HW = H*W`` input and ``P = Ho*Wo`` output pixels,
``s`` the itemsize. FLOPs: 2 per multiply-add, 1 per addition.

Methods (``MODELS``):

* ``fused``: ``kernels/fused.py``: input and weights in, output out. The minimal
  bytes of the layer. Backward: the pointwise-gradient GEMM (per image then summed, or
  one GEMM after transposing ``gy`` and the centres when ``C > Ho*Wo``), the stencil/bias reduction, and the input gradient, fused
  at stride 1 (the forward kernel on ``gy``) and GEMM + adjoint at stride > 1.
* ``separate``: ``ops.lean_conv2d(method="separate")``: the GEMM (on a strided copy
  of the centres at stride > 1), the depthwise kernel, the add (+ a bias pass).
* ``cudnn_pointwise+depthwise``: torch/cuDNN: a 1x1 conv (bias folded), a depthwise
  3x3 conv, an add; backward through autograd (data and weight gradients of both
  convolutions, and the add of the two input gradients).
* ``cudnn_conv``: the dense 3x3 convolution of the same width it replaces.
"""

from __future__ import annotations

from ..perf.device import H200_LEADS, Ceilings
from ..perf.roofline import Operator, floor_ms_of
from .geometry import LeanGeometry

PASSES = ("fwd", "bwd", "fwdbwd")
MODELS = ("fused", "separate", "cudnn_pointwise+depthwise", "cudnn_conv")


def _sizes(g: LeanGeometry) -> dict:
    s, n, c = g.itemsize, g.batch, g.channels
    p = g.out_h * g.out_w
    return dict(s=s, n=n, c=c, p=p, S=g.stencil_size, x=n * c * g.height * g.width * s, y=n * c * p * s,
                pw=c * c * s, st=c * g.stencil_size * s, b=c * s if g.has_bias else 0,
                strided=g.stride_h > 1 or g.stride_w > 1)


def _forward(g: LeanGeometry, method: str) -> list[Operator]:
    z = _sizes(g)
    n, c, p, S = z["n"], z["c"], z["p"], z["S"]
    pointwise = 2 * n * c * c * p
    stencil = 2 * n * c * S * p
    bias = n * c * p if g.has_bias else 0
    if method == "fused":
        return [Operator("fused lean", pointwise + stencil + bias, z["x"] + z["pw"] + z["st"] + z["b"], z["y"],
                         gemm_flops=pointwise)]
    if method == "separate":
        ops = []
        centres = z["x"]
        if z["strided"]:
            ops.append(Operator("centre gather (strided copy)", 0, z["y"], z["y"]))
            centres = z["y"]
        ops += [Operator("pointwise gemm", pointwise, centres + z["pw"], z["y"], gemm_flops=pointwise),
                Operator("depthwise", stencil, z["x"] + z["st"], z["y"]),
                Operator("add", n * c * p, 2 * z["y"], z["y"])]
        if g.has_bias:
            ops.append(Operator("bias", bias, z["y"] + z["b"], z["y"]))
        return ops
    if method == "cudnn_pointwise+depthwise":
        return [Operator("cudnn 1x1 conv (+ bias)", pointwise + bias, z["x"] + z["pw"] + z["b"], z["y"],
                         gemm_flops=pointwise),
                Operator("cudnn depthwise 3x3", 2 * n * c * 9 * p, z["x"] + 9 * c * z["s"], z["y"]),
                Operator("add", n * c * p, 2 * z["y"], z["y"])]
    if method == "cudnn_conv":
        dense = 2 * n * c * c * 9 * p
        return [Operator("cudnn dense 3x3 conv", dense + bias, z["x"] + 9 * z["pw"] + z["b"], z["y"], gemm_flops=dense)]
    raise ValueError(f"method must be one of {MODELS}, got {method!r}")


def _backward(g: LeanGeometry, method: str) -> list[Operator]:
    z = _sizes(g)
    n, c, p, S, s = z["n"], z["c"], z["p"], z["S"], z["s"]
    pointwise = 2 * n * c * c * p
    stencil = 2 * n * c * S * p
    if method in ("fused", "separate"):
        centres = z["x"] if not z["strided"] else z["y"]
        ops = []
        if z["strided"]:
            ops.append(Operator("centre gather (strided copy)", 0, z["y"], z["y"]))
        if c <= p:  # ops.per_image_weight_gradient
            ops += [Operator("pointwise gradient gemm (per image)", pointwise, z["y"] + centres, n * z["pw"],
                             gemm_flops=pointwise),
                    Operator("sum over images", n * c * c, n * z["pw"], z["pw"])]
        else:
            ops += [Operator("transpose gy and centres", 0, 2 * z["y"], 2 * z["y"]),
                    Operator("pointwise gradient gemm", pointwise, 2 * z["y"], z["pw"], gemm_flops=pointwise)]
        ops.append(Operator("stencil + bias reduction", stencil + n * c * p, z["y"] + z["x"], z["st"] + c * s))
        if method == "fused" and not z["strided"]:
            ops.append(Operator("fused adjoint (input gradient)", pointwise + stencil, z["y"] + z["pw"] + z["st"],
                                z["x"], gemm_flops=pointwise))
        else:
            ops += [Operator("input gradient gemm", pointwise, z["y"] + z["pw"], z["y"], gemm_flops=pointwise),
                    Operator("depthwise adjoint", stencil, 2 * z["y"] + z["st"], z["x"])]
        return ops
    if method == "cudnn_pointwise+depthwise":
        return [Operator("cudnn 1x1 dgrad", pointwise, z["y"] + z["pw"], z["x"], gemm_flops=pointwise),
                Operator("cudnn 1x1 wgrad", pointwise, z["y"] + z["x"], z["pw"], gemm_flops=pointwise),
                Operator("bias gradient", n * c * p, z["y"], c * s),
                Operator("cudnn depthwise dgrad", 2 * n * c * 9 * p, z["y"] + 9 * c * s, z["x"]),
                Operator("cudnn depthwise wgrad", 2 * n * c * 9 * p, z["y"] + z["x"], 9 * c * s),
                Operator("add input gradients", n * c * g.height * g.width, 2 * z["x"], z["x"])]
    if method == "cudnn_conv":
        dense = 2 * n * c * c * 9 * p
        return [Operator("cudnn dense dgrad", dense, z["y"] + 9 * z["pw"], z["x"], gemm_flops=dense),
                Operator("cudnn dense wgrad", dense, z["y"] + z["x"], 9 * z["pw"], gemm_flops=dense),
                Operator("bias gradient", n * c * p, z["y"], c * s)]
    raise ValueError(f"method must be one of {MODELS}, got {method!r}")


def operators(g: LeanGeometry, method: str = "fused", pass_: str = "fwd") -> list[Operator]:
    """The ``Operator`` records of ``method`` for ``pass_``."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    ops = []
    if pass_ in ("fwd", "fwdbwd"):
        ops += _forward(g, method)
    if pass_ in ("bwd", "fwdbwd"):
        ops += _backward(g, method)
    return ops


def totals(g: LeanGeometry, method: str = "fused", pass_: str = "fwd") -> Operator:
    ops = operators(g, method, pass_)
    return Operator(f"{method} {pass_}", sum(o.flops for o in ops), sum(o.bytes_read for o in ops),
                    sum(o.bytes_written for o in ops), sum(o.gemm_flops for o in ops))


def floor_ms(g: LeanGeometry, method: str = "fused", pass_: str = "fwd", ceilings: Ceilings = H200_LEADS) -> float:
    """Sum over the method's operators of each one's roofline floor (they run one after another)."""
    return sum(floor_ms_of(o.flops, o.bytes, ceilings, g.dtype) for o in operators(g, method, pass_))


def percent_of_roofline(measured_ms: float, g: LeanGeometry, method: str = "fused", pass_: str = "fwd",
                        ceilings: Ceilings = H200_LEADS) -> float:
    """``100 * floor / measured``; ``method="fused"`` is the layer's ideal (minimal bytes)."""
    return 100.0 * floor_ms(g, method, pass_, ceilings) / measured_ms
