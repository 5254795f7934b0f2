"""Tiling options, dtypes, Zarr output and xarray versions of ``features`` and ``segment`` on the
bundled Rotterdam scene (real GeoTIFFs; timm models with random weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray
import timm
import xarray as xr
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from safetensors.torch import save_file
from shapely.geometry import box, mapping
from typer.testing import CliRunner

import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.featuremaps import features_raster
from geoupsample.pipeline import InputError
from geoupsample.segmentation import segment_raster
from geoupsample.xarray import features, segment
from tests._tiling_helpers import kill_9_after_bands
from tiling import JournalMismatch

DATA = resources.files("geoupsample") / "data"
SCENE = str(DATA / "rotterdam_ms.tif")
LABELS = str(DATA / "rotterdam_labels.geojson")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDS = ("red", "green", "blue", "nir")
SMALL = dict(tile=64, halo=16, blocksize=32)  # 5 x 5 tiles, 10 x 10 write cells
SMALL_CLI = ["--tile", "64", "--halo", "16", "--blocksize", "32", "-q"]


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def read(path: str | Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def grid() -> tuple[rasterio.crs.CRS, rasterio.Affine, tuple[int, int]]:
    with rasterio.open(SCENE) as ds:
        return ds.crs, ds.transform, ds.shape


@pytest.fixture(scope="module")
def spectral() -> gb.Backbone:
    return gb.create("spectral", band_names=BANDS, cell_size=10)


@pytest.fixture(scope="module")
def resnet() -> gb.Backbone:
    """A real timm model with random weights (layer 2: stride 8, 128 channels)."""
    return gb.create(
        "timm:resnet18", band_names=BANDS, bands=["red", "green", "blue"], random_init=True, layer=2
    )


def test_aoi_skips_tiles_and_writes_nodata_outside(tmp_path, grid, spectral) -> None:
    crs, transform, shape = grid
    x0, y1 = transform.c, transform.f
    aoi = box(x0 + 10, y1 - 100, x0 + 120, y1 - 5)  # scene CRS: near the top-left corner
    inside = geometry_mask([mapping(aoi)], out_shape=shape, transform=transform, invert=True)
    full = features_raster(SCENE, tmp_path / "full.tif", spectral, method="bilinear", **SMALL)
    rep = features_raster(
        SCENE, tmp_path / "aoi.tif", spectral, method="bilinear", aoi=aoi, **SMALL
    )
    assert full.skipped == 0 and rep.skipped > rep.tiles // 2 and rep.computed < rep.tiles
    f, a = read(tmp_path / "full.tif"), read(tmp_path / "aoi.tif")
    assert np.isnan(a[:, ~inside]).all()
    np.testing.assert_array_equal(a[:, inside], f[:, inside])  # same tiles, same blend

    # the CLI: a GeoJSON AOI in lon/lat (RFC 7946) for segment
    aoi_file = tmp_path / "aoi.geojson"
    aoi_file.write_text(json.dumps(transform_geom(crs, "EPSG:4326", mapping(aoi))))
    code, text = cli(
        "segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o", tmp_path / "s.tif",
        "--cell-size", "10", "--method", "bilinear", "--aoi", aoi_file, *SMALL_CLI,
    )  # fmt: skip
    assert code == 0, text
    cls = read(tmp_path / "s.tif")[0]
    assert (cls[~inside] == 255).all() and (cls[inside] < 3).all()
    assert sorted(os.listdir(tmp_path)) == ["aoi.geojson", "aoi.tif", "full.tif", "s.tif"]


def test_features_kill_9_then_resume_is_pixel_identical(tmp_path) -> None:
    weights, other = tmp_path / "w.safetensors", tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(weights))
    save_file(timm.create_model("resnet18").state_dict(), str(other))
    out = str(tmp_path / "f.tif")
    args = [
        SCENE, "-o", out, "--backbone", "timm:resnet18", "--weights", weights, "--layer", "2",
        "--model-bands", "red,green,blue", "--pca", "3", "--iters", "3", *SMALL_CLI,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoupsample", "features", *map(str, args), "--resume"], env=env
    )
    kill_9_after_bands(proc, out, bands=1, timeout=120)
    assert not os.path.exists(out), "a killed run must leave nothing at OUT"

    # other weights under the same file name: the journal holds their digest and refuses them
    kept = weights.read_bytes()
    shutil.copyfile(other, weights)
    code, text = cli("features", *args, "--resume")
    assert code == 2 and "other inputs or parameters" in text and "params.backbone_digest" in text
    weights.write_bytes(kept)

    code, text = cli("features", *args, "--resume")
    assert code == 0, text
    ref = str(tmp_path / "ref.tif")
    code, text = cli("features", *[ref if a == out else a for a in args])
    assert code == 0, text
    np.testing.assert_array_equal(read(out), read(ref))
    assert sorted(os.listdir(tmp_path)) == [
        "f.tif",
        "other.safetensors",
        "ref.tif",
        "w.safetensors",
    ]


def interrupt_after(out: str, bands: int):
    """A progress callback raising KeyboardInterrupt once the journal of ``out`` records
    ``bands`` finished row bands (the run keeps its partial output for a resume)."""
    from tiling.journal import journal_path

    def progress(_p) -> None:
        jpath = journal_path(out)
        if os.path.exists(jpath) and len(Path(jpath).read_text().splitlines()) > bands:
            raise KeyboardInterrupt

    return progress


def test_segment_resume_refuses_another_probe(tmp_path, spectral) -> None:
    out = str(tmp_path / "s.tif")
    run = dict(method="bilinear", **SMALL)
    probs = os.path.join(tmp_path, ".s.tif.probs.tif")  # the hidden probabilities
    with pytest.raises(KeyboardInterrupt):
        segment_raster(
            SCENE, LABELS, "class", out, spectral, progress=interrupt_after(probs, 2), **run
        )
    assert not os.path.exists(out)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".partial.tif")]
    with pytest.raises(JournalMismatch, match="other inputs or parameters.*params"):
        segment_raster(SCENE, LABELS, "class", out, spectral, weight_decay=0.037, resume=True,
                       **run)  # not a cross-validation candidate: another probe
    rep = segment_raster(SCENE, LABELS, "class", out, spectral, resume=True, **run)
    assert rep.run.resumed_bands == 2 and rep.run.computed < rep.run.tiles
    ref = segment_raster(SCENE, LABELS, "class", tmp_path / "ref.tif", spectral, **run)
    np.testing.assert_array_equal(read(out), read(ref.path))
    assert sorted(os.listdir(tmp_path)) == ["ref.tif", "s.tif"]


def test_features_float16_is_close_to_float32_and_can_be_a_cog(tmp_path) -> None:
    common = ["--cell-size", "10", "--method", "gsjbu", "--iters", "3", *SMALL_CLI]
    f32, f16 = tmp_path / "f32.tif", tmp_path / "f16.tif"
    code, text = cli("features", SCENE, "-o", f32, *common)
    assert code == 0, text
    code, text = cli("features", SCENE, "-o", f16, "--dtype", "float16", "--cog", *common)
    assert code == 0, text
    with rasterio.open(f16) as ds:
        assert ds.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16"  # IEEE half floats
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.overviews(1) and ds.descriptions[0] == "red_mean"
        h = ds.read()
    w = read(f32)
    np.testing.assert_array_equal(h, w.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(h, w, rtol=1e-3, atol=1e-4)


def test_zarr_output_is_georeferenced_resumable_and_equals_geotiff(tmp_path, grid, resnet) -> None:
    crs, transform, shape = grid
    run = dict(method="bilinear", **SMALL)
    tif, store = tmp_path / "f.tif", str(tmp_path / "f.zarr")
    features_raster(SCENE, tif, resnet, **run)
    with pytest.raises(KeyboardInterrupt):
        features_raster(SCENE, store, resnet, progress=interrupt_after(store, 2), **run)
    assert not os.path.exists(store) and os.path.isdir(tmp_path / ".f.zarr.partial")
    rep = features_raster(SCENE, store, resnet, resume=True, **run)
    assert rep.resumed_bands == 2 and rep.computed < rep.tiles
    assert sorted(os.listdir(tmp_path)) == ["f.tif", "f.zarr"]

    ds = xr.open_zarr(store)
    f = ds["features"]
    assert f.shape == (128, *shape) and f.dtype == np.float32 and f.dims == ("band", "y", "x")
    assert f.encoding["chunks"] == (128, 32, 32)  # aligned to the write cells
    assert f.rio.crs == crs and f.rio.transform().almost_equals(transform)
    assert list(f.attrs["long_name"][:2]) == ["feature_0", "feature_1"]
    np.testing.assert_array_equal(f.values, read(tif))
    with rasterio.open(f'ZARR:"{store}":/features') as gd:  # GDAL reads it too
        assert gd.crs == crs and gd.transform.almost_equals(transform)


def test_xarray_versions_equal_the_files(tmp_path, resnet, spectral) -> None:
    scene = rioxarray.open_rasterio(SCENE, chunks={"x": 128, "y": 128})
    run = dict(method="gsjbu", iters=3, **SMALL)
    features_raster(SCENE, tmp_path / "f.tif", resnet, pca=3, **run)
    lazy = features(scene, resnet, pca=3, **run)
    assert lazy.chunks is not None and lazy.rio.crs == scene.rio.crs
    assert lazy.attrs["long_name"] == ("pca_1", "pca_2", "pca_3")
    np.testing.assert_array_equal(lazy.values, read(tmp_path / "f.tif"))

    seg = dict(method="bilinear", **SMALL)
    segment_raster(
        SCENE, LABELS, "class", tmp_path / "s.tif", spectral, probs_path=tmp_path / "p.tif",
        probs_dtype="float32", **seg,
    )  # fmt: skip
    classes = segment(scene, LABELS, "class", "spectral", cell_size=10, **seg)
    assert classes.dtype == np.uint8 and classes.rio.nodata == 255
    assert classes.rio.transform().almost_equals(scene.rio.transform())
    names = json.loads(classes.attrs["class_names"])
    assert names == ["bright_impervious", "dark_impervious", "vegetation"]
    # (float32 probabilities: the class raster is the one a run without --probs writes)
    np.testing.assert_array_equal(classes.values, read(tmp_path / "s.tif"))
    south_up = segment(scene.sortby("y"), LABELS, "class", "spectral", cell_size=10, **seg)
    np.testing.assert_array_equal(south_up.y.values, classes.y.values)  # returned north-up
    np.testing.assert_array_equal(south_up.values, classes.values)
    probs = segment(scene, LABELS, "class", spectral, probabilities=True, **seg)
    assert probs.attrs["long_name"] == tuple(names)
    np.testing.assert_array_equal(probs.values, read(tmp_path / "p.tif"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["features", "-o", "{d}/x.tif", "--dtype", "int8"], "'int8' is not one of"),
        (["features", "-o", "{d}/x.zarr", "--cog"], "--cog (cog=True) applies to GeoTIFF"),
        (["features", "-o", "{d}/x.zarr", "--compress", "lzw"], "lzw is not available for Zarr"),
        (["features", "-o", "{d}/x.tif", "--aoi", "{d}/far.geojson"], "does not overlap"),
        (
            ["segment", "--labels", LABELS, "--class-field", "class", "-o", "{d}/x.zarr"],
            "segment writes GeoTIFFs",
        ),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, args: list[str], message: str) -> None:
    (tmp_path / "far.geojson").write_text(json.dumps(mapping(box(5.0, 50.0, 5.01, 50.01))))
    argv = [a.format(d=tmp_path) for a in args]
    code, text = cli(argv[0], SCENE, *argv[1:], "-q")
    assert code == 2 and message in text, text
    assert sorted(os.listdir(tmp_path)) == ["far.geojson"]


def test_python_dtype_is_checked(tmp_path, spectral) -> None:
    with pytest.raises(InputError, match="float32 or float16"):
        features_raster(SCENE, tmp_path / "x.tif", spectral, dtype="int8")
    assert not os.listdir(tmp_path)


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path) -> None:
    import shutil

    scene = tmp_path / "scene.tif"
    shutil.copy(SCENE, scene)
    (tmp_path / "link.tif").symlink_to(scene)
    before = scene.read_bytes()
    seg = ["segment", scene, "--labels", LABELS, "--class-field", "class", "-q"]
    cases = [
        (["-o", tmp_path / "c.tif", "--probs", scene], "--probs", "would overwrite the scene"),
        (["-o", tmp_path / "c.tif", "--save-probe", scene], "--save-probe", "the scene"),
        (["-o", tmp_path / "c.tif", "--probs", tmp_path / "c.tif"], "--probs", "the -o output"),
        (["-o", tmp_path / "link.tif"], "-o", "would overwrite the scene"),  # via a symlink
        (["-o", tmp_path / "c.tif", "--save-probe", tmp_path / "no" / "p.st"], "--save-probe",
         "does not exist"),
        (["-o", tmp_path / "c.png"], "-o", "outputs are GeoTIFFs"),  # not a PNG in disguise
        (["-o", tmp_path / "c.tif", "--probs", tmp_path / "p.jpg"], "--probs", "not .jpg"),
    ]  # fmt: skip
    for extra, option, message in cases:
        code, text = cli(*seg, *extra)
        assert code == 2 and option in text and message in text, text
    assert scene.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["link.tif", "scene.tif"]
    code, text = cli("features", tmp_path / "link.tif", "-o", scene, "-q")
    assert code == 2 and "would overwrite the scene" in text, text


def test_band_names_name_a_scene_without_descriptions(tmp_path) -> None:
    """The bundled scene with its band descriptions removed: spectral finds no red or nir band
    (no NDVI); --band-names names them, and --bands may use those names."""
    bare = tmp_path / "bare.tif"
    shutil.copy(SCENE, bare)
    with rasterio.open(bare, "r+") as ds:
        for i in range(1, ds.count + 1):
            ds.set_band_description(i, "")
    code, text = cli("features", bare, "-o", tmp_path / "a.tif", "--cell-size", "10",
                     "--context", "0", *SMALL_CLI)
    assert code == 0, text
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert not any("ndvi" in d for d in ds.descriptions)
    named = ["--band-names", "red,green,blue,nir", "--cell-size", "10", "--context", "0"]
    code, text = cli("features", bare, "-o", tmp_path / "b.tif", *named, *SMALL_CLI)
    assert code == 0, text
    code, text = cli("features", SCENE, "-o", tmp_path / "c.tif", "--cell-size", "10",
                     "--context", "0", *SMALL_CLI)
    assert code == 0, text
    with rasterio.open(tmp_path / "b.tif") as b, rasterio.open(tmp_path / "c.tif") as c:
        assert "ndvi_mean" in b.descriptions and b.descriptions == c.descriptions
        np.testing.assert_array_equal(b.read(), c.read())  # as if the file had named them
    code, text = cli("features", bare, "-o", tmp_path / "d.tif", *named, "--bands", "nir,red",
                     *SMALL_CLI)
    assert code == 0, text
    with rasterio.open(tmp_path / "d.tif") as ds:
        assert ds.descriptions[:2] == ("nir_mean", "red_mean")
    code, text = cli("segment", bare, "--labels", LABELS, "--class-field", "class", "-o",
                     tmp_path / "e.tif", "--band-names", "red,green,blue", *SMALL_CLI)
    assert code == 2 and "gives 3 name(s) but the scene" in text and "4 band(s)" in text
    assert not (tmp_path / "e.tif").exists()
