"""What 64-bit indexing costs: one register-blocked multiply loop, written twice, read in SASS.

A lesson for notebook 01 (section 8), and the smallest honest demonstration of the house's
kernel conventions (``../shared/DESIGN.md``, "Kernel conventions"). Two kernels compute the
same ``c = a @ b`` (float32) the same way: a block stages a ``TILE_K``-deep slice of ``a``
and of ``b`` in shared memory, and each of its ``THREADS`` threads accumulates a
``REG x REG`` (4x4) block of ``c`` with one rank-1 update (4 weights times 4 columns: 16
FFMA) per step of the slice, the shape of the ``fused`` kernel's multiply loop.

* ``gemm_before``: written the way Numba code usually is. 2-D arrays and 2-D shared
  arrays subscripted with Python ints, which Numba types as **int64**, and every signed
  subscript gets a **negative-index wraparound** test (``i < 0 -> i + size``); ``range``
  loops with an int64 counter; each thread owns rows and columns **strided** by the
  thread grid (``ty + i * THREADS_M``), the layout that makes global stores coalesce, so its
  four values of a shared row are four separate scalar ``LDS``.
* ``gemm_after``: the house discipline. Flat arrays; every index inside a matrix is a
  ``uint32`` and is wrapped in ``u32(...)`` after each operation (Numba widens
  ``uint32 + int`` to int64; the wrap lets LLVM narrow the arithmetic back to 32 bits, and
  an unsigned subscript needs no wraparound test); flat shared arrays declared with
  ``alignment=16``; each thread owns 4 **contiguous** rows and 4 contiguous columns, so a
  step's 4 + 4 shared values are two ``LDS.128``; the multiply loop is a ``while`` loop on
  a ``uint32`` running offset.

Both keep float32 discipline (``float32`` zeros, no float64 literals), so the difference is
indexing and ownership only. Both run in the simulator (``multiply``), checked against
NumPy by ``tests/perf/test_indexing_lesson.py``.

``lesson_figures()`` compiles both for sm_90 (numba-cuda + nvJitLink, read with
``nvdisasm``: no GPU; in a ``DEFTNUMBA_BACKEND=cuda`` subprocess when this process runs the
simulator) and returns, per variant, the registers, the hottest loop's instructions per
trip and per rank-1 update, its FFMA share and shared-load widths, an excerpt of its SASS,
the 64-bit integer instructions, and the whole kernel's instruction mix. Every figure is
**static**: instructions read from the SASS, never a time. Without a compiler it returns the
reading stored in ``perf/data/indexing_lesson.json`` (``python -m
deftnumba.perf.indexing_lesson --write`` refreshes it), and says so.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..runtime import backend
from ..runtime.backend import cuda
from . import sass

# ---------------------------------------------------------------------------- the tile
REG = 4                              # a thread's block of c: REG x REG values, 16 FFMA per step
THREADS_M, THREADS_N = 8, 8          # the block's threads, as a THREADS_M x THREADS_N grid
THREADS = THREADS_M * THREADS_N      # 64 threads: two warps
TILE_M = THREADS_M * REG             # 32 rows of c per block
TILE_N = THREADS_N * REG             # 32 columns of c per block
TILE_K = 8                           # steps (rank-1 updates) per staged slice
STEPS = 4                            # rank-1 updates per trip of the after kernel's loop (divides TILE_K)
FMA_PER_STEP = REG * REG
A_SLICE = TILE_K * TILE_M            # shared and local shapes must be compile-time ints: named
B_SLICE = TILE_K * TILE_N            # here, since Numba does not fold TILE_K * TILE_M in a kernel

ZERO = np.float32(0.0)
u32 = np.uint32
VARIANTS = ("before", "after")
DATA = Path(__file__).resolve().parent / "data" / "indexing_lesson.json"
"""The stored reading (``--write``), used where nothing can compile."""

# Traffic (both kernels): a is read ceil(N / TILE_N) times and b ceil(M / TILE_M) times
# (once per block column / row of blocks), c written once; 2*M*N*K FLOPs. The slices stay
# on chip (shared memory, TILE_K * (TILE_M + TILE_N) * 4 B = 2 KB per block).


# ---------------------------------------------------------------------------- before
@cuda.jit
def gemm_before(a, b, c):
    """``c = a @ b`` (2-D float32 arrays), written the way Numba code usually is."""
    a_tile = cuda.shared.array((TILE_K, TILE_M), np.float32)  # a_tile[k, m]
    b_tile = cuda.shared.array((TILE_K, TILE_N), np.float32)  # b_tile[k, n]
    acc = cuda.local.array((REG, REG), np.float32)
    m_size, k_size = a.shape
    n_size = b.shape[1]
    tx = cuda.threadIdx.x % THREADS_N  # this thread's columns: tx, tx + 8, tx + 16, tx + 24
    ty = cuda.threadIdx.x // THREADS_N  # its rows: ty, ty + 8, ...
    m0 = cuda.blockIdx.y * TILE_M
    n0 = cuda.blockIdx.x * TILE_N
    for i in range(REG):
        for j in range(REG):
            acc[i, j] = ZERO
    for k0 in range(0, k_size, TILE_K):
        depth = min(TILE_K, k_size - k0)
        # phase: staging
        for e in range(cuda.threadIdx.x, TILE_M * TILE_K, THREADS):
            m = e // TILE_K  # consecutive threads read consecutive k of a row of a
            k = e % TILE_K
            v = ZERO
            if k < depth and m0 + m < m_size:
                v = a[m0 + m, k0 + k]
            a_tile[k, m] = v
        for e in range(cuda.threadIdx.x, TILE_K * TILE_N, THREADS):
            k = e // TILE_N
            n = e % TILE_N
            v = ZERO
            if k < depth and n0 + n < n_size:
                v = b[k0 + k, n0 + n]
            b_tile[k, n] = v
        cuda.syncthreads()  # the slices of a and b are staged
        # phase: multiply
        for k in range(depth):
            for i in range(REG):
                for j in range(REG):
                    acc[i, j] += a_tile[k, ty + i * THREADS_M] * b_tile[k, tx + j * THREADS_N]
        cuda.syncthreads()  # every thread has read the slices: the next stage may overwrite them
    # phase: epilogue
    for i in range(REG):
        for j in range(REG):
            m = m0 + ty + i * THREADS_M
            n = n0 + tx + j * THREADS_N
            if m < m_size and n < n_size:
                c[m, n] = acc[i, j]


# ---------------------------------------------------------------------------- after
@cuda.jit
def gemm_after(a, b, c, m_size, n_size, k_size):
    """``c = a @ b`` on flat row-major float32 arrays (``m_size x k_size`` times
    ``k_size x n_size``; sizes uint32, every matrix under 2**32 elements), in the house style."""
    a_tile = cuda.shared.array(A_SLICE, dtype=np.float32, alignment=16)  # [k][m], flat
    b_tile = cuda.shared.array(B_SLICE, dtype=np.float32, alignment=16)  # [k][n], flat
    acc = cuda.local.array(FMA_PER_STEP, np.float32)
    a_reg = cuda.local.array(REG, np.float32)
    b_reg = cuda.local.array(REG, np.float32)
    tid = u32(cuda.threadIdx.x)
    m_first = u32(u32(tid // THREADS_N) * REG)  # this thread's rows: m_first .. m_first + 3
    n_first = u32(u32(tid % THREADS_N) * REG)  # its columns: n_first .. n_first + 3
    m0 = u32(u32(cuda.blockIdx.y) * TILE_M)
    n0 = u32(u32(cuda.blockIdx.x) * TILE_N)
    for i in range(REG * REG):
        acc[i] = ZERO
    k0 = u32(0)
    while k0 < k_size:
        depth = u32(min(u32(TILE_K), u32(k_size - k0)))
        # phase: staging
        e = tid
        while e < TILE_M * TILE_K:
            m = u32(e // TILE_K)  # a constant divisor: a shift
            k = u32(e - m * TILE_K)
            v = ZERO
            if k < depth and u32(m0 + m) < m_size:
                v = a[u32(u32(m0 + m) * k_size + u32(k0 + k))]
            a_tile[u32(k * TILE_M + m)] = v
            e = u32(e + THREADS)
        e = tid
        while e < TILE_K * TILE_N:
            k = u32(e // TILE_N)
            n = u32(e - k * TILE_N)
            v = ZERO
            if k < depth and u32(n0 + n) < n_size:
                v = b[u32(u32(k0 + k) * n_size + u32(n0 + n))]
            b_tile[e] = v
            e = u32(e + THREADS)
        cuda.syncthreads()  # the slices of a and b are staged
        # phase: multiply
        # STEPS rank-1 updates per trip, written out (the rows past `depth` were staged as
        # zeros, so rounding the trip count up adds nothing): the loop's counter and branch
        # are paid once per STEPS * 16 FFMA.
        a_at = m_first  # running offsets into the slices: this thread's first value of row k
        b_at = n_first
        a_stop = u32(m_first + u32(u32(depth + (STEPS - 1)) // STEPS) * (STEPS * TILE_M))
        while a_at < a_stop:
            for s in range(STEPS):
                # 4 consecutive floats at a 16-byte boundary: one LDS.128 each. The subscripts
                # are not wrapped: a uint32 plus a small constant is provably >= 0 (no
                # wraparound test) and cannot wrap, so LLVM sees four consecutive addresses
                # and fuses the loads (u32(a_at + i) could wrap at 2**32, forbidding that).
                for i in range(REG):
                    a_reg[i] = a_tile[a_at + (s * TILE_M + i)]
                for j in range(REG):
                    b_reg[j] = b_tile[b_at + (s * TILE_N + j)]
                for i in range(REG):
                    for j in range(REG):
                        acc[i * REG + j] += a_reg[i] * b_reg[j]
            a_at = u32(a_at + STEPS * TILE_M)
            b_at = u32(b_at + STEPS * TILE_N)
        cuda.syncthreads()  # every thread has read the slices: the next stage may overwrite them
        k0 = u32(k0 + TILE_K)
    # phase: epilogue
    for i in range(REG):
        m = u32(m0 + m_first + i)
        for j in range(REG):
            n = u32(n0 + n_first + j)
            if m < m_size and n < n_size:
                c[u32(m * n_size + n)] = acc[i * REG + j]


KERNELS = {"before": gemm_before, "after": gemm_after}


def signatures() -> dict:
    """``{variant: (kernel, numba signature)}`` for the compiler."""
    from numba import types

    f32_2d = types.Array(types.float32, 2, "C")
    f32_1d = types.Array(types.float32, 1, "C")
    return {"before": (gemm_before, (f32_2d, f32_2d, f32_2d)),
            "after": (gemm_after, (f32_1d, f32_1d, f32_1d, types.uint32, types.uint32, types.uint32))}


# ---------------------------------------------------------------------------- running
def multiply(a, b, variant: str = "after"):
    """``a @ b`` (float32 ``[M, K]`` and ``[K, N]``) with one of the two teaching kernels, on
    the current backend. The output is NaN-filled before the kernel writes it."""
    if variant not in KERNELS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a [M, K] and b [K, N] must be 2-D with matching K: a {a.shape}, b {b.shape}")
    m_size, k_size = a.shape
    n_size = b.shape[1]
    if min(m_size, k_size, n_size) < 1:
        raise ValueError(f"a {a.shape} and b {b.shape}: every size must be at least 1")
    for name, size in (("a", a.size), ("b", b.size), ("c", m_size * n_size)):
        if size >= 2**32:
            raise ValueError(f"{name} has {size} elements: the 32-bit kernel indexes up to 2**32")
    c = np.full((m_size, n_size), np.nan, dtype=np.float32)
    grid = (-(-n_size // TILE_N), -(-m_size // TILE_M))
    da, db, dc = (backend.to_device(x) for x in (a, b, c))
    if variant == "before":
        backend.launch(gemm_before, grid, THREADS, da, db, dc)
    else:
        backend.launch(gemm_after, grid, THREADS, da.reshape(-1), db.reshape(-1), dc.reshape(-1),
                       np.uint32(m_size), np.uint32(n_size), np.uint32(k_size))
    backend.synchronize()
    return backend.to_host(dc).reshape(m_size, n_size)


# ---------------------------------------------------------------------------- reading the SASS
GROUPS = {"FFMA": ("ffma",), "integer": ("int", "uniform"),
          "loads/stores": ("lds", "sts", "ldg", "stg", "local", "const", "atomic"),
          "control": ("control",), "other": ("fmul", "fadd", "fp32_other", "f64", "convert", "other")}
"""The lesson's coarse instruction groups, from ``sass.CATEGORIES``."""

