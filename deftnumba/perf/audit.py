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

**The kernel registry.** ``KERNEL_PACKAGES`` lists one kernels package per system
(``deftnumba.dcn.kernels``, ``deftnumba.tucker.kernels``, ``deftnumba.lean.kernels``);
a package not present is skipped, ``register_kernel_package`` adds one. Every
module of a registered package that defines ``ptx_cases()`` -- a list of
``(name, dtype, kernel, numba_signature)`` -- is audited, and the same walk
(``registered_cases``) drives ``tools/sanitizer_cases.py``: nothing escapes either.

It must run with the ``cuda`` backend (``DEFTNUMBA_BACKEND=cuda``), because the
simulator has no compiler: ``python -m deftnumba ptx`` does that in a subprocess.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass

from ..runtime import backend

KERNEL_PACKAGES = ["deftnumba.dcn.kernels", "deftnumba.tucker.kernels", "deftnumba.lean.kernels"]
"""Every system's kernels package, in audit order; missing ones are skipped."""


def register_kernel_package(package: str) -> None:
    """Add a kernels package (dotted name) to the audit and the sanitizer runs."""
    if package not in KERNEL_PACKAGES:
        KERNEL_PACKAGES.append(package)


def kernel_modules():
    """``(package, module)`` for every module with ``ptx_cases()`` in every registered package."""
    for package in KERNEL_PACKAGES:
        try:
            found = importlib.import_module(package)
        except ModuleNotFoundError as err:
            if err.name and package.startswith(err.name):
                continue  # this system (or its kernels) does not exist in this checkout
            raise
        for info in pkgutil.iter_modules(found.__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            if hasattr(module, "ptx_cases"):
                yield package, module


def registered_cases():
    """``(name, dtype, kernel, numba_signature)`` of every registered kernel, ``kernel`` as its
    ``ptx_cases()`` gives it. Names are ``<module>.<case>`` for DCN, ``<system>.<module>.<case>``
    for the other systems."""
    for package, module in kernel_modules():
        system = package.removeprefix("deftnumba.").split(".")[0]
        prefix = "" if system == "dcn" else f"{system}."
        short = module.__name__.rsplit(".", 1)[-1]
        for name, dtype, kernel, signature in module.ptx_cases():
            yield f"{prefix}{short}.{name}", dtype, kernel, signature


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


def cases():
    """``(name, dtype, dispatcher, numba_signature)`` from every registered kernel module."""
    yield from registered_cases()


def compile_options(kernel) -> dict:
    """The options of a ``@cuda.jit`` kernel that change its machine code (``launch_bounds``),
    for ``compile_ptx``: the audit compiles what the GPU would run."""
    bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
    return {"launch_bounds": bounds} if bounds else {}


def ptxas_resources(ptx: str, cc=(9, 0)) -> dict:
    """``{registers, spill_bytes, shared_bytes}`` from ptxas (via nvJitLink) for one PTX module.

    Empty when nvJitLink is not installed (``pip install 'numba-cuda[cu13]'`` provides it).
    """
    try:
        from cuda.bindings import nvjitlink  # noqa: F401  (only: is it installed?)
    except ImportError:
        return {}
    from .sass import link_cubin

    return link_cubin(ptx, cc, lineinfo=False)[1]


def audit(cc=(9, 0), report=None) -> list[PtxReport]:
    """Compile every case for compute capability ``cc`` and report on its PTX.
    ``report(i, n, name)`` is called before each compilation (progress)."""
    if backend.IS_SIMULATOR:
        raise RuntimeError("the PTX audit needs DEFTNUMBA_BACKEND=cuda (no GPU is needed)")
    reports = []
    todo = list(cases())
    for i, (name, dtype, kernel, signature) in enumerate(todo):
        if report is not None:
            report(i + 1, len(todo), f"{name} ({dtype})")
        ptx, _ = backend.cuda.compile_ptx(kernel.py_func, signature, cc=cc, **compile_options(kernel))
        lines = ptx.splitlines()
        f64 = [ln.strip() for ln in lines if re.search(r"\.f64\b", ln) and not ln.strip().startswith("//")]
        reports.append(PtxReport(name, dtype, len(lines), len(f64),
                                 any(".local" in ln for ln in lines), f64[:5], **ptxas_resources(ptx, cc)))
    return reports
