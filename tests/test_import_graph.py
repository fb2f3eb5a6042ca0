"""The house's import graph, read with ``ast``: arrows point down, no cycles, one ``cuda`` import.

    notebook, __main__ -> bench -> dcn | tucker | lean -> perf -> runtime

* ``runtime`` imports nothing of deftnumba above it; ``perf`` only ``runtime``;
* a system (dcn, tucker, lean) imports ``runtime``, ``perf`` and itself, never
  ``bench``, the notebook glue or another system; its ``kernels`` import only
  ``runtime`` and their own package (never the system's ``ops``);
* ``bench`` imports no notebook glue; nothing below the top imports ``deftnumba`` itself;
* module-level imports form no cycle;
* only ``runtime/backend.py`` imports numba's ``cuda``.

Imports inside functions count for the direction rules (a lazy upward import is
still an upward arrow); only module-level imports can make an import-time cycle.
Old names (``deftnumba.backend`` ...) are read as the modules they stand for.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deftnumba._aliases import new_name

PACKAGE = Path(__file__).resolve().parents[1] / "deftnumba"
SYSTEMS = ("dcn", "tucker", "lean")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(path: Path):
    """``(imported module, line, at module level)`` for every import of deftnumba in ``path``."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()  # imports inside a def run when it is called, not at import time
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(module, path.name == "__init__.py", node.level, node.module)
            # ``from pkg import sub`` imports the submodule pkg.sub where one exists
            names = []
            for a in node.names:
                candidate = f"{origin}.{a.name}"
                as_file = PACKAGE.parent / Path(*candidate.split("."))
                names.append(candidate if (as_file.with_suffix(".py").exists() or as_file.is_dir()
                                           or new_name(candidate)) else origin)
        else:
            continue
        for name in names:
            if name == "deftnumba" or name.startswith("deftnumba."):
                found.append((new_name(name) or name, node.lineno, id(node) not in in_function))
    return module, found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "deftnumba"
    if parts[1] in SYSTEMS:
        return f"{parts[1]}.kernels" if len(parts) > 2 and parts[2] == "kernels" else parts[1]
    return parts[1]  # runtime, perf, bench, notebook, __main__, _aliases


ALLOWED = {
    "runtime": {"runtime"},
    "perf": {"runtime", "perf"},
    "bench": {"runtime", "perf", "bench", *SYSTEMS, *(f"{s}.kernels" for s in SYSTEMS)},
    "_aliases": set(),
}
for system in SYSTEMS:
    ALLOWED[system] = {"runtime", "perf", system, f"{system}.kernels"}
    ALLOWED[f"{system}.kernels"] = {"runtime", f"{system}.kernels"}


def _graph():
    return dict(_imports(path) for path in sorted(PACKAGE.rglob("*.py")))


def test_arrows_point_down():
    wrong = []
    for module, imports in _graph().items():
        mine = _layer(module)
        if mine not in ALLOWED:
            continue  # the top: deftnumba/__init__, __main__, notebook
        for name, line, _ in imports:
            theirs = _layer(name)
            if theirs not in ALLOWED[mine]:  # the top-level package counts as above everything
                wrong.append(f"{module}:{line} ({mine}) imports {name} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_kernels_never_import_their_ops():
    wrong = [f"{module}:{line} imports {name}" for module, imports in _graph().items()
             if ".kernels" in module for name, line, _ in imports if name.endswith(".ops")]
    assert not wrong


def test_no_import_cycle_at_module_level():
    graph = {module: {name for name, _, top in imports if top} for module, imports in _graph().items()}
    # ``from . import x`` in a package __init__ points at x; a parent package is imported first anyway
    state, stack = {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph or nxt.startswith(node + "."):
                continue  # not a module of ours, or a package importing its own submodule
            if state.get(nxt) == "active":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module)


def test_only_runtime_backend_imports_numba_cuda():
    sites = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "numba" and any(a.name == "cuda" for a in node.names):
                sites.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.Import) and any(a.name == "numba.cuda" for a in node.names):
                sites.append(str(path.relative_to(PACKAGE)))
    assert sites == ["runtime/backend.py"]


@pytest.mark.parametrize("choice", ["simulator", "cuda"])
def test_every_module_imports_in_a_fresh_interpreter(choice):
    """``import deftnumba`` picks the backend before anything touches Numba, in each backend:
    every module of the package imports in a fresh interpreter and numba.cuda is in that mode.
    (The cuda backend needs no GPU to import; PyTorch-only modules are skipped without torch.)"""
    code = (
        "import importlib, pkgutil, deftnumba\n"
        "from numba import cuda\n"
        "sim = getattr(cuda, 'simulator_init', None) is not None\n"
        f"assert sim == ({choice!r} == 'simulator'), sim\n"
        "mods = [m.name for m in pkgutil.walk_packages(deftnumba.__path__, 'deftnumba.')]\n"
        "for name in mods:\n"
        "    if name == 'deftnumba.__main__':\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        if err.name not in ('torch', 'torchvision', 'matplotlib', 'sklearn'):\n"
        "            raise\n"
        "print(len(mods))\n")
    env = dict(os.environ, DEFTNUMBA_BACKEND=choice, DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 30
