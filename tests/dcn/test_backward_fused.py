"""The column-free ``fused`` backward beyond the shared method tests of test_backward.py:
the weight kernel's split blocks (added in ticket order), tile configs whose channel chunks cross weight and offset groups,
bounds-checked runs, which kernels launch, run-to-run determinism under a shuffled block
order (and that the atomic path does vary under it), ``red_add`` in the simulator, and the
extra-memory figure."""

import dataclasses

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.dcn import reference
from deftnumba.runtime import backend
from deftnumba.dcn.geometry import Geometry
from deftnumba.runtime.backend import cuda  # a module global: the simulator swaps it inside kernels
from deftnumba.dcn.kernels import backward_fused
from deftnumba.dcn.kernels.backward_fused import BackwardTileConfig

from .cases import CASES, case, conv_kwargs, layer_arrays, rel_error, tolerance
from .test_backward import FIELDS, collision_arrays, grad_out_for, run

SIMULATED = pytest.mark.skipif(not backend.IS_SIMULATOR, reason="simulator-only check")


def direct(g, go, arrays, deterministic=False, plan=None, splits=None):
    """Call ``backward_fused.backward`` directly (NaN-poisoned gradients), return host grads."""
    x, offset, weight, bias, mask = (backend.to_device(a) if a is not None else None for a in arrays)
    go = backend.to_device(go)
    xp = backend.array_module(x)
    shapes, dtype = g.shapes, x.dtype
    grads = dn.DeformConv2dGrads(
        input=xp.full(shapes["input"], np.nan, dtype=dtype), offset=xp.full(shapes["offset"], np.nan, dtype=dtype),
        weight=xp.full(shapes["weight"], np.nan, dtype=dtype),
        bias=xp.full(shapes["bias"], np.nan, dtype=dtype) if bias is not None else None,
        mask=xp.full(shapes["mask"], np.nan, dtype=dtype) if mask is not None else None)
    backward_fused.backward(g, go, x, offset, weight, mask, *grads, deterministic=deterministic, plan=plan,
                            splits=splits)
    return dn.DeformConv2dGrads(*(backend.to_host(a) if a is not None else None for a in grads))


def check_against_reference(g, go, arrays, grads):
    expected = reference.deform_conv2d_backward(go, *arrays[:4], **conv_kwargs(g), mask=arrays[4])
    for field in FIELDS:
        want = getattr(expected, field)
        if want is None:
            continue
        assert rel_error(getattr(grads, field), want) < 10 * tolerance(g.dtype), field


# Tile configs that stress the chunk loop: chunks of 3 channels cross the weight-group (3) and
# offset-group (2) edges of "groups-and-offset-groups"; a 3x2 tile leaves ragged edge tiles.
CONFIGS = {
    "chunk3-tile3x2": BackwardTileConfig(tile_h=3, tile_w=2, halo=0, chunk=3, out_block=2, reg_rows=3, reg_px=2,
                                         w_out_block=2, w_reg_out=1, w_reg_cols=3),
    "chunk1-tile2x4": BackwardTileConfig(tile_h=2, tile_w=4, halo=2, chunk=1, out_block=4, reg_rows=1, reg_px=4,
                                         w_out_block=4, w_reg_out=2, w_reg_cols=1),
    # 4x4 ownership and 8 staged outputs: the column-gradient GEMM's trip runs its loop of
    # 4 rank-1 updates twice (backward_fused._column_gemm_trip), as GPU_CONFIG's does
    "twice-tile2x2": BackwardTileConfig(tile_h=2, tile_w=2, halo=1, chunk=4, out_block=8, reg_rows=4, reg_px=4,
                                        w_out_block=4, w_reg_out=2, w_reg_cols=2),
    # GPU_CONFIG's ownerships (6x4 column-gradient, 4x3 weight-gradient accumulators) on 6
    # threads: 12 table points a thread (the rolled point loops), grad_out staged by vector
    # where a tile row and an output row are whole vectors (stride-pad-dil-pairs: 4 columns)
    "gpu-ownership": BackwardTileConfig(tile_h=2, tile_w=4, halo=1, chunk=2, out_block=4, reg_rows=6, reg_px=4,
                                        w_out_block=4, w_reg_out=2, w_reg_cols=3, wg_reg_out=4, wg_reg_cols=3),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["groups-and-offset-groups", "odd-everything", "stride-pad-dil-pairs"])
