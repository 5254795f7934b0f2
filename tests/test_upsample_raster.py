"""Whole-raster upsampling through geoupsample (issue 3 acceptance 2-8) on the real Rotterdam
sample (SpaceNet 6 via solaris, bundled): 4-band 1 m multispectral as the low-res raster, 0.5 m
panchromatic as the guide (exact 2x nesting)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import box, mapping
from typer.testing import CliRunner

import geoupsample as gu
from geoupsample.cli import app
from geoupsample.inputs import InputError, scene_guide_stats
from geoupsample.pipeline import upsample_raster
from tests._tiling_helpers import damage_block, kill_9_after_bands, read_tif, write_tif

DATA = files("geoupsample") / "data"
LR = str(DATA / "rotterdam_ms.tif")
HR = str(DATA / "rotterdam_pan.tif")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _crop(src: str, dst, win: Window, **update) -> str:
    with rasterio.open(src) as ds:
        prof = ds.profile
        data = ds.read(window=win)
        prof.update(width=int(win.width), height=int(win.height),
                    transform=ds.window_transform(win), blockxsize=16, blockysize=16)
        descriptions = ds.descriptions
    prof.update(update)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data.astype(prof["dtype"]))
        for i, d in enumerate(descriptions, 1):
            if d:
                out.set_band_description(i, d)
    return str(dst)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A real 80 x 80 (low-res) / 160 x 160 (guide) crop of the Rotterdam pair."""
    d = tmp_path_factory.mktemp("small")
    lr = _crop(LR, d / "lr.tif", Window(60, 60, 80, 80))
    hr = _crop(HR, d / "hr.tif", Window(120, 120, 160, 160))
    return lr, hr


def _whole(lr: str, hr: str, method: str, **kw) -> np.ndarray:
    x, g = read_tif(lr).astype(np.float32), read_tif(hr).astype(np.float32)
    if method in ("jbu", "gsjbu"):
        kw["normalize"] = scene_guide_stats(hr)
    return np.asarray(gu.upsample(x, g, method=method, **kw))


# ---- acceptance 2: exact where exactness is possible --------------------------------------
@pytest.mark.parametrize("tile", [150, 128])  # divides 600 / does not
def test_bilinear_tiled_equals_whole_array_full_sample(tmp_path, tile):
    out = str(tmp_path / "o.tif")
    upsample_raster(LR, HR, out, method="bilinear", tile=tile, halo=16, blocksize=64)
    np.testing.assert_allclose(read_tif(out), _whole(LR, HR, "bilinear"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tile,blend", [(80, "taper"), (48, "taper"), (48, "crop")])
def test_jbu_tiled_equals_whole_array(small, tmp_path, tile, blend):
    lr, hr = small
    out = str(tmp_path / "o.tif")
    # jbu support: (radius + 1) x scale + 1 = 9 guide px, and back-projection's two rounds a
    # little more; the taper needs halo >= 2 x support (crop: >= support; 12 px fell short by
    # more than 1e-5 at core boundaries on cells 20, 40, 60, which balanced tiles of 40 have)
    halo = 24 if blend == "taper" else 16
    upsample_raster(lr, hr, out, method="jbu", tile=tile, halo=halo, blocksize=16, blend=blend)
    np.testing.assert_allclose(read_tif(out), _whole(lr, hr, "jbu"), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def fractional(tmp_path_factory):
    """The Rotterdam MS (1 m, 300 x 300) as the guide and its bands area-averaged onto a 10/3 m
    grid (90 x 90): a fractional scale, as 10 m probabilities on 3 m imagery."""
    from rasterio.warp import Resampling, reproject

    d = tmp_path_factory.mktemp("frac")
    with rasterio.open(LR) as ds:
        guide, t, crs = ds.read().astype(np.float32), ds.transform, ds.crs
    t_lr = Affine(t.a * 10 / 3, 0, t.c, 0, t.e * 10 / 3, t.f)
    lr = np.zeros((4, 90, 90), np.float32)
    reproject(guide, lr, src_transform=t, src_crs=crs, dst_transform=t_lr, dst_crs=crs,
              resampling=Resampling.average)
    paths = []
    for name, arr, tr in (("guide.tif", guide, t), ("lr.tif", lr, t_lr)):
        path = str(d / name)
        with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1],
                           count=arr.shape[0], dtype="float32", crs=crs, transform=tr) as out:
            out.write(arr)
        paths.append(path)
    return paths[1], paths[0]


@pytest.mark.parametrize("method,tile,halo", [("bilinear", 100, 20), ("jbu", 60, 40)])
def test_fractional_scale_tiled_equals_whole_array(fractional, tmp_path, method, tile, halo):
    """10/3 guide pixels per low-res pixel: tiles align to the 10 px period where the lattices
    meet, so each tile is an exact piece of the whole-array result."""
    lr, hr = fractional
    out = str(tmp_path / "o.tif")
    upsample_raster(lr, hr, out, method=method, tile=tile, halo=halo, blocksize=16)
    with rasterio.open(out) as ds:
        assert ds.tags()["geoupsample_scale"] == "10/3x10/3" and ds.shape == (300, 300)
        got = ds.read()
    want = _whole(lr, hr, method)
    # equal up to float32 rounding of the fractional coordinates and of the blend (a few ulps
    # of values up to ~2000); a misplaced period or cell would differ by whole gradients
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.ptp(want)))
    import rioxarray

    from geoupsample.xarray import upsample as xr_upsample

    lazy = xr_upsample(rioxarray.open_rasterio(lr), rioxarray.open_rasterio(hr), method=method,
                       tile=tile, halo=halo, blocksize=16)  # fmt: skip
    np.testing.assert_array_equal(lazy.values, got)  # the same tiles, lazily


