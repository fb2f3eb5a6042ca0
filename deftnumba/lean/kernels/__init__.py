"""Numba CUDA kernels of the lean operator, one module per kernel family.

``fused``: the one-launch forward (and the stride-1 input gradient, which is the
same operator with the transposed pointwise matrix and the mirrored stencil).
``depthwise``: the separate method's depthwise kernel, the depthwise adjoint and
the deterministic stencil/bias gradient reduction.

Nothing here imports ``deftnumba.lean.ops``; ``cuda`` comes from the backend.
"""

# Shared arrays are declared 16-byte aligned, so that a thread's contiguous float32
# quadruple is one LDS.128 (the simulator accepts and ignores the alignment: runtime/simulator.py).
SHARED_ALIGN = 16
