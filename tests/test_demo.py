"""``geoupsample demo``: bad options fail before any file is written, and --iters reaches
every gsjbu fit, the segmentation's too (its provenance tag says so)."""

from __future__ import annotations

import rasterio
from typer.testing import CliRunner

from geoupsample.cli import app


def test_demo_refuses_bad_options_before_writing(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    res = runner.invoke(app, ["demo", "-o", str(out), "--iters", "-3"])
    assert res.exit_code == 2 and "iters must be an integer >= 0" in res.output
    assert not out.exists()
    (tmp_path / "f").write_text("x")
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "f")])
    assert res.exit_code == 2 and "is a file" in res.output


def test_demo_iters_reach_the_segmentation(tmp_path):
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path), "--iters", "2"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "classes_gsjbu.tif") as ds:
        assert "iters=2 " in ds.tags()["geoupsample_params"]
        assert ds.crs is not None and ds.count == 2
    assert (tmp_path / "quicklook.png").stat().st_size > 10_000
