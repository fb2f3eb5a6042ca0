#!/usr/bin/env python3
"""Static SASS reading of the fused backward (issue 11), until the ``audit`` verb covers it.

    DEFTNUMBA_BACKEND=cuda PYTHONPATH=$PWD python tools/backward_sass.py

Compiles ``input_grad_kernel`` and ``weight_grad_kernel`` (``GPU_CONFIG``, 3x3, float32) with
numba-cuda for sm_90, links with nvJitLink (ptxas), disassembles with ``nvdisasm -g`` (the
nvidia-cuda-nvdisasm wheel), attributes instructions to the ``# phase: NAME`` markers by line
info, finds each phase's innermost loop (backward branches), and multiplies its instructions
per iteration by ``backward_fused.phase_model`` and the warps of the ``deft64`` (N=8) launch:
an issue-bound prediction (4 warp-instructions per clock per SM, 132 SMs, 1.98 GHz), not a
time. Staging loops are divided by their unroll factor (shared stores per element); phases
without a loop (scatter, offset_grad) by their static multiplicity, both branches counted
(an upper bound).
"""
import collections
import os, sys, re, subprocess, tempfile
os.environ["DEFTNUMBA_BACKEND"] = "cuda"; os.environ.setdefault("DEFTNUMBA_QUIET", "1")
import deftnumba
from deftnumba.backend import cuda
from cuda.bindings import nvjitlink
NVDISASM = next((str(p) for p in __import__("pathlib").Path(sys.prefix).rglob("nvidia/cu*/bin/nvdisasm")), "nvdisasm")

def sass(func, sig, lineinfo=False):
    ptx, _ = cuda.compile_ptx(func, sig, cc=(9, 0), lineinfo=lineinfo)
    opts = ["-arch=sm_90"] + (["-lineinfo"] if lineinfo else [])
    h = nvjitlink.create(len(opts), opts)
    d = ptx.encode(); nvjitlink.add_data(h, nvjitlink.InputType.PTX, d, len(d), "k")
    nvjitlink.complete(h)
    cub = bytearray(nvjitlink.get_linked_cubin_size(h)); nvjitlink.get_linked_cubin(h, cub)
    nvjitlink.destroy(h)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cub)
    args = [NVDISASM, "-c"] + (["-g"] if lineinfo else []) + [f.name]
    return ptx, subprocess.run(args, capture_output=True, text=True).stdout

def mix(text):
    ops = {}
    for ln in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            op = m.group(2).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    return ops

def parse(text, file_suffix=None):
    """[(addr, op, line, text)], labels {name: addr}"""
    insts, labels, pending = [], {}, []
    cur_file = cur_line = None
    for l in text.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', l)
        if m:
            cur_file, cur_line = m.group(1), int(m.group(2)); continue
        m = re.match(r"\s*(\.L_x_\d+):", l)
        if m:
            pending.append(m.group(1)); continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", l)
        if m:
            a = int(m.group(1), 16)
            for p in pending: labels[p] = a
            pending = []
            ln = cur_line if (cur_file and (file_suffix is None or cur_file.endswith(file_suffix))) else None
            insts.append((a, m.group(3), ln, l.strip()))
    return insts, labels

def loops(insts, labels):
    """innermost-first list of (start_index, end_index) for backward branches"""
    idx = {a: i for i, (a, *_) in enumerate(insts)}
    out = []
    for i, (a, op, ln, t) in enumerate(insts):
        if op.startswith("BRA"):
            m = re.search(r"\((\.L_x_\d+)\)", t)
            if m and m.group(1) in labels and labels[m.group(1)] <= a:
                out.append((idx[labels[m.group(1)]], i))
    return out


# ---- prediction
"""Static issue-slot prediction of the fused backward at deft64 (N=8) on an H200 (sm_90).
Per phase: SASS instructions per iteration of the phase's innermost loop body (from nvdisasm
line info and backward branches) x iterations per thread (backward_fused.phase_model) x warps."""
from deftnumba.kernels import backward_fused as bf
from deftnumba.arguments import Geometry
from deftnumba import roofline as rl
from numba import types

g = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
             pad_h=1, pad_w=1, has_mask=True, has_bias=True)
cfg = bf.GPU_CONFIG
H200_SPLITS = bf.choose_splits(g, cfg, 264)
src = bf.__file__
lines = open(src).read().splitlines()
markers = [(i + 1, re.search(r"# phase: (\w+)", l).group(1)) for i, l in enumerate(lines) if re.match(r"\s+# phase: \w+", l)]
def phase_of(line):
    if line is None: return "?"
    name = "prologue"
    for ln, ph in markers:
        if ln <= line: name = ph
    return name

# one shared store per element (table: 8 per point): the unroll factor of a staging loop
STORES_PER_ITER = {"stage": 1, "stage_gemm": 1, "w_stage": 1, "table": 8, "w_table": 8}

