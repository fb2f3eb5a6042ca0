"""Tucker-2 decomposition: shapes, exactness at full rank, error monotone in rank."""

import numpy as np
import pytest

from deftnumba.tucker import decompose, reconstruct


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (4, 7, 1, 2), (3, 2, 5, 1)])
def test_exact_at_full_rank(rng, method, shape):
    w = rng.standard_normal(shape)
    f = decompose(w, (shape[0], shape[1]), method)
    assert f.first.shape == (shape[1], shape[1], 1, 1)
    assert f.core.shape == (shape[0], shape[1], shape[2], shape[3])
    assert f.last.shape == (shape[0], shape[0], 1, 1)
    assert f.rel_error < 1e-12
    np.testing.assert_allclose(reconstruct(f.first, f.core, f.last), w, atol=1e-12 * np.abs(w).max())


def test_shapes_dtype_and_error(rng):
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    f = decompose(w, (3, 2))
    assert f.first.shape == (2, 6, 1, 1) and f.core.shape == (3, 2, 3, 3) and f.last.shape == (8, 3, 1, 1)
    assert f.first.dtype == f.core.dtype == f.last.dtype == np.float32
    assert f.ranks == (3, 2)
    approx = reconstruct(f.first, f.core, f.last)
    error = np.linalg.norm(approx - w) / np.linalg.norm(w)
    assert error == pytest.approx(f.rel_error, rel=1e-4)
    assert 0 < f.rel_error < 1


def test_error_shrinks_with_rank_and_hooi_not_worse(rng):
    w = rng.standard_normal((8, 8, 3, 3))
    errors = [decompose(w, (r, r)).rel_error for r in (1, 3, 5, 8)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12
    assert decompose(w, (3, 2), "hooi").rel_error <= decompose(w, (3, 2), "hosvd").rel_error + 1e-9


def test_low_rank_weight_recovered(rng):
    """A weight that *is* of multilinear rank (2, 3) is recovered exactly at those ranks."""
    core = rng.standard_normal((2, 3, 3, 3))
    u_out = rng.standard_normal((6, 2))
    u_in = rng.standard_normal((5, 3))
    w = np.einsum("oa,abhw,cb->ochw", u_out, core, u_in)
    assert decompose(w, (2, 3)).rel_error < 1e-10


@pytest.mark.parametrize("ranks, match", [((0, 2), "ranks"), ((3, 9), "ranks"), ((1,), "ranks")])
def test_bad_ranks(rng, ranks, match):
    w = rng.standard_normal((4, 5, 3, 3))
    with pytest.raises((ValueError, TypeError), match=match):
        decompose(w, ranks)


def test_bad_method_and_shape(rng):
    with pytest.raises(ValueError, match="method"):
        decompose(rng.standard_normal((4, 5, 3, 3)), (2, 2), "cp")
    with pytest.raises(ValueError, match="4-D"):
        decompose(rng.standard_normal((4, 5, 3)), (2, 2))
