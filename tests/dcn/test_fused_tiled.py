"""The fused tiled kernel: tile configs, far offsets, the counting build, memory, poison.

``tests/test_forward.py`` already runs ``method="fused"`` on every case of
``tests/cases.py`` with the planner's tile; these tests pin tile configs by hand.
"""

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import reference
from deftnumba.dcn.planning import plan as tiling
from deftnumba.dcn.kernels import fused_tiled
from deftnumba.dcn.kernels.fused_tiled import TileConfig

from .cases import CASES, case, conv_kwargs, layer_arrays, rel_error, tolerance

# Small blocks (4 to 32 threads) so the simulator stays quick. Several tiles do not
# divide the outputs they meet (5x7, 4x6, ...), one is a single row, one a single pixel.
CONFIGS = {
    "4x4-h1": TileConfig(4, 4, 1, 2, 4, 2, 1),
    "3x5-h0": TileConfig(3, 5, 0, 3, 2, 1, 5),
    "2x3-h2-chunk1": TileConfig(2, 3, 2, 1, 8, 4, 3),
    "1x8-h1": TileConfig(1, 8, 1, 4, 4, 4, 2),
    "1x1-h3": TileConfig(1, 1, 3, 2, 16, 1, 1),
}


def fused(g, arrays, config):
    x, offset, weight, bias, mask = arrays
    out = np.full(g.shapes["output"], np.nan, dtype=g.dtype)  # poisoned
    fused_tiled.forward(g, x, offset, weight, bias, mask, out, plan=config)
    return out


PAIRS = [("basic-3x3", "4x4-h1"), ("basic-3x3", "3x5-h0"), ("stride-pad-dil-pairs", "2x3-h2-chunk1"),
         ("stride-pad-dil-pairs", "1x8-h1"), ("groups-and-offset-groups", "3x5-h0"),
         ("groups-and-offset-groups", "2x3-h2-chunk1"), ("kernel-2x3", "1x1-h3"), ("kernel-2x3", "4x4-h1"),
         ("float64", "1x8-h1"), ("float64", "3x5-h0"), ("batch-1-image-1x1", "1x1-h3"),
         ("kernel-5x5", "2x3-h2-chunk1"), ("odd-everything", "1x8-h1")]


@pytest.mark.parametrize("name, config", PAIRS)
def test_tile_configs_match_reference(name, config, rng):
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, CONFIGS[config])
    assert np.all(np.isfinite(out)), "some output element was never written"
    assert rel_error(out, expected) < tolerance(g.dtype)


@pytest.mark.parametrize("scale", [6.0, 40.0])
@pytest.mark.parametrize("config", ["4x4-h1", "3x5-h0"])
def test_offsets_far_beyond_the_halo(scale, config, rng):
    """Offsets of several pixels (and of tens, mostly outside the image) against a halo of
    0 or 1: most in-band samples are out-of-tile and come from global memory."""
    _, g = case("far", n=2, c=4, h=9, w=10, c_out=4, offset_groups=2)
    arrays = layer_arrays(g, rng, offset_scale=scale)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, CONFIGS[config])
    assert rel_error(out, expected) < tolerance(g.dtype)
    counts = tiling.brute_force_counts(g, arrays[1], CONFIGS[config])
    assert counts["out_of_tile"] > counts["in_tile"] > 0 if scale == 6.0 else counts["out_of_tile"] > 0


def test_through_deform_conv2d_with_a_plan(rng):
    g = CASES["offset-groups-2"]
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    plan = tiling.Plan("fused", CONFIGS["2x3-h2-chunk1"])
    for method in ("auto", "fused"):
        out = dn.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4], method=method, plan=plan)
        assert rel_error(out, expected) < tolerance(g.dtype)


def test_counting_build_equals_brute_force_on_an_exact_grid(rng):
    """Integer and half-integer offsets put corners exactly on staged-region edges, the
    image border and the band edge (y = -1, y = H)."""
    _, g = case("grid", n=1, c=2, h=10, w=11, c_out=2, stride=(2, 1), dil=(1, 2))  # 5x9 outputs
    offset = rng.integers(-4, 5, g.shapes["offset"]).astype(np.float32) / 2
    seen = []
    for config in (CONFIGS["4x4-h1"], CONFIGS["3x5-h0"], CONFIGS["2x3-h2-chunk1"], CONFIGS["1x1-h3"]):
        expected = tiling.brute_force_counts(g, offset, config)
        assert fused_tiled.count_out_of_tile(g, offset, config) == expected
        assert expected["in_tile"] and expected["outside_band"]
        seen.append(expected["out_of_tile"])
    # offsets reach +-2: halos 0 and 1 miss some (all but certainly, over 405 positions), a halo of 3 none
    assert seen[0] > 0 and seen[1] > 0 and seen[3] == 0