@pytest.fixture(scope="module")
def eightfold_with_holes(tmp_path_factory):
    """The Rotterdam MS (1 m, 296 x 296) as the guide and its bands area-averaged x8 (37 x 37
    cells, nodata -9999) with missing cells: a 3 x 3 hole, a lone cell and a 1 x 5 strip, some
    of them across the 64 px tile boundaries."""
    d = tmp_path_factory.mktemp("x8")
    with rasterio.open(LR) as ds:
        guide = ds.read(window=Window(0, 0, 296, 296)).astype(np.float32)
        t, crs = ds.transform, ds.crs
    lr = guide.reshape(4, 37, 8, 37, 8).mean(axis=(2, 4))
    for rows, cols in ((slice(7, 10), slice(7, 10)), (16, 23), (slice(24, 25), slice(3, 8))):
        lr[:, rows, cols] = -9999.0
    paths = []
    for name, arr, tr, nd in (("guide.tif", guide, t, None),
                              ("lr.tif", lr, t * Affine.scale(8), -9999.0)):
        path = str(d / name)
        with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1],
                           count=arr.shape[0], dtype="float32", crs=crs, transform=tr,
                           nodata=nd) as out:
            out.write(arr)
        paths.append(path)
    return paths[1], paths[0]


def test_four_byte_bands_are_not_rgba(tmp_path):
    """Four uint8 class probabilities stay four quantities in the output, COG included: GDAL's
    default would call them RGBA, and the 4th class's probability an alpha band (a mask that
    a warp or a viewer applies wherever that class has probability 0)."""
    with rasterio.open(LR) as ds:
        ms, profile = ds.read().astype(np.float64), ds.profile
    z = (ms - ms.mean(axis=(1, 2), keepdims=True)) / ms.std(axis=(1, 2), keepdims=True)
    probs = np.exp(3 * z) / np.exp(3 * z).sum(0)
    stored = np.rint(probs * 254).astype(np.uint8)
    assert (stored[3] == 0).any()  # where an alpha band would hide the pixels
    lr = str(tmp_path / "probs.tif")
    profile.update(dtype="uint8", nodata=255)
    with rasterio.open(lr, "w", **profile) as dst:
        dst.write(stored)
        dst.update_tags(probability_scale=str(1 / 254))
    out = str(tmp_path / "o.tif")
    upsample_raster(lr, HR, out, method="bilinear", cog=True)
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "uint8" and ds.count == 4
        assert [c.name for c in ds.colorinterp] == ["gray"] + ["undefined"] * 3
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def _read_nan(path) -> np.ndarray:
    """All bands, nodata as NaN."""
    with rasterio.open(path) as ds:
        return ds.read(masked=True).filled(np.nan)


@pytest.mark.parametrize("method", ["bilinear", "gsjbu"])
def test_keep_missing_keeps_the_footprint_of_nodata_cells(eightfold_with_holes, tmp_path,
                                                          method):
    """--keep-missing: nodata exactly on the footprint of the low-res nodata cells (8 x 8 px
    per cell here), tiled as in one piece; without it the method fills into the holes."""
    lr, hr = eightfold_with_holes
    with rasterio.open(lr) as ds:
        missing = ds.read(1, masked=True).mask
    footprint = np.kron(missing, np.ones((8, 8), bool))
    kept, filled = str(tmp_path / "kept.tif"), str(tmp_path / "filled.tif")
    kw = dict(method=method, iters=3, tile=64, blocksize=16)
    upsample_raster(lr, hr, kept, keep_missing=True, **kw)
    upsample_raster(lr, hr, filled, **kw)
    with rasterio.open(kept) as ds:
        assert json.loads(ds.tags()["geoupsample_render"])["keep_missing"] is True
    got, full = (_read_nan(p) for p in (kept, filled))
    np.testing.assert_array_equal(np.isnan(got).all(0), footprint)  # nodata -9999, as the input
    assert np.isnan(full).all(0).sum() < footprint.sum()  # filled in part without the option
    np.testing.assert_array_equal(got[:, ~footprint], full[:, ~footprint])
    result = CliRunner().invoke(app, ["upsample", lr, hr, "-o", str(tmp_path / "cli.tif"),
                                      "-m", method, "--iters", "3", "--tile", "64",
                                      "--blocksize", "16", "--keep-missing", "-q"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_tif(tmp_path / "cli.tif"), read_tif(kept))
    import rioxarray

    from geoupsample.xarray import upsample as xr_upsample

    lazy = xr_upsample(rioxarray.open_rasterio(lr), rioxarray.open_rasterio(hr), method=method,
                       iters=3, tile=64, blocksize=16, keep_missing=True)
    np.testing.assert_array_equal(lazy.values, got)  # the same tiles, lazily


def test_tile_blend_crops_interpolations_within_their_support():
    from fractions import Fraction

    from geoupsample.pipeline import tile_blend

    eight = (Fraction(8), Fraction(8))
    assert tile_blend("auto", "bilinear", 64, eight) == ("crop", 8)
    assert tile_blend("auto", "nearest", 64, eight) == ("crop", 0)
    assert tile_blend("auto", "bicubic", 64, eight) == ("crop", 48)
    assert tile_blend("auto", "bicubic", 64, (Fraction(16), Fraction(4))) == ("taper", 64)
    assert tile_blend("auto", "bilinear", 64, (Fraction(10, 3),) * 2) == ("crop", 4)
    assert tile_blend("auto", "gsjbu", 64, eight) == ("taper", 64)
    assert tile_blend("taper", "bilinear", 64, eight) == ("taper", 64)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic"])
def test_interpolations_crop_exactly_by_default(eightfold_with_holes, tmp_path, method):
    """The default blend crops interpolations with the halo cut to their support: the tiles
    (64 px, many boundaries) still give the whole-array pixels, missing cells included."""
    lr, hr = eightfold_with_holes
    out = str(tmp_path / "o.tif")
    upsample_raster(lr, hr, out, method=method, tile=64, blocksize=16)
    with rasterio.open(out) as ds:
        params = ds.tags()["geoupsample_params"]
        got = ds.read(masked=True).filled(np.nan)
    halo = {"nearest": 0, "bilinear": 8, "bicubic": 48}[method]
    assert f"halo={halo} blend=crop" in params
    with rasterio.open(lr) as ds:
        x = ds.read(masked=True).filled(np.nan).astype(np.float32)
    want = np.asarray(gu.upsample(x, read_tif(hr).astype(np.float32), method=method))
    assert np.isnan(want).any()  # the holes reach the output (nearest, bilinear: 3 x 3 hole)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("method,guide_dtype", [
    ("nearest", "uint16"), ("bilinear", "uint16"), ("bicubic", "uint16"), ("bilinear", "float32"),
])
def test_guide_chip_interpolates_towards_the_cells_beyond_it(tmp_path, method, guide_dtype):
    """A guide chip inside the larger low-res raster (the whole Rotterdam sample around a
    251 x 250 px piece of the pan band, its rows starting half a cell off the low-res lattice
    and its columns on it): its pixels equal
    the whole scene's, up to its edges, because the edge tiles read the low-res cells beyond
    the chip. They used to be interpolated as at the raster's edge (bilinear off by up to 174
    here). A float32 guide is read (for its nodata), a uint16 one without nodata is not."""
    chip = _crop(HR, tmp_path / "chip.tif", Window(100, 101, 250, 251), dtype=guide_dtype)
    out = str(tmp_path / "o.tif")
    upsample_raster(LR, chip, out, method=method, tile=96, blocksize=16)
    whole = _whole(LR, HR, method)[:, 101:352, 100:350]
    np.testing.assert_allclose(read_tif(out), whole, rtol=0, atol=1e-3)
    import rioxarray

    from geoupsample.xarray import upsample as xr_upsample

    lazy = xr_upsample(rioxarray.open_rasterio(LR), rioxarray.open_rasterio(chip),
                       method=method, tile=96, blocksize=16)
    np.testing.assert_allclose(lazy.values, whole, rtol=0, atol=1e-3)


