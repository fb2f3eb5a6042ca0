"""deftnumba.lean: the lean convolution, after LeanResNet (Ephrath et al., 2019/2020).

A lean operator keeps a feature map's width ``C`` and replaces a dense 3x3
convolution (``9*C*C`` weights) by the sum of a full 1x1 convolution and a sparse
depthwise stencil (``C*C + S*C`` weights):

>>> import numpy as np
>>> from deftnumba.lean import lean_conv2d, PATTERNS
>>> x = np.random.rand(2, 8, 9, 9).astype(np.float32)
>>> pointwise = np.random.rand(8, 8).astype(np.float32)
>>> stencil = np.random.rand(8, len(PATTERNS["star5"])).astype(np.float32)
>>> y = lean_conv2d(x, pointwise, stencil, pattern="star5")       # [2, 8, 9, 9]

The torch layer and blocks live in ``deftnumba.lean.torch`` and
``deftnumba.lean.models`` (both import torch; this package does not).
"""

from .geometry import PATTERNS, LeanGeometry, flipped, pattern_taps
from .ops import BACKWARD_METHODS, METHODS, lean_conv2d, lean_conv2d_backward
from .reference import LeanGrads

__all__ = ["PATTERNS", "LeanGeometry", "LeanGrads", "METHODS", "BACKWARD_METHODS", "lean_conv2d",
           "lean_conv2d_backward", "flipped", "pattern_taps"]