@pytest.mark.parametrize("name", ["basic-3x3", "groups-and-offset-groups", "odd-everything",
                                  "kernel-5x5", "float64"])
def test_counting_build_equals_brute_force(name, rng):
    g = CASES[name]
    offset = layer_arrays(g, rng, offset_scale=1.5)[1]
    offset.reshape(-1)[::17] = np.nan  # non-finite offsets: outside the band
    config = CONFIGS["4x4-h1"]
    counted = fused_tiled.count_out_of_tile(g, offset, config)
    assert counted == tiling.brute_force_counts(g, offset, config)
    total = g.batch * g.in_channels * g.taps * g.out_h * g.out_w
    assert counted["in_tile"] + counted["out_of_tile"] + counted["outside_band"] == total


def test_halo_catches_small_offsets(rng):
    """|dy|, |dx| < 1 and a halo of 1: every sample whose undeformed footprint is inside
    the staged region stays in-tile, so no out-of-tile samples at all."""
    _, g = case("small", n=1, c=2, h=8, w=8, c_out=2)
    offset = rng.uniform(-0.99, 0.99, g.shapes["offset"]).astype(np.float32)
    counted = fused_tiled.count_out_of_tile(g, offset, CONFIGS["4x4-h1"])
    assert counted["out_of_tile"] == 0 and counted["in_tile"] > 0


def test_no_column_buffer(monkeypatch, rng):
    """Extra device memory stays far below 5% of input + offset + mask + output, beside one
    packed copy of the weights (``pack_weights``)."""
    _, g = case("mem", n=1, c=8, h=8, w=8, c_out=8)
    arrays = layer_arrays(g, rng)
    allocated = []

    class Recorder:
        def __getattr__(self, name):
            attr = getattr(np, name)
            if name in ("zeros", "empty", "full", "ones", "empty_like", "zeros_like", "ascontiguousarray",
                        "concatenate"):
                def alloc(*args, **kwargs):
                    result = attr(*args, **kwargs)
                    allocated.append(result.nbytes)
                    return result
                return alloc
            return attr

    monkeypatch.setattr(fused_tiled.backend, "array_module", lambda like: Recorder())
    out = fused(g, arrays, CONFIGS["4x4-h1"])
    data = sum(a.nbytes for a in (arrays[0], arrays[1], arrays[4], out))
    packed = fused_tiled.pack_weights(g, CONFIGS["4x4-h1"], arrays[2], np).nbytes
    assert allocated and sum(allocated) < 0.05 * data + packed


def test_poisoned_output_through_the_public_function(monkeypatch, rng):
    g = CASES["odd-everything"]
    arrays = layer_arrays(g, rng)
    import deftnumba.dcn.ops as ops

    class Poisoned:
        def __getattr__(self, name):
            if name == "empty":
                return lambda shape, dtype: np.full(shape, np.nan, dtype=dtype)
            return getattr(np, name)

    monkeypatch.setattr(ops.backend, "array_module", lambda like: Poisoned())
    out = dn.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4], method="fused")
    assert np.all(np.isfinite(out))
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    assert rel_error(out, expected) < tolerance(g.dtype)


def test_kernel_factory_is_cached():
    cfg = CONFIGS["4x4-h1"]
    first = fused_tiled.fused_kernel("float32", 3, 3, 1, 1, 1, 1, cfg, True, False)
    assert fused_tiled.fused_kernel("float32", 3, 3, 1, 1, 1, 1, TileConfig(4, 4, 1, 2, 4, 2, 1),
                                    True, False) is first
    assert fused_tiled.fused_kernel("float32", 3, 3, 1, 1, 1, 1, cfg, True, True) is not first


