"""geoupsample.xarray.upsample on rioxarray DataArrays: lazy, on the guide's grid, and its
``.rio.to_raster`` equals the CLI's output (real Rotterdam sample)."""

from __future__ import annotations

import json
from importlib.resources import files

import dask.array as da
import numpy as np
import pytest
import rasterio
import rioxarray
from rasterio.windows import Window

from geoupsample.pipeline import InputError, upsample_raster
from geoupsample.xarray import upsample

DATA = files("geoupsample") / "data"
LR = str(DATA / "rotterdam_ms.tif")
HR = str(DATA / "rotterdam_pan.tif")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("xr")
    out = []
    for src, name, win in ((LR, "lr.tif", Window(60, 60, 80, 80)),
                           (HR, "hr.tif", Window(120, 120, 160, 160))):
        with rasterio.open(src) as ds:
            prof = ds.profile
            prof.update(width=int(win.width), height=int(win.height),
                        transform=ds.window_transform(win), blockxsize=16, blockysize=16)
            data = ds.read(window=win)
            descriptions = ds.descriptions
        with rasterio.open(d / name, "w", **prof) as o:
            o.write(data)
            o.descriptions = descriptions
        out.append(str(d / name))
    return tuple(out)


def test_lazy_on_guide_grid_with_crs():
    lr = rioxarray.open_rasterio(LR, chunks={"x": 128, "y": 128})
    g = rioxarray.open_rasterio(HR, chunks={"x": 256, "y": 256})
    hr = upsample(lr, g, method="bilinear", tile=128, halo=16)
    assert isinstance(hr.data, da.Array)  # nothing computed yet
    assert hr.shape == (4, 600, 600) and hr.dtype == np.float32
    assert hr.rio.crs == g.rio.crs
    assert hr.rio.transform().almost_equals(g.rio.transform())
    np.testing.assert_array_equal(hr.x.values, g.x.values)
    np.testing.assert_array_equal(hr.y.values, g.y.values)
    assert hr.attrs["long_name"] == ("red", "green", "blue", "nir")
    assert hr.attrs["geoupsample_method"] == "bilinear"


@pytest.mark.parametrize("method", ["bilinear", "jbu"])
def test_to_raster_equals_cli_output(small, tmp_path, method):
    lr_path, hr_path = small
    cli = str(tmp_path / "cli.tif")
    upsample_raster(lr_path, hr_path, cli, method=method, tile=48, halo=16, blocksize=16)
    lr = rioxarray.open_rasterio(lr_path, chunks={"x": 32, "y": 32})
    g = rioxarray.open_rasterio(hr_path, chunks={"x": 64, "y": 64})
    hr = upsample(lr, g, method=method, tile=48, halo=16, blocksize=16)
    xr_path = str(tmp_path / "xr.tif")
    hr.rio.to_raster(xr_path)
    with rasterio.open(cli) as a, rasterio.open(xr_path) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.crs == b.crs and a.transform.almost_equals(b.transform)
        assert b.descriptions == a.descriptions


def test_gsjbu_lazy_equals_cli(small, tmp_path):
    lr_path, hr_path = small
    cli = str(tmp_path / "cli.tif")
    upsample_raster(lr_path, hr_path, cli, method="gsjbu", iters=3, tile=80, halo=16,
                    blocksize=16)
    hr = upsample(rioxarray.open_rasterio(lr_path), rioxarray.open_rasterio(hr_path),
                  method="gsjbu", iters=3, tile=80, halo=16, blocksize=16)
    with rasterio.open(cli) as a:
        np.testing.assert_array_equal(a.read(), hr.values)


def test_crs_mismatch_is_refused():
    lr = rioxarray.open_rasterio(LR).rio.reproject("EPSG:32632")  # the same place, another CRS
    g = rioxarray.open_rasterio(HR)
    with pytest.raises(InputError, match="gdalwarp"):
        upsample(lr, g, method="bilinear")


def test_a_dataarray_without_crs_is_told_how_to_assign_one():
    lr = rioxarray.open_rasterio(LR).drop_vars("spatial_ref")
    assert lr.rio.crs is None
    with pytest.raises(InputError, match=r"low-res raster has no CRS.*rio\.write_crs"):
        upsample(lr, rioxarray.open_rasterio(HR), method="bilinear")


def test_not_a_dataarray_is_refused():
    with pytest.raises(InputError, match="DataArray"):
        upsample(np.zeros((1, 4, 4)), rioxarray.open_rasterio(HR))


