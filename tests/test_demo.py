"""``geoupsample demo``: bad options fail before any file is written, --iters reaches every
gsjbu fit, the segmentation's too (its provenance tag says so), and the segmentation's summary
scores both paths against the rules the bundled polygons were drawn from."""

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
        assert ds.tags()["geoupsample_path"] == "features"
    with rasterio.open(tmp_path / "classes_probabilities_gsjbu.tif") as ds:
        assert ds.tags()["geoupsample_path"] == "probabilities"
    assert (tmp_path / "quicklook.png").stat().st_size > 10_000
    # every map is scored against the rules the polygons were drawn from, and the best named
    scores = [float(line.split("%")[0].split()[-1]) for line in res.output.splitlines()
              if "% of pixels agree" in line]
    assert len(scores) == 3 and all(50 < s <= 100 for s in scores), res.output
    assert "best on this scene: features, gsjbu (default)" in res.output, res.output


def test_rule_classes_are_the_bundled_polygons_classes():
    """The demo's truth: inside the bundled polygons the per-pixel rules give the polygon's
    class almost everywhere (the polygons were drawn from them after a 5 x 5 majority filter)."""

    import geoupsample.labels as gl
    from geoupsample.commands.demo import bundled, rule_classes

    with rasterio.open(bundled("rotterdam_ms.tif")) as ds:
        ms, transform, crs = ds.read(), ds.transform, ds.crs
    polys = gl.read_polygons(bundled("rotterdam_labels.geojson"), "class")
    inside = gl.rasterize_classes(polys, transform, ms.shape[1:], crs=crs)
    rules = rule_classes(ms)
    assert (rules[inside >= 0] == inside[inside >= 0]).mean() > 0.9