def test_tile_config_validation_and_shared_budget():
    with pytest.raises(ValueError, match="reg_oc"):
        TileConfig(4, 4, 1, 2, 6, 4, 1)
    with pytest.raises(ValueError, match="reg_px"):
        TileConfig(3, 3, 1, 2, 4, 1, 2)
    with pytest.raises(ValueError, match="halo"):
        TileConfig(4, 4, -1, 2, 4, 1, 1)
    g = CASES["basic-3x3"]
    cfg = TileConfig(8, 8, 2, 4, 64, 4, 4)
    assert cfg.threads == 256 and cfg.staged_shape(g) == (14, 14)
    # staged 4*(14*14 + 16) (the region and the 16-position zero window), weight slab 36*64,
    # columns 36*64 floats; table 576 * (4 floats + 3 int32)
    assert cfg.shared_bytes(g) == 4 * (4 * (196 + 16) + 36 * 64 + 36 * 64) + 576 * 28
    gpu = fused_tiled.GPU_CONFIG
    from dataclasses import replace

    deft64 = replace(g, batch=8, in_channels=64, out_channels=64, height=64, width=64)
    assert gpu.shared_bytes(deft64) <= fused_tiled.STATIC_SHARED_LIMIT


@pytest.mark.parametrize("name, limit, launches", [("odd-everything", 1, 6), ("groups-2", 1, 4)])
def test_grids_beyond_the_65535_limit_are_split(monkeypatch, name, limit, launches, rng):
    """Images go to gridDim.z and (group, channel block) to gridDim.y, both at most 65535:
    bigger layers run in several launches. The limit is lowered here so that tiny layers
    need several (odd-everything: 3 images x 2 channel blocks; groups-2: 2 images x 2 groups)."""
    monkeypatch.setattr(fused_tiled, "GRID_YZ_LIMIT", limit)
    g = CASES[name]
    config = CONFIGS["1x8-h1"]
    assert len(list(config.launches(g))) == launches
    assert all(d <= limit for d in config.grid(g)[1:])
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, config)
    assert np.all(np.isfinite(out)) and rel_error(out, expected) < tolerance(g.dtype)
    counts = fused_tiled.count_out_of_tile(g, arrays[1], config)
    assert counts == tiling.brute_force_counts(g, arrays[1], config)


