"""What the notebooks measure about DCN: every method checked against the float64
reference, per-operator times, and the fused kernel's tiles timed against each other.

Each works on the current backend (in the simulator: tiny shapes; its times are
simulator wall-clock times, labelled by their ``unit``).
"""

from __future__ import annotations

import numpy as np

from ..runtime import backend, timing
from ..runtime.timing import time_calls
from . import ops, reference
from .geometry import Geometry
from .inputs import random_layer
from .planning import plan as tiling


# --------------------------------------------------------------------------- correctness checks
def check_methods(geometry=None, seed: int = 0, deterministic=(False, True)) -> list[dict]:
    """Every forward method and every backward method against the float64 reference.

    Runs on the current backend (in the simulator: keep ``geometry`` tiny). Forward
    outputs are compared with ``reference.deform_conv2d``; backward gradients (each of
    input, offset, weight, bias, mask; the worst is reported) with
    ``reference.deform_conv2d_backward``, for the atomic and the deterministic input
    gradient. One row per (pass, method): ``rel_error`` is ``||got - ref|| / ||ref||``.
    """

    g = geometry or Geometry(batch=2, in_channels=3, height=6, width=7, out_channels=4, kernel_h=3,
                             kernel_w=3, pad_h=1, pad_w=1, has_mask=True, has_bias=True)
    rng = np.random.default_rng(seed)
    shapes, dtype = g.shapes, np.dtype(g.dtype)
    x, offset, weight, bias, mask = random_layer(g, rng, offset_scale=1.5)
    grad_out = rng.standard_normal(shapes["output"]).astype(dtype)
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))
    tolerance = 1e-5 if dtype == np.float32 else 1e-12

    def rel(got, ref):
        got = backend.to_host(got).astype(np.float64)
        scale = float(np.linalg.norm(ref))
        return float(np.linalg.norm(got - ref) / (scale if scale > 0 else 1.0))

    def device(a):
        return backend.to_device(a) if a is not None else None

    rows = []
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv, mask=mask)
    for method in ops.METHODS:
        out = ops.deform_conv2d(device(x), device(offset), device(weight), device(bias), **conv,
                                mask=device(mask), method=method)
        err = rel(out, expected)
        rows.append({"pass": "fwd", "method": method, "rel_error": err, "tolerance": tolerance,
                     "ok": bool(err < tolerance)})
    ref = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv, mask=mask)
    for method in ops.BACKWARD_METHODS:
        for det in deterministic:
            grads = ops.deform_conv2d_backward(device(grad_out), device(x), device(offset), device(weight),
                                               device(bias), **conv, mask=device(mask), method=method,
                                               deterministic=det)
            errs = {name: rel(getattr(grads, name), getattr(ref, name))
                    for name in ("input", "offset", "weight", "bias", "mask")
                    if getattr(ref, name) is not None}
            worst = max(errs, key=errs.get)
            # Gradients sum over more terms than the forward: allow 10x the forward's bound.
            rows.append({"pass": "bwd" + (" (deterministic)" if det else " (atomic)"), "method": method,
                         "rel_error": errs[worst], "worst_gradient": worst, "tolerance": 10 * tolerance,
                         "ok": bool(errs[worst] < 10 * tolerance)})
    return rows


# --------------------------------------------------------------------------- per-operator timing and roofline
def time_operators(geometry, method: str = "im2col", repeats: int = 20, seed: int = 0) -> dict:
    """Median time of each operator of ``method`` on random data of ``geometry``.

    Uses ``timing.Stopwatch``: CUDA events on a GPU, the host clock in the simulator
    (the result's ``unit`` says which). One untimed call first (compilation, caches).
    Returns ``{"unit": str, "operator_ms": {name: median ms per call}, "device": str}``.
    """

    g = geometry
    arrays = [backend.to_device(a) if a is not None else None for a in random_layer(g, seed)]
    x, offset, weight, bias, mask = arrays
    kwargs = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w),
                  mask=mask, method=method)
    ops.deform_conv2d(x, offset, weight, bias, **kwargs)
    backend.synchronize()
    watch = timing.Stopwatch()
    for _ in range(repeats):
        ops.deform_conv2d(x, offset, weight, bias, **kwargs, stopwatch=watch)
    backend.synchronize()
    # An operator may run several times per call (one per image chunk): report per call.
    per_call = {name: float(np.median(ms)) * len(ms) / repeats for name, ms in watch.milliseconds().items()}
    return {"unit": watch.unit, "operator_ms": per_call, "device": backend.device_info()["device"] if not backend.IS_SIMULATOR else "Numba CUDA simulator (CPU)"}


def time_tiles(geometry, offset, device=None, repeats: int = 50, warmup: int = 3, seed: int = 0) -> dict[str, dict]:
    """Time the fused forward with the planned tile against other tiles, and im2col.

    The tiles come from ``tiling.rank_tiles`` for the statistics of ``offset`` on
    ``device`` (a ``tiling.DeviceModel``): the planner's pick, the best tile without a
    halo, the biggest tile and the last-ranked one. Inputs are random
    (``dcn.inputs.random_layer``); ``offset`` is used as given. Returns ``time_calls``'s dict,
    keyed ``"<pick>: <TH>x<TW>, halo <h>"`` and ``"im2col (no tiles)"``.
    """

    g = geometry
    x, _, weight, bias, mask = (backend.to_device(a) if a is not None else None for a in random_layer(g, seed))
    offset = backend.to_device(np.asarray(backend.to_host(offset), dtype=g.dtype))
    ranking = [tile for tile, _ in tiling.rank_tiles(g, tiling.offset_statistics(offset), top=1000, device=device)]
    if not ranking:
        raise ValueError("no feasible fused tile for this geometry and device")
    picks = {"planned": ranking[0],
             "best without halo": next((t for t in ranking if t.halo == 0), None),
             "biggest tile": max(ranking, key=lambda t: t.pixels),
             "ranked last": ranking[-1]}
    conv = dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w),
                mask=mask)
    calls, seen = {}, set()
    for name, tile in picks.items():
        if tile is None or tile in seen:
            continue
        seen.add(tile)
        plan = tiling.Plan("fused", tile)
        calls[f"{name}: {tile.tile_h}x{tile.tile_w}, halo {tile.halo}"] = (
            lambda plan=plan: ops.deform_conv2d(x, offset, weight, bias, **conv, method="fused", plan=plan))
    calls["im2col (no tiles)"] = lambda: ops.deform_conv2d(x, offset, weight, bias, **conv, method="im2col")
    return time_calls(calls, repeats=repeats, warmup=warmup)
