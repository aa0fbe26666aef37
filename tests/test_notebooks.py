"""Every notebook's code cells run top to bottom on CPU; each installs kexue on Colab from
its one form field and is committed with the outputs of a real run.

Cells are executed in one namespace, in order, as a kernel would run them; IPython
magics and shell lines (`%...`, `!...`) are skipped since they only install packages
on Colab (the install cell installs nothing where kexue imports).
`KEXUE_NOTEBOOK_SMOKE=1` makes each notebook pick its tiny sizes and step counts (its
`SMOKE` flag), so all of them run in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


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
@pytest.mark.slow
def test_notebook_runs(path, capsys, monkeypatch):
    monkeypatch.setenv("KEXUE_NOTEBOOK_SMOKE", "1")
    namespace: dict = {"__name__": "__notebook__"}
    for index, source in enumerate(_code_cells(path)):
        try:
            exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.name}: code cell {index} failed: {error!r}") from error
    assert capsys.readouterr().out, f"{path.name} printed nothing"


def test_each_notebook_installs_from_the_readme_repository_and_has_a_colab_link():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    repository = re.search(r"`KEXUE_REPOSITORY = (https://github\.com/[^`\s]+)`", readme)[1]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert f'KEXUE_SOURCE = "{repository}"  # @param {{type:"string"}}' in first, path.name
        assert "pip" in first and "find_spec(\"kexue\")" in first, path.name
        link = (f"https://colab.research.google.com/github/"
                f"{repository.removeprefix('https://github.com/')}/blob/main/notebooks/{path.name}")
        assert link in readme, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_the_outputs_of_a_run(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [output for cell in cells for output in cell["outputs"]]
    assert sum(bool(cell["outputs"]) for cell in cells) >= len(cells) - 1  # all but install
    assert any("image/png" in output.get("data", {}) for output in outputs), "no plot"
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert "/work/" not in json.dumps(outputs), "an output holds a path of this machine"
