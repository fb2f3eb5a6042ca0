"""THE device model: what the roofline ceilings and the tile planner know about a GPU.

``DeviceModel`` holds the facts (SMs, shared memory, registers, thread and block
limits, arithmetic rates, bandwidths) the planner's cost model uses;
``Ceilings`` are the two roofs of a roofline (fp32 rate, memory bandwidth),
derived from a ``DeviceModel`` (``Ceilings.of``) or measured on the device
(``perf.roofline.measure_ceilings``). H200 figures are leads until measured:
the datasheet's fp32 rate and a 4.3 TB/s copy bandwidth, a lead from outside the
project (nothing here measured it; ``measure_ceilings`` measures it on a GPU);
``source`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeviceModel:
    """The device facts the cost model uses. Numbers not from a datasheet are marked."""

    name: str
    sms: int
    fp32_flops: float           # FLOP/s, FMA = 2
    fp64_flops: float
    dram_bandwidth: float       # B/s (H200: ~4.3 TB/s copy, a lead from outside the project)
    l2_bandwidth: float         # B/s (assumed ~2.5x DRAM; not measured)
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 48 * 1024   # static shared memory limit per block
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    blocks_per_sm: int = 32
    max_threads: int = 512      # largest block the planner considers
    min_threads: int = 64
    gemm_efficiency: float = 0.75  # vendor GEMM/conv (cuBLAS, cuDNN) fraction of the roofline (assumed)
    clock_hz: float = 1.98e9    # the clock the fp32 peak implies: 67e12 / (2 x 128 lanes x 132 SMs)
    schedulers: int = 4         # warp schedulers per SM, one instruction issued per clock each
    launch_us: float = 3.0      # per kernel launch (assumed; Numba's host dispatch adds more)
    simulated: bool = False     # cost = the simulator's Python work, not GPU time


H200 = DeviceModel("H200", sms=132, fp32_flops=67e12, fp64_flops=34e12, dram_bandwidth=4.3e12,
                   l2_bandwidth=11e12)
SIMULATOR = replace(H200, name="simulator", max_threads=64, min_threads=16, simulated=True)
"""The simulator: small blocks, and the cost is Python work (~100 us per simulated thread plus
~1 us per thread instruction), so plans made there keep the test suite fast."""


@dataclass(frozen=True)
class Ceilings:
    """A device's two roofs: the fp32 arithmetic rate and the memory bandwidth.

    ``source`` says where they come from: ``"datasheet lead"`` / ``"lead"`` values
    are leads to be replaced by ``measure_ceilings()`` on the device itself.
    """

    name: str
    flops_per_s: float           # fp32, non-tensor-core (TF32 off)
    bytes_per_s: float
    source: str = "lead"
    fp64_flops_per_s: float | None = None

    def rate(self, dtype: str = "float32") -> float:
        if dtype == "float64" and self.fp64_flops_per_s:
            return self.fp64_flops_per_s
        return self.flops_per_s

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/B) above which a kernel is compute-bound."""
        return self.flops_per_s / self.bytes_per_s

    @classmethod
    def of(cls, device: DeviceModel, name: str, source: str = "lead") -> "Ceilings":
        """The roofs of a device model: its fp32 and fp64 rates and its DRAM bandwidth."""
        return cls(name, device.fp32_flops, device.dram_bandwidth, source=source,
                   fp64_flops_per_s=device.fp64_flops)


H200_DATASHEET = Ceilings(
    "H200 datasheet lead (fp32 67 TFLOP/s, HBM3e 4.8 TB/s)", 67e12, 4.8e12,
    source="datasheet lead", fp64_flops_per_s=34e12)
H200_LEADS = Ceilings.of(
    H200, "H200 leads (fp32 67 TFLOP/s datasheet, 4.3 TB/s copy: a lead from outside the project, "
          "not measured here)")
"""The planner's H200 model as roofs: the one set of H200 leads."""
