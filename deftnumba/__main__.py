"""Command line: ``python -m deftnumba {info,demo,audit,ptx,bench}``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def _info(args) -> int:
    from .runtime import backend

    for key, value in backend.device_info().items():
        print(f"{key:>20}: {value}")
    return 0


def _demo(args) -> int:
    from . import METHODS
    from .dcn import demo

    methods = list(METHODS) if args.method == "all" else [args.method]
    passed = True
    for i, method in enumerate(methods):
        result = demo.run(method=method, seed=args.seed)
        print(("\n" if i else "") + demo.format_result(result))
        passed &= result["passed"]
    return 0 if passed else 1


def _ptx(args) -> int:
    if os.environ.get("DEFTNUMBA_BACKEND") != "cuda":
        # The audit needs numba-cuda's real compiler, never the simulator.
        env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        return subprocess.call([sys.executable, "-m", "deftnumba", "ptx"] + (["--json"] if args.json else []), env=env)
    from .perf import audit as ptx

    def progress(i, n, name):
        print(f"[{i}/{n}] compiling {name}", file=sys.stderr, flush=True)

    reports = ptx.audit(report=None if args.json else progress)
    if args.json:
        print(json.dumps([r.__dict__ for r in reports]))
        return 0
    print(PTX_HEADER)
    width = max([len("kernel")] + [len(r.kernel) for r in reports])
    head = (f"{'kernel':<{width}} {'dtype':<8} {'PTX lines':>9} {'f64 ops':>8} {'local mem':>9} "
            f"{'regs':>5} {'spill B':>8} {'smem B':>7}")
    print(head)
    print("-" * len(head))
    bad = 0
    for r in reports:
        print(f"{r.kernel:<{width}} {r.dtype:<8} {r.lines:>9} {r.f64_instructions:>8} {str(r.uses_local_memory):>9} "
              f"{r.registers if r.registers is not None else '?':>5} "
              f"{r.spill_bytes if r.spill_bytes is not None else '?':>8} "
              f"{r.shared_bytes if r.shared_bytes is not None else '?':>7}")
        bad += r.dtype == "float32" and r.f64_instructions > 0
    print(f"{len(reports)} kernels compiled for sm_90; float32 kernels with float64 instructions: {bad}")
    return 1 if bad else 0


PTX_HEADER = """\
PTX audit, sm_90 (static; compiled with numba-cuda's NVVM and ptxas through nvJitLink; no GPU).
f64 ops: float64 instructions in the PTX (must be 0 for float32 kernels). local mem: the PTX
uses .local (spills or runtime-indexed arrays). regs, spill B: ptxas's figures per thread.
smem B is ptxas's figure: the kernel's static shared memory plus the 1 KB (1024 B) per block
that sm_80+ reserves for the system, so a kernel at the 48 KB static limit (49,152 B) reads
50,176 B here. `python -m deftnumba audit` reads the SASS (occupancy, load widths)."""


def _audit(args) -> int:
    if os.environ.get("DEFTNUMBA_BACKEND") != "cuda":
        # The audit needs numba-cuda's real compiler (no GPU), never the simulator.
        from .dcn.audit import env_for_compiler

        return subprocess.call([sys.executable, "-m", "deftnumba"] + args.argv, env=env_for_compiler())
    from .dcn import audit as dcn_audit

    return dcn_audit.main(args)


def _bench(args) -> int:
    if getattr(args, "training", False):
        from .dcn import training

        return training.main(args)
    from .bench import harness as bench

    return bench.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deftnumba", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("info", help="backend, device, versions, CUDA capability").set_defaults(run=_info)
    demo = sub.add_parser("demo", help="run one DCN layer, check it, time each operator")
    demo.add_argument("--method", default="all",
                      help="'all' (default: every method, one after another), 'auto', or one method")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    audit = sub.add_parser("audit", help="compile every kernel for sm_90 and audit its SASS (no GPU needed); "
                                         "--layer models a suite shape's launches (predictions)")
    audit.add_argument("--kernels", metavar="TEXT", help="only kernels whose name contains TEXT")
    audit.add_argument("--layer", action="append", metavar="SHAPE",
                       help="issue-slot model of a suite shape (deft64, res128, det-c4, det-c5, or all); repeatable")
    audit.add_argument("--method", default="fused",
                       choices=["fused", "im2col", "fused_columns", "all", "bwd-fused", "bwd-fused_deterministic",
                                "bwd-fused_columns", "bwd-im2col", "bwd-deterministic", "bwd-all", "everything"],
                       help="method(s) modelled for --layer (default fused): forward methods, 'all' (every "
                            "forward), backward 'bwd-NAME', 'bwd-all' (every backward kernel), 'everything'")
    audit.add_argument("--tile", metavar="TH,TW,HALO,CHUNK,OCB,RO,RP",
                       help="model this fused TileConfig instead of the planner's")
    audit.add_argument("--csv", metavar="PATH", help="also write the tables as CSV")
    audit.add_argument("--json", action="store_true", help="print the kernel audits as JSON")
    audit.add_argument("--planner-table", nargs="?", const=True, default=None, metavar="PATH",
                       help="measure the fused kernel's per-phase counts for the planner and write "
                            "deftnumba/data/fused_phase_counts.json (or PATH)")
    audit.set_defaults(run=_audit)
    ptx = sub.add_parser("ptx", help="compile every kernel to PTX (no GPU needed) and audit it "
                                     "(the PTX-level table; `audit` reads the SASS)")
    ptx.add_argument("--json", action="store_true")
    ptx.set_defaults(run=_ptx)
    bench = sub.add_parser("bench", help="time every method on the suite shapes; CSV + chart "
                                         "(a simulator smoke run without a GPU)",
                           description="Time every method x suite shape x pass of an op (CUDA events, L2 "
                                       "flushed between runs, TF32 off) and write a CSV with provenance and a "
                                       "speedup chart to data/bench/<op>/. Without a GPU it is a labelled "
                                       "simulator smoke run on tiny shapes, written to build/bench-smoke/: "
                                       "a check that everything runs, not a speed measurement.")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options live in deftnumba.bench (importing it picks the backend)
        from .bench.harness import add_arguments

        add_arguments(bench)
        bench.add_argument("--training", action="store_true",
                           help="time training steps of a DCN ResNet-50 per variant (conv, torchvision, "
                                "deftnumba) instead of single layers; --method picks variants, --reps steps")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
