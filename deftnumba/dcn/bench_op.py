"""DCN as a benchmark op: what ``python -m deftnumba bench`` times for deformable convolution.

The harness (``deftnumba.bench.harness``) knows nothing about DCN; this module
answers its questions (the op protocol):

* ``name``: ``"dcn"`` (the CSV's ``op`` column, and ``data/bench/dcn/``);
* ``methods()``: every forward method of ``deftnumba.METHODS``, the backward-only
  methods of ``BACKWARD_METHODS`` (read when the run starts, so methods added
  later are timed too), and the baselines available here: ``torchvision``
  (``torchvision.ops.deform_conv2d``, on CUDA) and ``cudnn_conv`` (a dense
  ``torch.nn.functional.conv2d`` of the same shape: the slowdown denominator);
* ``suites()``: DESIGN.md's shapes, each a dict of ``Geometry`` parameters;
* ``make_inputs(shape, dtype, seed)``: one random layer (``dcn.inputs``) on the
  device, with torch views of the same memory for the baselines;
* ``runner(method, pass_, inputs)``: what to time for ``fwd``, ``bwd`` (the
  baselines' backward through torch autograd, its forward untimed) or ``fwdbwd``;
* ``operators(shape, method, pass_)``: ``dcn.roofline``'s counts.

And the optional extras the harness uses when an op has them: ``baselines``,
``passes``, ``smoke_suites``, ``parse_shape``, ``useful_flops`` (TFLOP/s are quoted
in convolution FLOPs), ``ideal_method`` (``fused``: the layer's minimal traffic),
``detail`` and ``check`` (forward outputs against torchvision, the float64
reference or ``im2col``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..runtime import backend
from ..runtime.timing import Timed
from . import ops, roofline
from .geometry import Geometry

name = "dcn"

BASELINES = ("torchvision", "cudnn_conv")
ideal_method = "fused"
"""The method whose roofline is the layer's own: inputs, offsets, mask and weights read
once, the output written once (``pct_ideal`` is measured against it)."""

_SHAPE_FIELDS = ("batch", "in_channels", "out_channels", "height", "width", "kernel_h", "kernel_w",
                 "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "groups", "offset_groups")


def _layer(n, c, c_out, h, w, k=3) -> Geometry:
    """3x3 (or kxk), stride 1, 'same' padding, one offset group, DCNv2 with mask, no bias."""
    return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=k, kernel_w=k,
                    pad_h=k // 2, pad_w=k // 2, has_mask=True, has_bias=False)


SUITES: dict[str, Geometry] = {
    "deft64": _layer(8, 64, 64, 64, 64),      # the DefT paper's layer
    "res128": _layer(16, 128, 128, 128, 128),
    "det-c4": _layer(4, 256, 256, 50, 68),
    "det-c5": _layer(4, 512, 512, 25, 34),
}
SMOKE_SUITES: dict[str, Geometry] = {"smoke": _layer(1, 2, 3, 5, 6)}


# --------------------------------------------------------------------------- shapes
def params(g: Geometry) -> dict:
    """A geometry as the harness's shape parameters (the CSV's shape columns)."""
    return {**{k: getattr(g, k) for k in _SHAPE_FIELDS}, "mask": g.has_mask, "bias": g.has_bias}


def geometry(shape: dict, dtype: str = "float32") -> Geometry:
    """Shape parameters (as ``params`` gives them, or read back from a CSV) -> ``Geometry``."""
    if isinstance(shape, Geometry):
        return replace(shape, dtype=dtype)
    return Geometry(**{k: int(shape[k]) for k in _SHAPE_FIELDS}, has_mask=bool(shape["mask"]),
                    has_bias=bool(shape["bias"]), dtype=dtype)


def suites() -> dict[str, dict]:
    return {k: params(g) for k, g in SUITES.items()}


def smoke_suites() -> dict[str, dict]:
    return {k: params(g) for k, g in SMOKE_SUITES.items()}


def parse_shape(text: str) -> tuple[str, Geometry]:
    """``N,C,Cout,H,W[,k]`` -> ``("NxCxCoutxHxW[xk]", Geometry)`` (stride 1, same padding, mask)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (5, 6) or min(values) < 1:
        raise ValueError(f"--shape expects N,C,Cout,H,W[,k] (positive ints), got {text!r}")
    return "x".join(str(v) for v in values), _layer(*values)


