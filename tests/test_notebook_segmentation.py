"""The segmentation notebook runs clean, top to bottom, on the bundled data."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "segmentation_from_polygons.ipynb"


def test_segmentation_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]  # fmt: skip
    assert not errors
    images = sum(
        any(k.startswith("image/") for k in o.get("data", {}))
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    assert images >= 4  # the plots were drawn
