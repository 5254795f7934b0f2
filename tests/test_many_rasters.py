"""Several low-res rasters onto one guide in one pass: one fit per tile, every raster rendered
with the same kernels (the pixels of one run per raster); the engine's several outputs."""

from __future__ import annotations

import json
import os
import sys
from importlib.resources import files

import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.windows import Window
from typer.testing import CliRunner

import tiling
from geoupsample.cli import app
from geoupsample.inputs import InputError
from geoupsample.pipeline import upsample_raster
from geoupsample.xarray import upsample as xr_upsample
from tests.test_features_segment_options import interrupt_after
from tests.test_upsample_raster import _crop

DATA = files("geoupsample") / "data"
LR = str(DATA / "rotterdam_ms.tif")
HR = str(DATA / "rotterdam_pan.tif")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(tile=64, halo=16, blocksize=16, iters=10)


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """A 120 x 120 crop of the 0.5 m pan guide and, on its 1 m grid, three low-res rasters: the
    red band (float32), the NIR band as uint16 with nodata, and a two-class probability
    raster (uint8 x 254) from the NDVI."""
    d = tmp_path_factory.mktemp("many")
    hr = _crop(HR, d / "guide.tif", Window(200, 200, 120, 120))
    ms = _crop(LR, d / "ms.tif", Window(100, 100, 60, 60))
    with rasterio.open(ms) as ds:
        prof, data = ds.profile, ds.read()
    red = d / "B04_red.tif"
    with rasterio.open(red, "w", **{**prof, "count": 1, "dtype": "float32"}) as out:
        out.write(data[:1].astype(np.float32))
        out.set_band_description(1, "red")
    nir = d / "B08_nir.tif"
    with rasterio.open(nir, "w", **{**prof, "count": 1, "dtype": "uint16", "nodata": 0}) as out:
        band = np.clip(data[3], 1, 60000).astype(np.uint16)
        band[:4, :4] = 0
        out.write(band[None])
    ndvi = (data[3] - data[0]) / np.maximum(data[3] + data[0], 1e-6)
    veg = np.clip((ndvi + 1) / 2, 0, 1)
    probs = np.rint(np.stack([1 - veg, veg]) * 254).astype(np.uint8)
    probs[1] = 254 - probs[0]
    cls = d / "classes_probs.tif"
    with rasterio.open(cls, "w", **{**prof, "count": 2, "dtype": "uint8", "nodata": 255}) as out:
        out.write(probs)
        out.update_tags(probability_scale=str(1 / 254))
    return hr, [str(red), str(nir), str(cls)]


def test_one_pass_equals_one_run_per_raster(rasters, tmp_path):
    hr, lows = rasters
    rep = upsample_raster(lows, hr, str(tmp_path / "{stem}_hr.tif"), method="gsjbu", **RUN)
    names = ["B04_red_hr.tif", "B08_nir_hr.tif", "classes_probs_hr.tif"]
    assert rep.extra["paths"] == [str(tmp_path / n) for n in names]
    for low, name in zip(lows, names, strict=True):
        alone = tmp_path / f"alone_{name}"
        upsample_raster(low, hr, alone, method="gsjbu", **RUN)
        np.testing.assert_array_equal(read(tmp_path / name), read(alone))
        with rasterio.open(tmp_path / name) as a, rasterio.open(alone) as b:
            assert (a.dtypes, str(a.nodata), a.descriptions) == (
                b.dtypes, str(b.nodata), b.descriptions)
            tags_a = {k: v for k, v in a.tags().items() if k != "tiling_run_key"}
            tags_b = {k: v for k, v in b.tags().items() if k != "tiling_run_key"}
            assert tags_a == tags_b
    with rasterio.open(tmp_path / names[2]) as ds:  # the probabilities kept their unit
        assert ds.tags()["geoupsample_probability_unit"] == "254"


def test_a_plain_output_path_stacks_every_rasters_bands(rasters, tmp_path):
    hr, lows = rasters
    upsample_raster(lows, hr, str(tmp_path / "{index}.tif"), method="jbu", dtype="float32",
                    **RUN)  # fmt: skip
    stacked = tmp_path / "stack.tif"
    upsample_raster(lows, hr, stacked, method="jbu", **RUN)
    with rasterio.open(stacked) as ds:
        assert ds.count == 4 and ds.dtypes[0] == "float32"  # dtypes differ: float32
        assert ds.descriptions == ("B04_red:red", "B08_nir", "classes_probs:band1",
                                   "classes_probs:band2")  # fmt: skip
        assert json.loads(ds.tags()["geoupsample_lowres"]) == [os.path.basename(p) for p in lows]
        got = ds.read()
    parts = []
    for i in (1, 2, 3):  # each in float32, its nodata as NaN
        with rasterio.open(tmp_path / f"{i}.tif") as ds:
            parts.append(ds.read(masked=True).astype(np.float32).filled(np.nan))
    np.testing.assert_array_equal(got, np.concatenate(parts))


def test_cli_takes_globs_and_names_each_output(rasters, tmp_path):
    hr, lows = rasters
    folder = os.path.dirname(lows[0])
    code, text = cli("upsample", os.path.join(folder, "B0*.tif"), hr, "-o",
                     tmp_path / "{stem}_10m.tif", "--method", "bilinear", "--tile", "64")
    assert code == 0, text
    assert sorted(os.listdir(tmp_path)) == ["B04_red_10m.tif", "B08_nir_10m.tif"]
    assert "2 outputs" in text
    code, text = cli("upsample", os.path.join(folder, "nothing*.tif"), hr, "-o",
                     tmp_path / "x.tif")
    assert code == 2 and "matches no file" in text


