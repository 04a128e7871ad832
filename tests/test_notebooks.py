"""Every notebook runs top to bottom (its code cells, in order, in one namespace)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    env = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        # shell/magic lines (installs) are Colab's business, not Python
        source = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("!", "%")))
        exec(compile(source, f"{path.name} cell {i}", "exec"), env)


def test_there_is_a_notebook():
    assert NOTEBOOKS
