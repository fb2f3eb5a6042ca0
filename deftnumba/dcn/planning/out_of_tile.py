"""The out-of-tile model: which deformed samples leave the fused kernel's staged region.

The fused kernel stages, per block, the input region a tile of output pixels would
read with zero offsets, widened by a ``halo`` (``kernels/fused_tiled.py``; the
exact rule is ``fused_tiled.OUT_OF_TILE``). ``out_of_tile_fraction`` predicts the
fraction of in-band samples whose 2x2 window leaves it, from the offset
statistics alone; ``brute_force_counts`` counts the real thing in NumPy (the
kernel's counting build must agree); ``out_of_tile_sweep`` sets one against the other.
"""

from __future__ import annotations

import numpy as np

from ...runtime import backend, precision
from ..kernels.fused_tiled import TileConfig, count_out_of_tile
from ...runtime.tiles import staged_extent
from .stats import OffsetStats, offset_statistics


def _axis_terms(size, out_size, stride, pad, dil, taps, tile, halo, support, pmf):
    """Per axis: expected in-band and in-tile probability mass, summed over (output index, tap).

    For output index o, tap t: row r = o*stride - pad + t*dil; a floor f = floor(d) puts the
    2x2 window at rows r+f, r+f+1 (unclamped). The tile of o stages rows
    [o0*stride - pad - halo, ... + span) with o0 = (o // tile) * tile; the sample is
    in-tile when both rows lie in it.
    """
    span = staged_extent(tile, stride, taps, dil, halo)
    o = np.arange(out_size)[:, None, None]
    t = np.arange(taps)[None, :, None]
    f = support[None, None, :]
    first = o * stride - pad + t * dil + f
    band = (first >= -1) & (first <= size - 1)
    start = (o // tile) * tile * stride - pad - halo
    inside = band & (first >= start) & (first + 1 <= start + span - 1)
    p = np.asarray(pmf, dtype=np.float64)[None, None, :]
    return float((band * p).sum()), float((inside * p).sum())


def out_of_tile_fraction(geometry, stats: OffsetStats, tile_h: int, tile_w: int, halo: int) -> float:
    """Expected fraction of in-band samples that are out-of-tile, from the statistics alone.

    Model: every (pixel, tap) draws ``floor(dy)`` and ``floor(dx)`` independently from
    ``stats.floor_y`` / ``stats.floor_x``. Under that assumption the expected numbers of
    in-band and in-tile samples factor into a row sum times a column sum over
    (output index, tap), image borders and ragged edge tiles included, and the fraction is
    ``1 - E[in-tile] / E[in-band]``. It is exact in expectation for independent offsets;
    spatial correlation does not change the expectation (only how it varies from tile to
    tile), correlation *between* dy and dx does. One convention differs from the kernel
    on a set of measure zero: a position exactly on ``y = -1`` (or ``x = -1``) is outside
    the band for the kernel but counted by its floor (-1) here; it matters only for
    offsets that put samples exactly there (integer offsets next to a padded border).
    """
    g = geometry
    support = stats.support
    band_y, in_y = _axis_terms(g.height, g.out_h, g.stride_h, g.pad_h, g.dil_h, g.kernel_h,
                               tile_h, halo, support, stats.floor_y)
    band_x, in_x = _axis_terms(g.width, g.out_w, g.stride_w, g.pad_w, g.dil_w, g.kernel_w,
                               tile_w, halo, support, stats.floor_x)
    band = band_y * band_x
    return 0.0 if band <= 0 else max(0.0, 1.0 - (in_y * in_x) / band)


def out_of_tile_table(geometry, stats: OffsetStats, tiles=(2, 4, 8, 16, 32), halos=(0, 1, 2, 3, 4)):
    """``out_of_tile_fraction`` for square tiles x halos: a ``[len(tiles), len(halos)]`` array
    (rows: tile side, columns: halo), ready for a heat map or one line per halo."""
    return np.array([[out_of_tile_fraction(geometry, stats, t, t, h) for h in halos] for t in tiles])


def brute_force_counts(geometry, offset, tile: TileConfig) -> dict:
    """Count in-tile, out-of-tile and outside-band samples in NumPy, by the kernel's rule.

    Uses the same float arithmetic as the kernel (position = float(base) + offset in the
    layer's compute dtype, on offsets rounded to its storage dtype), so the counts equal ``fused_tiled.count_out_of_tile`` exactly.
    Returns the same dict as that function.
    """
    g = geometry
    # the kernel's compute type (float32 for half layers, whose offsets are rounded to half first)
    dt = precision.compute_dtype(g.dtype).type
    off = np.asarray(backend.to_host(offset))
    if precision.is_half(g.dtype) and off.dtype != precision.storage_dtype(g.dtype):
        off = off.astype(dt).astype(precision.as_dtype(g.dtype))
    off = precision.to_compute(precision.device_view(off), g.dtype, np).astype(dt, copy=False)
    n, k, ho, wo = g.batch, g.taps, g.out_h, g.out_w
    off = off.reshape(n, g.offset_groups, k, 2, ho, wo)
    ti, tj = np.divmod(np.arange(k), g.kernel_w)
    oy = np.arange(ho)
    ox = np.arange(wo)
    base_y = (oy[None, :] * g.stride_h - g.pad_h + ti[:, None] * g.dil_h).astype(dt)[:, :, None]  # [K,Ho,1]
    base_x = (ox[None, :] * g.stride_w - g.pad_w + tj[:, None] * g.dil_w).astype(dt)[:, None, :]  # [K,1,Wo]
    y = base_y + off[:, :, :, 0]
    x = base_x + off[:, :, :, 1]
    with np.errstate(invalid="ignore"):
        band = (y > dt(-1)) & (y < dt(g.height)) & (x > dt(-1)) & (x < dt(g.width))
    fy = np.floor(np.where(band, y, 0)).astype(np.int64)
    fx = np.floor(np.where(band, x, 0)).astype(np.int64)
    rows, cols = tile.staged_shape(g)
    iy0 = ((oy // tile.tile_h) * tile.tile_h * g.stride_h - g.pad_h - tile.halo)[None, :, None]
    ix0 = ((ox // tile.tile_w) * tile.tile_w * g.stride_w - g.pad_w - tile.halo)[None, None, :]
    # the unclamped 2x2 window inside the staged rows x columns (OUT_OF_TILE)
    inside = (band & (fy >= iy0) & (fy + 1 <= iy0 + rows - 1) & (fx >= ix0) & (fx + 1 <= ix0 + cols - 1))
    per_position = g.in_channels // g.offset_groups
    in_tile = int(inside.sum()) * per_position
    inband = int(band.sum()) * per_position
    total = n * g.offset_groups * k * ho * wo * per_position
    out_tile = inband - in_tile
    return {"in_tile": in_tile, "out_of_tile": out_tile, "outside_band": total - inband,
            "out_of_tile_fraction": out_tile / inband if inband else 0.0}


def out_of_tile_sweep(geometry, offset, tiles=((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)),
                      halos=(0, 1, 2, 3, 4), count: str = "numpy") -> dict:
    """Model against measurement over tile shapes x halos, for one layer's offsets.

    Returns ``{"tiles", "halos", "model", "measured"}``; ``model`` and ``measured`` are
    ``[len(tiles), len(halos)]`` out-of-tile fractions. ``model`` comes from
    ``offset_statistics(offset)`` alone; ``measured`` counts the real samples with
    ``brute_force_counts`` (``count="numpy"``) or the kernel's counting build
    (``count="kernel"``: the same numbers, slow in the simulator, so small layers only).
    """
    if count not in ("numpy", "kernel"):
        raise ValueError(f"count must be 'numpy' or 'kernel', got {count!r}")
    stats = offset_statistics(offset)
    model = np.zeros((len(tiles), len(halos)))
    measured = np.zeros_like(model)
    for a, (th, tw) in enumerate(tiles):
        for b, halo in enumerate(halos):
            model[a, b] = out_of_tile_fraction(geometry, stats, th, tw, halo)
            tile = TileConfig(th, tw, halo, 1, 1, 1, 1)
            counter = brute_force_counts if count == "numpy" else count_out_of_tile
            measured[a, b] = counter(geometry, offset, tile)["out_of_tile_fraction"]
    return {"tiles": tuple(tiles), "halos": tuple(halos), "model": model, "measured": measured}
