"""Small kernels whose SASS the audit tests read (tests/test_sass.py).

Two versions of the same strided multiply-add: one in Numba's default int64 index
arithmetic with a modulo by a runtime int64 (a call to the 64-bit remainder routine), one
in int32 (the modulo inlines). Both carry ``# phase:`` markers.
"""

import numpy as np

from deftnumba.backend import cuda


@cuda.jit
def axpy_int64(x, y, a, n, period):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    # phase: body
    for k in range(i, n, stride):
        y[k] = a * x[k % period] + y[k]


@cuda.jit
def axpy_int32(x, y, a, n, period):
    # unsigned 32-bit: Numba widens int32 + int32 to int64, so every sum is cast back, and an
    # unsigned remainder of zero-extended values narrows to 32 bits (a signed one cannot)
    k = np.uint32(cuda.grid(1))
    stride = np.uint32(cuda.gridsize(1))
    # phase: body
    while k < n:
        y[k] = a * x[np.uint32(k % period)] + y[k]
        k = np.uint32(k + stride)


@cuda.jit
def two_phases(x, y, a, n):
    k0 = np.int32(cuda.threadIdx.x)
    # phase: copy
    k = k0
    while k < n:
        y[k] = x[k]
        k += np.int32(32)
    # phase: scale
    k = k0
    while k < n:
        y[k] = a * y[k] * y[k] + a
        k += np.int32(32)


def signatures():
    from numba import types

    f32 = types.Array(types.float32, 1, "C")
    return {
        "axpy_int64": (axpy_int64, (f32, f32, types.float32, types.int64, types.int64)),
        "axpy_int32": (axpy_int32, (f32, f32, types.float32, types.uint32, types.uint32)),
        "two_phases": (two_phases, (f32, f32, types.float32, types.int32)),
    }


def audit_all() -> dict:
    """Audit every kernel above (needs DEFTNUMBA_BACKEND=cuda): ``{name: KernelAudit dict}``."""
    from deftnumba.perf import sass

    out = {name: sass.audit_kernel(k, sig, name, "float32").to_json() for name, (k, sig) in signatures().items()}
    k, sig = signatures()["axpy_int32"]
    variants = sass.ptx_variants(k, sig, 3)  # NVVM recompiled from one IR (sass.ptx_variants)
    out["ptx_variants"] = {"compiles": sum(variants.values()),
                           "audits": [sass.audit_kernel(k, sig, "axpy_int32", "float32", ptx=ptx).to_json()
                                      for ptx in variants]}
    return out


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["--listing"]:  # print the SASS of two_phases (to refresh the test snippet)
        from deftnumba.perf import sass

        k, sig = signatures()["two_phases"]
        print(sass.disassemble(sass.compile_cubin(k, sig)[1]))
    else:
        print(json.dumps(audit_all()))
