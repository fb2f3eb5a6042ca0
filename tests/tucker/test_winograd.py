"""The Winograd F(2x2, 3x3) core conv (``method="winograd"``) against the float64 reference,
on irregular tiny shapes (simulator), and its transforms against their definitions."""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.tucker import ops, tucker_conv2d
from deftnumba.tucker.geometry import check_tucker
from deftnumba.tucker.kernels import core_conv, winograd
from deftnumba.tucker.reference import conv2d

from .test_forward import check_close, make


@pytest.fixture
def poisoned(poison_allocations):
    """Outputs and intermediates start as NaN: a value no kernel wrote shows up."""
    poison_allocations(ops)


def test_filter_transform_and_the_algebra_of_one_tile(rng):
    """``pack_core``'s U is G g G^T of each rank pair, and A^T (U * B^T d B) A of a 4x4 patch
    is the 2x2 correlation of the patch with g (float64, to rounding)."""
    q, r = 3, 5
    core = rng.standard_normal((q, r, 3, 3))
    tile = winograd.WinogradTile(tiles=2, oc_block=4, chunk=2, reg_oc=2, reg_tile=1)
    assert tile.rank_slot == 4  # each thread's 2 ranks padded to a 16-byte slot
    # [rank block][chunk][pos][cc][thread's ranks][slot]
    packed = winograd.pack_core(core, tile).reshape(1, 3, 16, 2, 2, 4)
    G = winograd.FILTER_TRANSFORM
    for o in range(q):
        for c in range(r):
            u = G @ core[o, c] @ G.T
            np.testing.assert_allclose(packed[0, c // 2, :, c % 2, o // 2, o % 2], u.reshape(-1),
                                       rtol=1e-14, atol=1e-14)
    # padding ranks, channels and slots are zero
    assert not packed[0, 2, :, 1].any() and not packed[0, :, :, :, 1, 1].any() and not packed[..., 2:].any()
    bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=float)
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=float)
    d = rng.standard_normal((4, 4))
    g = core[1, 2]
    y = at @ ((G @ g @ G.T) * (bt @ d @ bt.T)) @ at.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


# (N, C, H, W, r_in, r_out, Cout, padding, tile): odd and even outputs, padding 0-2 per axis,
# partial rank chunks and blocks, a last tile block past the batch, tiles across images,
# rank splits (even and uneven)
CASES = {
    "odd-pad1": ((2, 5, 5, 7, 3, 5, 4, 1), winograd.WinogradTile(4, 4, 2, 2, 2)),
    "pad0-odd-out": ((1, 3, 7, 6, 5, 3, 2, 0), winograd.WinogradTile(4, 4, 2, 2, 2)),
    "pad2-1-wide": ((3, 4, 3, 9, 4, 6, 5, (2, 1)), winograd.WinogradTile(8, 4, 4, 4, 2)),
    "splits2": ((2, 3, 6, 5, 7, 4, 3, 1), winograd.WinogradTile(4, 4, 2, 2, 2, splits=2)),
    "splits3-uneven": ((1, 4, 5, 4, 9, 5, 6, (1, 0)), winograd.WinogradTile(4, 8, 2, 4, 2, splits=3)),
    "tall-ranks": ((2, 2, 4, 3, 2, 9, 3, 1), winograd.WinogradTile(2, 8, 1, 2, 1)),
    # the core slice copied 4 and 2 vectors a pass, each with a partial last pass
    "copy-by-4-partial": ((1, 3, 5, 5, 9, 5, 2, 1), winograd.WinogradTile(2, 4, 7, 2, 2)),
    "copy-by-2-partial": ((2, 3, 4, 6, 5, 3, 2, 1), winograd.WinogradTile(4, 4, 3, 2, 4)),
}