def test_packed_values_keep_their_scale_offset_and_units(tmp_path):
    """A low-res raster of packed reflectances (uint16 x 2.75e-5 - 0.2, unit "reflectance"):
    the output (GeoTIFF and COG, and xarray's attributes) keeps the scale, offset and unit, so
    that its stored values still mean the same physical ones. They were dropped: a reader got
    11633 for a reflectance of 0.12."""
    import rioxarray

    from geoupsample.xarray import upsample as xr_upsample

    x = (read_tif(LR)[:2, :60, :60] / 2.75e-5 * 1e-4).astype(np.uint16)
    lr = write_tif(tmp_path / "lr.tif", x, Affine(2.0, 0, 500000, 0, -2.0, 5000000))
    with rasterio.open(lr, "r+") as ds:
        ds.scales, ds.offsets, ds.units = (2.75e-5, 2.75e-5), (-0.2, -0.2), ("reflectance", "")
    hr = write_tif(tmp_path / "hr.tif", read_tif(HR)[:, :120, :120],
                   Affine(1.0, 0, 500000, 0, -1.0, 5000000))
    for cog in (False, True):
        out = str(tmp_path / f"o{cog}.tif")
        upsample_raster(lr, hr, out, method="bilinear", cog=cog)
        with rasterio.open(out) as ds:
            assert ds.scales == (2.75e-5, 2.75e-5) and ds.offsets == (-0.2, -0.2)
            assert ds.units == ("reflectance", None) and ds.dtypes[0] == "uint16"
    lazy = xr_upsample(rioxarray.open_rasterio(lr), rioxarray.open_rasterio(hr),
                       method="bilinear")
    assert (lazy.attrs["scale_factor"], lazy.attrs["add_offset"]) == (2.75e-5, -0.2)
    lazy.rio.to_raster(tmp_path / "xr.tif")
    with rasterio.open(tmp_path / "xr.tif") as ds:
        assert ds.scales[0] == 2.75e-5 and ds.offsets[0] == -0.2


def test_fractional_scale_gsjbu_runs_without_seams(fractional, tmp_path):
    lr, hr = fractional
    out = str(tmp_path / "o.tif")
    upsample_raster(lr, hr, out, method="gsjbu", iters=3, tile=100, halo=40)
    y = read_tif(out)
    assert np.isfinite(y).all()
    assert _seam_diff(y, [99, 199]) < 2.0 * _seam_diff(y, [49, 149, 249])


# ---- acceptance 3: no seams with per-tile gsjbu fits ---------------------------------------
def _seam_diff(y: np.ndarray, pairs: list[int]) -> float:
    """Mean |difference| between neighbouring pixels (i, i + 1) for i in ``pairs``, both axes."""
    y = y.astype(np.float64)
    dx = np.abs(np.diff(y, axis=2))[:, :, pairs]
    dy = np.abs(np.diff(y, axis=1))[:, pairs, :]
    return float((dx.mean() + dy.mean()) / 2)