# --------------------------------------------------------------------------- methods
_torch = backend.torch_or_none


def _torchvision_deform():
    """``torchvision.ops.deform_conv2d`` if importable and usable on CUDA, else None."""
    torch = _torch()
    if torch is None or backend.IS_SIMULATOR or not torch.cuda.is_available():
        return None
    try:
        from torchvision.ops import deform_conv2d
    except Exception:  # noqa: BLE001 - missing or broken install
        return None
    return deform_conv2d


def baselines() -> tuple[str, ...]:
    """The baselines available here (torchvision needs CUDA; cudnn_conv needs torch)."""
    found = []
    if _torchvision_deform() is not None:
        found.append("torchvision")
    if _torch() is not None:
        found.append("cudnn_conv")
    return tuple(found)


def baseline_missing_reason(name: str) -> str:
    """Why a baseline is not timed here: what is missing (for the bench table's footer)."""
    torch = _torch()
    if torch is None:
        return "PyTorch is not installed"
    if name == "torchvision":
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - missing or broken install
            return "torchvision is not installed"
        if backend.IS_SIMULATOR or not torch.cuda.is_available():
            return "torchvision's deform_conv2d is timed on a CUDA GPU only"
    return "not available here"


def methods() -> dict[str, str]:
    described = {m: f"deftnumba method={m!r}" for m in ops.METHODS}
    for m in ops.BACKWARD_METHODS:
        described.setdefault(m, f"deftnumba backward method={m!r} (forward: auto)")
    described.update({b: d for b, d in (("torchvision", "torchvision.ops.deform_conv2d"),
                                        ("cudnn_conv", "dense torch conv2d of the same shape"))
                      if b in baselines()})
    return described


def passes(method: str) -> tuple[str, ...]:
    """The passes ``method`` has: forward methods ``fwd`` (and ``host``), backward methods
    ``bwd`` and ``fwdbwd``; the baselines all of them."""
    if method in BASELINES:
        return ("fwd", "bwd", "fwdbwd", "host")
    found = ()
    if method in ops.METHODS:
        found += ("fwd", "host")
    if method in ops.BACKWARD_METHODS:
        found += ("bwd", "fwdbwd")
    return found


def detail(method: str, pass_: str) -> str:
    if pass_ == "fwdbwd" and method not in BASELINES:
        return f"fwd={method if method in ops.METHODS else 'auto'} bwd={method}"
    return ""


# --------------------------------------------------------------------------- inputs and runs
class Layer:
    """One shape's arrays: deftnumba's (NumPy in the simulator, CuPy on the GPU) and
    torch views of the same memory (DLPack on the GPU, ``from_numpy`` in the simulator)."""

    def __init__(self, g: Geometry, seed: int):
        from .inputs import random_layer

        self.g = g
        host = random_layer(g, seed=seed, offset_scale=2.0)  # random offsets of a few pixels
        rng = np.random.default_rng(seed + 1)
        grad = rng.standard_normal(g.shapes["output"]).astype(g.dtype)
        self.arrays = [backend.to_device(a) if a is not None else None for a in host]
        self.grad_output = backend.to_device(grad)
        self.kwargs = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w),
                           dilation=(g.dil_h, g.dil_w))
        self.reference = None  # (what, float64 output), made on the first check
        torch = _torch()
        self.tensors = None
        if torch is not None:
            convert = torch.from_numpy if backend.IS_SIMULATOR else torch.from_dlpack
            self.tensors = [convert(a) if a is not None else None for a in self.arrays]
            self.grad_tensor = convert(self.grad_output)

    def dn_forward(self, method):
        x, offset, weight, bias, mask = self.arrays
        return lambda: ops.deform_conv2d(x, offset, weight, bias, **self.kwargs, mask=mask, method=method)

    def dn_backward(self, method):
        x, offset, weight, bias, mask = self.arrays
        return lambda: ops.deform_conv2d_backward(self.grad_output, x, offset, weight, bias, **self.kwargs,
                                                  mask=mask, method=method)

    def torch_forward(self, method, requires_grad=False):
        """A function running the baseline forward; it returns ``(output, leaf tensors)``
        (with ``requires_grad``, fresh leaves per call for autograd)."""
        torch = _torch()
        x, offset, weight, bias, mask = self.tensors
        g = self.g
        tv = _torchvision_deform()

        def forward():
            leaves = (x, offset, weight, bias, mask)
            if requires_grad:  # fresh leaves per call, so every backward has its own graph
                leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
            xi, oi, wi, bi, mi = leaves
            if method == "torchvision":
                out = tv(xi, oi, wi, bi, mask=mi, **self.kwargs)
            else:  # cudnn_conv: the dense convolution of the same shape
                out = torch.nn.functional.conv2d(xi, wi, bi, stride=self.kwargs["stride"],
                                                 padding=self.kwargs["padding"],
                                                 dilation=self.kwargs["dilation"], groups=g.groups)
                leaves = [xi, wi, bi]
            return out, [t for t in leaves if t is not None]

        return forward


