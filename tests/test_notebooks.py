"""Every notebook in notebooks/ executes top to bottom (nbclient), so the examples never rot.

The kernel runs with the repository on PYTHONPATH and a private TMPDIR (the policy study's sweep
cache lands there, so every run exercises the sweep instead of reading an old cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.slow


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] and "policy_study.ipynb" in [p.name for p in NOTEBOOKS]


def test_notebooks_are_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not stale, f"{path.name}: clear the outputs of cells {stale} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every figure cell rendered a figure, every table cell a table
    rich = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type in ("execute_result", "display_data")]
    figures = sum("application/vnd.plotly.v1+json" in o.data for o in rich)
    tables = sum("text/html" in o.data for o in rich)
    assert figures >= 5 and tables >= 4, (figures, tables)
