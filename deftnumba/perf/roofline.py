"""The generic roofline: ``Operator`` counts, floors and measured ceilings.

Before timing anything, count the floating-point operations an operator must do
and the fewest bytes it must move through device memory (inputs read once,
outputs written once). FLOPs over the arithmetic rate and bytes over the
bandwidth give two times; the larger is the *floor*. Each system counts its own
operators (``dcn.roofline``); the ceilings come from ``perf.device`` or from
``measure_ceilings`` on the GPU itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .device import H200_LEADS, Ceilings

PASSES = ("fwd", "bwd", "fwdbwd")


@dataclass(frozen=True)
class Operator:
    """One operator's counts: FLOPs and the minimal bytes it reads and writes."""

    name: str
    flops: float
    bytes_read: float
    bytes_written: float
    gemm_flops: float = 0.0  # the part of ``flops`` spent in inner products

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOP per byte of device-memory traffic."""
        return self.flops / self.bytes if self.bytes else math.inf


def floor_ms_of(flops_: float, bytes_: float, ceilings: Ceilings = H200_LEADS, dtype: str = "float32") -> float:
    """``max(FLOPs / rate, bytes / bandwidth)`` in milliseconds."""
    return 1e3 * max(flops_ / ceilings.rate(dtype), bytes_ / ceilings.bytes_per_s)


def measure_ceilings(copy_bytes: int = 2 << 30, gemm_n: int = 8192, repeats: int = 10) -> Ceilings:
    """Measure the two roofs on the current GPU with CuPy: a device-to-device copy
    (bytes read + written) and an fp32 ``gemm_n``-cubed matrix product on random
    data with TF32 off (CuPy's default unless ``CUPY_TF32=1``, which is refused).
    The median of ``repeats`` timed runs after a warm-up, with CUDA events."""
    import os

    import cupy as cp
    import numpy as np

    if int(os.environ.get("CUPY_TF32", "0") or 0) > 0:
        raise RuntimeError("CUPY_TF32 is set: the fp32 ceiling must be measured with TF32 off")

    from ..runtime.timing import time_calls

    def median_ms(fn) -> float:
        return time_calls({"run": fn}, repeats=repeats, warmup=1)["run"]["median_ms"]

    src = cp.random.standard_normal(copy_bytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    copy_ms = median_ms(lambda: cp.copyto(dst, src))
    del src, dst
    a = cp.random.standard_normal((gemm_n, gemm_n), dtype=cp.float32)
    b = cp.random.standard_normal((gemm_n, gemm_n), dtype=cp.float32)
    c = cp.empty_like(a)
    gemm_ms = median_ms(lambda: cp.matmul(a, b, out=c))
    del a, b, c
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Ceilings(f"measured on {name}: copy {2 * copy_bytes / copy_ms / 1e9:.0f} GB/s, "
                    f"fp32 GEMM {2 * gemm_n ** 3 / gemm_ms / 1e9:.1f} TFLOP/s (TF32 off)",
                    flops_per_s=2 * gemm_n ** 3 / (gemm_ms * 1e-3),
                    bytes_per_s=2 * copy_bytes / (copy_ms * 1e-3), source="measured")
