"""Choosing the strip kernel's configuration (``kernels/strip.py``) for a lean layer.

``default_config`` takes the audited pick of a bench-suite layer (``strip.AUDITED_PICKS``)
and otherwise ranks ``candidates`` by ``estimated_seconds``: per-step instruction costs
read from the kernel's SASS (``python -m deftnumba.lean.audit``), through the house's
issue-slot model (``perf.sass.issue_model``). A prediction; the audit checks a choice.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ..perf import sass
from ..runtime import backend
from ..runtime.vector import vector_width
from .kernels.strip import (AUDITED_PICKS, REGISTER_BUDGET, SIMULATOR_CONFIG, STATIC_SHARED_LIMIT, StripConfig,
                            pick_key, staging_steps)

MAX_STAGING_STEPS = 8
"""Unrolled input-staging steps per thread and chunk, at most, where a step is a 16-byte vector:
beyond that the SASS audit saw ptxas recompute every address (3 -> 14 instructions a step)."""
MAX_SCALAR_STAGING_STEPS = 12
"""The same where the plane's size is not a multiple of the vector (element staging): at
7x7x512, chunk 64, 11 element steps took 4.2 instructions each in the SASS."""


def candidates(geometry):
    """The configurations ``default_config`` chooses from: 8x8, 8x4 or 4x4 outputs per
    thread (8x4 at most in float64, whose accumulators take two registers each); 16 to 512
    output channels per block (never more than C rounded up to 16); strips of any whole
    number of thread columns up to 1024 threads; 1, 2 or 4 channel groups (``ksplit``; more
    than one only where a group is whole warps); the largest channel chunk (64, 32, 16 or 8)
    that splits between the groups, whose static shared memory fits 48 KB and whose input
    staging takes at most ``MAX_STAGING_STEPS`` vectors per thread and chunk."""
    c16 = -(-geometry.channels // 16) * 16
    wide = np.dtype(geometry.dtype).itemsize > 4  # float64: an accumulator takes two registers
    vectors = (geometry.height * geometry.width) % vector_width(geometry.dtype) == 0  # 16-byte staging
    most_steps = MAX_STAGING_STEPS if vectors else MAX_SCALAR_STAGING_STEPS
    for reg_oc, reg_px in ((8, 8), (8, 4), (4, 4)):
        if wide and reg_oc * reg_px > 32:
            continue
        for oc_block in (512, 256, 128, 64, 32, 16):
            if oc_block > c16:
                continue
            for px_threads in range(1, 129):
                for ksplit in (1, 2, 4):
                    group = (oc_block // reg_oc) * px_threads
                    threads = ksplit * group
                    registers = estimated_registers_for(reg_oc, reg_px, np.dtype(geometry.dtype).itemsize)
                    if threads > 1024 or threads * registers > 65536 or (ksplit > 1 and group % 32):
                        continue
                    for chunk in (64, 32, 16, 8):
                        if chunk % (4 * ksplit) or (chunk // ksplit) % reg_oc:
                            continue
                        config = StripConfig(strip=px_threads * reg_px, chunk=chunk, oc_block=oc_block,
                                             reg_oc=reg_oc, reg_px=reg_px, ksplit=ksplit)
                        # at most MAX_STAGING_STEPS unrolled copy steps per chunk: beyond that the
                        # SASS audit saw ptxas recompute addresses in every step (3 -> 14 instructions)
                        if (config.shared_bytes(geometry) <= STATIC_SHARED_LIMIT
                                and (chunk == 8 or staging_steps(geometry, config)[0] <= most_steps)):
                            yield config
                            break


def estimated_registers_for(reg_oc: int, reg_px: int, itemsize: int = 4) -> int:
    """Registers per thread, roughly (ptxas gave 90-168 for 4x4 to 8x8 float32 accumulators):
    the accumulators and one step's operands (two registers each in float64) and ~60 for
    addresses and loop state."""
    return min(REGISTER_BUDGET, (reg_oc * reg_px + reg_oc + reg_px) * max(1, itemsize // 4) + 60)


def estimated_seconds(geometry, config: StripConfig) -> float:
    """A planning estimate (not the audit): issued instructions per thread from the kernel's
    structure, with per-step costs read from its SASS at the suite shapes (about 8 per staged
    input vector, 9 per weight vector, ``RO*RP + (RO+RP)/4 + 0.6`` per rank-1 update (``CC/KS``
    of them per chunk), 45 per chunk for its barriers and loop, 2 per stencil FFMA and 1 per
    mask (in one group of ``KS``), 8.5 per output for the prologue and epilogue, and with
    ``KS > 1`` 1.5 per output and group for the combine) through the house's issue-slot
    model (``perf.sass.issue_model``)."""
    g = geometry
    chunks = math.ceil(g.channels / config.chunk)
    steps_in, steps_w = staging_steps(g, config)
    ro, rp = config.reg_oc, config.reg_px
    ks = config.ksplit
    per_chunk = 8 * steps_in + 9 * steps_w + 45 + config.chunk / ks * (ro * rp + (ro + rp) / 4 + 0.6)
    outputs = ro * rp
    off_centre = [tuple(tap) for tap in g.taps if tuple(tap) != (0, 0)]
    aligned = g.width % rp == 0  # the row masks fold into the weights; edges only at a thread's ends
    vertical = sum(1 for dy, _ in off_centre if dy) if (g.height * g.width) % config.strip and not aligned else 0
    horizontal = sum(1 for _, dx in off_centre if dx) if not aligned else 0
    stencil = outputs * (2 * len(off_centre) + vertical + horizontal) / ks
    combine = 1.5 * outputs * (ks - 1)
    per_thread = chunks * per_chunk + stencil + combine + 8.5 * outputs
    strips, oc_blocks, images = config.blocks(g)
    model = sass.issue_model({"all": per_thread}, strips * oc_blocks * images, config.threads,
                             estimated_registers_for(ro, rp, np.dtype(g.dtype).itemsize), config.shared_bytes(g))
    return model["seconds"]


def default_config(geometry) -> StripConfig:
    """``SIMULATOR_CONFIG`` in the simulator; on the GPU the audited pick of a bench-suite layer
    (``AUDITED_PICKS``), else the candidate with the least ``estimated_seconds`` (a
    prediction; ``python -m deftnumba.lean.audit`` checks a choice in SASS)."""
    if backend.IS_SIMULATOR:
        return SIMULATOR_CONFIG
    picked = AUDITED_PICKS.get(pick_key(geometry))
    if picked is not None:
        return picked
    return _best_config(geometry.batch, geometry.channels, geometry.height, geometry.width, geometry.dtype,
                        tuple(geometry.taps))


@functools.lru_cache(maxsize=256)
def _best_config(batch, channels, height, width, dtype, taps) -> StripConfig:
    g = SimpleNamespace(batch=batch, channels=channels, height=height, width=width, dtype=dtype, taps=taps,
                        itemsize=np.dtype(dtype).itemsize)
    return min(candidates(g), key=lambda config: (estimated_seconds(g, config), -config.strip))


