"""The one-launch Tucker layer with a Winograd F(2x2, 3x3) core (``method="fused_winograd"``)
against the float64 reference, on irregular tiny shapes (simulator), bounds-checked, with
poisoned outputs."""

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.tucker import METHODS, ops, tucker_conv2d
from deftnumba.tucker.geometry import check_tucker
from deftnumba.tucker.kernels import fused, fused_winograd, winograd
from deftnumba.tucker.kernels.fused_winograd import FusedWinogradTile as Tile

from .test_forward import check_close, make


@pytest.fixture
def poisoned(poison_allocations):
    """Outputs and intermediates start as NaN: a value no kernel wrote shows up."""
    poison_allocations(ops)


# (N, C, H, W, r_in, r_out, Cout, padding, tile): odd and even outputs, padding 0-2 per axis,
# tiles past the image's edge, several rank chunks, sub-chunks, channel chunks and output
# blocks with partial last ones, RT, LP and staged positions of 3 (16-byte slots), one exchange
# pass or several
CASES = {
    "odd-pad1": ((2, 5, 5, 7, 3, 5, 4, 1), Tile(2, 2, 4, 4, 2, 0, 2, 1, 2, 2)),
    "pad0-odd-out": ((1, 3, 7, 6, 5, 3, 2, 0), Tile(2, 4, 2, 2, 1, 0, 1, 2, 1, 2)),
    "pad2-1-subchunks": ((2, 4, 3, 9, 4, 6, 5, (2, 1)), Tile(4, 2, 4, 3, 2, 2, 2, 2, 2, 1)),
    "rank-chunks-partial": ((1, 7, 6, 5, 9, 4, 7, 1), Tile(2, 6, 4, 3, 2, 2, 2, 3, 1, 3)),
    "slots-of-3": ((2, 3, 6, 6, 6, 7, 3, 1), Tile(2, 6, 6, 2, 3, 3, 3, 3, 2, 3)),
    "position-slots-of-3": ((2, 3, 6, 6, 6, 7, 3, 1), Tile(2, 6, 8, 2, 2, 4, 3, 3, 2, 3)),
    "ranks-of-one": ((1, 2, 5, 4, 1, 1, 3, 1), Tile(2, 2, 1, 1, 1, 0, 1, 1, 1, 1)),
    "two-exchange-passes": ((1, 3, 7, 8, 2, 4, 3, 1), Tile(4, 4, 1, 1, 1, 0, 4, 1, 1, 4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(rng, poisoned, name):
    (n, c, h, w, ri, ro, co, pad), tile = CASES[name]
    args, kw = make(rng, (n, c, h, w, ri, ro, co, 3, 3, 1, pad, 1, 1))
    g = check_tucker(*args, **kw)
    fused_winograd.check(tile, g)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused_winograd", config=tile)
    check_close(out, args, kw, np.float32)


def test_cases_cover_what_they_name():
    """The cases above reach the paths their names promise."""
    from types import SimpleNamespace

    def geometry(name):
        (n, c, h, w, ri, ro, co, pad), _ = CASES[name]
        return SimpleNamespace(rank_in=ri, rank_out=ro, out_channels=co, in_channels=c, kernel_h=3, kernel_w=3,
                               stride_h=1, stride_w=1, dil_h=1, dil_w=1)

    t = CASES["slots-of-3"][1]
    assert (t.tile_slot, t.rank_slot, t.pixel_slot) == (4, 4, 4)
    t, g = CASES["position-slots-of-3"][1], geometry("position-slots-of-3")
    lay = t.layout(g)  # 3 staged positions a first-1x1 thread in 4-float slots, 4 padded positions
    assert (lay.first_pos, lay.pos_slot) == (3, 4) and lay.region_padded > lay.region
    t, g = CASES["rank-chunks-partial"][1], geometry("rank-chunks-partial")
    assert g.rank_in % t.rank_chunk and g.in_channels % t.in_chunk and t.rank_chunk // t.core_ranks == 2
    assert g.out_channels % t.layout(g).out_block
    t, g = CASES["pad2-1-subchunks"][1], geometry("pad2-1-subchunks")
    assert t.rank_chunk // t.core_ranks == 2
    passes = {name: CASES[name][1].reg_oc // CASES[name][1].layout(geometry(name)).exchange_ranks for name in CASES}
    assert max(passes.values()) > 1 and min(passes.values()) == 1


def test_float64_and_auto_with_its_tile(rng, poisoned):
    """float64 without bias to rounding; "auto" with a FusedWinogradTile runs this kernel."""
    args, kw = make(rng, (2, 4, 5, 6, 5, 3, 4, 3, 3, 1, 1, 1, 1), np.float64, bias=False)
    with backend.launch_log() as names:
        out = tucker_conv2d(*args, **kw, config=fused_winograd.SIMULATOR_TILE)
    assert any("fused_winograd_kernel" in n for n in names)
    check_close(out, args, kw, np.float64)


def test_deterministic_and_in_methods(rng):
    assert "fused_winograd" in METHODS
    args, kw = make(rng, (1, 3, 6, 5, 4, 5, 3, 3, 3, 1, 1, 1, 1))
    a = tucker_conv2d(*args, **kw, method="fused_winograd")
    b = tucker_conv2d(*args, **kw, method="fused_winograd")
    assert np.array_equal(a, b)


def test_pack_core_is_the_transformed_core_in_its_slots(rng):
    """``pack_core``: [core chunk][pos][ck][rank thread][slot] of U = G g G^T, zero padding."""
    q, r = 5, 3
    core = rng.standard_normal((q, r, 3, 3))
    t = Tile(2, 2, 4, 2, 2, 2, 3, 1, 1, 1)  # ranks padded to 4 (2 core chunks), Q to 6 in slots of 4
    packed = fused_winograd.pack_core(core, t).reshape(2, 16, 2, 2, 4)
    G = winograd.FILTER_TRANSFORM
    for o in range(q):
        for c in range(r):
            u = (G @ core[o, c] @ G.T).reshape(-1)
            np.testing.assert_allclose(packed[c // 2, :, c % 2, o // 3, o % 3], u, rtol=1e-14, atol=1e-14)
    assert not packed[1, :, 1].any() and not packed[..., 3].any() and not packed[:, :, :, 1, 2].any()


def test_tile_and_layer_errors(rng):
    with pytest.raises(ValueError, match="must be even"):
        Tile(3, 2)
    with pytest.raises(ValueError, match=r"reg_tile \(3\) must divide the tile's 2 Winograd tiles"):
        Tile(2, 4, reg_tile=3)
    with pytest.raises(ValueError, match=r"out_px \(3\) must divide tile_w \(4\)"):
        Tile(2, 4, out_px=3)
    with pytest.raises(ValueError, match=r"core_chunk \(3\) must divide rank_chunk \(4\)"):
        Tile(core_chunk=3)
    args, kw = make(rng, (1, 3, 6, 6, 3, 2, 2, 3, 3, 2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"method='fused_winograd' takes a 3x3 core with stride 1"):
        tucker_conv2d(*args, **kw, method="fused_winograd")
    args, kw = make(rng, (1, 3, 5, 5, 3, 2, 2, 3, 3, 1, 1, 1, 1))
    with pytest.raises(TypeError, match="FusedWinogradTile"):
        tucker_conv2d(*args, **kw, method="fused_winograd", config=fused.SIMULATOR_TILE)
    g = check_tucker(*args, **kw)
    with pytest.raises(ValueError, match=r"pixel threads .* must divide the block's 16 threads"):
        fused_winograd.check(Tile(2, 6, 4, 2, 2, 0, 2, 3, 1, 1), g)
    with pytest.raises(ValueError, match="at most 1024"):
        fused_winograd.check(Tile(10, 16, 4, 2, 2, 0, 1, 1, 1, 16), g)  # 1280 threads
    big = check_tucker(*make(rng, (1, 3, 5, 5, 3, 512, 2, 3, 3, 1, 1, 1, 1))[0], padding=1)
    with pytest.raises(ValueError, match="bytes of shared memory"):
        fused_winograd.check(Tile(2, 2, 4, 2, 2, 0, 16, 1, 1, 2), big)


def _audited_fused_winograd():
    from deftnumba.tucker import model

    return [(key, picks["fused_winograd"]) for key, picks in model.AUDITED_PICKS.items() if "fused_winograd" in picks]


@pytest.mark.parametrize("key, tile", [pytest.param(k, t, id=f"n{k[0]}-r{k[2]}-{k[3]}") for k, t in _audited_fused_winograd()])
def test_the_audited_picks_run_right(rng, poisoned, key, tile):
    """The tiles the GPU runs (``model.AUDITED_PICKS``: 128-256 threads, rank chunks of 32-64,
    slots of 3 and 7), with the layer's own core ranks (they set the block) and its rank chunk,
    on one small image of four tiles, two of them partial; one rank chunk short by 3 (its work is
    the whole chunk's: more chunks only repeat it, and the small cases above take several);
    three channels (a partial chunk) and a partial block of outputs."""
    r_out = key[3]
    g = check_tucker(*make(rng, (1, 3, 4, 4, 2, r_out, 2, 3, 3, 1, 1, 1, 1))[0])
    lay = tile.layout(g)
    case = (1, 3, tile.tile_h + 1, tile.tile_w + 2, tile.rank_chunk - 3, r_out, lay.out_block + 3, 3, 3, 1, 1, 1, 1)
    args, kw = make(rng, case)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused_winograd", config=tile)
    check_close(out, args, kw, np.float32)
