"""Roofline counts of a Tucker layer: FLOPs and minimal device-memory bytes per operator.

Same rules as the DCN counts (``deftnumba.roofline``; generic parts move to
``perf/roofline.py``): each operator reads its inputs once and writes its
outputs once; an FMA is 2 FLOPs; the bias add is 1 FLOP per output.

Methods (``MODELS``):

* ``cudnn_conv``: the dense convolution the Tucker layer replaces (weight ``[Cout, C, kh, kw]``);
* ``cudnn_tucker``, ``three_pass`` and ``winograd``: three operators, first 1x1, core, last 1x1
  (+bias); the intermediates ``hidden_in [N, r_in, H, W]`` and ``hidden_out
  [N, r_out, Ho, Wo]`` are written and read back (``winograd``'s core does 2.25x fewer
  multiplies than the direct convolution counted here: the floor stays the layer's);
* ``fused``: one operator: input and factors read once, output written once.

Passes: ``fwd``; ``bwd`` (our layers' backward is torch's: the three convolutions
recomputed, then for each a data gradient and a weight gradient; the dense layer:
one data and one weight gradient); ``fwdbwd`` = both. A grouped core counts the
grouped FLOPs (what cuDNN does); our kernels run it dense (``groups`` x more).
"""

from __future__ import annotations

from ..perf.roofline import Operator
from .geometry import TuckerGeometry

MODELS = ("cudnn_conv", "cudnn_tucker", "three_pass", "winograd", "fused")
PASSES = ("fwd", "bwd", "fwdbwd")


def _conv(name, n, c_in, c_out, h, w, out_h, out_w, taps, groups, s, bias=False) -> Operator:
    """One convolution's counts: input read, weight read, output written."""
    gemm = 2.0 * n * c_out * (c_in // groups) * taps * out_h * out_w
    flops = gemm + (n * c_out * out_h * out_w if bias else 0)
    read = s * (n * c_in * h * w + c_out * (c_in // groups) * taps + (c_out if bias else 0))
    return Operator(name, flops, read, s * n * c_out * out_h * out_w, gemm)


def _three(g: TuckerGeometry) -> list[Operator]:
    s, n = g.itemsize, g.batch
    return [
        _conv("first 1x1", n, g.in_channels, g.rank_in, g.height, g.width, g.height, g.width, 1, 1, s),
        _conv("core conv", n, g.rank_in, g.rank_out, g.height, g.width, g.out_h, g.out_w, g.taps, g.groups, s),
        _conv("last 1x1", n, g.rank_out, g.out_channels, g.out_h, g.out_w, g.out_h, g.out_w, 1, 1, s, g.has_bias),
    ]


def _dense(g: TuckerGeometry) -> Operator:
    return _conv("dense conv", g.batch, g.in_channels, g.out_channels, g.height, g.width, g.out_h, g.out_w,
                 g.taps, 1, g.itemsize, g.has_bias)


def _backward_of(op: Operator, weight_bytes: float, input_bytes: float) -> list[Operator]:
    """Data gradient (reads grad_out + weight, writes grad_in) and weight gradient
    (reads grad_out + input, writes grad_weight), each with the forward's GEMM FLOPs."""
    grad_out = op.bytes_written
    return [Operator(f"{op.name} dgrad", op.gemm_flops, grad_out + weight_bytes, input_bytes, op.gemm_flops),
            Operator(f"{op.name} wgrad", op.gemm_flops, grad_out + input_bytes, weight_bytes, op.gemm_flops)]


def _split(g: TuckerGeometry, op: Operator, c_in, h, w, bias=False):
    s = g.itemsize
    input_bytes = s * g.batch * c_in * h * w
    weight_bytes = op.bytes_read - input_bytes - (s * g.out_channels if bias else 0)
    return weight_bytes, input_bytes


def _backward(g: TuckerGeometry, method: str) -> list[Operator]:
    if method == "cudnn_conv":
        op = _dense(g)
        return _backward_of(op, *_split(g, op, g.in_channels, g.height, g.width, g.has_bias))
    first, core, last = _three(g)
    ops = [Operator(f"recompute {o.name}", o.flops, o.bytes_read, o.bytes_written, o.gemm_flops)
           for o in (first, core, last)] if method != "cudnn_tucker" else []
    ops += _backward_of(last, *_split(g, last, g.rank_out, g.out_h, g.out_w, g.has_bias))
    ops += _backward_of(core, *_split(g, core, g.rank_in, g.height, g.width))
    ops += _backward_of(first, *_split(g, first, g.in_channels, g.height, g.width))
    return ops


def operators(g: TuckerGeometry, method: str = "fused", pass_: str = "fwd") -> list[Operator]:
    """The ``Operator`` records of ``method`` for one pass (see the module docstring)."""
    if method not in MODELS:
        raise ValueError(f"method must be one of {MODELS}, got {method!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    if pass_ == "fwdbwd":
        return operators(g, method, "fwd") + operators(g, method, "bwd")
    if pass_ == "bwd":
        return _backward(g, method)
    if method == "cudnn_conv":
        return [_dense(g)]
    three = _three(g)
    if method in ("cudnn_tucker", "three_pass", "winograd"):
        return three
    s = g.itemsize
    factors = sum(o.bytes_read for o in three) - s * (g.batch * g.in_channels * g.height * g.width
                                                      + g.batch * g.rank_in * g.height * g.width
                                                      + g.batch * g.rank_out * g.out_h * g.out_w)
    return [Operator("fused tucker", sum(o.flops for o in three),
                     s * g.batch * g.in_channels * g.height * g.width + factors,
                     three[-1].bytes_written, sum(o.gemm_flops for o in three))]


def totals(g: TuckerGeometry, method: str = "fused", pass_: str = "fwd") -> Operator:
    ops = operators(g, method, pass_)
    return Operator(f"{method} total", sum(o.flops for o in ops), sum(o.bytes_read for o in ops),
                    sum(o.bytes_written for o in ops), sum(o.gemm_flops for o in ops))
