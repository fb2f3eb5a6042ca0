"""How we measure: a generic harness over registered ops (``bench.harness``), the ops
(``bench.ops``) and the charts drawn from its CSVs (``bench.plots``).

``deftnumba.bench`` was once one module; its names (``bench.run``, ``bench.Config``,
``bench.SUITES`` ...) still resolve here, to ``bench.harness``.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    from . import harness

    try:
        return getattr(harness, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
