"""Time series: each date's kernels fitted from the date before (geoupsample.core.series), over
whole scenes (geoupsample.time_series, ``upsample --series``) and DataArrays with a time
dimension, on the bundled NAIP dates (real acquisitions of one place, 2010-2020)."""

from __future__ import annotations

import json
import os
from importlib.resources import files

import numpy as np
import pytest
import rasterio
import rioxarray
import torch
import xarray as xr
from rasterio.enums import Resampling
from typer.testing import CliRunner

import geoupsample as gu
from geoupsample.cli import app
from geoupsample.core.series import WARM_BLEND, WARM_ITERS, stable_weight, warm_start
from geoupsample.inputs import InputError, scene_guide_stats
from geoupsample.pipeline import upsample_raster
from geoupsample.time_series import SeriesDate, read_pairs, upsample_series
from geoupsample.xarray import upsample as xr_upsample
from tests.test_features_segment_options import interrupt_after

DATA = files("geoupsample") / "data"
DATES = ("20100629", "20140720", "20170827", "20200831")
NAIP = [str(DATA / f"naip_{d}.tif") for d in DATES]
S = 8  # NIR at 40 m, guided by RGB at 5 m
RUN = dict(tile=96, halo=32, blocksize=16, iters=20, warm_iters=10)


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[SeriesDate]:
    """Each bundled date's RGB (the guide, 5 m) and its NIR averaged to 40 m (the low-res
    raster), as GeoTIFFs."""
    d = tmp_path_factory.mktemp("series")
    out = []
    for date, path in zip(DATES, NAIP, strict=True):
        with rasterio.open(path) as ds:
            prof = {**ds.profile, "blockxsize": 16, "blockysize": 16}
            rgb = ds.read([1, 2, 3])
            nir = ds.read([4], out_shape=(1, ds.height // S, ds.width // S),
                          resampling=Resampling.average).astype(np.float32)  # fmt: skip
            lr_transform = ds.transform * ds.transform.scale(S, S)
        guide = str(d / f"rgb_{date}.tif")
        with rasterio.open(guide, "w", **{**prof, "count": 3}) as o:
            o.write(rgb)
        lowres = str(d / f"nir_{date}.tif")
        with rasterio.open(lowres, "w", **{**prof, "count": 1, "dtype": "float32",
                                           "width": nir.shape[2], "height": nir.shape[1],
                                           "transform": lr_transform}) as o:  # fmt: skip
            o.write(nir)
            o.set_band_description(1, "nir")
        out.append(SeriesDate(lowres, guide, f"{date[:4]}-{date[4:6]}-{date[6:]}"))
    return out


def arrays(dates: list[SeriesDate]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(guides [3, H, W] in 0-1, low-res NIR [1, h, w] in 0-1, true NIR [1, H, W] in 0-1)."""
    guides = [read(d.guide).astype(np.float32) / 255 for d in dates]
    lows = [read(d.lowres) / 255 for d in dates]
    truths = [read(p)[3:4].astype(np.float32) / 255 for p in NAIP]
    return guides, lows, truths


# --- the core: init= and fit_series ----------------------------------------------------------


def test_fit_from_init_starts_at_the_given_kernels(series) -> None:
    guides, lows, _ = arrays(series)
    shape = lows[0].shape[-2:]
    first = gu.fit(guides[0], shape, iters=10)
    again = gu.fit(guides[1], shape, iters=0, init=first)
    torch.testing.assert_close(again.params, first.params.to(again.params.dtype))
    from_raw = gu.fit(guides[1], shape, iters=0, init=first.params.numpy())
    torch.testing.assert_close(from_raw.params, again.params)
    moved = gu.fit(guides[1], shape, iters=5, init=first)
    assert not torch.equal(moved.params, again.params)  # the steps start there and move on


def test_fit_refuses_init_of_another_grid(series) -> None:
    guides, lows, _ = arrays(series)
    k = gu.fit(guides[0], lows[0].shape[-2:], iters=0)
    with pytest.raises(ValueError, match=r"\(30, 30\) low-res grid.*\(15, 15\)"):
        gu.fit(guides[0], (15, 15), iters=0, init=k)
    bad = k.params.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gu.fit(guides[0], lows[0].shape[-2:], init=bad)


def test_warm_start_lies_halfway_from_the_initial_kernels(series) -> None:
    guides, lows, _ = arrays(series)
    k = gu.fit(guides[0], lows[0].shape[-2:], iters=10)
    initial = gu.fit(guides[0], lows[0].shape[-2:], iters=0).params
    torch.testing.assert_close(warm_start(k, blend=1.0), k.params)
    torch.testing.assert_close(warm_start(k, blend=0.0), initial.to(k.params.dtype))
    torch.testing.assert_close(warm_start(k), initial + WARM_BLEND * (k.params - initial))


def test_fit_series_reaches_the_scratch_quality_in_fewer_steps(series) -> None:
    """On real later dates, 25 warm steps rebuild NIR at least as well as 25 steps from the
    initial kernels, and better than bilinear (the figures of benchmarks/series.py)."""
    guides, lows, truths = arrays(series)
    shape = lows[0].shape[-2:]
    stats = gu.guide_stats(np.concatenate(guides, 2))
    warm = gu.fit_series(guides, shape, normalize=stats)
    scratch = [gu.fit(g, shape, iters=WARM_ITERS, normalize=stats) for g in guides]
    for k in warm:
        assert k.params.shape == (4, *shape)
    q_warm = [psnr(np.asarray(k.render(x)), t) for k, x, t in zip(warm, lows, truths, strict=True)]
    q_scratch = [psnr(np.asarray(k.render(x)), t)
                 for k, x, t in zip(scratch, lows, truths, strict=True)]  # fmt: skip
    q_bilinear = [psnr(np.asarray(gu.upsample(x, g, method="bilinear")), t)
                  for x, g, t in zip(lows, guides, truths, strict=True)]  # fmt: skip
    assert np.mean(q_warm[1:]) >= np.mean(q_scratch[1:]) - 0.05
    assert np.mean(q_warm) > np.mean(q_bilinear) + 0.5


# --- whole scenes ----------------------------------------------------------------------------


def test_series_writes_a_date_per_output_with_its_tags(series, tmp_path) -> None:
    pattern = str(tmp_path / "nir_{date}.tif")
    report = upsample_series(series, pattern, **RUN)
    paths = [pattern.format(date=d.date) for d in series]
    assert report.extra["paths"] == paths
    for d, p in zip(series, paths, strict=True):
        with rasterio.open(p) as ds, rasterio.open(d.guide) as g:
            assert (ds.crs, ds.transform, ds.shape) == (g.crs, g.transform, g.shape)
            tags = ds.tags()
            assert tags["geoupsample_guide"] == os.path.basename(d.guide)
            assert tags["geoupsample_date"] == d.date
            assert json.loads(tags["geoupsample_series"])["warm_iters"] == RUN["warm_iters"]
            assert ds.descriptions == ("nir",)
    _, _, truths = arrays(series)
    outs = [read(p) / 255 for p in paths]
    bilinear = []
    for d in series:
        out = str(tmp_path / f"bl_{d.date}.tif")
        upsample_raster(d.lowres, d.guide, out, method="bilinear", tile=96, halo=32,
                        blocksize=16)  # fmt: skip
        bilinear.append(read(out) / 255)
    for o, b, t in zip(outs, bilinear, truths, strict=True):  # better than bilinear every date
        assert psnr(o, t) > psnr(b, t) + 0.3


def test_series_first_date_is_a_plain_run_and_later_dates_the_core_series(series,
                                                                          tmp_path) -> None:
    """One tile: the scene path's first date is exactly upsample_raster's, and every date the
    core's fit_series rendered (each date normalised by its own scene statistics)."""
    one_tile = dict(tile=256, halo=32, blocksize=16, iters=20)
    report = upsample_series(series, str(tmp_path / "s_{index}.tif"), warm_iters=10,
                             **one_tile)  # fmt: skip
    assert report.computed == 1
    plain = str(tmp_path / "plain.tif")
    upsample_raster(series[0].lowres, series[0].guide, plain, **one_tile)
    np.testing.assert_array_equal(read(tmp_path / "s_1.tif"), read(plain))
    _, lows, _ = arrays(series)
    kernels, stats, raw = [], [], []
    for d in series:
        stats.append(scene_guide_stats(d.guide))
        raw.append(read(d.guide).astype(np.float32))
        if not kernels:
            kernels.append(gu.fit(raw[-1], lows[0].shape[-2:], iters=20, normalize=stats[-1]))
        else:
            kernels.append(gu.fit(raw[-1], lows[0].shape[-2:], iters=10, normalize=stats[-1],
                                  init=warm_start(kernels[-1])))  # fmt: skip
    expected = gu.render_series(kernels, [read(d.lowres) for d in series], raw, stats)
    for i, e in enumerate(expected, 1):
        np.testing.assert_allclose(read(tmp_path / f"s_{i}.tif"), e, atol=2e-3)


def test_carry_forward_changes_an_unchanged_image_as_bilinear_does(series) -> None:
    """Where the guide has not changed, a date's output is the date before's plus the
    bilinear change of the low-res raster; where it has, the date's own render."""
    guides, lows, _ = arrays(series)
    shape = lows[0].shape[-2:]
    same = [guides[0], guides[0].copy()]
    changed = guides[0].copy()
    changed[:, :120] = guides[1][:, :120]  # the top half from another date
    x1 = lows[1]
    kernels = gu.fit_series([guides[0], changed], shape, iters=10, warm_iters=5)
    outs = gu.render_series([kernels[0], kernels[0]], [lows[0], x1], same)
    bilinear = [np.asarray(gu.upsample(x, guides[0], method="bilinear")) for x in (lows[0], x1)]
    np.testing.assert_allclose(outs[1] - outs[0], bilinear[1] - bilinear[0], atol=1e-5)
    assert np.abs(outs[1] - np.asarray(kernels[0].render(x1))).max() > 0.05  # not the render

    outs = gu.render_series(kernels, [lows[0], x1], [guides[0], changed])
    alone = np.asarray(kernels[1].render(x1))
    weight = stable_weight(guides[0], changed)
    moved = weight < 1e-3
    assert moved[:120].mean() > 0.02 and not moved[120:].any() and weight[120:].min() == 1.0
    np.testing.assert_allclose(outs[1][:, moved], alone[:, moved], atol=1e-3)
    np.testing.assert_allclose(outs[1][:, 120:] - outs[0][:, 120:],
                               bilinear[1][:, 120:] - bilinear[0][:, 120:], atol=1e-5)
    off = gu.render_series(kernels, [lows[0], x1], [guides[0], changed], tolerance=0)
    np.testing.assert_array_equal(off[1], alone)


def test_stable_weight() -> None:
    g = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(stable_weight(g, g), np.ones((8, 8), np.float32))
    h = g.copy()
    h[1, 2, 3] += 0.5
    h[0, 4, 4] = np.nan
    w = stable_weight(g, h, gu.GuideStats(lo=[0, 0, 0], hi=[1, 1, 1]), tolerance=0.25)
    assert w[2, 3] == pytest.approx(np.exp(-4), rel=1e-5) and w[4, 4] == 0
    assert (stable_weight(g, h, tolerance=0) == 0).all()


def test_series_stacked_output_and_resume(series, tmp_path) -> None:
    out = str(tmp_path / "stack.tif")
    upsample_series(series, out, **RUN)
    with rasterio.open(out) as ds:
        assert ds.count == len(series)
        assert ds.descriptions == tuple(f"{os.path.splitext(os.path.basename(d.lowres))[0]}:nir"
                                        for d in series)  # fmt: skip
    whole = read(out)
    again = str(tmp_path / "again.tif")
    with pytest.raises(KeyboardInterrupt):
        upsample_series(series, again, progress=interrupt_after(again, 2), **RUN)
    assert not os.path.exists(again)
    report = upsample_series(series, again, resume=True, **RUN)
    assert report.skipped > 0
    np.testing.assert_array_equal(read(again), whole)


def test_series_pairs_file_and_cli(series, tmp_path) -> None:
    pairs = tmp_path / "pairs.csv"
    lines = ["date,lowres,guide", "# the four bundled dates, given out of order"]
    for d in reversed(series):  # relative paths, resolved against the file's folder
        lines.append(f"{d.date},{os.path.relpath(d.lowres, tmp_path)},"
                     f"{os.path.relpath(d.guide, tmp_path)}")
    pairs.write_text("\n".join(lines) + "\n\n")
    assert read_pairs(pairs) == series  # sorted by date
    out = tmp_path / "cli_{date}.tif"
    result = CliRunner().invoke(app, ["upsample", "--series", str(pairs), "-o", str(out),
                                      "--tile", "96", "--halo", "32", "--blocksize", "16",
                                      "--iters", "20", "--warm-iters", "10", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = str(tmp_path / "api_{date}.tif")
    upsample_series(series, expected, **RUN)
    for d in series:
        np.testing.assert_array_equal(read(str(out).format(date=d.date)),
                                      read(expected.format(date=d.date)))  # fmt: skip


def test_series_refuses_bad_input(series, tmp_path) -> None:
    shifted = str(tmp_path / "shifted.tif")
    with rasterio.open(series[1].guide) as ds:
        prof = {**ds.profile, "transform": ds.transform * ds.transform.translation(1, 0)}
        data = ds.read()
    with rasterio.open(shifted, "w", **prof) as o:
        o.write(data)
    bad = [series[0], SeriesDate(series[1].lowres, shifted, series[1].date)]
    with pytest.raises(InputError, match=r"share one grid.*rgb_20100629.*shifted\.tif.*warp"):
        upsample_series(bad, str(tmp_path / "o_{date}.tif"), **RUN)
    with pytest.raises(InputError, match="given twice"):
        upsample_series([series[0], SeriesDate(series[1].lowres, series[1].guide,
                                               series[0].date)], str(tmp_path / "x.tif"))
    with pytest.raises(InputError, match="some dates of the series have a date"):
        upsample_series([series[0], (series[1].lowres, series[1].guide)], str(tmp_path / "x"))
    with pytest.raises(InputError, match="holds \\{date\\}, but the rasters have no dates"):
        upsample_series([(d.lowres, d.guide) for d in series], str(tmp_path / "o_{date}.tif"))
    pairs = tmp_path / "bad.csv"
    pairs.write_text(f"{series[0].lowres}\n")
    with pytest.raises(InputError, match="line 1 .* is not date,lowres,guide"):
        read_pairs(pairs)
    result = CliRunner().invoke(app, ["upsample", "--series", str(tmp_path / "missing.csv"),
                                      "-o", str(tmp_path / "o.tif")])  # fmt: skip
    assert result.exit_code == 2 and "cannot read the pairs file" in result.output
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o_")]


# --- xarray ----------------------------------------------------------------------------------


def _stack(paths: list[str], dates: list[str]) -> xr.DataArray:
    arrays = [rioxarray.open_rasterio(p, chunks={"x": 128, "y": 128}) for p in paths]
    stack = xr.concat(arrays, dim="time").assign_coords(time=np.array(dates, "datetime64[ns]"))
    return stack.rio.write_crs(arrays[0].rio.crs).rio.write_transform(arrays[0].rio.transform())


def test_xarray_series_matches_the_scene_path(series, tmp_path) -> None:
    dates = [d.date for d in series]
    lowres = _stack([d.lowres for d in series], dates)
    guides = _stack([d.guide for d in series], dates)
    hr = xr_upsample(lowres, guides, tile=96, halo=32, blocksize=16, iters=20, warm_iters=10)
    assert hr.dims == ("time", "band", "y", "x") and hr.sizes["time"] == len(series)
    assert hr.chunks is not None  # lazy
    assert json.loads(hr.attrs["geoupsample_series"])["warm_iters"] == 10
    pattern = str(tmp_path / "f_{index}.tif")
    upsample_series(series, pattern, **RUN)
    for i in range(len(series)):
        np.testing.assert_allclose(hr.isel(time=i).values, read(pattern.format(index=i + 1)),
                                   atol=1e-5)  # fmt: skip
    with pytest.raises(InputError, match="same 'time' dimension"):
        xr_upsample(lowres.isel(time=0), guides)
    with pytest.raises(InputError, match="different values"):
        xr_upsample(lowres, guides.isel(time=[0, 1, 3, 2]))


def test_series_scene_keeps_an_unchanged_image_consistent(series, tmp_path) -> None:
    """The temporal-consistency criterion on the scene path: two dates with the same image and
    different low-res rasters change by exactly bilinear's change; with stable_tolerance=0 by
    other amounts (each date's own detail)."""
    same = [series[0], SeriesDate(series[1].lowres, series[0].guide, series[1].date)]
    upsample_series(same, str(tmp_path / "c_{index}.tif"), **RUN)
    upsample_series(same, str(tmp_path / "off_{index}.tif"), stable_tolerance=0, **RUN)
    for i, d in enumerate(same, 1):
        upsample_raster(d.lowres, d.guide, str(tmp_path / f"b_{i}.tif"), method="bilinear",
                        tile=96, halo=32, blocksize=16)  # fmt: skip
    change = {k: read(tmp_path / f"{k}_2.tif") - read(tmp_path / f"{k}_1.tif")
              for k in ("c", "off", "b")}  # fmt: skip
    np.testing.assert_allclose(change["c"], change["b"], atol=0.05)  # 0-255 NIR values
    assert np.abs(change["off"] - change["b"]).mean() > 1.0  # each date's own detail


def test_series_on_a_dask_cluster_with_an_aoi_equals_local(series, tmp_path) -> None:
    """The whole series job (every date's guide, warm fits, carry-forward) on dask.distributed
    workers gives the local pixels; an AOI leaves nodata outside it on every date."""
    import sys

    from distributed import Client, LocalCluster
    from shapely.geometry import box

    with rasterio.open(series[0].guide) as ds:
        b = ds.bounds
    aoi = box(b.left, b.bottom, (b.left + b.right) / 2, b.top)  # the west half
    run = dict(RUN, aoi=aoi)
    # one thread, as each worker has: the same float sums
    upsample_series(series, str(tmp_path / "local_{index}.tif"), threads=1, **run)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        client.run(sys.path.insert, 0, root)
        upsample_series(series, str(tmp_path / "dist_{index}.tif"), scheduler=client, **run)
    for i in range(1, len(series) + 1):
        local = read(tmp_path / f"local_{i}.tif")
        np.testing.assert_allclose(read(tmp_path / f"dist_{i}.tif"), local, atol=1e-4)
        with rasterio.open(tmp_path / f"local_{i}.tif") as ds:
            outside = ds.read_masks(1)[:, 140:]
            inside = ds.read_masks(1)[:, :100]
        assert (outside == 0).all() and (inside == 255).all()