def per_iteration(insts, labels, multiplicity):
    lp = loops(insts, labels)
    lp = [(a, b) for (a, b) in lp if b - a >= 2]  # not the exit trap (a BRA to itself)
    innermost = [(a, b) for (a, b) in lp if not any((c >= a and d <= b and (c, d) != (a, b)) for (c, d) in lp)]
    out = {}
    static = collections.Counter(phase_of(x[2]) for x in insts)
    ffma = collections.Counter(phase_of(x[2]) for x in insts if x[1].startswith("FFMA"))
    for ph in set(static):
        bodies = []
        for a, b in innermost:
            body = insts[a:b + 1]
            c = collections.Counter(phase_of(x[2]) for x in body)
            if c.most_common(1)[0][0] == ph:
                stores = sum(1 for x in body if x[1].startswith("STS")) / STORES_PER_ITER.get(ph, 1)
                unroll = max(1.0, stores) if ph in STORES_PER_ITER else 1.0
                bodies.append((len(body) / unroll, sum(1 for x in body if x[1].startswith("FFMA")) / unroll))
        if bodies and ph not in multiplicity:
            out[ph] = (sum(b[0] for b in bodies) / len(bodies), sum(b[1] for b in bodies) / len(bodies), "loop")
        else:
            m = multiplicity.get(ph, 1)
            out[ph] = (static[ph] / m, ffma[ph] / m, f"static/{m}")
    return out

k = g.taps
t_in, t_w = cfg.input_threads(k), cfg.weight_threads(k)
ept = -(-k * cfg.pixels // t_in)
steps_a = bf._steps(cfg.out_block, cfg.reg_rows * cfg.reg_px)
steps_b = bf._steps(cfg.pixels, cfg.w_reg_out * cfg.w_reg_cols)
conv = types.UniTuple(types.int32, 8); dims = types.UniTuple(types.int32, 9)
t = types.float32; a4, flat = types.Array(t, 4, "A"), types.Array(t, 1, "C")
model = bf.phase_model(g, cfg, 264)
print("phase_model", model, "splits", H200_SPLITS)
clock, sms, issue = 1.98e9, 132, 4
total_s = 0
rows = []
for label, kern, sig, threads, blocks, mult, phases in (
    ("input_grad (atomic)", bf.input_grad_kernel("float32", 3, 3, 1, 1, 1, 1, cfg, True, True),
     (flat, a4, a4, flat, flat, flat, a4, a4, conv, dims), t_in, cfg.tiles(g) * g.batch,
     {"scatter": 1, "offset_grad": 2, "grad_cols_gemm": None},
     ("table", "stage", "stage_gemm", "grad_cols_gemm", "scatter", "offset_grad")),
    ("weight_grad", bf.weight_grad_kernel("float32", 3, 3, 1, 1, 1, 1, cfg, True),
     (flat, a4, a4, flat, flat, conv, dims), t_w, H200_SPLITS * (-(-64 // cfg.w_out_block)) * (-(-64 // cfg.chunk)),
     {"weight_gemm": None}, ("w_stage", "w_table", "w_build", "weight_gemm"))):
    ptx, s = sass(kern.py_func, sig, lineinfo=True)
    insts, labels = parse(s, src.split("/")[-1])
    per = per_iteration(insts, labels, {kk: v for kk, v in mult.items() if v})
    if label.startswith("input"):
        model_k = {p: model[p] for p in phases}
    else:
        model_k = {p: model[p] for p in phases}
    warps = blocks * -(-threads // 32)
    instr = sum(per[p][0] * model_k[p] for p in phases)
    seconds = warps * instr / (sms * issue * clock)
    total_s += seconds
    print(f"\n{label}: {blocks} blocks x {threads} threads ({warps} warps); {instr:.0f} instructions per thread -> {seconds*1e3:.4f} ms issue-bound")
    for p in phases:
        n, f, how = per[p]
        share = per[p][0] * model_k[p] / instr
        print(f"  {p:16s} {n:8.1f} instr/iter ({how}), FFMA {100*f/max(n,1e-9):4.0f}%, x {model_k[p]:6d} iters = {n*model_k[p]:9.0f} ({100*share:4.1f}%)")
print(f"\nfused backward predicted issue-bound: {total_s*1e3:.4f} ms (+ bias sum and the {H200_SPLITS - 1} partial adds)")
ceil = rl.H200_CEILINGS if hasattr(rl, "H200_CEILINGS") else next(v for v in vars(rl).values() if isinstance(v, rl.Ceilings))
try:
    print("roofline floor fused bwd:", rl.floor_ms(g, "fused", "bwd", ceil), "ms; fwd:", rl.floor_ms(g, "fused", "fwd", ceil),
          "torchvision fwd+bwd floor:", rl.floor_ms(g, "torchvision", "fwdbwd", ceil))
except Exception as e:
    print("floor error", e)
