"""The stride-1 strip kernel (kernels/strip.py) in the simulator against the float64 reference:
strips that cross row ends and image planes' ends, partial strips and chunks, both vector
widths and the scalar staging path, row-aligned and unaligned thread pixels."""

import numpy as np
import pytest

from deftnumba.lean import PATTERNS, lean_conv2d, lean_conv2d_backward, ops
from deftnumba.lean.geometry import LeanGeometry
from deftnumba.lean.kernels import strip
from deftnumba.lean.kernels.fused import LeanTileConfig
from deftnumba.lean.kernels.strip import StripConfig
from deftnumba.lean.reference import lean_conv2d_backward_reference, lean_conv2d_reference
from deftnumba.runtime import backend


def _inputs(rng, n, c, h, w, taps, dtype=np.float64, bias=True):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    pw = rng.standard_normal((c, c)).astype(dtype)
    st = rng.standard_normal((c, len(taps))).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if bias else None
    return x, pw, st, b


@pytest.fixture
def poisoned(poison_allocations):
    poison_allocations(ops)


CONFIGS = {
    # 4 threads: strips of 8 pixels, 2 channels x 4 pixels each
    "small": StripConfig(strip=8, chunk=4, oc_block=4, reg_oc=2, reg_px=4),
    # strips of 12 pixels (3 threads along pixels), 8 channels per block in chunks of 8
    "wide": StripConfig(strip=12, chunk=8, oc_block=8, reg_oc=4, reg_px=4),
    # 8 pixels per thread: the row-aligned masks at W = 8, 16
    "px8": StripConfig(strip=16, chunk=4, oc_block=4, reg_oc=4, reg_px=8),
    # two channel groups of 6 threads (2 channels x 4 pixels each), 4 channels each per chunk
    "split2": StripConfig(strip=12, chunk=8, oc_block=4, reg_oc=2, reg_px=4, ksplit=2),
    # four groups of 2 threads, 4 pixels x 8 channels (row-aligned at W = 8, 16), 4 of 16 channels each
    "split4": StripConfig(strip=8, chunk=16, oc_block=4, reg_oc=4, reg_px=8, ksplit=4),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 3, 4, 8), (1, 9, 3, 5), (2, 4, 6, 16), (3, 5, 4, 4), (3, 4, 3, 8)])
def test_against_the_reference(rng, poisoned, config, pattern, shape):
    """Every pattern, through chunks and channel blocks that do not divide C, planes whose size
    is and is not a multiple of the vector width (odd H*W: the scalar staging), widths that
    do (8, 16: row-aligned with 4 or 8 pixels per thread) and do not divide into thread pixels,
    strips that run across images and strips that divide the image (4x4 and 4x8 planes with
    8- and 16-pixel strips: the halo outside the image staged as zeros, no vertical masks),
    and row-aligned thread pixels in strips that cross images (3x8 planes, 16-pixel strips:
    the vertical mask folded into the weight)."""
    taps = PATTERNS[pattern]
    x, pw, st, b = _inputs(rng, *shape, taps)
    with backend.bounds_checked():
        y = lean_conv2d(x, pw, st, b, 1, pattern=pattern, method="fused", config=CONFIGS[config])
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 9), (3, 1, 5, 1), (1, 6, 2, 2)])
def test_tiny_planes_and_one_channel(rng, poisoned, shape):
    """A plane smaller than one strip (all halo outside it), a single row or column, C = 1."""
    taps = PATTERNS["full9"]
    x, pw, st, b = _inputs(rng, *shape, taps)
    y = lean_conv2d(x, pw, st, b, 1, pattern="full9", method="fused", config=CONFIGS["wide"])
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("config", ["small", "split4"])
def test_float32_vector_path(rng, poisoned, config):
    """float32 stages 4-element vectors (H*W a multiple of 4), without bias, a custom pattern
    that has no centre tap and one that is only the centre (all in the pointwise matrix); with
    4 channels a thread (split4) its stencil weights are one 16-byte vector per tap."""
    for taps in (((-1, 1), (1, -1)), ((0, 0),), PATTERNS["full9"]):
        x, pw, st, _ = _inputs(rng, 2, 6, 4, 5, taps, dtype=np.float32, bias=False)
        y = lean_conv2d(x, pw, st, None, 1, pattern=taps, method="fused", config=CONFIGS[config])
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, None, 1, taps), rtol=2e-5, atol=2e-5)


