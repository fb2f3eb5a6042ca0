#!/usr/bin/env python3
"""Run every kernel of every method, forward and backward, on randomized and extreme cases.

Written to run under ``compute-sanitizer`` on a GPU (``tools/gpu_check.sh`` does that),
and checked in the simulator, where ``--bounds-check`` (on by default there) makes
every kernel index bounds-checked and shared/local memory NaN-poisoned
(``deftnumba.backend.bounds_checked``)::

    DEFTNUMBA_BACKEND=simulator python tools/sanitizer_cases.py --quick
    DEFTNUMBA_BACKEND=cuda compute-sanitizer --tool memcheck python3 tools/sanitizer_cases.py --no-pool

Each case runs every forward method in ``dn.METHODS``, every backward method (both
``deterministic`` settings), and the fused kernel's counting build; results are
compared with ``deftnumba.reference`` unless the case has non-finite data or
``--no-check`` is given. On the GPU the arrays are CuPy arrays (strided and
negative-stride views included), so no host copy hides a bad access; ``--no-pool``
turns CuPy's memory pool off so that every array is its own allocation and an
access past its end is one memcheck can see.

The launches are recorded: the summary lists every kernel that ran, and every kernel
a kernel module declares (``ptx_cases``) that never did. Exit status: 0 if every
case ran and matched, 1 otherwise (2 with ``--require-coverage`` if a kernel never ran).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
os.environ.setdefault("DEFTNUMBA_QUIET", "1")

import numpy as np  # noqa: E402

import deftnumba as dn  # noqa: E402
from deftnumba.runtime import backend  # noqa: E402
from deftnumba.dcn import ops, reference  # noqa: E402
from deftnumba.perf import audit  # noqa: E402
from deftnumba.dcn.geometry import Geometry  # noqa: E402

SPECIALS = [np.nan, np.inf, -np.inf, 1e10, -1e10, 2.0**31, -(2.0**31), 3e9, -3e9, 2.0**63, 1e30, -1.0, 0.0]


@dataclass
class Case:
    name: str
    g: Geometry
    offset_kind: str = "normal"  # normal | integer | far | specials
    layout: str = "contiguous"  # contiguous | strided | negative | fortran
    poison: bool = False  # NaN in the input and the mask (no reference check)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def geometry(n=1, c=2, h=5, w=6, c_out=3, kh=3, kw=3, stride=(1, 1), pad=(1, 1), dil=(1, 1), groups=1,
             offset_groups=1, mask=True, bias=True, dtype="float32") -> Geometry:
    return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=kh, kernel_w=kw,
                    stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1], dil_h=dil[0],
                    dil_w=dil[1], groups=groups, offset_groups=offset_groups, has_mask=mask, has_bias=bias,
                    dtype=dtype)


def extreme_cases(big: bool):
    """Hand-made edge cases: the shapes and values where kernels go wrong."""
    s = 4 if big else 1
    yield Case("basic", geometry(n=2, c=4 * s, h=6 * s, w=7 * s, c_out=5))
    yield Case("special-offsets", geometry(n=2, c=4), offset_kind="specials")
    yield Case("far-offsets", geometry(n=1, c=2), offset_kind="far")
    yield Case("integer-offsets-band-edges", geometry(n=1, c=2, h=4, w=5), offset_kind="integer")
    yield Case("one-pixel-image", geometry(n=2, c=2, h=1, w=1, c_out=2))
    yield Case("kernel-larger-than-image", geometry(n=1, c=2, h=2, w=3, kh=5, kw=4, pad=(4, 3), dil=(2, 1)))
    yield Case("stride-dilation-pairs", geometry(n=2, c=3, h=9, w=8, kh=3, kw=2, stride=(2, 3), pad=(2, 0),
                                                  dil=(1, 2), c_out=4))
    yield Case("groups-and-offset-groups", geometry(n=2, c=6, h=5, w=5, c_out=4, groups=2, offset_groups=3))
    yield Case("depthwise", geometry(n=1, c=4, h=5, w=5, c_out=4, groups=4, offset_groups=4, mask=False))
    yield Case("no-mask-no-bias", geometry(n=2, c=2, mask=False, bias=False))
    yield Case("float64", geometry(n=2, c=3, h=5, w=4, dtype="float64"), offset_kind="specials")
    yield Case("batch-past-one-chunk", geometry(n=33 + 32 * (s > 1), c=2, h=2, w=2, c_out=2, kh=1, kw=1,
                                                 pad=(0, 0)))
    yield Case("strided-views", geometry(n=2, c=4, h=5, w=6), layout="strided")
    yield Case("negative-strides", geometry(n=2, c=2, h=5, w=6), layout="negative")
    yield Case("fortran-order", geometry(n=2, c=2, h=5, w=6), layout="fortran")
    yield Case("nan-inf-input-and-mask", geometry(n=2, c=2, h=5, w=6), poison=True)
    yield Case("tile-edges", geometry(n=1, c=3, h=11 * s, w=13 * s, c_out=6, kh=3, kw=3, pad=(1, 1)),
               offset_kind="integer")


def random_cases(count: int, seed: int):
    """Layers drawn like ``tests/test_fuzz.py`` draws them (small, irregular)."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        kh, kw = rng.integers(1, 6, 2)
        dh, dw = rng.integers(1, 4, 2)
        sh, sw = rng.integers(1, 4, 2)
        h, w = rng.integers(1, 10, 2)
        ph = max(0, math.ceil((dh * (kh - 1) + 1 - h) / 2)) + rng.integers(0, 3)
        pw = max(0, math.ceil((dw * (kw - 1) + 1 - w) / 2)) + rng.integers(0, 3)
        groups, offset_groups = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])
        c = math.lcm(int(groups), int(offset_groups)) * int(rng.integers(1, 3))
        g = geometry(n=int(rng.integers(1, 3)), c=c, h=int(h), w=int(w), c_out=int(groups * rng.integers(1, 3)),
                     kh=int(kh), kw=int(kw), stride=(int(sh), int(sw)), pad=(int(ph), int(pw)),
                     dil=(int(dh), int(dw)), groups=int(groups), offset_groups=int(offset_groups),
                     mask=bool(rng.random() < 0.7), bias=bool(rng.random() < 0.5),
                     dtype=str(rng.choice(["float32", "float64"])))
        if g.out_h < 1 or g.out_w < 1 or g.batch * c * g.taps * g.out_h * g.out_w > 3000:
            continue
        kind = str(rng.choice(["normal", "normal", "integer", "far", "specials"]))
        yield Case(f"random-{made}", g, offset_kind=kind, seed=int(rng.integers(2**31)))
        made += 1


