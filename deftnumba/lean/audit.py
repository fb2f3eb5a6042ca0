"""The SASS audit applied to the lean forward: per suite shape, the fused kernel's predicted
issue-bound time against the layer's roofline floor (issue 15's static targets).

    DEFTNUMBA_BACKEND=cuda python -m deftnumba.lean.audit [--json data/lean/static_audit.json] [--search K]

At stride 1 ``lean_conv2d(method="fused")`` launches ``kernels/strip.py`` at the
configuration ``planning.default_config`` picks; this compiles that kernel for sm_90 with
numba-cuda's real compiler (NVVM, nvJitLink, ``nvdisasm``; no GPU), attributes its SASS to
the kernel's ``# phase:`` marks and runs the house's issue-slot model (``perf/sass.py``:
the model the DCN audit uses, with the strip module's ``phase_model`` and ``phase_steps``).
``lat. us`` adds the clocks one warp spends waiting on its own loads, from ptxas's scheduling
controls and assumed latencies (``perf.sass.stall_charges``). Everything it reports about time
is a **prediction** from static instruction counts, never a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..perf import sass
from . import bench_op, planning, roofline
from .kernels import strip


def signature(dtype: str = "float32") -> tuple:
    """The strip kernel's argument types (flat C-contiguous arrays, int32 sizes)."""
    from numba import types

    a1 = types.Array(getattr(types, dtype), 1, "C")
    return (a1, a1, types.int32, a1, a1, a1, types.int32, types.int32)


def model_layer(g, config=None) -> dict:
    """The fused forward of lean layer ``g`` (stride 1) through the issue-slot model: a dict with
    the config, registers, spills, per-phase rows, the pointwise loop's FFMA share and the
    predicted and floor times (microseconds)."""
    if (g.stride_h, g.stride_w) != (1, 1):
        raise ValueError(f"the strip kernel runs stride 1 only, got stride {(g.stride_h, g.stride_w)}")
    config = config or planning.default_config(g)
    kernel = strip.strip_kernel(g.dtype, tuple(g.taps), g.height, g.width, config, g.has_bias)
    strips, oc_blocks, images = config.blocks(g)
    blocks = strips * oc_blocks * images
    a = sass.audit_kernel(kernel, signature(g.dtype), "lean.strip", str(g.dtype))
    # per source step of phase_model: a staging vector, a rank-1 update (however unrolled)
    counts = sass.normalise_steps(a.phases, strip.phase_steps(config))
    iterations = strip.phase_model(g, config)
    per_thread = sass.per_thread_instructions(counts, iterations)
    cycles = sass.per_thread_cycles(counts, iterations)  # one warp alone, its stalls included
    model = sass.issue_model(per_thread, blocks, config.threads, a.registers, a.shared_bytes or 0, cycles=cycles)
    phases = []
    for name, count in counts.items():
        it = iterations.get(name, 0)
        body_it, runs = it if isinstance(it, (tuple, list)) else (it, 1)
        phases.append({"phase": name, "body": round(count.body, 2), "iterations": body_it,
                       "straight": count.straight, "straight_runs": runs, "per_thread": per_thread[name],
                       "body_ffma_%": round(100 * count.body_ffma / count.body, 1) if count.body else 0.0,
                       "body_lds_bits": "/".join(sorted(count.body_lds_widths, key=int)) or "-",
                       "predicted_us": 1e6 * model["phases_s"].get(name, 0.0)})
    pointwise = next(p for p in phases if p["phase"] == "pointwise")
    floor_us = roofline.floor_ms(g, "fused", "fwd") * 1e3
    predicted_us = model["seconds"] * 1e6
    return {"config": config, "registers": a.registers, "spill_bytes": a.spill_bytes,
            "shared_bytes": a.shared_bytes, "blocks": blocks, "threads": config.threads,
            "waves": model.get("waves"), "blocks_per_sm": model.get("blocks_per_sm"),
            "pointwise_ffma_percent": pointwise["body_ffma_%"], "pointwise_lds_bits": pointwise["body_lds_bits"],
            "phases": [{k: p[k] for k in ("phase", "body", "iterations", "straight", "straight_runs", "per_thread",
                                          "predicted_us")} for p in phases],
            "f64": a.f64, "local": a.local, "predicted_us": predicted_us, "floor_us": floor_us,
            "ratio": predicted_us / floor_us,
            # with one warp's stalls (perf.sass.stall_charges, assumed latencies): also a prediction
            "latency_us": None if model.get("latency_seconds") is None else model["latency_seconds"] * 1e6,
            "one_warp_clocks": {name: round(v) for name, v in (cycles or {}).items()}}


