"""Every notebook in notebooks/ runs clean, top to bottom, on the bundled data, and draws."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: The least number of figures each notebook must draw.
MIN_IMAGES = {"segmentation_from_polygons": 4, "quickstart": 3, "whole_scene_xarray": 1,
              "time_series": 1}


def test_all_notebooks_are_covered() -> None:
    assert {p.stem for p in NOTEBOOKS} == set(MIN_IMAGES)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(notebook: Path, tmp_path: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
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
    assert images >= MIN_IMAGES[notebook.stem]  # the plots were drawn