# --------------------------------------------------------------------------- data
def host_arrays(case: Case):
    g, rng = case.g, np.random.default_rng(case.seed)
    dt, s = np.dtype(g.dtype), g.shapes
    x = rng.standard_normal(s["input"])
    shape = s["offset"]
    reach = max(g.height, g.width) + max(g.kernel_h * g.dil_h, g.kernel_w * g.dil_w)
    offset = {"normal": lambda: rng.standard_normal(shape) * 1.5,
              "integer": lambda: rng.integers(-reach, reach + 1, shape).astype(float),
              "far": lambda: rng.choice([-1, 1], shape) * 10.0 ** rng.uniform(3, 12, shape),
              "specials": lambda: np.where(rng.random(shape) < 0.5, rng.choice(SPECIALS, shape),
                                           rng.standard_normal(shape) * 2)}[case.offset_kind]()
    weight = rng.standard_normal(s["weight"])
    bias = rng.standard_normal(s["bias"]) if g.has_bias else None
    mask = rng.uniform(0.1, 1.0, s["mask"]) if g.has_mask else None
    grad_out = rng.standard_normal(s["output"])
    if case.poison:
        x.reshape(-1)[rng.integers(0, x.size, 3)] = [np.nan, np.inf, -np.inf]
        if mask is not None:
            mask.reshape(-1)[rng.integers(0, mask.size, 2)] = [np.nan, np.inf]
    cast = [None if a is None else a.astype(dt) for a in (x, offset, weight, bias, mask, grad_out)]
    return cast


