"""Deformable convolution (DCN v1/v2) after DefT: geometry, ops, kernels, planning, roofline counts.

The public API (``deform_conv2d``, ``deform_conv2d_backward``, ``METHODS`` ...)
is re-exported by ``deftnumba`` itself.
"""

from .ops import BACKWARD_METHODS, METHODS, DeformConv2dGrads, deform_conv2d, deform_conv2d_backward

__all__ = ["BACKWARD_METHODS", "METHODS", "DeformConv2dGrads", "deform_conv2d", "deform_conv2d_backward"]