_WIDE_MODIFIERS = {"WIDE", "X", "EX", "S64", "U64", "64"}


def is_int64(inst: sass.Instruction) -> bool:
    """A 64-bit integer instruction: a 64-bit product (``IMAD.WIDE``), the high half of a
    64-bit add (``IADD3.X``, ``LEA.HI.X``, ``IMAD.X``), a 64-bit shift (``SHF.*.S64``/``U64``)
    or compare (``ISETP.*.EX``), integer or uniform datapath. Constant loads (``ULDC.64``)
    are not arithmetic and do not count."""
    if inst.category not in ("int", "uniform") or inst.base in ("ULDC", "LDC"):
        return False
    return bool(_WIDE_MODIFIERS & set(inst.modifiers))


def grouped(mix: dict) -> dict:
    """``{group: count}`` over ``GROUPS`` from a ``sass.mix_of`` dict."""
    return {g: sum(mix.get(k, 0) for k in cats) for g, cats in GROUPS.items()}


def _format(inst: sass.Instruction) -> str:
    text = f"{inst.predicate + ' ' if inst.predicate else ''}{inst.opcode} {inst.operands}".strip()
    where = f"  // line {inst.line}" if inst.line is not None else ""
    return f"/*{inst.offset:04x}*/  {text} ;{where}"


