"""Read the machine code (SASS) a GPU would run, without a GPU, and model its issue slots.

The pipeline, each step usable on its own:

1. ``compile_cubin(func, signature)``: numba-cuda's real compiler (NVVM) makes PTX with line
   info, nvJitLink (ptxas inside) links it for ``sm_90`` into a cubin. Neither needs a
   device, but both need ``DEFTNUMBA_BACKEND=cuda`` (the simulator has no compiler).
2. ``disassemble(cubin)``: ``nvdisasm -c -g -hex`` (from the ``nvidia-cuda-nvdisasm`` wheel)
   prints the SASS with the Python source line of every instruction.
3. ``parse_sass(text)`` -> ``Listing``: the kernel's instructions, labels and line info.
   ``classify(opcode)`` puts each instruction in one category (FFMA, shared load, integer,
   ...); loops are the *natural loops* of the control-flow graph (a back edge is a branch
   to a block that dominates it: the backward branches of the listing that really close
   a loop).
4. ``audit_listing(listing, source)`` -> ``KernelAudit``: the instruction mix of the whole
   kernel and of every loop, the hottest loop (the innermost loop with the most FFMA),
   its FFMA fraction and load widths, float64 instructions, local memory and calls to
   the 64-bit integer division routines; and per *phase* (below) the instructions per
   iteration of the phase's innermost loop and the straight-line rest.
5. ``issue_model(...)``: a static issue-slot model of one launch (a prediction).

Phases
------
A kernel's source marks its phases with comment lines ``# phase: NAME`` inside the kernel
function. An instruction belongs to the phase of the last marker at or above its source
line (``prologue`` before the first marker; an instruction with no line, or one from
another file, keeps the phase of the instruction before it). A phase can be re-entered:
``# phase: columns`` ... ``# phase: out_of_tile`` ... ``# phase: columns`` splits a cold
branch from its loop. Per phase the audit counts

* ``body``: instructions of the phase inside its innermost loop (the deepest loops that
  hold any of its instructions; several loops at that depth are summed, so a phase should
  own one innermost loop), issued once per iteration of that loop;
* ``straight``: the phase's other instructions (loop set-up, unrolled code), issued once
  (or as often as the model says).

A kernel module may define ``phase_model(geometry, config) -> {phase: iterations}``: for
every phase, the iterations of that phase's innermost loop body *per thread over the whole
launch* (summed over the outer loops around it). A value may also be a pair
``(body_iterations, straight_executions)`` for a phase whose straight-line part runs more
than once (e.g. once per channel chunk). ``before_phase_model`` holds the models of the
kernels as they stood when this audit was written, used where a module has none.

The issue-slot model (a prediction, never a measurement)
--------------------------------------------------------
Each SM sub-partition (4 per SM on sm_90) issues at most one warp instruction per clock.
Per thread, the launch issues ``sum(body * iterations + straight * executions)``
instructions; a wave puts ``blocks_per_sm`` blocks on each SM (occupancy from registers,
shared memory and threads); the busiest SM runs ``ceil(blocks / SMs)`` blocks in
``ceil(. / blocks_per_sm)`` waves, and each wave takes ``ceil(resident warps / 4) *
instructions per thread`` clocks. Assumed: every instruction issues in one slot (no stalls:
latency fully hidden, no bank conflicts, no divergence beyond counting both sides of every
branch), a CALL counts one slot (its routine is not counted), the clock is the one the
fp32 peak implies (``fp32_flops / (2 * 128 lanes * SMs)``). It is a lower bound on time for
an issue-bound kernel and says nothing about memory: it sits beside the roofline floor.

One warp's stalls (also a prediction)
-------------------------------------
The no-stall assumption flatters a launch with few warps per scheduler: a lone warp waits
for every shared or global load it uses soon after issuing it. ``disassemble`` prints each
instruction's encoding, whose high word holds the controls ptxas scheduled it with
(``control_of``: stall clocks, the scoreboard barrier a load's result will release, the
barriers an instruction waits on). ``stall_charges`` walks an instruction list as one warp
alone would issue it, with assumed latencies for the variable-latency results (``LATENCY``:
~30 clocks for shared memory, ~300 for a global load that hits L2), and charges each
instruction the clocks until the warp's next issue. The audit sums them per phase like the
instruction counts (``PhaseCount.body_cycles``, ``straight_cycles``; each loop's body run twice
so a load waited for in the next trip counts). ``issue_model(..., cycles=)`` then returns
``latency_seconds``: per wave, the larger of the issue slots and one block's time, where a
block's warps hide each other's waits within a phase only (barriers keep them in step):
``sum over phases of max(w * instructions, one warp's clocks)``. It equals ``seconds`` where
enough warps are resident, and exposes a kernel that one block of 4 warps per SM leaves
waiting on its staging loads. Not modelled: bank conflicts, a barrier's wait for the
slowest warp, the memory system's queues. The Tucker audit reports it (``latency_us``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

CC = (9, 0)
SYSTEM_SHARED_RESERVE = 1024
"""Bytes of shared memory sm_80+ reserves per block for the system; ptxas's ``smem`` figure
includes it (a kernel declaring 48 KB reports 50176 B)."""

# --------------------------------------------------------------------------- nvdisasm
NVDISASM_ENV = "DEFTNUMBA_NVDISASM"


def find_nvdisasm() -> str:
    """Path of ``nvdisasm``: ``$DEFTNUMBA_NVDISASM``, then the ``nvidia-cuda-nvdisasm`` wheel
    of this interpreter (``site-packages/nvidia/*/bin``, ``nvidia/cuda_nvdisasm/bin``), then
    ``PATH``. Raises ``FileNotFoundError`` saying how to install it."""
    explicit = os.environ.get(NVDISASM_ENV)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise FileNotFoundError(f"{NVDISASM_ENV}={explicit!r} is not an executable file")
    roots = []
    try:
        import nvidia  # namespace package of NVIDIA's wheels

        roots = list(getattr(nvidia, "__path__", []))
    except ImportError:
        pass
    exe = "nvdisasm.exe" if sys.platform == "win32" else "nvdisasm"
    for root in roots:
        # cu13 wheels: nvidia/cu13/bin/nvdisasm; cu12 wheels: nvidia/cuda_nvdisasm/bin/nvdisasm
        for path in sorted(glob.glob(os.path.join(root, "*", "bin", exe))):
            if os.access(path, os.X_OK):
                return path
    on_path = shutil.which("nvdisasm")
    if on_path:
        return on_path
    raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (the 'dev' extra has it), "
                            f"or point {NVDISASM_ENV} at a CUDA toolkit's nvdisasm")


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -g -hex`` of a cubin: code sections only, with source line annotations and
    each instruction's encoding (its high word carries the scheduling controls: ``control_of``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([find_nvdisasm(), "-c", "-g", "-hex", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


# --------------------------------------------------------------------------- compiling
def link_cubin(ptx: str, cc=CC, *, lineinfo: bool = True) -> tuple[bytes, dict]:
    """PTX -> cubin through nvJitLink (``-lineinfo`` unless ``lineinfo=False``): ``(cubin,
    resources)`` where resources has ``registers``, ``spill_bytes`` and ``shared_bytes``
    (ptxas's figures; shared includes the 1 KB system reserve). The package's one
    nvJitLink path: ``perf.audit.ptxas_resources`` links through it too."""
    from cuda.bindings import nvjitlink

    options = [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"] + (["-lineinfo"] if lineinfo else [])
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            error = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, error)
            raise RuntimeError(f"nvJitLink failed ({e}): {error.decode(errors='replace').strip()[-2000:]}") from e
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
    finally:
        nvjitlink.destroy(handle)
    return bytes(cubin), parse_ptxas_log(log.decode(errors="replace"))


def parse_ptxas_log(text: str) -> dict:
    """``{registers, spill_bytes, shared_bytes}`` from ptxas's verbose log."""
    found = {}
    if m := re.search(r"Used (\d+) registers", text):
        found["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        found["spill_bytes"] = int(m.group(1)) + int(m.group(2))
    if m := re.search(r"(\d+) bytes smem", text):
        found["shared_bytes"] = int(m.group(1))
    return found


def compile_cubin(func, signature, cc=CC) -> tuple[str, bytes, dict]:
    """Compile a kernel's Python function for ``cc`` with line info: ``(ptx, cubin, resources)``.
    Needs ``DEFTNUMBA_BACKEND=cuda`` (no GPU)."""
    from ..runtime import backend

    if backend.IS_SIMULATOR:
        raise RuntimeError("the SASS audit needs DEFTNUMBA_BACKEND=cuda (no GPU is needed); "
                           "python -m deftnumba audit starts such a process itself")
    bounds = getattr(func, "targetoptions", {}).get("launch_bounds")  # what the GPU would compile
    func = getattr(func, "py_func", func)
    ptx, _ = backend.cuda.compile_ptx(func, signature, cc=cc, lineinfo=True,
                                      **({"launch_bounds": bounds} if bounds else {}))
    cubin, resources = link_cubin(ptx, cc)
    return ptx, cubin, resources


def ptx_variants(func, signature, times: int, cc=CC) -> Counter:
    """``{ptx: compiles}`` over ``times`` NVVM compiles of one kernel's LLVM IR.

    NVVM is not deterministic: handed the same IR twice, in one process or in two, it can
    return different PTX (seen in ``tucker.fused`` at ResNet-18 layer3: 7 of 40 compiles
    take fewer 128-bit shared loads in the first GEMM; docs/perf-notes.md, "Compile
    variants"). A GPU run compiles once, so it gets one of these at random, and so does
    one audit. Numba lowers the kernel once here; only the NVVM step is repeated."""
    from numba.cuda import codegen

    captured = []
    original = codegen.nvvm.compile_ir

    def keep(irs, **options):
        captured.append((irs, options))
        return original(irs, **options)

    codegen.nvvm.compile_ir = keep  # (the module attribute numba-cuda's codegen calls)
    try:
        compile_cubin(func, signature, cc)
    finally:
        codegen.nvvm.compile_ir = original
    if not captured:
        raise RuntimeError("numba-cuda did not compile through numba.cuda.codegen.nvvm.compile_ir")
    irs, options = captured[-1]
    found = Counter()
    for _ in range(times):
        ptx = original(irs, **options)
        found[(ptx.decode() if isinstance(ptx, bytes) else ptx).strip("\x00").strip()] += 1
    return found


# --------------------------------------------------------------------------- parsing
@dataclass
class Instruction:
    """One SASS instruction of the listing."""

    offset: int              # byte offset in its function
    opcode: str              # full mnemonic with modifiers, e.g. ``LDS.128``, ``IMAD.WIDE.U32``
    operands: str = ""
    predicate: str = ""      # ``@P0``, ``@!P1`` or ``""``
    file: str | None = None  # source file and line from the line table
    line: int | None = None
    target: str | None = None  # branch / call target label or function
    control: int | None = None  # the scheduling-control bits of its encoding (``-hex`` listings): ``control_of``

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> tuple:
        return tuple(self.opcode.split(".")[1:])

    @property
    def category(self) -> str:
        return classify(self.opcode)

    @property
    def width(self) -> int | None:
        return access_width(self.opcode)

    @property
    def is_branch(self) -> bool:
        return self.base in ("BRA", "BRX", "JMP", "JMX")

    @property
    def ends_block(self) -> bool:
        return self.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL")


@dataclass
class Function:
    name: str
    instructions: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # label -> index of the instruction it precedes
    entry: bool = False


@dataclass
class Listing:
    functions: dict  # name -> Function

    @property
    def kernel(self) -> Function:
        """The entry function (the kernel); the others are called routines."""
        entries = [f for f in self.functions.values() if f.entry]
        if entries:
            return entries[0]
        named = [f for f in self.functions.values() if not f.name.startswith("__")]
        return max(named or self.functions.values(), key=lambda f: len(f.instructions))


_SECTION = re.compile(r"^//-+ \.text\.(\S+) -+")
_ENTRY = re.compile(r"^\s*\.other\s+(\S+?),\s*@\"STO_CUDA_ENTRY")
_LABEL = re.compile(r"^(\.L\w+|[A-Za-z_$][\w$.]*):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]*)", line (\d+)')
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;?\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_HEX = re.compile(r"/\*\s*0x([0-9a-fA-F]{16})\s*\*/")


def parse_sass(text: str) -> Listing:
    """Parse ``nvdisasm -c [-g] [-hex]`` output into functions of ``Instruction``s (NOPs dropped).
    With ``-hex``, each instruction's second encoding word (on the line after it) gives its
    ``control`` bits."""
    functions: dict = {}
    current: Function | None = None
    file = line = None
    pending_labels: list = []
    entries = set()
    words = 0  # encoding words seen of the last instruction (the high one is the second)
    last = None
    for raw in text.splitlines():
        if (m := _HEX.search(raw)) and not _INSTR.match(_HEX.sub("", raw)):
            if last is not None and words == 1:  # the high word of the instruction above
                last.control = int(m.group(1), 16) >> 41
            words += 1
            continue
        if m := _SECTION.match(raw):
            current = functions.setdefault(m.group(1), Function(m.group(1)))
            file = line = None
            pending_labels = []
            continue
        if m := _ENTRY.match(raw):
            entries.add(m.group(1))
            continue
        if current is None:
            continue
        if m := _LINE.match(raw):
            file, line = m.group(1), int(m.group(2))
            continue
        if m := _INSTR.match(_HEX.sub("", raw)):
            words, last = (1 if _HEX.search(raw) else 0), None
            body = m.group(2).strip().rstrip(";").strip()
            predicate = ""
            if body.startswith("@"):
                predicate, _, body = body.partition(" ")
                body = body.strip()
            opcode, _, operands = body.partition(" ")
            if opcode == "NOP":
                continue  # (its high word, if any, is dropped with it: ``last`` stays None)
            t = _TARGET.search(operands)
            index = len(current.instructions)
            for label in pending_labels:
                current.labels[label] = index
            pending_labels = []
            last = Instruction(int(m.group(1), 16), opcode, operands.strip(), predicate, file, line,
                               t.group(1) if t else None)
            current.instructions.append(last)
            continue
        if m := _LABEL.match(raw.strip()):
            pending_labels.append(m.group(1))
    for name in entries:
        if name in functions:
            functions[name].entry = True
    return Listing(functions)


# --------------------------------------------------------------------------- classification
CATEGORIES = ("ffma", "fmul", "fadd", "fp32_other", "f64", "convert", "int", "uniform", "lds", "sts",
              "ldg", "stg", "local", "const", "atomic", "control", "other")
"""Instruction categories, in table order. ``int`` holds integer arithmetic and moves (IMAD,
IADD3, LEA, SHF, LOP3, ISETP, SEL, MOV, ...); ``uniform`` the uniform datapath (U*, R2UR,
S2UR); ``local`` LDL/STL; ``control`` branches, barriers, convergence (BSSY/BSYNC), EXIT."""

_INT = {"IMAD", "IADD3", "IADD", "IADD32I", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "LOP32I", "ISETP",
        "IMNMX", "IABS", "VIADD", "VIADDMNMX", "VIMNMX", "VIMNMX3", "SEL", "PRMT", "POPC", "FLO", "BREV",
        "BMSK", "SGXT", "IDP", "IMUL", "ISCADD", "MOV", "MOV32I", "S2R", "CS2R", "P2R", "R2P", "PLOP3",
        "IMMA", "VABSDIFF", "VABSDIFF4", "I2I", "LEPC", "PSETP", "ICMP", "IMADSP", "VOTE", "VOTEU",
        "SHFL", "MATCH", "REDUX"}
_FP32_OTHER = {"FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "MUFU", "FSET", "HFMA2", "HADD2", "HMUL2",
               "HSETP2", "HMNMX2", "FMUL32I", "FADD32I", "FFMA32I", "HMMA", "FMNMX3"}
_F64 = {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX", "DSET", "DMMA"}
_CONVERT = {"I2F", "F2I", "F2F", "I2FP", "F2IP", "FRND", "F2FP"}
_CONTROL = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "BMOV",
            "YIELD", "NANOSLEEP", "MEMBAR", "DEPBAR", "ERRBAR", "BPT", "KILL", "CCTL", "FENCE", "ARRIVES",
            "SYNCS", "ELECT", "WARPGROUP", "ACQBULK"}
_ATOMIC = {"ATOM", "ATOMS", "ATOMG", "RED", "REDG", "REDAS"}


def classify(opcode: str) -> str:
    """The category (one of ``CATEGORIES``) of a SASS mnemonic such as ``FFMA.FTZ``."""
    parts = opcode.split(".")
    base, mods = parts[0], parts[1:]
    if base in _F64 or (base in _CONVERT and "F64" in mods) or (base == "MUFU" and any("64" in m for m in mods)):
        return "f64"
    if base == "FFMA":
        return "ffma"
    if base == "FMUL":
        return "fmul"
    if base == "FADD":
        return "fadd"
    if base in _FP32_OTHER:
        return "fp32_other"
    if base in _CONVERT:
        return "convert"
    if base in ("LDS", "LDSM"):
        return "lds"
    if base == "STS":
        return "sts"
    if base in ("LDG", "LD", "LDGSTS", "LDGDEPBAR", "UBLKCP", "UTMALDG"):
        return "ldg"
    if base in ("STG", "ST", "UTMASTG"):
        return "stg"
    if base in ("LDL", "STL"):
        return "local"
    if base == "LDC":
        return "const"
    if base in _ATOMIC:
        return "atomic"
    if base in _CONTROL:
        return "control"
    if base in ("R2UR", "S2UR") or base.startswith("U"):
        return "uniform"
    if base in _INT:
        return "int"
    return "other"


def access_width(opcode: str) -> int | None:
    """Bits moved per thread by a load or store (``LDS.128`` -> 128, ``LDG.E.U8`` -> 8,
    a plain ``LDS`` -> 32); ``None`` for other instructions."""
    parts = opcode.split(".")
    if parts[0] not in ("LDS", "STS", "LDG", "STG", "LDL", "STL", "LD", "ST", "ATOMS", "ATOMG", "ATOM", "RED",
                        "LDC"):
        return None
    for m in parts[1:]:
        if m in ("128", "64", "32"):
            return int(m)
        if m in ("U8", "S8"):
            return 8
        if m in ("U16", "S16"):
            return 16
    return 32


DIV64_ROUTINE = re.compile(r"__cuda_sm\d+_(div|rem)_[su]64|__internal_\w*(div|rem)\w*64|_[su]div64|_[su]rem64")
"""Names of the software routines that 64-bit integer division and modulo call."""


# --------------------------------------------------------------------------- control flow
@dataclass
class Loop:
    header: int          # index of the header block
    blocks: frozenset    # block indices of the natural loop
    depth: int = 1       # 1 = outermost
    children: list = field(default_factory=list)


@dataclass
class Cfg:
    starts: list   # first instruction index of each block
    ends: list     # one past the last
    succs: list
    reachable: set
    loops: list    # Loop, outermost first
    block_of: list  # instruction index -> block index

    def loops_of(self, index: int) -> list:
        """Loops containing instruction ``index``, outermost first."""
        b = self.block_of[index]
        return [loop for loop in self.loops if b in loop.blocks]


def build_cfg(function: Function) -> Cfg:
    """Basic blocks, edges, reachability from the entry and the natural loops."""
    ins = function.instructions
    n = len(ins)
    leaders = {0} | {i for i in function.labels.values() if i < n}
    for i, inst in enumerate(ins):
        if (inst.ends_block or inst.base == "CALL") and i + 1 < n:
            leaders.add(i + 1)
    starts = sorted(leaders)
    ends = starts[1:] + [n]
    block_at = {s: b for b, s in enumerate(starts)}
    block_of = [0] * n
    for b, (s, e) in enumerate(zip(starts, ends)):
        for i in range(s, e):
            block_of[i] = b
    succs = []
    for b, (s, e) in enumerate(zip(starts, ends)):
        last = ins[e - 1]
        out = []
        falls = not last.ends_block or bool(last.predicate)
        if last.is_branch and last.target in function.labels:
            t = function.labels[last.target]
            if t < n:
                out.append(block_at[t])
        if falls and b + 1 < len(starts):
            out.append(b + 1)
        succs.append(out)
    reachable, stack = set(), [0]
    while stack:
        b = stack.pop()
        if b not in reachable:
            reachable.add(b)
            stack.extend(succs[b])
    preds = [[] for _ in starts]
    for b in reachable:
        for s in succs[b]:
            preds[s].append(b)
    order = sorted(reachable)
    dom = {b: set(order) for b in order}
    dom[0] = {0}
    changed = True
    while changed:  # iterative dominators (small graphs)
        changed = False
        for b in order[1:]:
            ps = [dom[p] for p in preds[b] if p in reachable]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    bodies: dict = {}
    for b in order:
        for h in succs[b]:
            if h in dom[b]:  # back edge b -> h
                body, work = {h, b}, [b]
                while work:
                    x = work.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            work.append(p)
                bodies.setdefault(h, set()).update(body)
    loops = [Loop(h, frozenset(body)) for h, body in bodies.items()]
    loops.sort(key=lambda lp: (-len(lp.blocks), lp.header))
    for loop in loops:
        loop.depth = 1 + sum(1 for other in loops if other is not loop and loop.blocks < other.blocks)
    for loop in loops:
        inner = [o for o in loops if o is not loop and o.blocks < loop.blocks and o.depth == loop.depth + 1]
        loop.children = inner
    loops.sort(key=lambda lp: (lp.depth, starts[lp.header]))
    return Cfg(starts, ends, succs, reachable, loops, block_of)


# --------------------------------------------------------------------------- phases
PHASE_MARKER = re.compile(r"^\s*#\s*phase:\s*([A-Za-z_][\w-]*)")


@dataclass(frozen=True)
class Source:
    """Where a kernel's Python function lives and its phase markers ``((line, name), ...)``."""

    file: str
    first: int
    last: int
    markers: tuple = ()

    def phase(self, line: int | None) -> str | None:
        """Phase of a source line in this function; ``None`` outside the function."""
        if line is None or not self.first <= line <= self.last:
            return None
        name = "prologue"
        for at, marker in self.markers:
            if at <= line:
                name = marker
            else:
                break
        return name


def source_of(func) -> Source:
    """``Source`` of a kernel's Python function (a dispatcher or its ``py_func``)."""
    func = getattr(func, "py_func", func)
    path = os.path.realpath(inspect.getsourcefile(func))
    lines, first = inspect.getsourcelines(func)
    markers = tuple((first + i, m.group(1)) for i, text in enumerate(lines) if (m := PHASE_MARKER.match(text)))
    return Source(path, first, first + len(lines) - 1, markers)


def phases_of(function: Function, source: Source | None, cfg: Cfg | None = None) -> list:
    """The phase of every instruction (see the module docstring).

    Instructions without a usable line keep the phase of the instruction before them:
    no line, another file, or the kernel's ``def`` line (where Numba puts the code of
    inlined device functions). So does an instruction of a line above the first marker
    (``prologue``) that sits inside a loop (a value the compiler recomputes there).
    """
    out, current = [], "prologue"
    def_line = _def_line(source)
    for index, inst in enumerate(function.instructions):
        if (source is not None and inst.file and inst.line is not None and inst.line > def_line
                and os.path.realpath(inst.file) == source.file):
            p = source.phase(inst.line)
            if p is not None and not (p == "prologue" and cfg is not None and cfg.loops_of(index)):
                current = p
        out.append(current)
    return out


def _def_line(source: Source | None) -> int:
    """The line of the kernel's ``def`` (its decorators come first)."""
    if source is None:
        return 0
    try:
        with open(source.file) as f:
            lines = f.readlines()[source.first - 1:source.last]
    except OSError:
        return source.first
    for i, text in enumerate(lines):
        if text.lstrip().startswith("def "):
            return source.first + i
    return source.first


STRAY_SHARE = 0.25
"""A phase holding less than this share of an innermost loop's instructions is a stray there."""


def reassign_strays(phase: list, cfg: Cfg) -> list:
    """Give a loop's stray instructions to the loop's main phase.

    The scheduler moves a few instructions of one source line into a neighbouring loop
    (an address of the next phase computed inside this one). They run once per iteration
    of the loop they sit in, so they are counted with that loop's main phase; otherwise a
    single stray would make that loop the other phase's innermost loop. A phase is a stray
    in a loop when it holds under ``STRAY_SHARE`` of the loop's instructions.

    In an outer loop (one with loops inside) a stray is judged against all the loop's
    instructions and moves to the main phase of those in no inner loop, but only where it
    holds the deepest instructions of its phase and under ``STRAY_SHARE`` as many as the
    phase has elsewhere (a phase whose code lives in that loop stays). Otherwise a staging
    copy unrolled into straight code, with six address instructions of its shared array
    scheduled into the multiply's outer loop, is charged as a staging loop of six
    instructions per stored element."""
    phase = list(phase)

    def depth_of(i):
        return max((lp.depth for lp in cfg.loops_of(i)), default=0)

    for loop in cfg.loops:
        if loop.children:
            continue
        idx = [i for b in loop.blocks for i in range(cfg.starts[b], cfg.ends[b])]
        counts = Counter(phase[i] for i in idx)
        main = max(counts, key=lambda k: (counts[k], k))
        for i in idx:
            if counts[phase[i]] < STRAY_SHARE * len(idx):
                phase[i] = main
    for loop in sorted((lp for lp in cfg.loops if lp.children), key=lambda lp: -lp.depth):
        every = [i for b in loop.blocks for i in range(cfg.starts[b], cfg.ends[b])]
        idx = [i for i in every if depth_of(i) == loop.depth]
        if not idx:
            continue
        counts = Counter(phase[i] for i in idx)
        main = max(counts, key=lambda k: (counts[k], k))
        mine = set(idx)
        for name, count in counts.items():
            if name == main or count >= STRAY_SHARE * len(every):
                continue
            elsewhere = [i for i in range(len(phase)) if phase[i] == name and i not in mine]
            deeper_elsewhere = any(depth_of(i) >= loop.depth for i in elsewhere)
            if not deeper_elsewhere and count < STRAY_SHARE * len(elsewhere):
                for i in idx:
                    if phase[i] == name:
                        phase[i] = main
    return phase


# --------------------------------------------------------------------------- one warp's stalls
@dataclass(frozen=True)
class Control:
    """The scheduling controls ptxas writes into every sm_70+ instruction (bits 105-125 of the
    128-bit encoding; the layout Jia et al. read off Volta, "Dissecting the NVIDIA Volta GPU
    Architecture via Microbenchmarking", 2018, unchanged through Hopper): ``stall`` clocks
    before the warp's next instruction may issue; a ``write_barrier`` (0-5) the instruction's
    result will release when it lands (variable-latency operations: memory, S2R, MUFU, ...);
    a ``read_barrier`` released once its source registers are read; the barriers
    (``wait_mask``) it waits on before it issues."""

    stall: int
    yield_: bool
    write_barrier: int | None
    read_barrier: int | None
    wait_mask: int
    reuse: int


def control_of(bits: int) -> Control:
    """Decode ``Instruction.control`` (the encoding's high word shifted right by 41)."""
    wb, rb = (bits >> 5) & 7, (bits >> 8) & 7
    return Control(stall=bits & 15, yield_=bool((bits >> 4) & 1), write_barrier=None if wb == 7 else wb,
                   read_barrier=None if rb == 7 else rb, wait_mask=(bits >> 11) & 63, reuse=(bits >> 17) & 15)


LATENCY = {"lds": 30, "ldg": 300, "stg": 300, "local": 40, "const": 20, "atomic": 300}
"""Assumed clocks from issue until a variable-latency result lands (the wait its barrier
imposes): round figures of the order microbenchmarks report for Ampere and Hopper
(shared memory ~30 clocks; a global load that hits L2 ~250-300; Luo et al.,
arXiv:2402.13499, and Chips and Cheese's H100 article). A global load is charged an L2
hit: the kernels here re-read staged data that stays in the 50 MB L2. ``ATOMS`` and the
shuffle units are charged ``LATENCY_SHARED_UNIT``, anything else ``LATENCY_OTHER``
(S2R, MUFU, conversions: 10-25 clocks). Not a measurement."""
LATENCY_SHARED_UNIT = 30
LATENCY_OTHER = 20
READ_RELEASE = 4
"""Clocks until a store's (or any) source registers are read and its read barrier released
(an assumption: the registers are read at dispatch)."""


def _latency(inst: Instruction) -> int:
    if inst.base in ("ATOMS", "SHFL", "LDSM"):
        return LATENCY_SHARED_UNIT
    return LATENCY.get(inst.category, LATENCY_OTHER)


def stall_charges(instructions: list, passes: int = 1) -> list | None:
    """Clocks one warp, alone on its scheduler, spends on each instruction of ``instructions``
    issued in order: its wait for the barriers it names, then its stall count (at least 1).
    ``passes`` > 1 runs the list again (a loop body: a wait on a value loaded in the
    previous trip) and charges the last pass. ``None`` where an instruction has no control
    bits (a listing without ``-hex``).

    With ``w`` warps on a scheduler, one instruction list takes about ``max(w * len, sum of the
    charges)`` clocks: the other warps issue while one waits (``issue_model``)."""
    if any(i.control is None for i in instructions):
        return None
    decoded = [control_of(i.control) for i in instructions]
    ready = [0] * 6
    t = 0
    charges: list = []
    for _ in range(passes):
        charges = []
        for inst, c in zip(instructions, decoded):
            start = t
            for b in range(6):
                if (c.wait_mask >> b) & 1:
                    t = max(t, ready[b])
            if c.write_barrier is not None:
                ready[c.write_barrier] = max(ready[c.write_barrier], t + _latency(inst))
            if c.read_barrier is not None:
                ready[c.read_barrier] = max(ready[c.read_barrier], t + READ_RELEASE)
            t += max(1, c.stall)
            charges.append(t - start)
    return charges


# --------------------------------------------------------------------------- the audit
def mix_of(instructions) -> dict:
    """``{category: count}`` over ``CATEGORIES`` (zeros included, table order)."""
    c = Counter(i.category for i in instructions)
    return {k: c.get(k, 0) for k in CATEGORIES}


def widths_of(instructions, category: str) -> dict:
    """``{bits: count}`` of the loads/stores of one category (``lds``, ``ldg``, ...)."""
    c = Counter(i.width for i in instructions if i.category == category)
    return {str(w): c[w] for w in sorted(c)}


@dataclass
class LoopSummary:
    depth: int
    first_offset: int
    instructions: int
    ffma: int
    ffma_fraction: float
    lds_widths: dict
    ldg_widths: dict
    mix: dict
    lines: tuple        # (first, last) kernel source line inside the loop
    phases: dict        # phase -> instructions of this loop in that phase
    innermost: bool
    unroll: int = 1     # source iterations per pass through the SASS loop (see ``unroll_factor``)


@dataclass
class PhaseCount:
    body: float          # instructions per *source* iteration of the phase's innermost loop
    straight: int        # the phase's other instructions
    depth: int           # loop depth of that innermost loop (0: no loop)
    body_ffma: float     # FFMA per source iteration
    body_lds_widths: dict
    body_ldg_widths: dict
    calls: int           # CALL instructions in the phase
    div64_calls: int
    body_sass: int = 0   # instructions per pass through the SASS loop(s) (= body * unroll)
    unroll: int = 1      # source iterations per pass (LLVM unrolls runtime-count loops)
    body_dfma: float = 0.0  # DFMA per source iteration (float64 kernels)
    loops: int = 1       # distinct source loops whose bodies ``body`` adds up
    body_sts: int = 0    # shared stores (STS, any width) per pass through the SASS loop(s)
    body_sts_path: int = 0  # of those, the most that one path through the loop body executes
    # one warp alone on its scheduler (``stall_charges``; None without control bits): clocks per
    # source iteration of the body, per pass through the SASS loop(s), and of the straight part
    body_cycles: float | None = None
    body_cycles_sass: float | None = None
    straight_cycles: float | None = None


@dataclass
class KernelAudit:
    kernel: str
    dtype: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None          # ptxas's figure: declared + the 1 KB system reserve
    block_threads: int | None
    warps_per_sm: int | None
    instructions: int                 # static, reachable code of the kernel function
    mix: dict
    f64: int
    local: int
    div64_calls: int
    calls: dict                       # CALL target -> count
    loops: list                       # LoopSummary, outermost first
    hottest: LoopSummary | None
    phases: dict                      # name -> PhaseCount
    lineinfo: bool                    # the listing carried source lines of the kernel
    div64_in_loops: int = 0           # of those CALLs, the ones inside a loop
    returning_atomics_in_loops: int = 0  # ATOM/ATOMG/ATOMS (value-returning) inside a loop; RED is not

    def to_json(self) -> dict:
        return asdict(self)


RETURNING_ATOMICS = ("ATOM", "ATOMG", "ATOMS")
"""Atomics that return the old value (``RED`` is the fire-and-forget form)."""

_STORES = ("STS", "STG", "ST", "STL", "ATOM", "ATOMS", "ATOMG", "RED", "REDG")


def unroll_factor(instructions) -> int:
    """Source iterations per pass through a loop body, guessed from its stores: LLVM unrolls
    loops with a runtime trip count (``range(tid, n, THREADS)``) by 2 or 4, which repeats
    every store statement of the body. The guess is the greatest common divisor, over the
    source lines that store, of the store instructions per line (1 without stores). A store
    statement inside a compile-time-unrolled inner loop (``for i in range(4)``) fools it:
    the audit prints the factor so that a reader can check."""
    per_line = Counter(i.line for i in instructions if i.base in _STORES and i.line is not None)
    u = 0
    for n in per_line.values():
        u = math.gcd(u, n)
    return u or 1


def _summarise_loop(loop: Loop, cfg: Cfg, ins: list, phase: list) -> LoopSummary:
    idx = [i for b in sorted(loop.blocks) for i in range(cfg.starts[b], cfg.ends[b])]
    body = [ins[i] for i in idx]
    own = body
    m = mix_of(body)
    lines = [i.line for i in body if i.line is not None]
    return LoopSummary(
        depth=loop.depth, first_offset=ins[cfg.starts[loop.header]].offset, instructions=len(body),
        ffma=m["ffma"], ffma_fraction=m["ffma"] / len(body) if body else 0.0,
        lds_widths=widths_of(body, "lds"), ldg_widths=widths_of(body, "ldg"), mix=m,
        lines=(min(lines), max(lines)) if lines else (None, None),
        phases=dict(Counter(phase[i] for i in idx)), innermost=not loop.children,
        unroll=1 if loop.children else unroll_factor(own))  # outer loops hold remainder copies


def _most_on_one_path(loop: Loop, cfg: Cfg, marked: set) -> int:
    """The most ``marked`` instructions one pass through ``loop`` can execute: the longest path,
    counting marked instructions, through its blocks from the header, back edges (its own and
    its nested loops') left out. A body with another cycle in it counts every marked
    instruction, as before."""
    if not marked:
        return 0
    blocks = loop.blocks
    count = {b: sum(1 for i in range(cfg.starts[b], cfg.ends[b]) if i in marked) for b in blocks}
    back = set()  # back edges: into this loop's header, and into a nested loop's from inside it
    nested = [loop]
    while nested:
        inner = nested.pop()
        back |= {(b, inner.header) for b in inner.blocks if inner.header in cfg.succs[b]}
        nested.extend(inner.children)
    succ = {b: [c for c in cfg.succs[b] if c in blocks and (b, c) not in back] for b in blocks}
    preds: dict = {b: [] for b in blocks}
    waiting = {b: 0 for b in blocks}
    for b in blocks:
        for c in succ[b]:
            preds[c].append(b)
            waiting[c] += 1
    ready = [b for b in blocks if waiting[b] == 0]
    best: dict = {}
    while ready:  # in topological order: every predecessor's best path is known
        b = ready.pop()
        best[b] = count[b] + max((best[p] for p in preds[b]), default=0)
        for c in succ[b]:
            waiting[c] -= 1
            if waiting[c] == 0:
                ready.append(c)
    if len(best) < len(blocks):
        return sum(count.values())
    return max(best.values())


def hottest_loop(loops: list) -> LoopSummary | None:
    """The innermost loop with the most FFMA (ties: more instructions, then earlier): in a
    GEMM-like kernel, its multiply loop. Without FFMA anywhere, the largest innermost loop."""
    inner = [lp for lp in loops if lp.innermost]
    if not inner:
        return None
    return max(inner, key=lambda lp: (lp.ffma, lp.instructions, -lp.first_offset))


def audit_listing(listing: Listing, source: Source | None = None, name: str = "", dtype: str = "",
                  resources: dict | None = None, block_threads: int | None = None) -> KernelAudit:
    """Everything the audit reports about one kernel's SASS."""
    fn = listing.kernel
    cfg = build_cfg(fn)
    ins = fn.instructions
    live = [i for b in sorted(cfg.reachable) for i in range(cfg.starts[b], cfg.ends[b])]
    code = [ins[i] for i in live]
    phase = reassign_strays(phases_of(fn, source, cfg), cfg)
    loops = [_summarise_loop(lp, cfg, ins, phase) for lp in cfg.loops]
    calls = Counter(i.target for i in code if i.base == "CALL")
    # per phase: its deepest loops' instructions are the body, the rest straight-line
    depth_of = {}
    for i in live:
        depth_of[i] = max((lp.depth for lp in cfg.loops_of(i)), default=0)
    innermost_of = {}  # instruction -> (its innermost loop, that loop's unroll factor)
    for loop, summary in zip(cfg.loops, loops):
        for b in loop.blocks:
            for i in range(cfg.starts[b], cfg.ends[b]):
                if i not in innermost_of or loop.depth > innermost_of[i][0].depth:
                    innermost_of[i] = (loop, summary.unroll)
    # one warp's clocks per instruction: each loop's own instructions (those of no deeper loop)
    # run twice in order and the second trip charged; the code outside loops once, in order
    groups: dict = {}
    for i in live:
        groups.setdefault(id(innermost_of[i][0]) if i in innermost_of else None, []).append(i)
    charge: dict | None = {}
    for key, idx in groups.items():
        got = stall_charges([ins[i] for i in idx], passes=1 if key is None else 2)
        if got is None:
            charge = None
            break
        charge.update(zip(idx, got))
    phases: dict = {}
    for name_ in dict.fromkeys(phase[i] for i in live):
        members = [i for i in live if phase[i] == name_]
        deepest = max(depth_of[i] for i in members)
        in_body = [i for i in members if deepest and depth_of[i] == deepest]
        body = [ins[i] for i in in_body]
        straight = [ins[i] for i in members if not (deepest and depth_of[i] == deepest)]
        every = [ins[i] for i in members]
        # per source iteration: each loop's share divided by that loop's unroll factor. LLVM
        # may split one source loop into an unrolled main loop and a remainder loop: loops
        # spanning the same source lines count once (the most unrolled one); the others'
        # instructions run at most unroll-1 times and are counted with the straight part.
        loops_here: dict = {}
        for i in in_body:
            loops_here.setdefault(id(innermost_of[i][0]), []).append(i)
        chosen: dict = {}
        for key, idx in loops_here.items():
            lines = [ins[i].line for i in idx if ins[i].line is not None]
            span = (min(lines), max(lines)) if lines else key
            unroll = innermost_of[idx[0]][1]
            best = chosen.get(span)
            if best is None or (unroll, len(idx)) > (best[0], len(best[1])):
                chosen[span] = (unroll, idx)
        kept = {i for _, idx in chosen.values() for i in idx}
        # shared stores one pass executes: a body that stores on alternative paths (a value, or
        # a zero where the channel is past the end) runs one of them, not both
        path_sts = sum(_most_on_one_path(innermost_of[idx[0]][0], cfg,
                                         {i for i in idx if ins[i].category == "sts"})
                       for _, idx in chosen.values())
        body = [ins[i] for i in in_body if i in kept]
        straight += [ins[i] for i in in_body if i not in kept]
        cycles = {}
        if charge is not None:
            cycles = dict(body_cycles=sum(sum(charge[i] for i in idx) / u for u, idx in chosen.values()),
                          body_cycles_sass=sum(charge[i] for i in kept),
                          straight_cycles=sum(charge[i] for i in members if i not in kept))
        unrolls = [u for u, _ in chosen.values()]
        phases[name_] = PhaseCount(
            body=sum(len(idx) / u for u, idx in chosen.values()), straight=len(straight), depth=deepest,
            body_ffma=sum(sum(1 for i in idx if ins[i].category == "ffma") / u for u, idx in chosen.values()),
            body_lds_widths=widths_of(body, "lds"), body_ldg_widths=widths_of(body, "ldg"),
            calls=sum(1 for i in every if i.base == "CALL"),
            div64_calls=sum(1 for i in every if i.base == "CALL" and i.target and DIV64_ROUTINE.search(i.target)),
            body_sass=len(body), unroll=max(unrolls) if unrolls else 1,
            body_sts=sum(1 for i in body if i.category == "sts"), body_sts_path=path_sts,
            body_dfma=sum(sum(1 for i in idx if ins[i].base == "DFMA") / u for u, idx in chosen.values()),
            loops=max(1, len(chosen)), **cycles)
    resources = resources or {}
    mix = mix_of(code)
    warps = None
    if resources.get("registers") and block_threads:
        warps = occupancy(resources["registers"], resources.get("shared_bytes") or 0, block_threads)["warps_per_sm"]
    kernel_lines = source is not None and any(i.file and os.path.realpath(i.file) == source.file for i in code)
    return KernelAudit(
        kernel=name, dtype=dtype, registers=resources.get("registers"), spill_bytes=resources.get("spill_bytes"),
        shared_bytes=resources.get("shared_bytes"), block_threads=block_threads, warps_per_sm=warps,
        instructions=len(code), mix=mix, f64=mix["f64"], local=mix["local"],
        div64_calls=sum(n for t, n in calls.items() if t and DIV64_ROUTINE.search(t)), calls=dict(calls),
        loops=loops, hottest=hottest_loop(loops), phases=phases, lineinfo=kernel_lines,
        div64_in_loops=sum(1 for i in live if depth_of[i] and ins[i].base == "CALL" and ins[i].target
                           and DIV64_ROUTINE.search(ins[i].target)),
        returning_atomics_in_loops=sum(1 for i in live if depth_of[i] and ins[i].base in RETURNING_ATOMICS))


# --------------------------------------------------------------------------- occupancy and issue slots
def _device():
    from .device import H200

    return H200


def clock_hz(device=None) -> float:
    """The SM clock the fp32 peak implies: ``fp32_flops / (2 FLOP * 128 lanes * SMs)``
    (1.98 GHz for the H200 model)."""
    device = device or _device()
    return device.fp32_flops / (2 * 128 * device.sms)


def occupancy(registers: int, shared_bytes: int, threads: int, device=None) -> dict:
    """Resident blocks and warps per SM (sm_90 rules).

    ``shared_bytes`` is ptxas's figure (it already holds the 1 KB system reserve).
    Registers are allocated per warp in units of 256, from four sub-partitions of 16K.
    """
    device = device or _device()
    warps_per_block = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    warps_by_regs = 4 * ((device.registers_per_sm // 4) // per_warp) if per_warp else 64
    limits = {
        "registers": warps_by_regs // warps_per_block,
        "shared": device.shared_per_sm // shared_bytes if shared_bytes else device.blocks_per_sm,
        "threads": device.threads_per_sm // (32 * warps_per_block),
        "blocks": device.blocks_per_sm,
    }
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps_per_block,
            "limited_by": min(limits, key=limits.get), "warps_per_block": warps_per_block}


def _per_thread(phases: dict, iterations: dict, body_key: str, straight_key: str) -> dict | None:
    """``body * iterations + straight * runs`` per phase, the two read from a ``PhaseCount`` (or
    dict) under the given names; ``None`` where a phase lacks one."""
    out = {}
    for name, count in phases.items():
        get = count.get if isinstance(count, dict) else lambda k, c=count: getattr(c, k, None)
        body, straight = get(body_key), get(straight_key)
        if body is None or straight is None:
            return None
        it = iterations.get(name, 0)
        runs = 1
        if isinstance(it, (tuple, list)):
            it, runs = it
        out[name] = body * it + straight * runs
    return out


def per_thread_instructions(phases: dict, iterations: dict) -> dict:
    """``{phase: issued instructions per thread}`` from a ``PhaseCount`` (or dict) per phase
    and the ``phase_model`` iterations (a number, or ``(body_iterations, straight_runs)``).
    A phase the model does not name runs its body zero times and its straight part once."""
    return _per_thread(phases, iterations, "body", "straight")


def per_thread_cycles(phases: dict, iterations: dict) -> dict | None:
    """``{phase: clocks one warp alone spends on it}`` (``stall_charges``), weighted like
    ``per_thread_instructions``; ``None`` where a phase has no cycle counts."""
    return _per_thread(phases, iterations, "body_cycles", "straight_cycles")


def normalise_steps(phases: dict, steps: dict) -> dict:
    """The measured ``PhaseCount``s per source step of the phase model: ``steps`` maps a phase
    to ``(kind, per_step)``, a step issuing ``per_step`` global loads (``"ldg"``) or shared
    stores (``"sts"``) or FFMAs (``"ffma"``), counted in the phase's SASS loop body; body = instructions per pass
    / steps per pass. Stores are those one pass executes (``body_sts_path``): a body that stores a
    value on one path and a zero on another (a channel past the end) stores once a pass, and
    dividing by both paths' stores charged such a copy about half its cost. (A loop of
    compile-time trip count that LLVM unrolled completely, or
    one the store-per-line rule cannot see through, is still divided right.) A phase whose
    body has none of them is left as measured."""
    from dataclasses import replace

    out = dict(phases)
    for name, (kind, per_step) in steps.items():
        m = out.get(name)
        if m is None or not m.body_sass:
            continue
        if kind == "ffma":  # FFMA per pass through the loop (body_ffma is per source iteration)
            seen = m.body_ffma * m.unroll
        else:  # (stores: those one pass executes, where the body stores on alternative paths)
            seen = sum(m.body_ldg_widths.values()) if kind == "ldg" else (m.body_sts_path or m.body_sts)
        n = seen / per_step
        if n <= 0:
            continue
        ffma = m.body_ffma * m.unroll  # back to per pass (single-loop phases)
        cycles = None if m.body_cycles_sass is None else m.body_cycles_sass / n
        out[name] = replace(m, body=m.body_sass / n, body_ffma=ffma / n, unroll=n, body_cycles=cycles)
    return out


def issue_model(per_thread: dict, blocks: int, threads: int, registers: int, shared_bytes: int,
                device=None, cycles: dict | None = None) -> dict:
    """The static issue-slot model of one launch (a prediction). See the module docstring.

    per_thread: ``{phase: instructions issued per thread}``; blocks, threads: the grid and the
    block; registers and shared_bytes: ptxas's figures. Returns the occupancy, waves,
    ``seconds`` and the per-phase share of it.

    With ``cycles`` (``per_thread_cycles``: the clocks one warp alone spends on each phase,
    its stalls included) it also returns ``latency_seconds``: each wave takes at least as
    long as one block does when its warps hide each other's stalls only within a phase (a
    barrier keeps them in step): ``sum over phases of max(w * instructions, one warp's
    clocks)``, ``w`` the block's warps on its busiest scheduler. Blocks sharing an SM
    overlap freely. ``latency_seconds >= seconds``; the two agree where enough warps are
    resident to cover every wait (also a prediction, on assumed latencies: ``LATENCY``).
    """
    device = device or _device()
    occ = occupancy(registers, shared_bytes, threads, device)
    if occ["blocks_per_sm"] < 1:
        return {**occ, "feasible": False, "seconds": math.inf, "per_thread": sum(per_thread.values()),
                "phases_s": {}}
    clock = clock_hz(device)
    busiest = -(-blocks // device.sms)  # blocks on the busiest SM
    waves = -(-busiest // occ["blocks_per_sm"])
    # each wave: ceil(resident warps / 4 schedulers) issue slots per instruction of a thread
    slots_per_instruction = 0
    left = busiest
    for _ in range(waves):
        resident = min(left, occ["blocks_per_sm"])
        slots_per_instruction += -(-resident * occ["warps_per_block"] // 4)
        left -= resident
    total = sum(per_thread.values())
    seconds = slots_per_instruction * total / clock
    out = {**occ, "feasible": True, "waves": waves, "busiest_sm_blocks": busiest, "clock_hz": clock,
           "per_thread": total, "seconds": seconds,
           "phases_s": {k: slots_per_instruction * v / clock for k, v in per_thread.items()}}
    if cycles is not None:
        own = -(-occ["warps_per_block"] // 4)  # one block's warps on its busiest scheduler
        block_clocks = {k: max(own * v, cycles.get(k, own * v)) for k, v in per_thread.items()}
        one_block = sum(block_clocks.values())
        clocks, left = 0.0, busiest
        for _ in range(waves):
            resident = min(left, occ["blocks_per_sm"])
            clocks += max(-(-resident * occ["warps_per_block"] // 4) * total, one_block)
            left -= resident
        out["latency_seconds"] = clocks / clock
        out["one_block_s"] = {k: v / clock for k, v in block_clocks.items()}
    return out


def larger_estimate_us(row: dict) -> float:
    """The larger of an audit row's two time estimates, in microseconds: ``latency_us`` (one
    warp's stalls counted; never below the issue-slot figure) where the row has it, else
    ``predicted_us`` (issue slots). What the audits' searches rank tiles by: a tile that only
    the issue-slot model likes waits on its loads (both are predictions)."""
    latency = row.get("latency_us")
    return max(row["predicted_us"], latency) if latency is not None else row["predicted_us"]


# --------------------------------------------------------------------------- kernels of the package
def block_threads_of(func) -> int | None:
    """Threads per block a kernel factory baked in (a closure constant named ``THREADS``),
    else ``None`` (grid-stride kernels launch ``backend.launch_config``'s 256)."""
    func = getattr(func, "py_func", func)
    try:
        nonlocals = inspect.getclosurevars(func).nonlocals
    except (TypeError, ValueError):
        return None
    for key in ("THREADS", "BLOCK_THREADS", "threads_per_block"):
        value = nonlocals.get(key)
        if isinstance(value, int):
            return value
    return None


def _audit_cubin(func, cubin, resources, name, dtype) -> KernelAudit:
    listing = parse_sass(disassemble(cubin))
    threads = block_threads_of(func) or 256
    return audit_listing(listing, source_of(func), name, dtype, resources, threads)


@functools.lru_cache(maxsize=None)
def _audit_cached(func, signature, name, dtype, cc):
    ptx, cubin, resources = compile_cubin(func, signature, cc)
    return _audit_cubin(func, cubin, resources, name, dtype)


def audit_kernel(kernel, signature, name: str = "", dtype: str = "", cc=CC, ptx: str | None = None) -> KernelAudit:
    """Compile (once per process: cached by function and signature), disassemble, audit.
    With ``ptx`` (one of ``ptx_variants``), audit that PTX of the same kernel instead."""
    if ptx is not None:
        return _audit_cubin(kernel, *link_cubin(ptx, cc), name, dtype)
    return _audit_cached(kernel, tuple(signature), name, dtype, cc)  # the dispatcher keeps launch bounds


def source_hash(*objects) -> str:
    """sha256 of the source of modules, functions or classes (the planner table records the
    kernel it measured). A cached or decorated function is read through ``__wrapped__``."""
    h = hashlib.sha256()
    for obj in objects:
        obj = inspect.unwrap(obj)
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:16]