def search(g, top: int = 8) -> list:
    """Audit the ``top`` candidates ``planning.estimated_seconds`` ranks first for layer ``g`` and
    return ``(ratio, issue ratio, config)``, best first: how ``strip.AUDITED_PICKS`` is made.
    ``ratio`` is the larger of the two estimates, issue slots and one warp's stalls
    (``latency_us``, never below the other), over the floor: a pick that one block of 8 warps
    per SM leaves waiting on its loads loses to one whose SMs hold several blocks (session 38:
    56x56x64 at 1.53x with stalls, re-picked at 1.21x). ``issue ratio`` is issue 15's target
    figure (issue slots alone), which a pick must still meet. A candidate that does not
    compile, or spills to local memory, is skipped (and said so)."""
    ranked = sorted(planning.candidates(g), key=lambda c: planning.estimated_seconds(g, c))[:top]
    rows = []
    for i, config in enumerate(ranked):
        print(f"  [{i + 1}/{len(ranked)}] {config}", file=sys.stderr, flush=True)
        try:
            r = model_layer(g, config)
        except RuntimeError as e:  # the compiler cannot build it (an nvJitLink or NVVM failure)
            print(f"  skipped, it does not compile: {str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
            continue
        if r["spill_bytes"] or r["local"]:  # the house's discipline: no local memory in a kernel
            print(f"  skipped, it spills ({r['spill_bytes']} bytes; {r['local']} local accesses)", file=sys.stderr,
                  flush=True)
            continue
        rows.append((sass.larger_estimate_us(r) / r["floor_us"], r["ratio"], config))
    return sorted(rows, key=lambda r: r[0])


def target_figures(shapes=None) -> dict:
    """JSON-ready figures of every suite shape (``bench_op.suites()``), for the target tests
    and the notebook. Run with the cuda backend (a compiler process)."""
    out = {"label": "static predictions (sm_90 SASS, H200 leads); nothing here is measured", "suites": {}}
    suites = bench_op.suites()
    for i, name in enumerate(shapes or suites):
        print(f"[{i + 1}/{len(shapes or suites)}] {name}", file=sys.stderr, flush=True)
        r = model_layer(bench_op.geometry(suites[name]))
        c = r.pop("config")
        r["config"] = {"strip": c.strip, "chunk": c.chunk, "oc_block": c.oc_block, "reg_oc": c.reg_oc,
                       "reg_px": c.reg_px, "ksplit": c.ksplit}
        out["suites"][name] = r
    return out


def _us(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--search", type=int, metavar="K",
                        help="instead: audit the estimate's K best configurations at every suite shape and "
                             "print the best (strip.AUDITED_PICKS)")
    args = parser.parse_args(argv)
    from ..runtime import backend

    if backend.IS_SIMULATOR:
        parser.error("the audit compiles real sm_90 code: run it with DEFTNUMBA_BACKEND=cuda (no GPU needed), "
                     "not in the simulator")
    if args.search:
        for name, shape in bench_op.suites().items():
            g = bench_op.geometry(shape)
            rows = search(g, args.search)
            for ratio, issue_ratio, config in rows:
                print(f"{name}: {ratio:.3f}x the floor (the larger estimate), "
                      f"{issue_ratio:.3f}x by issue slots  {config}")
            print(f"best for {strip.pick_key(g)}: {rows[0][2]!r}")
        return 0
    figures = target_figures()
    print(f"lean fused forward (strip kernel), fp32, sm_90: {figures['label']}")
    print(f"{'shape':>10} {'config (strip,chunk,OCB,RO,RP,KS)':>33} {'regs':>4} {'FFMA%':>6} "
          f"{'predicted us':>12} {'lat. us':>8} {'floor us':>8} {'ratio':>6}")
    for name, r in figures["suites"].items():
        c = r["config"]
        config = f"{c['strip']},{c['chunk']},{c['oc_block']},{c['reg_oc']},{c['reg_px']},{c['ksplit']}"
        print(f"{name:>10} {config:>33} {r['registers']:>4} {r['pointwise_ffma_percent']:>6.1f} "
              f"{r['predicted_us']:>12.2f} {_us(r['latency_us']):>8} {r['floor_us']:>8.2f} {r['ratio']:>6.2f}")
        print("           " + ", ".join(f"{p['phase']} {p['predicted_us']:.2f}" for p in r["phases"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