def _on_device(a, layout, xp):
    """``a`` (host) as a device array in ``layout``, with the same values."""
    if a is None:
        return None
    if layout == "strided" and a.ndim > 1:
        big = xp.zeros(tuple(2 * d for d in a.shape), a.dtype)
        index = tuple(slice(None, None, 2) for _ in a.shape)
        big[index] = xp.asarray(a)
        return big[index]
    if layout == "negative":
        flip = (slice(None, None, -1),) * a.ndim
        return xp.ascontiguousarray(xp.asarray(a)[flip])[flip]
    if layout == "fortran":
        return xp.asfortranarray(xp.asarray(a))
    return xp.asarray(a) if xp is not np else a.copy()


def device_arrays(host, layout):
    xp = np if backend.IS_SIMULATOR else backend.cupy()
    return [_on_device(a, layout, xp) for a in host]


# --------------------------------------------------------------------------- launches
LAUNCHES: Counter = Counter()


def _kernel_name(fn) -> str:
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__.replace('.<locals>.kernel', '')}"


@contextlib.contextmanager
def recording_launches():
    """Count launches per kernel factory (simulator and numba-cuda launch paths)."""
    if backend.IS_SIMULATOR:
        from numba.cuda.simulator import kernel as sim

        original = sim.FakeCUDAKernel.__call__

        def call(self, *args):
            if not self._device and not sim._kernel_context:
                LAUNCHES[_kernel_name(self.fn)] += 1
            return original(self, *args)

        sim.FakeCUDAKernel.__call__ = call
        try:
            yield
        finally:
            sim.FakeCUDAKernel.__call__ = original
        return
    from numba.cuda import dispatcher

    original = dispatcher._LaunchConfiguration.__call__

    def launch(self, *args):
        LAUNCHES[_kernel_name(self.dispatcher.py_func)] += 1
        return original(self, *args)

    dispatcher._LaunchConfiguration.__call__ = launch
    try:
        yield
    finally:
        dispatcher._LaunchConfiguration.__call__ = original


def declared_kernels() -> set[str]:
    """Every DCN kernel factory a registered kernel module lists in ``ptx_cases()`` (the
    audit's registry, ``deftnumba.perf.audit.registered_cases``). This driver runs DCN
    layers, so the other systems' kernels (tucker, lean) are not expected to run here."""
    names = set()
    for _, _, kernel, _ in audit.registered_cases():
        fn = getattr(kernel, "py_func", None) or getattr(kernel, "fn", None)
        if fn is not None and fn.__module__.startswith("deftnumba.dcn."):
            names.add(_kernel_name(fn))
    return names


# --------------------------------------------------------------------------- running
def conv_kwargs(g):
    return dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_h, g.pad_w), dilation=(g.dil_h, g.dil_w))


def _close(got, want, dtype, what):
    got = np.asarray(backend.to_host(got), np.float64)
    want = np.asarray(want, np.float64)
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-6)
    if got.shape != want.shape or not np.all(np.isfinite(got)) or np.abs(got - want).max() > tol * scale:
        err = np.abs(got - want).max() if got.shape == want.shape else "shape"
        raise AssertionError(f"{what}: max error {err} (scale {scale:.3g})")


def backward_methods():
    if getattr(dn, "deform_conv2d_backward", None) is None:
        return []
    return list(getattr(dn, "BACKWARD_METHODS", None) or getattr(ops, "BACKWARD_METHODS", ()) or ["auto"])


