"""A memory-sector model of the im2col gather: what an offset field costs in requests.

Deformed taps scatter a warp's reads; ``gather_sectors`` counts the distinct
32-byte sectors a warp's corner reads touch per tap, for a given offset field,
so a notebook can show how offset magnitude and smoothness turn into traffic.
A model of requests to L1/L2, not of DRAM bytes.
"""

from __future__ import annotations

import numpy as np


def gather_sectors(geometry, offset, warp: int = 32, sector_bytes: int = 32) -> dict:
    """Count the memory sectors the im2col gather requests, for given offsets.

    Models ``kernels.im2col.columns_kernel``: consecutive threads take consecutive
    output pixels of one (image, channel), a warp is ``warp`` such threads, and for
    each tap every thread whose position is inside the band reads the four clamped
    corners of its bilinear footprint (out-of-band samples read nothing). A warp's
    reads of one tap cost one request per distinct ``sector_bytes`` sector they
    touch (input planes assumed sector-aligned). Channels of an offset group share
    the positions, so one plane per (image, group) is counted and scaled.

    Returns ``{"sectors", "bytes", "samples", "bytes_per_sample"}`` for the whole layer:
    ``samples`` counts in-band samples, ``bytes`` is ``sectors * sector_bytes``: traffic
    requested from L1/L2, not necessarily from DRAM.
    """
    g = geometry
    off = np.asarray(offset, dtype=np.float64).reshape(g.batch, g.offset_groups, g.taps, 2, g.out_h, g.out_w)
    itemsize = np.dtype(g.dtype).itemsize
    per_sector = max(1, sector_bytes // itemsize)
    ti, tj = np.divmod(np.arange(g.taps), g.kernel_w)
    base_y = (np.arange(g.out_h)[None, :, None] * g.stride_h - g.pad_h + ti[:, None, None] * g.dil_h)
    base_x = (np.arange(g.out_w)[None, None, :] * g.stride_w - g.pad_w + tj[:, None, None] * g.dil_w)
    pixels = g.out_h * g.out_w
    warp_of = (np.arange(pixels) // warp)[None, :]                       # [1, P]
    tap_of = np.arange(g.taps)[:, None]                                  # [K, 1]
    group_key = (tap_of * (warp_of.max() + 1) + warp_of).astype(np.int64)  # one key per (tap, warp)
    sectors_per_row = -(-g.width // per_sector)
    sectors = samples = 0
    for n in range(g.batch):
        for grp in range(g.offset_groups):
            with np.errstate(invalid="ignore"):
                y = (base_y + off[n, grp, :, 0]).reshape(g.taps, pixels)
                x = (base_x + off[n, grp, :, 1]).reshape(g.taps, pixels)
                band = (y > -1) & (y < g.height) & (x > -1) & (x < g.width)
            y0 = np.floor(np.where(band, y, 0)).astype(np.int64)
            x0 = np.floor(np.where(band, x, 0)).astype(np.int64)
            keys = []
            for cy in (np.clip(y0, 0, g.height - 1), np.clip(y0 + 1, 0, g.height - 1)):
                for cx in (np.clip(x0, 0, g.width - 1), np.clip(x0 + 1, 0, g.width - 1)):
                    sector = cy * sectors_per_row + cx // per_sector
                    keys.append((group_key * (g.height * sectors_per_row) + sector)[band])
            sectors += np.unique(np.concatenate(keys)).size
            samples += int(band.sum())
    channels = g.in_channels // g.offset_groups
    sectors *= channels
    samples *= channels
    return {"sectors": int(sectors), "bytes": int(sectors * sector_bytes), "samples": int(samples),
            "bytes_per_sample": sectors * sector_bytes / samples if samples else 0.0}