def make_inputs(shape: dict, dtype: str, seed: int) -> Layer:
    return Layer(geometry(shape, dtype), seed)


def runner(method: str, pass_: str, inputs: Layer):
    """What to time: a zero-argument callable, or for the baselines' ``bwd`` a
    ``runtime.timing.Timed`` whose untimed ``prepare`` runs the forward. None if absent."""
    if pass_ not in passes(method):
        return None
    if method not in BASELINES:
        forward = inputs.dn_forward(method if method in ops.METHODS else "auto")
        if pass_ == "fwd":
            return forward
        backward = inputs.dn_backward(method)
        return backward if pass_ == "bwd" else (lambda: (forward(), backward()))
    torch = _torch()
    forward = inputs.torch_forward(method, requires_grad=pass_ != "fwd")

    def grads(out, leaves):
        return torch.autograd.grad(out, leaves, inputs.grad_tensor)

    if pass_ == "fwd":
        return Timed(lambda _: forward(), framework="torch")
    if pass_ == "bwd":
        return Timed(lambda state: grads(*state), prepare=forward, framework="torch")
    return Timed(lambda _: grads(*forward()), framework="torch")


def _forward_output(layer: Layer, method: str) -> np.ndarray:
    """One forward of ``method`` as a float64 host array."""
    if method in BASELINES:
        out, _ = layer.torch_forward(method)()
        return out.detach().double().cpu().numpy()
    x, offset, weight, bias, mask = layer.arrays
    out = ops.deform_conv2d(x, offset, weight, bias, **layer.kwargs, mask=mask, method=method)
    return np.asarray(backend.to_host(out), dtype=np.float64)


def _reference_output(layer: Layer) -> tuple[str, np.ndarray]:
    """What forward outputs are checked against: torchvision where it runs, else the
    float64 NumPy reference for small layers, else deftnumba's im2col baseline."""
    if _torchvision_deform() is not None:
        return "torchvision", _forward_output(layer, "torchvision")
    g = layer.g
    if g.batch * g.in_channels * g.taps * g.out_h * g.out_w <= 2e6:
        from . import ops, reference

        host = [backend.to_host(a) if a is not None else None for a in layer.arrays]
        return "float64 reference", reference.deform_conv2d(*host[:4], **layer.kwargs, mask=host[4])
    return "im2col", _forward_output(layer, "im2col")


def check(method: str, inputs: Layer):
    """``(what it was checked against, relative error)`` of ``method``'s forward, or None
    (the dense ``cudnn_conv`` computes something else)."""
    if method == "cudnn_conv" or "fwd" not in passes(method):
        return None
    if inputs.reference is None:
        inputs.reference = _reference_output(inputs)
    against, ref = inputs.reference
    out = _forward_output(inputs, method)
    return against, float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-300))


# --------------------------------------------------------------------------- roofline
def operators(shape: dict, method: str, pass_: str) -> list:
    """``dcn.roofline``'s operator counts of ``method`` (``[]`` where it has no model)."""
    if not roofline.has_model(method, pass_):
        return []
    return roofline.operators(geometry(shape, shape.get("dtype", "float32")), method, pass_)


def useful_flops(shape: dict, pass_: str) -> float:
    """The convolution FLOPs TFLOP/s are quoted in: the same for every method."""
    return roofline.conv_flops(geometry(shape, shape.get("dtype", "float32")), pass_)


__all__ = ["name", "methods", "suites", "make_inputs", "runner", "operators", "baselines", "passes",
           "smoke_suites", "parse_shape", "useful_flops", "ideal_method", "detail", "check"]
