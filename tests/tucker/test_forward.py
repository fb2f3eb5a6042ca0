"""tucker_conv2d against the float64 reference, on irregular tiny shapes (simulator)."""

from types import SimpleNamespace

import numpy as np
import pytest

from deftnumba.runtime import backend
from deftnumba.tucker import METHODS, model, ops, reconstruct, tucker_conv2d
from deftnumba.tucker.kernels import core_conv, fused, winograd
from deftnumba.tucker.reference import conv2d, tucker_conv2d_reference

# (N, C, H, W, r_in, r_out, Cout, kh, kw, stride, padding, dilation, groups)
CASES = {
    "3x3-pad1": (2, 5, 6, 7, 3, 4, 6, 3, 3, 1, 1, 1, 1),
    "stride2-dil-nonsquare": (1, 3, 7, 5, 2, 3, 4, 2, 3, 2, 1, (2, 1), 1),
    "rank1-1x1": (1, 4, 3, 5, 1, 1, 3, 1, 1, 1, 0, 1, 1),
    "full-rank-pad2": (1, 3, 4, 4, 3, 5, 5, 3, 2, (1, 2), 2, 1, 1),
    "groups2": (1, 3, 5, 4, 4, 2, 3, 3, 3, 1, 1, 1, 2),
    "stride3-pad0": (2, 2, 8, 7, 2, 2, 2, 3, 1, (3, 2), (0, 1), 1, 1),
}


