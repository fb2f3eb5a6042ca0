"""Kernel source rules read with ``ast`` (docs/contributing.md, "One value per join").

A conditional expression (``a if c else b``) or a short-circuit ``and``/``or`` inside a
larger expression is a branch taken while other values wait on Python's evaluation stack
(the call's function and earlier arguments, a tuple's earlier items). Numba turns each
waiting value into a phi variable of the join block and orders those phis by iterating a
set of their names: the order, and with it the LLVM IR handed to NVVM, changed with
``PYTHONHASHSEED`` (seen in ``tucker.fused``'s staging, session 30). As a statement of its
own (``x = a if c else b``) the branch carries one value and the IR is the same in every
process. The rule costs nothing on the GPU: the temporary is a register either way.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deftnumba"


def _is_jitted(fn: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _carries_one_value(node, parents) -> bool:
    """Whether the branch of ``node`` (an ``IfExp`` or ``BoolOp``) joins with nothing else
    on the stack: the whole value of an assignment or return, the test of an ``if`` or
    ``while``, a branch of such a conditional (a chain ``a if p else b if q else c``) or an
    operand of such an ``and``/``or``/``not``."""
    parent = parents.get(node)
    if isinstance(parent, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Return)) and parent.value is node:
        return True
    if isinstance(parent, (ast.If, ast.While)) and parent.test is node:
        return True
    if isinstance(parent, ast.IfExp) and node is not parent.test:
        return _carries_one_value(parent, parents)
    if isinstance(parent, ast.BoolOp) or (isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not)):
        return _carries_one_value(parent, parents)  # an operand of an allowed and/or/not
    return False


def nested_branches(source: str, filename: str = "<source>") -> list[str]:
    """``file:line function: expression`` for every conditional or ``and``/``or`` inside a
    larger expression of a jitted function in ``source``."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or not _is_jitted(fn):
            continue
        parents = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(fn):
            if isinstance(node, (ast.IfExp, ast.BoolOp)) and not _carries_one_value(node, parents):
                found.append(f"{filename}:{node.lineno} {fn.name}: {ast.unparse(parents[node])[:100]}")
    return found


def test_the_rule_finds_a_branch_inside_a_call_or_tuple_and_allows_a_statement():
    bad = ("@cuda.jit\n"
           "def kernel(a, c, i):\n"
           "    a[i] = f(a, a[i] if c else a[0])\n"
           "    t = (a[0], a[1] if c else a[2])\n"
           "    a[i] = g(c and i > 0)\n")
    good = ("@cuda.jit(device=True)\n"
            "def helper(a, c, i):\n"
            "    x = a[i] if c else a[0]\n"
            "    y = a[1] if c else a[2] if i > 0 else a[3]\n"
            "    ok = c and not (i > 0 or i < -4)\n"
            "    if c and i > 0:\n"
            "        return x\n"
            "    return y if ok else x\n"
            "def host(c):\n"
            "    return f(1 if c else 2)\n")  # not jitted: not checked
    assert [s.split(":")[1].split()[0] for s in nested_branches(bad)] == ["3", "4", "5"]
    assert nested_branches(good) == []


def test_no_kernel_branches_inside_an_expression():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += nested_branches(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, ("a conditional or and/or inside a larger expression of a kernel (make it "
                       "a statement of its own; docs/contributing.md, 'One value per join'):\n"
                       + "\n".join(found))