@pytest.mark.parametrize("k, dil", [(5, 1), (7, 1), (9, 2), (11, 1)])
def test_default_config_fits_static_shared_memory(monkeypatch, k, dil):
    monkeypatch.setattr(fused_tiled.backend, "IS_SIMULATOR", False)  # the GPU default
    _, g = case("big-kernel", n=2, c=64, h=64, w=64, c_out=64, kh=k, kw=k, pad=(k // 2 * dil,) * 2,
                dil=(dil, dil))
    cfg = fused_tiled.default_config(g)
    assert cfg.shared_bytes(g) <= fused_tiled.STATIC_SHARED_LIMIT


# ------------------------------------------------------------------ the configs the GPU runs
def _suite_plans():
    """The fused tile ``tiling.plan_for`` picks (H200 model) for every bench suite shape."""
    from deftnumba import bench

    return {name: tiling.plan_for(g, methods=("fused",), device=tiling.H200).tile
            for name, g in bench.SUITES.items()}


def _run_checked(g, arrays, config):
    """The fused kernel under ``bounds_checked`` (every index checked, shared and local
    memory NaN-filled) on a NaN-poisoned output; returns the output."""
    with backend.bounds_checked():
        return fused(g, arrays, config)


@pytest.mark.parametrize("suite", ["deft64", "res128", "det-c4", "det-c5"])
def test_planned_config_of_every_suite_shape(suite, rng):
    """The tile the planner picks for a suite shape, run on a small image: a partial tile in
    x, a partial output-channel block, and channels that end in a partial chunk at an
    offset-group boundary (6 channels, 2 offset groups: chunks of 3)."""
    config = _suite_plans()[suite]
    _, g = case(suite, n=1, c=6, h=config.tile_h, w=config.tile_w + 3, c_out=config.oc_block - 5,
                offset_groups=2)
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = _run_checked(g, arrays, config)
    assert np.all(np.isfinite(out)), "some output element was never written"
    assert rel_error(out, expected) < tolerance(g.dtype)


@pytest.mark.parametrize("config", [TileConfig(5, 12, 1, 4, 128, 8, 4), TileConfig(4, 6, 2, 4, 256, 8, 8),
                                    TileConfig(10, 8, 1, 2, 128, 8, 8)], ids=str)
def test_fitted_tiles_and_wide_channel_blocks(config, rng):
    """Tiles the planner fits to the output (non-power-of-two sides, 240 threads: a partial
    warp) and 256-channel blocks, on an image that leaves partial tiles in both directions,
    a partial channel block and a partial chunk."""
    _, g = case("fitted", n=1, c=6, h=config.tile_h + 2, w=config.tile_w + 3, c_out=config.oc_block - 3,
                offset_groups=2)
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = _run_checked(g, arrays, config)
    assert np.all(np.isfinite(out)), "some output element was never written"
    assert rel_error(out, expected) < tolerance(g.dtype)


def test_gpu_config_full_chunks_and_a_full_channel_block(rng):
    """``GPU_CONFIG`` (the deft64 plan) with every chunk full and all 64 output channels:
    the unselected paths of the column build and the weight copy."""
    config = fused_tiled.GPU_CONFIG
    _, g = case("gpu", n=1, c=8, h=8, w=8, c_out=64)
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = _run_checked(g, arrays, config)
    assert rel_error(out, expected) < tolerance(g.dtype)


@pytest.mark.parametrize("k", [5, 9])
def test_gpu_default_config_for_large_kernels(monkeypatch, k, rng):
    """``default_config`` as the GPU would pick it (shrunk to fit 48 KB), run here."""
    _, g = case("big-kernel", n=1, c=3, h=5, w=6, c_out=4, kh=k, kw=k, pad=(k // 2, k // 2))
    monkeypatch.setattr(fused_tiled.backend, "IS_SIMULATOR", False)
    config = fused_tiled.default_config(g)
    monkeypatch.undo()
    if config.threads > 128:
        pytest.skip(f"{config} has {config.threads} threads: too slow for the simulator")
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, config)
    assert rel_error(out, expected) < tolerance(g.dtype)


@pytest.mark.parametrize("name", ["odd-everything", "groups-and-offset-groups"])
def test_wide_index_variant(monkeypatch, name, rng):
    """The 64-bit plane-offset variant (chosen for planes past 2**30 elements) computes the
    same layer; here it is forced on a tiny one."""
    monkeypatch.setattr(fused_tiled, "needs_wide_index", lambda geometry: True)
    g = CASES[name]
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, CONFIGS["1x8-h1"])
    assert rel_error(out, expected) < tolerance(g.dtype)


def test_wide_index_is_chosen_for_huge_planes():
    _, small = case("small")
    _, huge = case("huge", n=1, c=1, h=40000, w=60000, c_out=1, kh=1, kw=1, pad=(0, 0))
    assert not fused_tiled.needs_wide_index(small) and fused_tiled.needs_wide_index(huge)
    # small planes, but an image of 1024 x 1500 x 1500 > 2**31 elements: in-image offsets
    # (uint32 in the narrow variant) need the wide one too
    _, deep = case("deep", n=1, c=1024, h=1500, w=1500, c_out=1, kh=1, kw=1, pad=(0, 0))
    assert fused_tiled.needs_wide_index(deep)


def test_nan_mask_on_an_out_of_band_sample_gives_nan(rng):
    """torchvision's rule: an out-of-band sample is 0 * mask, so a NaN mask there makes the
    output pixel NaN; no memory is read for it (bounds-checked run)."""
    _, g = case("nan-mask", n=1, c=2, h=6, w=6, c_out=3)
    x, offset, weight, bias, mask = layer_arrays(g, rng, offset_scale=0.3)
    offset[0, 2 * 4, 2, 3] = 1e6  # tap 4 (the centre) of pixel (2, 3): far outside the band
    mask[0, 4, 2, 3] = np.nan
    offset[0, 2 * 1 + 1, 4, 1] = np.nan  # a NaN offset: outside the band, finite mask
    arrays = (x, offset, weight, bias, mask)
    expected = reference.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask)
    out = _run_checked(g, arrays, CONFIGS["4x4-h1"])
    assert np.isnan(out[0, :, 2, 3]).all() and np.isnan(expected[0, :, 2, 3]).all()
    finite = np.isfinite(expected)
    assert finite.sum() == expected.size - g.out_channels
    assert np.array_equal(np.isfinite(out), finite)
    assert rel_error(np.where(finite, out, 0), np.where(finite, expected, 0)) < tolerance(g.dtype)


