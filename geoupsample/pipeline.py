"""Whole-raster guided upsampling on top of the :mod:`tiling` engine.

:func:`upsample_raster` upsamples a georeferenced low-res raster onto the grid of a
high-resolution guide, tile by tile, into one GeoTIFF/COG.

Before anything is written the grids are checked (:mod:`geoupsample.grids`: same CRS, nesting
pixels) and so are the inputs (:mod:`geoupsample.inputs`). A low-res raster on another grid is
refused unless ``warp=`` names a resampling: it is then reprojected as it is read
(:class:`tiling.Warp`, a GDAL warped VRT) onto :func:`~geoupsample.grids.nesting_grid`. The output
covers the guide's grid (its CRS and transform); pixels outside the low-res raster's footprint,
outside the AOI, or where the guide is nodata are nodata.

Guide normalisation uses scene-wide statistics (:func:`~geoupsample.inputs.scene_guide_stats`)
passed to every tile's fit, so tiles agree and no seams appear.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

import geoupsample as gu
import tiling
import tiling.writer
from geoupsample.caller_warnings import warn_caller
from geoupsample.core.allocator import tune_allocator
from geoupsample.core.methods import INTERPOLATIONS, without_missing_cells
from geoupsample.core.series import (
    STABLE_TOLERANCE,
    WARM_BLEND,
    WARM_ITERS,
    carry_forward,
    stable_weight,
    warm_start,
)
from geoupsample.grids import (
    GridRelation,
    check_fitted_scale,
    overlap_window,
    relate_or_nest,
)
from geoupsample.inputs import (
    InputError,
    any_valid,
    check_dtype,
    check_method_options,
    check_not_class_map,
    check_output_paths,
    colour_table,
    file_reader,
    is_zarr_path,
    open_raster,
    scene_guide_stats,
    select_bands,
)
from geoupsample.options import (
    OutputOptions,
    RenderOptions,
    TilingOptions,
    takes_option_groups,
)
from geoupsample.render_settings import (
    SceneRender,
    declared_unit,
    lowres_sample,
    missing_cells,
    scene_render,
)
from geoupsample.workers import (
    available_cores,
    check_device,
    check_threads,
    check_workers,
    threads_per_worker,
)
from tiling.execute import gdal_env
from tiling.reader import mask_band_used

__all__ = ["InputError", "UpsampleTile", "tile_blend", "upsample_raster"]

#: Context, in low-res cells, that an interpolation needs around a tile for its pixels to equal
#: a whole-array run: nearest none; bilinear 1 cell; bicubic 2 cells of cubic weights plus the
#: 4 rounds with which :func:`~geoupsample.core.interpolation.fill_missing` fills missing cells
#: from their neighbours (without missing cells 2 would do: measured at scales 2, 8 and 16).
INTERPOLATION_SUPPORT_CELLS = {"nearest": 0, "bilinear": 1, "bicubic": 6}


def tile_blend(blend: str, method: str, halo: int, scale: tuple[Any, Any]) -> tuple[str, int]:
    """The tile blend and halo (guide pixels) a run uses: ``(blend, halo)`` as given unless
    ``blend`` is ``"auto"``.

    ``"auto"`` crops (``"crop"``: each pixel from one tile) for interpolations whose support
    (:data:`INTERPOLATION_SUPPORT_CELLS` x ``scale``, guide pixels per low-res pixel along each
    axis) fits in ``halo``, with the halo cut to that support: every tile then holds the
    whole-array values, so a taper over a wider halo would only compute the overlap twice and
    average equal values. Fitted methods (jbu, gsjbu), and interpolations at scales whose
    support exceeds the halo, get ``"taper"`` and ``halo``.
    """
    if blend != "auto":
        return blend, halo
    cells = INTERPOLATION_SUPPORT_CELLS.get(method)
    if cells is not None:
        support = cells * math.ceil(max(scale))
        if halo >= support:
            return "crop", support
    return "taper", halo


def read_context(method: str, rel: GridRelation) -> Window | None:
    """Where the tiles of ``method`` may read beyond the processing region (see
    :class:`tiling.TileGrid`): for an interpolation, the low-res raster's whole footprint, so
    that the pixels along the edge of a guide chip inside a larger low-res raster interpolate
    towards the cells beyond the chip, as a whole-scene run does. None (the region) for jbu and
    gsjbu, whose kernels need guide pixels, which a chip does not have beyond its edge.
    """
    return rel.footprint if method in INTERPOLATIONS else None


@dataclass(frozen=True)
class LowresPart:
    """One low-res raster of an :class:`UpsampleTile`: which input it is and how it renders.

    Attributes:
        name: its input's name in the tile's data.
        render: rendering arguments of ``gu.upsample`` (``kind``, ``consistency``, ...,
            ``keep_missing``), decided for the whole scene.
        unit: probabilities stored as fractions of ``unit`` (e.g. 255): rendered as fractions
            of 1 and written back in it.
        cell_nodata: probabilities read as stored: the cells whose channels all hold this are
            missing.
        channels: the channels returned (0-based), when more are rendered than written (a
            subset of a probability raster's bands renders with all of them).
        guide: the name of its guide in the tile's data (a time series: each date's own).
    """

    name: str = "lowres"
    render: dict = field(default_factory=dict)
    unit: float | None = None
    cell_nodata: float | None = None
    channels: tuple[int, ...] | None = None
    guide: str = "guide"


class UpsampleTile:
    """The per-tile job: upsample the tile's low-res windows onto its guide window.

    Picklable (for dask.distributed). ``ctx.data`` holds each part's low-res raster ``[C, h,
    w]`` (``"lowres"`` for one) and its guide ``[d, H, W]`` float32 with NaN for nodata
    (``"guide"``, or each date's own in a time series); returns float32 ``[sum C, H, W]``, the
    parts' bands in order, or None when no part has a valid guide pixel and a valid cell (the
    tile is skipped; a part without one is NaN). The low-res rasters share one grid, so jbu and
    gsjbu fit the tile's kernels once per guide and render every part of that guide with them:
    the same pixels as one run per raster.

    A time series (``warm``): the guides are fitted in the order of the parts, each after the
    first with ``warm_iters`` steps from :func:`geoupsample.core.series.warm_start` of the
    previous fitted guide's kernels (the same tile of the date before); a continuous raster's
    output is carried forward from the date before where the guide has not changed
    (:func:`geoupsample.core.series.carry_forward`, ``stable_tolerance``; 0: off).
    """

    def __init__(self, method: str, stats: gu.GuideStats | dict[str, gu.GuideStats] | None,
                 iters: int = 50, radius: int = 3, device: str | None = None, seed: int = 0,
                 render: dict[str, Any] | None = None, unit: float | None = None,
                 cell_nodata: float | None = None, channels: Sequence[int] | None = None,
                 parts: Sequence[LowresPart] | None = None, warm: bool = False,
                 warm_iters: int = WARM_ITERS,
                 stable_tolerance: float = STABLE_TOLERANCE,
                 shift: tuple[float, float] = (0.0, 0.0)) -> None:  # fmt: skip
        self.method, self.stats, self.iters = method, stats, iters
        self.radius, self.device, self.seed = radius, device, seed
        self.shift = tuple(float(v) for v in shift)
        self.warm, self.warm_iters = warm, warm_iters
        self.stable_tolerance = stable_tolerance
        if parts is None:  # one raster, named "lowres"
            parts = [LowresPart("lowres", dict(render or {}), unit, cell_nodata,
                                None if channels is None else tuple(channels))]
        self.parts = list(parts)

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        tune_allocator()  # once per process, so on dask.distributed workers too (see its module)
        xs = [missing_cells(ctx.data[p.name], p.cell_nodata) for p in self.parts]
        shape = (int(ctx.window.height), int(ctx.window.width))
        guides = {p.guide: _tile_guide(ctx, p.guide, shape) for p in self.parts}
        usable = [np.isfinite(guides[p.guide]).all(0).any() and np.isfinite(x).any()
                  for p, x in zip(self.parts, xs, strict=True)]  # fmt: skip
        if not any(usable):
            return None
        kernels: dict[str, gu.Kernels | None] = {}
        previous = None
        for p in self.parts:  # one fit per guide, in date order
            g = guides[p.guide]
            if p.guide in kernels or self.method in INTERPOLATIONS:
                continue
            if not np.isfinite(g).all(0).any():
                kernels[p.guide] = None
                continue
            kernels[p.guide] = previous = self._fit(g, tuple(xs[0].shape[-2:]), p.guide,
                                                    previous)  # fmt: skip
        outs, previous_date = [], None
        for p, x, ok in zip(self.parts, xs, usable, strict=True):
            if not ok:
                outs.append(np.full((self._channels(p, x), *shape), np.nan, np.float32))
                continue
            carry = None
            if previous_date is not None and self._carries(p) and previous_date[0] != p.guide:
                carry = functools.partial(self._carry, previous_date, guides, p.guide, x)
            outs.append(self._part(p, x, guides[p.guide], kernels.get(p.guide), carry))
            if self._carries(p):
                previous_date = (p.guide, x, outs[-1])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _carries(self, part: LowresPart) -> bool:
        """Whether ``part``'s output is carried forward from the date before: a continuous
        raster of a jbu/gsjbu time series."""
        return (self.warm and self.stable_tolerance > 0 and self.method not in INTERPOLATIONS
                and part.render.get("kind") != "probabilities" and part.unit is None)

    def _carry(self, previous_date: tuple[str, np.ndarray, np.ndarray],
               guides: dict[str, np.ndarray], guide: str, x: np.ndarray,
               out: np.ndarray) -> np.ndarray:  # fmt: skip
        """``out`` carried forward from the date before (its guide, raster and output)."""
        previous_guide, previous_x, previous_out = previous_date
        stats = self.stats.get(previous_guide) if isinstance(self.stats, dict) else self.stats
        weight = stable_weight(guides[previous_guide], guides[guide], stats,
                               self.stable_tolerance)  # fmt: skip
        return carry_forward(previous_out, out, previous_x, x, weight, guides[guide], self.shift)

    def _fit(self, g: np.ndarray, lr_shape: tuple[int, int], guide: str,
             previous: gu.Kernels | None) -> gu.Kernels:  # fmt: skip
        """The tile's kernels for one guide (warm-started from ``previous`` in a series)."""
        stats = self.stats.get(guide) if isinstance(self.stats, dict) else self.stats
        iters, init = (0, None) if self.method == "jbu" else (self.iters, None)
        if self.warm and previous is not None and self.method == "gsjbu":
            iters, init = self.warm_iters, warm_start(previous)
        return gu.fit(g, lr_shape, iters=iters, radius=self.radius, device=self.device,
                      seed=self.seed, normalize=stats, init=init, shift=self.shift)

    @staticmethod
    def _channels(part: LowresPart, x: np.ndarray) -> int:
        return x.shape[0] if part.channels is None else len(part.channels)

    def _part(self, part: LowresPart, x: np.ndarray, g: np.ndarray, kernels: gu.Kernels | None,
              carry: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
        if part.unit is not None:
            x = x / np.float32(part.unit)
        render = dict(part.render)
        keep_missing = render.pop("keep_missing", False)
        if kernels is None:
            out = gu.upsample(x, g, method=self.method, keep_missing=keep_missing,
                              shift=self.shift, **render)  # fmt: skip
        else:
            out = np.asarray(kernels.render(x, **render), dtype=np.float32)
            if carry is not None:  # a series' date, from the one before
                out = carry(out)
            if keep_missing:
                out = without_missing_cells(out, x, self.shift)
        out = np.asarray(out, dtype=np.float32)
        if part.channels is not None:
            out = out[list(part.channels)]
        if part.unit is not None:
            out = out * np.float32(part.unit)
        return out


def _tile_guide(ctx: tiling.TileContext, name: str, shape: tuple[int, int]) -> np.ndarray:
    """The tile's guide ``name``; zeros of the tile's shape where an interpolation reads none
    (a guide that cannot hold nodata is not read: only its shape matters)."""
    g = ctx.data.get(name)
    return np.zeros((1, *shape), np.float32) if g is None else g


@takes_option_groups(TilingOptions, OutputOptions, RenderOptions)
def upsample_raster(
    lowres_path: str | os.PathLike | Sequence[str | os.PathLike],
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
    threads: int | None = None,
    blend: str = "auto",
    seed: int = 0,
    kind: str = "auto",
    consistency: float | None = None,
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
    warp: str | None = None,
    keep_missing: bool = False,
    progress: Callable[[tiling.Progress], None] | None = None,
    _series: SeriesOptions | None = None,
    *,
    tiling_options: TilingOptions | None = None,
    output_options: OutputOptions | None = None,
    render_options: RenderOptions | None = None,
) -> tiling.RunReport:
    """Upsample the low-res raster at ``lowres_path`` onto the grid of ``guide_path``; or
    several low-res rasters on one grid in one pass (each tile fitted once, every raster
    rendered with the same kernels: the pixels of one run per raster).

    Args:
        lowres_path: georeferenced low-res raster (probabilities, features, a coarse band,
            elevation...), any number of bands, integer or float; or a list of them, on one
            grid (each is checked as one would be, and named in the error).
        guide_path: the high-resolution guide (e.g. multispectral image) in the **same CRS**;
            the low-res pixel must be a whole number or a simple fraction of guide pixels (4, or
            10/3 for 10 m on 3 m: :mod:`geoupsample.grids`) and the origins must lie on its
            pixel lattice. A low-res raster on another grid is refused unless ``warp`` is
            given.
        out_path: output GeoTIFF (COG with ``cog=True``); written atomically. With several
            low-res rasters, a pattern holding ``{stem}`` (each raster's file name without its
            extension) or ``{index}`` (from 1) names one output per raster
            (``out/{stem}_10m.tif``); a plain path gets one output with every raster's bands
            in order (described ``<stem>:<band>``).
        method: ``gsjbu`` | ``jbu`` | ``bilinear`` | ``bicubic`` | ``nearest``.
        iters, radius, seed: GSJBU fit parameters (``iters`` Adam steps per tile; ``radius`` in
            low-res pixels).
        tile, halo: core tile size and context/blend width in guide pixels. Cores are aligned to
            the scale. For an exact match with a whole-array run of a local method the taper
            needs ``halo >= 2 x support`` (``blend="crop"``: ``halo >= support``); the support
            is 1 low-res pixel for bilinear, 2 for bicubic (6 with missing cells to fill), 0 for
            nearest and about ``(radius + 1) x scale + 1`` guide pixels for jbu/gsjbu, which
            back-projection's rounds widen by a cell or two (so the
            default halo 64 is exact with the taper for jbu up to scale 7; at larger scales
            raise the halo, or the tiles differ from a whole-array run by tiny amounts in the
            ramps). With the default ``blend="auto"`` interpolations crop with the halo cut to
            their support, exact up to scale 64 (bilinear) and 10 (bicubic) with the default
            halo.
        bands: low-res bands to upsample (1-based indexes or descriptions; default all).
        guide_bands: guide bands to use (default all).
        aoi, aoi_crs: area of interest (shapely geometry or GeoJSON file/dict) and its CRS.
        cog: write a Cloud-Optimized GeoTIFF (overviews built from the finished file).
        dtype: output dtype (default: the low-res dtype; float64 becomes float32). Integer
            outputs are rounded and clipped.
        compress, blocksize: GeoTIFF compression (deflate/zstd/lzw/none) and block size.
        device: torch device for the fits (``cpu``/``cuda``; default CUDA when available).
        resume: continue an interrupted run with the same inputs and parameters (a finished
            output of the same run is left as it is).
        scheduler: dask.distributed ``Client`` or scheduler address (default: local threads).
        workers: tiles computed at once by local threads (default: all cores for
            interpolations; 1 for fits, which use every core through torch's threads). With
            more fits at once each gets ``threads // workers`` torch threads and its own working
            memory (about 0.6 GB per 1024 px gsjbu tile): see :mod:`geoupsample.workers`.
        threads: CPU threads of the run in all (torch's, the Numba kernels', GDAL's
            compression): default the CPUs this process may use (its affinity and cgroup quota,
            :func:`geoupsample.workers.available_cores`). On a machine shared with other jobs,
            give it its share.
        blend: ``taper``, ``crop`` or ``auto`` (default: ``crop`` for interpolations whose
            support fits in the halo, where it gives the same pixels for less work;
            ``taper`` otherwise; see :func:`tile_blend`).
        kind: ``continuous``, ``probabilities`` or ``auto`` (jbu/gsjbu render defaults, see
            :meth:`geoupsample.Kernels.render`): ``auto`` decides once for the whole scene,
            from a decimated read of the low-res raster: class probabilities when its channels
            sum to one value, 1 for fractions, 255 or 254 for 8-bit storage, 100 for percent
            (or as its ``probability_scale`` tag declares). Scaled probabilities are rendered
            as fractions and written back in their unit. ``probabilities`` refuses a raster
            whose channels do not sum to one value.
        consistency: back-projection rounds (default: the kind's; 0 for interpolations).
        self_guidance, min_sigma_r: jbu/gsjbu render overrides (default: the kind's; see
            :meth:`geoupsample.Kernels.render`); ``consistency=0, min_sigma_r=0`` is the sharp
            render of probabilities.
        warp: resampling (``gdalwarp -r``: ``bilinear`` or ``average`` for probabilities,
            features and other continuous values, ``nearest`` or ``mode`` for class numbers)
            with which a low-res raster whose grid does not nest in the guide's (another CRS,
            a misaligned origin, a scale that is no simple fraction) is reprojected as it is
            read onto :func:`~geoupsample.grids.nesting_grid`: cells of about its own pixel
            size in the guide's CRS, on the guide's lattice. The warp is recorded in the
            ``geoupsample_warp`` tag. None (default): such a raster is refused. A raster
            whose grid nests is never warped.
        keep_missing: nodata on the whole footprint of every low-res nodata cell (a cloud
            mask's), instead of values wherever the method's support reaches a valid cell
            (see :func:`geoupsample.upsample`).
        progress: callback receiving :class:`tiling.Progress` after each tile.
        _series: a time series (:func:`geoupsample.time_series.upsample_series`, which sets
            it): ``guide_path`` is then each raster's own guide.
        tiling_options, output_options, render_options: the same options as groups
            (:class:`~geoupsample.options.TilingOptions`: ``tile`` ... ``aoi_crs``;
            :class:`~geoupsample.options.OutputOptions`: ``dtype``, ``compress``, ``cog``;
            :class:`~geoupsample.options.RenderOptions`: ``kind`` ... ``min_sigma_r``): a
            field given (not None) counts as the keyword of its name; the keyword given too
            with another value is an :class:`~geoupsample.inputs.InputError`.

    Returns:
        :class:`tiling.RunReport`. The output has the guide's CRS and transform, nodata (the
        low-res nodata when it fits the dtype, else NaN / the dtype's max; for an integer
        low-res raster without nodata whose values could include that max, e.g. uint8 ->
        uint8, an internal mask band and no nodata value), the low-res band
        descriptions, and tags recording the method, parameters and package version.
    """
    tune_allocator()  # the fits' large temporaries: see geoupsample.core.allocator
    check_workers(workers, scheduler)
    check_threads(threads)
    check_device(device, local=scheduler is None)
    with gdal_env():  # GDAL's block cache stays bounded during the checks and the run
        return _upsample_raster(
            lowres_path, guide_path, out_path, method=method, iters=iters, radius=radius,
            tile=tile, halo=halo, bands=bands, guide_bands=guide_bands, aoi=aoi,
            aoi_crs=aoi_crs, cog=cog, dtype=dtype, compress=compress, blocksize=blocksize,
            device=device, resume=resume, scheduler=scheduler, workers=workers,
            threads=threads, blend=blend,
            seed=seed, kind=kind, consistency=consistency, self_guidance=self_guidance,
            min_sigma_r=min_sigma_r, warp=warp, keep_missing=keep_missing, progress=progress,
            series=_series)


@dataclass
class LowresPlan:
    """One low-res raster of a run, checked against the guide: how it is read, rendered and
    written.

    Attributes:
        path: the raster; rel: its grid's relation to the guide's (after ``warp``, if any).
        warp: the warp onto a nesting grid, or None.
        read_idx: the bands read (all of a probability raster's when some are written).
        part: its part of the per-tile job (:class:`LowresPart`).
        out_dtype, nodata, nodata_mask, descriptions, packing, kept_tags, colormaps: its
            output's (see :class:`tiling.OutputSpec`).
        grid: the low-res grid as the tiles read it (transform, shape), to compare rasters.
    """

    path: str
    rel: GridRelation
    warp: tiling.Warp | None
    read_idx: list[int]
    part: LowresPart
    out_dtype: str
    nodata: float | None
    nodata_mask: bool
    descriptions: list[str | None]
    packing: dict[str, Any]
    kept_tags: dict[str, str]
    colormaps: dict[int, dict]
    grid: tuple[tuple[float, ...], tuple[int, int]]


def _plan_lowres(stack: ExitStack, lowres_path: str, name: str, hr: Any, hr_idx: Sequence[int],
                 *, method: str, kind: str, bands: Sequence[int | str] | None,
                 dtype: str | None, warp: str | None, keep_missing: bool,
                 overrides: dict[str, float | None]) -> LowresPlan:  # fmt: skip
    """Open, check and plan the low-res raster ``lowres_path`` (input ``name`` of the job)."""
    lr_file = stack.enter_context(open_raster(lowres_path, "low-res raster"))
    lr_idx = select_bands(lr_file, bands, "low-res raster")
    check_dtype(lr_file, lr_idx, "low-res raster")
    check_not_class_map(lr_file, lr_idx, method, kind)
    rel, lr_warp = relate_or_nest(lr_file.crs, lr_file.transform, lr_file.shape, hr.crs,
                                  hr.transform, hr.shape, warp)
    # the low-res raster as the tiles see it: the file, or the file warped onto the grid
    lr = stack.enter_context(lr_warp.open(lr_file)) if lr_warp else lr_file
    lr_dtype = np.dtype(lr_file.dtypes[lr_idx[0] - 1])
    out_dtype = _out_dtype(dtype) if dtype else (
        "float32" if lr_dtype.kind == "f" else lr_dtype.name)
    nodata, nodata_mask = _output_nodata(lr_file.nodata, lr_dtype, out_dtype)
    lr_window = overlap_window(lr.transform, lr.shape, hr.bounds)
    # the render is decided from the values as stored (a warp would blur away their
    # rounding to whole numbers), over the part of the file the guide covers
    file_window = overlap_window(lr_file.transform, lr_file.shape, hr.bounds, hr.crs,
                                 lr_file.crs)
    all_idx = list(range(1, lr_file.count + 1))
    read_idx, channels = list(lr_idx), None
    if kind != "continuous" and len(set(lr_idx)) < lr_file.count:
        # some bands of a probability raster are still probabilities: they render with
        # all the bands (on the simplex), and the chosen ones are written
        sample = _file_sample(lr_file, all_idx, file_window)
        scene = _render_options(method, kind, lr_file, sample, **overrides)
        if scene.arguments.get("kind") == "probabilities":
            read_idx, channels = all_idx, tuple(i - 1 for i in lr_idx)
        else:  # the chosen bands alone, from the same sample
            scene = _render_options(method, kind, lr_file,
                                    lambda: sample()[[i - 1 for i in lr_idx]], **overrides)
    else:
        scene = _render_options(method, kind, lr_file,
                                _file_sample(lr_file, lr_idx, file_window), **overrides)
    # probabilities with a nodata value: read as stored, missing where every band holds it
    # (a warp resamples band by band: there the nodata value stays GDAL's, per band)
    cell_nodata = scene.cell_nodata if lr_warp is None else None
    if (scene.arguments.get("kind") == "probabilities" and nodata is not None
            and 0 <= nodata <= (scene.unit or 1.0)):
        # a probability can hold the nodata value (1 x 255 with nodata 255): floats take
        # NaN, integers a mask band, so that no probability is clipped or masked
        nodata, nodata_mask = ((float("nan"), False) if np.dtype(out_dtype).kind == "f"
                               else (None, True))
    render = {**scene.arguments, **({"keep_missing": True} if keep_missing else {})}
    if (render.get("kind") == "probabilities" and scene.unit is None
            and np.dtype(out_dtype).kind in "iu"):
        raise InputError(
            f"the low-res raster holds probabilities as fractions of 1, which --dtype "
            f"{out_dtype} would round to 0 or 1: keep float32 (leave --dtype out), or store "
            "them scaled (geoupsample segment --probs writes uint8 x 254 with a "
            "probability_scale tag, which upsample keeps)"
        )
    if not any_valid(lr, lr_idx, lr_window, every_band=False):
        raise InputError(f"the low-res raster {lowres_path} is all nodata where it overlaps "
                         "the guide: nothing to upsample")
    part = LowresPart(name, render, scene.unit, cell_nodata, channels)
    return LowresPlan(
        lowres_path, rel, lr_warp, read_idx, part, out_dtype, nodata, nodata_mask,
        [lr_file.descriptions[i - 1] for i in lr_idx], band_packing(lr_file, lr_idx),
        _kept_tags(lr_file.tags(), lr_idx, lr_file.count),
        _kept_colormaps(lr_file, lr_idx, method, out_dtype),
        (tuple(lr.transform)[:6], (lr.height, lr.width)),
    )  # fmt: skip


#: Placeholders of an output path naming one output per low-res raster (``{date}``: a time
#: series' dates).
OUTPUT_FIELDS = ("{stem}", "{index}", "{date}")


def output_paths(out_path: str, lowres_paths: Sequence[str],
                 dates: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """One output per low-res raster when ``out_path`` holds ``{stem}`` (the raster's file name
    without its extension), ``{index}`` (its place, from 1) or ``{date}`` (a time series' date
    of it), else ``[out_path]`` (one output: the rasters' bands stacked)."""
    if not any(f in out_path for f in OUTPUT_FIELDS):
        return [out_path]
    outs = []
    for i, p in enumerate(lowres_paths, 1):
        stem = os.path.splitext(os.path.basename(p.rstrip("/")))[0]
        date = dates[i - 1] if dates else None
        if date is None and "{date}" in out_path:
            raise InputError(f"-o {out_path} holds {{date}}, but the rasters have no dates: "
                             "give them (a series' pairs file: date,lowres,guide), or use "
                             "{stem} or {index}")
        try:
            outs.append(out_path.format(stem=stem, index=i, date=date))
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"-o {out_path}: an output pattern may hold {{stem}}, {{index}} and "
                             f"{{date}} only ({err})") from None
    if len(set(outs)) != len(outs):
        twice = sorted({o for o in outs if outs.count(o) > 1})
        raise InputError(f"-o {out_path} names two low-res rasters' outputs alike ({twice[0]}): "
                         "add {index}, or give rasters with different file names")
    return outs


def _check_same_grid(plans: Sequence[LowresPlan]) -> None:
    """Refuse low-res rasters on different grids (one fit serves one grid), naming each."""
    first = plans[0]
    if all(p.grid == first.grid and p.rel.region == first.rel.region for p in plans):
        return
    lines = "; ".join(f"{p.path}: {p.grid[1][1]} x {p.grid[1][0]} cells of "
                      f"{p.rel.scale_text} guide pixels from guide pixel {p.rel.offset}"
                      for p in plans)  # fmt: skip
    raise InputError(f"the low-res rasters are on different grids ({lines}); one run fits one "
                     "grid: upsample each group of rasters on the same grid in its own run, or "
                     "warp them onto one grid first (gdalwarp)")


def _upsample_raster(
    lowres_path: str | os.PathLike | Sequence[str | os.PathLike],
    guide_path: str | os.PathLike,
    out_path: str | os.PathLike, *, method: str, iters: int, radius: int, tile: int,
    halo: int, bands: Sequence[int | str] | None, guide_bands: Sequence[int | str] | None,
    aoi: Any, aoi_crs: Any, cog: bool, dtype: str | None, compress: str, blocksize: int,
    device: str | None, resume: bool, scheduler: Any, workers: int | None,
    threads: int | None, blend: str,
    seed: int, kind: str, consistency: float | None, self_guidance: float | None,
    min_sigma_r: float | None, warp: str | None, keep_missing: bool,
    progress: Callable[[tiling.Progress], None] | None,
    series: SeriesOptions | None = None,
) -> tiling.RunReport:
    """:func:`upsample_raster`; with ``series``, ``guide_path`` is a list: each low-res
    raster's own guide (a date's), the guides on one grid and fitted in order, each warm-started
    from the one before (:class:`UpsampleTile`)."""
    check_method_options(method, iters, radius, seed)
    many = not isinstance(lowres_path, (str, os.PathLike))
    lowres_paths = [os.fspath(p) for p in (lowres_path if many else [lowres_path])]
    if not lowres_paths:
        raise InputError("no low-res raster to upsample")
    if len(set(lowres_paths)) != len(lowres_paths):
        raise InputError(f"a low-res raster is given twice: {lowres_paths}")
    guide_paths = ([os.fspath(g) for g in guide_path] if series is not None
                   else [os.fspath(guide_path)])  # fmt: skip
    guide_path, out_path = guide_paths[0], os.fspath(out_path)
    outs = output_paths(out_path, lowres_paths, series.dates if series else None)
    inputs_named = {**{f"the guide {g}" if series else "the guide": g for g in guide_paths},
                    **{f"the low-res raster {p}" if many else "the low-res raster": p
                       for p in lowres_paths}}  # fmt: skip
    labels = ["-o"] if len(outs) == 1 else [f"-o (output {i} of {len(outs)})"
                                            for i in range(1, len(outs) + 1)]  # fmt: skip
    check_output_paths(dict(zip(labels, outs, strict=True)), inputs_named, rasters=tuple(labels))
    if any(is_zarr_path(o) for o in outs):
        raise InputError("upsample writes GeoTIFFs; give a .tif path (Zarr is for features)")
    overrides = dict(consistency=consistency, self_guidance=self_guidance,
                     min_sigma_r=min_sigma_r)
    with ExitStack() as stack:
        hr = stack.enter_context(open_raster(guide_path, "guide"))
        hr_idx = select_bands(hr, guide_bands, "guide")
        check_dtype(hr, hr_idx, "guide")
        others = [stack.enter_context(open_raster(g, "guide")) for g in guide_paths[1:]]
        _check_same_guide_grid(guide_paths, [hr, *others], guide_bands)
        plans = []
        for i, p in enumerate(lowres_paths):
            try:
                plan = _plan_lowres(
                    stack, p, "lowres" if len(lowres_paths) == 1 else f"lowres{i}", hr, hr_idx,
                    method=method, kind=kind, bands=bands, dtype=dtype, warp=warp,
                    keep_missing=keep_missing, overrides=overrides)  # fmt: skip
            except InputError as err:
                if many and p not in str(err):
                    raise InputError(f"{p}: {err}") from None
                raise
            if series is not None:
                plan.part = dataclasses.replace(plan.part, guide=f"guide{i}")
            plans.append(plan)
        _check_same_grid(plans)
        rel = plans[0].rel
        check_fitted_scale(method, rel, plans[0].grid[1])
        blend, halo = tile_blend(blend, method, halo, rel.scale)
        hr_crs, hr_transform, hr_h, hr_w = hr.crs, hr.transform, hr.height, hr.width
        # interpolations use the guide only for its nodata mask: skip reading a guide that
        # cannot have nodata (integer bands, no nodata value, no mask)
        guide_needed = method not in INTERPOLATIONS or any(
            ds.nodata is not None or mask_band_used(ds, hr_idx)
            or any(np.dtype(ds.dtypes[i - 1]).kind == "f" for i in hr_idx)
            for ds in [hr, *others])  # fmt: skip
        for g, ds in zip(guide_paths, [hr, *others], strict=True):
            if method in INTERPOLATIONS and not any_valid(ds, hr_idx, rel.region,
                                                          every_band=True):  # fmt: skip
                raise InputError(f"the guide {g} has no valid pixel (all nodata) where it "
                                 "overlaps the low-res raster: nothing to upsample")
    stats: Any = None
    if method not in INTERPOLATIONS:  # a series' dates each normalised by their own
        stats = scene_guide_stats(guide_path, hr_idx) if series is None else {
            p.part.guide: scene_guide_stats(g, hr_idx)
            for p, g in zip(plans, guide_paths, strict=True)}  # fmt: skip

    from geoupsample import __version__

    common_tags = {"geoupsample_version": __version__, "geoupsample_method": method,
                   "geoupsample_params": params_text(method, iters, radius, tile, halo, blend,
                                                     seed),
                   "geoupsample_guide": os.path.basename(guide_path) if series is None else
                   json.dumps([os.path.basename(g) for g in guide_paths]),
                   "geoupsample_scale": rel.scale_text}  # fmt: skip
    if series is not None:
        common_tags["geoupsample_series"] = json.dumps(series.params())
    if rel.is_shifted:  # the low-res grid off the guide's lattice, used as it is
        common_tags["geoupsample_grid_shift"] = f"{rel.shift[1]:g}x{rel.shift[0]:g}"
    spec_kw = dict(crs=hr_crs, transform=hr_transform, width=hr_w, height=hr_h,
                   compress=compress, blocksize=blocksize, cog=cog)
    if len(outs) == len(plans):
        specs = [tiling.OutputSpec(o, count=len(p.descriptions), dtype=p.out_dtype,
                                   nodata=p.nodata, nodata_mask=p.nodata_mask,
                                   descriptions=p.descriptions,
                                   tags={**common_tags, **_plan_tags(p, rel),
                                         **_series_tags(series, i, guide_paths)},
                                   colormaps=p.colormaps, **p.packing, **spec_kw)
                 for i, (o, p) in enumerate(zip(outs, plans, strict=True))]  # fmt: skip
    else:
        specs = [_stacked_spec(outs[0], plans, rel, dtype, common_tags, spec_kw)]
    job = UpsampleTile(method, stats, iters=int(iters), radius=radius, device=device, seed=seed,
                       parts=[p.part for p in plans], warm=series is not None,
                       warm_iters=series.warm_iters if series else WARM_ITERS,
                       stable_tolerance=series.stable_tolerance if series else 0.0,
                       shift=rel.shift)
    if workers is None and scheduler is None:
        workers = available_cores() if method in INTERPOLATIONS else 1
    inputs: dict[str, Any] = {
        p.part.name: tiling.RasterInput(
            p.path, tuple(p.read_idx), nodata=None if p.part.cell_nodata is None
            else float("nan"), warp=p.warp, misfit=rel.read_misfit) for p in plans}  # fmt: skip
    if guide_needed:
        for p, g in zip(plans, guide_paths if series else [guide_path] * len(plans),
                        strict=True):  # fmt: skip
            inputs[p.part.guide] = tiling.RasterInput(g, hr_idx)
    params = {"method": method, "iters": int(iters), "radius": radius, "seed": seed,
              "device": str(device), "stats": _stats_params(stats), "version": __version__}
    if series is not None:
        params["series"] = {**series.params(), "guides": guide_paths}
    if rel.is_shifted:
        params["shift"] = list(rel.shift)
    if len(plans) == 1:
        params.update(render=plans[0].part.render, unit=plans[0].part.unit)
    else:
        params["parts"] = [{"render": p.part.render, "unit": p.part.unit} for p in plans]
    # cores // workers torch threads per tile: interpolations run a tile per core by default,
    # and torch's own threads on top of them (and of GDAL's compression threads) stall its
    # parallel regions on a busy machine
    tiles_at_once = workers if scheduler is None else None
    with threads_per_worker(tiles_at_once, device, threads):
        report = tiling.run(job, inputs, specs, tile=tile, halo=halo, align=rel.period,
                            align_offset=rel.offset, blend=blend, region=rel.region,
                            context=read_context(method, rel), aoi=aoi,
                            aoi_crs=aoi_crs, resume=resume, params=params, scheduler=scheduler,
                            workers=workers, progress=progress)
    report.extra["paths"] = [s.path for s in specs]
    clipped = report.extra.get("clipped_by_output") or [0] * len(specs)
    for spec, n in zip(specs, clipped, strict=True):
        warn_clipped(report, spec, n)
    return report


@dataclass(frozen=True)
class SeriesOptions:
    """A time series run (:func:`geoupsample.time_series.upsample_series`): each low-res raster
    with its own guide, the dates in order.

    Attributes:
        dates: each raster's date (any text: ``2020-08-31``), or None.
        warm_iters: fit steps of each date after the first (warm-started from the date before).
        stable_tolerance: the guide change under which a date's output is carried forward from
            the date before (:data:`geoupsample.core.series.STABLE_TOLERANCE`; 0: off).
    """

    dates: tuple[str, ...] | None = None
    warm_iters: int = WARM_ITERS
    stable_tolerance: float = STABLE_TOLERANCE

    def params(self) -> dict[str, Any]:
        """What a resumed run must share (and the outputs' ``geoupsample_series`` tag holds)."""
        return {"warm_iters": self.warm_iters, "warm_blend": WARM_BLEND,
                "stable_tolerance": self.stable_tolerance,
                "dates": list(self.dates) if self.dates else None}


def _series_tags(series: SeriesOptions | None, i: int,
                 guide_paths: Sequence[str]) -> dict[str, str]:  # fmt: skip
    """A series date's output: its own guide and date."""
    if series is None:
        return {}
    return {"geoupsample_guide": os.path.basename(guide_paths[i]),
            **({"geoupsample_date": series.dates[i]} if series.dates else {})}


def _check_same_guide_grid(paths: Sequence[str], guides: Sequence[Any],
                           bands: Sequence[int | str] | None) -> None:  # fmt: skip
    """Refuse a time series whose guides are not on one grid (each date's kernels start from
    the same tile's of the date before), naming each."""
    first = guides[0]
    for path, ds in zip(paths[1:], guides[1:], strict=True):
        select_bands(ds, bands, f"guide {path}")
        if (ds.crs, ds.transform, ds.shape) != (first.crs, first.transform, first.shape) or (
                ds.count != first.count and bands is None):  # fmt: skip
            raise InputError(
                f"the guides of a time series must share one grid: {paths[0]} is {first.width} x "
                f"{first.height} px, {first.count} bands, at {tuple(first.transform)[:6]} in "
                f"{first.crs}; {path} is {ds.width} x {ds.height} px, {ds.count} bands, at "
                f"{tuple(ds.transform)[:6]} in {ds.crs}: warp the dates onto one grid first "
                "(gdalwarp -te ... -tr ... -tap, or rasterio.warp.reproject)")


def _stats_params(stats: gu.GuideStats | dict[str, gu.GuideStats] | None) -> Any:
    """The guide statistics as a resumed run must find them (a series': each date's)."""
    if isinstance(stats, dict):
        return {k: _stats_params(v) for k, v in stats.items()}
    return None if stats is None else [stats.lo.tolist(), stats.hi.tolist()]


def _plan_tags(plan: LowresPlan, rel: GridRelation) -> dict[str, str]:
    """The tags of one raster's output: its name, render, unit, warp and kept tags."""
    unit = plan.part.unit
    return {"geoupsample_lowres": os.path.basename(plan.path),
            "geoupsample_render": json.dumps(plan.part.render),
            **({"geoupsample_probability_unit": f"{unit:g}"} if unit else {}),
            **({"geoupsample_warp": warp_text(plan.warp, rel)} if plan.warp else {}),
            **plan.kept_tags}  # fmt: skip


def _stacked_spec(out_path: str, plans: Sequence[LowresPlan], rel: GridRelation,
                  dtype: str | None, common_tags: dict[str, str],
                  spec_kw: dict[str, Any]) -> tiling.OutputSpec:  # fmt: skip
    """One output holding every raster's bands in order: each band described as
    ``<raster stem>:<band description>``; the rasters' dtype and nodata when they agree, else
    float32 with NaN (or ``dtype``)."""
    first = plans[0]
    same = all((p.out_dtype, str(p.nodata), p.nodata_mask) == (
        first.out_dtype, str(first.nodata), first.nodata_mask) for p in plans)  # fmt: skip
    if dtype or same:
        out_dtype, nodata, mask = first.out_dtype, first.nodata, first.nodata_mask
    else:
        out_dtype, nodata, mask = "float32", float("nan"), False
    names, colormaps, packing = [], {}, {"scales": [], "offsets": [], "units": []}
    for p in plans:
        stem = os.path.splitext(os.path.basename(p.path))[0]
        for k, d in enumerate(p.descriptions):
            names.append(f"{stem}:{d}" if d else (stem if len(p.descriptions) == 1
                                                  else f"{stem}:band{k + 1}"))  # fmt: skip
            colormap = p.colormaps.get(k + 1)
            if colormap is not None and out_dtype == p.out_dtype:
                colormaps[len(names)] = colormap
            packing["scales"].append(p.packing.get("scales", [1.0] * len(p.descriptions))[k])
            packing["offsets"].append(p.packing.get("offsets", [0.0] * len(p.descriptions))[k])
            packing["units"].append(p.packing.get("units", [None] * len(p.descriptions))[k])
    packing = {k: v for k, v in packing.items() if any(
        x not in (1.0, 0.0, None) for x in v)}  # fmt: skip
    tags = {**common_tags,
            "geoupsample_lowres": json.dumps([os.path.basename(p.path) for p in plans]),
            "geoupsample_render": json.dumps([p.part.render for p in plans])}
    return tiling.OutputSpec(out_path, count=len(names), dtype=out_dtype, nodata=nodata,
                             nodata_mask=mask, descriptions=names, tags=tags,
                             colormaps=colormaps, **packing, **spec_kw)  # fmt: skip


def warn_clipped(report: tiling.RunReport, spec: tiling.OutputSpec,
                 clipped: int | None = None) -> None:  # fmt: skip
    """Warn when an integer output clipped values it cannot hold (``--dtype uint8`` for a band
    of reflectances in the thousands), saying how many (``clipped``; default the run's count)
    and what to pass instead."""
    clipped = int(report.extra.get("clipped_values", 0) if clipped is None else clipped)
    bounds = tiling.writer.integer_range(spec.dtype, spec.nodata)
    if not clipped or bounds is None:
        return
    total = max(1.0, report.megapixels * 1e6 * spec.count)
    name = f"{os.path.basename(spec.path)}: " if len(report.extra.get("paths", [])) > 1 else ""
    warn_caller(
        f"{name}{clipped} output values ({clipped / total:.1%}) lay outside what {spec.dtype} "
        f"holds ({bounds[0]:g} to {bounds[1]:g}) and were clipped to it: pass a wider --dtype "
        "(e.g. float32)")


def _kept_colormaps(lr: rasterio.io.DatasetReader, indexes: Sequence[int], method: str,
                    out_dtype: str) -> dict[int, dict]:
    """The low-res bands' colour tables, by output band, when ``nearest`` copies their class
    numbers into a uint8/uint16 output (other methods refuse class rasters:
    :func:`~geoupsample.inputs.check_not_class_map`)."""
    if method != "nearest" or out_dtype not in ("uint8", "uint16"):
        return {}
    tables = {k: colour_table(lr, i) for k, i in enumerate(indexes, 1)}
    return {k: table for k, table in tables.items() if table is not None}


def band_packing(ds: Any, indexes: Sequence[int]) -> dict[str, Any]:
    """The scales, offsets and units of bands ``indexes`` (1-based) of ``ds``, as
    :class:`tiling.OutputSpec` arguments (only those that are set). Every method's output is a
    weighted mean of stored values with weights summing to one, so it is in the same stored
    units: a packed reflectance (uint16 x 2.75e-5 - 0.2) keeps its scale and offset."""
    scales = [float(ds.scales[i - 1]) for i in indexes]
    offsets = [float(ds.offsets[i - 1]) for i in indexes]
    units = [ds.units[i - 1] or None for i in indexes]
    packing: dict[str, Any] = {}
    if any(v != 1.0 for v in scales):
        packing["scales"] = scales
    if any(v != 0.0 for v in offsets):
        packing["offsets"] = offsets
    if any(units):
        packing["units"] = units
    return packing


def warp_text(grid: tiling.Warp, rel: GridRelation) -> str:
    """The ``geoupsample_warp`` tag: how the low-res raster was warped."""
    return (f"{grid.resampling} onto the guide's CRS, cells of {rel.scale_text} guide pixels "
            f"({grid.width} x {grid.height} cells from the guide's origin)")


def _file_sample(lr: rasterio.io.DatasetReader, indexes: Sequence[int],
                 window: Window) -> Callable[[], torch.Tensor]:
    """The decimated sample (:func:`lowres_sample`) of bands ``indexes`` of a low-res raster
    file over ``window``, values as stored (NaN only where masked), read once when first
    asked for."""
    read = file_reader(lr, indexes, None)  # as stored: scene_render applies the nodata value
    return functools.cache(lambda: lowres_sample(read, window))


def _render_options(method: str, kind: str, lr: rasterio.io.DatasetReader,
                    sample: Callable[[], torch.Tensor], **overrides: float | None,
                    ) -> SceneRender:
    """:func:`scene_render` for a low-res raster file from ``sample()`` (see
    :func:`_file_sample`); its ``probability_scale`` tag, if any, declares the unit."""
    return scene_render(method, kind, sample, declared_unit(lr.tags()), lr.nodata, **overrides)


def params_text(method: str, iters: int, radius: int, tile: int, halo: int, blend: str,
                seed: int) -> str:
    """The ``geoupsample_params`` tag: the run's fit and tiling parameters, for provenance."""
    fit = f"iters={iters} radius={radius} seed={seed} " if method in ("gsjbu", "jbu") else ""
    if method == "jbu":
        fit = f"radius={radius} "
    # the interpolations use the guide for its grid and nodata only: no normalisation to record
    norm = " guide_norm=scene_percentiles_1_99" if method in ("gsjbu", "jbu") else ""
    return f"{fit}tile={tile} halo={halo} blend={blend}{norm}"


def _out_dtype(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in tiling.writer.SUPPORTED_DTYPES:
        raise InputError(f"unsupported output dtype {dtype!r}; use one of "
                         f"{', '.join(tiling.writer.SUPPORTED_DTYPES)}")
    return name


#: Tags of the low-res raster that describe its values and so hold for the output too (as
#: ``geoupsample segment --probs`` writes them).
KEPT_TAGS = ("probability_scale", "class_names")


def _kept_tags(tags: dict[str, str], indexes: Sequence[int], count: int) -> dict[str, str]:
    """The low-res raster's :data:`KEPT_TAGS`; ``class_names`` (one per band) only when every
    band is upsampled, in the file's order."""
    kept = {k: tags[k] for k in KEPT_TAGS if k in tags}
    if list(indexes) != list(range(1, count + 1)):
        kept.pop("class_names", None)
    return kept


def _output_nodata(lr_nodata: float | None, lr_dtype: np.dtype,
                   dtype: str) -> tuple[float | None, bool]:
    """The output's nodata value, and whether it is marked by a mask band instead.

    The low-res nodata when the output dtype holds it; else the dtype's default (NaN, or the
    integer max / min that valid values are clipped away from), unless that default could be a
    valid value of an integer low-res raster without nodata (uint8 -> uint8: 255): then no value
    is reserved and nodata goes to an internal mask band, so that every input value survives.
    """
    dt = np.dtype(dtype)
    if lr_nodata is not None:
        if dt.kind == "f" or (not math.isnan(lr_nodata) and float(lr_nodata).is_integer()
                              and np.iinfo(dt).min <= lr_nodata <= np.iinfo(dt).max):
            return float(lr_nodata), False
    default = tiling.default_nodata(dtype)
    if lr_nodata is None and dt.kind in "iu" and lr_dtype.kind in "iu":
        info = np.iinfo(lr_dtype)
        if info.min <= default <= info.max:
            return None, True
    return default, False
