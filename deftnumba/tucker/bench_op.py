"""The bench op ``tucker`` (for ``bench/harness.py``'s Op protocol).

Suites (``suites()``): TDC's ResNet-18 Tucker layers with TDC's ranks
(``[out_rank, in_rank]`` per 3x3 conv: layer1 [32,64]/[32,32], layer2 [64,64]/[64,96],
layer3 [96,96]/[96,128], layer4 [160,160]/[160,192]), stride 1, pad 1, at batch 1
and 32; and two of TDC's artifact *core* shapes, (64->32, 56x56) and (192->160,
7x7), where the layer is the core convolution alone (``core_only``: C = r_in,
Cout = r_out, and only the core runs; ``cudnn_conv`` is then the same dense 3x3
conv TDC compares against).

Methods (``methods()``): ours ``fused``, ``three_pass`` and ``winograd`` (and ``core_conv`` on
core-only shapes), baselines ``cudnn_conv`` (the dense layer replaced) and
``cudnn_tucker`` (the three convolutions through cuDNN), GPU-only.

Passes: ``fwd`` for our kernels; ``bwd``/``fwdbwd`` through torch autograd
(our layer's backward is three torch convolutions, see ``tucker.torch``), so
those rows need torch on CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..runtime import backend
from . import model, roofline
from .geometry import TuckerGeometry

name = "tucker"
AUDIT_PATH = Path(__file__).resolve().parents[2] / "data" / "tucker" / "static_audit.json"
"""The SASS audit's figures (``python -m deftnumba.tucker.audit --json``), read by ``predictions``."""

# (C, Cout, H, W, stride, r_out, r_in): TDC's ResNet-18 ranks per layer (the block's two 3x3 convs)
_RESNET18 = {
    "r18-l1a": (64, 64, 56, 56, 1, 32, 64),
    "r18-l1b": (64, 64, 56, 56, 1, 32, 32),
    "r18-l2a": (128, 128, 28, 28, 1, 64, 64),
    "r18-l2b": (128, 128, 28, 28, 1, 64, 96),
    "r18-l3a": (256, 256, 14, 14, 1, 96, 96),
    "r18-l3b": (256, 256, 14, 14, 1, 96, 128),
    "r18-l4a": (512, 512, 7, 7, 1, 160, 160),
    "r18-l4b": (512, 512, 7, 7, 1, 160, 192),
}
_CORE_SHAPES = {"core-64-32-56": (64, 32, 56, 56), "core-192-160-7": (192, 160, 7, 7)}


def methods() -> dict[str, str]:
    return {
        "fused": "ours: one launch, first 1x1 in the input staging, last 1x1 in the epilogue",
        "three_pass": "ours: cuBLAS 1x1 GEMM, our core-conv kernel, cuBLAS 1x1 GEMM",
        "winograd": "ours: three_pass with a Winograd F(2x2,3x3) core conv (3x3, stride 1, dilation 1)",
        "fused_winograd": "ours: fused's one launch with a Winograd F(2x2,3x3) core (3x3, stride 1, dilation 1)",
        "core_conv": "ours: the core-conv kernel alone (core-only shapes)",
        "cudnn_conv": "baseline: the dense torch conv2d the Tucker layer replaces (GPU only)",
        "cudnn_tucker": "baseline: the same three convolutions through torch/cuDNN (GPU only)",
    }


def suites() -> dict[str, dict]:
    """Shape name -> parameters (``batch``, channels, image, kernel, stride, pad, ranks, ``core_only``)."""
    out = {}
    for batch in (1, 32):
        for key, (c, co, h, w, s, r_out, r_in) in _RESNET18.items():
            out[f"{key}-n{batch}"] = dict(batch=batch, in_channels=c, out_channels=co, height=h, width=w,
                                          kernel=3, stride=s, padding=1, rank_out=r_out, rank_in=r_in,
                                          core_only=False)
    for key, (r_in, r_out, h, w) in _CORE_SHAPES.items():
        out[f"{key}-n1"] = dict(batch=1, in_channels=r_in, out_channels=r_out, height=h, width=w, kernel=3,
                                stride=1, padding=1, rank_out=r_out, rank_in=r_in, core_only=True)
    return out


def geometry(shape: dict, dtype: str = "float32") -> TuckerGeometry:
    return TuckerGeometry(batch=shape["batch"], in_channels=shape["in_channels"], height=shape["height"],
                          width=shape["width"], out_channels=shape["out_channels"], rank_in=shape["rank_in"],
                          rank_out=shape["rank_out"], kernel_h=shape["kernel"], kernel_w=shape["kernel"],
                          stride_h=shape["stride"], stride_w=shape["stride"], pad_h=shape["padding"],
                          pad_w=shape["padding"], has_bias=not shape.get("core_only", False), dtype=dtype)


