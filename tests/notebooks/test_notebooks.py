"""The notebooks of notebooks/: each runs end to end in quick mode (AF_NEXT_NOTEBOOK_QUICK=1) into a
temporary copy (the committed notebook, with its full run's outputs, is never overwritten), and shows
its tables and figures; the committed ones are executed full runs."""

import os

import pytest

if os.environ.get("CI") == "true":  # CI installs the notebooks extra: missing packages are a failure there
    import nbclient  # noqa: F401
    import nbformat
else:
    pytest.importorskip("nbclient", reason="pip install nbclient nbformat ipykernel matplotlib")
    nbformat = pytest.importorskip("nbformat")

from af_next_jax.notebooks.__main__ import REPO, execute, main

# Each notebook's markdown tables (their header rows) and the number of figures it draws.
EXPECTED = {
    "rote_ablation": (["| split | clips | onset questions |", "| window of the onset | questions | RoTE accuracy |",
                       "| window of the onset | questions | RoTE: window right |", "| arm | R^2: absolute time |"], 2),
    "sequence_parallelism": (["| setup | tokens L | measured MiB / device |",
                              "| setup | tokens L | HLO MiB / device (by kind) |"], 2),
}


def _path(name: str) -> str:
    return os.path.join(REPO, "notebooks", f"{name}.ipynb")


def _outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _shown(notebook) -> tuple[str, int]:
    """(all markdown and text shown by the cells, number of figures)."""
    text, figures = [], 0
    for output in _outputs(notebook):
        data = output.get("data", {})
        text += [output.get("text", ""), data.get("text/markdown", ""), data.get("text/plain", "")]
        figures += "image/png" in data
    return "\n".join(text), figures


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_quick_mode_and_shows_its_tables_and_figures(name, tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel sees the devices a user's shell would
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder goes with the test's
    committed = open(_path(name), "rb").read()
    out = tmp_path / f"{name}.ipynb"
    execute(_path(name), str(out), quick=True, timeout=600)
    assert open(_path(name), "rb").read() == committed
    notebook = nbformat.read(str(out), as_version=4)
    assert not [o for o in _outputs(notebook) if o.output_type == "error"]
    text, figures = _shown(notebook)
    tables, expected_figures = EXPECTED[name]
    for header in tables:
        assert header in text, header
    assert figures == expected_figures
    assert "quick (AF_NEXT_NOTEBOOK_QUICK=1) run" in notebook.cells[0].source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_holds_its_full_run(name):
    """Every code cell executed, in order, by a full run, with the tables and figures; the header says
    where and how long, and the closing note is written."""
    notebook = nbformat.read(_path(name), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    header = notebook.cells[0].source
    assert "**Executed:**" in header and "full run" in header and " min " in header
    text, figures = _shown(notebook)
    tables, expected_figures = EXPECTED[name]
    assert all(table in text for table in tables) and figures == expected_figures
    closing = notebook.cells[-1]
    assert closing.cell_type == "markdown" and "closing note: written from" not in closing.source


def test_quick_run_is_never_saved_over_the_committed_notebook(capsys):
    with pytest.raises(SystemExit):
        main(["run", _path("rote_ablation"), "--quick"])
    assert "--quick needs --out elsewhere" in capsys.readouterr().err
