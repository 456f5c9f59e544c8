"""The notebooks in notebooks/: each executes without error, and each is committed stripped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Notebook-level metadata a stripped notebook may keep: which kernel, which language.
ALLOWED_METADATA = {"kernelspec", "language_info"}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def test_the_notebooks_are_there():
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_curvature_report.ipynb",
        "03_reestimation.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert set(nb["metadata"]) <= ALLOWED_METADATA, sorted(nb["metadata"])
    for i, cell in enumerate(nb["cells"]):
        where = f"{path.name}, cell {i}"
        assert cell.get("metadata", {}) == {}, f"{where}: cell metadata {cell['metadata']}"
        assert "attachments" not in cell, f"{where}: attachments"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{where}: has outputs; strip them before committing"
            assert cell["execution_count"] is None, f"{where}: has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs nbclient")
    pytest.importorskip("ipykernel", reason="executing notebooks needs ipykernel")
    from nbclient.exceptions import CellExecutionError

    # The kernel inherits this environment. One intra-op thread: these models are tiny, and on a
    # busy machine (tests running side by side) torch's spinning worker threads slow them down by
    # an order of magnitude. No GUI backend, and no Jupyter path migration notice.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell; guards against a hang, not speed
        kernel_name="python3",
        # The kernel runs in a temporary directory: nothing it might write lands in the repository.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    error = None
    try:
        # jupyter_client runs a kernel spec whose command is "python" with sys.executable, so the
        # kernel is this interpreter, with this environment's uba_auto.
        client.execute()
    except CellExecutionError as err:
        error = ANSI_ESCAPE.sub("", str(err))  # the cell, its traceback, without colour codes
    if error is not None:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    assert list(tmp_path.iterdir()) == [], "the notebook wrote files"
