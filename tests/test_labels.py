"""Labelled polygons on the Rotterdam scene: reading, reprojection, soft labels, clear errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape

import geoupsample.labels as gl

DATA = resources.files("geoupsample") / "data"
LABELS = Path(str(DATA / "rotterdam_labels.geojson"))


@pytest.fixture(scope="module")
def scene() -> tuple:
    """``(transform, shape, crs)`` of the bundled Rotterdam image (300 x 300 at 1 m)."""
    with rasterio.open(str(DATA / "rotterdam_ms.tif")) as src:
        return src.transform, src.shape, src.crs


def write_geojson(path: Path, features: list[tuple], crs: str | None = None) -> Path:
    doc: dict = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": props, "geometry": mapping(g)}
            for g, props in features
        ],
    }
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def write_vector(path: Path, features: list[tuple], epsg: int, field: str = "class",
                 layer: str = "parcels") -> Path:
    """``(geometry, class)`` pairs written by GDAL (pyogrio) in the format of ``path``'s suffix
    (GeoPackage, Shapefile, FlatGeobuf); a GeoPackage gains ``layer`` beside any it has."""
    geoms = np.array([shapely.to_wkb(g) for g, _ in features], dtype=object)
    values = np.array([c for _, c in features], dtype=object)
    pyogrio.raw.write(path, geoms, [values], [field], layer=layer, crs=f"EPSG:{epsg}",
                      geometry_type="MultiPolygon", promote_to_multi=True)  # fmt: skip
    return path


def test_bundled_labels_read_and_rasterised(scene: tuple) -> None:
    transform, shp, crs = scene
    lab = gl.read_polygons(LABELS, "class")
    assert lab.classes == ("bright_impervious", "dark_impervious", "vegetation")
    assert len(lab) == 30 and lab.crs == CRS.from_epsg(4326)  # GeoJSON: lon/lat (RFC 7946)
    inside = gl.check_scene(lab, transform, shp, crs)
    assert inside.crs == crs and len(inside) == 30
    lr_t, lr_shape = gl.lr_grid(transform, shp, 10)
    assert lr_shape == (30, 30)
    frac = gl.rasterize_fractions(inside, lr_t, lr_shape, supersample=10)
    assert frac.shape == (3, 30, 30) and frac.dtype == np.float32
    assert frac.min() >= 0 and frac.sum(0).max() <= 1 + 1e-6
    # with one sample per HR pixel, the fractions are the block means of the HR class raster
    hr = gl.rasterize_classes(inside, transform, shp)
    for k in range(3):
        np.testing.assert_allclose(frac[k], (hr == k).reshape(30, 10, 30, 10).mean((1, 3)))
    assert 0.15 < (hr >= 0).mean() < 0.3  # a sparse annotation, all three classes present
    assert set(np.unique(hr)) == {-1, 0, 1, 2}
    chunked = gl.rasterize_fractions(inside, lr_t, lr_shape, supersample=10, max_pixels=500)
    np.testing.assert_array_equal(chunked, frac)


def test_any_crs_and_vector_format(tmp_path: Path, scene: tuple) -> None:
    transform, shp, crs = scene
    ref = gl.check_scene(gl.read_polygons(LABELS, "class"), transform, shp, crs)
    lr_t, lr_shape = gl.lr_grid(transform, shp, 15)
    expected = gl.rasterize_fractions(ref, lr_t, lr_shape, supersample=15)
    # the same polygons in UTM with a legacy 'crs' member, in Web Mercator in a GeoPackage and a
    # FlatGeobuf, and in UTM in a Shapefile
    utm = write_geojson(
        tmp_path / "utm.geojson",
        [
            (g, {"class": c, "id": i})
            for i, (g, c) in enumerate(zip(ref.geometries, ref.labels, strict=True))
        ],
        crs="urn:ogc:def:crs:EPSG::32631",
    )
    merc = [shape(transform_geom(crs, "EPSG:3857", mapping(g))) for g in ref.geometries]
    merc_features = list(zip(merc, ref.labels, strict=True))
    gpkg = write_vector(tmp_path / "labels.gpkg", merc_features, 3857)
    utm_features = list(zip(ref.geometries, ref.labels, strict=True))
    shapefile = write_vector(tmp_path / "labels.shp", utm_features, 32631)
    fgb = write_vector(tmp_path / "labels.fgb", merc_features, 3857)
    for path in (utm, gpkg, shapefile, fgb):
        lab = gl.read_polygons(path, "class")
        assert lab.classes == ref.classes
        got = gl.rasterize_fractions(lab, lr_t, lr_shape, crs=crs, supersample=15)
        assert np.abs(got - expected).max() < 0.05  # reprojection round trips move edges by mm


def test_overlaps_later_feature_wins_and_numeric_classes(tmp_path: Path, scene: tuple) -> None:
    transform, shp, crs = scene
    x0, y1 = transform.c, transform.f
    a = shapely.box(x0, y1 - 40, x0 + 40, y1)
    b = shapely.box(x0 + 20, y1 - 40, x0 + 60, y1)
    path = write_geojson(
        tmp_path / "o.geojson",
        [(a, {"k": 10}), (b, {"k": 2}), (a.buffer(-15), {"k": None})],
        crs="EPSG:32631",
    )
    with pytest.warns(UserWarning, match="1 feature.*without a class"):
        lab = gl.read_polygons(path, "k")
    assert lab.classes == ("2", "10")  # numeric order
    frac = gl.rasterize_fractions(lab, transform @ transform.scale(20), (15, 15), supersample=20)
    np.testing.assert_allclose(frac[:, 0, :3], [[0, 1, 1], [1, 0, 0]])


def test_empty_class_values_are_no_class(tmp_path: Path, scene: tuple) -> None:
    """A blank attribute (an unfinished label in QGIS) is skipped with the unlabelled features,
    not made a class named ''."""
    transform, _, _ = scene
    x0, y1 = transform.c, transform.f
    boxes = [shapely.box(x0 + 20 * i, y1 - 20, x0 + 20 * i + 20, y1) for i in range(4)]
    path = write_geojson(tmp_path / "e.geojson",
                         [(boxes[0], {"k": "road"}), (boxes[1], {"k": "roof"}),
                          (boxes[2], {"k": ""}), (boxes[3], {"k": "  "})], crs="EPSG:32631")
    with pytest.warns(UserWarning, match="2 feature.*without a class"):
        lab = gl.read_polygons(path, "k")
    assert lab.classes == ("road", "roof") and len(lab) == 2


def test_class_field_missing(tmp_path: Path) -> None:
    with pytest.raises(gl.LabelError, match=r"class field 'landuse' not found.*\['class'\]"):
        gl.read_polygons(LABELS, "landuse")
    box = shapely.box(593300, 5747400, 593400, 5747500)
    gpkg = write_vector(tmp_path / "l.gpkg", [(box, "a")], 32631, field="kind")
    with pytest.raises(gl.LabelError, match=r"class field 'class' not found.*\['kind'\]"):
        gl.read_polygons(gpkg, "class")


def test_polygons_outside_scene(tmp_path: Path, scene: tuple) -> None:
    transform, shp, crs = scene
    far = [
        (shapely.box(600000, 5700000, 600100, 5700100), {"class": "a"}),
        (shapely.box(600200, 5700000, 600300, 5700100), {"class": "b"}),
    ]
    path = write_geojson(tmp_path / "far.geojson", far, crs="EPSG:32631")
    with pytest.raises(gl.LabelError, match="none of the 2 polygons.*overlaps the scene"):
        gl.check_scene(gl.read_polygons(path, "class"), transform, shp, crs)
    # right numbers, wrong CRS: UTM coordinates in a file without a 'crs' member
    lonlat_claim = write_geojson(tmp_path / "nocrs.geojson", far)
    with pytest.raises(gl.LabelError, match="cannot reproject.*really in EPSG:4326"):
        gl.check_scene(gl.read_polygons(lonlat_claim, "class"), transform, shp, crs)


def test_fewer_than_two_classes(tmp_path: Path, scene: tuple) -> None:
    transform, shp, crs = scene
    x0, y1 = transform.c, transform.f
    inside = shapely.box(x0, y1 - 50, x0 + 50, y1)
    one = write_geojson(tmp_path / "one.geojson", [(inside, {"class": "roof"})], "EPSG:32631")
    with pytest.raises(gl.LabelError, match="only 1 class.*at least two classes"):
        gl.read_polygons(one, "class")
    outside = shapely.box(600000, 5700000, 600100, 5700100)
    two = write_geojson(
        tmp_path / "two.geojson",
        [(inside, {"class": "roof"}), (outside, {"class": "tree"})],
        "EPSG:32631",
    )
    with pytest.raises(gl.LabelError, match=r"overlap the scene carry only 1 class \(\['roof'\]\)"):
        gl.check_scene(gl.read_polygons(two, "class"), transform, shp, crs)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(gl.LabelError, match="not found"):
        gl.read_polygons(tmp_path / "missing.geojson", "class")
    shp_file = tmp_path / "x.shp"
    shp_file.write_bytes(b"\0")
    with pytest.raises(gl.LabelError, match="cannot read .*x.shp as a vector file"):
        gl.read_polygons(shp_file, "class")
    bare = tmp_path / "bare.geojson"
    bare.write_text(json.dumps(mapping(shapely.box(0, 0, 1, 1))))
    with pytest.raises(gl.LabelError, match="class field 'class' not found.*fields are none"):
        gl.read_polygons(bare, "class")
    not_gpkg = tmp_path / "x.gpkg"
    not_gpkg.write_text("hello")
    with pytest.raises(gl.LabelError, match="cannot read .*x.gpkg as a vector file"):
        gl.read_polygons(not_gpkg, "class")
    with pytest.raises(gl.LabelError, match=r"classes \['vegetation'\] are not in the given"):
        gl.read_polygons(LABELS, "class", classes=["bright_impervious", "dark_impervious"])


def test_geopackage_layers(tmp_path: Path, scene: tuple) -> None:
    transform, shp, crs = scene
    x0, y1 = transform.c, transform.f
    a, b = shapely.box(x0, y1 - 40, x0 + 40, y1), shapely.box(x0 + 50, y1 - 40, x0 + 90, y1)
    path = write_vector(tmp_path / "two.gpkg", [(a, "roof"), (b, "tree")], 32631, layer="first")
    write_vector(path, [(a, "water"), (b, "field")], 32631, layer="second")
    with pytest.raises(gl.LabelError, match=r"two.gpkg has layers \['first', 'second'\]"):
        gl.read_polygons(path, "class")
    assert gl.read_polygons(path, "class", layer="second").classes == ("field", "water")
    with pytest.raises(gl.LabelError, match="has no layer 'third'"):
        gl.read_polygons(path, "class", layer="third")


def test_geodataframe_labels(scene: tuple) -> None:
    """A geopandas GeoDataFrame (here in Web Mercator) gives the polygons the file gives."""
    import geopandas

    transform, shp, crs = scene
    lr_t, lr_shape = gl.lr_grid(transform, shp, 15)
    ref = gl.check_scene(gl.read_polygons(LABELS, "class"), transform, shp, crs)
    expected = gl.rasterize_fractions(ref, lr_t, lr_shape, supersample=15)
    frame = geopandas.read_file(LABELS).to_crs("EPSG:3857")
    assert gl.is_frame(frame) and not gl.is_frame(str(LABELS))
    lab = gl.from_frame(frame, "class")
    assert lab.classes == ref.classes and lab.crs == CRS.from_epsg(3857)
    got = gl.rasterize_fractions(lab, lr_t, lr_shape, crs=crs, supersample=15)
    assert np.abs(got - expected).max() < 0.05
    with pytest.raises(gl.LabelError, match=r"class field 'landuse' not found.*\['class'\]"):
        gl.from_frame(frame, "landuse")