def test_gsjbu_has_no_seams(small, tmp_path):
    """Across tile seams the pixel-to-pixel difference is no larger than at the same places
    inside tiles (a run with a different tile size, whose seams lie elsewhere)."""
    lr, hr = small
    runs = {}
    # 160 px: --tile 64 gives three balanced cores of 54, 54, 52; --tile 40 four of 40
    for tile, blend, halo in ((64, "taper", 16), (40, "taper", 16), (64, "crop", 0)):
        out = str(tmp_path / f"g{tile}{blend}.tif")
        upsample_raster(lr, hr, out, method="gsjbu", iters=5, tile=tile, halo=halo,
                        blocksize=16, blend=blend)
        runs[tile, blend] = read_tif(out)
    seams64, seams40 = [53, 107], [39, 79, 119]
    a, b = runs[64, "taper"], runs[40, "taper"]
    assert _seam_diff(a, seams64) <= 1.02 * _seam_diff(b, seams64)
    assert _seam_diff(b, seams40) <= 1.02 * _seam_diff(a, seams40)
    # control: without halo and blending the metric does see the seams
    assert _seam_diff(runs[64, "crop"], seams64) > 1.2 * _seam_diff(b, seams64)


# ---- acceptance 4: georeferencing, tags, COG ----------------------------------------------
def test_georeferencing_descriptions_tags_and_cog(tmp_path):
    out = str(tmp_path / "o.tif")
    upsample_raster(LR, HR, out, method="bilinear", tile=256, halo=16, cog=True,
                    dtype="uint16", bands=["nir", 1])
    with rasterio.open(HR) as g, rasterio.open(out) as o:
        assert o.crs == g.crs and o.transform == g.transform and o.shape == g.shape
        assert o.count == 2 and o.dtypes[0] == "uint16" and o.nodata == 65535
        assert o.descriptions == ("nir", "red")
        tags = o.tags()
        assert tags["geoupsample_method"] == "bilinear"
        # the tiling actually used: bilinear at scale 2 crops with the halo cut to 1 cell
        assert "tile=256 halo=2 blend=crop" in tags["geoupsample_params"]
        assert tags["geoupsample_version"] == gu.__version__
        assert o.profile["tiled"] and o.overviews(1)
        assert o.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        ref = _whole(LR, HR, "bilinear")[[3, 0]]
        np.testing.assert_array_equal(o.read(), np.clip(np.rint(ref), 0, 65534))
    assert os.listdir(tmp_path) == ["o.tif"]


def test_guide_nodata_gives_output_nodata(small, tmp_path):
    lr, hr = small
    g = read_tif(hr)
    g[:, :40, :40] = 0
    hr0 = str(tmp_path / "hr0.tif")
    with rasterio.open(hr) as ds:
        prof = ds.profile
    prof.update(nodata=0)
    with rasterio.open(hr0, "w", **prof) as ds:
        ds.write(g)
    out = str(tmp_path / "o.tif")
    upsample_raster(lr, hr0, out, method="jbu", tile=48, halo=16, blocksize=16)
    y = read_tif(out)
    assert np.isnan(y[:, :40, :40]).all() and np.isfinite(y[:, 40:, 40:]).all()


def test_uint8_lowres_without_nodata_keeps_255(small, tmp_path, capfd):
    """A uint8 raster using all of 0..255 and no nodata value: the output reserves no value
    (255 stays 255) and marks the guide's nodata in a mask band; into uint16, 65535 is free and
    stays the nodata value."""
    lr, hr = small
    with rasterio.open(lr) as ds:
        prof = ds.profile
    codes = np.random.default_rng(0).integers(0, 256, (2, prof["height"], prof["width"]))
    codes[:, :3, :3] = 255
    lr8 = str(tmp_path / "lr8.tif")
    prof.update(count=2, dtype="uint8", nodata=None)
    with rasterio.open(lr8, "w", **prof) as ds:
        ds.write(codes.astype(np.uint8))
    g = read_tif(hr)
    g[:, -40:, -40:] = 0
    hr0 = str(tmp_path / "hr0.tif")
    with rasterio.open(hr) as ds:
        gprof = ds.profile
    with rasterio.open(hr0, "w", **{**gprof, "nodata": 0}) as ds:
        ds.write(g)
    out = str(tmp_path / "o.tif")
    upsample_raster(lr8, hr0, out, method="nearest", tile=48, halo=16, blocksize=32, workers=1)
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata is None
        values, mask = ds.read(), ds.read_masks(1)
    assert (mask[-40:, -40:] == 0).all() and (mask[:-40, :] == 255).all()
    scale = g.shape[-1] // codes.shape[-1]
    nearest = codes.repeat(scale, 1).repeat(scale, 2)
    np.testing.assert_array_equal(values[:, mask > 0], nearest[:, mask > 0])
    assert (values[:, :3 * scale, :3 * scale] == 255).all()
    assert "ERROR" not in capfd.readouterr().err  # GDAL's threaded compression of mask blocks

    upsample_raster(lr8, hr0, str(tmp_path / "o16.tif"), method="nearest", tile=48, halo=16,
                    blocksize=16, dtype="uint16")
    with rasterio.open(tmp_path / "o16.tif") as ds:
        assert ds.nodata == 65535 and ds.mask_flag_enums[0] == [rasterio.enums.MaskFlags.nodata]
        assert (ds.read(1)[-40:, -40:] == 65535).all()


