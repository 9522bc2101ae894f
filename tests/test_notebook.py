"""notebooks/walkthrough.ipynb runs top to bottom (kernel from this interpreter, cwd = repo root)
and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_stripped() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_executes(tmp_path: Path, monkeypatch) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WALKTHROUGH_RUN_DIR", str(run_dir))  # the kernel inherits the environment
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    # the kernel is this interpreter (the venv's), via ipykernel's native "python3" spec
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert (run_dir / "feature_maps.png").is_file() and (run_dir / "predictions.png").is_file()
    images = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    )
    assert images >= 9, images  # every figure rendered inline
