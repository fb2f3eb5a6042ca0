"""Roofline counts: FLOPs and minimal bytes per operator, device ceilings, floors.

The method (docs/perf-notes.md): before timing anything, count the floating-point
operations a method must do and the fewest bytes it must move through device
memory, each operator's inputs read once and its outputs written once. FLOPs
over the arithmetic rate and bytes over the bandwidth give two times; the larger
is the *floor*, and ``measured / floor`` is the gap left to win.

Counts are functions of a ``Geometry`` (``deftnumba.arguments``), a method and a
pass (``"fwd"``, ``"bwd"`` or ``"fwdbwd"`` = forward then backward):

* ``operators(g, method, pass_)``: the list of ``Operator`` records of a method;
* ``totals(g, method, pass_)``: their sum; ``flops``, ``min_bytes``,
  ``intensity`` (FLOP per byte) and ``conv_flops`` (the inner-product FLOPs,
  identical for every method: the work a benchmark's TFLOP/s is quoted in);
* ``floor_ms(g, method, pass_, ceilings)`` and
  ``percent_of_roofline(measured_ms, g, method, pass_, ceilings)``.

Modelled methods (``MODELS``): ``im2col`` (our baseline pipeline), ``torchvision``
(the same design with positions computed inside its im2col kernel),
``fused_columns``, ``fused`` (the minimal bytes of the layer: inputs, offsets,
mask and weights read once, output written once) and ``cudnn_conv`` (a dense
convolution of the same shape: the slowdown denominator). The backward ``fused`` operator
is the column-free ideal, which ``kernels/backward_fused.py`` implements in one kernel
in atomic mode (its deterministic mode adds the gather and the weight kernel).

Notation (whole batch): ``N`` images, ``C`` input and ``Co`` output channels,
``Gw`` weight groups, ``G`` offset groups, ``K = kh*kw`` taps, ``P = Ho*Wo``,
``s`` the itemsize. A *point* is one (image, offset group, tap, output pixel):
``N*G*K*P`` of them, each with one position, one mask value and four corner
weights. A *sample* is a point times one channel of its group: ``N*C*K*P``.

FLOP conventions (additions and multiplications of floats; index arithmetic,
floors and compares are not counted): a position is 2 (two adds), the corner
setup 8 (two fractions, two ``1 - l``, four products), an interpolation 7 (four
products, three adds), the mask 1 per sample (or 4 per point when folded into
the weights). Only the GEMM matters at these shapes: sampling is ~5% of the
FLOPs of ``deft64``.

Weights are read once per chunk of ``CHUNK_IMAGES`` images by the column
methods (their GEMM runs per chunk) and once per call by ``fused`` and
``cudnn_conv``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..perf.device import H200_DATASHEET, H200_LEADS, Ceilings  # noqa: F401  (re-exported: the ceilings)
from ..perf.roofline import Operator, floor_ms_of, measure_ceilings  # noqa: F401  (generic; re-exported)
from .geometry import Geometry
from .kernels.im2col import CHUNK_IMAGES  # the column methods' image chunk

from ..perf.roofline import PASSES  # noqa: E402

# FLOPs per point or per sample (see the module docstring).
POSITION_FLOPS = 2
CORNER_FLOPS = 8
CORNER_GRADIENT_FLOPS = 8   # the eight derivative weights d w / dy, d w / dx (backward)
INTERP_FLOPS = 7
MASK_FLOPS = 1              # per sample
FOLDED_MASK_FLOPS = 4       # per point: the mask folded into the four weights
SCATTER_FLOPS = 8           # col2im per sample: four coefficient products and four adds
COORD_FLOPS = 27            # offset/mask grads per sample: d/dy, d/dx and value (7 each),
                            # times the column gradient (3), accumulated (3)


@dataclass(frozen=True)
class _Sizes:
    """Byte sizes and counts of a geometry, shared by every model."""

    input: int
    offset: int
    mask: int
    weight: int
    bias: int
    output: int
    columns: int
    points: int
    samples: int
    gemm: int
    out_elements: int
    chunks: int

    @classmethod
    def of(cls, g: Geometry) -> "_Sizes":
        s, n, p = g.itemsize, g.batch, g.out_h * g.out_w
        points = n * g.offset_groups * g.taps * p
        samples = n * g.in_channels * g.taps * p
        return cls(
            input=n * g.in_channels * g.height * g.width * s,
            offset=2 * points * s,
            mask=points * s if g.has_mask else 0,
            weight=g.out_channels * (g.in_channels // g.groups) * g.taps * s,
            bias=g.out_channels * s if g.has_bias else 0,
            output=n * g.out_channels * p * s,
            columns=samples * s,
            points=points,
            samples=samples,
            gemm=2 * n * p * g.out_channels * (g.in_channels // g.groups) * g.taps,
            out_elements=n * g.out_channels * p,
            chunks=-(-n // CHUNK_IMAGES),
        )


def _gemm_forward(z: _Sizes, g: Geometry) -> list[Operator]:
    """The column methods' tail: GEMM (column read) and output transpose + bias."""
    bias_flops = z.out_elements if g.has_bias else 0
    return [
        Operator("gemm", z.gemm, z.columns + z.weight * z.chunks, z.output, gemm_flops=z.gemm),
        Operator("transpose + bias", bias_flops, z.output + z.bias * z.chunks, z.output),
    ]


