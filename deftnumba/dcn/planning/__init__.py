"""Tile planning for the fused DCN kernel: offset statistics -> out-of-tile model -> cost -> ``Plan``.

``deftnumba.tiling`` (the old name) is ``planning.plan``, which holds every name.
"""

from .plan import *  # noqa: F401,F403