def test_launch_leaves_the_callers_arrays(rng):
    """The centre tap is folded into a packed copy of the pointwise matrix, not into the caller's."""
    taps = PATTERNS["star5"]
    x, pw, st, b = _inputs(rng, 1, 4, 3, 4, taps)
    copies = [a.copy() for a in (x, pw, st, b)]
    lean_conv2d(x, pw, st, b, method="fused", config=CONFIGS["small"])
    for a, c in zip((x, pw, st, b), copies):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("config", ["wide", "split2"])
def test_adjoint_through_the_strip_kernel(rng, poisoned, config):
    """The stride-1 input gradient runs the strip kernel on grad_output (P^T, mirrored taps)."""
    taps = PATTERNS["star5"]
    x, pw, st, b = _inputs(rng, 2, 5, 5, 7, taps)
    gy = rng.standard_normal(x.shape)
    got = lean_conv2d_backward(gy, x, pw, st, b, 1, method="fused", config=CONFIGS[config])
    ref = lean_conv2d_backward_reference(gy, x, pw, st, b, 1, taps)
    np.testing.assert_allclose(got.input, ref.input, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("config", ["wide", "split4"])
def test_deterministic(rng, config):
    """Each output is summed in a fixed order (with channel groups: group 0, then 1, 2, ...)."""
    x, pw, st, b = _inputs(rng, 2, 9, 6, 7, PATTERNS["star5"], dtype=np.float32)
    first = lean_conv2d(x, pw, st, b, method="fused", config=CONFIGS[config])
    assert np.array_equal(first, lean_conv2d(x, pw, st, b, method="fused", config=CONFIGS[config]))


def test_stencil_packing():
    """pack_stencil: off-centre taps chunk by chunk, zeros past C and a zero dummy tap."""
    taps = PATTERNS["star5"]  # centre at index 0
    c, config = 5, StripConfig(strip=8, chunk=4, oc_block=4, reg_oc=2, reg_px=4)
    st = np.arange(1, c * len(taps) + 1, dtype=np.float64).reshape(c, len(taps))
    packed = strip.pack_stencil(np, st.reshape(-1), taps, config, rows=8).reshape(2, 4, 4)
    off = [t for t, tap in enumerate(taps) if tap != (0, 0)]
    assert np.array_equal(packed[0], st[:4, off].T)
    assert np.array_equal(packed[1, :, 0], st[4, off]) and not packed[1, :, 1:].any()
    only_centre = strip.pack_stencil(np, np.ones(3), ((0, 0),), config, rows=4)
    assert only_centre.shape == (4,) and not only_centre.any()


def test_the_tiled_kernel_still_runs_stride_1_when_asked(rng, poisoned):
    taps = PATTERNS["star5"]
    x, pw, st, b = _inputs(rng, 1, 3, 5, 5, taps)
    config = LeanTileConfig(tile_h=2, tile_w=4, chunk=4, oc_block=4, reg_oc=2, reg_px=2)
    y = lean_conv2d(x, pw, st, b, 1, method="fused", config=config)
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=1e-11, atol=1e-11)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="reg_px"):
        StripConfig(strip=10, chunk=4, oc_block=4, reg_oc=2, reg_px=4)
    with pytest.raises(ValueError, match="chunk"):
        StripConfig(strip=8, chunk=6, oc_block=4, reg_oc=2, reg_px=4)
    with pytest.raises(ValueError, match="reg_oc"):
        StripConfig(strip=8, chunk=16, oc_block=16, reg_oc=16, reg_px=4)
    with pytest.raises(ValueError, match="oc_block"):
        StripConfig(strip=8, chunk=4, oc_block=6, reg_oc=2, reg_px=4)
    with pytest.raises(ValueError, match="ksplit"):  # 8 channels into 4 groups: 2 each, not a multiple of 4
        StripConfig(strip=8, chunk=8, oc_block=4, reg_oc=2, reg_px=4, ksplit=4)
    with pytest.raises(ValueError, match="ksplit"):  # 4 each, not a multiple of reg_oc
        StripConfig(strip=8, chunk=16, oc_block=16, reg_oc=8, reg_px=4, ksplit=4)
    with pytest.raises(ValueError, match="ksplit"):
        StripConfig(strip=8, chunk=4, oc_block=4, reg_oc=2, reg_px=4, ksplit=0)