def test_probability_tags_are_kept(small, tmp_path):
    """A ``segment --probs`` raster (uint8 x 254, ``probability_scale`` and ``class_names``
    tags) upsampled keeps both tags; ``class_names`` only when every band is upsampled."""
    lr, hr = small
    with rasterio.open(lr) as ds:
        prof = ds.profile
    p = np.random.default_rng(0).random((3, prof["height"], prof["width"]))
    p /= p.sum(0)
    probs = str(tmp_path / "probs.tif")
    names = ["water", "trees", "roofs"]
    with rasterio.open(probs, "w", **{**prof, "count": 3, "dtype": "uint8", "nodata": 255}) as ds:
        ds.write(np.rint(p * 254).astype(np.uint8))
        ds.update_tags(probability_scale=str(1 / 254), class_names=json.dumps(names))
        ds.descriptions = tuple(names)
    upsample_raster(probs, hr, str(tmp_path / "all.tif"), method="bilinear", tile=48, halo=16)
    upsample_raster(probs, hr, str(tmp_path / "two.tif"), method="bilinear", tile=48, halo=16,
                    bands=["roofs", "water"], kind="continuous")  # a subset: not a simplex
    with rasterio.open(tmp_path / "all.tif") as ds:
        tags = ds.tags()
        assert json.loads(tags["class_names"]) == names and ds.descriptions == tuple(names)
        assert float(tags["probability_scale"]) == pytest.approx(1 / 254)
        assert tags["geoupsample_probability_unit"] == "254" and ds.read().max() <= 254
    with rasterio.open(tmp_path / "two.tif") as ds:
        assert "class_names" not in ds.tags() and ds.descriptions == ("roofs", "water")
        assert float(ds.tags()["probability_scale"]) == pytest.approx(1 / 254)


def test_masked_output_writes_without_gdal_errors(tmp_path, capfd):
    """GDAL 3.10's threaded compression fails now and then on the mask blocks of a reopened file
    ("Bad value 1 for ExtraSamples tag" on stderr; seen in three runs of three of this test with
    threaded compression): masked outputs are compressed on one thread."""
    rng = np.random.default_rng(0)
    t = Affine(1, 0, 500000, 0, -1, 5400000)
    guide = str(tmp_path / "g.tif")
    with rasterio.open(guide, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="uint16", crs="EPSG:32632", transform=t, tiled=True,
                       blockxsize=256, blockysize=256) as ds:
        ds.write(rng.integers(0, 3000, (3, 512, 512)).astype(np.uint16))
    lr8 = str(tmp_path / "lr8.tif")
    with rasterio.open(lr8, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint8",
                       crs="EPSG:32632", transform=t * Affine.scale(8)) as ds:
        ds.write(rng.integers(0, 256, (2, 64, 64)).astype(np.uint8))
    for i in range(3):
        out = str(tmp_path / f"o{i}.tif")
        upsample_raster(lr8, guide, out, method="nearest", tile=128, halo=16, blocksize=128,
                        workers=1)
        with rasterio.open(out) as ds:
            assert ds.nodata is None and (ds.read_masks(1) == 255).all()
    assert "ERROR" not in capfd.readouterr().err


# ---- acceptance 5: atomic and resumable, through the CLI -----------------------------------
def test_cli_kill_9_then_resume_is_pixel_identical(small, tmp_path):
    lr, hr = small
    out = str(tmp_path / "o.tif")
    args = [lr, hr, "-o", out, "--method", "gsjbu", "--iters", "3", "--tile", "32",
            "--halo", "8", "--blocksize", "16", "--quiet"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "geoupsample", "upsample", *args,
                             "--resume"], env=env)
    kill_9_after_bands(proc, out, bands=1, timeout=180)
    assert not os.path.exists(out)

    runner = CliRunner()
    # other parameters: refused with a clear message
    bad = runner.invoke(app, ["upsample", *args[:-1], "--iters", "4", "--resume", "--quiet"])
    assert bad.exit_code == 2 and "other inputs or parameters" in bad.output
    res = runner.invoke(app, ["upsample", *args, "--resume"])
    assert res.exit_code == 0, res.output
    ref = str(tmp_path / "ref.tif")
    res = runner.invoke(app, ["upsample", *args[:3], ref, *args[4:]])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_tif(out), read_tif(ref))
    assert sorted(os.listdir(tmp_path)) == ["o.tif", "ref.tif"]


def test_resume_leaves_a_finished_output_of_the_same_run_alone(small, tmp_path):
    """A batch job re-run with --resume skips outputs it already finished (nothing computed,
    the file untouched); other parameters or a changed input recompute it."""
    lr, hr = small
    out = str(tmp_path / "o.tif")
    kw = dict(method="jbu", tile=48, halo=16, blocksize=16, resume=True)
    first = upsample_raster(lr, hr, out, **kw)
    assert first.computed == first.tiles > 1
    stamp = os.stat(out).st_mtime_ns
    again = upsample_raster(lr, hr, out, **kw)
    assert again.computed == 0 and again.extra["already_complete"]
    assert os.stat(out).st_mtime_ns == stamp
    other = upsample_raster(lr, hr, out, **{**kw, "radius": 2})
    assert other.computed == other.tiles
    plain = upsample_raster(lr, hr, out, **{**kw, "resume": False})  # no resume: recomputed
    assert plain.computed == plain.tiles


def test_cli_progress_and_summary(tmp_path):
    out = str(tmp_path / "o.tif")
    res = CliRunner().invoke(app, ["upsample", LR, HR, "-o", out, "--method", "bilinear",
                                   "--tile", "256", "--halo", "16"])
    assert res.exit_code == 0, res.output
    assert "9/9" in res.output and "MP/s" in res.output