def test_configs_and_splits_match_reference(name, config, deterministic, rng):
    g = CASES[name]
    cfg = CONFIGS[config]
    try:
        cfg.check(g.taps)
    except ValueError:
        pytest.skip("ownership does not divide this case's tile")
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    grads = direct(g, go, arrays, deterministic=deterministic, plan=cfg, splits=3)
    check_against_reference(g, go, arrays, grads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_out_staged_by_vector(deterministic, rng):
    """Where a tile row and an output row are whole 16-byte vectors (``grad_out_by_vector``),
    the input kernel stages ``grad_out`` by vector: here from a caller's ``grad_output`` that
    starts 4 bytes past a 16-byte boundary (the launcher copies it to an aligned one; the
    simulator's ``load_vector`` rejects a misaligned index), under bounds checks, with
    edge tiles whose vectors lie past the image."""
    g = CASES["stride-pad-dil-pairs"]
    cfg = CONFIGS["gpu-ownership"]
    assert cfg.grad_out_by_vector(g) and g.out_w % cfg.tile_w == 0 and g.out_h % cfg.tile_h == 0
    wide = dataclasses.replace(cfg, tile_w=8)  # half of every tile past the image
    assert wide.grad_out_by_vector(g) and g.out_w < wide.tile_w
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    shifted = np.empty(go.size + 1, dtype=go.dtype)[1:].reshape(go.shape)  # 4 bytes past the start
    shifted[...] = go
    for config in (cfg, wide):
        with backend.bounds_checked():
            grads = direct(g, shifted, arrays, deterministic=deterministic, plan=config, splits=2)
        check_against_reference(g, go, arrays, grads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_bounds_checked_run(deterministic, rng):
    """Every global and shared index in range, shared and local memory NaN-poisoned."""
    g = CASES["groups-and-offset-groups"]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.bounds_checked():
        grads = direct(g, go, arrays, deterministic=deterministic, splits=2)
    check_against_reference(g, go, arrays, grads)


REGULAR_CASES = dict([  # every channel chunk and output step full under SIMULATOR_CONFIG (chunk 2, 4 outputs)
    case("regular", n=2, c=4, h=5, w=7, c_out=8),
    case("regular-groups", n=1, c=8, h=6, w=5, c_out=8, groups=2, offset_groups=4, kh=2, kw=3, stride=(2, 1)),
])


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(REGULAR_CASES))
def test_regular_variant_matches_reference(name, deterministic, rng):
    """The input kernel's ``regular`` variant (no per-channel or per-output bounds tests,
    compiled where every chunk and output step is full) under bounds checks; the shared
    cases are all irregular, so they run the other variant."""
    g = REGULAR_CASES[name]
    assert backward_fused.default_config(g).regular(g)
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.bounds_checked():
        grads = direct(g, go, arrays, deterministic=deterministic, splits=2)
    check_against_reference(g, go, arrays, grads)
    assert not any(backward_fused.SIMULATOR_CONFIG.regular(c) for c in CASES.values())


@pytest.mark.parametrize("deterministic", [False, True])
def test_weights_staged_by_vector(deterministic, rng):
    """Where every chunk and output step is full and the slab rows are whole 16-byte vectors
    (``weights_by_vector``), the input kernel stages its weights by vector; here from a
    caller's weight array that starts 4 bytes past a 16-byte boundary (the launcher copies it
    to an aligned one), under bounds checks."""
    g = REGULAR_CASES["regular"]
    cfg = CONFIGS["twice-tile2x2"]
    assert cfg.regular(g) and cfg.weights_by_vector(g)
    assert not backward_fused.SIMULATOR_CONFIG.weights_by_vector(g)  # (chunks of 2: 18 floats a row)
    x, offset, weight, bias, mask = layer_arrays(g, rng)
    buffer = np.empty(weight.size + 1, dtype=weight.dtype)
    shifted = buffer[1:].reshape(weight.shape)
    shifted[...] = weight
    assert shifted.__array_interface__["data"][0] % 16 != 0
    arrays = (x, offset, shifted, bias, mask)
    go = grad_out_for(g, rng)
    with backend.bounds_checked():
        grads = direct(g, go, arrays, deterministic=deterministic, plan=cfg, splits=2)
    check_against_reference(g, go, arrays, grads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_batch_split_launches_slice_every_flat_argument(monkeypatch, deterministic, rng):
    """Past 65535 images the input kernel launches in batch slices: with the limit lowered to 2,
    3 images run as slices of 2 and 1, each with its own slices of the flat input, offsets,
    mask, grad_out and gradients (bounds-checked, against the reference). A slice that started
    at the wrong image's offsets or gradients fails it."""
    monkeypatch.setattr(backward_fused, "GRID_YZ_LIMIT", 2)
    _, g = case("three-images", n=3, c=4, h=4, w=5, c_out=3, offset_groups=2)
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.bounds_checked(), backend.launch_log() as launched:
        grads = direct(g, go, arrays, deterministic=deterministic, splits=2)
    assert sum("input_grad_kernel" in k for k in launched) == 2
    check_against_reference(g, go, arrays, grads)


def test_weight_kernel_runs_two_copies_of_its_gemm_steps_per_trip(rng):
    """The deterministic weight kernel's GEMM trip repeats its loop of rank-1 updates at a
    second offset where twice the steps divide the tile (``_column_gemm_trip``), as at
    ``deft64``: here 16 pixels in 2 x 8 updates of 2 x 4 products, bounds-checked, against the
    reference (a second copy that read the first copy's pixels would fail it)."""
    g = REGULAR_CASES["regular"]
    cfg = BackwardTileConfig(tile_h=4, tile_w=4, halo=1, chunk=4, out_block=2, reg_rows=4, reg_px=4,
                             w_out_block=2, w_reg_out=2, w_reg_cols=4)
    steps, trip = backward_fused._column_gemm_trip(cfg.pixels, cfg.w_reg_out * cfg.w_reg_cols)
    assert (steps, trip) == (8, 16)
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.bounds_checked(), backend.launch_log() as launched:
        grads = direct(g, go, arrays, deterministic=True, plan=cfg, splits=2)
    assert any("weight_grad_kernel" in k for k in launched)
    check_against_reference(g, go, arrays, grads)


GATHER_LAYOUTS = {
    # name: (case, the block's channels CB, outputs per chunk, product unroll)
    # 37 outputs: both register arrays of sums (32 + 8, the last 3 padding) in one chunk
    "outputs-37": (case("outputs-37", n=1, c=2, h=4, w=5, c_out=37), 2, 37, 2),
    # float64: 32 outputs a chunk (the shared sums), so chunks of 32, 32 and 6 (a partial one)
    "outputs-70-float64": (case("outputs-70-float64", n=1, c=2, h=3, w=4, c_out=70, dtype="float64"), 2, 32, 4),
    # CB = 16: a product thread owns 4 pixels x 4 channels; 135 pixels: a second, partial block
    "channels-16": (case("channels-16", n=1, c=16, h=9, w=15, c_out=5), 16, 5, 2),
    # CB = 8 (2 pixels x 4 channels), two weight and offset groups, stride and dilation
    "channels-8-groups": (case("channels-8-groups", n=2, c=16, h=6, w=7, c_out=6, groups=2, offset_groups=2,
                               stride=(2, 1), dil=(1, 2), pad=(1, 2)), 8, 3, 1),
}


@pytest.mark.parametrize("name", list(GATHER_LAYOUTS))
def test_deterministic_gather_layouts_match_reference(name, rng):
    """The column-free gather (``gather_staged_kernel``) in each of its layouts: the tap sums of
    up to 32 outputs per register array, padded to whole vectors; several output chunks; and
    the product re-dealt as 1x2, 2x4 and 4x4 (pixels x channels) per thread, with pixels past
    the image. Bounds-checked, against the reference."""
    from deftnumba.dcn.kernels import backward as bk

    g, channels, chunk, unroll = GATHER_LAYOUTS[name][0][1], *GATHER_LAYOUTS[name][1:]
    assert (bk.gather_staged_channels(g), bk.gather_out_chunk(g), bk.gather_product_unroll(chunk)) == \
        (channels, chunk, unroll)
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.bounds_checked(), backend.launch_log() as launched:
        grads = direct(g, go, arrays, deterministic=True)
    assert any("gather_staged_kernel" in k for k in launched)
    check_against_reference(g, go, arrays, grads)


def test_splits_reduce_in_a_fixed_order(rng):
    """Deterministic mode (the weight kernel's blocks per slice): more splits change the float
    sum order of grad_weight but not its value; the same split count gives the same bits."""
    g = CASES["basic-3x3"]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    one = direct(g, go, arrays, deterministic=True, splits=1)
    four = direct(g, go, arrays, deterministic=True, splits=4)
    again = direct(g, go, arrays, deterministic=True, splits=4)
    np.testing.assert_array_equal(four.weight, again.weight)
    np.testing.assert_allclose(one.weight, four.weight, rtol=1e-5, atol=1e-5)


@SIMULATED
def test_weight_splits_add_in_ticket_order_whatever_order_blocks_run(rng):
    """The weight kernel's S blocks of a slice take the (image, tile) pairs of the ticket they
    draw as they start and add their sums in ticket order: under shuffled block orders the
    weight gradient keeps its bits and matches the reference. A block that took its pairs by
    its block index (the sums would then be added in an order that follows the shuffle) gives
    other bits here."""
    _, g = case("tickets", n=3, c=2, h=5, w=6, c_out=3)
    cfg = CONFIGS["chunk1-tile2x4"]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng) * 1e3  # large and small terms: the sum order shows in the bits
    go[0] *= 1e-3
    splits = 3
    assert g.batch * cfg.tiles(g) > splits
    runs = []
    for seed in range(3):
        with backend.order_varying(seed), backend.launch_log() as launched:
            runs.append(direct(g, go, arrays, deterministic=True, plan=cfg, splits=splits).weight)
        assert any("weight_grad_kernel" in k for k in launched)
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    check_against_reference(g, go, arrays, direct(g, go, arrays, deterministic=True, plan=cfg, splits=splits))


def test_auto_runs_fused_and_deterministic_runs_the_gather(rng):
    g = CASES["basic-3x3"]
    arrays = layer_arrays(g, rng)
    go = grad_out_for(g, rng)
    with backend.launch_log() as atomic:
        run("auto", go, *arrays, g, deterministic=False)
    with backend.launch_log() as fixed:
        run("auto", go, *arrays, g, deterministic=True)
    # atomic mode: one kernel (the weight gradient is fused into it); no second sampling pass
    assert any("input_grad_kernel" in k for k in atomic)
    assert not any("weight_grad_kernel" in k or "gather" in k for k in atomic)
    # deterministic mode: the gather for grad_input and the fixed-order weight kernel
    assert all(any(name in k for k in fixed)
               for name in ("gather_staged_kernel", "input_grad_kernel", "weight_grad_kernel"))


@SIMULATED
@pytest.mark.parametrize("method", list(dn.BACKWARD_METHODS))
def test_atomic_path_varies_under_a_shuffled_block_order(method, rng):
    """The determinism tests can fail: with the simulator's block and thread order shuffled,
    the atomic scatter's float sums change bits (as on a GPU), so a bit-identity test of
    ``deterministic=False`` would fail; ``deterministic=True`` stays bit-identical."""
    g = Geometry(**{**CASES["basic-3x3"].__dict__, "in_channels": 2, "out_channels": 3, "height": 6, "width": 6})
    arrays = collision_arrays(g, rng)
    go = grad_out_for(g, rng)
    runs = []
    for seed in range(4):
        with backend.order_varying(seed):
            runs.append(run(method, go, *arrays, g, deterministic=False).input)
    assert any(not np.array_equal(runs[0], r) for r in runs[1:]), "atomic sums never changed order"
    fixed = []
    for seed in range(2):
        with backend.order_varying(seed):
            fixed.append(run(method, go, *arrays, g, deterministic=True))
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(fixed[0], field), getattr(fixed[1], field), err_msg=field)


