"""The SASS audit applied to the Tucker kernels: per suite shape, each kernel's predicted
issue-bound time from its compiled sm_90 code, against the layer's roofline floor (issue 14's
static targets).

    DEFTNUMBA_BACKEND=cuda python -m deftnumba.tucker.audit [--json data/tucker/static_audit.json]
                                                          [--shapes r18-l1a-n32 ...] [--search K]

``tucker.model`` ranks tiles with per-iteration instruction formulas (fast enough for
``choose_ranks``' sweeps). This module checks its picks the slow, exact way: it compiles
the picked ``fused`` and ``core_conv`` kernels (and ``fused_winograd`` where
``model.AUDITED_PICKS`` has a tile for it) with numba-cuda's real compiler (NVVM,
nvJitLink, ``nvdisasm``; no GPU), attributes their SASS to the kernels' ``# phase:`` marks
and runs the house's issue-slot model (``perf/sass.py``, the model the DCN and lean audits
use) with the kernel modules' ``sass_iterations`` and ``phase_steps``. Every time it
prints is a **prediction** from static instruction counts, never a measurement.

``three_pass`` is our core-conv kernel between two cuBLAS GEMMs; the GEMMs are not our SASS,
so its row adds them at the vendor rate ``tucker.model`` assumes (labelled). ``winograd`` is the
same with the Winograd F(2x2, 3x3) core conv (``kernels/winograd.py``); its ratio is to the
same floor, whose FLOPs are the direct convolution's (the Winograd core multiplies 2.25x fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..perf import sass
from ..perf.roofline import floor_ms_of
from . import bench_op, model, roofline
from .kernels import core_conv, fused, fused_winograd, winograd

TARGET_SHAPES = tuple(f"r18-{layer}-n32" for layer in ("l1a", "l1b", "l2a", "l2b", "l3a", "l3b", "l4a", "l4b"))
"""Issue 14's static target shapes: TDC's ResNet-18 layers at batch 32 (at batch 1 the small
layers have fewer output tiles than the H200 has SMs; the JSON covers them too)."""
LABEL = "static predictions (sm_90 SASS, H200 leads); nothing here is measured"


def _signature(kernel: str, dtype: str) -> tuple:
    from numba import types

    a = types.Array(getattr(types, dtype), 1, "C")
    i32 = types.int32
    if kernel in ("fused", "fused_winograd"):
        return (a, a, a, a, a, a, i32, i32, i32, i32)
    if kernel == "winograd":  # (..., partials, counters, sizes, tiles_total)
        return (a, a, a, a, types.Array(types.uint32, 1, "C"), i32, i32, i32, i32, i32)
    return (a, a, a, a, types.Array(types.uint32, 1, "C"), i32, i32, i32, i32)  # (..., partials, counters, sizes)


def _compiled(kernel: str, g, t):
    if kernel == "fused_winograd":
        return fused_winograd.fused_winograd_kernel(g.dtype, g.in_channels, g.rank_in, g.rank_out, g.out_channels,
                                                    g.pad_h, g.pad_w, t)
    if kernel == "winograd":
        return winograd.winograd_kernel(g.dtype, g.rank_in, g.rank_out, g.pad_h, g.pad_w, t)
    if kernel == "fused":
        return fused.fused_kernel(g.dtype, g.in_channels, g.rank_in, g.rank_out, g.out_channels, g.kernel_h,
                                  g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, t)
    return core_conv.core_conv_kernel(g.dtype, g.rank_in, g.rank_out, g.kernel_h, g.kernel_w, g.stride_h,
                                      g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, t, core_conv.whole_rows(g, t))


def model_kernel(g, kernel: str, config, ptx: str | None = None) -> dict:
    """One launch of our ``kernel`` (``"fused"`` or ``"core_conv"``) at tile ``config`` for layer
    ``g`` through the issue-slot model: registers, occupancy, per-phase instructions per thread,
    the main loop's FFMA share and the predicted time in microseconds (a prediction). With
    ``ptx`` (from ``compile_variants``), that compile of the kernel."""
    mod = {"fused": fused, "core_conv": core_conv, "winograd": winograd, "fused_winograd": fused_winograd}[kernel]
    a = sass.audit_kernel(_compiled(kernel, g, config), _signature(kernel, str(g.dtype)), f"tucker.{kernel}",
                          str(g.dtype), ptx=ptx)
    counts = sass.normalise_steps(a.phases, mod.phase_steps(g, config))
    iterations = mod.sass_iterations(g, config)
    per_thread = sass.per_thread_instructions(counts, iterations)
    cycles = sass.per_thread_cycles(counts, iterations)
    if kernel in ("fused", "fused_winograd"):
        lay = config.layout(g)
        threads = lay.threads
        blocks = -(-g.out_h // config.tile_h) * -(-g.out_w // config.tile_w) * g.batch
    elif kernel == "winograd":
        threads = config.threads
        gx, gy = config.grid(g)
        blocks = gx * gy
    else:
        threads = config.threads
        tiles, rank_blocks, images = config.blocks(g)
        blocks = tiles * rank_blocks * images
    issue = sass.issue_model(per_thread, blocks, threads, a.registers, a.shared_bytes or 0, cycles=cycles)
    loops = {name: c for name, c in counts.items() if c.body_ffma}
    ffma = {name: round(100 * c.body_ffma / c.body, 1) for name, c in loops.items() if c.body}
    return {"kernel": kernel, "config": model._tag(config), "registers": a.registers,
            "spill_bytes": a.spill_bytes, "shared_bytes": a.shared_bytes, "threads": threads, "blocks": blocks,
            "blocks_per_sm": issue.get("blocks_per_sm"), "waves": issue.get("waves"),
            "ffma_percent": ffma, "f64": a.f64,
            "phases": {name: {"per_thread": round(per_thread[name], 1),
                              "predicted_us": round(1e6 * issue["phases_s"].get(name, 0.0), 3)}
                       for name in counts},
            "instructions_per_thread": round(sum(per_thread.values())),
            "predicted_us": 1e6 * issue["seconds"],
            "one_warp_clocks": {name: round(v) for name, v in (cycles or {}).items()},
            "latency_us": 1e6 * issue["latency_seconds"] if "latency_seconds" in issue else None}


def floor_us(g, method: str = "fused") -> float:
    """The roofline floor of ``method``'s operators (fp32 leads of the H200), microseconds."""
    return 1e3 * sum(floor_ms_of(o.flops, o.bytes, dtype=str(g.dtype)) for o in roofline.operators(g, method))


