"""Numba CUDA kernels of the lean operator, one module per kernel family.

``strip``: the one-launch forward at stride 1 (blocks own strips of consecutive pixels
of the batch), which also computes the stride-1 input gradient: the same operator with
the transposed pointwise matrix and the mirrored stencil.
``fused``: the one-launch forward on 2-D tiles, for the other strides (and any stride
when a ``LeanTileConfig`` is asked for).
``depthwise``: the separate method's depthwise kernel, the depthwise adjoint and
the deterministic stencil/bias gradient reduction.

Nothing here imports ``deftnumba.lean.ops``; ``cuda`` comes from the backend.
"""

# Shared arrays are declared 16-byte aligned, so that a thread's contiguous float32
# quadruple is one LDS.128 (the simulator accepts and ignores the alignment: runtime/simulator.py).
SHARED_ALIGN = 16