def run_case(case: Case, check: bool, methods, log) -> list[str]:
    """Run one case through everything; return the failures."""
    g = case.g
    host = host_arrays(case)
    x, offset, weight, bias, mask, grad_out = device_arrays(host, case.layout)
    check = check and not case.poison
    failures = []
    expected = reference.deform_conv2d(*host[:4], **conv_kwargs(g), mask=host[4]) if check else None
    for method in methods:
        try:
            out = dn.deform_conv2d(x, offset, weight, bias, **conv_kwargs(g), mask=mask, method=method)
            backend.synchronize()
            if check:
                _close(out, expected, g.dtype, f"forward[{method}]")
        except Exception as err:  # noqa: BLE001  (report every failure, keep going)
            failures.append(f"{case.name}: forward[{method}]: {type(err).__name__}: {err}")
            log(traceback.format_exc())
    back = backward_methods()
    ref_back = getattr(reference, "deform_conv2d_backward", None)
    expected_grads = (ref_back(host[5], *host[:4], **conv_kwargs(g), mask=host[4])
                      if back and ref_back and check else None)
    for method in back:
        for deterministic in (False, True):
            what = f"backward[{method}, deterministic={deterministic}]"
            try:
                grads = dn.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv_kwargs(g), mask=mask,
                                                  method=method, deterministic=deterministic)
                backend.synchronize()
                if expected_grads is not None:
                    for name in ("input", "offset", "weight", "bias", "mask"):
                        want = getattr(expected_grads, name)
                        if want is not None:
                            _close(getattr(grads, name), want, g.dtype, f"{what}.{name}")
            except Exception as err:  # noqa: BLE001
                failures.append(f"{case.name}: {what}: {type(err).__name__}: {err}")
                log(traceback.format_exc())
    try:  # the fused kernel's counting build (a separate compiled variant)
        from deftnumba.dcn.kernels import fused_tiled

        fused_tiled.count_out_of_tile(g, offset)
        backend.synchronize()
    except ImportError:
        pass
    except Exception as err:  # noqa: BLE001
        failures.append(f"{case.name}: fused count_out_of_tile: {type(err).__name__}: {err}")
        log(traceback.format_exc())
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the extreme cases and 4 random ones")
    parser.add_argument("--random", type=int, default=None, help="random cases (default 24; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--big", action="store_true", help="larger extreme cases (GPU)")
    parser.add_argument("--methods", default="", help="comma-separated forward methods (default: all)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--no-check", action="store_true", help="run without comparing to the reference")
    parser.add_argument("--no-pool", action="store_true", help="GPU: CuPy allocates with cudaMalloc directly")
    parser.add_argument("--bounds-check", dest="bounds", action="store_true", default=None,
                        help="simulator: bounds-checked indexing, NaN-poisoned shared/local memory (default there)")
    parser.add_argument("--no-bounds-check", dest="bounds", action="store_false")
    parser.add_argument("--require-coverage", action="store_true", help="exit 2 if a declared kernel never ran")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    def log(text):
        if args.verbose:
            print(text, flush=True)

    n_random = args.random if args.random is not None else (4 if args.quick else 24)
    cases = list(extreme_cases(args.big)) + list(random_cases(n_random, args.seed))
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    methods = [m for m in args.methods.split(",") if m] or list(dn.METHODS)
    if args.list:
        for case in cases:
            print(case.name, case.offset_kind, case.layout, case.g)
        return 0

    if not backend.IS_SIMULATOR and args.no_pool:
        backend.cupy().cuda.set_allocator(None)
    bounds = backend.IS_SIMULATOR if args.bounds is None else args.bounds
    print(f"sanitizer cases: backend={backend.NAME}, {len(cases)} cases, forward {methods}, "
          f"backward {backward_methods()}, bounds-check={bounds and backend.IS_SIMULATOR}, "
          f"check={not args.no_check}", flush=True)
    failures = []
    start = time.perf_counter()
    checker = backend.bounds_checked() if bounds and backend.IS_SIMULATOR else contextlib.nullcontext()
    with recording_launches(), checker:
        for case in cases:
            t0 = time.perf_counter()
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                if case.poison:  # NaN/inf arithmetic is the point here (simulator warnings)
                    warnings.simplefilter("ignore", RuntimeWarning)
                found = run_case(case, not args.no_check, methods, log)
            failures += found
            status = "ok" if not found else f"FAILED ({len(found)})"
            print(f"  {case.name:32s} {case.g.dtype:8s} {case.layout:10s} {case.offset_kind:9s} "
                  f"{status} {time.perf_counter() - t0:.1f}s", flush=True)

    print(f"\nkernel launches ({sum(LAUNCHES.values())} in {time.perf_counter() - start:.1f}s):")
    for name, count in sorted(LAUNCHES.items()):
        print(f"  {count:6d}  {name}")
    never = sorted(declared_kernels() - set(LAUNCHES))
    if never:
        print("declared kernels that never ran: " + ", ".join(never))
    if failures:
        print(f"\n{len(failures)} FAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    print("\nall cases ran and matched" if not args.no_check else "\nall cases ran")
    return 2 if (never and args.require_coverage) else 0


if __name__ == "__main__":
    sys.exit(main())