def read_variant(text: str, kernel, resources: dict, excerpt_lines: int = 28) -> dict:
    """The lesson's figures of one kernel from its ``nvdisasm -c -g`` text."""
    listing = sass.parse_sass(text)
    source = sass.source_of(kernel)
    audit = sass.audit_listing(listing, source, kernel.__name__ if hasattr(kernel, "__name__") else "",
                               "float32", resources, THREADS)
    fn = listing.kernel
    cfg = sass.build_cfg(fn)
    code = [fn.instructions[i] for b in sorted(cfg.reachable) for i in range(cfg.starts[b], cfg.ends[b])]
    hot = audit.hottest
    # the hottest loop's instructions, in listing order (the loop summary keeps counts only)
    loop_code = []
    for loop in cfg.loops:
        if fn.instructions[cfg.starts[loop.header]].offset == hot.first_offset and not loop.children:
            loop_code = [fn.instructions[i] for b in sorted(loop.blocks) for i in range(cfg.starts[b], cfg.ends[b])]
    shown = [_format(i) for i in loop_code[:excerpt_lines]]
    if len(loop_code) > excerpt_lines:
        shown.append(f"... {len(loop_code) - excerpt_lines} more instructions, then the branch back")
    steps = hot.ffma / FMA_PER_STEP
    staging = audit.phases.get("staging")
    return {
        "registers": audit.registers, "spill_bytes": audit.spill_bytes, "shared_bytes": audit.shared_bytes,
        "warps_per_sm": audit.warps_per_sm,
        "loop_instructions": hot.instructions, "loop_ffma": hot.ffma, "loop_steps": steps,
        "loop_per_step": hot.instructions / steps if steps else None,
        "loop_ffma_share": hot.ffma_fraction, "loop_lds_widths": hot.lds_widths,
        "loop_mix": grouped(hot.mix), "loop_int64": sum(is_int64(i) for i in loop_code),
        "loop_lines": list(hot.lines),
        "kernel_instructions": audit.instructions, "kernel_mix": grouped(audit.mix), "kernel_categories": audit.mix,
        "kernel_int64": sum(is_int64(i) for i in code), "div64_calls": audit.div64_calls,
        "f64": audit.f64, "local": audit.local,
        "staging_per_element": staging.body / staging.loops if staging else None,
        "phases": {name: {"body": c.body, "straight": c.straight, "loops": c.loops, "unroll": c.unroll}
                   for name, c in audit.phases.items()},
        "excerpt": shown,
    }