def _mask_per_sample(g: Geometry) -> int:
    return MASK_FLOPS if g.has_mask else 0


def _mask_per_point(g: Geometry) -> int:
    return FOLDED_MASK_FLOPS if g.has_mask else 0


def _forward(g: Geometry, method: str) -> list[Operator]:
    z = _Sizes.of(g)
    sampled_in = z.offset + z.mask + z.input  # what a column builder must read
    if method == "im2col":
        per_sample = CORNER_FLOPS + INTERP_FLOPS + _mask_per_sample(g)
        return [
            # the sampling points (y, x and the mask m, kernels.im2col.positions_kernel)
            Operator("offset sampling", POSITION_FLOPS * z.points, z.offset + z.mask, z.offset + z.mask),
            Operator("bilinear columns", per_sample * z.samples, sampled_in, z.columns),
        ] + _gemm_forward(z, g)
    if method == "torchvision":
        per_sample = POSITION_FLOPS + CORNER_FLOPS + INTERP_FLOPS + _mask_per_sample(g)
        return [Operator("bilinear columns", per_sample * z.samples, sampled_in, z.columns)] + _gemm_forward(z, g)
    if method == "fused_columns":
        flops = (POSITION_FLOPS + CORNER_FLOPS + _mask_per_point(g)) * z.points + INTERP_FLOPS * z.samples
        return [Operator("fused columns", flops, sampled_in, z.columns)] + _gemm_forward(z, g)
    if method == "fused":
        flops = ((POSITION_FLOPS + CORNER_FLOPS + _mask_per_point(g)) * z.points + INTERP_FLOPS * z.samples
                 + z.gemm + (z.out_elements if g.has_bias else 0))
        return [Operator("fused", flops, sampled_in + z.weight + z.bias, z.output, gemm_flops=z.gemm)]
    if method == "cudnn_conv":
        flops = z.gemm + (z.out_elements if g.has_bias else 0)
        return [Operator("conv", flops, z.input + z.weight + z.bias, z.output, gemm_flops=z.gemm)]
    raise KeyError(method)


