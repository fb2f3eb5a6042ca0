"""The ``lean`` bench op: what the harness needs to time the lean operator.

The op protocol (the house's ``bench/harness.py``): ``name``, ``methods()``,
``suites()``, ``make_inputs(shape, dtype, seed)``, ``runner(method, pass_, inputs)``
(a zero-argument callable, or None where the method cannot run here) and
``operators(shape, method, pass_)`` (roofline ``Operator`` records); and the optional
extras ``baselines()``, ``passes(method)``, ``smoke_suites()``, ``ideal_method``,
``useful_flops(shape, pass_)`` and ``check(method, inputs)``. TF32 is the harness's
business (it turns it off for fp32 rows and on for ``+tf32`` rows).

Baselines (GPU only, through torch/cuDNN with TF32 off): ``cudnn_pointwise+depthwise``
(the same operator as a 1x1 conv, a depthwise 3x3 conv and an add) and ``cudnn_conv``
(the dense 3x3 convolution of the same width that the lean operator replaces).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..runtime import backend
from . import roofline
from .geometry import LeanGeometry, pattern_taps
from .ops import lean_conv2d, lean_conv2d_backward

name = "lean"

BASELINES = ("cudnn_pointwise+depthwise", "cudnn_conv")
ideal_method = "fused"
"""The layer's minimal traffic: input and weights read once, output written once."""


def methods() -> dict[str, str]:
    return {
        "fused": "deftnumba: one launch (input tile + halo staged once; pointwise and stencil from it)",
        "separate": "deftnumba: pointwise GEMM (cuBLAS), depthwise kernel, add",
        "cudnn_pointwise+depthwise": "torch/cuDNN: 1x1 conv + depthwise 3x3 conv + add (TF32 off)",
        "cudnn_conv": "torch/cuDNN: the dense 3x3 conv of the same width (TF32 off)",
    }


def baselines() -> tuple[str, ...]:
    """The baselines available here: both need torch with CUDA and the cuda backend."""
    return BASELINES if _torch_cuda() is not None else ()


def passes(method: str) -> tuple[str, ...]:
    """Ours have a host pass too (one forward call, Python to launch)."""
    return ("fwd", "bwd", "fwdbwd") if method in BASELINES else ("fwd", "bwd", "fwdbwd", "host")


def smoke_suites() -> dict[str, dict]:
    """A tiny irregular shape for the simulator smoke run."""
    return {"smoke": dict(batch=2, channels=5, height=7, width=6, stride=1, pattern="star5", bias=True)}


def suites() -> dict[str, dict]:
    """The issue's shapes: ``HxWxC``, batch 32, stride 1, the 5-point star."""
    shapes = {}
    for size, channels in ((56, 64), (28, 128), (14, 256), (7, 512)):
        shapes[f"{size}x{size}x{channels}"] = dict(batch=32, channels=channels, height=size, width=size,
                                                  stride=1, pattern="star5", bias=True)
    return shapes


def geometry(shape: dict, dtype: str = "float32") -> LeanGeometry:
    taps = pattern_taps(shape.get("pattern", "star5"))
    stride = int(shape.get("stride", 1))
    return LeanGeometry(batch=int(shape["batch"]), channels=int(shape["channels"]), height=int(shape["height"]),
                        width=int(shape["width"]), taps=taps, stride_h=stride, stride_w=stride,
                        has_bias=bool(shape.get("bias", True)), dtype=dtype)


def make_inputs(shape: dict, dtype: str = "float32", seed: int = 0) -> dict:
    """Random inputs on the device (CuPy on the GPU, NumPy in the simulator) and ``grad_output``."""
    g = geometry(shape, dtype)
    rng = np.random.default_rng(seed)
    host = {k: rng.standard_normal(g.shapes[k]).astype(dtype) for k in ("input", "pointwise", "stencil", "output")}
    host["pointwise"] /= np.sqrt(g.channels)
    host["bias"] = rng.standard_normal(g.channels).astype(dtype) if g.has_bias else None
    arrays = {k: (backend.to_device(v) if v is not None else None) for k, v in host.items()}
    arrays["grad_output"] = arrays.pop("output")
    arrays["shape"] = dict(shape)
    arrays["geometry"] = g
    return arrays


def _torch_cuda():
    """torch, if it is installed with CUDA and deftnumba runs on the GPU; else None."""
    if backend.IS_SIMULATOR:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_inputs(inputs: dict):
    """The inputs as CUDA tensors (cached in ``inputs``), or None without a GPU and torch."""
    torch = _torch_cuda()
    if torch is None:
        return None
    if "_torch" not in inputs:
        g = inputs["geometry"]
        t = {k: torch.from_dlpack(inputs[k]) for k in ("input", "pointwise", "stencil", "grad_output")}
        t["bias"] = torch.from_dlpack(inputs["bias"]) if inputs["bias"] is not None else None
        c = g.channels
        onehot = torch.zeros(g.stencil_size, 9, dtype=t["stencil"].dtype, device=t["stencil"].device)
        for i, (dy, dx) in enumerate(g.taps):
            onehot[i, (1 + dy) * 3 + (1 + dx)] = 1
        t["depthwise"] = (t["stencil"] @ onehot).reshape(c, 1, 3, 3)
        dense = t["depthwise"].new_zeros(c, c, 3, 3)
        dense[:, :, 1, 1] = t["pointwise"]
        t["dense"] = dense
        inputs["_torch"] = t
    return inputs["_torch"]


