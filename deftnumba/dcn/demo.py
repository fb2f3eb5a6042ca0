"""The demo layer: one DCN v2 forward on the embedded default, checked and timed.

On a GPU it is the DefT paper's layer (``deft64``: 8 x 64 -> 64 channels,
64x64, 3x3) timed with CUDA events; in the simulator a tiny layer whose times
are simulator wall-clock times, labelled so.
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime import backend, timing
from . import reference
from .geometry import Geometry
from .inputs import random_layer
from .ops import deform_conv2d

GPU_LAYER = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64,
                     kernel_h=3, kernel_w=3, pad_h=1, pad_w=1)
SIMULATOR_LAYER = Geometry(batch=2, in_channels=4, height=9, width=11, out_channels=5,
                           kernel_h=3, kernel_w=3, pad_h=1, pad_w=1)


def run(method: str = "auto", seed: int = 0, repeats: int = 5) -> dict:
    """Run, check against the float64 reference, and time each pipeline operator."""
    geometry = SIMULATOR_LAYER if backend.IS_SIMULATOR else GPU_LAYER
    host = random_layer(geometry, seed)
    arrays = [backend.to_device(a) if a is not None else None for a in host]
    x, offset, weight, bias, mask = arrays
    conv = dict(stride=(geometry.stride_h, geometry.stride_w), padding=(geometry.pad_h, geometry.pad_w),
                dilation=(geometry.dil_h, geometry.dil_w))
    out = backend.to_host(deform_conv2d(x, offset, weight, bias, **conv, mask=mask, method=method))  # warm-up
    expected = reference.deform_conv2d(*host[:4], **conv, mask=host[4])
    rel_error = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))

    stopwatch = timing.Stopwatch()
    start = time.perf_counter()
    for _ in range(repeats):
        deform_conv2d(x, offset, weight, bias, **conv, mask=mask, method=method, stopwatch=stopwatch)
    backend.synchronize()
    wall = (time.perf_counter() - start) / repeats * 1e3
    times = {name: float(np.median(ms)) * (len(ms) / repeats) for name, ms in stopwatch.milliseconds().items()}
    return {"geometry": geometry, "method": method, "rel_error": rel_error, "passed": rel_error < 1e-5,
            "unit": stopwatch.unit, "operator_ms": times, "call_ms": wall,
            "device": backend.device_info()["device"]}


def format_result(r: dict) -> str:
    g = r["geometry"]
    lines = [
        f"device: {r['device']}",
        f"layer: N={g.batch} C={g.in_channels}->{g.out_channels} {g.height}x{g.width} "
        f"{g.kernel_h}x{g.kernel_w} pad={g.pad_h} {g.dtype} mask={g.has_mask}  method={r['method']}",
        f"check vs float64 reference: rel. error {r['rel_error']:.2e} -> {'PASS' if r['passed'] else 'FAIL'}",
        f"time per operator ({r['unit']}, median per call):",
    ]
    for name, ms in r["operator_ms"].items():
        lines.append(f"  {name:<20} {ms:10.3f} ms")
    lines.append(f"  {'whole call':<20} {r['call_ms']:10.3f} ms (host clock)")
    if backend.IS_SIMULATOR:
        lines.append("note: simulator times measure Python threads on the CPU, not GPU performance.")
    return "\n".join(lines)
