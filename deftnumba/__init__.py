"""deftnumba: deformable convolution (DCN v1/v2) kernels in Numba CUDA.

``import deftnumba`` picks a backend once (real CUDA or Numba's CUDA simulator,
see ``deftnumba.runtime.backend``) and says which on stderr. The package is one
house for several systems::

    runtime/  how a kernel runs (backend, simulator, grid, timing)
    perf/     how we reason about speed (device model, roofline, audit, provenance)
    bench/    how we measure (harness over registered ops, plots)
    dcn/      deformable convolution, after DefT

The DCN API is re-exported here unchanged; the old module names
(``deftnumba.backend``, ``deftnumba.tiling``, ``deftnumba.torch`` ...) still import.
"""

from .runtime import backend  # FIRST: chooses the backend before anything touches Numba
from . import _aliases

_aliases.install()

from .dcn.planning import plan as tiling  # noqa: E402  offset statistics, out-of-tile model, plans
from .dcn.ops import METHODS, deform_conv2d  # noqa: E402
from .dcn.ops import BACKWARD_METHODS, DeformConv2dGrads, deform_conv2d_backward  # noqa: E402

__version__ = "0.1.0"

__all__ = ["METHODS", "backend", "deform_conv2d", "__version__",
           "BACKWARD_METHODS", "DeformConv2dGrads", "deform_conv2d_backward", "tiling"]