def test_band_selection_of_a_multiband_file_writes(tmp_path):
    """rioxarray keeps the file's 4 band names on a one-band selection; the result must still
    write (the stale names are dropped)."""
    from rasterio.transform import Affine

    scene = rioxarray.open_rasterio(LR, chunks={"x": 128, "y": 128})
    guide = scene.sel(band=[1, 2, 3])
    lowres = scene.sel(band=[4]).coarsen(x=10, y=10).mean()
    lowres = lowres.rio.write_transform(guide.rio.transform() @ Affine.scale(10))
    lowres = lowres.rio.write_crs(guide.rio.crs)
    out = upsample(lowres, guide, method="bilinear", tile=128, halo=16)
    out.rio.to_raster(tmp_path / "o.tif")
    assert rioxarray.open_rasterio(tmp_path / "o.tif").shape == (1, 300, 300)


def test_render_overrides_match_cli(small, tmp_path):
    """Render overrides are decided once for the array (self-guidance's unit included), so the
    lazy chunks and the CLI's tiles agree exactly; interpolations refuse kernel settings."""
    lr_path, hr_path = small
    overrides = dict(self_guidance=0.5, min_sigma_r=0.1, consistency=1)
    cli = str(tmp_path / "cli.tif")
    upsample_raster(lr_path, hr_path, cli, method="jbu", tile=48, halo=16, blocksize=16,
                    **overrides)
    lr = rioxarray.open_rasterio(lr_path, chunks={"x": 32, "y": 32})
    g = rioxarray.open_rasterio(hr_path, chunks={"x": 64, "y": 64})
    hr = upsample(lr, g, method="jbu", tile=48, halo=16, blocksize=16, **overrides)
    render = json.loads(hr.attrs["geoupsample_render"])
    assert render["kind"] == "continuous" and render["self_guidance_scale"] > 0
    with rasterio.open(cli) as a:
        assert json.loads(a.tags()["geoupsample_render"]) == render
        np.testing.assert_array_equal(a.read(), hr.values)
    plain = upsample(lr, g, method="jbu", tile=48, halo=16, blocksize=16)
    assert np.abs(plain.values - hr.values).max() > 1e-3
    with pytest.raises(InputError, match="only jbu and gsjbu use min_sigma_r"):
        upsample(lr, g, method="bilinear", min_sigma_r=0.0)


def test_dimension_order_and_south_up_coordinates_are_read_as_north_up(small):
    lr_path, hr_path = small
    lr, g = rioxarray.open_rasterio(lr_path), rioxarray.open_rasterio(hr_path)
    ref = upsample(lr, g, method="nearest", tile=64, halo=8).compute()
    variants = {
        "guide (y, x, band)": (lr, g.transpose("y", "x", "band")),
        "lowres (band, x, y)": (lr.transpose("band", "x", "y"), g),
        # sortby("y") flips the rows and leaves rioxarray a stale north-up transform
        "lowres south-up": (lr.sortby("y"), g),
        "guide south-up": (lr, g.sortby("y")),
        "both east-to-west": (lr.sortby("x", ascending=False), g.sortby("x", ascending=False)),
    }
    for name, (a, b) in variants.items():
        out = upsample(a, b, method="nearest", tile=64, halo=8)
        assert out.dims == ("band", "y", "x"), name
        np.testing.assert_array_equal(out.y.values, ref.y.values, err_msg=name)
        np.testing.assert_array_equal(out.compute().values, ref.values, err_msg=name)


def test_unnamed_spatial_dims_are_refused():
    lr = rioxarray.open_rasterio(LR).rename(y="row", x="col")
    with pytest.raises(InputError, match="name its spatial dims y and x"):
        upsample(lr, rioxarray.open_rasterio(HR))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iters": -1}, "iters must be"),
        ({"radius": 0}, "radius must be"),
        ({"seed": None}, "seed must be"),
        ({"device": "gpu"}, "device"),
        ({"method": "lanczos"}, "unknown method"),
    ],
)
def test_bad_options_are_refused_when_called_not_when_computed(kwargs, match):
    lr, g = rioxarray.open_rasterio(LR), rioxarray.open_rasterio(HR)
    with pytest.raises(InputError, match=match):
        upsample(lr, g, **kwargs)


def test_value_attributes_and_scalar_coordinates_are_kept(small, tmp_path):
    lr_path, hr_path = small
    lr = rioxarray.open_rasterio(lr_path).isel(band=[3])  # nir of a 4-band file
    lr = lr.assign_attrs(units="reflectance x 1e4", description="NIR").assign_coords(
        time=np.datetime64("2020-05-18")
    )
    out = upsample(lr, rioxarray.open_rasterio(hr_path), method="bilinear", tile=64, halo=8)
    assert out.attrs["units"] == "reflectance x 1e4" and out.attrs["description"] == "NIR"
    assert out.time.values == np.datetime64("2020-05-18")
    assert "long_name" not in out.attrs  # the file's four band names do not fit one band
    assert "scale_factor" not in out.attrs and np.isnan(out.rio.nodata)  # NaN, ours
    out.rio.to_raster(tmp_path / "o.tif")  # still writable
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.count == 1
