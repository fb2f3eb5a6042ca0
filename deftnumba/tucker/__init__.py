"""Tucker-format convolution, after TDC (PPoPP'23).

* ``decompose(weight, ranks, method)``: Tucker-2 factors of a conv weight (TensorLy);
* ``tucker_conv2d(input, first, core, last, bias, stride, padding, dilation, groups,
  method=...)``: the layer, with ``METHODS`` ``three_pass``, ``fused`` and ``winograd``
  (``three_pass`` with a Winograd F(2x2, 3x3) core conv, for 3x3 cores at stride 1);
* ``reference``: the float64 NumPy rule; ``geometry``: argument checks;
* ``model``: performance model and tile tuner; ``ranks``: ``choose_ranks``;
* ``torch``: ``TuckerConv2d``; ``admm``: ADMM training; ``bench_op``: the bench op.
"""

from .decompose import TuckerFactors, decompose
from .geometry import TuckerGeometry, check_tucker
from .ops import METHODS, tucker_conv2d
from .reference import reconstruct, tucker_conv2d_reference

__all__ = ["METHODS", "TuckerFactors", "TuckerGeometry", "check_tucker", "decompose", "reconstruct",
           "tucker_conv2d", "tucker_conv2d_reference"]