def test_a_strip_config_at_stride_2_is_refused(rng):
    x, pw, st, b = _inputs(rng, 1, 3, 5, 5, PATTERNS["star5"])
    with pytest.raises(ValueError, match="stride 1 only"):
        lean_conv2d(x, pw, st, b, 2, method="fused", config=CONFIGS["small"])
    with pytest.raises(TypeError, match="config"):
        lean_conv2d(x, pw, st, b, 1, method="fused", config=(8, 4))


def test_phase_model_names_the_kernels_phases():
    """Every ``# phase: NAME`` mark of the strip kernel (and its rank-1 helper) has an entry in
    ``phase_model``, and nothing else; ``phase_steps`` names only modelled phases."""
    import inspect
    import re

    source = inspect.getsource(strip.strip_kernel)
    marked = set(re.findall(r"^\s*# phase: (\w+)\s*$", source, re.M))
    model = strip.phase_model({"channels": 64, "height": 56, "width": 56}, strip.SIMULATOR_CONFIG)
    assert marked and marked == set(model)
    assert set(strip.phase_steps(strip.SIMULATOR_CONFIG)) <= marked


def test_staging_steps_cover_the_run():
    """Each thread's staged vectors times the threads cover a chunk's runs (and not twice over)."""
    for config in CONFIGS.values():
        for h, w in ((7, 6), (56, 56), (7, 7)):
            g = LeanGeometry(batch=1, channels=8, height=h, width=w)
            steps_in, steps_w = strip.staging_steps(g, config)
            vec = 4 if (h * w) % 4 == 0 else 1
            vectors = config.chunk * config.span(w) // vec
            assert vectors <= steps_in * config.threads < 2 * vectors + config.threads * vec
            assert config.chunk * config.oc_block // 4 <= steps_w * config.threads


def test_a_misaligned_input_view_is_read_from_an_aligned_copy(rng, poisoned):
    """The staging reads the input in 16-byte vectors: a view that starts mid-vector (x[1:] of a
    larger batch, contiguous) must not reach the kernel as is. ``vector_aligned`` copies it,
    and the result is the view's."""
    from deftnumba.runtime.vector import vector_aligned

    taps = PATTERNS["star5"]
    big = rng.standard_normal(1 + 2 * 4 * 4 * 4).astype(np.float32)
    x = big[1:].reshape(2, 4, 4, 4)  # contiguous, 4 bytes past a 16-byte boundary
    assert x.__array_interface__["data"][0] % 16 == 4
    flat = x.reshape(-1)
    copied = vector_aligned(np, flat)
    assert copied is not flat and copied.__array_interface__["data"][0] % 16 == 0
    assert np.array_equal(copied, flat)
    aligned = np.ascontiguousarray(flat)
    aligned = aligned if aligned.__array_interface__["data"][0] % 16 == 0 else np.array(flat)
    assert vector_aligned(np, aligned) is aligned
    _, pw, st, b = _inputs(rng, 2, 4, 4, 4, taps, dtype=np.float32)
    y = lean_conv2d(x, pw, st, b, 1, method="fused", config=CONFIGS["small"])
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("key", list(strip.AUDITED_PICKS), ids=lambda k: f"{k[2]}x{k[3]}x{k[1]}")
def test_the_audited_picks_run_right(rng, poisoned, key):
    """The configurations the GPU runs at the bench suites (256-384 threads, chunks of 64, two
    channel groups at 7x7x512), compiled for the suite's image size, on one image: two
    channel blocks and a partial chunk where the simulator's time allows (14x14, 7x7), a
    partial chunk in one block at 56x56 and 28x28."""
    _, _, h, w, dtype, taps = key
    config = strip.AUDITED_PICKS[key]
    c = config.oc_block + 2 if h <= 14 else 6
    x, pw, st, b = _inputs(rng, 1, c, h, w, taps, dtype=np.dtype(dtype))
    y = lean_conv2d(x, pw, st, b, 1, method="fused", config=config)
    np.testing.assert_allclose(y, lean_conv2d_reference(x, pw, st, b, 1, taps), rtol=1e-4, atol=1e-4)