# ---- acceptance 6: dask.distributed equals local ---------------------------------------------
def test_distributed_equals_local(small, tmp_path):
    from distributed import Client, LocalCluster

    lr, hr = small
    local, dist = str(tmp_path / "local.tif"), str(tmp_path / "dist.tif")
    upsample_raster(lr, hr, local, method="jbu", tile=48, halo=16, blocksize=16)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, ROOT)
        rep = upsample_raster(lr, hr, dist, method="jbu", tile=48, halo=16, blocksize=16,
                              scheduler=client)
        # the tiles tuned each worker's malloc (distributed sets MALLOC_TRIM_THRESHOLD_=65536
        # there, which made a gsjbu fit 2.5x slower than in a local run)
        assert all(client.run(_allocator_tuned).values())
    assert rep.computed == rep.tiles
    np.testing.assert_array_equal(read_tif(local), read_tif(dist))


def _allocator_tuned() -> bool:
    from geoupsample.core import allocator

    return bool(allocator._applied)


# ---- acceptance 7: AOI --------------------------------------------------------------------
def test_aoi_geojson_in_wgs84(tmp_path):
    with rasterio.open(HR) as ds:
        b, crs = ds.bounds, ds.crs
    quarter = box(b.left, (b.top + b.bottom) / 2, (b.left + b.right) / 2, b.top)
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {},
                                "geometry": transform_geom(crs, "EPSG:4326",
                                                           mapping(quarter))}))
    out = str(tmp_path / "o.tif")
    rep = upsample_raster(LR, HR, out, method="bilinear", tile=128, halo=16, blocksize=64,
                          aoi=str(path))
    assert rep.skipped >= 9
    y, ref = read_tif(out), _whole(LR, HR, "bilinear")
    assert np.isnan(y[:, 310:, :]).all() and np.isnan(y[:, :, 310:]).all()
    np.testing.assert_allclose(y[:, 5:290, 5:290], ref[:, 5:290, 5:290], atol=1e-5)


def test_aoi_in_projected_coordinates_without_a_crs_member(tmp_path):
    """A GeoJSON written in UTM metres without a 'crs' member is read as lon/lat (RFC 7946): a
    clear error naming --aoi-crs, nothing written; with --aoi-crs the same file works."""
    with rasterio.open(HR) as ds:
        b, crs = ds.bounds, ds.crs
    quarter = box(b.left, (b.top + b.bottom) / 2, (b.left + b.right) / 2, b.top)
    path = tmp_path / "aoi_utm.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": mapping(quarter)}))
    out = tmp_path / "o.tif"
    args = ["upsample", LR, HR, "-o", str(out), "--method", "bilinear", "--aoi", str(path), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "are not longitudes and latitudes" in result.output and "--aoi-crs" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--aoi-crs", crs.to_string()])
    assert result.exit_code == 0, result.output
    y = read_tif(out)
    assert np.isnan(y[:, 310:, :]).all() and np.isfinite(y[:, 5:290, 5:290]).all()


@pytest.fixture(scope="module")
def class_map(tmp_path_factory):
    """A uint8 land-cover map on the low-res grid (classes 0, 5 and 10 from the MS bands' NDVI
    and brightness) with a colour table and class names, as a classification tool writes it."""
    with rasterio.open(LR) as ds:
        ms, profile = ds.read().astype(np.float64), ds.profile
    red, nir = ms[0], ms[3]
    ndvi = (nir - red) / (nir + red + 1e-9)
    classes = np.where(ndvi > 0.3, 10, np.where(ms[:3].mean(0) > np.median(ms[:3]), 5, 0))
    path = str(tmp_path_factory.mktemp("classes") / "classes.tif")
    profile.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes.astype(np.uint8)[None])
        dst.write_colormap(1, {0: (128, 128, 128, 255), 5: (200, 30, 30, 255),
                               10: (30, 160, 40, 255)})
        dst.update_tags(class_names=json.dumps(["road", "roof", "vegetation"]))
    return path


def test_class_maps_are_refused_by_averaging_methods(class_map, tmp_path):
    out = str(tmp_path / "o.tif")
    for method in ("bilinear", "gsjbu"):
        with pytest.raises(InputError, match="holds class numbers.*--method nearest"):
            upsample_raster(class_map, HR, out, method=method, iters=2)
        assert not os.path.exists(out)
    # numbers that are quantities after all: the user says so
    upsample_raster(class_map, HR, out, method="bilinear", kind="continuous")
    assert len(np.unique(read_tif(out))) > 3


def test_nearest_keeps_a_class_map_its_classes_and_colours(class_map, tmp_path):
    out = str(tmp_path / "o.tif")
    upsample_raster(class_map, HR, out, method="nearest", cog=True)
    with rasterio.open(class_map) as src, rasterio.open(out) as ds:
        assert ds.dtypes[0] == "uint8" and ds.colorinterp[0].name == "palette"
        assert ds.colormap(1)[10] == src.colormap(1)[10] == (30, 160, 40, 255)
        assert json.loads(ds.tags()["class_names"]) == ["road", "roof", "vegetation"]
        assert set(np.unique(ds.read(1))) == {0, 5, 10}


def test_band_names_match_ignoring_case(tmp_path):
    out = str(tmp_path / "o.tif")
    upsample_raster(LR, HR, out, method="nearest", bands=["NIR", " Red"])
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("nir", "red")
    bare = str(tmp_path / "bare.tif")
    shutil.copy(LR, bare)
    with rasterio.open(bare, "r+") as ds:
        for i in range(1, ds.count + 1):
            ds.set_band_description(i, "")
    with pytest.raises(InputError, match="its bands have no descriptions: use 1-based indexes"):
        upsample_raster(bare, HR, out, method="nearest", bands=["nir"])