def _backward(g: Geometry, method: str) -> list[Operator]:
    """Backward: grads of input, offset, mask, weight (and bias), given grad_output.

    The column methods follow ``kernels/backward.py`` (torchvision's design for
    ``im2col``): ``grad_out`` regrouped to ``[Co, N*P]``, GEMM ``W^T grad_out`` ->
    column gradients in memory -> atomic scatter into the (zeroed) input gradient,
    offset/mask gradients -> columns recomputed -> GEMM ``grad_out cols^T`` for the
    weight gradient (accumulated per chunk). ``fused_columns`` does the scatter, the
    offset/mask gradients and the column recompute in one sample pass.
    """
    z = _Sizes.of(g)
    grad_out = z.output
    sampled_in = z.offset + z.mask + z.input    # what a sampling pass reads
    sample_grads = z.input + z.offset + z.mask  # grad_input, grad_offset, grad_mask
    bias_grad = [Operator("bias grad", z.out_elements, grad_out, z.bias)] if g.has_bias else []
    if method == "fused":
        per_point = POSITION_FLOPS + CORNER_FLOPS + CORNER_GRADIENT_FLOPS + _mask_per_point(g)
        flops = (per_point * z.points + (INTERP_FLOPS + SCATTER_FLOPS + COORD_FLOPS) * z.samples
                 + 2 * z.gemm + (z.out_elements if g.has_bias else 0))
        return [Operator("fused backward", flops, grad_out + sampled_in + z.weight,
                         sample_grads + z.weight + z.bias, gemm_flops=2 * z.gemm)]
    if method == "cudnn_conv":
        return bias_grad + [
            Operator("grad input", z.gemm, grad_out + z.weight, z.input, gemm_flops=z.gemm),
            Operator("grad weight", z.gemm, grad_out + z.input, z.weight, gemm_flops=z.gemm),
        ]
    if method not in ("im2col", "torchvision", "fused_columns"):
        raise KeyError(method)
    head = bias_grad + [Operator("zero grad_input", 0, 0, z.input),
                        Operator("grad_out regroup", 0, grad_out, grad_out)]
    grad_cols = Operator("grad columns gemm", z.gemm, z.weight * z.chunks + grad_out, z.columns, gemm_flops=z.gemm)
    weight_grad = Operator("weight grad gemm", z.gemm, grad_out + z.columns, z.weight * z.chunks,
                           gemm_flops=z.gemm)
    per_point = POSITION_FLOPS + CORNER_FLOPS + CORNER_GRADIENT_FLOPS + _mask_per_point(g)
    if method == "fused_columns":
        flops = per_point * z.points + (SCATTER_FLOPS + COORD_FLOPS + INTERP_FLOPS) * z.samples
        sample = Operator("fused sample grads", flops, z.columns + sampled_in, sample_grads + z.columns)
        return head + [grad_cols, sample, weight_grad]
    # im2col keeps a points buffer (y, x, m); its offset/mask kernel works per point like the fused
    # pass. torchvision recomputes the position and corners per sample (and per offset
    # element, i.e. twice, in its coordinate kernel).
    m = _mask_per_sample(g)
    columns = next(op for op in _forward(g, method) if op.name == "bilinear columns")
    if method == "im2col":
        coord_flops = per_point * z.points + COORD_FLOPS * z.samples
        head = head + [Operator("offset sampling", POSITION_FLOPS * z.points, z.offset + z.mask, z.offset + z.mask)]
    else:
        coord_flops = (2 * (POSITION_FLOPS + CORNER_FLOPS + CORNER_GRADIENT_FLOPS) + COORD_FLOPS) * z.samples
    return head + [
        grad_cols,
        Operator("col2im", (POSITION_FLOPS + CORNER_FLOPS + SCATTER_FLOPS + m) * z.samples,
                 z.columns + z.offset + z.mask, z.input),
        Operator("offset and mask grad", coord_flops, z.columns + sampled_in, z.offset + z.mask),
        replace(columns, name="bilinear columns (recompute)"),
        weight_grad,
    ]


MODELS = ("im2col", "torchvision", "fused_columns", "fused", "cudnn_conv")


def has_model(method: str, pass_: str = "fwd") -> bool:
    """Whether ``method`` has counts for ``pass_`` (every model covers both passes)."""
    return method in MODELS


