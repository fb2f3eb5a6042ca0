"""How we measure: a generic harness over registered ops (``bench.harness``), the ops
(``bench.ops``) and the charts drawn from its CSVs (``bench.plots``).

``deftnumba.bench`` was once one module; its names (``bench.run``, ``bench.Config``,
``bench.SUITES`` ...) still resolve here, to ``bench.harness``.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("__") or name in ("harness", "ops", "plots"):
        raise AttributeError(name)  # submodules import normally; never recurse through here
    harness = importlib.import_module(f"{__name__}.harness")
    try:
        return getattr(harness, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