@SIMULATED
def test_order_varying_shuffles_blocks():
    """The test flag itself: blocks run in a different order under two seeds."""
    @cuda.jit
    def record(order, counter):
        if cuda.threadIdx.x == 0:
            slot = cuda.atomic.add(counter, 0, 1)
            order[slot] = cuda.blockIdx.x

    orders = []
    for seed in (1, 2):
        order = np.zeros(16, dtype=np.int64)
        with backend.order_varying(seed):
            backend.launch(record, 16, 1, order, np.zeros(1, dtype=np.int64))
        orders.append(order)
    assert sorted(orders[0]) == list(range(16))
    assert not np.array_equal(orders[0], orders[1])


def test_extra_memory_at_deft64():
    """Atomic mode allocates nothing beyond the arguments and gradients (the weight gradient
    is reduced with RED into grad_weight); deterministic mode stays under issue 11's 5%: its
    gather's sort part (packed keys, sort scratch, segment starts) under 2.5%, and the weight
    kernel's two counters per slice (its blocks add into grad_weight in ticket order, no
    partials), at ``deft64``, N=8."""
    g = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=True, has_bias=True)
    cfg = backward_fused.GPU_CONFIG
    total = backward_fused.argument_and_gradient_bytes(g)
    h200 = 132 * 4  # the GPU's target for blocks of 3 warps: four per SM (WEIGHT_WARPS_PER_SM)
    assert backward_fused.extra_bytes(g, cfg, deterministic=False, target_blocks=h200) == 0
    # 16 slices (64 outputs x 16 chunks of 4 channels) of 32 blocks: 512 blocks, 4 a SM (3.9)
    assert backward_fused.choose_splits(g, cfg, target_blocks=h200) == 32
    assert backward_fused.choose_splits(g, cfg, target_blocks=132) == 8  # (one a SM: sessions 27-36)
    assert backward_fused.choose_splits(g, cfg, target_blocks=10 * h200) == backward_fused.MAX_SPLITS
    from deftnumba.dcn.kernels import backward as bk

    rows = bk.sort_part_rows(g, 1, backward_fused.sort_budget(g))
    assert rows == 32 and not bk.sort_key_layout(g, 1, rows)[1]  # two parts of 32-bit keys per image
    sort = bk.sort_part_bytes(g, 1, rows)
    assert sort == 2 * 4 * (4 * 9 * 32 * 64) + 8 * (64 * 64 + 2) < 0.025 * total
    extra = backward_fused.extra_bytes(g, cfg, deterministic=True, target_blocks=h200)
    assert extra == sort + 2 * 4 * 16 < 0.02 * total  # 1.9% (was 3.7% with weight partials, 12.8% before)