def make_inputs(shape: dict, dtype: str = "float32", seed: int = 0) -> dict:
    """Random input and factors (HOSVD-like scale: orthonormal-ish rows) on the backend's
    device; torch tensors too when torch has CUDA (for the baselines)."""
    g = geometry(shape, dtype)
    rng = np.random.default_rng(seed)
    sh = g.shapes
    host = {k: rng.standard_normal(sh[k]).astype(dtype) for k in ("input", "first", "core", "last")}
    host["first"] /= np.sqrt(g.in_channels)
    host["core"] /= np.sqrt(g.rank_in * g.taps)
    host["last"] /= np.sqrt(g.rank_out)
    host["bias"] = rng.standard_normal(g.out_channels).astype(dtype) if g.has_bias else None
    xp = backend.array_module(None)
    inputs = {"geometry": g, "shape": shape, "host": host,
              "arrays": {k: (xp.asarray(v) if v is not None else None) for k, v in host.items()}}
    try:
        import torch
        if torch.cuda.is_available():
            inputs["torch"] = {k: (torch.as_tensor(v, device="cuda") if v is not None else None)
                               for k, v in host.items()}
            from .reference import reconstruct
            inputs["torch"]["dense"] = torch.as_tensor(
                reconstruct(host["first"], host["core"], host["last"]).astype(dtype), device="cuda")
    except ImportError:
        pass
    return inputs


def runner(method: str, pass_: str, inputs: dict):
    """A zero-argument callable that runs ``method`` for ``pass_`` once, or None when it
    does not apply (a baseline without CUDA torch, ``core_conv`` off core-only shapes, ...)."""
    g: TuckerGeometry = inputs["geometry"]
    core_only = inputs["shape"].get("core_only", False)
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))
    if method in ("fused", "three_pass", "winograd", "fused_winograd", "core_conv"):
        if pass_ != "fwd" or core_only != (method == "core_conv"):
            return None
        if method in ("winograd", "fused_winograd"):
            from .kernels import winograd

            if not winograd.eligible(g):
                return None
        a = inputs["arrays"]
        if method == "core_conv":
            from .kernels import core_conv
            from .ops import default_core_tile

            xp = backend.array_module(None)
            tile = default_core_tile(g)
            packed = core_conv.pack_core(a["core"], tile, xp)
            flat_in = xp.ascontiguousarray(a["input"]).reshape(-1)
            out = xp.empty(g.shapes["hidden_out"], dtype=g.dtype).reshape(-1)
            return lambda: core_conv.launch(g, tile, flat_in, packed, out)
        from .ops import tucker_conv2d

        return lambda: tucker_conv2d(a["input"], a["first"], a["core"], a["last"], a["bias"], **conv,
                                     method=method)
    if method in ("cudnn_conv", "cudnn_tucker"):
        t = inputs.get("torch")
        if t is None:
            return None
        import torch
        import torch.nn.functional as F

        if method == "cudnn_tucker" and core_only:
            return None
        if method == "cudnn_conv":
            weight = t["core"] if core_only else t["dense"]

            def forward(x, ws):
                return F.conv2d(x, ws[0], t["bias"], **conv)
            weights = [weight]
        else:
            def forward(x, ws):
                h = F.conv2d(x, ws[0])
                h = F.conv2d(h, ws[1], None, **conv)
                return F.conv2d(h, ws[2], t["bias"])
            weights = [t["first"], t["core"], t["last"]]
        if pass_ == "fwd":
            return lambda: forward(t["input"], weights)
        x = t["input"].detach().requires_grad_(True)
        ws = [w.detach().requires_grad_(True) for w in weights]
        grad = torch.ones_like(forward(x, ws))
        if pass_ == "fwdbwd":
            return lambda: torch.autograd.grad(forward(x, ws), [x, *ws], grad)
        out = forward(x, ws)
        return lambda: torch.autograd.grad(out, [x, *ws], grad, retain_graph=True)
    raise ValueError(f"unknown method {method!r}; expected one of {tuple(methods())}")


def operators(shape: dict, method: str, pass_: str = "fwd", dtype: str = "float32"):
    """Roofline ``Operator`` records (``tucker.roofline``) of ``method`` on ``shape``."""
    g = geometry(shape, dtype)
    if shape.get("core_only"):
        from ..perf.roofline import Operator

        ops = roofline.operators(g, "three_pass", "fwd")
        core = ops[1]
        if method in ("core_conv", "cudnn_conv") and pass_ == "fwd":
            return [Operator("core conv", core.flops, core.bytes_read, core.bytes_written, core.gemm_flops)]
        return []
    if method not in roofline.MODELS:
        return []
    return roofline.operators(g, method, pass_)


def predictions(shape: dict, dtype: str = "float32") -> dict[str, float]:
    """Predictions (ms) per method for ``shape``, never measurements: our methods from the SASS
    audit where ``AUDIT_PATH`` records the shape (``python -m deftnumba.tucker.audit --json``),
    else from ``tucker.model``'s formulas; the cuDNN rows from ``tucker.model`` (vendor
    libraries at an assumed fraction of their roofline)."""
    g = geometry(shape, dtype)
    recorded = {}
    if dtype == "float32" and AUDIT_PATH.exists():
        name = next((k for k, v in suites().items() if v == shape), None)
        recorded = json.loads(AUDIT_PATH.read_text())["suites"].get(name, {})
    out = {}
    for m in ("fused", "three_pass", "winograd", "fused_winograd", "cudnn_conv", "cudnn_tucker"):
        if shape.get("core_only") and m != "cudnn_conv":
            continue
        if m in recorded:
            out[m] = recorded[m]["predicted_us"] / 1e3
            continue
        try:
            out[m] = model.predict(g, m).ms
        except ValueError:
            pass
    return out