def test_an_integer_dtype_that_clips_says_so(tmp_path):
    """--dtype uint8 for bands in the thousands: the values are clipped, with a warning that
    counts them and names the fix; a dtype that holds them stays silent."""
    import warnings

    out = str(tmp_path / "o.tif")
    with pytest.warns(UserWarning, match=r"output values \(\d+\.\d%\) lay outside what uint8 "
                      r"holds \(0 to 254\).*wider --dtype"):
        upsample_raster(LR, HR, out, method="bilinear", dtype="uint8", bands=["nir"])
    assert read_tif(out).max() == 254
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lay outside what")
        upsample_raster(LR, HR, out, method="bilinear", dtype="uint16", bands=["nir"])


# ---- acceptance 8: bad input -> clear error, nothing at OUT --------------------------------
def _variant(tmp_path, name: str, src: str = LR, data=None, **update) -> str:
    with rasterio.open(src) as ds:
        prof = ds.profile
        arr = ds.read() if data is None else data
    prof.update(update)
    path = str(tmp_path / name)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(arr.astype(prof["dtype"]))
    return path


def _reprojected(tmp_path, name: str, crs: str, src: str = LR) -> str:
    """``src`` reprojected (bilinear) to ``crs`` at about its own resolution."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src) as ds:
        t, w, h = calculate_default_transform(ds.crs, crs, ds.width, ds.height, *ds.bounds)
        out = np.full((ds.count, h, w), np.nan, np.float32)
        reproject(ds.read(), out, src_transform=ds.transform, src_crs=ds.crs, dst_transform=t,
                  dst_crs=crs, resampling=Resampling.bilinear, dst_nodata=np.nan)
        prof = ds.profile
    prof.update(crs=crs, transform=t, width=w, height=h, dtype="float32", nodata=np.nan)
    path = str(tmp_path / name)
    with rasterio.open(path, "w", **prof) as f:
        f.write(out)
    return path


def _bad_cases(tmp_path):
    with rasterio.open(LR) as ds:
        t = ds.transform
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 this is not really a tiff")
    cases = {
        "crs": (dict(lowres=_reprojected(tmp_path, "utm32.tif", "EPSG:32632")), "gdalwarp"),
        # the wrong CRS assigned: 400 km away, where no warp finds the guide
        "crs apart": (dict(lowres=_variant(tmp_path, "as32.tif", crs=CRS.from_epsg(32632))),
                      "do not overlap .*no warp would help"),
        "no overlap": (dict(lowres=_variant(tmp_path, "far.tif",
                                            transform=Affine(t.a, 0, t.c + 1e4, 0, t.e, t.f))),
                       "do not overlap"),
        "scale": (dict(lowres=_variant(tmp_path, "s137.tif",
                                       transform=Affine(0.685, 0, t.c, 0, -0.685, t.f))),
                  "whole number or a simple fraction"),
        "swapped": (dict(lowres=HR, guide=LR), "swap"),
        "missing": (dict(lowres=str(tmp_path / "nope.tif")), "not found"),
        "corrupt": (dict(guide=str(corrupt)), "cannot read"),
        "zero bands": (dict(bands=[]), "no bands selected"),
        "band name": (dict(bands=["swir"]), "no band described 'swir'"),
        "band index": (dict(bands=[7]), "band 7 does not exist"),
        "complex": (dict(lowres=_variant(tmp_path, "c.tif", dtype="complex64")),
                    "unsupported dtype complex64"),
        "out dtype": (dict(dtype="complex64"), "unsupported output dtype"),
        "method": (dict(method="lanczos"), "unknown method"),
        "nodata guide": (dict(guide=_variant(tmp_path, "g0.tif", src=HR, nodata=7,
                                             data=np.full((1, 600, 600), 7, np.uint16))),
                         "no valid pixel"),
        "nodata lowres": (dict(lowres=_variant(tmp_path, "l0.tif", nodata=-1,
                                               data=np.full((4, 300, 300), -1, np.float32))),
                          "all nodata"),
        "halo": (dict(tile=32, halo=64), "halo"),
    }
    return cases


# (an origin off the guide's lattice is no longer bad input: tests/test_shifted_grids.py)
BAD = ["crs", "crs apart", "no overlap", "scale", "swapped", "missing", "corrupt",
       "zero bands", "band name", "band index", "complex", "out dtype", "method", "nodata guide",
       "nodata lowres", "halo"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    kwargs, message = _bad_cases(inputs)[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    args = dict(lowres=LR, guide=HR, method="gsjbu", iters=1)
    args.update(kwargs)
    lowres, guide = args.pop("lowres"), args.pop("guide")
    with pytest.raises(ValueError, match=message):
        upsample_raster(lowres, guide, str(outdir / "o.tif"), **args)
    assert os.listdir(outdir) == []


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    kwargs, _ = _bad_cases(inputs)["crs"]
    out = str(tmp_path / "o.tif")
    res = CliRunner().invoke(app, ["upsample", kwargs["lowres"], HR, "-o", out])
    assert res.exit_code == 2
    assert "error:" in res.output and "gdalwarp" in res.output
    assert "Traceback" not in res.output and not os.path.exists(out)


def test_cli_damaged_guide_block_names_the_file_and_gdal_check(tmp_path):
    guide = _variant(tmp_path, "pan.tif", src=HR, tiled=True, blockxsize=256, blockysize=256,
                     compress="deflate")
    damage_block(guide, block=(1, 1))
    out = str(tmp_path / "o.tif")
    res = CliRunner().invoke(app, ["upsample", LR, guide, "-o", out, "--method", "jbu"])
    assert res.exit_code == 2, res.output
    assert "error: cannot read rows" in res.output and f"of {guide}" in res.output
    assert f"gdalinfo -checksum {guide}" in res.output and "IReadBlock failed" in res.output
    assert "Traceback" not in res.output and not os.path.exists(out)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_output_path_that_is_a_directory_is_refused(tmp_path):
    target = tmp_path / "out.tif"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        upsample_raster(LR, HR, str(target), method="bilinear", tile=256, halo=16)
    assert os.listdir(tmp_path) == ["out.tif"] and os.listdir(target) == []


@pytest.mark.parametrize("method", ["nearest", "gsjbu"])
def test_gdal_mask_bands_count_as_nodata(tmp_path, method):
    """Internal per-dataset masks (COGs, ``gdal_translate -mask``) mark nodata as a nodata value
    does: masked guide pixels come out NaN, masked low-res cells are missing (they were read as
    data: gsjbu rendered the masked zeros)."""
    with rasterio.open(LR) as src:
        lr_prof, lr = src.profile, src.read(window=Window(0, 0, 64, 64))
        lr_t = src.window_transform(Window(0, 0, 64, 64))
    with rasterio.open(HR) as src:
        hr_prof, hr = src.profile, src.read(window=Window(0, 0, 128, 128))
        hr_t = src.window_transform(Window(0, 0, 128, 128))
    lr[:, :16, :16] = 0  # what the mask hides
    masked_lr, masked_hr = tmp_path / "lr.tif", tmp_path / "hr.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        for path, prof, data, t, hidden in (
            (masked_lr, lr_prof, lr, lr_t, (slice(0, 16), slice(0, 16))),
            (masked_hr, hr_prof, hr, hr_t, (slice(96, None), slice(96, None))),
        ):
            prof = {**prof, "width": data.shape[2], "height": data.shape[1], "transform": t,
                    "nodata": None, "tiled": True, "blockxsize": 32, "blockysize": 32}
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(data)
                mask = np.full(data.shape[1:], 255, np.uint8)
                mask[hidden] = 0
                dst.write_mask(mask)
    upsample_raster(masked_lr, masked_hr, tmp_path / "o.tif", method=method, iters=3, tile=64,
                    halo=16)  # fmt: skip
    out = read_tif(tmp_path / "o.tif")
    assert np.isnan(out[:, 96:, 96:]).all()  # the guide's masked pixels
    assert np.isfinite(out[:, 40:90, 40:90]).all()
    assert np.isnan(out[:, :20, :20]).all()  # masked cells more than 3 cells from a valid one


# ---- grids that barely overlap, and how the scale is written ----------------------------------
@pytest.fixture(scope="module")
def pan_cells(tmp_path_factory):
    """The real Rotterdam pan (600 x 600 at 0.5 m) as the guide and its 8 x 8 means (75 x 75
    cells of exactly 8 guide pixels) to place around it: ``(guide, cells, guide transform)``."""
    with rasterio.open(HR) as ds:
        g, pan = ds.transform, ds.read().astype(np.float32)
    return HR, pan.reshape(1, 75, 8, 75, 8).mean(axis=(2, 4)), g


@pytest.mark.parametrize("where", ["one column", "three rows"])
def test_lowres_overlapping_the_guide_by_less_than_a_cell_runs(pan_cells, tmp_path, where):
    """A low-res raster reaching one guide column (1/8 of its cells) or three guide rows (3/8)
    into the guide: the guide pixels whose centres lie in its cells get their values, the rest
    is nodata. The CLI used to fail with "need at least one array to concatenate"."""
    guide, cells, g = pan_cells
    if where == "one column":
        origin = (g.c + 599 * g.a, g.f)  # its first column of cells covers guide column 599
        inside = (slice(None), slice(None), slice(599, 600))
        want = np.repeat(cells[:, :, :1], 8, axis=1)
    else:
        origin = (g.c, g.f + 597 * g.e)  # its first row of cells covers guide rows 597-599
        inside = (slice(None), slice(597, 600), slice(None))
        want = np.repeat(cells[:, :1, :], 8, axis=2).repeat(3, axis=1)
    lowres = write_tif(tmp_path / "lr.tif", cells, Affine(8 * g.a, 0, origin[0], 0, 8 * g.e,
                                                          origin[1]), crs=CRS.from_epsg(32631))
    for method in ("nearest", "gsjbu"):
        out = tmp_path / f"{method}.tif"
        res = CliRunner().invoke(app, ["upsample", lowres, guide, "-o", str(out), "-m", method,
                                       "--iters", "2", "-q"])
        assert res.exit_code == 0, res.output
        y = read_tif(out)
        assert y.shape == (1, 600, 600)
        valid = np.zeros(y.shape, bool)
        valid[inside] = True
        np.testing.assert_array_equal(np.isfinite(y), valid)
        if method == "nearest":
            np.testing.assert_array_equal(y[inside], want)


def test_scale_tag_is_x_by_y(pan_cells, tmp_path):
    """Cells 8 guide pixels wide and 4 high: the tag reads "8x4" (width by height, as GDAL
    writes sizes), as a square scale reads "8x8"."""
    guide, cells, g = pan_cells
    tall = np.repeat(cells, 2, axis=1)  # 150 rows of 4 guide pixels, 75 columns of 8
    for name, data, sy in (("wide.tif", tall, 4), ("square.tif", cells, 8)):
        lowres = write_tif(tmp_path / name, data, Affine(8 * g.a, 0, g.c, 0, sy * g.e, g.f),
                           crs=CRS.from_epsg(32631))
        out = tmp_path / f"o_{name}"
        upsample_raster(lowres, guide, out, method="nearest")
        with rasterio.open(out) as ds:
            assert ds.tags()["geoupsample_scale"] == f"8x{sy}"
        np.testing.assert_array_equal(read_tif(out)[0], np.kron(cells[0], np.ones((8, 8))))
