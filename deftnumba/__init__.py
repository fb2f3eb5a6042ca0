"""deftnumba: deformable convolution (DCN v1/v2) kernels in Numba CUDA.

``import deftnumba`` picks a backend once (real CUDA or Numba's CUDA simulator,
see ``deftnumba.backend``) and says which on stderr.
"""

from . import backend
from . import tiling  # offset statistics, out-of-tile model, plans (method="fused")
from .ops import METHODS, deform_conv2d
from .ops import BACKWARD_METHODS, DeformConv2dGrads, deform_conv2d_backward

__version__ = "0.1.0"

__all__ = ["METHODS", "backend", "deform_conv2d", "__version__",
           "BACKWARD_METHODS", "DeformConv2dGrads", "deform_conv2d_backward", "tiling"]