def _check(method: str, pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if not has_model(method, pass_):
        raise ValueError(f"no roofline model for method {method!r}; modelled: {MODELS}")


def operators(g: Geometry, method: str = "fused", pass_: str = "fwd") -> list[Operator]:
    """The operators of ``method`` for one pass, each with its FLOPs and minimal bytes."""
    _check(method, pass_)
    if pass_ == "fwd":
        return _forward(g, method)
    if pass_ == "bwd":
        return _backward(g, method)
    return ([replace(op, name="fwd: " + op.name) for op in _forward(g, method)]
            + [replace(op, name="bwd: " + op.name) for op in _backward(g, method)])


def totals(g: Geometry, method: str = "fused", pass_: str = "fwd") -> Operator:
    """The sum of ``operators(...)``, named after the method."""
    ops = operators(g, method, pass_)
    return Operator(method, sum(o.flops for o in ops), sum(o.bytes_read for o in ops),
                    sum(o.bytes_written for o in ops), sum(o.gemm_flops for o in ops))


def flops(g: Geometry, method: str = "fused", pass_: str = "fwd") -> float:
    return totals(g, method, pass_).flops


def min_bytes(g: Geometry, method: str = "fused", pass_: str = "fwd") -> float:
    """Minimal device-memory bytes: every operator's inputs read once, outputs written once."""
    return totals(g, method, pass_).bytes


def intensity(g: Geometry, method: str = "fused", pass_: str = "fwd") -> float:
    """Arithmetic intensity, FLOP per byte."""
    return totals(g, method, pass_).intensity


def conv_flops(g: Geometry, pass_: str = "fwd") -> float:
    """Inner-product FLOPs of the layer: ``2*N*P*Co*(C/Gw)*K`` per GEMM; the
    backward has two GEMMs. The same for every method (TF/s are quoted in it)."""
    per_gemm = _Sizes.of(g).gemm
    return {"fwd": 1, "bwd": 2, "fwdbwd": 3}[pass_] * per_gemm


def column_buffer_bytes(g: Geometry) -> int:
    """Bytes of the column matrix ``[C*K, N*P]`` over the whole batch (written and
    read back by every column method; per chunk the buffer holds up to 32 images)."""
    return _Sizes.of(g).columns


def floor_ms(g: Geometry, method: str = "fused", pass_: str = "fwd", ceilings: Ceilings = H200_LEADS) -> float:
    """The roofline floor of ``method``'s operators, summed: each operator is
    bounded by its own larger term (operators of one method run one after another)."""
    return sum(floor_ms_of(o.flops, o.bytes, ceilings, g.dtype) for o in operators(g, method, pass_))


def percent_of_roofline(measured_ms: float, g: Geometry, method: str = "fused", pass_: str = "fwd",
                        ceilings: Ceilings = H200_LEADS) -> float:
    """``100 * floor / measured``: 100 means the method runs at its roofline.

    ``method="fused"`` measures any implementation against the layer's minimal
    traffic (the ideal); a method's own name measures it against its own operators.
    """
    return 100.0 * floor_ms(g, method, pass_, ceilings) / measured_ms


# --------------------------------------------------------------------------- tables
def table(geometries: dict, methods=MODELS, pass_: str = "fwd", ceilings: Ceilings = H200_LEADS) -> list[dict]:
    """One row per (named geometry, method): FLOPs, minimal bytes, intensity, floor."""
    rows = []
    for shape, g in geometries.items():
        for method in methods:
            t = totals(g, method, pass_)
            rows.append({"shape": shape, "method": method, "pass": pass_, "gflop": t.flops / 1e9,
                         "conv_gflop": conv_flops(g, pass_) / 1e9, "mbytes": t.bytes / 1e6,
                         "intensity": t.intensity, "floor_ms": floor_ms(g, method, pass_, ceilings)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of ``table(...)`` rows."""
    lines = ["| shape | method | pass | GFLOP | conv GFLOP | min MB | FLOP/B | floor ms |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['pass']} | {r['gflop']:.3f} | {r['conv_gflop']:.3f} "
                     f"| {r['mbytes']:.2f} | {r['intensity']:.1f} | {r['floor_ms']:.4f} |")
    return "\n".join(lines)