def make(rng, case, dtype=np.float32, bias=True):
    n, c, h, w, ri, ro, co, kh, kw, s, p, d, g = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    first = rng.standard_normal((ri, c, 1, 1)).astype(dtype)
    core = rng.standard_normal((ro, ri // g, kh, kw)).astype(dtype)
    last = rng.standard_normal((co, ro, 1, 1)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype) if bias else None
    return (x, first, core, last, b), dict(stride=s, padding=p, dilation=d, groups=g)


def check_close(out, args, kw, dtype):
    """Error bounded by the magnitudes summed along each output's reduction (float32
    rounding is relative to them, not to the possibly cancelling result)."""
    x, first, core, last, b = args
    ref = tucker_conv2d_reference(*args, **kw)
    mags = tucker_conv2d_reference(np.abs(x), np.abs(first), np.abs(core), np.abs(last),
                                   None if b is None else np.abs(b), **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert np.all(np.isfinite(out))
    eps = np.finfo(dtype).eps
    reduction = x.shape[1] + first.shape[0] * core.shape[2] * core.shape[3] + last.shape[1]
    assert np.all(np.abs(out - ref) <= 4 * eps * reduction * mags + 1e-300), np.abs(out - ref).max()


@pytest.fixture
def poisoned(poison_allocations):
    """Outputs and intermediates start as NaN: a value no kernel wrote shows up."""
    poison_allocations(ops)


WINOGRAD_CASES = ("3x3-pad1", "groups2")  # 3x3 cores, stride 1, dilation 1: what F(2x2, 3x3) takes
WINOGRAD_METHODS = ("winograd", "fused_winograd")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(rng, poisoned, method, name):
    args, kw = make(rng, CASES[name])
    if method in WINOGRAD_METHODS and name not in WINOGRAD_CASES:
        with pytest.raises(ValueError, match=rf"method='{method}' takes a 3x3 core with stride 1 and dilation 1"):
            tucker_conv2d(*args, **kw, method=method)
        return
    out = tucker_conv2d(*args, **kw, method=method)
    check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_float64_no_bias(rng, poisoned, method):
    name = "3x3-pad1" if method in WINOGRAD_METHODS else "stride2-dil-nonsquare"
    args, kw = make(rng, CASES[name], np.float64, bias=False)
    out = tucker_conv2d(*args, **kw, method=method)
    check_close(out, args, kw, np.float64)


def test_reference_is_conv_with_reconstructed_weight(rng):
    args, kw = make(rng, CASES["groups2"], np.float64)
    x, first, core, last, b = args
    dense = conv2d(x, reconstruct(first, core, last, kw["groups"]), b, kw["stride"], kw["padding"], kw["dilation"])
    np.testing.assert_allclose(tucker_conv2d_reference(*args, **kw), dense, rtol=1e-10, atol=1e-10)


def test_core_conv_tiles_that_divide_the_width_skip_the_width_tests(rng, poisoned):
    """Where the tile width divides the output width (``core_conv.whole_rows``) the kernel is
    compiled without its per-pixel width tests; with and without rank splits, bounds-checked.
    (Where it does not divide, the irregular cases above run the tested kernel.)"""
    from types import SimpleNamespace

    args, kw = make(rng, (2, 5, 5, 8, 6, 5, 4, 3, 3, 1, 1, 1, 1))
    for tile in (core_conv.CoreTile(tile_h=2, tile_w=4, chunk=2, oc_block=4, reg_oc=2, reg_px=2),
                 core_conv.CoreTile(tile_h=3, tile_w=8, chunk=2, oc_block=2, reg_oc=1, reg_px=4, splits=3)):
        assert core_conv.whole_rows(SimpleNamespace(out_w=8), tile)
        with backend.bounds_checked():
            out = tucker_conv2d(*args, **kw, method="three_pass", config=tile)
        check_close(out, args, kw, np.float32)


def test_several_chunks_and_blocks(rng, poisoned):
    """Explicit tiles with several rank chunks, channel chunks, rank blocks and output
    blocks (and a partial last one of each) still match."""
    args, kw = make(rng, (1, 7, 5, 6, 5, 3, 7, 3, 3, 1, 1, 1, 1))
    tile = fused.FusedTile(tile_h=2, tile_w=2, rank_chunk=2, in_chunk=3, reg_oc=2, reg_px=2, out_reg=1, first_reg=2)
    check_close(tucker_conv2d(*args, **kw, method="fused", config=tile), args, kw, np.float32)
    tile = core_conv.CoreTile(tile_h=3, tile_w=2, chunk=2, oc_block=2, reg_oc=1, reg_px=2)
    check_close(tucker_conv2d(*args, **kw, method="three_pass", config=tile), args, kw, np.float32)


def test_packed_slices_copied_by_vector_and_by_element(rng, poisoned):
    """The core conv copies its packed core slice (``CC*K*OCB`` floats) in 16-byte vectors where
    the slice is a whole number of them and element by element otherwise: both paths, bounds-checked."""
    from deftnumba.runtime.vector import slice_vector_width

    args, kw = make(rng, (1, 7, 5, 6, 5, 3, 7, 3, 3, 1, 1, 1, 1))
    by_vector = core_conv.CoreTile(tile_h=3, tile_w=2, chunk=2, oc_block=2, reg_oc=1, reg_px=2)  # 36 floats
    by_element = core_conv.CoreTile(tile_h=3, tile_w=2, chunk=1, oc_block=3, reg_oc=3, reg_px=2)  # 27 floats
    assert slice_vector_width(2 * 9 * 2, np.float32) == 4 and slice_vector_width(1 * 9 * 3, np.float32) == 1
    for tile in (by_vector, by_element):
        with backend.bounds_checked():
            out = tucker_conv2d(*args, **kw, method="three_pass", config=tile)
        check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(rng, method):
    args, kw = make(rng, CASES["3x3-pad1"])
    a = tucker_conv2d(*args, **kw, method=method)
    b = tucker_conv2d(*args, **kw, method=method)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_bounds_checked(rng, method):
    """Every index inside the kernels stays in bounds; no shared/local value is read unwritten."""
    args, kw = make(rng, CASES["groups2" if method in WINOGRAD_METHODS else "stride2-dil-nonsquare"])
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method=method)
    check_close(out, args, kw, np.float32)


def test_auto_and_inputs_untouched(rng):
    args, kw = make(rng, CASES["rank1-1x1"])
    copies = [a.copy() for a in args]
    out = tucker_conv2d(*args, **kw)
    check_close(out, args, kw, np.float32)
    for a, c in zip(args, copies):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(first=a["first"][:, :-1]), r"first must have shape \[r_in, C, 1, 1\]"),
    (lambda a: a.update(core=a["core"][:, :-1]), r"core must have shape \[r_out, r_in/groups, kh, kw\]"),
    (lambda a: a.update(last=a["last"][:, :-1]), r"last must have shape \[Cout, r_out, 1, 1\]"),
    (lambda a: a.update(bias=a["bias"][:-1]), r"bias must have shape \[Cout\]"),
    (lambda a: a.update(input=a["input"][0]), r"input must be 4-D"),
    (lambda a: a.update(core=a["core"].astype(np.float64)), r"one dtype"),
    (lambda a: a.update(input=a["input"].astype(np.int32)), r"float32 or float64"),
    (lambda a: a.update(stride=0), r"stride must be >= 1"),
    (lambda a: a.update(padding=-1), r"padding must be >= 0"),
    (lambda a: a.update(dilation=(1, 0)), r"dilation must be >= 1"),
    (lambda a: a.update(groups=2), r"groups \(2\) must divide"),
    (lambda a: a.update(padding=0, input=a["input"][:, :, :1, :1]), r"output would be empty"),
    (lambda a: a.update(method="cudnn"), r"method must be"),
])
def test_argument_errors(rng, change, match):
    (x, first, core, last, b), kw = make(rng, (1, 3, 4, 4, 3, 2, 2, 3, 3, 1, 1, 1, 1))
    a = dict(input=x, first=first, core=core, last=last, bias=b, **kw, method="auto")
    change(a)
    with pytest.raises((ValueError, TypeError), match=match):
        tucker_conv2d(**a)