def test_rasters_on_different_grids_are_each_named(rasters, tmp_path):
    hr, lows = rasters
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(lows[0]) as ds:
        prof, data = ds.profile, ds.read()
    t = prof["transform"]
    prof["transform"] = Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f)  # 2 m cells: another grid
    with rasterio.open(shifted, "w", **{**prof, "width": 30, "height": 30}) as out:
        out.write(data[:, ::2, ::2])
    outs = tmp_path / "out"
    outs.mkdir()
    with pytest.raises(InputError, match="different grids.*B04_red.tif.*shifted.tif"):
        upsample_raster([lows[0], str(shifted)], hr, str(outs / "{stem}.tif"))
    with pytest.raises(InputError, match="given twice"):
        upsample_raster([lows[0], lows[0]], hr, str(outs / "{stem}.tif"))
    with pytest.raises(InputError, match=r"-o \(output 1 of 3\) .*B04_red.tif would overwrite"):
        upsample_raster(lows, hr, os.path.join(os.path.dirname(lows[0]), "{stem}.tif"))
    assert not os.listdir(outs)


def test_several_outputs_resume_and_aoi(rasters, tmp_path):
    from shapely.geometry import box

    hr, lows = rasters
    pattern = str(tmp_path / "{stem}.tif")
    first = str(tmp_path / "B04_red.tif")
    run = dict(method="gsjbu", **{**RUN, "tile": 32})
    with pytest.raises(KeyboardInterrupt):
        upsample_raster(lows, hr, pattern, progress=interrupt_after(first, 2), **run)
    assert not [n for n in os.listdir(tmp_path) if not n.startswith(".")]
    rep = upsample_raster(lows, hr, pattern, resume=True, **run)
    assert rep.resumed_bands == 2 and rep.computed < rep.tiles
    ref = tmp_path / "ref"
    ref.mkdir()
    upsample_raster(lows, hr, str(ref / "{stem}.tif"), **run)
    for name in ("B04_red.tif", "B08_nir.tif", "classes_probs.tif"):
        np.testing.assert_array_equal(read(tmp_path / name), read(ref / name))
    assert sorted(os.listdir(tmp_path)) == ["B04_red.tif", "B08_nir.tif", "classes_probs.tif",
                                            "ref"]  # fmt: skip
    with rasterio.open(hr) as ds:
        b = ds.bounds
    aoi = box(b.left, b.bottom, (b.left + b.right) / 2, b.top)
    out = tmp_path / "aoi"
    out.mkdir()
    upsample_raster(lows, hr, str(out / "{stem}.tif"), aoi=aoi, method="bilinear", tile=64)
    red = read(out / "B04_red.tif")[0]
    assert np.isnan(red[:, 70:]).all() and np.isfinite(red[:, :50]).all()
    assert (read(out / "classes_probs.tif")[:, :, 70:] == 255).all()


def test_several_outputs_on_a_dask_cluster_equal_local(rasters, tmp_path):
    from distributed import Client, LocalCluster

    hr, lows = rasters
    run = dict(method="bilinear", tile=64)
    upsample_raster(lows, hr, str(tmp_path / "local_{stem}.tif"), **run)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, ROOT)
        upsample_raster(lows, hr, str(tmp_path / "dist_{stem}.tif"), scheduler=client, **run)
    for stem in ("B04_red", "B08_nir", "classes_probs"):
        np.testing.assert_array_equal(read(tmp_path / f"dist_{stem}.tif"),
                                      read(tmp_path / f"local_{stem}.tif"))


def test_xarray_stack_along_time_is_one_pass_equal_to_each_date(rasters):
    hr, lows = rasters
    guide = rioxarray.open_rasterio(hr)
    red = rioxarray.open_rasterio(lows[0])
    dates = xr.concat([red, red * 1.1, red * 0.9], dim="time")
    dates = dates.assign_coords(time=np.array(["2020-06-01", "2021-06-01", "2022-06-01"],
                                              dtype="datetime64[ns]"))  # fmt: skip
    out = xr_upsample(dates, guide, method="gsjbu", tile=64, halo=16, iters=10)
    assert out.dims == ("time", "band", "y", "x") and out.shape[:2] == (3, 1)
    np.testing.assert_array_equal(out["time"].values, dates["time"].values)
    got = out.values
    for t in range(3):
        one = xr_upsample(dates.isel(time=t), guide, method="gsjbu", tile=64, halo=16, iters=10)
        np.testing.assert_array_equal(got[t], one.values)


def test_output_set_refuses_different_grids(tmp_path):
    a = tiling.OutputSpec(str(tmp_path / "a.tif"), crs="EPSG:32631",
                          transform=Affine(1, 0, 0, 0, -1, 0), width=32, height=32, count=1)
    b = tiling.OutputSpec(str(tmp_path / "b.tif"), crs="EPSG:32631",
                          transform=Affine(2, 0, 0, 0, -2, 0), width=32, height=32, count=2)
    with pytest.raises(ValueError, match="different grids"):
        tiling.OutputSet((a, b))
    c = tiling.OutputSpec(str(tmp_path / "c.tif"), crs="EPSG:32631",
                          transform=Affine(1, 0, 0, 0, -1, 0), width=32, height=32, count=2)
    assert tiling.OutputSet((a, c)).count == 3
