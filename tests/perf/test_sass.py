"""The SASS audit (``deftnumba.perf.sass``): parsing, loops, phases, the issue-slot model, the
compiled int32/int64 contrast, and the planner's table of measured counts.

Parsing and the model run on a captured listing and fixed numbers (no compiler). The
compiled checks run once per test run, in one subprocess with the cuda backend (numba-cuda's
compiler, nvJitLink and nvdisasm, no GPU): a compile job of tests/conftest.py.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deftnumba.dcn import audit as layer_audit
from deftnumba.perf import sass

HERE = Path(__file__).resolve().parent
SNIPPET = HERE / "data" / "two_phases.sass"
# tests/sass_kernels.py:two_phases as it was captured: decorator line 34, def 35,
# "# phase: copy" at 37, "# phase: scale" at 42, last line 46 (path shortened to /src/...)
SNIPPET_SOURCE = sass.Source("/src/tests/sass_kernels.py", 35, 46, ((37, "copy"), (42, "scale")))


@pytest.fixture(scope="module")
def listing():
    return sass.parse_sass(SNIPPET.read_text())


# --------------------------------------------------------------------------- parsing
def test_parse_finds_the_kernel_its_labels_and_line_info(listing):
    kernel = listing.kernel
    assert kernel.entry and "two_phases" in kernel.name
    ins = kernel.instructions
    assert len(ins) > 100
    assert not any(i.opcode == "NOP" for i in ins)
    assert ins[0].opcode == "LDC" and ins[0].offset == 0 and ins[0].line == 35
    assert all(b.offset > a.offset for a, b in zip(ins, ins[1:]))
    assert sum(i.file is not None for i in ins) == len(ins)
    # every branch target is a parsed label
    targets = {i.target for i in ins if i.is_branch}
    assert targets and targets <= set(kernel.labels)
    assert {i.opcode for i in ins if i.category == "ffma"} == {"FFMA"}
    assert [i.width for i in ins if i.base == "STG"] == [32] * sum(i.base == "STG" for i in ins)
    predicated = [i for i in ins if i.predicate]
    assert predicated and all(i.predicate.startswith("@") for i in predicated)


@pytest.mark.parametrize("opcode, category, width", [
    ("FFMA", "ffma", None), ("FFMA.FTZ", "ffma", None), ("FMUL", "fmul", None), ("FADD.FTZ", "fadd", None),
    ("DFMA", "f64", None), ("F2F.F64.F32", "f64", None), ("MUFU.RCP64H", "f64", None), ("MUFU.RCP", "fp32_other", None),
    ("I2F.U32.RP", "convert", None), ("IMAD.WIDE.U32", "int", None), ("IADD3.X", "int", None), ("LEA.HI.X.SX32", "int", None),
    ("SHF.R.S32.HI", "int", None), ("ISETP.GE.U32.AND", "int", None), ("MOV", "int", None),
    ("ULDC.64", "uniform", None), ("R2UR", "uniform", None),
    ("LDS", "lds", 32), ("LDS.64", "lds", 64), ("LDS.128", "lds", 128), ("LDS.U8", "lds", 8), ("STS.128", "sts", 128),
    ("LDG.E", "ldg", 32), ("LDG.E.128.CONSTANT", "ldg", 128), ("LDG.E.U16", "ldg", 16), ("STG.E.64", "stg", 64),
    ("LDL", "local", 32), ("STL.64", "local", 64), ("LDC", "const", 32), ("ATOMG.E.ADD.F32.FTZ.RN", "atomic", 32),
    ("RED.E.ADD.F32.FTZ.RN", "atomic", 32), ("BRA", "control", None), ("BAR.SYNC.DEFER_BLOCKING", "control", None),
    ("BSSY", "control", None), ("CALL.ABS.NOINC", "control", None), ("EXIT", "control", None),
])
def test_classify_and_widths(opcode, category, width):
    assert sass.classify(opcode) == category
    assert sass.access_width(opcode) == width


def test_div64_routine_names():
    for name in ("__cuda_sm20_div_s64", "__cuda_sm20_rem_u64", "__cuda_sm20_div_u64"):
        assert sass.DIV64_ROUTINE.search(name)
    assert not sass.DIV64_ROUTINE.search("__cuda_sm20_div_rn_f64_full")


# --------------------------------------------------------------------------- loops and phases
def test_natural_loops_of_the_snippet(listing):
    """Each while loop became an unrolled main loop and a remainder loop (LLVM): four
    loops, none nested; the trailing ``BRA`` to itself after EXIT is unreachable, not a loop."""
    cfg = sass.build_cfg(listing.kernel)
    assert len(cfg.loops) == 4
    assert all(lp.depth == 1 and not lp.children for lp in cfg.loops)
    last = len(listing.kernel.instructions) - 1
    assert cfg.block_of[last] not in cfg.reachable


def test_phases_and_unrolling_of_the_snippet(listing):
    a = sass.audit_listing(listing, SNIPPET_SOURCE, "two_phases", "float32", {"registers": 31}, 32)
    assert set(a.phases) == {"prologue", "copy", "scale"}
    copy, scale = a.phases["copy"], a.phases["scale"]
    # y = a*y*y + a: one FMUL and one FFMA per source iteration; the main loop is unrolled 4x
    assert scale.unroll == 4 and scale.body_ffma == 1.0 and scale.depth == 1
    assert copy.body_ffma == 0 and copy.unroll == 4
    assert scale.body == scale.body_sass / 4
    assert a.hottest is not None and a.hottest.ffma == 4 and a.hottest.phases == {"scale": a.hottest.instructions}
    assert a.f64 == 0 and a.local == 0 and a.div64_calls == 0
    assert a.lineinfo  # the listing's lines name the kernel's file
    # every FFMA lies in 'scale', every instruction of the copy loops in 'copy'
    phase = sass.phases_of(listing.kernel, SNIPPET_SOURCE, sass.build_cfg(listing.kernel))
    assert {p for p, i in zip(phase, listing.kernel.instructions) if i.category == "ffma"} == {"scale"}


def test_phase_markers_are_read_from_the_source():
    from tests import sass_kernels

    src = sass.source_of(sass_kernels.two_phases)
    assert [name for _, name in src.markers] == ["copy", "scale"]
    assert src.phase(src.first) == "prologue" and src.phase(src.markers[1][0] + 1) == "scale"
    assert src.phase(src.last + 1) is None


# --------------------------------------------------------------------------- the issue-slot model
def test_occupancy_on_fixed_numbers():
    # 214 registers -> 216 per thread -> 6912 per warp: 2 warps per 16K sub-partition, 8 per SM
    occ = sass.occupancy(214, 41168, 64)
    assert occ == {"blocks_per_sm": 4, "warps_per_sm": 8, "limited_by": "registers", "warps_per_block": 2}
    assert sass.occupancy(128, 0, 256)["warps_per_sm"] == 16
    assert sass.occupancy(32, 50176, 128)["blocks_per_sm"] == 4  # 228 KB / 49 KB
    assert sass.occupancy(32, 50176, 128)["limited_by"] == "shared"


def test_issue_model_arithmetic():
    clock = sass.clock_hz()
    assert clock == pytest.approx(67e12 / (2 * 128 * 132))
    # 512 blocks of 2 warps, 4 per SM: the busiest SM holds 4 blocks, one wave of 8 warps,
    # 2 warps per scheduler -> 2 slots per thread instruction
    m = sass.issue_model({"a": 600, "b": 400}, 512, 64, 214, 41168)
    assert (m["waves"], m["busiest_sm_blocks"]) == (1, 4)
    assert m["seconds"] == pytest.approx(2 * 1000 / clock)
    assert m["phases_s"]["a"] == pytest.approx(2 * 600 / clock)
    # 1000 blocks of 8 warps, 2 per SM (registers): 8 blocks on the busiest SM in 4 waves of
    # 16 warps -> 4 * 4 slots per instruction
    m = sass.issue_model({"a": 100}, 1000, 256, 128, 0)
    assert (m["blocks_per_sm"], m["busiest_sm_blocks"], m["waves"]) == (2, 8, 4)
    assert m["seconds"] == pytest.approx(16 * 100 / clock)
    # a partial last wave: 3 blocks on the busiest SM, 2 resident -> 2 waves (16 + 8 warps)
    m = sass.issue_model({"a": 100}, 3 * 132, 256, 128, 0)
    assert m["seconds"] == pytest.approx((4 + 2) * 100 / clock)


def test_per_thread_instructions_from_phase_counts():
    phases = {"multiply": {"body": 10, "straight": 6}, "epilogue": {"body": 0, "straight": 50},
              "staging": {"body": 4.5, "straight": 20}}
    it = {"multiply": (36 * 16, 16), "staging": 100}
    out = sass.per_thread_instructions(phases, it)
    assert out == {"multiply": 10 * 576 + 6 * 16, "epilogue": 50, "staging": 450 + 20}


def _count(body_sass, unroll=1, ldg=None, sts=0, ffma=0.0, depth=2):
    return sass.PhaseCount(body=body_sass / unroll, straight=0, depth=depth, body_ffma=ffma / unroll,
                           body_lds_widths={}, body_ldg_widths=ldg or {}, calls=0, div64_calls=0,
                           body_sass=body_sass, unroll=unroll, body_sts=sts)


def test_normalise_fused_counts_one_step_from_the_loads_and_stores_it_issues():
    """The fused kernel's phases per source step of ``phase_model``, whatever LLVM and the
    store-per-line guess made of the loops (figures like deft64's SASS): a staging pass of 86
    instructions holds 8 loads, so 8 (position, channel) steps; a fully unrolled weight copy
    (no loop of its own, 32 instructions per chunk) 9 vector loads; a column-build pass 4
    stores (one per channel); the multiply body 4 rank-1 updates of 64 FFMA."""
    from deftnumba.dcn.kernels.fused_tiled import TileConfig

    tile = TileConfig(8, 8, 3, 4, 64, 8, 8)
    phases = {"staging": _count(86, unroll=8, ldg={"32": 8}, sts=2),
              "weights": _count(32, ldg={"128": 9}, sts=9, depth=1),
              "columns": _count(37, unroll=4, sts=4, ffma=12),
              "out_of_tile": _count(96, unroll=4, ldg={"32": 16}, sts=4),
              "multiply": _count(279, unroll=1, ffma=256),
              "table": _count(134)}
    out = layer_audit.normalise_fused(phases, tile, 9)
    assert out["staging"].body == pytest.approx(86 / 8)
    assert out["weights"].body == pytest.approx(32 / 9)
    assert out["columns"].body == pytest.approx(37 / 4)
    assert out["out_of_tile"].body == pytest.approx(96 / 4)
    assert out["multiply"].body == pytest.approx(279 / 4) and out["multiply"].body_ffma == 64
    assert out["table"] is phases["table"]  # no step rule: as measured


def test_stores_are_counted_on_one_path_through_the_loop_body():
    """A staging body that stores a value on one path and a zero on the other (a channel past
    the end) executes one of those stores a pass: ``_most_on_one_path`` counts the marked
    instructions along the best path (header -> value or zero -> latch), and ``normalise_steps``
    divides by those. Dividing by both paths' stores charged such a copy half its cost."""
    # blocks: 0 header, 1 value path, 2 zero path, 3 latch (back to 0); two instructions each
    cfg = sass.Cfg(starts=[0, 2, 4, 6], ends=[2, 4, 6, 8], succs=[[1, 2], [3], [3], [0]],
                   reachable={0, 1, 2, 3}, loops=[], block_of=[0, 0, 1, 1, 2, 2, 3, 3])
    loop = sass.Loop(header=0, blocks=frozenset({0, 1, 2, 3}))
    assert sass._most_on_one_path(loop, cfg, {2, 3, 4, 6}) == 3  # value path: 2 stores, + the latch's
    assert sass._most_on_one_path(loop, cfg, {4, 5}) == 2        # only the zero path stores
    assert sass._most_on_one_path(loop, cfg, set()) == 0
    from dataclasses import replace

    count = replace(_count(80, sts=8), body_sts_path=4)
    out = sass.normalise_steps({"stage": count, "old": _count(80, sts=8)}, {"stage": ("sts", 1), "old": ("sts", 1)})
    assert out["stage"].body == pytest.approx(80 / 4)
    assert out["old"].body == pytest.approx(80 / 8)  # no path figure (hand-made counts): all stores


def test_strays_in_an_outer_loop_move_only_where_their_phase_lives_elsewhere():
    """A staging copy unrolled into straight code of the chunk loop (depth 1) can leave a few
    of its instructions (a shared base address) in the multiply's outer loop (depth 2), whose
    inner loop (depth 3) is the multiply's body. They are the staging phase's deepest code,
    so left alone they would be charged as its loop body, once per staged element;
    ``reassign_strays`` gives them to the multiply. A phase whose code lives in the outer loop
    itself (here ``header``: all its instructions there) keeps them."""
    # blocks: 0 chunk-loop top (stage x8), 1 cc-loop top (stage x2 strays, multiply x4,
    # header x2), 2 inner multiply loop (x12), 3 cc latch, 4 chunk latch, 5 exit
    starts = [0, 8, 16, 28, 29, 30]
    ends = [8, 16, 28, 29, 30, 31]
    block_of = [b for b in range(6) for _ in range(starts[b], ends[b])]
    inner = sass.Loop(header=2, blocks=frozenset({2}), depth=3)
    middle = sass.Loop(header=1, blocks=frozenset({1, 2, 3}), depth=2, children=[inner])
    outer = sass.Loop(header=0, blocks=frozenset({0, 1, 2, 3, 4}), depth=1, children=[middle])
    cfg = sass.Cfg(starts=starts, ends=ends, succs=[[1], [2], [2, 3], [1, 4], [0, 5], []],
                   reachable=set(range(6)), loops=[outer, middle, inner], block_of=block_of)
    phase = ["stage"] * 8 + ["stage"] * 2 + ["multiply"] * 4 + ["header"] * 2 + ["multiply"] * 12 \
        + ["multiply", "stage", "stage"]
    out = sass.reassign_strays(phase, cfg)
    assert out[8:10] == ["multiply", "multiply"]  # the staging's strays
    assert out[14:16] == ["header", "header"]     # a phase with no code elsewhere stays
    assert out[:8] == ["stage"] * 8 and out[16:28] == ["multiply"] * 12


def test_warp_fraction():
    assert layer_audit.warp_fraction(0.0) == 0.0
    assert layer_audit.warp_fraction(1.0) == 1.0
    assert layer_audit.warp_fraction(0.01) == pytest.approx(1 - 0.99 ** 32)


# --------------------------------------------------------------------------- compiled kernels
@pytest.fixture(scope="module")
def compiled(job_sass_kernels):
    """Audits of tests/sass_kernels.py, compiled once per test run (a compile job: tests/conftest.py)."""
    try:
        sass.find_nvdisasm()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rc, _, stderr = job_sass_kernels
    if rc != 0 and "libnvvm" in stderr:
        pytest.skip("NVVM not installed: pip install 'numba-cuda[cu13]'")
    assert rc == 0, stderr[-3000:]
    return job_sass_kernels.json()


def test_int64_indexing_calls_the_64_bit_division_routines(compiled):
    wide, narrow = compiled["axpy_int64"], compiled["axpy_int32"]
    assert wide["div64_in_loops"] > 0 and narrow["div64_calls"] == 0
    assert wide["lineinfo"] and narrow["lineinfo"]
    # the same multiply-add costs several times the instructions in int64
    assert narrow["phases"]["body"]["body"] * 3 < wide["phases"]["body"]["body"]
    assert narrow["hottest"]["ffma_fraction"] > 2 * wide["hottest"]["ffma_fraction"]
    assert narrow["registers"] < wide["registers"]
    for a in (wide, narrow):
        assert a["f64"] == 0 and a["local"] == 0


def test_compiled_phases_follow_the_markers(compiled):
    a = compiled["two_phases"]
    assert set(a["phases"]) == {"prologue", "copy", "scale"}
    assert a["phases"]["scale"]["body_ffma"] == 1.0 and a["phases"]["copy"]["body_ffma"] == 0
    assert a["phases"]["copy"]["body"] > 0 and a["phases"]["scale"]["depth"] == 1


def test_ptx_variants_recompile_one_ir_and_each_variant_is_audited(compiled):
    v = compiled["ptx_variants"]
    assert v["compiles"] == 3 and 1 <= len(v["audits"]) <= 3
    for a in v["audits"]:  # an audit of a given PTX reads the same kernel's line table
        assert set(a["phases"]) == set(compiled["axpy_int32"]["phases"])
        assert a["phases"]["body"]["body_ffma"] == compiled["axpy_int32"]["phases"]["body"]["body_ffma"] > 0


# --------------------------------------------------------------------------- the planner's table
def test_planner_table_covers_the_candidates_and_matches_the_kernel_source():
    from deftnumba import bench, tiling
    from tests.dcn.cases import CASES

    table = layer_audit.load_planner_table()
    regenerate = "regenerate it: python -m deftnumba audit --planner-table (no GPU needed)"
    assert table is not None, f"{layer_audit.PLANNER_TABLE} is missing; {regenerate}"
    assert table["source_hash"] == layer_audit.kernel_source_hash(), (
        f"{layer_audit.PLANNER_TABLE} was measured on another version of kernels/fused_tiled.py or "
        f"kernels/sampling.py; {regenerate}")
    geometries = list(bench.SUITES.values()) + list(CASES.values())
    wanted = set()
    for g in geometries:
        for device in (tiling.H200, tiling.SIMULATOR):
            for tile in tiling.candidate_tiles(g, device):
                wanted.add(layer_audit.planner_key(g.dtype, tile.reg_oc, tile.reg_px))
    missing = wanted - set(table["configs"])
    assert not missing, f"the planner table lacks {sorted(missing)}; {regenerate}"
    for key, entry in table["configs"].items():
        assert 0 < entry["registers"] <= 255, key  # configs that spill are not planned (tiling)
        multiply = entry["phases"]["multiply"]
        reg_oc, reg_px = entry["tile"][5], entry["tile"][6]
        # the unit of the model: one source iteration of the multiply loop is one rank-1 update
        fma = "ffma" if key.startswith("float32") else "dfma"
        assert multiply[fma] == reg_oc * reg_px, (key, multiply)


def test_planner_reads_the_measured_counts():
    from deftnumba import tiling
    from deftnumba.kernels import fused_tiled
    from deftnumba import bench

    g = bench.SUITES["deft64"]
    terms = tiling.predict(g, tiling.normal_statistics(1.0), "fused", fused_tiled.GPU_CONFIG, tiling.H200)
    entry = layer_audit.load_planner_table()["configs"]["float32/8x8"]
    assert terms["registers"] == entry["registers"]
    iterations = layer_audit.fused_iterations(g, fused_tiled.GPU_CONFIG)
    _, oot = layer_audit.out_of_tile_phase(g, fused_tiled.GPU_CONFIG, terms["out_of_tile"])
    phases = entry["phases"]  # the out-of-tile path's body is measured (phase out_of_tile)
    assert phases["out_of_tile"]["body"] > 0
    per_thread = sum(sass.per_thread_instructions(phases, {**iterations, "out_of_tile": oot}).values())
    assert terms["instructions_per_thread"] == pytest.approx(per_thread)
    assert terms["compute_s"] >= terms["issue_s"] > 0
    assert math.isfinite(terms["seconds"])


def test_audit_command_prints_progress_a_table_and_csv(tmp_path):
    """``python -m deftnumba audit`` on one small kernel in four dtypes: progress on stderr, an aligned
    table with the column heads on stdout, the same rows in the CSV."""
    try:
        sass.find_nvdisasm()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "audit.csv"
    env = dict(os.environ, DEFTNUMBA_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "deftnumba", "audit", "--kernels", "im2col.positions[mask=True]",
                           "--csv", str(out)], env=env, cwd=HERE.parent, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 and "libnvvm" in proc.stderr:
        pytest.skip("NVVM not installed: pip install 'numba-cuda[cu13]'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dtypes = ["float32", "float64", "float16", "bfloat16"]  # the half cases: storage dtype, float32 arithmetic
    for i, dtype in enumerate(dtypes):
        assert f"[{i + 1}/4] compiling im2col.positions[mask=True] {dtype}" in proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("kernel "))
    for column in ("regs", "warps/SM", "hot_ffma_%", "hot_lds_bits", "f64", "ldl/stl", "div64_calls"):
        assert column in lines[head]
    assert set(lines[head + 1]) <= {"-", " "}
    rows = [ln for ln in lines[head + 2:] if ln.startswith("im2col.positions")]
    assert len(rows) == 4 and len({len(r.rstrip()) for r in rows}) >= 1
    assert "1 KB" in proc.stdout  # the shared-memory reserve is explained
    import csv

    with open(out) as f:
        records = list(csv.DictReader(f))
    assert [r["dtype"] for r in records] == dtypes
    assert [int(r["f64"]) > 0 for r in records] == [False, True, False, False]


# --------------------------------------------------------------------------- one warp's stalls
# four instructions of an sm_90 listing printed with ``-hex`` (the low and the high word of each)
HEX_LISTING = """
//--------------------- .text.k --------------------------
        .other          k,@"STO_CUDA_ENTRY STV_DEFAULT"
k:
        /*0000*/                   S2R R2, SR_TID.X ;                                  /* 0x0000000000027919 */
                                                                                       /* 0x000e6e0000002100 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, RZ, PT ;                   /* 0x000000ff0200720c */
                                                                                       /* 0x002fc40003f06270 */
        /*0020*/                   NOP ;                                               /* 0x0000000000007918 */
                                                                                       /* 0x000fc00000000000 */
        /*0030*/                   LDG.E R3, desc[UR8][R4.64] ;                        /* 0x0000000804037981 */
                                                                                       /* 0x0004e2000c1e1900 */
        /*0040*/                   EXIT ;                                              /* 0x000000000000794d */
                                                                                       /* 0x000fea0003800000 */
"""


def test_control_bits_are_read_from_the_high_word():
    ins = sass.parse_sass(HEX_LISTING).kernel.instructions
    assert [i.opcode for i in ins] == ["S2R", "ISETP.GE.AND", "LDG.E", "EXIT"]
    assert ins[1].operands == "P0, PT, R2, RZ, PT"  # the encoding comment is not an operand
    s2r, isetp, ldg = (sass.control_of(i.control) for i in ins[:3])
    # S2R: variable latency, releases barrier 1 when its value lands; ISETP waits on barrier 1
    assert (s2r.stall, s2r.write_barrier, s2r.read_barrier, s2r.wait_mask) == (7, 1, None, 0)
    assert (isetp.stall, isetp.write_barrier, isetp.wait_mask) == (2, None, 0b000010)
    # LDG: its result on barrier 3, its address registers read on barrier 2
    assert (ldg.write_barrier, ldg.read_barrier) == (3, 2)
    # a listing without -hex has no control bits, and no cycle counts
    assert sass.stall_charges([sass.Instruction(0, "FFMA")]) is None


def _inst(opcode, stall=1, wb=7, rb=7, wait=0):
    bits = stall | (wb << 5) | (rb << 8) | (wait << 11)
    return sass.Instruction(0, opcode, control=bits)


def test_stall_charges_wait_for_the_barrier_of_a_load():
    lds = _inst("LDS.128", wb=0)
    use = _inst("FFMA", wait=0b1)
    free = [_inst("FFMA") for _ in range(10)]
    # the use right after the load waits out the shared-memory latency
    assert sass.stall_charges([lds, use]) == [1, sass.LATENCY["lds"]]
    # ten independent FFMAs between them hide 10 of those clocks
    got = sass.stall_charges([lds] + free + [use])
    assert sum(got) == sass.LATENCY["lds"] + 1
    assert got[-1] == sass.LATENCY["lds"] + 1 - 11
    # a global load waits longer; a stall count of 4 costs 4
    assert sum(sass.stall_charges([_inst("LDG.E.128", wb=2), _inst("STS.128", wait=0b100)])) == \
        sass.LATENCY["ldg"] + 1
    assert sass.stall_charges([_inst("FFMA", stall=4)]) == [4]
    # a loop body run twice: the load at its end is waited for at the top of the next trip
    # (the use issues LATENCY after the load; the ten FFMAs and the load follow)
    body = [_inst("FFMA", wait=0b1)] + free + [lds]
    assert sum(sass.stall_charges(body, passes=1)) == 12
    assert sum(sass.stall_charges(body, passes=2)) == sass.LATENCY["lds"] + 11


def test_the_latency_bound_needs_warps_to_hide_stalls():
    clock = sass.clock_hz()
    # 132 blocks of 4 warps, one per SM: each scheduler has one warp, so a phase takes the
    # clocks one warp needs (its stalls), where those exceed its instructions
    m = sass.issue_model({"stage": 100, "multiply": 1000}, 132, 128, 64, 0,
                         cycles={"stage": 700, "multiply": 1100})
    assert m["seconds"] == pytest.approx(1100 / clock)
    assert m["latency_seconds"] == pytest.approx(1800 / clock)
    # 8 such blocks on each SM (8 warps a scheduler): the stalls are covered, the bound is the
    # issue slots again
    m = sass.issue_model({"stage": 100, "multiply": 1000}, 8 * 132, 128, 64, 0,
                         cycles={"stage": 700, "multiply": 1100})
    assert m["latency_seconds"] == pytest.approx(m["seconds"]) == pytest.approx(8 * 1100 / clock)
    # without cycle counts the model is the issue-slot model alone
    assert "latency_seconds" not in sass.issue_model({"a": 1}, 1, 32, 32, 0)


def test_the_larger_estimate_is_the_one_with_stalls_where_a_row_has_it():
    assert sass.larger_estimate_us({"predicted_us": 16.0, "latency_us": 19.26}) == 19.26
    assert sass.larger_estimate_us({"predicted_us": 16.0, "latency_us": None}) == 16.0
    assert sass.larger_estimate_us({"predicted_us": 16.0}) == 16.0
    # (latency_us is never below the issue-slot figure; a row that says so keeps the larger)
    assert sass.larger_estimate_us({"predicted_us": 16.0, "latency_us": 15.0}) == 16.0
