"""The notebooks are tests: each runs top to bottom in a fresh kernel (its ``assert`` cells are
the checks), and each is stored without outputs so diffs stay readable.

Run them alone with ``python -m pytest -q tests/test_notebooks.py`` (the execution tests are
marked ``slow``); ``python -m pytest --nbmake notebooks/`` runs the same notebooks through nbmake.
"""

import os
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_pissa_and_history.ipynb"]
KERNEL = "python3"
CELL_TIMEOUT = 120
"""Seconds per cell. The slowest cell (a training loop) takes ~5-12 s on this 2-core CPU; the
margin is for a heavily loaded machine."""


def stored_output_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Every way ``nb`` is not stored clean: code cells with outputs or an execution count."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs", []) != []:
            problems.append(f"cell {i} has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell.execution_count}")
    return problems


def test_the_notebooks_are_there():
    missing = sorted(set(EXPECTED) - {p.name for p in NOTEBOOKS})
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert any(cell.cell_type == "code" for cell in nb.cells)
    problems = stored_output_problems(nb)
    assert not problems, (
        f"{path.name} is stored with outputs: {problems}; clear them before committing "
        "(Jupyter: Edit > Clear Outputs of All Cells, or `jupyter nbconvert --clear-output --inplace`)"
    )
    assert nb.metadata.kernelspec.name == KERNEL


def test_stored_output_check_catches_outputs_and_counts():
    nb = nbformat.v4.new_notebook()
    clean = nbformat.v4.new_code_cell("1 + 1")
    ran = nbformat.v4.new_code_cell("1 + 1")
    ran.execution_count = 3
    ran.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), clean, ran]
    assert stored_output_problems(nb) == ["cell 2 has 1 output(s)", "cell 2 has execution_count 3"]
    nb.cells = [nb.cells[0], clean]
    assert stored_output_problems(nb) == []


def test_the_notebook_kernel_is_installed():
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert spec.language == "python"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, record_property):
    stored = path.read_bytes()
    nb = nbformat.reads(stored.decode(), as_version=4)
    # the kernel imports this checkout's modlora, works offline, and starts in an empty folder
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # One intra-op thread: with two, OpenMP slows down 3-10x whenever anything else runs on this
    # 2-core machine (quickstart next to one busy process: 15 s with one thread, 39 s with two);
    # idle, one thread costs little at these batch sizes (quickstart 16 s vs 14 s with two).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=nb.metadata.kernelspec.name,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{path.name}: {seconds:.1f} s")

    ran = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in ran)
    last = "".join(o.get("text", "") for o in ran[-1].outputs if o.output_type == "stream")
    assert "all checks passed" in last
    assert list(tmp_path.iterdir()) == [], "the notebook wrote into its working directory"
    assert path.read_bytes() == stored, "running the notebook changed the stored file"
