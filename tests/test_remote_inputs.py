"""Rasters, label polygons and AOIs read from URLs and GDAL virtual paths: a real HTTP server on
localhost (with byte ranges, as object stores serve cloud-optimised GeoTIFFs) and a zip archive,
on the bundled Rotterdam pair (SpaceNet 6 via solaris)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping
from typer.testing import CliRunner

import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.inputs import InputError
from geoupsample.labels import LabelError
from geoupsample.pipeline import upsample_raster
from geoupsample.segmentation import segment_raster
from tests._tiling_helpers import read_tif
from tiling import RasterInput
from tiling.reader import is_local_path

DATA = files("geoupsample") / "data"
NAMES = ("rotterdam_ms.tif", "rotterdam_pan.tif", "rotterdam_labels.geojson")
SMALL = dict(tile=128, halo=16, blocksize=64)
RANGE_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_range_server.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a local HTTP server (another process: GDAL may hold this one's GIL while it
    fetches) holding the sample rasters and labels, and the served folder."""
    root = tmp_path_factory.mktemp("served")
    for name in NAMES:
        shutil.copy(str(DATA / name), root / name)
    (root / "aoi.geojson").write_text(json.dumps(_aoi_lonlat()))
    proc = subprocess.Popen([sys.executable, RANGE_SERVER, str(root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.kill()
        proc.wait()


def _aoi_lonlat() -> dict:
    """A GeoJSON polygon (lon/lat) over the upper left part of the bundled scene."""
    with rasterio.open(str(DATA / NAMES[0])) as ds:
        x0, y0, x1, y1 = ds.bounds
        crs = ds.crs
    return transform_geom(crs, "EPSG:4326", mapping(box(x0 + 20, y0 + 120, x0 + 170, y1 - 20)))


def test_upsample_from_urls_equals_local_files(server, tmp_path):
    url, root = server
    kw = dict(method="jbu", **SMALL)
    upsample_raster(f"{url}/rotterdam_ms.tif", f"{url}/rotterdam_pan.tif", tmp_path / "r.tif",
                    **kw)
    upsample_raster(root / "rotterdam_ms.tif", root / "rotterdam_pan.tif", tmp_path / "l.tif",
                    **kw)
    np.testing.assert_array_equal(read_tif(tmp_path / "r.tif"), read_tif(tmp_path / "l.tif"))
    with rasterio.open(tmp_path / "r.tif") as ds:
        assert ds.tags()["geoupsample_lowres"] == "rotterdam_ms.tif"


def test_cli_takes_urls(server, tmp_path):
    url, _ = server
    out = str(tmp_path / "o.tif")
    res = CliRunner().invoke(app, ["upsample", f"{url}/rotterdam_ms.tif",
                                   f"{url}/rotterdam_pan.tif", "-o", out, "-m", "bilinear",
                                   "-q"])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as ds:
        assert ds.shape == (600, 600) and np.isfinite(ds.read()).all()


def test_segment_a_scene_from_a_url(server, tmp_path):
    url, root = server
    spectral = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    kw = dict(backbone=spectral, method="bilinear", **SMALL)
    remote = segment_raster(f"{url}/rotterdam_ms.tif", root / "rotterdam_labels.geojson",
                            "class", tmp_path / "r.tif", **kw)
    local = segment_raster(root / "rotterdam_ms.tif", root / "rotterdam_labels.geojson",
                           "class", tmp_path / "l.tif", **kw)
    np.testing.assert_array_equal(read_tif(remote.path), read_tif(local.path))


def test_missing_url_is_a_clear_error(server, tmp_path):
    url, _ = server
    with pytest.raises(InputError, match="cannot open the low-res raster .*check the address"):
        upsample_raster(f"{url}/nope.tif", f"{url}/rotterdam_pan.tif", tmp_path / "o.tif")
    assert os.listdir(tmp_path) == []


def test_gdal_virtual_path_inside_a_zip(tmp_path):
    archive = tmp_path / "scene.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in NAMES[:2]:
            z.write(str(DATA / name), name)
    out = tmp_path / "o.tif"
    upsample_raster(f"/vsizip/{archive}/rotterdam_ms.tif", f"zip://{archive}!rotterdam_pan.tif",
                    out, method="bilinear", **SMALL)
    upsample_raster(str(DATA / NAMES[0]), str(DATA / NAMES[1]), tmp_path / "ref.tif",
                    method="bilinear", **SMALL)
    np.testing.assert_array_equal(read_tif(out), read_tif(tmp_path / "ref.tif"))


def test_remote_inputs_are_identified_by_name():
    assert not is_local_path("https://example.com/a.tif")
    assert not is_local_path("s3://bucket/a.tif") and not is_local_path("/vsicurl/http://x")
    assert is_local_path("/data/a.tif") and is_local_path("relative/a.tif")
    ident = RasterInput("s3://bucket/a.tif", (1, 2)).identity()  # no stat of a remote file
    assert ident["path"] == "s3://bucket/a.tif" and "size" not in ident


def test_labels_and_aoi_from_urls_equal_local_files(server, tmp_path):
    url, root = server
    spectral = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    kw = dict(backbone=spectral, method="bilinear", **SMALL)
    remote = segment_raster(f"{url}/rotterdam_ms.tif", f"{url}/rotterdam_labels.geojson",
                            "class", tmp_path / "r.tif", aoi=f"{url}/aoi.geojson", **kw)
    local = segment_raster(root / "rotterdam_ms.tif", root / "rotterdam_labels.geojson",
                           "class", tmp_path / "l.tif", aoi=root / "aoi.geojson", **kw)
    r = read_tif(remote.path)
    np.testing.assert_array_equal(r, read_tif(local.path))
    assert 0.2 < (r[0] < 255).mean() < 0.35  # classes only in the AOI (150 x 160 of 300 x 300 m)


def test_cli_segment_with_label_and_aoi_urls(server, tmp_path):
    url, _ = server
    out = str(tmp_path / "s.tif")
    res = CliRunner().invoke(app, [
        "segment", f"{url}/rotterdam_ms.tif", "--labels", f"{url}/rotterdam_labels.geojson",
        "--class-field", "class", "-o", out, "--cell-size", "10", "--method", "bilinear",
        "--aoi", f"{url}/aoi.geojson", "--tile", "128", "--halo", "16", "-q",
    ])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as ds:
        cls = ds.read(1)
    assert 0.2 < (cls < 255).mean() < 0.35  # classes inside the AOI, nodata outside


def test_missing_label_or_aoi_url_is_a_clear_error(server, tmp_path):
    url, root = server
    spectral = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    with pytest.raises(LabelError, match="cannot read .*nope.geojson.*check the address"):
        segment_raster(root / "rotterdam_ms.tif", f"{url}/nope.geojson", "class",
                       tmp_path / "o.tif", backbone=spectral, **SMALL)
    with pytest.raises(ValueError, match="cannot read the AOI file .*nope.geojson.*check the "):
        upsample_raster(root / "rotterdam_ms.tif", root / "rotterdam_pan.tif", tmp_path / "o.tif",
                        method="bilinear", aoi=f"{url}/nope.geojson", **SMALL)
    assert os.listdir(tmp_path) == []


def test_labels_inside_a_zip(tmp_path):
    archive = tmp_path / "labels.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(str(DATA / NAMES[2]), NAMES[2])
    spectral = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    kw = dict(backbone=spectral, method="bilinear", **SMALL)
    zipped = segment_raster(str(DATA / NAMES[0]), f"/vsizip/{archive}/{NAMES[2]}", "class",
                            tmp_path / "z.tif", **kw)
    plain = segment_raster(str(DATA / NAMES[0]), str(DATA / NAMES[2]), "class",
                           tmp_path / "p.tif", **kw)
    np.testing.assert_array_equal(read_tif(zipped.path), read_tif(plain.path))
