"""Offset statistics: what the out-of-tile model and the planner know about a layer's offsets.

``offset_statistics(offset)`` measures the distribution of ``floor(dy)`` and
``floor(dx)`` (all the out-of-tile rule depends on), quantiles of ``|dy|`` and
``|dx|`` and their spatial correlation length; ``normal_statistics(sigma)`` is
the same for normal offsets, without data (the planner's prior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...runtime import backend

CLIP = 64
"""``floor(dy)`` and ``floor(dx)`` beyond +-CLIP are lumped at +-(CLIP+1): always out-of-tile
(or outside the band) for any tile the planner considers."""


@dataclass(frozen=True)
class OffsetStats:
    """Statistics of one layer's offsets (hashable, so they can key the plan cache).

    floor_y, floor_x: probability of each ``floor(d)`` value for ``d = dy`` / ``dx``, a
        tuple over the integers ``-CLIP-1 .. CLIP+1`` (the ends hold the far tails).
    nonfinite: fraction of (dy, dx) pairs with a NaN or inf (those sample zero).
    quantiles: ``(q, |dy| quantile, |dx| quantile)`` rows for q in 0.5, 0.9, 0.99, 1.
    mean_y, mean_x, rms_y, rms_x: moments of dy and dx (finite values).
    corr_y, corr_x: correlation length of dy and dx along output rows (y) and columns
        (x), in output pixels: the lag where the autocorrelation first falls below 1/e
        (interpolated; ``inf`` if it never does within the map, 0 for white noise).
    samples: how many (dy, dx) pairs were measured.
    """

    floor_y: tuple
    floor_x: tuple
    nonfinite: float = 0.0
    quantiles: tuple = ()
    mean_y: float = 0.0
    mean_x: float = 0.0
    rms_y: float = 0.0
    rms_x: float = 0.0
    corr_y: float = 0.0
    corr_x: float = 0.0
    samples: int = 0

    @property
    def support(self) -> np.ndarray:
        """The integers ``floor_y`` / ``floor_x`` are indexed by."""
        return np.arange(-CLIP - 1, CLIP + 2)

    def key(self, decimals: int = 3) -> tuple:
        """The plan-cache key: the floor distributions rounded to ``decimals``."""
        return (tuple(round(p, decimals) for p in self.floor_y),
                tuple(round(p, decimals) for p in self.floor_x), round(self.nonfinite, decimals))

    def summary(self) -> dict:
        """The few numbers a notebook quotes."""
        q = {f"|dy| q{int(row[0] * 100)}": row[1] for row in self.quantiles}
        q.update({f"|dx| q{int(row[0] * 100)}": row[2] for row in self.quantiles})
        return dict(samples=self.samples, mean_y=self.mean_y, mean_x=self.mean_x, rms_y=self.rms_y,
                    rms_x=self.rms_x, corr_y=self.corr_y, corr_x=self.corr_x,
                    nonfinite=self.nonfinite, **q)


def _floor_pmf(d: np.ndarray) -> tuple:
    f = np.floor(d[np.isfinite(d)])
    f = np.clip(f, -CLIP - 1, CLIP + 1).astype(np.int64) + CLIP + 1
    counts = np.bincount(f, minlength=2 * CLIP + 3).astype(np.float64)
    total = d.size
    return tuple(float(v) for v in counts / total) if total else tuple([0.0] * (2 * CLIP + 3))


def _correlation_length(maps: np.ndarray, axis: int, max_lag: int = 16) -> float:
    """Lag (in pixels) at which the mean autocorrelation of ``maps[..., H, W]`` along ``axis``
    first drops below 1/e, linearly interpolated."""
    maps = np.where(np.isfinite(maps), maps, 0.0)
    maps = maps - maps.mean(axis=(-2, -1), keepdims=True)
    var = float(np.mean(maps * maps))
    if var == 0.0:
        return 0.0
    n = maps.shape[axis]
    previous = 1.0
    for lag in range(1, min(max_lag, n - 1) + 1):
        a = np.take(maps, np.arange(n - lag), axis=axis)
        b = np.take(maps, np.arange(lag, n), axis=axis)
        rho = float(np.mean(a * b)) / var
        if rho < 1.0 / math.e:
            return lag - 1 + (previous - 1.0 / math.e) / (previous - rho)
        previous = rho
    return math.inf


def offset_statistics(offset, max_maps: int = 256) -> OffsetStats:
    """Measure ``OffsetStats`` of one layer's offsets ``[N, 2*G*K, Ho, Wo]`` (NumPy or CuPy).

    The floor distributions and quantiles use every value; the correlation lengths
    use at most ``max_maps`` (image, tap) maps, chosen evenly.
    """
    off = np.asarray(backend.to_host(offset), dtype=np.float64)
    if off.ndim != 4 or off.shape[1] % 2:
        raise ValueError(f"offset must be [N, 2*G*K, Ho, Wo], got shape {off.shape}")
    dy, dx = off[:, 0::2], off[:, 1::2]
    finite = np.isfinite(dy) & np.isfinite(dx)
    ay, ax = np.abs(dy[finite]), np.abs(dx[finite])
    qs = (0.5, 0.9, 0.99, 1.0)
    quantiles = tuple((q, float(np.quantile(ay, q)) if ay.size else 0.0,
                       float(np.quantile(ax, q)) if ax.size else 0.0) for q in qs)
    maps_y = dy.reshape(-1, *dy.shape[2:])
    maps_x = dx.reshape(-1, *dx.shape[2:])
    pick = np.unique(np.linspace(0, maps_y.shape[0] - 1, min(max_maps, maps_y.shape[0])).astype(int))
    return OffsetStats(
        floor_y=_floor_pmf(dy), floor_x=_floor_pmf(dx), nonfinite=float(1.0 - finite.mean()),
        quantiles=quantiles,
        mean_y=float(dy[finite].mean()) if ay.size else 0.0,
        mean_x=float(dx[finite].mean()) if ax.size else 0.0,
        rms_y=float(np.sqrt(np.mean(dy[finite] ** 2))) if ay.size else 0.0,
        rms_x=float(np.sqrt(np.mean(dx[finite] ** 2))) if ax.size else 0.0,
        corr_y=_correlation_length(maps_y[pick], axis=-2),
        corr_x=_correlation_length(maps_x[pick], axis=-1),
        samples=int(dy.size),
    )


def normal_statistics(sigma: float = 1.0, mean: tuple = (0.0, 0.0)) -> OffsetStats:
    """``OffsetStats`` of independent ``dy ~ N(mean[0], sigma^2)``, ``dx ~ N(mean[1], sigma^2)``,
    computed exactly (no sampling). The default prior of ``plan_for`` when no offsets are
    given: trained DCN layers typically move taps by about a pixel."""
    ks = np.arange(-CLIP - 1, CLIP + 2, dtype=np.float64)

    def pmf(mu):
        if sigma <= 0:
            p = (ks == np.clip(math.floor(mu), -CLIP - 1, CLIP + 1)).astype(np.float64)
            return tuple(float(v) for v in p)
        cdf = lambda t: 0.5 * (1.0 + np.vectorize(math.erf)((t - mu) / (sigma * math.sqrt(2.0))))
        lo = np.where(ks == -CLIP - 1, -np.inf, ks)
        hi = np.where(ks == CLIP + 1, np.inf, ks + 1)
        return tuple(float(v) for v in cdf(hi) - cdf(lo))

    half = lambda q: sigma * math.sqrt(2.0) * _erfinv(q) if q < 1 else math.inf
    quantiles = tuple((q, half(q), half(q)) for q in (0.5, 0.9, 0.99, 1.0)) if mean == (0.0, 0.0) else ()
    return OffsetStats(floor_y=pmf(mean[0]), floor_x=pmf(mean[1]), quantiles=quantiles,
                       mean_y=float(mean[0]), mean_x=float(mean[1]), rms_y=math.hypot(sigma, mean[0]),
                       rms_x=math.hypot(sigma, mean[1]))


def _erfinv(q: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(100):  # bisection: plenty for a quantile
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erf(mid) < q else (lo, mid)
    return 0.5 * (lo + hi)
