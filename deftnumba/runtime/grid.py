"""Launch configurations within CUDA's grid limits.

``launch_config`` sizes a grid-stride loop; ``GRID_YZ_LIMIT`` is CUDA's cap on
``gridDim.y`` and ``gridDim.z``, past which a launch must be split (the fused
DCN kernel splits its batch and channel blocks at it).
"""

from __future__ import annotations

from . import backend

GRID_YZ_LIMIT = 65535  # CUDA's limit on gridDim.y and gridDim.z (x allows 2**31 - 1)


def launch_config(total: int, threads: int = 256) -> tuple[int, int]:
    """Blocks and threads for a grid-stride loop over ``total`` items.

    The block count is capped, so any problem size launches within the device's
    grid limits; kernels loop ``for i in range(cuda.grid(1), total, cuda.gridsize(1))``.
    In the simulator, where every thread is a Python thread, the cap is small.
    """
    cap = 8 if backend.IS_SIMULATOR else 65536
    threads = min(threads, 64) if backend.IS_SIMULATOR else threads
    blocks = max(1, min(cap, -(-int(total) // threads)))
    return blocks, threads
