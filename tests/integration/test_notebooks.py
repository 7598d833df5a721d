"""The notebooks: committed fresh and without outputs, and every cell runs without error.

Each notebook runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) of this
interpreter, against real node processes, so a notebook broken by an API change fails CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart.ipynb", "privacy_utility.ipynb"]
KERNEL = "federation-tests"
CELL_TIMEOUT_S = 600
# Training shows tqdm's notebook widget (not text bars) in Jupyter; results render as HTML
# tables (quickstart) and plots (privacy_utility).
WIDGET = "application/vnd.jupyter.widget-view+json"
EXPECTED_OUTPUTS = {
    "quickstart.ipynb": {WIDGET, "text/html", "text/markdown"},
    "privacy_utility.ipynb": {WIDGET, "image/png"},
}

sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402  (notebooks/build.py, the generator)


def test_committed_notebooks_are_what_build_py_writes() -> None:
    for name, nb in build.notebooks().items():
        assert (NOTEBOOKS / name).read_text() == build.render(nb), (
            f"notebooks/{name} is stale: run `.venv/bin/python notebooks/build.py`"
        )
    assert sorted(build.notebooks()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


@pytest.fixture
def kernel_of_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec running ``sys.executable``, so the kernel sees this venv's packages.

    Written to a private JUPYTER_PATH under a name of its own, so a user-wide ``python3``
    kernel of some other interpreter cannot shadow it.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (federation tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # opt in now: no migration warning
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's temp dirs land here
    return KERNEL


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"{output['ename']}: {output['evalue']}")
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = output["text"]
                if "Warning" in text or "Traceback" in text:
                    found.append(f"stderr: {text[:500]}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_errors(
    name: str, kernel_of_this_interpreter: str, tmp_path: Path
) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel_of_this_interpreter,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    assert _errors(nb) == []
    assert not list(tmp_path.glob("federation-*")), "the notebook left a temp dir behind"
    shown = {mime for output in _outputs(nb) for mime in output.get("data", {})}
    assert EXPECTED_OUTPUTS[name] <= shown


def _outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in nb.cells for output in cell.get("outputs", [])]
