"""Synthetic offset fields, their statistics, and the committed learned offsets."""

import numpy as np
import pytest

from deftnumba.dcn import offsets
from deftnumba.dcn.geometry import Geometry


def test_smooth_field_shape_dtype_and_magnitude():
    f = offsets.smooth_field(3, 9, 12, 17, magnitude=1.5, correlation=2.0, offset_groups=2, seed=1)
    assert f.shape == (3, 2 * 2 * 9, 12, 17) and f.dtype == np.float32
    assert np.sqrt(np.mean(f.astype(np.float64) ** 2)) == pytest.approx(1.5, rel=1e-5)
    assert abs(float(f.mean())) < 0.2


def test_smooth_field_is_reproducible_and_seeded():
    a = offsets.smooth_field(1, 9, 8, 8, seed=3)
    np.testing.assert_array_equal(a, offsets.smooth_field(1, 9, 8, 8, seed=3))
    assert not np.array_equal(a, offsets.smooth_field(1, 9, 8, 8, seed=4))


def test_correlation_length_controls_smoothness():
    values = [offsets.neighbour_correlation(offsets.smooth_field(2, 9, 32, 32, correlation=c, seed=0))
              for c in (0.0, 1.0, 2.0, 4.0)]
    assert abs(values[0]) < 0.05          # white noise: neighbours independent
    assert values == sorted(values)        # longer correlation, smoother field
    assert values[-1] > 0.9


def test_zero_magnitude_and_bad_arguments():
    assert not np.any(offsets.smooth_field(1, 4, 5, 5, magnitude=0.0))
    with pytest.raises(ValueError, match="magnitude"):
        offsets.smooth_field(1, 4, 5, 5, magnitude=-1.0)
    with pytest.raises(ValueError):
        offsets.smooth_field(1, 4, 5, 5, correlation=-1.0)


def test_for_geometry_matches_the_offset_argument():
    g = Geometry(batch=2, in_channels=4, height=9, width=7, out_channels=3, kernel_h=3, kernel_w=2,
                 stride_h=2, pad_h=1, offset_groups=2, dtype="float64")
    f = offsets.for_geometry(g, magnitude=0.5, correlation=1.0)
    assert f.shape == g.shapes["offset"] and f.dtype == np.float64


def test_summarize_a_known_field():
    f = np.zeros((1, 18, 4, 5), np.float32)
    f[:, 0::2] = 3.0   # dy = 3, dx = 4 everywhere: length 5
    f[:, 1::2] = 4.0
    s = offsets.summarize(f)
    assert s["mean_dy_px"] == pytest.approx(3.0) and s["mean_dx_px"] == pytest.approx(4.0)
    assert s["p50_length_px"] == pytest.approx(5.0) and s["max_length_px"] == pytest.approx(5.0)
    assert s["rms_px"] == pytest.approx(np.sqrt(12.5))
    dy, dx = offsets.components(f)
    assert dy.shape == dx.shape == (1, 9, 4, 5)


def test_committed_learned_offsets_load_and_are_small():
    path = offsets.LEARNED_PATH
    assert path.exists(), "data/offsets/digits_dcn.npz is missing: run python -m deftnumba.offsets"
    assert path.stat().st_size < 1_000_000
    learned = offsets.load_learned()
    meta = learned["meta"]
    assert meta["command"] == "python -m deftnumba.offsets"
    assert 0.5 < meta["test_accuracy"] <= 1.0
    for name, layer in meta["layers"].items():
        a = learned["layers"][name]
        assert a.dtype == np.float32 and a.shape[1:] == (18, layer["height"], layer["width"])
        assert np.all(np.isfinite(a)) and np.abs(a).max() > 0.05   # the offsets did learn something


def test_training_runs_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    result = offsets.train_learned(epochs=1, keep_images=2, train_limit=64, log=lambda *_: None)
    assert result["layers"]["dcn1"].shape == (2, 18, 16, 16)
    assert result["layers"]["dcn2"].shape == (2, 18, 8, 8)
    path = offsets.save_learned(result, tmp_path / "o.npz")
    again = offsets.load_learned(path)
    np.testing.assert_allclose(again["layers"]["dcn1"], result["layers"]["dcn1"], atol=1e-2, rtol=1e-3)
    assert again["meta"]["epochs"] == 1


def test_gather_sectors_by_hand():
    """1x1 taps, zero offsets, a 4x64 float32 plane: a warp reads 32 pixels of a row and the
    clamped corners x0+1 and y0+1. Rows 0-2: cols 0..32 = 5 sectors x 2 rows, then cols 32..63 =
    4 sectors x 2 rows; row 3 (y0+1 clamped onto itself): 5 + 4. Total 3 * 18 + 9 = 63."""
    g = Geometry(batch=1, in_channels=1, height=4, width=64, out_channels=1, kernel_h=1, kernel_w=1,
                 has_mask=False)
    got = offsets.gather_sectors(g, np.zeros(g.shapes["offset"], np.float32))
    assert got["sectors"] == 63 and got["bytes"] == 63 * 32 and got["samples"] == 4 * 64
    # Channels share positions: twice the channels, twice the sectors and samples.
    g2 = Geometry(**{**g.__dict__, "in_channels": 2})
    assert offsets.gather_sectors(g2, np.zeros(g2.shapes["offset"], np.float32))["sectors"] == 126


def test_gather_sectors_grow_with_scattered_offsets():
    g = Geometry(batch=1, in_channels=1, height=32, width=32, out_channels=1, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=False)
    zero = offsets.gather_sectors(g, np.zeros(g.shapes["offset"], np.float32))
    smooth = offsets.gather_sectors(g, offsets.for_geometry(g, magnitude=2.0, correlation=4.0))
    white = offsets.gather_sectors(g, offsets.for_geometry(g, magnitude=2.0, correlation=0.0))
    assert zero["bytes_per_sample"] < smooth["bytes_per_sample"] < white["bytes_per_sample"]
    far = np.full(g.shapes["offset"], 1e3, np.float32)   # every sample outside the band: no reads
    assert offsets.gather_sectors(g, far) == {"sectors": 0, "bytes": 0, "samples": 0, "bytes_per_sample": 0.0}
