"""Compile-time tiles of the register-blocked kernels, shared by every system.

A tiled kernel (DCN ``fused``, Tucker ``core_conv``, lean ``fused``) gives each block a
``tile_h x tile_w`` patch of output pixels and ``oc_block`` output channels, and each
thread ``reg_oc`` contiguous channels times ``reg_px`` contiguous pixels of it (register
blocking). The block stages the input footprint of its tile in shared memory:
``staged_extent`` is that footprint, in one formula. Host-side Python only: the kernel
factories evaluate these once per configuration, as compile-time constants.
"""

from __future__ import annotations


def staged_extent(tile: int, stride: int, taps: int, dilation: int, halo: int = 0) -> int:
    """Input rows (or columns) a tile of ``tile`` outputs reads with undeformed taps,
    ``(tile - 1) * stride + (taps - 1) * dilation + 1``, widened by ``halo`` on each side."""
    return (tile - 1) * stride + (taps - 1) * dilation + 1 + 2 * halo


class RegisterBlockedTile:
    """Shared checks and sizes of a tile dataclass with the fields ``tile_h``, ``tile_w``,
    ``oc_block``, ``reg_oc`` and ``reg_px`` (see the module docstring); the dataclass calls
    ``check_blocking`` from its ``__post_init__`` and adds its own checks."""

    def check_positive(self, *fields: str) -> None:
        """``ValueError`` naming the first of ``fields`` that is below 1."""
        for name in fields:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")

    def check_blocking(self, *more_fields: str) -> None:
        """The five blocking fields (and ``more_fields``) are >= 1, a thread's channels divide
        the block's, and its pixels divide the tile's."""
        self.check_positive("tile_h", "tile_w", *more_fields, "oc_block", "reg_oc", "reg_px")
        if self.oc_block % self.reg_oc:
            raise ValueError(f"oc_block ({self.oc_block}) must be a multiple of reg_oc ({self.reg_oc})")
        if self.pixels % self.reg_px:
            raise ValueError(f"tile_h*tile_w ({self.pixels}) must be a multiple of reg_px ({self.reg_px})")

    @property
    def pixels(self) -> int:
        """Output pixels of one tile."""
        return self.tile_h * self.tile_w

    @property
    def threads(self) -> int:
        """Threads of one block: channel groups times pixel groups."""
        return (self.oc_block // self.reg_oc) * (self.pixels // self.reg_px)
