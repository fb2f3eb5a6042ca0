"""Read the sm_90 SASS of the fused kernel without a GPU (a stop-gap until ``python -m deftnumba audit``).

Compiles a ``fused_tiled.ptx_cases()`` entry with numba-cuda (``DEFTNUMBA_BACKEND=cuda``),
links it with nvJitLink to an sm_90 cubin (with line info), disassembles it with the
``nvdisasm`` of the nvidia-cuda-nvdisasm wheel, and prints, for every loop (a backward
branch and the instructions between its target and itself), the instruction count, the
FFMA count, the shared-load widths, and the source lines (``# phase:`` tags) it covers.

    DEFTNUMBA_BACKEND=cuda PYTHONPATH=$PWD python tools/fused_sass.py [case-substring] [--dump]
    DEFTNUMBA_BACKEND=cuda PYTHONPATH=$PWD python tools/fused_sass.py --estimate   # per suite plan
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DEFTNUMBA_BACKEND", "cuda")


def nvdisasm_binary() -> str:
    import nvidia
    for root in nvidia.__path__:
        for path in Path(root).rglob("nvdisasm"):
            return str(path)
    raise FileNotFoundError("nvdisasm (pip install nvidia-cuda-nvdisasm)")


def cubin(ptx: str, cc=(9, 0)) -> tuple[bytes, str]:
    from cuda.bindings import nvjitlink
    handle = nvjitlink.create(3 + bool(MAXREG), [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose", "-lineinfo"] + ([f"-maxrregcount={MAXREG}"] if MAXREG else []))
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        size = nvjitlink.get_linked_cubin_size(handle)
        out = bytearray(size)
        nvjitlink.get_linked_cubin(handle, out)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    return bytes(out), log.decode(errors="replace")


def disassemble(binary: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        return subprocess.run([nvdisasm_binary(), "-c", "-g", f.name], check=True,
                               capture_output=True, text=True).stdout


MAXREG = int(os.environ.get("MAXREG", "0"))
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
LINE = re.compile(r'line (\d+)')
LABEL = re.compile(r"^(\.L_x_\d+):")


def parse(sass: str):
    """The kernel's own section (not the ``__cuda_*`` helpers): ``(rows, labels)`` with rows
    ``[(address, text, source_line)]`` in order and labels ``{name: row index}``."""
    rows, labels = [], {}
    line = None
    inside = False
    for raw in sass.splitlines():
        if raw.strip().startswith(".section"):
            inside = ".text." in raw and "__cuda_" not in raw
            continue
        if not inside:
            continue
        if "## File" in raw:
            m = LINE.search(raw)
            line = int(m.group(1)) if m else line
            continue
        m = LABEL.match(raw.strip())
        if m:
            labels[m.group(1)] = len(rows)
            continue
        m = INSTR.search(raw)
        if m:
            rows.append((int(m.group(1), 16), m.group(2).strip(), line))
    return rows, labels


def opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t else ""


def loops(rows, labels):
    """Backward branches: ``(start_index, end_index)`` into ``rows``, innermost first."""
    found = []
    for i, (_, text, _) in enumerate(rows):
        if opcode(text).startswith("BRA"):
            m = re.search(r"\(?(\.L_x_\d+)\)?", text)
            if m and m.group(1) in labels and labels[m.group(1)] <= i:
                found.append((labels[m.group(1)], i))
    return sorted(found, key=lambda se: se[1] - se[0])


def mix(rows):
    ops = collections.Counter(opcode(t) for _, t, _ in rows)
    return ops


def report(name, ptx, source_lines=None, dump=False):
    binary, log = cubin(ptx)
    sass = disassemble(binary)
    rows, labels = parse(sass)
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    print(f"== {name}: {len(rows)} instructions, {regs.group(1) if regs else '?'} registers, "
          f"spill {spill.groups() if spill else '?'}")
    whole = mix(rows)
    bad = {k: v for k, v in whole.items() if k.startswith(("LDL", "STL", "DADD", "DMUL", "DFMA", "F2F.F64"))
           or "F64" in k}
    calls = collections.Counter(t.split('(')[-1].rstrip(')') for _, t, _ in rows if opcode(t).startswith("CALL"))
    print(f"   F64/local: {bad or 'none'}; calls: {calls or 'none'}")
    for s, e in loops(rows, labels):
        body = rows[s:e + 1]
        ops = mix(body)
        n = len(body)
        ffma = ops.get("FFMA", 0)
        lds = {k: v for k, v in ops.items() if k.startswith("LDS")}
        lines = sorted({ln for _, _, ln in body if ln is not None})
        phase = ""
        if source_lines:
            tags = collections.Counter(source_lines.get(ln, "?") for _, _, ln in body)
            phase = " ".join(f"{k}:{v}" for k, v in tags.most_common())
        print(f"   loop {rows[s][0]:#06x}-{rows[e][0]:#06x}: {n:4d} instr, FFMA {ffma} ({100 * ffma / n:.0f}%), "
              f"{lds} lines {lines[:1]}..{lines[-1:]} [{phase}]")
        top = ", ".join(f"{k}:{v}" for k, v in ops.most_common(12))
        print(f"        {top}")
    if dump:
        for addr, text, ln in rows:
            print(f"{addr:06x} L{ln} {text}")


def phase_of_lines(path):
    """``{line: phase}`` from ``# phase: NAME`` comments (a phase runs to the next tag)."""
    phases = {}
    current = "setup"
    for i, text in enumerate(Path(path).read_text().splitlines(), 1):
        m = re.search(r"#\s*phase:\s*(\w+)", text)
        if m:
            current = m.group(1)
        phases[i] = current
    return phases


