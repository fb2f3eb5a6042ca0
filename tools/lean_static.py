"""Static SASS figures of the lean kernels (sm_90, no GPU needed): loops by phase, FFMA fractions,
and a rough issue-bound prediction of the fused forward on the bench suites.

    DEFTNUMBA_BACKEND=cuda python tools/lean_static.py [--json data/lean/static_audit.json]

A stand-in until the house's SASS audit registers deftnumba.lean: it compiles each kernel
with numba-cuda's real compiler (NVVM), links with nvJitLink (-lineinfo), disassembles
with nvdisasm, attributes every instruction to the ``# phase:`` mark above its source line,
and finds loops as backward branches. Everything here is a *prediction* from static code.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys

os.environ.setdefault("DEFTNUMBA_BACKEND", "cuda")
os.environ.setdefault("DEFTNUMBA_QUIET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deftnumba.perf import audit as ptx  # noqa: E402
from deftnumba.runtime import backend

SM_COUNT, ISSUE_PER_SM_PER_CLK, CLOCK_HZ = 132, 4, 1.98e9  # H200 SXM leads (datasheet boost clock)


def _nvdisasm() -> str:
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin",
                                          "nvdisasm")))
    if not found:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    return found[-1]


def _cubin(ptx_text: str) -> bytes:
    from cuda.bindings import nvjitlink

    h = nvjitlink.create(2, ["-arch=sm_90", "-lineinfo"])
    data = ptx_text.encode()
    nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel")
    nvjitlink.complete(h)
    out = bytearray(nvjitlink.get_linked_cubin_size(h))
    nvjitlink.get_linked_cubin(h, out)
    nvjitlink.destroy(h)
    return bytes(out)


def sass_instructions(kernel, signature, path="/tmp/lean_static.cubin"):
    """``[(opcode, source line or None, label or None, branch target or None)]`` in order."""
    ptx_text, _ = backend.cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0), lineinfo=True)
    with open(path, "wb") as f:
        f.write(_cubin(ptx_text))
    text = subprocess.run([_nvdisasm(), "-g", "-c", path], capture_output=True, text=True, check=True).stdout
    source = os.path.basename(inspect.getsourcefile(kernel.py_func))
    out, line, label = [], None, None
    for raw in text.splitlines():
        if "//## File" in raw:
            m = re.search(r'File "([^"]+)", line (\d+)', raw)
            line = int(m.group(2)) if m and os.path.basename(m.group(1)) == source else None
            continue
        if m := re.match(r"^(\.L_x_\d+):", raw):
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", raw)
        if m:
            target = re.search(r"BRA `\((\.L_x_\d+)\)", raw)
            out.append((m.group(1), line, label, target.group(1) if target else None))
            label = None
    return out


def phase_marks(kernel):
    lines = open(inspect.getsourcefile(kernel.py_func)).read().splitlines()
    return [(i + 1, re.search(r"# phase: (\w+)", ln).group(1)) for i, ln in enumerate(lines) if "# phase:" in ln]


def analyse(kernel, signature) -> dict:
    instrs = sass_instructions(kernel, signature)
    marks = phase_marks(kernel)

    phases, current = [], "prologue"
    for _, line, _, _ in instrs:  # a line in another file (None) keeps the phase before it
        if line is not None:
            current = "prologue"
            for ln, ph in marks:
                if line >= ln:
                    current = ph
        phases.append(current)
    where = {lab: i for i, (_, _, lab, _) in enumerate(instrs) if lab}
    loops = []
    for i, (_, _, _, target) in enumerate(instrs):
        if target in where and where[target] <= i:
            body = range(where[target], i + 1)
            ops = [instrs[k][0] for k in body]
            votes = collections.Counter(phases[k] for k in body)
            loops.append({"phase": votes.most_common(1)[0][0], "start": where[target], "end": i,
                          "instructions": len(ops), "ffma": sum(o.startswith("FFMA") for o in ops),
                          "lds128": sum(o.startswith("LDS.128") for o in ops),
                          "ldg": sum(o.startswith("LDG") for o in ops),
                          "sts": sum(o.startswith("STS") for o in ops)})
    innermost = [lp for lp in loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]
                                                and (o["start"], o["end"]) != (lp["start"], lp["end"]) for o in loops)]
    by_phase = collections.Counter(phases)
    return {"instructions": len(instrs), "by_phase": dict(by_phase), "loops": loops, "innermost": innermost,
            "phases": phases}


def predicted_fused_us(shape: dict, report: dict, config) -> dict:
    """Issue-bound time of the fused forward: warp instructions / (SMs * 4 per clock * clock).

    Per thread (= per warp, all lanes alike): the pointwise loop body (4 channels) C/4 times
    over all chunks; the input-stage and weight-stage loop bodies as often as the staged
    elements need (a body covers as many elements as it has global loads: LLVM unrolls these
    loops); instructions outside loops once per chunk (stage, pointwise, stencil phases) or
    once (prologue, epilogue). Warp divergence, latency and bank conflicts are ignored.
    """
    c = int(shape["channels"])
    chunks = math.ceil(c / config.chunk)
    rows, cols = config.staged_shape(1, 1)
    elements = {"input": config.chunk * rows * cols / config.threads,
                "weights": config.chunk * config.oc_block / config.threads}
    in_loops = set()
    total = 0.0
    stage_loops = [lp for lp in report["innermost"] if lp["phase"].startswith("stage") and lp["ldg"]]
    for lp in report["innermost"]:
        in_loops.update(range(lp["start"], lp["end"] + 1))
        if lp["phase"] == "pointwise":
            total += lp["instructions"] * chunks * config.chunk / 4
        elif lp in stage_loops:
            kind = "input" if lp["phase"] == "stage_input" else "weights"
            total += lp["instructions"] * chunks * math.ceil(elements[kind] / lp["ldg"])
        elif lp["phase"] == "stencil":
            total += lp["instructions"]  # one chunk holds my channels
    for k, ph in enumerate(report["phases"]):
        if k not in in_loops:
            total += chunks if ph in ("stage_input", "stage_weights", "pointwise", "stencil") else 1
    tiles = math.ceil(shape["height"] / config.tile_h) * math.ceil(shape["width"] / config.tile_w)
    blocks = tiles * math.ceil(c / config.oc_block) * shape["batch"]
    warps = blocks * config.threads // 32
    seconds = total * warps / (SM_COUNT * ISSUE_PER_SM_PER_CLK * CLOCK_HZ)
    return {"warp_instructions_per_warp": total, "warps": warps, "predicted_issue_us": seconds * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    from deftnumba.lean import bench_op, roofline
    from deftnumba.lean.kernels import fused

    result = {"kernels": {}, "suites": {}}
    for module in ("fused", "depthwise"):
        mod = importlib.import_module(f"deftnumba.lean.kernels.{module}")
        for name, dtype, kernel, sig in mod.ptx_cases():
            if dtype != "float32":
                continue
            ptx_text, _ = backend.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            report = analyse(kernel, sig)
            report["resources"] = ptx.ptxas_resources(ptx_text)
            result["kernels"][f"{module}.{name}"] = report
            print(f"{module}.{name} float32: {report['instructions']} SASS instructions, {report['resources']}")
            for lp in report["innermost"]:
                print(f"    innermost loop [{lp['phase']}]: {lp['instructions']} instructions, {lp['ffma']} FFMA "
                      f"({100 * lp['ffma'] / lp['instructions']:.1f}%), {lp['lds128']} LDS.128, {lp['ldg']} LDG, "
                      f"{lp['sts']} STS")
    for shape_name, shape in bench_op.suites().items():
        g = bench_op.geometry(shape)
        config = fused.default_config(g)
        key = "fused.fused[star5,s1,wide]" if config == fused.WIDE_CONFIG else "fused.fused[star5,s1]"
        floor = roofline.floor_ms(g, "fused", "fwd") * 1e3
        pred = predicted_fused_us(shape, result["kernels"][key], config)
        pred.update(roofline_floor_us=floor, ratio=pred["predicted_issue_us"] / floor, kernel=key,
                    config=str(config))
        result["suites"][shape_name] = pred
        print(f"{shape_name} ({key}): predicted issue-bound {pred['predicted_issue_us']:.1f} us vs roofline floor "
              f"{floor:.1f} us ({pred['ratio']:.2f}x)  [static predictions, H200 leads]")
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        for report in result["kernels"].values():
            report.pop("phases")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
