"""The README's examples run as written, so they cannot rot: the NumPy example of "Use"
(the block after ``<!-- readme-example: numpy -->``) runs here and gives the shape it
promises, and the two fresh-machine commands keep their exact form (CI reads the test one)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str, language: str) -> str:
    text = README.read_text()
    assert marker in text, f"README.md lost its {marker} marker"
    match = re.search(rf"```{language}\n(.*?)```", text[text.index(marker):], re.S)
    assert match, f"no ```{language} block after {marker}"
    return match.group(1)


def test_readme_numpy_example_runs_and_matches_the_reference(capsys):
    from deftnumba.dcn import reference

    code = _block_after("<!-- readme-example: numpy -->", "python")
    namespace: dict = {}
    exec(compile(code, "README.md (Use, NumPy example)", "exec"), namespace)  # noqa: S102
    y, x, offset, weight = (namespace[k] for k in ("y", "x", "offset", "weight"))
    assert y.shape == (namespace["N"], namespace["Cout"], namespace["Ho"], namespace["Wo"])
    assert str(y.shape) in capsys.readouterr().out
    expected = reference.deform_conv2d(x, offset, weight, None, padding=namespace["pad"])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_readme_tucker_and_lean_example_runs_and_matches_the_references():
    from deftnumba.lean.reference import lean_conv2d_reference
    from deftnumba.tucker.reference import tucker_conv2d_reference

    code = _block_after("<!-- readme-example: tucker-lean -->", "python")
    namespace: dict = {}
    exec(compile(code, "README.md (Tucker and lean example)", "exec"), namespace)  # noqa: S102
    x, f, y, z = (namespace[k] for k in ("x", "f", "y", "z"))
    np.testing.assert_allclose(y, tucker_conv2d_reference(x, f.first, f.core, f.last, padding=1),
                               rtol=1e-4, atol=1e-4)
    expected = lean_conv2d_reference(x, namespace["pointwise"], namespace["stencil"],
                                     taps=namespace["PATTERNS"]["star5"])
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)


def test_readme_commands_keep_their_form():
    demo = _block_after("<!-- demo-command -->", "bash").strip()
    test = _block_after("<!-- test-command -->", "bash").strip()
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("python -m deftnumba demo")
    assert test.startswith("python3 -m venv .venv") and "python -m pytest" in test
