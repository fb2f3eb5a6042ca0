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


def run(method: str = "auto", seed: int = 0, repeats: int | None = None) -> dict:
    """Run, check against the float64 reference, and time each pipeline operator.

    The layer runs ``repeats`` times after a warm-up (default 5 in the simulator, 20 on a
    GPU); the times shown are those of the call whose whole time is the median, so its
    parts never add up to more than the whole."""
    repeats = repeats if repeats is not None else (5 if backend.IS_SIMULATOR else 20)
    geometry = SIMULATOR_LAYER if backend.IS_SIMULATOR else GPU_LAYER
    host = random_layer(geometry, seed)
    arrays = [backend.to_device(a) if a is not None else None for a in host]
    x, offset, weight, bias, mask = arrays
    conv = dict(stride=(geometry.stride_h, geometry.stride_w), padding=(geometry.pad_h, geometry.pad_w),
                dilation=(geometry.dil_h, geometry.dil_w))
    out = backend.to_host(deform_conv2d(x, offset, weight, bias, **conv, mask=mask, method=method))  # warm-up
    expected = reference.deform_conv2d(*host[:4], **conv, mask=host[4])
    rel_error = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))

    # One stopwatch per call, and the whole call timed by the same clock as its parts, so
    # the parts shown (those of the median call) always add up to at most the whole.
    watches = []
    for _ in range(repeats):
        watch = timing.Stopwatch()
        with watch.section(_WHOLE):
            deform_conv2d(x, offset, weight, bias, **conv, mask=mask, method=method, stopwatch=watch)
        watches.append(watch)
    backend.synchronize()
    calls = []
    for watch in watches:
        parts: dict[str, float] = {}
        for name, ms in watch.milliseconds().items():
            parts[name] = float(sum(ms))  # an operator may run more than once per call
        calls.append(parts)
    median_call = sorted(calls, key=lambda parts: parts[_WHOLE])[(len(calls) - 1) // 2]
    whole = median_call.pop(_WHOLE)
    return {"geometry": geometry, "method": method, "rel_error": rel_error, "passed": rel_error < 1e-5,
            "unit": watches[0].unit, "operator_ms": median_call, "call_ms": whole, "repeats": repeats,
            "device": backend.device_info()["device"]}


_WHOLE = "whole call"


def format_result(r: dict) -> str:
    g = r["geometry"]
    lines = [
        f"device: {r['device']}",
        f"layer: N={g.batch} C={g.in_channels}->{g.out_channels} {g.height}x{g.width} "
        f"{g.kernel_h}x{g.kernel_w} pad={g.pad_h} {g.dtype} mask={g.has_mask}  method={r['method']}",
        f"check vs float64 reference: rel. error {r['rel_error']:.2e} -> {'PASS' if r['passed'] else 'FAIL'}",
        f"time per operator ({r['unit']}; the median of {r['repeats']} calls after a warm-up):",
    ]
    for name, ms in r["operator_ms"].items():
        lines.append(f"  {name:<20} {ms:10.3f} ms")
    other = r["call_ms"] - sum(r["operator_ms"].values())
    lines.append(f"  {'other (host work)':<20} {max(other, 0.0):10.3f} ms  (checks, allocation, launches between operators)")
    lines.append(f"  {'whole call':<20} {r['call_ms']:10.3f} ms")
    if backend.IS_SIMULATOR:
        lines.append("note: simulator times measure Python threads on the CPU, not GPU performance.")
    return "\n".join(lines)
