"""The bench ops: finding them, and reading the op protocol (see ``bench.harness``).

An op is a module (or object) with ``name``, ``methods()``, ``suites()``,
``make_inputs(shape, dtype, seed)``, ``runner(method, pass_, inputs)`` and
``operators(shape, method, pass_)``; the helpers here supply the defaults for
the optional parts.
"""

from __future__ import annotations

import importlib

from ..perf.roofline import floor_ms_of

PASSES = ("fwd", "bwd", "fwdbwd", "host")

OP_MODULES = ["deftnumba.dcn.bench_op", "deftnumba.tucker.bench_op", "deftnumba.lean.bench_op"]
"""Where the ops live; a module that does not exist in this checkout is skipped."""

OPS: dict = {}
"""``{name: op}`` of every op found (filled at import; ``register_op`` adds more)."""


def register_op(op) -> None:
    """Add an op (a module or object following the protocol above) under ``op.name``."""
    OPS[op.name] = op


def _find_ops() -> None:
    for module in OP_MODULES:
        try:
            register_op(importlib.import_module(module))
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise  # the op exists but something it needs is missing: say so


_find_ops()


def get_op(name: str):
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; ops are {list(OPS)}")
    return OPS[name]


def shape_columns(op) -> tuple[str, ...]:
    """An op's shape-parameter columns: the keys of its suites' parameter dicts, in order."""
    suites = dict(op.suites())
    if hasattr(op, "smoke_suites"):
        suites.update(op.smoke_suites())
    return tuple(dict.fromkeys(k for params in suites.values() for k in as_shape(op, params)))


def as_shape(op, shape) -> dict:
    """Shape parameters as a dict (an op may keep richer objects, e.g. DCN's ``Geometry``)."""
    if isinstance(shape, dict):
        return dict(shape)
    params = getattr(op, "params", None)
    if params is None:
        raise TypeError(f"op {op.name!r}: shape parameters must be a dict, got {type(shape).__name__}")
    return params(shape)


def shape_of(row: dict, op) -> dict:
    """A CSV row's shape parameters (integral floats back to ints)."""
    def value(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return {k: value(row[k]) for k in shape_columns(op) if k in row}


def passes_of(op, method: str) -> tuple[str, ...]:
    passes = getattr(op, "passes", None)
    return tuple(passes(method)) if passes is not None else PASSES


def baselines_of(op) -> tuple[str, ...]:
    baselines = getattr(op, "baselines", None)
    return tuple(baselines()) if baselines is not None else ()


def useful_flops(op, shape: dict, method: str, pass_: str) -> float:
    """What TFLOP/s are quoted in: the op's ``useful_flops`` (one number for every method,
    e.g. convolution FLOPs), else the method's counted FLOPs."""
    if hasattr(op, "useful_flops"):
        return op.useful_flops(shape, pass_)
    return sum(o.flops for o in op.operators(shape, method, pass_))


def floor_ms(operators, ceilings, dtype: str = "float32") -> float:
    """The roofline floor of operators run one after another: each bounded by its own larger term."""
    return sum(floor_ms_of(o.flops, o.bytes, ceilings, dtype) for o in operators)
