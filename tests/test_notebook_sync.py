"""The committed ``notebooks/NN_*.ipynb`` are their jupytext sources, cell for cell, with no outputs.

The source of truth is the py:percent file (``notebooks/NN_name.py``: reviewable
diffs). The ``.ipynb`` is committed too, so that ``jupyter lab notebooks/`` and
GitHub open a real notebook, and so that CI executes exactly what is committed
(``pytest --nbmake``). This test fails when the two drift or when an ``.ipynb``
carries outputs. To fix it, regenerate the notebook from its source (``--update``
keeps the cell ids, so the diff shows only what changed):

    jupytext --update --to ipynb notebooks/NN_name.py

and clear outputs saved from Jupyter with
``jupyter nbconvert --clear-output --inplace notebooks/NN_name.ipynb``.
"""

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
FIX = "regenerate it: jupytext --update --to ipynb notebooks/{name}.py"


def _cells(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    assert SOURCES, "no notebooks/NN_*.py sources found"
    ipynbs = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in ipynbs] == [p.stem for p in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_matches_its_source(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; " + FIX.format(name=source.stem)
    expected = jupytext.read(source)
    actual = nbformat.read(ipynb, as_version=4)
    assert _cells(actual) == _cells(expected), f"{ipynb.name} drifted from {source.name}; " + FIX.format(
        name=source.stem)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_has_no_outputs(source):
    actual = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    for cell in actual.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{source.stem}.ipynb carries outputs; clear them: "
                f"jupyter nbconvert --clear-output --inplace notebooks/{source.stem}.ipynb")
