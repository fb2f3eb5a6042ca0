"""``load_vector`` and ``vector_width`` live in ``runtime/vector.py`` (the lean kernels use them
too); this name stays for the fused kernel's ``from .vector import ...``."""

from ...runtime.vector import load_vector, vector_width  # noqa: F401