# The deft64 plan's column build, one in-tile table entry (4 channels), traced by hand in the
# SASS of GPU_CONFIG: 8 (entry loads, in-tile test) + 16 (window, first channel, full-chunk
# test) + 32 (three more channels, stores, loop tail). The loop body holds all three paths.
COLUMN_PATH = 56.0


def estimate(plans):
    """Issue-bound prediction per suite: SASS loop sizes x ``phase_model`` iterations.

    time = ceil(blocks / 132) * (threads / 32) * I_thread / (4 issue slots * 1.98 GHz), with
    I_thread = sum over phases of (instructions per source-loop iteration) x iterations
    + chunks x (non-loop instructions of the chunk loop). That last term is given twice: all
    of them (an upper bound: it includes LLVM's peeled iterations and remainders, whose work
    the per-iteration costs already count, and the partial-chunk paths), and only those whose
    source line lies outside every inner loop's body (the estimate).
    """
    import collections
    from deftnumba import backend, bench, roofline
    from deftnumba.kernels import fused_tiled as ft
    lines = phase_of_lines(ft.__file__)
    for name, cfg in plans.items():
        g = bench.SUITES[name]
        k = ft.fused_kernel("float32", 3, 3, 1, 1, 1, 1, cfg, True, True)
        ptx, _ = backend.cuda.compile_ptx(k.py_func, ft.kernel_signature("float32"), cc=(9, 0), lineinfo=True,
                                          launch_bounds=ft.launch_bounds(cfg))
        binary, log = cubin(ptx)
        rows, labels = parse(disassemble(binary))
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        found, spans = [], []
        for s, e in loops(rows, labels):
            body = rows[s:e + 1]
            tags = collections.Counter(lines.get(ln, "?") for _, _, ln in body).most_common(1)[0][0]
            ops = mix(body)
            found.append((tags, len(body), ops))
            spans.append((s, e))
        model = ft.phase_model(g, cfg)
        taps = 9
        unroll = ft._multiply_unroll(cfg, taps)
        reps, group = ft._slab_copy(cfg, taps)
        cost = {}
        # multiply: per source iteration (unroll rank-1 updates)
        m = min((l for l in found if l[0] == "multiply"), key=lambda l: l[1])
        cost["multiply"] = m[1] / (m[2]["FFMA"] / (unroll * cfg.reg_oc * cfg.reg_px))
        ffma_fraction = m[2]["FFMA"] / m[1]
        lds = {k: v for k, v in m[2].items() if k.startswith("LDS")}
        # weights: the full-chunk copy (fewest instructions per load); a source iteration copies `group`
        w = min((l for l in found if l[0] == "weights"), key=lambda l: l[1] / l[2]["LDG.E"])
        cost["weights"] = w[1] / (w[2]["LDG.E"] / group)
        # staging: a source iteration copies `chunk` channels of one position
        st = [l for l in found if l[0] == "staging"][0]
        cost["staging"] = st[1] / (st[2]["LDG.E"] / cfg.chunk)
        t = [l for l in found if l[0] == "table"][0]
        cost["table"] = t[1]  # one entry: the whole loop body (all paths)
        cost["columns"] = COLUMN_PATH * cfg.chunk / 4
        cost["epilogue"] = 4 * cfg.reg_oc * cfg.reg_px
        outer = max(found, key=lambda l: l[1])
        inner = sum(l[1] for l in found if l is not outer and l[1] > 1)
        # Non-loop code of the chunk loop whose source line is not in an inner loop's body:
        # LLVM's peeled first iterations and remainders repeat loop-body work that the
        # per-iteration costs already count (the static count above includes them).
        o_s, o_e = spans[found.index(outer)]
        inner_spans = [sp for sp, l in zip(spans, found) if l is not outer and l[1] > 1]
        body_lines = {ln for s0, e0 in inner_spans for _, _, ln in rows[s0:e0 + 1]}
        fixed = sum(1 for i in range(o_s, o_e + 1)
                    if not any(s0 <= i <= e0 for s0, e0 in inner_spans) and rows[i][2] not in body_lines)
        chunks = model["multiply"] * unroll // (cfg.chunk * taps)
        work = sum(cost[p] * model[p] for p in cost)
        per_thread = work + chunks * (outer[1] - inner)
        per_thread_low = work + chunks * fixed
        ffma = chunks * cfg.chunk * taps * cfg.reg_oc * cfg.reg_px
        tiles, by, n = cfg.blocks(g)
        blocks = tiles * by * n
        per_sm = -(-blocks // 132)
        warps = cfg.threads // 32
        issue_us = per_sm * warps * per_thread / (4 * 1.98e9) * 1e6
        issue_low = per_sm * warps * per_thread_low / (4 * 1.98e9) * 1e6
        floor_us = roofline.floor_ms(g) * 1e3
        smem = cfg.shared_bytes(g) + 1024
        by_regs = 65536 // (regs * cfg.threads)
        by_smem = (228 * 1024) // smem
        resident = min(by_regs, by_smem, 32, 2048 // cfg.threads)
        print(f"{name}: {cfg}")
        print(f"   registers {regs}, shared {cfg.shared_bytes(g)} B, blocks/SM {resident} (regs {by_regs}, smem {by_smem})"
              f" -> {resident * warps} warps/SM; blocks {blocks}, most per SM {per_sm}")
        print("   per-iteration:", {k: round(v, 1) for k, v in cost.items()},
              f"chunk-loop fixed code: {outer[1] - inner} static, {fixed} outside loop-body lines")
        print("   iterations   :", model)
        print(f"   multiply loop: {m[1]} instr, FFMA {100*ffma_fraction:.1f}%, {lds}")
        print(f"   per thread {per_thread_low:.0f}-{per_thread:.0f} instr, FFMA {ffma} "
              f"({100 * ffma / per_thread:.1f}-{100 * ffma / per_thread_low:.1f}%)")
        print(f"   issue-bound {issue_low:.1f}-{issue_us:.1f} us vs floor {floor_us:.1f} us: "
              f"{issue_low / floor_us:.2f}-{issue_us / floor_us:.2f}x")


def main(argv):
    from deftnumba import backend
    from deftnumba.kernels import fused_tiled
    if "--estimate" in argv:
        tiles = {"deft64": fused_tiled.GPU_CONFIG}
        from deftnumba import bench, tiling
        for name, g in bench.SUITES.items():
            tiles[name] = tiling.plan_for(g, methods=("fused",), device=tiling.H200).tile
        return estimate(tiles)
    want = [a for a in argv if not a.startswith("--")]
    dump = "--dump" in argv
    lines = phase_of_lines(fused_tiled.__file__)
    for name, dtype, kernel, sig in fused_tiled.ptx_cases():
        if dtype != "float32" or (want and not any(w in name for w in want)):
            continue
        bounds = kernel.targetoptions.get("launch_bounds")
        ptx, _ = backend.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), lineinfo=True, launch_bounds=bounds)
        report(name, ptx, lines, dump)


if __name__ == "__main__":
    main(sys.argv[1:])