def test_core_sub_chunks(rng, poisoned):
    """A rank chunk wider than the staged core slice (core_chunk < rank_chunk), with a
    partial last rank chunk."""
    args, kw = make(rng, (1, 5, 4, 5, 7, 3, 4, 3, 2, 1, (1, 0), 1, 1))
    tile = fused.FusedTile(tile_h=2, tile_w=2, rank_chunk=4, in_chunk=2, reg_oc=2, reg_px=2, out_reg=2,
                           first_reg=2, core_chunk=2)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)
    with pytest.raises(ValueError, match="core_chunk"):
        fused.FusedTile(rank_chunk=4, core_chunk=3)


def test_config_type_is_checked(rng):
    args, kw = make(rng, CASES["rank1-1x1"])
    with pytest.raises(TypeError, match="CoreTile"):
        tucker_conv2d(*args, **kw, method="three_pass", config=fused.SIMULATOR_TILE)
    with pytest.raises(TypeError, match="FusedTile"):
        tucker_conv2d(*args, **kw, method="fused", config=core_conv.SIMULATOR_TILE)
    # "auto" with a config runs that config's method
    out = tucker_conv2d(*args, **kw, config=core_conv.SIMULATOR_TILE)
    check_close(out, args, kw, np.float32)


def test_model_best_names_a_method_and_tile():
    from deftnumba.tucker import model
    from deftnumba.tucker.geometry import TuckerGeometry

    method, tile = model.best(TuckerGeometry(32, 128, 28, 28, 128, 64, 64, 3, 3, 1, 1, 1, 1))
    assert method in METHODS
    kind = {"fused": fused.FusedTile, "three_pass": core_conv.CoreTile, "winograd": winograd.WinogradTile}
    assert isinstance(tile, kind[method])


