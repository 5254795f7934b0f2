"""``geoupsample segment`` and ``geoupsample features`` on the bundled Rotterdam scene."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import timm
from safetensors.torch import save_file
from typer.testing import CliRunner

import geoupsample.backbones as gb
import geoupsample.labels as gl
from geoupsample.cli import app
from geoupsample.segmentation import class_colours, segment_raster

DATA = resources.files("geoupsample") / "data"
SCENE = str(DATA / "rotterdam_ms.tif")
LABELS = str(DATA / "rotterdam_labels.geojson")
FAST = ["--method", "bilinear", "--tile", "160", "--halo", "32", "-q"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_segment_spectral_writes_classes_and_probs(tmp_path: Path) -> None:
    out, probs = tmp_path / "seg.tif", tmp_path / "probs.tif"
    code, text = cli(
        "segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o", out,
        "--probs", probs, "--cell-size", "10", *FAST,
    )  # fmt: skip
    assert code == 0, text
    with rasterio.open(SCENE) as src:
        transform, crs, shape = src.transform, src.crs, src.shape
    with rasterio.open(out) as ds:
        assert ds.count == 2 and ds.dtypes == ("uint8", "uint8") and ds.nodata == 255
        assert ds.transform == transform and ds.crs == crs and ds.shape == shape
        assert ds.descriptions == ("class", "confidence")
        names = json.loads(ds.tags()["class_names"])
        assert names == ["bright_impervious", "dark_impervious", "vegetation"]
        assert ds.colormap(1)[2][:3] == (51, 160, 44)  # vegetation is green
        assert [c.name for c in ds.colorinterp] == ["palette", "undefined"]
        cls, conf = ds.read()
    assert set(np.unique(cls)) == {0, 1, 2} and conf.min() >= 254 // 3
    truth = gl.rasterize_classes(
        gl.read_polygons(LABELS, "class"), transform, shape, crs=crs
    )  # the labelled pixels
    acc = (cls[truth >= 0] == truth[truth >= 0]).mean()
    assert acc > 0.8, acc
    with rasterio.open(probs) as ds:
        p = ds.read().astype(int)
        assert ds.count == 3 and ds.dtypes[0] == "uint8" and ds.descriptions == tuple(names)
        # class probabilities, not the red, green and blue of an image
        assert [c.name for c in ds.colorinterp] == ["gray", "undefined", "undefined"]
    assert np.abs(p.sum(0) - 254).max() <= 2
    np.testing.assert_array_equal(p.argmax(0), cls)


def test_segment_gsjbu_python_api(tmp_path: Path) -> None:
    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    rep = segment_raster(
        SCENE, LABELS, "class", tmp_path / "s.tif", bb, probs_path=tmp_path / "p.tif",
        probs_dtype="float32", method="gsjbu", iters=2, tile=320, halo=0, path="probabilities",
    )  # fmt: skip
    assert rep.run.computed == 1 and rep.train_cells > 300
    assert sum(rep.class_fractions.values()) == pytest.approx(1.0)
    with rasterio.open(rep.probs_path) as ds:
        p = ds.read()
    np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-4)
    projected = segment_raster(
        SCENE, LABELS, "class", tmp_path / "s2.tif", bb, probs_path=tmp_path / "p2.tif",
        probs_dtype="float32", method="gsjbu", iters=2, tile=320, halo=0, consistency=2,
        path="probabilities",
    )  # fmt: skip
    with rasterio.open(projected.probs_path) as ds:
        p2 = ds.read()
    np.testing.assert_allclose(p2.sum(0), 1.0, rtol=1e-4)
    assert np.abs(p2 - p).max() > 1e-3  # the back-projection rounds changed the render


def test_segment_from_a_geodataframe(tmp_path: Path) -> None:
    import geopandas

    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=8)
    common = dict(probs_dtype="float32", method="bilinear", tile=320, halo=0)
    segment_raster(SCENE, LABELS, "class", tmp_path / "f.tif", bb,
                   probs_path=tmp_path / "fp.tif", **common)  # fmt: skip
    frame = geopandas.read_file(LABELS)
    segment_raster(SCENE, frame, "class", tmp_path / "g.tif", bb,
                   probs_path=tmp_path / "gp.tif", **common)  # fmt: skip
    with rasterio.open(tmp_path / "fp.tif") as a, rasterio.open(tmp_path / "gp.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_segment_timm_backbone_smoke(tmp_path: Path) -> None:
    code, text = cli(
        "segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o", tmp_path / "t.tif",
        "--backbone", "timm:resnet18", "--random-init", "--layer", "2",
        "--model-bands", "red,green,blue", *FAST,
    )  # fmt: skip
    assert code == 0, text
    with rasterio.open(tmp_path / "t.tif") as ds:
        assert ds.read(1).max() <= 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class-field", "landuse"], "class field 'landuse' not found"),
        (["--class-field", "class", "--backbone", "nope"], "unknown backbone 'nope'"),
        (["--class-field", "class", "--backbone", "timm:resnet18"], "--weights FILE"),
        (["--class-field", "class", "--bands", "7"], "band 7 does not exist"),
    ],
)
def test_segment_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    code, text = cli("segment", SCENE, "--labels", LABELS, "-o", tmp_path / "x.tif", *extra)
    assert code == 2 and message in text, text
    assert not (tmp_path / "x.tif").exists()


def test_segment_label_errors(tmp_path: Path) -> None:
    boxes = (("a", shapely.box(5, 50, 5.01, 50.01)), ("b", shapely.box(5, 50.1, 5.01, 50.2)))
    far = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"c": k}, "geometry": shapely.geometry.mapping(g)}
            for k, g in boxes
        ],
    }
    path = tmp_path / "far.geojson"
    path.write_text(json.dumps(far))
    code, text = cli(
        "segment", SCENE, "--labels", path, "--class-field", "c", "-o", tmp_path / "o.tif"
    )
    assert code == 2 and "overlaps the scene" in text
    far["features"] = far["features"][:1]
    path.write_text(json.dumps(far))
    code, text = cli(
        "segment", SCENE, "--labels", path, "--class-field", "c", "-o", tmp_path / "o.tif"
    )
    assert code == 2 and "at least two classes" in text


def test_spectral_pca_does_not_depend_on_the_bands_units(tmp_path: Path) -> None:
    """``spectral`` features mix units (band means beside NDVI): their PCA standardises them,
    so the scene in reflectance (x 1e-4) gets the components of the scene in digital numbers
    (a covariance PCA follows the largest-valued features: the band statistics in DN, NDVI and
    NDWI in reflectance)."""
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
        descriptions = src.descriptions
    scaled = tmp_path / "reflectance.tif"
    profile.update(dtype="float32")
    with rasterio.open(scaled, "w", **profile) as dst:
        dst.write((data * 1e-4).astype(np.float32))
        dst.descriptions = descriptions
    outs = []
    for scene, name in ((SCENE, "dn.tif"), (scaled, "refl.tif")):
        code, text = cli(
            "features", scene, "-o", tmp_path / name, "--pca", "3", "--cell-size", "10",
            "--method", "nearest", "-q",
        )  # fmt: skip
        assert code == 0, text
        with rasterio.open(tmp_path / name) as ds:
            assert ds.tags()["geoupsample_pca_scaling"] == "standardized"
            outs.append(ds.read())
    dn, refl = outs
    assert dn.std(axis=(1, 2)).min() > 0.1  # standardised units: components of a few tenths
    np.testing.assert_allclose(refl, dn, atol=1e-3 * float(dn.std()))


def test_features_timm_pca_and_band_mismatch(tmp_path: Path) -> None:
    out = tmp_path / "f.tif"
    code, text = cli(
        "features", SCENE, "-o", out, "--backbone", "timm:resnet18", "--random-init",
        "--layer", "2", "--pca", "3", *FAST,
    )  # fmt: skip
    assert code == 0, text
    with rasterio.open(out) as ds:
        assert ds.count == 3 and ds.dtypes[0] == "float32"
        assert ds.descriptions == ("pca_1", "pca_2", "pca_3")
        f = ds.read()
    assert np.isfinite(f).all() and f.std(axis=(1, 2)).min() > 0
    weights = tmp_path / "rgb.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(weights))
    code, text = cli(
        "features", SCENE, "-o", out, "--backbone", "timm:resnet18", "--weights", weights
    )
    assert code == 2 and "expect 3 input band" in text and "--model-bands" in text
    code, text = cli(
        "features", SCENE, "-o", tmp_path / "s.tif", "--cell-size", "10", "--bands", "red,nir",
        "--context", "0", *FAST,
    )  # fmt: skip
    assert code == 0, text
    with rasterio.open(tmp_path / "s.tif") as ds:
        assert ds.descriptions == (
            "red_mean",
            "nir_mean",
            "ndvi_mean",
            "red_std",
            "nir_std",
            "ndvi_std",
            "red_edge",
            "nir_edge",
            "ndvi_edge",
        )


def test_a_numeric_class_field_writes_its_codes(tmp_path: Path) -> None:
    """Classes 10, 2 and 7 in a numeric field: the class raster holds 2, 7 and 10 (not the
    indexes 0..2), coloured and tagged by value, and partitions the scene as the named run."""
    codes = {"bright_impervious": 10, "dark_impervious": 2, "vegetation": 7}
    collection = json.loads(Path(LABELS).read_text())
    for feature in collection["features"]:
        feature["properties"]["code"] = codes[feature["properties"]["class"]]
    numeric = tmp_path / "codes.geojson"
    numeric.write_text(json.dumps(collection))
    named, coded = tmp_path / "named.tif", tmp_path / "coded.tif"
    for labels, field, out in ((LABELS, "class", named), (numeric, "code", coded)):
        code, text = cli("segment", SCENE, "--labels", labels, "--class-field", field, "-o", out,
                         "--cell-size", "10", *FAST)
        assert code == 0, text
    with rasterio.open(named) as a, rasterio.open(coded) as b:
        by_index, by_code = a.read(1), b.read(1)
        assert json.loads(b.tags()["class_names"]) == ["2", "7", "10"]
        assert b.tags()["class_7"] == "7"
        assert b.colormap(1)[7] == class_colours(["2", "7", "10"])[1]  # keyed by value
        np.testing.assert_array_equal(a.read(2), b.read(2))  # the same confidences
    assert set(np.unique(by_code)) == {2, 7, 10}
    names = ["bright_impervious", "dark_impervious", "vegetation"]  # the named run's order
    np.testing.assert_array_equal(by_code, np.array([codes[n] for n in names])[by_index])


def test_a_saved_probe_segments_without_labels(tmp_path: Path) -> None:
    """--save-probe then --probe (no labels): the same classes, confidences and class names as
    the run that trained it; a probe for other features, both sources or neither are refused
    before anything is written."""
    trained, applied, probe = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "p.st"
    code, text = cli("segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o",
                     trained, "--save-probe", probe, "--cell-size", "10", *FAST)
    assert code == 0, text
    code, text = cli("segment", SCENE, "-o", applied, "--probe", probe, "--cell-size", "10",
                     *FAST)
    assert code == 0, text
    with rasterio.open(trained) as a, rasterio.open(applied) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert b.tags()["class_names"] == a.tags()["class_names"]
        assert b.tags()["probe"] == "p.st" and "labels" not in b.tags()
        import rioxarray

        from geoupsample.xarray import segment

        lazy = segment(rioxarray.open_rasterio(SCENE), probe=probe, method="bilinear", tile=160,
                       halo=32, cell_size=10)
        np.testing.assert_array_equal(lazy.values, a.read())  # xarray applies it alike
    bad = tmp_path / "bad.tif"
    for extra, message in (
        (["--probe", probe, "--cell-size", "10", "--context", "0"], "fitted on 36 features"),
        (["--probe", probe, "--labels", LABELS, "--class-field", "class"], "not both"),
        ([], "--labels FILE --class-field NAME), or a saved probe (--probe FILE"),
        (["--probe", tmp_path / "none.st"], "probe file not found"),
    ):
        code, text = cli("segment", SCENE, "-o", bad, *extra, *FAST)
        assert code == 2 and message in text, text
        assert not bad.exists()
