"""``runtime.atomics``: the simulator's fallbacks of the fire-and-forget additions and of
``keep_if`` (their PTX/SASS is checked by the DCN backward's SASS tests and the audit)."""

import numpy as np

from deftnumba.runtime import addresses, atomics, backend
from deftnumba.runtime.backend import cuda  # a module global: the simulator swaps it inside kernels


def test_red_add_adds(rng):
    """``atomics.red_add`` (the simulator's fallback; its PTX/SASS is checked in
    test_backward_sass.py) sums every contribution."""
    @cuda.jit
    def scatter(values, target):
        i = cuda.grid(1)
        if i < values.shape[0]:
            atomics.red_add(target, np.uint32(i % 3), values[i])

    values = rng.standard_normal(40)
    target = np.zeros(3)
    backend.launch(scatter, 2, 32, values, target)
    np.testing.assert_allclose(target, [values[k::3].sum() for k in range(3)], rtol=1e-12)


def test_red_add_at_and_keep_if(rng):
    """``red_add_at`` at an ``element_address`` (or an ``offset_address`` further on) plus a
    per-call offset adds where ``red_add`` at the summed index would; ``keep_if`` keeps a value
    under an all-ones mask and gives an exact +0 under a zero mask, infinities and NaN
    included (the simulator's fallbacks; the kernels' SASS is read by the audit)."""
    @cuda.jit
    def scatter(values, keep, target, kept):
        i = cuda.grid(1)
        if i < values.shape[0]:
            corner = addresses.offset_address(target, addresses.element_address(target, np.uint64(1)), np.uint32(i % 2))
            mask = np.uint64(0xFFFFFFFFFFFFFFFF) if keep[i] else np.uint64(0)
            value = atomics.keep_if(values[i], mask)
            kept[i] = value
            atomics.red_add_at(target, corner, np.uint32(3 * (i % 3)), value)

    values = rng.standard_normal(40)
    values[[5, 6, 7]] = np.inf, -np.inf, np.nan
    keep = rng.uniform(size=40) < 0.7
    keep[[5, 6, 7]] = False
    target = np.zeros(12)
    kept = np.full(40, np.nan)
    backend.launch(scatter, 2, 32, values, keep, target, kept)
    np.testing.assert_array_equal(kept, np.where(keep, values, 0.0))
    assert not np.signbit(kept[~keep]).any()  # +0, never -0
    expected = np.zeros(12)
    for i in range(40):
        expected[1 + i % 2 + 3 * (i % 3)] += kept[i]
    np.testing.assert_allclose(target, expected, rtol=1e-12)
