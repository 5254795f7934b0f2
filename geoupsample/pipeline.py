"""Whole-raster guided upsampling on top of the :mod:`tiling` engine.

:func:`upsample_raster` upsamples a georeferenced low-res raster onto the grid of a
high-resolution guide, tile by tile, into one GeoTIFF/COG.

Grid rules (checked before anything is written):

* Both rasters must be in the same CRS. Rasters in different CRSs are **refused** (not silently
  reprojected): resampling the low-res raster is a modelling choice (nearest for classes, average
  for probabilities...) that the user should make; the error message gives a ``gdalwarp`` command
  that puts the low-res raster on a grid nesting with the guide's.
* The grids must nest: north-up, the low-res pixel an integer multiple ``s`` of the guide pixel
  (per axis) and the low-res origin on the guide's pixel lattice (tolerance: 0.25 guide pixels of
  accumulated misfit across the scene).
* The output covers the guide's grid (its CRS and transform); pixels outside the low-res
  raster's footprint, outside the AOI, or where the guide is nodata are nodata.

Guide normalisation uses scene-wide statistics (:func:`scene_guide_stats`) passed to every
tile's fit, so tiles agree and no seams appear.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.enums
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.transform import array_bounds
from rasterio.windows import Window, from_bounds

import geoupsample as gu
import tiling
import tiling.writer
from geoupsample.core import presets
from geoupsample.core.allocator import tune_allocator
from geoupsample.core.kernels import render_overrides
from geoupsample.core.self_guidance import robust_span
from geoupsample.workers import (
    available_cores,
    check_device,
    check_workers,
    threads_per_worker,
)
from tiling.execute import gdal_env
from tiling.reader import to_float

#: Interpolating methods: no fit, the guide only masks nodata.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
#: Largest side of the regular subsample used for the scene-wide guide statistics (1024^2 =
#: about the 1M samples per band that ``gu.guide_stats`` uses at most).
STATS_SIDE = 1024
SUPPORTED_INPUT_KINDS = "biuf"


class InputError(ValueError):
    """A problem with the inputs or parameters; the message says what and how to fix it."""


@dataclass(frozen=True)
class GridRelation:
    """How a low-res grid sits on a high-res (guide) grid.

    Attributes:
        scale: ``(sy, sx)`` guide pixels per low-res pixel (integers).
        offset: ``(row, col)`` guide pixel where low-res pixel ``(0, 0)`` starts (may be < 0).
        region: the guide window covered by the low-res raster (clipped to the guide).
    """

    scale: tuple[int, int]
    offset: tuple[int, int]
    region: Window


def relate_grids(lr_crs: CRS | None, lr_transform: Affine, lr_shape: tuple[int, int],
                 hr_crs: CRS | None, hr_transform: Affine, hr_shape: tuple[int, int],
                 tolerance: float = 0.25) -> GridRelation:
    """Check that the low-res grid nests in the guide grid; raise :class:`InputError` if not.

    Args:
        lr_shape, hr_shape: ``(rows, cols)``.
        tolerance: allowed misfit in guide pixels (origin, and scale error accumulated across
            the low-res raster).
    """
    if (lr_crs is None) != (hr_crs is None):
        which = "low-res raster" if lr_crs is None else "guide"
        raise InputError(f"the {which} has no CRS; both rasters need one (assign it with "
                         "`gdal_edit.py -a_srs EPSG:XXXX file.tif`)")
    if lr_crs is not None and CRS.from_user_input(lr_crs) != CRS.from_user_input(hr_crs):
        raise InputError(_crs_message(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform))
    for name, t in (("low-res raster", lr_transform), ("guide", hr_transform)):
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            raise InputError(f"the {name} is not north-up (transform {tuple(t)[:6]}); warp it "
                             "to a north-up grid first (gdalwarp)")
    lr_b = array_bounds(lr_shape[0], lr_shape[1], lr_transform)  # (west, south, east, north)
    hr_b = array_bounds(hr_shape[0], hr_shape[1], hr_transform)
    if not (lr_b[0] < hr_b[2] and hr_b[0] < lr_b[2] and lr_b[1] < hr_b[3] and hr_b[1] < lr_b[3]):
        raise InputError(f"the low-res raster and the guide do not overlap (low-res bounds "
                         f"{tuple(round(v, 3) for v in lr_b)}, guide bounds "
                         f"{tuple(round(v, 3) for v in hr_b)}, both in {hr_crs})")
    sy_f, sx_f = lr_transform.e / hr_transform.e, lr_transform.a / hr_transform.a
    sy, sx = round(sy_f), round(sx_f)
    h, w = lr_shape
    if sy_f < 0.9 and sx_f < 0.9:
        raise InputError(
            f"the low-res raster's pixel ({lr_transform.a:g}) is smaller than the guide's "
            f"({hr_transform.a:g}): did you swap LOWRES and GUIDE? The guide is the "
            "high-resolution image")
    if sy < 1 or sx < 1 or abs(sy_f - sy) * h > tolerance or abs(sx_f - sx) * w > tolerance:
        raise InputError(
            f"the grids do not nest: a low-res pixel is {sx_f:.4f} x {sy_f:.4f} guide pixels; it "
            "must be a whole number (e.g. 10 m on 2.5 m = 4). Resample the low-res raster to a "
            "multiple of the guide's pixel size (gdalwarp -tr ... -tap)")
    col_f, row_f = ~hr_transform * (lr_transform.c, lr_transform.f)
    oy, ox = round(row_f), round(col_f)
    if abs(row_f - oy) > tolerance or abs(col_f - ox) > tolerance:
        raise InputError(
            f"the grids do not nest: the low-res raster's origin falls at guide pixel "
            f"({row_f:.3f}, {col_f:.3f}), not on a pixel corner; warp the low-res raster onto "
            "the guide's pixel lattice (gdalwarp -te/-tr aligned to the guide)")
    r0, c0 = max(0, oy), max(0, ox)
    r1, c1 = min(hr_shape[0], oy + h * sy), min(hr_shape[1], ox + w * sx)
    if r1 <= r0 or c1 <= c0:
        raise InputError("the low-res raster and the guide do not overlap")
    return GridRelation((sy, sx), (oy, ox), Window(c0, r0, c1 - c0, r1 - r0))


def _crs_message(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int], hr_crs: Any,
                 hr_transform: Affine) -> str:
    from rasterio.warp import transform_bounds

    msg = (f"the low-res raster is in {lr_crs} but the guide is in {hr_crs}; geoupsample does "
           "not reproject (the right resampling depends on what the raster holds). Warp the "
           "low-res raster onto a grid nesting with the guide's first")
    try:
        h, w = lr_shape
        left, bottom, right, top = transform_bounds(
            lr_crs, hr_crs, lr_transform.c, lr_transform.f + h * lr_transform.e,
            lr_transform.c + w * lr_transform.a, lr_transform.f)
        res = hr_transform.a
        s = max(1, round(((right - left) / w) / res))
        step = s * res
        x0 = hr_transform.c + math.floor((left - hr_transform.c) / step) * step
        y1 = hr_transform.f - math.floor((hr_transform.f - top) / step) * step
        x1 = x0 + math.ceil((right - x0) / step) * step
        y0 = y1 - math.ceil((y1 - bottom) / step) * step
        msg += (f", e.g.: gdalwarp -t_srs {CRS.from_user_input(hr_crs).to_string()} "
                f"-tr {step:g} {step:g} -te {x0:.6f} {y0:.6f} {x1:.6f} {y1:.6f} "
                "-r average LOWRES.tif lowres_on_guide.tif")
    except Exception:  # noqa: BLE001 - the hint is optional
        pass
    return msg


def _open(path: str | os.PathLike, what: str) -> rasterio.io.DatasetReader:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        raise InputError(f"cannot read the {what} {path}: not a raster GDAL can open ({err})"
                         ) from err


def select_bands(ds: rasterio.io.DatasetReader, bands: Sequence[int | str] | None,
                 what: str) -> tuple[int, ...]:
    """1-based band indexes from indexes (1-based ints or digit strings) or band descriptions."""
    if ds.count == 0:
        raise InputError(f"the {what} has no bands")
    if bands is None:
        return tuple(range(1, ds.count + 1))
    if len(bands) == 0:
        raise InputError(f"no bands selected from the {what}; pass band indexes (1-based) or "
                         "descriptions")
    out = []
    descs = [d or "" for d in ds.descriptions]
    for b in bands:
        if isinstance(b, str) and not b.strip().isdigit():
            if b not in descs:
                raise InputError(f"the {what} has no band described {b!r}; its bands are "
                                 f"{', '.join(repr(d) for d in descs)}")
            out.append(descs.index(b) + 1)
        else:
            i = int(b)
            if not 1 <= i <= ds.count:
                raise InputError(f"band {i} does not exist in the {what} (it has {ds.count} "
                                 "bands, numbered from 1)")
            out.append(i)
    return tuple(out)


def _check_dtype(ds: rasterio.io.DatasetReader, indexes: Sequence[int], what: str) -> None:
    for i in indexes:
        dt = np.dtype(ds.dtypes[i - 1])
        if dt.kind not in SUPPORTED_INPUT_KINDS or dt.kind == "b":
            raise InputError(f"band {i} of the {what} has unsupported dtype {dt.name}; use "
                             "integer or floating-point bands (e.g. split complex data)")


def decimated_stats_sample(read: Callable[[Window], np.ndarray], height: int, width: int,
                           side: int = STATS_SIDE) -> np.ndarray:
    """A regular subsample ``[:, ::k, ::k]`` (``k = ceil(max(H, W) / side)``) of a raster read
    window by window by ``read(window) -> float32 [bands, rows, cols]`` (NaN = nodata).

    Windows are at most about 256 x 2048 pixels, so memory does not grow with the raster."""
    k = max(1, math.ceil(max(height, width) / side))
    stripe, chunk = k * max(1, 256 // k), k * max(1, 2048 // k)  # multiples of k: one lattice
    rows = []
    for r0 in range(0, height, stripe):
        h = min(height, r0 + stripe) - r0
        # copies, not strided views that would keep whole windows alive
        cols = [np.ascontiguousarray(read(Window(c0, r0, min(width, c0 + chunk) - c0, h))
                                     [:, ::k, ::k]) for c0 in range(0, width, chunk)]
        rows.append(np.concatenate(cols, axis=2))
    return np.concatenate(rows, axis=1)


def scene_guide_stats(path: str | os.PathLike, bands: Sequence[int] | None = None,
                      nodata: float | None = None) -> gu.GuideStats:
    """Scene-wide guide statistics from a regular subsample of the whole guide file.

    Reads the file stripe by stripe (bounded memory). Raises :class:`InputError` if the guide
    has no valid pixel.
    """
    with gdal_env(), _open(path, "guide") as ds:  # bounded GDAL cache while scanning
        idx = list(bands) if bands else list(range(1, ds.count + 1))
        nd = nodata if nodata is not None else ds.nodata

        def read(window: Window) -> np.ndarray:
            return to_float(ds.read(idx, window=window), nd)

        sample = decimated_stats_sample(read, ds.height, ds.width)
    return _stats(sample, str(path))


def array_guide_stats(array: Any, nodata: float | None, name: str) -> gu.GuideStats:
    """:func:`scene_guide_stats` of an array ``[bands, H, W]`` (numpy, dask or anything that
    slices like one), from the same regular subsample, read window by window."""

    def read(window: Window) -> np.ndarray:
        return to_float(np.asarray(array[(slice(None), *window.toslices())]), nodata)

    return _stats(decimated_stats_sample(read, int(array.shape[1]), int(array.shape[2])), name)


def _stats(sample: np.ndarray, name: str) -> gu.GuideStats:
    if not np.isfinite(sample).all(0).any():
        raise InputError(f"the guide {name} has no valid pixel (all nodata): nothing to "
                         "upsample; check its nodata value")
    return gu.guide_stats(sample)


class UpsampleTile:
    """The per-tile job: upsample the tile's low-res window onto its guide window.

    Picklable (for dask.distributed). ``ctx.data`` holds ``"lowres"`` ``[C, h, w]`` and
    ``"guide"`` ``[d, H, W]`` float32 with NaN for nodata; returns float32 ``[C, H, W]`` or None
    when the guide tile is entirely nodata (the tile is skipped).
    """

    def __init__(self, method: str, stats: gu.GuideStats | None, iters: int = 50,
                 radius: int = 3, device: str | None = None, seed: int = 0,
                 render: dict[str, Any] | None = None) -> None:
        self.method, self.stats, self.iters = method, stats, iters
        self.radius, self.device, self.seed = radius, device, seed
        #: rendering arguments of gu.upsample (``kind``, ``consistency``, ...), scene-wide
        self.render = dict(render or {})

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        x = ctx.data["lowres"]
        g = ctx.data.get("guide")
        if g is None:  # interpolation with a guide that cannot hold nodata: only its shape
            g = np.zeros((1, int(ctx.window.height), int(ctx.window.width)), np.float32)
        if not np.isfinite(g).all(0).any() or not np.isfinite(x).any():
            return None
        if self.method in INTERPOLATIONS:
            out = gu.upsample(x, g, method=self.method, **self.render)
        else:
            out = gu.upsample(x, g, method=self.method, iters=self.iters, radius=self.radius,
                              device=self.device, seed=self.seed, normalize=self.stats,
                              **self.render)
        return np.asarray(out, dtype=np.float32)


def _any_valid(ds: rasterio.io.DatasetReader, indexes: Sequence[int], window: Window,
               every_band: bool) -> bool:
    """Whether ``window`` of ``ds`` holds a valid pixel; reads block by block, stops early."""
    win = window.round_offsets().round_lengths()
    for _, bw in ds.block_windows(1):
        try:
            part = bw.intersection(win)
        except rasterio.errors.WindowError:
            continue
        v = np.isfinite(to_float(ds.read(list(indexes), window=part), ds.nodata))
        if (v.all(0) if every_band else v.any(0)).any():
            return True
    return False


def upsample_raster(
    lowres_path: str | os.PathLike,
    guide_path: str | os.PathLike,
    out_path: str | os.PathLike,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 1024,
    halo: int = 64,
    bands: Sequence[int | str] | None = None,
    guide_bands: Sequence[int | str] | None = None,
    aoi: Any = None,
    aoi_crs: Any = None,
    cog: bool = False,
    dtype: str | None = None,
    compress: str = "deflate",
    blocksize: int = 256,
    device: str | None = None,
    resume: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    blend: str = "taper",
    seed: int = 0,
    kind: str = "auto",
    consistency: float | None = None,
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
    progress: Callable[[tiling.Progress], None] | None = None,
) -> tiling.RunReport:
    """Upsample the low-res raster at ``lowres_path`` onto the grid of ``guide_path``.

    Args:
        lowres_path: georeferenced low-res raster (probabilities, features, a coarse band,
            elevation...), any number of bands, integer or float.
        guide_path: the high-resolution guide (e.g. multispectral image) in the **same CRS**;
            its pixel must divide the low-res pixel (integer scale) and the origins must lie on
            its pixel lattice. Rasters in other CRSs are refused (see the module docstring).
        out_path: output GeoTIFF (COG with ``cog=True``); written atomically.
        method: ``gsjbu`` | ``jbu`` | ``bilinear`` | ``bicubic`` | ``nearest``.
        iters, radius, seed: GSJBU fit parameters (``iters`` Adam steps per tile; ``radius`` in
            low-res pixels).
        tile, halo: core tile size and context/blend width in guide pixels. Cores are aligned to
            the scale. For an exact match with a whole-array run of a local method the taper
            needs ``halo >= 2 x support`` (``blend="crop"``: ``halo >= support``); the support
            is about ``2 x scale`` guide pixels for bilinear/bicubic and
            ``(radius + 1) x scale + 1`` for jbu/gsjbu (so the default halo 64 is exact with the
            taper for bilinear up to scale 16 and jbu up to scale 7; at larger scales raise the
            halo, or the tiles differ from a whole-array run by tiny amounts in the ramps).
        bands: low-res bands to upsample (1-based indexes or descriptions; default all).
        guide_bands: guide bands to use (default all).
        aoi, aoi_crs: area of interest (shapely geometry or GeoJSON file/dict) and its CRS.
        cog: write a Cloud-Optimized GeoTIFF (overviews built from the finished file).
        dtype: output dtype (default: the low-res dtype; float64 becomes float32). Integer
            outputs are rounded and clipped.
        compress, blocksize: GeoTIFF compression (deflate/zstd/lzw/none) and block size.
        device: torch device for the fits (``cpu``/``cuda``; default CUDA when available).
        resume: continue an interrupted run with the same inputs and parameters.
        scheduler: dask.distributed ``Client`` or scheduler address (default: local threads).
        workers: tiles computed at once by local threads (default: all cores for
            interpolations; 1 for fits, which use every core through torch's threads). With
            more fits at once each gets ``cores // workers`` torch threads and its own working
            memory (about 0.6 GB per 1024 px gsjbu tile): see :mod:`geoupsample.workers`.
        blend: ``taper`` or ``crop``.
        kind: ``continuous``, ``probabilities`` or ``auto`` (jbu/gsjbu render defaults, see
            :meth:`geoupsample.Kernels.render`): ``auto`` decides once for the whole scene,
            from a decimated read of the low-res raster (float probabilities in [0, 1] that
            sum to 1; scaled integer probabilities count as continuous: convert them to float).
        consistency: back-projection rounds (default: the kind's; 0 for interpolations).
        self_guidance, min_sigma_r: jbu/gsjbu render overrides (default: the kind's; see
            :meth:`geoupsample.Kernels.render`); ``consistency=0, min_sigma_r=0`` is the sharp
            render of probabilities.
        progress: callback receiving :class:`tiling.Progress` after each tile.

    Returns:
        :class:`tiling.RunReport`. The output has the guide's CRS and transform, nodata (the
        low-res nodata when it fits the dtype, else NaN / the dtype's max), the low-res band
        descriptions, and tags recording the method, parameters and package version.
    """
    tune_allocator()  # the fits' large temporaries: see geoupsample.core.allocator
    check_workers(workers)
    check_device(device, local=scheduler is None)
    with gdal_env():  # GDAL's block cache stays bounded during the checks and the run
        return _upsample_raster(
            lowres_path, guide_path, out_path, method=method, iters=iters, radius=radius,
            tile=tile, halo=halo, bands=bands, guide_bands=guide_bands, aoi=aoi,
            aoi_crs=aoi_crs, cog=cog, dtype=dtype, compress=compress, blocksize=blocksize,
            device=device, resume=resume, scheduler=scheduler, workers=workers, blend=blend,
            seed=seed, kind=kind, consistency=consistency, self_guidance=self_guidance,
            min_sigma_r=min_sigma_r, progress=progress)


def _upsample_raster(
    lowres_path: str | os.PathLike, guide_path: str | os.PathLike,
    out_path: str | os.PathLike, *, method: str, iters: int, radius: int, tile: int,
    halo: int, bands: Sequence[int | str] | None, guide_bands: Sequence[int | str] | None,
    aoi: Any, aoi_crs: Any, cog: bool, dtype: str | None, compress: str, blocksize: int,
    device: str | None, resume: bool, scheduler: Any, workers: int | None, blend: str,
    seed: int, kind: str, consistency: float | None, self_guidance: float | None,
    min_sigma_r: float | None, progress: Callable[[tiling.Progress], None] | None,
) -> tiling.RunReport:
    if method not in gu.METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(gu.METHODS)}")
    if isinstance(iters, bool) or int(iters) < 0:
        raise InputError(f"iters must be an integer >= 0, got {iters!r}")
    lowres_path, guide_path, out_path = map(os.fspath, (lowres_path, guide_path, out_path))
    if os.path.abspath(out_path) in (os.path.abspath(lowres_path), os.path.abspath(guide_path)):
        raise InputError("the output path must differ from the input paths")
    with _open(lowres_path, "low-res raster") as lr, _open(guide_path, "guide") as hr:
        lr_idx = select_bands(lr, bands, "low-res raster")
        hr_idx = select_bands(hr, guide_bands, "guide")
        _check_dtype(lr, lr_idx, "low-res raster")
        _check_dtype(hr, hr_idx, "guide")
        rel = relate_grids(lr.crs, lr.transform, lr.shape, hr.crs, hr.transform, hr.shape)
        lr_dtype = np.dtype(lr.dtypes[lr_idx[0] - 1])
        out_dtype = _out_dtype(dtype) if dtype else (
            "float32" if lr_dtype.kind == "f" else lr_dtype.name)
        nodata = _output_nodata(lr.nodata, out_dtype)
        descriptions = [lr.descriptions[i - 1] for i in lr_idx]
        hr_crs, hr_transform, hr_h, hr_w = hr.crs, hr.transform, hr.height, hr.width
        # interpolations use the guide only for its nodata mask: skip reading a guide that
        # cannot have nodata (integer bands, no nodata value, no mask)
        guide_needed = method not in INTERPOLATIONS or hr.nodata is not None or any(
            np.dtype(hr.dtypes[i - 1]).kind == "f" for i in hr_idx) or any(
            rasterio.enums.MaskFlags.all_valid not in hr.mask_flag_enums[i - 1]
            for i in hr_idx)
        lr_window = from_bounds(*hr.bounds, transform=lr.transform).intersection(
            Window(0, 0, lr.width, lr.height))
        render = _render_options(method, kind, lr, lr_idx, lr_window, consistency=consistency,
                                 self_guidance=self_guidance, min_sigma_r=min_sigma_r)
        if not _any_valid(lr, lr_idx, lr_window, every_band=False):
            raise InputError(f"the low-res raster {lowres_path} is all nodata where it overlaps "
                             "the guide: nothing to upsample")
        if method in INTERPOLATIONS and not _any_valid(hr, hr_idx, rel.region, every_band=True):
            raise InputError(f"the guide {guide_path} has no valid pixel (all nodata) where it "
                             "overlaps the low-res raster: nothing to upsample")
    stats = None if method in INTERPOLATIONS else scene_guide_stats(guide_path, hr_idx)

    from geoupsample import __version__

    spec = tiling.OutputSpec(
        out_path, crs=hr_crs, transform=hr_transform, width=hr_w, height=hr_h,
        count=len(lr_idx), dtype=out_dtype, nodata=nodata, descriptions=descriptions,
        tags={"geoupsample_version": __version__, "geoupsample_method": method,
              "geoupsample_params": _params_text(method, iters, radius, tile, halo, blend, seed),
              "geoupsample_lowres": os.path.basename(lowres_path),
              "geoupsample_guide": os.path.basename(guide_path),
              "geoupsample_scale": f"{rel.scale[0]}x{rel.scale[1]}",
              "geoupsample_render": json.dumps(render)},
        compress=compress, blocksize=blocksize, cog=cog)
    job = UpsampleTile(method, stats, iters=int(iters), radius=radius, device=device, seed=seed,
                       render=render)
    if workers is None and scheduler is None:
        workers = available_cores() if method in INTERPOLATIONS else 1
    inputs = {"lowres": tiling.RasterInput(lowres_path, lr_idx)}
    if guide_needed:
        inputs["guide"] = tiling.RasterInput(guide_path, hr_idx)
    params = {"method": method, "iters": int(iters), "radius": radius, "seed": seed,
              "device": str(device), "stats": None if stats is None else
              [stats.lo.tolist(), stats.hi.tolist()], "render": render, "version": __version__}
    fits_at_once = workers if method not in INTERPOLATIONS and scheduler is None else None
    with threads_per_worker(fits_at_once, device):  # cores // workers torch threads per fit
        return tiling.run(job, inputs, spec, tile=tile, halo=halo, align=rel.scale,
                          align_offset=rel.offset, blend=blend, region=rel.region, aoi=aoi,
                          aoi_crs=aoi_crs, resume=resume, params=params, scheduler=scheduler,
                          workers=workers, progress=progress)


def checked_overrides(method: str, **overrides: float | None) -> dict[str, float]:
    """:func:`~geoupsample.core.kernels.render_overrides` of ``method``'s run, validated;
    ``InputError`` for a bad value, or for kernel settings (``self_guidance``, ``min_sigma_r``)
    given to an interpolation, which has no kernels to apply them to."""
    try:
        render = render_overrides(**overrides)
    except (TypeError, ValueError) as err:
        raise InputError(str(err)) from err
    kernel_only = sorted(set(render) - {"consistency"})
    if method in INTERPOLATIONS and kernel_only:
        raise InputError(f"only jbu and gsjbu use {' and '.join(kernel_only)}; {method} has no "
                         "kernels: leave it out or use method gsjbu")
    return render


def _render_options(method: str, kind: str, lr: rasterio.io.DatasetReader,
                    indexes: Sequence[int], window: Window, **overrides: float | None,
                    ) -> dict[str, Any]:
    """:func:`scene_render` for a low-res raster file, sampled by a decimated read of
    ``window``."""

    def sample() -> torch.Tensor:
        step = max(1, int(max(window.height, window.width) // SAMPLE_SIDE))
        win = window.round_offsets().round_lengths()
        return torch.from_numpy(to_float(lr.read(list(indexes), window=win, out_shape=(
            len(indexes), max(1, int(win.height) // step), max(1, int(win.width) // step)),
            resampling=rasterio.enums.Resampling.nearest), lr.nodata))

    return scene_render(method, kind, sample, **overrides)


#: Longest side, in cells, of the decimated sample of a low-res raster that decides its kind.
SAMPLE_SIDE = 1024


def scene_render(method: str, kind: str, sample: Callable[[], torch.Tensor],
                 **overrides: float | None) -> dict[str, Any]:
    """The tiles' rendering arguments, decided once for the scene so that tiles agree.

    Args:
        method: the upsampling method (the interpolations take ``consistency`` alone).
        kind: ``auto`` (resolved here from the sample), ``continuous`` or ``probabilities``.
        sample: returns a decimated sample of the low-res raster ``[C, h', w']`` float, NaN as
            nodata; called only when needed (``auto``, or self-guidance on a continuous
            raster, whose unit is then the sample's robust span).
        overrides: ``consistency``, ``self_guidance``, ``min_sigma_r`` (None = the default).

    Returns:
        ``gu.upsample`` keyword arguments: the overrides, ``kind`` and, where self-guidance
        applies, ``self_guidance_scale`` (1 for probabilities).
    """
    render: dict[str, Any] = checked_overrides(method, **overrides)
    if method in INTERPOLATIONS:
        return render
    x = sample() if kind == "auto" or render.get("self_guidance") else None
    try:
        kind, _ = presets.resolve(kind, x)
    except ValueError as err:
        raise InputError(str(err)) from err
    render["kind"] = kind
    if kind == "probabilities":
        render["self_guidance_scale"] = 1.0  # the same unit in every tile
    elif render.get("self_guidance"):  # the scene's span, not each tile's: tiles agree
        render["self_guidance_scale"] = robust_span(x)
    return render


def _params_text(method: str, iters: int, radius: int, tile: int, halo: int, blend: str,
                 seed: int) -> str:
    fit = f"iters={iters} radius={radius} seed={seed} " if method in ("gsjbu", "jbu") else ""
    if method == "jbu":
        fit = f"radius={radius} "
    return f"{fit}tile={tile} halo={halo} blend={blend} guide_norm=scene_percentiles_1_99"


def _out_dtype(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in tiling.writer.SUPPORTED_DTYPES:
        raise InputError(f"unsupported output dtype {dtype!r}; use one of "
                         f"{', '.join(tiling.writer.SUPPORTED_DTYPES)}")
    return name


def _output_nodata(lr_nodata: float | None, dtype: str) -> float:
    dt = np.dtype(dtype)
    if lr_nodata is not None:
        if dt.kind == "f" or (not math.isnan(lr_nodata) and float(lr_nodata).is_integer()
                              and np.iinfo(dt).min <= lr_nodata <= np.iinfo(dt).max):
            return float(lr_nodata)
    return tiling.default_nodata(dtype)
