"""The staged region of the fused kernel, in one formula.

A tile of ``tile`` output rows (or columns) with ``taps`` taps reads, with zero
offsets, ``(tile - 1) * stride + (taps - 1) * dilation + 1`` input rows; the
fused kernel stages that footprint widened by ``halo`` on each side. The
kernel, its shared-memory size and the out-of-tile model all need this number:
they take it from here. (Host-side Python: the kernel factory evaluates it once,
a compile-time constant.)
"""

from __future__ import annotations


def staged_extent(tile: int, stride: int, taps: int, dilation: int, halo: int) -> int:
    """Input rows (or columns) a tile stages: the undeformed footprint of its taps plus the halo."""
    return (tile - 1) * stride + (taps - 1) * dilation + 1 + 2 * halo
