"""docs/notebooks/from-the-tutorial.ipynb runs from top to bottom, offline, and draws its figures.

The notebook is executed as a reader would run it (a Jupyter kernel, cell by cell) in a
temporary folder, with the interpreter and the rsscene that run these tests. About 40 s on
one shared CPU core.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import rsscene

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "docs" / "notebooks" / "from-the-tutorial.ipynb"
KERNEL = "rsscene-tests"
NEEDS = (
    "the notebook test needs nbclient, nbformat and ipykernel"
    ' (pip install -e ".[test]" installs them)'
)


@pytest.fixture(scope="module")
def nbtools():
    """(nbclient, nbformat); where they are missing, a skip, or in CI (CI set) a failure."""
    try:
        import ipykernel  # noqa: F401
        import nbclient
        import nbformat
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the notebook, and cannot: {NEEDS} ({e})", pytrace=False)
        pytest.skip(f"{NEEDS} ({e})")
    return nbclient, nbformat


def test_the_notebook_is_stored_without_outputs(nbtools) -> None:
    _, nbformat = nbtools
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert NOTEBOOK.stat().st_size < 40_000


def _kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel of this interpreter, importing this rsscene, kept out of the user's Jupyter
    and IPython folders; one thread, as the other tests on a shared CPU."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "rsscene tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel starts in the temporary folder: a relative PYTHONPATH (the floors job's
    # PYTHONPATH=src) would point nowhere there, so it gets where this rsscene lives.
    here = str(Path(rsscene.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.getenv("PYTHONPATH")])))


def test_the_notebook_runs_and_draws_its_figures(nbtools, tmp_path, monkeypatch) -> None:
    nbclient, nbformat = nbtools
    _kernel(tmp_path, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,  # seconds a cell; training takes about 25
        startup_timeout=120,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(work)}},
    )
    started = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a cell of {NOTEBOOK.name} failed:\n{e}", pytrace=False)
    print(f"{NOTEBOOK.name} ran in {time.perf_counter() - started:.0f} s")

    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Every cell that shows something shows a picture.
    for cell in code:
        if "display(" in cell.source:
            shown = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert shown, f"no figure from the cell:\n{cell.source}"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "test accuracy" in printed and "notebook ran in" in printed

    base = work / "runs" / "from-the-tutorial"
    cams = sorted((base / "cam").glob("*_cam.png"))
    figures = [base / "run" / "curves.png", base / "run" / "eval" / "confusion.png", *cams]
    assert len(cams) == 5  # one per class
    for figure in figures:
        assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), figure
    report = json.loads((base / "run" / "eval" / "report.json").read_text())
    assert "tta_accuracy" in report and sorted(report["per_class"]) == report["classes"]
    assert len(report["classes"]) == 5