def test_image_dividing_tiles_with_seven_pixel_rows(rng, poisoned):
    """The audit's picks for 7-, 14- and 28-wide layers: tiles that divide the image, 7
    contiguous pixels per thread (unaligned rows), a 28-thread core-conv block (one warp, 4
    lanes idle); scaled down, with partial rank blocks and chunks."""
    args, kw = make(rng, (2, 5, 7, 14, 9, 6, 5, 3, 3, 1, 1, 1, 1))
    tile = core_conv.CoreTile(tile_h=7, tile_w=7, chunk=4, oc_block=8, reg_oc=2, reg_px=7)
    assert tile.threads == 28
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="three_pass", config=tile)
    check_close(out, args, kw, np.float32)
    tile = fused.FusedTile(tile_h=2, tile_w=14, rank_chunk=4, in_chunk=2, reg_oc=4, reg_px=7, out_reg=2,
                           first_reg=4, core_chunk=2)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("case, tile_w, reg_px, slots", [
    ((2, 5, 5, 11, 5, 6, 4, 3, 3, 1, 1, 1, 1), 8, 8, False),      # rows of 10 padded to 12
    ((1, 4, 6, 9, 3, 5, 3, 3, 3, 1, 1, 1, 1), 4, 4, False),       # 6 -> 8, a partial last tile
    ((1, 3, 9, 13, 4, 3, 5, 3, 2, (2, 2), 1, (1, 2), 1), 4, 2, False),  # stride 2: 2 * 2 = 4; 9 -> 12
    ((2, 4, 5, 16, 5, 6, 3, 3, 3, 1, 1, 1, 1), 14, 7, True),      # 2 segments of 9 in 12-float slots
    ((1, 3, 7, 11, 4, 5, 3, 3, 3, 1, 1, 1, 1), 6, 3, True),       # SEG 5 in 8; a partial last tile
    ((1, 3, 6, 9, 3, 4, 4, 3, 3, (1, 2), 1, (1, 2), 1), 6, 3, True),  # stride 2, dil 2: SEG 9 in 12, STEP 6
])
def test_hidden_rows_padded_for_aligned_row_segments(rng, poisoned, case, tile_w, reg_px, slots):
    """The fused kernel lays ``staged_hidden``'s rows out so that each thread's row segment
    starts 16-byte aligned (``fused.hidden_rows``): rows padded to a multiple of 4 floats where
    ``RP * SW`` is one, otherwise each segment in its own slot, the columns neighbouring
    segments share stored in each. The first 1x1 keeps the dense region and ``store_hidden``
    maps each position to its place(s); the core's outputs go to ``staged_core_out`` in
    16-byte slots per thread where ``RP > 2``. Bounds-checked, with partial tiles and rank
    chunks, against the reference (a position stored at its dense index, a shared column stored
    in one slot only, a segment read from the dense row, or core outputs stored densely and read
    from slots, fails)."""
    from types import SimpleNamespace

    args, kw = make(rng, case)
    tile = fused.FusedTile(tile_h=2, tile_w=tile_w, rank_chunk=4, in_chunk=2, reg_oc=2, reg_px=reg_px, out_reg=2,
                           first_reg=2, core_chunk=2, row_slots=slots)
    n, c, h, w, ri, ro, co, kh, kwid, s, p, d, gr = case
    sw = s[1] if isinstance(s, tuple) else s
    dw = d[1] if isinstance(d, tuple) else d
    g = SimpleNamespace(rank_out=ro, stride_h=s[0] if isinstance(s, tuple) else s, stride_w=sw, kernel_h=kh,
                        kernel_w=kwid, dil_h=d[0] if isinstance(d, tuple) else d, dil_w=dw, taps=kh * kwid)
    lay = tile.layout(g)
    assert lay.pitch % 4 == 0 and lay.segment % 4 == 0 and lay.pitch > lay.cols
    assert (lay.segment != reg_px * sw) == slots
    # the last 1x1's pixels: each thread's in a 16-byte slot where RP > 2 (fused.core_out_pitch)
    assert lay.core_out_pixels == (-(-reg_px // 4) * 4 if reg_px > 2 else reg_px)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)


def test_input_staged_by_channel_lanes(rng, poisoned):
    """A block with at least twice as many threads as staged positions splits each channel
    chunk over lanes (``fused.input_staging``: layer4's 2x8 tile stages 40 positions with 320
    threads); here 3 lanes over chunks of 4 channels (a lane with one channel fewer), a
    partial last channel chunk and rank chunk, bounds-checked."""
    from types import SimpleNamespace

    args, kw = make(rng, (2, 9, 4, 5, 7, 18, 6, 3, 3, 1, 1, 1, 1))
    tile = fused.FusedTile(tile_h=1, tile_w=2, rank_chunk=6, in_chunk=4, reg_oc=1, reg_px=1, out_reg=1,
                           first_reg=2)
    g = SimpleNamespace(rank_out=18, stride_h=1, stride_w=1, kernel_h=3, kernel_w=3, dil_h=1, dil_w=1, taps=9)
    lay = tile.layout(g)
    assert (lay.threads, lay.region_padded) == (36, 12)
    assert fused.input_staging(lay, tile.in_chunk) == (3, 2, 1)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("rank_chunk", [4, 3])
def test_multiply_takes_ranks_in_pairs_or_one_by_one(rng, poisoned, rank_chunk):
    """The fused kernel's multiply loop takes two staged ranks per trip where they pair up (an
    even core chunk) and one otherwise; both, with a partial last rank chunk, bounds-checked."""
    args, kw = make(rng, (1, 5, 5, 6, 7, 5, 4, 3, 3, 1, 1, 1, 1))
    tile = fused.FusedTile(tile_h=2, tile_w=2, rank_chunk=rank_chunk, in_chunk=2, reg_oc=2, reg_px=2, out_reg=2,
                           first_reg=1)
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)


def test_rank_splits_add_their_sums_in_split_order_whatever_order_blocks_run(rng, poisoned):
    """``CoreTile.splits``: S blocks share an output tile, each sums a slice of the input-rank
    chunks and stores it in ``partials``; the last to finish adds the S sums in split order.
    Uneven splits (5 chunks over 2, 3 and 5 splits, a partial last chunk), bounds-checked,
    match the reference; under shuffled block orders (another block finishes last) the output
    keeps its bits. Adding the sums in the order the blocks finished would change bits here:
    the large and small input ranks make the order show."""
    args, kw = make(rng, (2, 4, 5, 6, 9, 5, 3, 3, 3, 1, 1, 1, 1))
    x, first, core, last, b = args
    first[:4] *= 1e4  # hidden ranks 0-3 (the first chunks) large, the rest small
    args = (x, first, core, last, b)
    for splits in (2, 3, 5):
        tile = core_conv.CoreTile(tile_h=2, tile_w=3, chunk=2, oc_block=4, reg_oc=2, reg_px=3, splits=splits)
        runs = []
        for seed in range(3):
            with backend.bounds_checked(), backend.order_varying(seed):
                runs.append(tucker_conv2d(*args, **kw, method="three_pass", config=tile))
        check_close(runs[0], args, kw, np.float32)
        for other in runs[1:]:
            np.testing.assert_array_equal(runs[0], other)
    g = ops.check_tucker(*args, **kw)
    with pytest.raises(ValueError, match="splits"):
        core_conv.launch(g, core_conv.CoreTile(2, 3, 2, 4, 2, 3, splits=6), None, None, None)


@pytest.mark.parametrize("case, reg_oc, tile_w, reg_px", [
    ((2, 5, 6, 7, 5, 7, 4, 3, 3, 1, 1, 1, 1), 6, 4, 2),        # 7 ranks: 2 threads of 6 in 8-float slots
    ((1, 4, 5, 9, 6, 5, 3, 3, 2, 1, (1, 0), 1, 1), 3, 3, 3),   # 3 in 4; non-square core, 2 rank chunks
    ((1, 3, 7, 6, 4, 11, 5, 3, 3, (2, 1), 1, (1, 2), 1), 5, 2, 2),  # 5 in 8; 3 threads, the last partial
])
def test_core_weights_in_aligned_slots(rng, poisoned, case, reg_oc, tile_w, reg_px):
    """Where ``RO > 2`` is not a multiple of 4, each thread's core weights of a tap sit in a
    zero-padded 16-byte slot of ``staged_core`` (``fused.weight_pitch``), packed so by
    ``pack_core``. Bounds-checked against the reference, with ranks that leave the last thread
    partial (packing the weights densely while reading them from slots fails)."""
    from types import SimpleNamespace

    args, kw = make(rng, case)
    tile = fused.FusedTile(tile_h=2, tile_w=tile_w, rank_chunk=4, in_chunk=2, reg_oc=reg_oc, reg_px=reg_px,
                           out_reg=2, first_reg=2, core_chunk=2)
    n, c, h, w, ri, ro, co, kh, kwid, s, p, d, gr = case
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    g = SimpleNamespace(rank_out=ro, stride_h=pair(s)[0], stride_w=pair(s)[1], kernel_h=kh, kernel_w=kwid,
                        dil_h=pair(d)[0], dil_w=pair(d)[1], taps=kh * kwid)
    lay = tile.layout(g)
    assert lay.weight_slot == -(-reg_oc // 4) * 4 and lay.weights_padded == lay.oc_threads * lay.weight_slot
    packed = fused.pack_core(args[2][:, :, :, :], tile, lay)
    assert packed.size == -(-ri // 4) * 4 * kh * kwid * lay.weights_padded
    with backend.bounds_checked():
        out = tucker_conv2d(*args, **kw, method="fused", config=tile)
    check_close(out, args, kw, np.float32)


@pytest.mark.parametrize("key", [k for k, picks in model.AUDITED_PICKS.items() if "fused" in picks],
                         ids=lambda k: f"r{k[2]}-{k[3]}")
def test_the_audited_fused_picks_run_right(rng, poisoned, key):
    """The fused tiles the GPU runs at TDC's ResNet-18 layers (64-168 threads; 5 and 6 ranks a
    thread in weight slots at layers 3-4), with the layer's own output ranks (they set the
    block), on one small image of four tiles, two of them partial, few channels and a partial
    block of outputs, against the reference."""
    _, _, _, r_out, _, kh, kw, *_ = key
    tile = model.AUDITED_PICKS[key]["fused"]
    lay = tile.layout(SimpleNamespace(rank_out=r_out, stride_h=1, stride_w=1, kernel_h=kh, kernel_w=kw,
                                      dil_h=1, dil_w=1, taps=kh * kw))
    case = (1, 5, tile.tile_h + 1, tile.tile_w + 2, 6, r_out, lay.out_block + 3, kh, kw, 1, 1, 1, 1)
    args, kw_args = make(rng, case)
    out = tucker_conv2d(*args, **kw_args, method="fused", config=tile)
    check_close(out, args, kw_args, np.float32)