def _between_gemms(g, core: dict, floor: float) -> dict:
    """A core-conv kernel's row plus the two 1x1 GEMMs at the vendor rate ``tucker.model``
    assumes (labelled ``gemms_us_assumed``), and the sum's ratio to ``floor``. (For the
    Winograd core the floor's FLOPs stay the direct convolution's: it multiplies 2.25x fewer.)"""
    first, _, last = roofline.operators(g, "three_pass")
    gemms_us = 1e3 * model._vendor_ms([first, last], model.H200)
    latency = core.get("latency_us")
    return {"core_conv": core, "gemms_us_assumed": gemms_us, "predicted_us": core["predicted_us"] + gemms_us,
            "ratio": (core["predicted_us"] + gemms_us) / floor,
            "latency_us": None if latency is None else latency + gemms_us}


def model_layer(g) -> dict:
    """Our methods at ``tucker.model``'s picked tiles: ``fused`` (one kernel), ``three_pass``
    and ``winograd`` (our direct or Winograd core conv audited, plus the two GEMMs at the
    assumed vendor rate); each with its predicted time and its ratio to the fused
    (minimal-bytes) floor."""
    floor = floor_us(g, "fused")
    out = {"floor_us": floor}
    fused_pick = model.rank_configs(g, "fused", top=1)
    if fused_pick:
        r = model_kernel(g, "fused", fused_pick[0].config)
        r["hand_model_us"] = 1e3 * fused_pick[0].ms
        r["ratio"] = r["predicted_us"] / floor
        out["fused"] = r
    for method, kernel in (("three_pass", "core_conv"), ("winograd", "winograd")):
        pick = model.rank_configs(g, method, top=1)
        if pick:
            out[method] = _between_gemms(g, model_kernel(g, kernel, pick[0].config), floor)
    # `fused_winograd` where it has an audited pick (no formulas rank its tiles yet)
    pick = model.AUDITED_PICKS.get(model.pick_key(g), {}).get("fused_winograd")
    if pick is not None:
        r = model_kernel(g, "fused_winograd", pick)
        r["ratio"] = r["predicted_us"] / floor
        out["fused_winograd"] = r
    return out


def compile_variants(g, times: int) -> dict:
    """Each picked kernel of layer ``g`` compiled ``times`` times by NVVM from the same IR
    (``sass.ptx_variants``): ``{kernel: [(predicted us, compiles), ...]}``, fastest first.
    One entry where NVVM was deterministic; more where a GPU run may get either."""
    out = {}
    for method, kernel in (("fused", "fused"), ("three_pass", "core_conv"), ("winograd", "winograd")):
        pick = model.rank_configs(g, method, top=1)
        if not pick:
            continue
        variants = sass.ptx_variants(_compiled(kernel, g, pick[0].config), _signature(kernel, str(g.dtype)), times)
        out[kernel] = sorted((model_kernel(g, kernel, pick[0].config, ptx)["predicted_us"], n)
                             for ptx, n in variants.items())
    pick = model.AUDITED_PICKS.get(model.pick_key(g), {}).get("fused_winograd")
    if pick is not None:
        variants = sass.ptx_variants(_compiled("fused_winograd", g, pick), _signature("fused_winograd", str(g.dtype)),
                                     times)
        out["fused_winograd"] = sorted((model_kernel(g, "fused_winograd", pick, ptx)["predicted_us"], n)
                                       for ptx, n in variants.items())
    return out


