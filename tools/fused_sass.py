"""Read the sm_90 SASS of the fused kernel without a GPU (a stop-gap until ``python -m deftnumba audit``).

Compiles a ``fused_tiled.ptx_cases()`` entry with numba-cuda (``DEFTNUMBA_BACKEND=cuda``),
links it with nvJitLink to an sm_90 cubin (with line info), disassembles it with the
``nvdisasm`` of the nvidia-cuda-nvdisasm wheel, and prints, for every loop (a backward
branch and the instructions between its target and itself), the instruction count, the
FFMA count, the shared-load widths, and the source lines (``# phase:`` tags) it covers.

    DEFTNUMBA_BACKEND=cuda PYTHONPATH=$PWD python tools/fused_sass.py [case-substring] [--dump]
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


def main(argv):
    from deftnumba import backend
    from deftnumba.kernels import fused_tiled
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
