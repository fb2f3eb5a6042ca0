"""THE random DCN layer: the inputs every test, benchmark, demo and notebook draws.

One rule, so a "random layer" means the same thing everywhere: nothing is zero
and nothing sits on a grid line. The input is standard normal; offsets are
normal with ``offset_scale`` pixels of spread (non-integer, up to a few pixels);
weights are normal scaled by ``1/sqrt(fan_in)`` (outputs stay O(1)); the bias is
standard normal; the mask is uniform in ``(0.1, 1)``.
"""

from __future__ import annotations

import numpy as np

from .geometry import Geometry

MASK_RANGE = (0.1, 1.0)


def random_layer(geometry: Geometry, seed=0, offset_scale: float = 2.0):
    """Random ``(input, offset, weight, bias, mask)`` NumPy arrays for a geometry.

    ``seed``: an int (replayable) or a ``numpy.random.Generator`` (drawn from in place).
    ``bias`` / ``mask`` are ``None`` where the geometry has none.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shapes, dtype = geometry.shapes, np.dtype(geometry.dtype)

    def normal(shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    fan_in = int(np.prod(shapes["weight"][1:]))
    return (normal(shapes["input"]), normal(shapes["offset"], offset_scale),
            normal(shapes["weight"], 1.0 / np.sqrt(fan_in)),
            normal(shapes["bias"]) if geometry.has_bias else None,
            rng.uniform(*MASK_RANGE, shapes["mask"]).astype(dtype) if geometry.has_mask else None)