def search(g, method: str, top: int = 8) -> list:
    """Audit the ``top`` tiles ``tucker.model`` ranks first for ``method`` (``"fused"``,
    ``"three_pass"``, ``"winograd"`` or ``"fused_winograd"``; for the Winograd methods, their
    ``4 * top`` best) at layer ``g``, and, among tiles that divide the image, the formulas'
    best of each (tile, register block, rank block) shape, up to ``3 * top`` of them: the
    formulas undervalue large register blocks on small images (at layer4 the best audited
    core-conv tile, 7x7 with 4x7 outputs per thread, is not among their first ten 7x7
    tiles). Today's pick (``model.AUDITED_PICKS``, often a tile added by hand) is audited
    with them. Returns ``(us, tile, issue us, multiply FFMA %)``, best first by ``us``, the
    larger of the two estimates (issue slots, and one warp's stalls: ``sass.larger_estimate_us``;
    session 37 re-picked `winograd` at layers 3-4 so): how ``model.AUDITED_PICKS`` is made. The
    issue-slot time and the multiply loop's FFMA share are issue 14's target figures, which a
    pick must still meet (session 38: the `fused` tiles that wait least at layers 3-4 do not)."""
    kernel = {"fused": "fused", "three_pass": "core_conv", "winograd": "winograd",
              "fused_winograd": "fused_winograd"}[method]

    def audited(t):
        r = model_kernel(g, kernel, t)
        return sass.larger_estimate_us(r), t, r["predicted_us"], r["ffma_percent"].get("multiply")
    ranked = [p.config for p in model.rank_configs(g, method, audited=False)]
    if method in ("winograd", "fused_winograd"):  # (the formulas' best, and today's pick)
        current = model.AUDITED_PICKS.get(model.pick_key(g), {}).get(method)
        chosen = list(dict.fromkeys(([current] if current is not None else []) + ranked[:4 * top]))
        rows = []
        for i, t in enumerate(chosen):
            print(f"  [{i + 1}/{len(chosen)}] {method} {model._tag(t)}", file=sys.stderr, flush=True)
            try:
                rows.append(audited(t))
            except Exception as e:  # noqa: BLE001  (as below: a tile the compiler cannot build is skipped)
                print(f"  does not compile, skipped: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        return sorted(rows, key=lambda r: (r[0], r[2]))  # (ties: the fewer issue slots first)
    fitting = set(model._fitting_tiles(g))
    shapes = {}  # the formulas' best tile of each shape that divides the image
    for t in ranked:
        if (t.tile_h, t.tile_w) in fitting:
            shapes.setdefault((t.tile_h, t.tile_w, t.reg_oc, t.reg_px, getattr(t, "oc_block", 0),
                               getattr(t, "splits", 1)), t)
    current = model.AUDITED_PICKS.get(model.pick_key(g), {}).get(method)  # today's pick, if any: ...
    chosen = ([current] if current is not None else []) + ranked[:top] + list(shapes.values())[:3 * top]
    chosen = list(dict.fromkeys(chosen))  # ... audited too, so the best printed is the best known
    rows = []
    for i, t in enumerate(chosen):
        print(f"  [{i + 1}/{len(chosen)}] {method} {model._tag(t)}", file=sys.stderr, flush=True)
        try:
            rows.append(audited(t))
        except Exception as e:  # noqa: BLE001  a tile the compiler cannot build is skipped, and said so
            # (seen once: NVVM emitted PTX that branches to an undefined label, ptxas "Unknown symbol")
            print(f"  does not compile, skipped: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: (r[0], r[2]))  # (ties: the fewer issue slots first)


def target_figures(shapes=None) -> dict:
    """JSON-ready figures for the suite shapes (default: every full-layer shape of
    ``bench_op.suites()``). Run with the cuda backend (a compiler process)."""
    suites = bench_op.suites()
    names = shapes or [n for n, s in suites.items() if not s.get("core_only")]
    out = {"label": LABEL, "suites": {}}
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr, flush=True)
        out["suites"][name] = model_layer(bench_op.geometry(suites[name]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--shapes", nargs="*", help="suite shapes (default: every full layer)")
    parser.add_argument("--search", type=int, metavar="K",
                        help="instead: audit the hand model's K best tiles per method and shape, and its best "
                             "of each image-dividing shape (up to 3K), and print the best (model.AUDITED_PICKS)")
    parser.add_argument("--methods", nargs="*", default=["fused", "three_pass", "winograd"],
                        help="with --search: the methods to search (default: all three; fused_winograd too on request)")
    parser.add_argument("--variants", type=int, metavar="N",
                        help="instead: compile each pick N times through NVVM (the same IR; NVVM is not "
                             "deterministic) and print the predicted time of every distinct compile")
    args = parser.parse_args(argv)
    from ..runtime import backend

    if backend.IS_SIMULATOR:
        parser.error("the audit compiles real sm_90 code: run it with DEFTNUMBA_BACKEND=cuda (no GPU needed), "
                     "not in the simulator")
    if args.search:
        suites = bench_op.suites()
        for name in args.shapes or [n for n, s in suites.items() if not s.get("core_only")]:
            g = bench_op.geometry(suites[name])
            for method in args.methods:
                rows = search(g, method, args.search)
                for us, t, issue_us, ffma in rows:
                    # (no multiply phase in the SASS: NVVM merged it into another, and the figures are suspect)
                    loop = f"multiply {ffma}% FFMA" if ffma is not None else "NO multiply phase (suspect)"
                    print(f"{name} {method}: {us:9.2f} us (the larger estimate), {issue_us:.2f} by issue slots, "
                          f"{loop}  {t!r}")
                if rows:
                    print(f"best {method} for {model.pick_key(g)}: {rows[0][1]!r}", flush=True)
        return 0
    if args.variants:
        suites = bench_op.suites()
        names = args.shapes or [n for n, s in suites.items() if not s.get("core_only")]
        print(f"Tucker forward, fp32, sm_90, {args.variants} NVVM compiles of each pick: {LABEL}")
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr, flush=True)
            for kernel, rows in compile_variants(bench_op.geometry(suites[name]), args.variants).items():
                found = ", ".join(f"{us:.2f} us ({n} of {args.variants})" for us, n in rows)
                print(f"{name:>12} {kernel:>9}: {found}", flush=True)
        return 0
    figures = target_figures(args.shapes)
    print(f"Tucker forward, fp32, sm_90: {figures['label']}")
    print(f"{'shape':>12} {'floor us':>8} {'bound':>5} | {'fused us':>8} {'ratio':>5} {'lat. us':>7} {'regs':>4} "
          f"{'FFMA% (loops)':>22} {'hand us':>7} | {'3-pass us':>9} {'ratio':>5} {'lat. us':>7} | "
          f"{'winograd':>8} {'ratio':>5} {'lat. us':>7}")

    def lat(row):
        return f"{row['latency_us']:7.2f}" if row.get("latency_us") is not None else f"{'-':>7}"

    suites = bench_op.suites()
    for name, r in figures["suites"].items():
        f, t = r.get("fused"), r.get("three_pass")
        bound = model.fused_bound(bench_op.geometry(suites[name])).ratio
        ffma = ",".join(f"{k[:5]} {v:.0f}" for k, v in f["ffma_percent"].items()) if f else "-"
        print(f"{name:>12} {r['floor_us']:8.2f} {bound:5.2f} | "
              + (f"{f['predicted_us']:8.2f} {f['ratio']:5.2f} {lat(f)} {f['registers']:>4} {ffma:>22} "
                 f"{f['hand_model_us']:7.2f} | " if f else f"{'-':>8} {'-':>5} {'-':>7} {'-':>4} {'-':>22} {'-':>7} | ")
              + (f"{t['predicted_us']:9.2f} {t['ratio']:5.2f} {lat(t)}" if t else f"{'-':>9} {'-':>5} {'-':>7}")
              + (f" | {r['winograd']['predicted_us']:8.2f} {r['winograd']['ratio']:5.2f} {lat(r['winograd'])}"
                 if "winograd" in r else ""))
    for name, r in figures["suites"].items():
        if "fused_winograd" in r:
            fw = r["fused_winograd"]
            print(f"{name:>12} fused_winograd (one launch, Winograd core) at its audited pick: "
                  f"{fw['predicted_us']:.2f} us, {fw['ratio']:.2f}x the floor, with stalls {lat(fw).strip()} us")
    print("bound: model.fused_bound over the floor, the least any one-launch fused kernel of this design "
          "could reach (only useful FFMAs at the full issue rate; halo and grid quantisation counted)")
    print("lat.: the same kernels where a warp also waits for its loads (perf.sass.stall_charges: ptxas's stall "
          "counts and assumed load latencies), hidden only by the warps resident beside it")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