def test_config_rejects_ownership_that_does_not_divide():
    with pytest.raises(ValueError, match="reg_rows"):
        BackwardTileConfig(chunk=1, reg_rows=2).check(taps=9)


def test_gpu_default_config_keeps_96_threads_where_the_staged_region_grows(monkeypatch):
    """On a GPU, ``default_config`` takes ``GPU_CONFIG`` (96 threads, 3 whole warps) at
    ``deft64``, and shrinks its halo, not its ownership, where a stride of 2 widens the staged
    region past 48 KB of shared memory at halo 3."""
    monkeypatch.setattr(backend, "IS_SIMULATOR", False)
    shapes = dict(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                  has_mask=True, has_bias=True)
    deft64 = Geometry(**shapes, pad_h=1, pad_w=1)
    assert backward_fused.default_config(deft64) == backward_fused.GPU_CONFIG
    strided = Geometry(**shapes, stride_h=2, stride_w=2, pad_h=1, pad_w=1)
    assert backward_fused.GPU_CONFIG.input_shared_bytes(strided) > backward_fused.STATIC_SHARED_LIMIT
    cfg = backward_fused.default_config(strided)
    assert cfg == dataclasses.replace(backward_fused.GPU_CONFIG, halo=2) and cfg.input_threads(9) == 96


def test_the_weight_kernel_aims_at_twelve_warps_an_sm(monkeypatch):
    """On a GPU ``choose_splits`` fills each of the H200's 132 SMs with about
    ``WEIGHT_WARPS_PER_SM`` warps (4 blocks of 3 at ``deft64``), not one block: with one, a
    warp waiting for its offsets' global loads has no other warp on its scheduler to cover it
    (the audit's estimate with stalls, docs/perf-notes.md, "Session 37")."""
    g = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=True, has_bias=True)
    cfg = backward_fused.GPU_CONFIG
    monkeypatch.setattr(backend, "IS_SIMULATOR", False)
    splits = backward_fused.choose_splits(g, cfg)
    warps = -(-cfg.weight_threads(g.taps) // 32)
    blocks = splits * 16
    assert warps == 3 and splits == 32
    assert backward_fused.WEIGHT_WARPS_PER_SM - warps < blocks * warps / 132 <= backward_fused.WEIGHT_WARPS_PER_SM
