"""Class-probability rasters as models write them: uint8 x 255 whose nodata value is also a
valid probability, zero padding beyond a model's footprint, and a subset of the classes.

The guide is the real bundled Rotterdam image (300 x 300 px, 1 m); the probabilities are 3
classes on a grid 10 times coarser, made from the image's own NDVI and brightness so that they
follow it, stored as a model would store them.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import rasterio
import torch

import geoupsample as gu
from geoupsample.core import presets
from geoupsample.pipeline import upsample_raster
from tests._tiling_helpers import read_tif, write_tif

GUIDE = str(files("geoupsample") / "data" / "rotterdam_ms.tif")
SCALE = 10


def class_fractions() -> tuple[np.ndarray, rasterio.Affine, object]:
    """``float64 [3, 30, 30]`` class probabilities on the guide's 10 m grid (vegetation, bright,
    dark by NDVI and brightness, area-averaged: real mixed cells), its transform and CRS."""
    with rasterio.open(GUIDE) as ds:
        img = ds.read().astype(np.float64)  # red, green, blue, nir
        transform, crs = ds.transform * ds.transform.scale(SCALE), ds.crs
    ndvi = (img[3] - img[0]) / (img[3] + img[0] + 1e-9)
    bright = img[:3].mean(0) > np.median(img[:3].mean(0))
    veg = ndvi > 0.2
    onehot = np.stack([veg, ~veg & bright, ~veg & ~bright]).astype(np.float64)
    h, w = onehot.shape[1] // SCALE, onehot.shape[2] // SCALE
    frac = onehot.reshape(3, h, SCALE, w, SCALE).mean((2, 4))
    return frac, transform, crs


def stored_uint8(frac: np.ndarray) -> np.ndarray:
    """Probabilities x 255 rounded to uint8 as a model stores them (largest remainder, so that
    every cell sums to exactly 255)."""
    scaled = frac * 255
    out = np.floor(scaled)
    short = (255 - out.sum(0)).astype(int)
    order = np.argsort(-(scaled - out), axis=0)
    for k in range(3):
        out += (order == k) & (k < short)[None]
    return out.astype(np.uint8)


@pytest.mark.parametrize("method", ["bilinear", "jbu"])
def test_nodata_equal_to_the_unit_marks_cells_not_certain_classes(tmp_path, method):
    """uint8 x 255 with nodata 255: a class certain in a cell (255 in its band) stays valid and
    wins its cell, and only cells whose bands all hold 255 are missing. Band by band masking
    dropped the certain class (its cell went to a class of probability 0) and the output wrote
    p = 1 as 254 with a clipping warning."""
    frac, transform, crs = class_fractions()
    stored = stored_uint8(frac)
    assert (stored == 255).any(0).sum() > 50  # many certain cells
    stored[:, 20:25, 5:10] = 255  # a block of missing cells (every band at nodata)
    lr = write_tif(tmp_path / "p255.tif", stored, transform, crs=crs, nodata=255, block=16)
    out = str(tmp_path / f"{method}.tif")
    upsample_raster(lr, GUIDE, out, method=method, tile=160, halo=32, keep_missing=True)

    with rasterio.open(out) as ds:
        assert ds.nodata is None and ds.dtypes[0] == "uint8"  # p = 1 is 255: a mask band
        data = ds.read(masked=True)
        assert ds.tags()["geoupsample_probability_unit"] == "255"
    missing = np.ma.getmaskarray(data).all(0)
    block = np.zeros(missing.shape, bool)
    block[200:250, 50:100] = True
    np.testing.assert_array_equal(missing, block)  # keep_missing: exactly their footprint
    sums = data.astype(int).sum(0)[~missing]
    assert sums.min() >= 253 and sums.max() <= 257
    # in the middle of a certain cell its class has (almost) all the probability
    certain = (stored == 255).any(0) & ~(stored == 255).all(0)
    i, j = np.argwhere(certain[2:-2, 2:-2] & certain[1:-3, 2:-2] & certain[3:-1, 2:-2]
                       & certain[2:-2, 1:-3] & certain[2:-2, 3:-1])[0] + 2
    k = int(stored[:, i, j].argmax())
    centre = data[:, i * SCALE + SCALE // 2, j * SCALE + SCALE // 2]
    assert centre[k] >= 240 and int(centre.argmax()) == k, centre

    floats = str(tmp_path / f"{method}_f32.tif")  # --dtype float32: NaN, not 255, is nodata
    upsample_raster(lr, GUIDE, floats, method=method, tile=160, halo=32, dtype="float32",
                    keep_missing=True)
    with rasterio.open(floats) as ds:
        assert np.isnan(ds.nodata)
        f = ds.read()
    assert np.isnan(f).all(0)[missing].all() and np.isfinite(f).all(0)[~missing].all()
    assert np.nanmax(f) == pytest.approx(255.0, abs=1e-3)  # certain classes survive as 255

    import rioxarray

    from geoupsample.xarray import upsample

    chunks = {"x": 512, "y": 512}
    lazy = upsample(rioxarray.open_rasterio(lr, chunks=chunks),
                    rioxarray.open_rasterio(GUIDE, chunks=chunks), method=method, tile=160,
                    halo=32, keep_missing=True)
    np.testing.assert_allclose(lazy.values, f, atol=1e-3)  # the xarray API reads them alike


def test_zero_padding_beyond_the_footprint_is_missing(tmp_path):
    """Probabilities zero-filled beyond a model's footprint (no nodata declared): all-zero
    cells hold no prediction. They are recognised as probabilities (they were rendered as a
    continuous raster, to values from -0.6 to 1.3) and the zero cells are missing, as if they
    were nodata."""
    frac, transform, crs = class_fractions()
    stored = stored_uint8(frac)
    padded = stored.copy()
    padded[:, :, :6] = 0  # a model's footprint ends at column 6
    lr = write_tif(tmp_path / "pad.tif", padded, transform, crs=crs, block=16)
    ref_data = stored.astype(np.float32)
    ref_data[:, :, :6] = np.nan
    ref = write_tif(tmp_path / "nan.tif", ref_data, transform, crs=crs, nodata=float("nan"),
                    block=16)
    for method in ("nearest", "jbu"):
        out, want = str(tmp_path / f"pad_{method}.tif"), str(tmp_path / f"nan_{method}.tif")
        upsample_raster(lr, GUIDE, out, method=method, tile=160, halo=32, dtype="float32")
        upsample_raster(ref, GUIDE, want, method=method, tile=160, halo=32, kind="probabilities",
                        dtype="float32")
        with rasterio.open(out) as ds:
            assert '"kind": "probabilities"' in ds.tags()["geoupsample_render"]
        got, expected = read_tif(out), read_tif(want)
        np.testing.assert_allclose(got, expected, atol=1e-3, err_msg=method)
        assert np.isnan(got[:, :, :25]).all()  # beyond the reach of any valid cell
        valid = np.isfinite(got).all(0)
        np.testing.assert_allclose(got.sum(0)[valid], 255, atol=1e-3)


def test_a_subset_of_the_classes_renders_with_all_of_them(tmp_path):
    """``bands=[2]`` of a probability raster: the band renders on the simplex with the others
    (it is the same band of the all-bands output) instead of as a continuous raster, which
    back-projection took far outside [0, 1] (-0.47 to 1.72 in a user's run)."""
    frac, transform, crs = class_fractions()
    lr = write_tif(tmp_path / "p.tif", frac.astype(np.float32), transform, crs=crs, block=16)
    run = dict(method="jbu", tile=160, halo=32)
    upsample_raster(lr, GUIDE, tmp_path / "all.tif", **run)
    upsample_raster(lr, GUIDE, tmp_path / "two.tif", bands=[2], **run)
    upsample_raster(lr, GUIDE, tmp_path / "cont.tif", bands=[2], kind="continuous", **run)
    whole, two, cont = (read_tif(tmp_path / n) for n in ("all.tif", "two.tif", "cont.tif"))
    assert two.shape[0] == 1
    np.testing.assert_array_equal(two[0], whole[1])
    assert two.min() >= 0 and two.max() <= 1
    assert cont.min() < -0.02 or cont.max() > 1.02  # what the continuous render does
    with rasterio.open(tmp_path / "two.tif") as ds:
        assert '"kind": "probabilities"' in ds.tags()["geoupsample_render"]


def test_core_renders_all_zero_probability_cells_as_missing():
    """``gu.upsample`` and ``Kernels.render``: cells of probabilities whose channels are all 0
    are missing (nearest: NaN on their footprint), and they do not stop the raster being
    recognised as probabilities."""
    frac, _, _ = class_fractions()
    x = frac.astype(np.float32)
    x[:, 3:6, 4:8] = 0
    with rasterio.open(GUIDE) as ds:
        guide = ds.read().astype(np.float32)
    assert presets.looks_like_probabilities(torch.from_numpy(x))
    hole = np.zeros((300, 300), bool)
    hole[30:60, 40:80] = True
    out = gu.upsample(x, guide, method="nearest")
    assert np.isnan(out).all(0)[hole].all() and np.isfinite(out).all(0)[~hole].all()
    kernels = gu.fit(guide, (30, 30), iters=2)
    rendered = kernels.render(x)
    assert np.isfinite(rendered).all()  # the hole is filled from its valid neighbours...
    np.testing.assert_allclose(rendered.sum(0), 1, atol=1e-5)
    # ... exactly as from cells marked NaN
    nan_cells = x.copy()
    nan_cells[:, 3:6, 4:8] = np.nan
    np.testing.assert_allclose(rendered, kernels.render(nan_cells, kind="probabilities"),
                               atol=1e-6)