def test_core_copy_cases_take_the_paths_they_name():
    """The two copy cases above: 4 and 2 vectors a pass, a partial last pass (float32)."""
    for name, reps, unroll in (("copy-by-4-partial", 4, 4), ("copy-by-2-partial", 2, 2)):
        t = CASES[name][1]
        vec = t.threads * 4
        slice_ = 16 * t.chunk * t.oc_block
        assert (-(-slice_ // vec), slice_ % vec != 0) == (reps, True), name
        assert winograd.copy_unroll(-(-slice_ // vec)) == unroll


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(rng, poisoned, name):
    (n, c, h, w, ri, ro, co, pad), tile = CASES[name]
    args, kw = make(rng, (n, c, h, w, ri, ro, co, 3, 3, 1, pad, 1, 1))
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="winograd", config=tile)
    check_close(out, args, kw, np.float32)


def test_core_alone_float64_matches_conv2d(rng):
    """The kernel alone, float64, on a poisoned output: the direct correlation to rounding."""
    x = rng.standard_normal((3, 5, 6, 5))
    core = rng.standard_normal((7, 5, 3, 3))
    tile = winograd.WinogradTile(8, 4, 2, 2, 4, splits=2)
    g = check_tucker(x, np.eye(5).reshape(5, 5, 1, 1), core, np.eye(7).reshape(7, 7, 1, 1), None, 1, 1, 1, 1)
    out = np.full((3, 7, 6, 5), np.nan)
    with backend.bounds_checked():
        winograd.launch(g, tile, x.reshape(-1), winograd.pack_core(core, tile), out.reshape(-1))
    np.testing.assert_allclose(out, conv2d(x, core, None, (1, 1), (1, 1), (1, 1)), rtol=1e-12, atol=1e-12)


def test_rank_splits_keep_their_bits_whatever_order_blocks_run(rng, poisoned):
    """Splits store their sums; the last block to finish adds them in split order: under
    shuffled block orders the output keeps its bits (large and small ranks make order show)."""
    args, kw = make(rng, (2, 4, 5, 6, 8, 5, 3, 3, 3, 1, 1, 1, 1))
    x, first, core, last, b = args
    first[:4] *= 1e4
    tile = winograd.WinogradTile(4, 4, 2, 2, 2, splits=3)
    runs = []
    for seed in range(3):
        with backend.order_varying(seed):
            runs.append(tucker_conv2d(x, first, core, last, b, **kw, method="winograd", config=tile))
    check_close(runs[0], (x, first, core, last, b), kw, np.float32)
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


def test_tile_and_layer_errors(rng):
    with pytest.raises(ValueError, match=r"oc_block \(6\) must be a multiple of reg_oc \(4\)"):
        winograd.WinogradTile(tiles=4, oc_block=6, chunk=2, reg_oc=4, reg_tile=2)
    with pytest.raises(ValueError, match=r"threads \(16\) must be a multiple of tiles \(32\)"):
        winograd.WinogradTile(tiles=32, oc_block=1, chunk=1, reg_oc=1, reg_tile=32)
    with pytest.raises(ValueError, match="at most 1024"):
        winograd.WinogradTile(tiles=64, oc_block=64, chunk=1, reg_oc=1, reg_tile=1)
    args, kw = make(rng, (1, 3, 5, 5, 3, 2, 2, 3, 3, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"splits \(3\) must be at most the chunks"):
        tucker_conv2d(*args, **kw, method="winograd", config=winograd.WinogradTile(4, 4, 2, 2, 2, splits=3))
    with pytest.raises(TypeError, match="WinogradTile"):
        tucker_conv2d(*args, **kw, method="winograd", config=core_conv.SIMULATOR_TILE)
    args, kw = make(rng, (1, 3, 6, 6, 3, 2, 2, 3, 3, 2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"stride \(2, 2\)"):
        tucker_conv2d(*args, **kw, method="winograd")
    # "auto" with a WinogradTile runs the Winograd core
    args, kw = make(rng, (1, 3, 5, 5, 3, 2, 2, 3, 3, 1, 1, 1, 1))
    with backend.launch_log() as names:
        out = tucker_conv2d(*args, **kw, config=winograd.SIMULATOR_TILE)
    assert any("winograd_kernel" in n for n in names)
    check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("tile", [winograd.WinogradTile(16, 32, 8, 8, 8, splits=2),
                                  winograd.WinogradTile(16, 40, 8, 10, 8, splits=3)],
                         ids=lambda t: f"t{t.tiles}-ob{t.oc_block}-s{t.splits}")
def test_the_audited_layer3_4_picks_run_right(rng, poisoned, tile):
    """Session 37's audited picks at layers 3-4 (``model.AUDITED_PICKS``: 128 threads, 2 and 3
    rank splits), on ranks that leave the last chunk, split and rank block partial, and a 7x6
    image whose 2x2 tiles end past its edge."""
    from deftnumba.tucker import model

    assert tile in {p["winograd"] for p in model.AUDITED_PICKS.values() if "winograd" in p}
    assert tile.threads == 128
    r_in = tile.chunk * (2 * tile.splits) - 3  # two chunks a split, the last one short by 3
    r_out = tile.oc_block + 6                  # a second, partial rank block
    args, kw = make(rng, (1, 5, 7, 6, r_in, r_out, 4, 3, 3, 1, 1, 1, 1))
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="winograd", config=tile)
    check_close(out, args, kw, np.float32)