def compile_variant(variant: str) -> dict:
    """Compile one variant for sm_90 and read it (needs ``DEFTNUMBA_BACKEND=cuda``)."""
    kernel, signature = signatures()[variant]
    _, cubin, resources = sass.compile_cubin(kernel, signature)
    return read_variant(sass.disassemble(cubin), kernel.py_func, resources)


def kernel_source_hash() -> str:
    """What the stored reading was read from: the two kernels' source."""
    return sass.source_hash(gemm_before.py_func, gemm_after.py_func)


def _compile_here() -> dict:
    start = time.perf_counter()
    variants = {v: compile_variant(v) for v in VARIANTS}
    return {"variants": variants, "compile_s": time.perf_counter() - start, "cc": list(sass.CC),
            "source_hash": kernel_source_hash(), "numba_cuda": compiler_version()}


def compiler_version() -> str:
    """numba-cuda's version: the SASS figures belong to a compiler as much as to the source."""
    try:
        from importlib.metadata import version

        return version("numba-cuda")
    except Exception:  # noqa: BLE001  (not installed as a distribution)
        return "unknown"


def _compiler_env() -> dict:
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the deftnumba package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _compile_in_subprocess() -> dict:
    proc = subprocess.run([sys.executable, "-m", "deftnumba.perf.indexing_lesson", "--json"], env=_compiler_env(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-1500:] or f"the compiler process exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_stored(path=DATA) -> dict | None:
    """The stored reading, or ``None`` when there is none."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@functools.cache
def lesson_figures(allow_stored: bool = True) -> dict:
    """``figures(allow_stored)``, compiled once per process (the notebook and the tests share it)."""
    return figures(allow_stored)


def figures(allow_stored: bool = True) -> dict:
    """Both variants' static SASS figures (see the module docstring).

    Returns ``{"variants": {"before": {...}, "after": {...}}, "source": "compiled" | "stored",
    "note": ..., "compile_s": ..., "wall_s": ...}``. ``compile_s`` is the compiler's own time;
    ``wall_s`` includes starting the compiler process. Where nothing can compile (no
    ``nvdisasm``, no NVVM or nvJitLink), the stored reading is returned with a note that says
    so and why, unless ``allow_stored`` is false (then the error is raised).
    """
    start = time.perf_counter()
    try:
        sass.find_nvdisasm()
        result = _compile_in_subprocess() if backend.IS_SIMULATOR else _compile_here()
    except (FileNotFoundError, RuntimeError, ImportError, OSError, subprocess.TimeoutExpired) as err:
        stored = load_stored()
        if not allow_stored or stored is None:
            raise
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        stale = "" if stored.get("source_hash") == kernel_source_hash() else (
            ", read from an earlier version of the kernels")
        return {**stored, "source": "stored", "wall_s": time.perf_counter() - start,
                "note": f"the stored reading (perf/data/{DATA.name}, numba-cuda {stored.get('numba_cuda')}{stale}): "
                        f"nothing could compile here ({reason}). Static SASS counts, not times."}
    return {**result, "source": "compiled", "wall_s": time.perf_counter() - start,
            "note": f"compiled now for sm_{sass.CC[0]}{sass.CC[1]} (numba-cuda + nvJitLink, read with nvdisasm; "
                    "no GPU). Static SASS counts, not times."}


def slice_model(variant: dict) -> dict:
    """Issued instructions per thread for one staged slice (``TILE_K`` rank-1 updates), from the
    loop bodies only (a static model, a lower bound: loop set-up is not counted): staging
    ``(A_SLICE + B_SLICE) / THREADS`` elements, then ``TILE_K`` steps of the multiply loop.
    In an issue-bound kernel, time is proportional to ``total``."""
    per_loop = A_SLICE // THREADS  # iterations of each staging loop per slice (both equal here)
    staging = variant["phases"]["staging"]["body"] * per_loop
    multiply = variant["loop_per_step"] * TILE_K
    ffma = FMA_PER_STEP * TILE_K
    return {"staging": staging, "multiply": multiply, "total": staging + multiply, "ffma": ffma,
            "ffma_share": ffma / (staging + multiply)}


def comparison_rows(figures: dict) -> list:
    """One row per figure, a column per variant: the notebook's side-by-side table."""
    v = figures["variants"]

    def lds(w):
        return ", ".join(f"{n} x {bits}-bit" for bits, n in w.items()) or "none"

    rows = [
        ("registers per thread", lambda x: x["registers"]),
        ("warps per SM (64-thread blocks)", lambda x: x["warps_per_sm"]),
        ("multiply loop: instructions per trip", lambda x: x["loop_instructions"]),
        ("multiply loop: rank-1 updates (16 FFMA) per trip", lambda x: f"{x['loop_steps']:g}"),
        ("multiply loop: instructions per rank-1 update", lambda x: f"{x['loop_per_step']:.1f}"),
        ("multiply loop: FFMA share", lambda x: f"{100 * x['loop_ffma_share']:.1f}%"),
        ("multiply loop: shared loads", lambda x: lds(x["loop_lds_widths"])),
        ("multiply loop: 64-bit integer instructions", lambda x: x["loop_int64"]),
        ("staging: instructions per staged element", lambda x: f"{x['staging_per_element']:.1f}"),
        (f"one slice ({TILE_K} updates), issued per thread (model)", lambda x: f"{slice_model(x)['total']:.0f}"),
        ("one slice: FFMA share of issued (model)", lambda x: f"{100 * slice_model(x)['ffma_share']:.1f}%"),
        ("whole kernel: instructions (static)", lambda x: x["kernel_instructions"]),
        ("whole kernel: 64-bit integer instructions", lambda x: x["kernel_int64"]),
        ("whole kernel: 64-bit division calls", lambda x: x["div64_calls"]),
    ]
    return [{"figure (static SASS, sm_90)": name, "before": get(v["before"]), "after": get(v["after"])}
            for name, get in rows]


def write_stored(path=DATA) -> dict:
    """Compile both variants and store the reading (needs ``DEFTNUMBA_BACKEND=cuda``)."""
    result = _compile_here()
    result.pop("compile_s")  # a time of this machine, not a property of the kernels
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    return result


if __name__ == "__main__":
    # --json: print the compiled reading (the simulator's lesson_figures runs this);
    # --write: refresh perf/data/indexing_lesson.json. Both need DEFTNUMBA_BACKEND=cuda.
    if sys.argv[1:] == ["--write"]:
        write_stored()
        print(f"wrote {DATA}")
    elif sys.argv[1:] == ["--json"]:
        print(json.dumps(_compile_here()))
    else:
        sys.exit("usage: DEFTNUMBA_BACKEND=cuda python -m deftnumba.perf.indexing_lesson --json | --write")
