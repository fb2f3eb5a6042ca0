"""Read the sm_90 SASS of deftnumba's kernels and count the instructions of every loop.

A stopgap until ``python -m deftnumba audit`` (issue 10) prints the same figures; it is
how docs/perf-notes.md's column-kernel tables were measured. No GPU is needed:

    DEFTNUMBA_BACKEND=cuda PYTHONPATH=. python tools/sass_loops.py im2col fused_columns
    DEFTNUMBA_BACKEND=cuda PYTHONPATH=. python tools/sass_loops.py im2col --only 'columns[mask=True]' --listing
    ... --json   (one line of figures; tests/test_column_sass.py reads it)

For each float32 case of each module's ``ptx_cases()``: numba-cuda's ``compile_ptx`` (with
the kernel's launch bounds, as ``deftnumba.ptx.audit`` does), nvJitLink to an sm_90 cubin
with line info, ``nvdisasm`` (the nvidia-cuda-nvdisasm wheel), then:

* registers (ptxas), and counts of float64, local-memory (LDL/STL) and CALL instructions;
* every loop, found from backward branches: its first and last instruction and its
  static instruction count (the body executed once per iteration when no branch
  inside it is taken; a loop nested inside is counted in its parent too), and the
  loop's instruction mix. Static counts are predictions, not measurements.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("DEFTNUMBA_BACKEND", "cuda")
os.environ.pop("NUMBA_ENABLE_CUDASIM", None)

from deftnumba import backend  # noqa: E402
from deftnumba.ptx import compile_options  # noqa: E402

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def nvdisasm() -> str:
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin",
                                          "nvdisasm")))
    if not found:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    return found[-1]


def cubin(ptx: str) -> tuple[bytes, str]:
    """sm_90 cubin and ptxas's log, through nvJitLink."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(3, ["-arch=sm_90", "-verbose", "-lineinfo"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        binary = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, binary)
    finally:
        nvjitlink.destroy(handle)
    return bytes(binary), log.decode(errors="replace")


def instructions(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of the kernel's own text section (labels resolved)."""
    sections = re.split(r"\n\s*\.section\s+", text)
    main = max((s for s in sections if s.startswith(".text.")), key=len)
    found, labels, pending = [], {}, []
    for line in main.splitlines():
        if m := LABEL.match(line):
            pending.append(m.group(1))
        elif m := INSTRUCTION.search(line):
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            if m.group(3) != "NOP":
                found.append((address, m.group(3), m.group(4)))
    return [(a, op, re.sub(r"`\((\.L_x_\d+)\)", lambda t: f"0x{labels.get(t.group(1), -1):x}", rest))
            for a, op, rest in found]


def loops(found) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop (a branch to an earlier address)."""
    index = {address: i for i, (address, _, _) in enumerate(found)}
    spans = []
    for i, (address, op, rest) in enumerate(found):
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < address and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], i))
    return spans


def measure(kernel, signature) -> dict:
    """Registers, F64/LDL-STL/CALL counts, every loop's ``(first, last, count, mix)`` and the
    SASS of one kernel compiled for sm_90."""
    ptx, _ = backend.cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0), lineinfo=True,
                                      **compile_options(kernel))
    binary, log = cubin(ptx)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        text = subprocess.run([nvdisasm(), "-c", "-g", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = instructions(text)
    registers = re.search(r"Used (\d+) registers", log)
    spans = [(first, last) for first, last in loops(found) if last > first]
    return {
        "instructions": len(found),
        "registers": int(registers.group(1)) if registers else None,
        "f64": sum(1 for _, op, _ in found if op.startswith("D") or ".F64" in op),
        "local": sum(1 for _, op, _ in found if op.startswith(("LDL", "STL"))),
        "calls": sum(1 for _, op, _ in found if op.startswith("CALL")),
        "loops": [{"first": first, "last": last, "count": last - first + 1,
                   "innermost": not any(a >= first and b <= last and (a, b) != (first, last) for a, b in spans),
                   "mix": collections.Counter(op.split(".")[0] for _, op, _ in found[first:last + 1])}
                  for first, last in spans],
        "sass": found,
    }


def report(name: str, kernel, signature, listing: bool = False) -> None:
    m = measure(kernel, signature)
    print(f"{name}: {m['instructions']} instructions, {m['registers']} registers, "
          f"F64 {m['f64']}, LDL/STL {m['local']}, CALL {m['calls']}")
    for loop in m["loops"]:
        print(f"  loop [{loop['first']}..{loop['last']}]: {loop['count']} instructions"
              f"{' (innermost)' if loop['innermost'] else ''}; "
              + ", ".join(f"{op} {n}" for op, n in loop["mix"].most_common(12)))
    if listing:
        for address, op, rest in m["sass"]:
            print(f"    {address:05x}  {op}{rest}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="kernel modules, e.g. im2col fused_columns")
    parser.add_argument("--only", default="", help="cases whose name contains this")
    parser.add_argument("--listing", action="store_true", help="print the SASS too")
    parser.add_argument("--json", action="store_true", help="one JSON line: per case, the figures (no SASS)")
    args = parser.parse_args(argv)
    figures = {}
    for module_name in args.modules:
        module = importlib.import_module(f"deftnumba.kernels.{module_name}")
        for name, dtype, kernel, signature in module.ptx_cases():
            if dtype == "float32" and args.only in name:
                if args.json:
                    m = measure(kernel, signature)
                    m.pop("sass")
                    figures[f"{module_name}.{name}"] = m
                else:
                    report(f"{module_name}.{name}", kernel, signature, args.listing)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
