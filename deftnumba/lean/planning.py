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
from .kernels.strip import (AUDITED_PICKS, REGISTER_BUDGET, SIMULATOR_CONFIG, STATIC_SHARED_LIMIT, StripConfig,
                            pick_key, staging_steps)

MAX_STAGING_STEPS = 8


def candidates(geometry):
    """The configurations ``default_config`` chooses from: 8x8, 8x4 or 4x4 outputs per
    thread (8x4 at most in float64, whose accumulators take two registers each); 16 to 512
    output channels per block (never more than C rounded up to 16); strips of any whole
    number of thread columns up to 1024 threads; the largest channel chunk
    (32, 16 or 8) whose static shared memory fits 48 KB and whose input staging takes at most
    ``MAX_STAGING_STEPS`` vectors per thread and chunk."""
    c16 = -(-geometry.channels // 16) * 16
    wide = np.dtype(geometry.dtype).itemsize > 4  # float64: an accumulator takes two registers
    for reg_oc, reg_px in ((8, 8), (8, 4), (4, 4)):
        if wide and reg_oc * reg_px > 32:
            continue
        for oc_block in (512, 256, 128, 64, 32, 16):
            if oc_block > c16:
                continue
            for px_threads in range(1, 129):
                threads = (oc_block // reg_oc) * px_threads
                registers = estimated_registers_for(reg_oc, reg_px, np.dtype(geometry.dtype).itemsize)
                if threads > 1024 or threads * registers > 65536:
                    continue
                for chunk in (32, 16, 8):
                    config = StripConfig(strip=px_threads * reg_px, chunk=chunk, oc_block=oc_block, reg_oc=reg_oc,
                                         reg_px=reg_px)
                    # at most MAX_STAGING_STEPS unrolled copy steps per chunk: beyond that the
                    # SASS audit saw ptxas recompute addresses in every step (3 -> 14 instructions)
                    if (config.shared_bytes(geometry) <= STATIC_SHARED_LIMIT
                            and (chunk == 8 or staging_steps(geometry, config)[0] <= MAX_STAGING_STEPS)):
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
    input vector, 9 per weight vector, ``RO*RP + (RO+RP)/4 + 0.6`` per rank-1 update, 45 per
    chunk for its barriers and loop, 2 per stencil FFMA and 1 per mask, 8.5 per output for the
    prologue and epilogue) through the house's issue-slot model (``perf.sass.issue_model``)."""
    g = geometry
    chunks = math.ceil(g.channels / config.chunk)
    steps_in, steps_w = staging_steps(g, config)
    ro, rp = config.reg_oc, config.reg_px
    per_chunk = 8 * steps_in + 9 * steps_w + 45 + config.chunk * (ro * rp + (ro + rp) / 4 + 0.6)
    outputs = ro * rp
    off_centre = [tuple(tap) for tap in g.taps if tuple(tap) != (0, 0)]
    aligned = g.width % rp == 0  # the row masks fold into the weights; edges only at a thread's ends
    vertical = sum(1 for dy, _ in off_centre if dy) if (g.height * g.width) % config.strip and not aligned else 0
    horizontal = sum(1 for _, dx in off_centre if dx) if not aligned else 0
    per_thread = chunks * per_chunk + outputs * (2 * len(off_centre) + vertical + horizontal + 8.5)
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