def test_phase_model_counts_every_chunk_and_table():
    from deftnumba import bench

    g = bench.SUITES["deft64"]
    model = fused_tiled.phase_model(g, fused_tiled.GPU_CONFIG)
    # 64 channels in chunks of 4: 16 full chunks, no partial one; 576 table entries over 64
    # threads: 9 each; a 14x14 stored region: 3.5 positions per warp (warp 0 runs 4, warp 1
    # runs 3: 196 = 3 * 64 + 4); 576
    # 16-byte weight vectors (2304 floats) per chunk: 9 each; 36 rank-1 updates per chunk
    # (counted one by one: the audit's multiply count is per update).
    # (body iterations, straight runs): the code around each loop runs once per chunk of its kind
    # staging and columns count (position, channel) and (entry, channel) steps: x 4 channels
    assert model == {"prologue": (16, 1), "table": (9, 1), "staging": (224, 16), "staging_partial": (0, 0),
                     "weights": (144, 16), "weights_partial": (0, 0), "columns": (576, 16),
                     "columns_partial": (0, 0), "multiply": (576, 16), "epilogue": 1,
                     "epilogue_edge": (0, 0.0)}  # 64x64 outputs in 8x8 tiles: no edge block
    _, grouped = case("og", c=12, offset_groups=3, c_out=4)
    model = fused_tiled.phase_model(grouped, TileConfig(4, 4, 1, 2, 4, 2, 1))
    # 32 threads, 144 entries: 5 each; 3 offset groups of 4 channels: 3 tables, 6 full chunks of 2
    assert model["table"] == (15, 3) and model["columns"] == (60, 6) and model["columns_partial"] == (0, 0)
    model = fused_tiled.phase_model(grouped, TileConfig(4, 4, 1, 3, 4, 2, 1))
    # chunks of 3 in segments of 4 channels: a full chunk and a partial one (1 channel) each;
    # only the partial chunks run the partial-chunk code
    assert model["columns"] == (45, 3) and model["columns_partial"] == (45, 3)
    assert model["staging_partial"][1] == model["weights_partial"][1] == 3
    assert model["multiply"] == (6 * 3 * 9, 6) and model["prologue"] == (6, 1)
    # 4 output channels in blocks of 4, outputs of 5x7 in 4x4 tiles: 1 of 4 tiles inside
    assert (grouped.out_h, grouped.out_w) == (5, 7)
    assert model["epilogue_edge"] == (0, pytest.approx(1 - 1 / 4))


def test_warp_mean_trips_counts_the_passes_of_every_warp():
    """A grid-stride loop's passes per warp, averaged: each warp runs as many as its first
    lane (brute force over the lanes), so 576 entries over 128 threads are 4.5 passes per
    warp (warps 0-1 run 5, warps 2-3 run 4), not ceil(576 / 128) = 5."""
    def brute(items, threads):
        warps = -(-threads // 32)
        passes = [max((len(range(t, items, threads)) for t in range(32 * w, min(threads, 32 * w + 32))), default=0)
                  for w in range(warps)]
        return sum(passes) / warps

    for items, threads in [(576, 128), (144, 64), (10, 64), (256, 64), (324, 64), (720, 160), (5, 96), (1, 1)]:
        assert fused_tiled.warp_mean_trips(items, threads) == pytest.approx(brute(items, threads))
    assert fused_tiled.warp_mean_trips(576, 128) == 4.5


@pytest.mark.parametrize("chunk, unroll", [(2, 8), (4, 8), (3, 12)])
def test_multiply_unrolls_of_8_and_12_match_the_reference(chunk, unroll, rng):
    """A 2x2 kernel's chunk of 2 or 4 gives 8 or 16 rank-1 updates per chunk (8 per loop
    iteration), a chunk of 3 gives 12: the multiply loop's longer unrolled forms."""
    _, g = case("kernel-2x2", n=2, c=7, h=6, w=5, c_out=5, kh=2, kw=2, pad=(1, 0))
    config = TileConfig(3, 2, 1, chunk, 4, 2, 2)
    assert fused_tiled._multiply_unroll(config, g.taps) == unroll
    arrays = layer_arrays(g, rng)
    expected = reference.deform_conv2d(*arrays[:4], **conv_kwargs(g), mask=arrays[4])
    out = fused(g, arrays, config)
    assert np.all(np.isfinite(out)), "some output element was never written"
    assert rel_error(out, expected) < tolerance(g.dtype)
