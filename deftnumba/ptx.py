"""Compile every kernel to PTX for a real GPU and audit it, without a GPU.

The simulator forgives what a GPU does not: untyped globals, float64
promotion, dynamic shared-array shapes. This module compiles each kernel that a
kernel module lists in its ``ptx_cases()`` with numba-cuda's real compiler
(NVVM; no driver or device needed) and reports, per kernel:

* the number of float64 instructions (must be 0 for float32 kernels);
* whether it uses local memory (``.local``: spills or runtime-indexed arrays);
* ptxas's resource report for sm_90, through nvJitLink (also no GPU needed):
  registers per thread, spill bytes, static shared memory. ptxas's shared-memory
  figure includes the 1 KB per block that sm_80+ reserves for the system: a kernel
  declaring exactly 48 KB (the static limit) reports 50176 B; one byte more fails to
  compile.

It must run with the ``cuda`` backend (``DEFTNUMBA_BACKEND=cuda``), because the
simulator has no compiler: ``python -m deftnumba ptx`` does that in a subprocess.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass

from . import backend, kernels


@dataclass
class PtxReport:
    kernel: str
    dtype: str
    lines: int
    f64_instructions: int
    uses_local_memory: bool
    f64_examples: list
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None


LAUNCH_BOUNDS = {}  # python function -> the launch bounds its kernel was jitted with


def cases():
    """``(name, dtype, python_function, numba_signature)`` from every kernel module
    (the kernel's launch bounds, if any, go to ``LAUNCH_BOUNDS[python_function]``)."""
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        if hasattr(module, "ptx_cases"):
            for name, dtype, kernel, signature in module.ptx_cases():
                LAUNCH_BOUNDS[kernel.py_func] = getattr(kernel, "targetoptions", {}).get("launch_bounds")
                yield f"{info.name}.{name}", dtype, kernel.py_func, signature


def ptxas_resources(ptx: str, cc=(9, 0)) -> dict:
    """``{registers, spill_bytes, shared_bytes}`` from ptxas (via nvJitLink) for one PTX module.

    Empty when nvJitLink is not installed (``pip install 'numba-cuda[cu13]'`` provides it).
    """
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return {}
    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")
    found = {}
    if m := re.search(r"Used (\d+) registers", text):
        found["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        found["spill_bytes"] = int(m.group(1)) + int(m.group(2))
    if m := re.search(r"(\d+) bytes smem", text):
        found["shared_bytes"] = int(m.group(1))
    return found


def audit(cc=(9, 0)) -> list[PtxReport]:
    """Compile every case for compute capability ``cc`` and report on its PTX."""
    if backend.IS_SIMULATOR:
        raise RuntimeError("the PTX audit needs DEFTNUMBA_BACKEND=cuda (no GPU is needed)")
    reports = []
    for name, dtype, func, signature in cases():
        ptx, _ = backend.cuda.compile_ptx(func, signature, cc=cc, launch_bounds=LAUNCH_BOUNDS.get(func))
        lines = ptx.splitlines()
        f64 = [ln.strip() for ln in lines if re.search(r"\.f64\b", ln) and not ln.strip().startswith("//")]
        reports.append(PtxReport(name, dtype, len(lines), len(f64),
                                 any(".local" in ln for ln in lines), f64[:5], **ptxas_resources(ptx, cc)))
    return reports
