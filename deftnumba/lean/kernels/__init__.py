"""Numba CUDA kernels of the lean operator, one module per kernel family.

``fused``: the one-launch forward (and the stride-1 input gradient, which is the
same operator with the transposed pointwise matrix and the mirrored stencil).
``depthwise``: the separate method's depthwise kernel, the depthwise adjoint and
the deterministic stencil/bias gradient reduction.

Nothing here imports ``deftnumba.lean.ops``; ``cuda`` comes from the backend.
"""

from ... import backend

# Shared arrays are declared 16-byte aligned on the GPU, so that a thread's contiguous
# float32 quadruple is one LDS.128. Numba's simulator rejects the alignment argument
# (and NumPy's buffers are aligned anyway), so it gets None there.
SHARED_ALIGN = None if backend.IS_SIMULATOR else 16
