"""Every notebook's code cells run top to bottom on CPU.

Cells are executed in one namespace, in order, as a kernel would run them; IPython
magics and shell lines (`%...`, `!...`) are skipped since they only install packages
on Colab. `KEXUE_NOTEBOOK_SMOKE=1` makes each notebook pick its tiny sizes and step
counts (its `SMOKE` flag), so all of them run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in "".join(cell["source"]).splitlines()
                 if not line.lstrip().startswith(("%", "!"))]
        cells.append("\n".join(lines))
    return cells


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys, monkeypatch):
    monkeypatch.setenv("KEXUE_NOTEBOOK_SMOKE", "1")
    namespace: dict = {"__name__": "__notebook__"}
    for index, source in enumerate(_code_cells(path)):
        try:
            exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.name}: code cell {index} failed: {error!r}") from error
    assert capsys.readouterr().out, f"{path.name} printed nothing"
