"""Old module names (before the package was split into runtime/, perf/, bench/, dcn/).

``import deftnumba.tiling``, ``from deftnumba.torch import DeformConv2d``,
``from deftnumba.kernels import im2col`` ... keep working: a meta-path finder
maps each old name (and everything below it) to the module's new home and
returns *that same module object*, so there is never a second copy, and
monkeypatching through an old name patches the real module. Nothing is
imported until an old name is used (``deftnumba.torch`` needs PyTorch).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_NAMES = {
    "deftnumba.backend": "deftnumba.runtime.backend",
    "deftnumba.ptx": "deftnumba.perf.audit",
    "deftnumba.arguments": "deftnumba.dcn.geometry",
    "deftnumba.ops": "deftnumba.dcn.ops",
    "deftnumba.reference": "deftnumba.dcn.reference",
    "deftnumba.torch": "deftnumba.dcn.torch",
    "deftnumba.torch_reference": "deftnumba.dcn.torch_reference",
    "deftnumba.models": "deftnumba.dcn.models",
    "deftnumba.training": "deftnumba.dcn.training",
    "deftnumba.offsets": "deftnumba.dcn.offsets",
    "deftnumba.demo": "deftnumba.dcn.demo",
    "deftnumba.roofline": "deftnumba.dcn.roofline",
    "deftnumba.kernels": "deftnumba.dcn.kernels",
    "deftnumba.tiling": "deftnumba.dcn.planning.plan",
}
"""Old dotted name -> new dotted name. A name below an old package maps likewise
(``deftnumba.kernels.im2col`` -> ``deftnumba.dcn.kernels.im2col``)."""


def new_name(fullname: str) -> str | None:
    """The module an old name now refers to, or None if ``fullname`` is not an old name."""
    for old, new in OLD_NAMES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _OldNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=found.origin)

    def create_module(self, spec):
        module = importlib.import_module(new_name(spec.name))
        spec.loader_state = module.__spec__  # the import system overwrites __spec__; exec_module restores it
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):  # ``python -m deftnumba.offsets`` (runpy) runs the module's new code
        spec = importlib.util.find_spec(new_name(fullname))
        return spec.loader.get_code(spec.name)


def install() -> None:
    if not any(isinstance(f, _OldNameFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldNameFinder())