def runner(method: str, pass_: str, inputs: dict):
    """A zero-argument callable that runs ``method``'s ``pass_`` once, or None."""
    if method not in methods():
        raise ValueError(f"method must be one of {tuple(methods())}, got {method!r}")
    if pass_ not in roofline.PASSES:
        raise ValueError(f"pass_ must be one of {roofline.PASSES}, got {pass_!r}")
    g = inputs["geometry"]
    stride = (g.stride_h, g.stride_w)
    x, pw, st, b, gy = (inputs[k] for k in ("input", "pointwise", "stencil", "bias", "grad_output"))
    if method in ("fused", "separate"):
        def fwd():
            return lean_conv2d(x, pw, st, b, stride, pattern=g.taps, method=method)

        def bwd():
            return lean_conv2d_backward(gy, x, pw, st, b, stride, pattern=g.taps, method=method)

        return {"fwd": fwd, "bwd": bwd, "fwdbwd": lambda: (fwd(), bwd())}[pass_]
    t = _torch_inputs(inputs)
    if t is None:
        return None
    import torch
    from torch.nn import functional as F

    c = g.channels
    leaves = [t["input"], t["pointwise"], t["depthwise"] if method != "cudnn_conv" else t["dense"]]
    if t["bias"] is not None:
        leaves.append(t["bias"])
    leaves = [v.detach().requires_grad_() for v in leaves]

    def forward():
        if method == "cudnn_conv":
            return F.conv2d(leaves[0], leaves[2], leaves[3] if len(leaves) > 3 else None, stride, 1)
        return (F.conv2d(leaves[0], leaves[1].reshape(c, c, 1, 1), leaves[3] if len(leaves) > 3 else None, stride)
                + F.conv2d(leaves[0], leaves[2], None, stride, 1, 1, c))

    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()
        return fwd
    if pass_ == "bwd":
        graph = forward()
        return lambda: torch.autograd.grad(graph, leaves, t["grad_output"], retain_graph=True)
    return lambda: torch.autograd.grad(forward(), leaves, t["grad_output"])


def operators(shape: dict, method: str, pass_: str):
    """Roofline ``Operator`` records of ``method``'s ``pass_`` on ``shape`` (``lean.roofline``;
    the harness puts the row's ``dtype`` in ``shape``)."""
    method = method.removesuffix("+tf32")
    return roofline.operators(geometry(shape, shape.get("dtype", "float32")), method, pass_)


AUDIT_PATH = Path(__file__).resolve().parent.parent.parent / "data" / "lean" / "static_audit.json"
"""``python -m deftnumba.lean.audit --json`` writes it (the audit compiles for sm_90: it needs
the cuda backend, so the bench op reads the recorded figures)."""


def predictions(shape: dict, dtype: str = "float32") -> dict[str, float]:
    """The SASS audit's predicted issue-bound time (ms) of ``fused`` at a suite shape, read from
    ``AUDIT_PATH``: ``{"fused": ms}``, or ``{}`` for a shape (or dtype) not recorded there.
    A static prediction, never a measurement."""
    if dtype != "float32" or not AUDIT_PATH.exists():
        return {}
    recorded = json.loads(AUDIT_PATH.read_text())["suites"]
    name = next((k for k, v in suites().items() if v == shape), None)
    return {"fused": recorded[name]["predicted_us"] / 1e3} if name in recorded else {}


def useful_flops(shape: dict, pass_: str) -> float:
    """What TFLOP/s are quoted in, for every method: the lean operator's own FLOPs (the fused
    method's count), so the dense ``cudnn_conv`` gets no credit for its extra work."""
    return roofline.totals(geometry(shape, shape.get("dtype", "float32")), "fused", pass_).flops


def check(method: str, inputs: dict):
    """``("float64 reference", relative error)`` of ``method``'s forward; None for ``cudnn_conv``
    (a different operator) and where a baseline cannot run."""
    from .reference import lean_conv2d_reference

    if method == "cudnn_conv":
        return None
    work = runner(method, "fwd", inputs)
    if work is None:
        return None
    out = work()
    out = out.detach().double().cpu().numpy() if hasattr(out, "detach") else np.asarray(backend.to_host(out),
                                                                                         dtype=np.float64)
    g = inputs["geometry"]
    host = [backend.to_host(inputs[k]) if inputs[k] is not None else None
            for k in ("input", "pointwise", "stencil", "bias")]
    ref = lean_conv2d_reference(*host, (g.stride_h, g.stride_w), g.taps)
    return "float64 reference", float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-300))
