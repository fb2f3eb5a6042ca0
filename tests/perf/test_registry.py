"""The kernel registry: one walk over every system's kernels, for the audit and the sanitizer."""

import sys
import textwrap

import pytest

from deftnumba.perf import audit


def test_every_dcn_kernel_module_is_registered():
    modules = {module.__name__ for _, module in audit.kernel_modules()}
    assert {"deftnumba.dcn.kernels.im2col", "deftnumba.dcn.kernels.fused_columns",
            "deftnumba.dcn.kernels.fused_tiled", "deftnumba.dcn.kernels.backward"} <= modules
    cases = [(name, dtype) for name, dtype, *_ in audit.registered_cases()]
    names = [name for name, _ in cases]
    assert len(cases) == len(set(cases)) >= 6  # one case per (kernel, dtype)
    assert all(name.count(".") == 1 for name in names if not name.startswith(("tucker.", "lean.")))


def test_a_missing_system_is_skipped_and_a_new_one_is_walked(tmp_path, monkeypatch):
    package = tmp_path / "toy_system" / "kernels"
    package.mkdir(parents=True)
    (tmp_path / "toy_system" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "scale.py").write_text(textwrap.dedent('''
        class _Kernel:
            py_func = staticmethod(lambda a: None)

        def ptx_cases():
            return [("scale", "float32", _Kernel(), "void(float32[:])")]
        '''))
    (package / "helpers.py").write_text("X = 1\n")  # no ptx_cases: not a kernel module
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(audit, "KERNEL_PACKAGES", ["deftnumba.no_such_system.kernels"])
    assert list(audit.registered_cases()) == []
    audit.register_kernel_package("toy_system.kernels")
    (name, dtype, kernel, signature), = audit.registered_cases()
    assert (name, dtype, signature) == ("toy_system.scale.scale", "float32", "void(float32[:])")
    assert [c[0] for c in audit.cases()] == ["toy_system.scale.scale"]
    for mod in [m for m in sys.modules if m.startswith("toy_system")]:
        monkeypatch.delitem(sys.modules, mod)


def test_a_broken_kernel_package_is_not_silently_skipped(tmp_path, monkeypatch):
    package = tmp_path / "broken_system" / "kernels"
    package.mkdir(parents=True)
    (tmp_path / "broken_system" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(audit, "KERNEL_PACKAGES", ["broken_system.kernels"])
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        list(audit.registered_cases())
    for mod in [m for m in sys.modules if m.startswith("broken_system")]:
        monkeypatch.delitem(sys.modules, mod)
