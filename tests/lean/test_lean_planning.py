"""The strip kernel's planner (deftnumba.lean.planning): the candidates it ranks are valid,
fit the hardware and keep channel groups to whole warps; the audited picks are among them;
the estimate sees what channel groups buy. Pure Python (no kernel runs)."""

import numpy as np
import pytest

from deftnumba.lean import bench_op, planning
from deftnumba.lean.kernels import strip
from deftnumba.lean.kernels.strip import STATIC_SHARED_LIMIT, StripConfig

SUITES = bench_op.suites()


@pytest.mark.parametrize("name", sorted(SUITES))
def test_candidates_fit_the_hardware(name):
    g = bench_op.geometry(SUITES[name])
    configs = list(planning.candidates(g))
    assert configs
    assert any(c.ksplit > 1 for c in configs) and any(c.ksplit == 1 for c in configs)
    for c in configs:
        assert c.threads <= 1024 and c.shared_bytes(g) <= STATIC_SHARED_LIMIT
        regs = planning.estimated_registers_for(c.reg_oc, c.reg_px, np.dtype(g.dtype).itemsize)
        assert c.threads * regs <= 65536
        if c.ksplit > 1:  # a group's branches (stencil, combine, epilogue) never split a warp
            assert c.group_threads % 32 == 0
        assert c.chunk % (4 * c.ksplit) == 0 and (c.chunk // c.ksplit) % c.reg_oc == 0


def test_audited_picks_are_candidates():
    """``python -m deftnumba.lean.audit --search K`` chooses among the candidates, so a pick that
    is not one of them was not made by the search."""
    for (n, c, h, w, dtype, taps), config in strip.AUDITED_PICKS.items():
        g = bench_op.geometry(dict(batch=n, channels=c, height=h, width=w, pattern="star5"), dtype)
        assert tuple(g.taps) == taps
        assert config in set(planning.candidates(g)), config


def test_channel_groups_shorten_the_estimate_where_outputs_are_few():
    """At 7x7x512 (batch 32) 8x4 outputs per thread fill half the warp slots; two channel
    groups fill them all, and the estimate says so. At 56x56x64 there are outputs enough."""
    g = bench_op.geometry(SUITES["7x7x512"])
    one = StripConfig(strip=48, chunk=64, oc_block=128, reg_oc=8, reg_px=4, ksplit=1)
    two = StripConfig(strip=48, chunk=64, oc_block=128, reg_oc=8, reg_px=4, ksplit=2)
    assert planning.estimated_seconds(g, two) < 0.8 * planning.estimated_seconds(g, one)
    g = bench_op.geometry(SUITES["56x56x64"])
    one = StripConfig(strip=256, chunk=16, oc_block=64, reg_oc=8, reg_px=8, ksplit=1)
    two = StripConfig(strip=256, chunk=16, oc_block=64, reg_oc=8, reg_px=8, ksplit=2)
    assert planning.estimated_seconds(g, one) < planning.estimated_seconds(g, two)
