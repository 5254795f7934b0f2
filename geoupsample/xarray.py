"""Guided upsampling of rioxarray DataArrays, lazily with dask.

>>> import rioxarray
>>> from geoupsample.xarray import upsample
>>> lr = rioxarray.open_rasterio("probs_10m.tif", chunks={"x": 1024, "y": 1024})
>>> guide = rioxarray.open_rasterio("image_2m.tif", chunks={"x": 1024, "y": 1024})
>>> hr = upsample(lr, guide, method="gsjbu", tile=1024, halo=64)   # lazy, on the guide's grid
>>> hr.rio.to_raster("probs_2m.tif")     # same pixels as `geoupsample upsample ... --dtype float32`

The grids follow the rules of :mod:`geoupsample.grids` (same CRS, a whole or simple fractional
scale, origins on the guide's pixel lattice; ``warp=`` reprojects a low-res array on another
grid), and the computation is the same tiles blended the same way as the CLI, so the values
agree exactly.

:func:`features`, :func:`segment` and :func:`predict` do the same for ``geoupsample features``,
``geoupsample segment`` and ``geoupsample predict`` on a scene DataArray (lazy too; the PCA and
the probe are fitted, and the model checked, when called)::

    scene = rioxarray.open_rasterio("scene.tif", chunks={"x": 1024, "y": 1024})
    feats = features(scene, "timm:resnet18", weights="w.safetensors", layer=2,
                     bands=["red", "green", "blue"], pca=8)
    classes = segment(scene, "polygons.geojson", "class", "spectral", cell_size=8)
    probs = predict(scene, "model.onnx", bands=[2, 3, 4], mean=[...], std=[...])

Their arguments mean what the CLI's options of the same names do: ``bands=`` chooses the scene's
bands (``--bands``), ``model_bands=`` those of them a timm model sees (``--model-bands``),
``layer=`` is the backbone's layer (``--layer``) and segment's ``labels_layer=`` the labels
file's (``--labels-layer``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import rioxarray
import xarray as xr

import tiling
from geoupsample.backbones import Backbone
from geoupsample.caller_warnings import warn_caller
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.core.series import STABLE_TOLERANCE, WARM_BLEND, WARM_ITERS
from geoupsample.featuremaps import bands_tag, plan_features
from geoupsample.grids import check_fitted_scale, overlap_window, relate_or_nest
from geoupsample.inputs import (
    InputError,
    array_guide_stats,
    array_reader,
    check_method_options,
    model_band_choice,
    select_bands,
)
from geoupsample.options import RenderOptions, TilingOptions, takes_option_groups
from geoupsample.pipeline import LowresPart, UpsampleTile, read_context, tile_blend, warp_text
from geoupsample.render_settings import declared_unit, lowres_sample, scene_render
from geoupsample.scenes import ArrayScene, check_not_rotated, scene_aoi
from geoupsample.workers import check_device
from tiling.aoi import load_aoi
from tiling.execute import gdal_env
from tiling.lazy import to_dask


def _as_bands(a: xr.DataArray, what: str) -> xr.DataArray:
    if not isinstance(a, xr.DataArray):
        raise InputError(f"{what} must be an xarray.DataArray (e.g. rioxarray.open_rasterio), "
                         f"got {type(a).__name__}")
    try:
        y, x = a.rio.y_dim, a.rio.x_dim
    except rioxarray.exceptions.MissingSpatialDimensionError:
        raise InputError(f"{what} has dims {a.dims}: name its spatial dims y and x (or "
                         "latitude and longitude), e.g. with .rename(...)") from None
    if a.ndim == 2:
        a = a.expand_dims("band")
    if a.ndim != 3:
        raise InputError(f"{what} must be [band, y, x]; got dims {a.dims}")
    a = a.transpose(..., y, x)  # (band, y, x) whatever order it came in
    if a.shape[0] == 0:
        raise InputError(f"{what} has no bands")
    if np.dtype(a.dtype).kind not in "uif":
        raise InputError(f"{what} has unsupported dtype {a.dtype}; use integer or float data")
    return _north_up(a, y, x)


def _north_up(a: xr.DataArray, y: str, x: str) -> xr.DataArray:
    """``a`` with rows from north to south and columns from west to east (as GeoTIFFs are),
    its transform recomputed from the coordinates (``sortby("y")`` leaves a stale one)."""
    flips = {}
    for dim, forward in ((y, -1), (x, 1)):  # north-up: y decreasing, x increasing
        if dim in a.coords and a.sizes[dim] > 1:
            step = float(a[dim][1] - a[dim][0])
            if step * forward < 0:
                flips[dim] = slice(None, None, -1)
    if not flips:
        return a
    a = a.isel(flips)
    return a.rio.write_transform(a.rio.transform(recalc=True))


@takes_option_groups(TilingOptions, RenderOptions)
def upsample(lowres: xr.DataArray, guide: xr.DataArray, method: str = "gsjbu",
             tile: int = 1024, halo: int = 64, iters: int = 50, radius: int = 3,
             device: str | None = None, seed: int = 0, blend: str = "auto",
             aoi: Any = None, aoi_crs: Any = None, blocksize: int = 256, kind: str = "auto",
             consistency: float | None = None, self_guidance: float | None = None,
             min_sigma_r: float | None = None, warp: str | None = None,
             keep_missing: bool = False, warm_iters: int = WARM_ITERS,
             stable_tolerance: float = STABLE_TOLERANCE, _parts: int = 1,
             _guides: Sequence[xr.DataArray] | None = None, *,
             tiling_options: TilingOptions | None = None,
             render_options: RenderOptions | None = None) -> xr.DataArray:
    """Upsample ``lowres`` onto ``guide``'s grid; returns a lazy dask-backed DataArray.

    Args:
        lowres: ``[band, y, x]`` (or ``[y, x]``) rioxarray DataArray, numpy- or dask-backed;
            or a stack of such rasters on one grid along one more dimension (``[time, band, y,
            x]``, any name for the first; or ``[time, y, x]``): each tile is then fitted once and
            every raster of the stack rendered with the same kernels (the pixels of one call
            per raster), and the result has that dimension too.
        guide: ``[band, y, x]`` rioxarray DataArray in the same CRS, on a grid whose pixel
            divides ``lowres``'s pixel (other grids are refused unless ``warp`` is given). Or a
            time series: ``[time, band, y, x]`` (or ``[time, y, x]``) with the same dimension
            and coordinates as a stacked ``lowres``: each date's raster upsampled onto its own
            guide, the dates' kernels fitted in order, each from the date before with
            ``warm_iters`` steps (:mod:`geoupsample.time_series`), each date's guide normalised
            by its own statistics.
        method, tile, halo, iters, radius, device, seed, blend, aoi, aoi_crs: as in
            :func:`geoupsample.pipeline.upsample_raster`.
        blocksize: output chunk alignment (use the block size you will write with).
        kind, consistency, self_guidance, min_sigma_r: the render, decided once for the whole
            array (``kind="auto"`` from a decimated sample of ``lowres``) as in
            :func:`~geoupsample.pipeline.upsample_raster`, so that every chunk renders alike.
        warp: as in :func:`~geoupsample.pipeline.upsample_raster`: the resampling with which a
            ``lowres`` on a grid that does not nest in the guide's is reprojected onto one that
            does (with the CLI's own :class:`tiling.Warp`: the low-res array is computed and
            warped in memory when this is called).
        keep_missing: NaN on the whole footprint of every missing cell of ``lowres``, as in
            :func:`~geoupsample.pipeline.upsample_raster`.
        warm_iters: a time series' gsjbu fit steps of each date after the first.
        stable_tolerance: a time series' guide change under which a date's output is carried
            forward from the date before (:func:`geoupsample.time_series.upsample_series`).
        tiling_options, render_options: options as groups (:mod:`geoupsample.options`; of the tiling
            ``tile``, ``halo``, ``blocksize``, ``aoi``, ``aoi_crs``; of the render all): a field
            given (not None) counts as the keyword of its name; the keyword given too with another
            value, or a field not taken, is an :class:`~geoupsample.inputs.InputError`.

    Returns:
        float32 ``[band, y, x]`` on the guide's coordinates with its CRS and transform, NaN as
        nodata, band ``long_name`` from ``lowres`` and attributes recording the method and the
        render (``geoupsample_render``, JSON; ``geoupsample_warp`` with a warp, as the CLI's
        tag). The scene-wide guide statistics (for
        ``jbu``/``gsjbu``) and the render's sample are computed eagerly from regular
        subsamples; everything else runs when the result is computed.
    """
    from geoupsample import __version__, tune_allocator

    tune_allocator()  # before dask's threads allocate: see geoupsample.core.allocator
    check_method_options(method, iters, radius, seed)  # now, not when computed
    try:
        check_device(device, local=False)  # the name (a cluster's workers may have the GPU)
    except ValueError as err:
        raise InputError(str(err)) from err
    stack_dim, stack = _stack_of(lowres)
    guide_dim, guides = _stack_of(guide, "guide")
    if guide_dim is not None and stack_dim != guide_dim:
        raise InputError(f"guide is a stack along {guide_dim!r} (a time series of guides) but "
                         f"lowres is {'one raster' if stack_dim is None else 'a stack along '}"
                         f"{'' if stack_dim is None else repr(stack_dim)}: give lowres the "
                         f"same {guide_dim!r} dimension, a raster per guide")
    if stack_dim is not None:
        return _upsample_stack(stack_dim, stack, guides if guide_dim else guide, method=method,
                               tile=tile, halo=halo, iters=iters, radius=radius, device=device,
                               seed=seed, blend=blend, aoi=aoi, aoi_crs=aoi_crs,
                               blocksize=blocksize, kind=kind, consistency=consistency,
                               self_guidance=self_guidance, min_sigma_r=min_sigma_r, warp=warp,
                               keep_missing=keep_missing, warm_iters=warm_iters,
                               stable_tolerance=stable_tolerance)
    lowres, guide = _as_bands(lowres, "lowres"), _as_bands(guide, "guide")
    lr_t, hr_t = lowres.rio.transform(), guide.rio.transform()
    rel, nesting = relate_or_nest(lowres.rio.crs, lr_t, lowres.shape[1:], guide.rio.crs, hr_t,
                                  guide.shape[1:], warp)
    check_fitted_scale(method, rel, tuple(lowres.shape[1:]))
    # the render is decided from the values as given, before any warp (as the CLI does)
    window = overlap_window(lr_t, lowres.shape[1:], guide.rio.bounds(), guide.rio.crs,
                            lowres.rio.crs)
    read = array_reader(lowres.data, None)  # as stored; computes only the sampled slices
    scene = scene_render(method, kind, lambda: lowres_sample(read, window),
                         declared_unit(lowres.attrs), lowres.rio.nodata,
                         consistency=consistency, self_guidance=self_guidance,
                         min_sigma_r=min_sigma_r)
    blend, halo = tile_blend(blend, method, halo, rel.scale)
    render = {**scene.arguments, **({"keep_missing": True} if keep_missing else {})}
    if nesting is not None:
        lowres = _warped(lowres, nesting)
        lr_t = lowres.rio.transform()
    lr_nodata, hr_nodata = lowres.rio.nodata, guide.rio.nodata
    # probabilities with a nodata value: read as stored, missing where every band holds it
    cell_nodata = scene.cell_nodata if nesting is None else None
    if cell_nodata is not None:
        lr_nodata = None
    stats: Any = None
    if method not in INTERPOLATIONS:
        with gdal_env():  # a file-backed guide is scanned once: keep GDAL's cache bounded
            stats = array_guide_stats(guide.data, hr_nodata, "DataArray") if not _guides else {
                f"guide{i}": array_guide_stats(g.data, hr_nodata, f"guide at {i}")
                for i, g in enumerate(_guides)}  # fmt: skip
    height, width = guide.shape[1:]
    grid = tiling.TileGrid(height, width, tile=tile, halo=halo, align=rel.period,
                           offset=rel.offset, block=blocksize, region=rel.region, blend=blend,
                           context=read_context(method, rel))
    geom = load_aoi(aoi, guide.rio.crs, aoi_crs) if aoi is not None else None
    inputs = {"guide": tiling.ArrayInput(guide.data, hr_t, hr_nodata)}
    if _parts == 1:
        job = UpsampleTile(method, stats, iters=int(iters), radius=radius, device=device,
                           seed=seed, render=render, unit=scene.unit, cell_nodata=cell_nodata,
                           shift=rel.shift)
        inputs["lowres"] = tiling.ArrayInput(lowres.data, lr_t, lr_nodata, rel.read_misfit)
    else:  # a stack's rasters, their bands in order: a part each, one fit per tile (per
        # date: a time series' parts each have their own guide, fitted in order)
        per = lowres.shape[0] // _parts
        parts = [LowresPart(f"lowres{i}", render, scene.unit, cell_nodata,
                            guide=f"guide{i}" if _guides else "guide")
                 for i in range(_parts)]  # fmt: skip
        job = UpsampleTile(method, stats, iters=int(iters), radius=radius, device=device,
                           seed=seed, parts=parts, warm=bool(_guides), warm_iters=warm_iters,
                           stable_tolerance=stable_tolerance, shift=rel.shift)
        if _guides:
            del inputs["guide"]
            for i, g in enumerate(_guides):
                inputs[f"guide{i}"] = tiling.ArrayInput(g.data, hr_t, hr_nodata)
        for i in range(_parts):
            inputs[f"lowres{i}"] = tiling.ArrayInput(lowres.data[i * per : (i + 1) * per], lr_t,
                                                     lr_nodata, rel.read_misfit)  # fmt: skip
    arr = to_dask(job, inputs, grid, lowres.shape[0], hr_t, geom)
    out = xr.DataArray(arr, dims=("band", guide.dims[1], guide.dims[2]),
                       coords={"band": lowres["band"].values if "band" in lowres.coords
                               else np.arange(1, lowres.shape[0] + 1),
                               guide.dims[1]: guide[guide.dims[1]].values,
                               guide.dims[2]: guide[guide.dims[2]].values},
                       )
    out.name = lowres.name  # not the dask graph's name
    out.attrs.update(_value_attrs(lowres))
    # scalar coordinates (a time stamp, a sensor) describe the values too; spatial_ref is redone
    out = out.assign_coords({k: v for k, v in lowres.coords.items()
                             if v.ndim == 0 and k != "spatial_ref"})  # fmt: skip
    out.attrs.update(geoupsample_version=__version__, geoupsample_method=method,
                     geoupsample_render=json.dumps(render))
    if scene.unit:
        out.attrs["geoupsample_probability_unit"] = f"{scene.unit:g}"
    if nesting is not None:
        out.attrs["geoupsample_warp"] = warp_text(nesting, rel)
    out = out.rio.write_crs(guide.rio.crs).rio.write_transform(hr_t)
    return out.rio.write_nodata(np.nan, encoded=False)


def _stack_of(a: xr.DataArray, name: str = "lowres") -> tuple[str | None, xr.DataArray]:
    """``(dim, a)`` for a stack of rasters along one dimension that is neither spatial nor
    ``band`` (``a`` then ``[dim, band, y, x]``), else ``(None, a)``."""
    if not isinstance(a, xr.DataArray):
        return None, a
    try:
        y, x = a.rio.y_dim, a.rio.x_dim
    except rioxarray.exceptions.MissingSpatialDimensionError:
        return None, a
    others = [d for d in a.dims if d not in (y, x, "band")]
    # a 3-D array's third dimension is its bands, whatever its name, unless it is time
    if not others or (a.ndim == 3 and others[0] != "time"):
        return None, a
    if len(others) > 1:
        raise InputError(f"{name} has dims {a.dims}: at most one dimension besides band, y and "
                         "x (a time series, say); stack the others into it first")
    if "band" not in a.dims:
        a = a.expand_dims("band", axis=1)
    return others[0], a.transpose(others[0], "band", y, x)


def _upsample_stack(dim: str, stack: xr.DataArray, guide: xr.DataArray, **kwargs: Any
                    ) -> xr.DataArray:  # fmt: skip
    """:func:`upsample` of the rasters of ``stack [dim, band, y, x]`` in one pass (one job of
    several parts: a fit per tile, a render per raster), the render decided once from the
    whole stack. A ``guide [dim, band, y, x]`` is a time series: each raster with its guide."""
    n = stack.sizes[dim]
    guides = None
    if dim in guide.dims:
        guides = _series_guides(dim, stack, guide)
        guide = guides[0]
        kwargs["_guides"] = guides
    flat = stack.stack(_raster=(dim, "band")).transpose("_raster", ...)
    flat = flat.drop_vars(["_raster", dim, "band"], errors="ignore")
    flat = flat.rio.write_crs(stack.rio.crs).rio.write_transform(stack.rio.transform())
    one = upsample(flat, guide, **{**kwargs, "_parts": n})
    bands = stack.sizes["band"]
    data = one.data.reshape(n, bands, *one.shape[1:])
    out = xr.DataArray(data, dims=(dim, "band", *one.dims[1:]),
                       coords={dim: stack[dim].values, "band": stack["band"].values if "band" in
                               stack.coords else np.arange(1, bands + 1),
                               **{d: one[d].values for d in one.dims[1:]}},
                       attrs=one.attrs)  # fmt: skip
    out.name = stack.name
    if guides is not None:
        out.attrs["geoupsample_series"] = json.dumps(
            {"warm_iters": int(kwargs.get("warm_iters", WARM_ITERS)), "warm_blend": WARM_BLEND,
             "stable_tolerance": float(kwargs.get("stable_tolerance", STABLE_TOLERANCE))})
    out = out.rio.write_crs(one.rio.crs).rio.write_transform(one.rio.transform())
    return out.rio.write_nodata(np.nan, encoded=False)


def _series_guides(dim: str, stack: xr.DataArray, guide: xr.DataArray) -> list[xr.DataArray]:
    """The guides ``[band, y, x]`` of a time series, one per raster of ``stack``, checked: the
    same ``dim`` values in the same order, and one grid."""
    lr_values, g_values = stack[dim].values, guide[dim].values
    if len(lr_values) != len(g_values) or not np.array_equal(lr_values, g_values):
        raise InputError(f"lowres and guide are time series along {dim!r} with different "
                         f"values ({len(lr_values)} and {len(g_values)}: {lr_values[:3]}... and "
                         f"{g_values[:3]}...): give each lowres raster its guide, in the same "
                         f"order (e.g. guide.sel({dim}=lowres.{dim}))")
    out = []
    for i in range(len(g_values)):
        g = guide.isel({dim: i}, drop=True)
        out.append(g.rio.write_crs(guide.rio.crs).rio.write_transform(guide.rio.transform()))
    return out


#: Low-res attributes that describe the stored encoding or the old grid, not the values.
#: ``scale_factor`` and ``add_offset`` are kept unless 1 and 0: the output holds the same stored
#: values (weighted means of them), which they still turn into physical ones (rioxarray applies
#: them itself, and leaves them out of the attributes, with ``mask_and_scale=True``).
ENCODING_ATTRS = frozenset({"_FillValue", "missing_value", "grid_mapping", "nodata"})


def _identity_packing(key: str, value: Any) -> bool:
    """Whether ``key: value`` is a ``scale_factor`` of 1 or an ``add_offset`` of 0 (rioxarray
    writes them on every array; per-band tuples are compared band by band)."""
    neutral = {"scale_factor": 1.0, "add_offset": 0.0}.get(key)
    return neutral is not None and bool(np.all(np.asarray(value, dtype=float) == neutral))


def _value_attrs(lowres: xr.DataArray) -> dict[str, Any]:
    """The attributes of ``lowres`` that hold for its upsampled values (``units``,
    ``long_name``, ``description``...). rioxarray keeps a multi-band file's per-band tuples on
    a band selection: those are kept only when they name the bands we have (otherwise
    ``.rio.to_raster`` refuses to write)."""
    n = lowres.shape[0]
    kept = {}
    for key, value in lowres.attrs.items():
        if key in ENCODING_ATTRS or _identity_packing(key, value):
            continue
        if isinstance(value, (tuple, list)) and len(value) != n:
            continue
        if key == "long_name" and isinstance(value, str) and n != 1:
            continue
        kept[key] = value
    return kept


def _warped(lowres: xr.DataArray, grid: tiling.Warp) -> xr.DataArray:
    """``lowres`` reprojected by the CLI's own warp ``grid`` (over an in-memory copy): float32,
    NaN for nodata and outside its footprint, ``long_name`` and the other attributes kept."""
    from affine import Affine
    from rasterio.io import MemoryFile

    data = lowres.values
    transform, height, width = Affine(*grid.transform), grid.height, grid.width
    nodata = lowres.rio.nodata
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", count=data.shape[0], height=data.shape[1],
                      width=data.shape[2], dtype=data.dtype, crs=lowres.rio.crs,
                      transform=lowres.rio.transform(), nodata=nodata) as ds:
            ds.write(data)
        with mem.open() as ds, grid.open(ds) as vrt:
            warped = vrt.read()
    ys = transform.f + transform.e * (np.arange(height) + 0.5)
    xs = transform.c + transform.a * (np.arange(width) + 0.5)
    dims = lowres.dims
    out = xr.DataArray(warped, dims=dims, coords={dims[0]: lowres[dims[0]].values,
                                                  dims[1]: ys, dims[2]: xs},
                       attrs={k: v for k, v in lowres.attrs.items() if k != "_FillValue"})
    out = out.rio.write_crs(grid.crs).rio.write_transform(transform)
    return out.rio.write_nodata(np.nan, encoded=False)


def _descriptions(scene: xr.DataArray) -> tuple[str, ...]:
    """The band descriptions of a ``[band, y, x]`` ``scene``: its ``long_name`` (rioxarray's
    band descriptions: one string per band, or a string for one band), "" where a band has none
    or when they do not fit the bands (a selection of a multi-band file keeps all of them)."""
    n = scene.shape[0]
    long_name = scene.attrs.get("long_name")
    names = [long_name] if isinstance(long_name, str) else list(long_name or ())
    if len(names) != n:
        return ("",) * n
    return tuple(str(v) if v else "" for v in names)


def _chosen_bands(scene: xr.DataArray, bands: Sequence[int | str] | None
                  ) -> tuple[xr.DataArray, tuple[int, ...], tuple[str, ...]]:
    """``scene`` reduced to ``bands`` (1-based positions along its band dim, or band
    descriptions: the CLI's ``--bands``, matched by the CLI's own rules), with the chosen
    positions and names (a band without description is ``band<i>``, as in the CLI).

    ``scene`` is ``[band, y, x]`` as :func:`_as_bands` returns it."""
    descs = _descriptions(scene)
    if isinstance(bands, (str, int)):
        bands = [bands]  # one band: "nir" or 4, not the letters of "nir"
    # select_bands reads only a dataset's band count and descriptions
    idx = select_bands(SimpleNamespace(count=len(descs), descriptions=descs), bands, "scene")
    names = tuple(descs[i - 1] or f"band{i}" for i in idx)
    if bands is not None:
        scene = scene.isel({scene.dims[0]: [i - 1 for i in idx]})
    return scene, idx, names


def _scene(scene: xr.DataArray, names: Sequence[str]) -> ArrayScene:
    """An :class:`~geoupsample.scenes.ArrayScene` from a rioxarray ``[band, y, x]`` array
    (as :func:`_as_bands` returns it) and its band names."""
    if scene.rio.crs is None:
        raise InputError("the scene has no CRS; assign one (scene.rio.write_crs(...))")
    check_not_rotated(scene.rio.transform(), "scene")
    return ArrayScene(scene.data, tuple(names), scene.rio.crs, scene.rio.transform(),
                      scene.rio.nodata)


def _backbone(backbone: Backbone | str, scene: ArrayScene, options: dict[str, Any],
              model_bands: Sequence[int | str] | None = None) -> Backbone:
    """``backbone``, or the backbone it names built for ``scene``'s bands with ``options``
    (the CLI's backbone options; ``model_bands``: its ``--model-bands``)."""
    if not isinstance(backbone, str):
        if options or model_bands is not None:
            raise InputError("backbone options (model_bands=, layer=, weights=...) are for a "
                             "backbone given by name; build a Backbone object with them instead")
        return backbone
    from geoupsample.backbones import create

    if model_bands is not None:
        if backbone.strip().lower() == "spectral":
            raise InputError("the spectral backbone takes no model bands; drop model_bands= "
                             "(use bands= to choose the scene's bands)")
        options = {**options, "bands": model_band_choice(model_bands)}
    return create(backbone, band_names=scene.band_names, **options)


def _on_scene_grid(arr: Any, scene: xr.DataArray, bands: Any, attrs: dict[str, Any],
                   nodata: float) -> xr.DataArray:
    out = xr.DataArray(arr, dims=("band", scene.dims[-2], scene.dims[-1]),
                       coords={"band": bands, scene.dims[-2]: scene[scene.dims[-2]].values,
                               scene.dims[-1]: scene[scene.dims[-1]].values},
                       attrs=attrs)
    out = out.rio.write_crs(scene.rio.crs).rio.write_transform(scene.rio.transform())
    return out.rio.write_nodata(nodata, encoded=False)


@takes_option_groups(TilingOptions, RenderOptions)
def features(scene: xr.DataArray, backbone: Backbone | str = "spectral", *,
             bands: Sequence[int | str] | None = None,
             model_bands: Sequence[int | str] | None = None,
             pca: Any = None, method: str = "gsjbu", iters: int = 50, radius: int = 3,
             tile: int = 512, halo: int = 64, device: str | None = None, seed: int = 0,
             consistency: float | None = None, aoi: Any = None, aoi_crs: Any = None,
             blocksize: int = 256, tiling_options: TilingOptions | None = None,
             render_options: RenderOptions | None = None,
             **backbone_options: Any) -> xr.DataArray:
    """Backbone features of ``scene`` upsampled to its grid; a lazy dask-backed DataArray.

    The same tiles, blended the same way, as :func:`geoupsample.featuremaps.features_raster`
    (``geoupsample features``): computing the result gives the pixels of its float32 GeoTIFF,
    the arguments meaning what the CLI's options of the same names do.

    Args:
        scene: ``[band, y, x]`` rioxarray DataArray (numpy- or dask-backed) with a CRS; its
            band names are its ``long_name`` (rioxarray's band descriptions; ``band<i>`` for a
            band without one).
        backbone: a :class:`~geoupsample.backbones.Backbone`, or a name for
            :func:`geoupsample.backbones.create` (``"spectral"``, ``"timm:<model>"``) built for
            the chosen bands with ``model_bands`` and ``backbone_options``.
        bands: the scene's bands to use at all, as guide and backbone input (CLI: ``--bands``):
            1-based positions along the band dim (a whole file's band numbers) or band names
            (``long_name``: exact, else ignoring case when that names one band); default all.
        model_bands: which of the chosen bands a timm model sees, names or 1-based indexes
            among them (CLI: ``--model-bands``; e.g. ``["red", "green", "blue"]`` for an RGB
            model on a 4-band scene); default all. Not for ``spectral``.
        backbone_options: the other options of the backbone, as the CLI's: ``layer=2``,
            ``weights="w.safetensors"``, ``pretrained=True``, ``random_init=True``,
            ``adapt_stem=True`` (timm); ``cell_size=10``, ``context=0`` (spectral); or any
            keyword of the backbone's class.
        pca, method, iters, radius, tile, halo, device, seed, consistency, aoi, aoi_crs: as in
            :func:`~geoupsample.featuremaps.features_raster`.
        blocksize: output chunk size (the block size of the file you will write).
        tiling_options, render_options: options as groups (:mod:`geoupsample.options`; of the tiling
            ``tile``, ``halo``, ``blocksize``, ``aoi``, ``aoi_crs``; of the render only
            ``consistency``): a field given (not None) counts as the keyword of its name; the
            keyword given too with another value, or a field not taken, is an
            :class:`~geoupsample.inputs.InputError`.

    Returns:
        float32 ``[band, y, x]`` on the scene's coordinates with its CRS and transform, NaN as
        nodata, ``long_name`` the feature (or ``pca_<i>``) names, and the tags of the CLI's
        file as attributes (``geoupsample_backbone``, ``geoupsample_bands``: the chosen
        bands...). Computed eagerly: the scene-wide guide statistics (a regular subsample) and
        the PCA (a sample of windows); the tiles run when the result is computed.
    """
    scene = _as_bands(scene, "scene")  # north-up (band, y, x): the output's grid
    scene, idx, names = _chosen_bands(scene, bands)
    sc = _scene(scene, names)
    bb = _backbone(backbone, sc, backbone_options, model_bands)
    geom = scene_aoi(aoi, aoi_crs, sc)
    plan = plan_features(sc, bb, pca=pca, method=method, iters=iters, radius=radius, tile=tile,
                         device=device, seed=seed, consistency=consistency,
                         band_indexes=idx)
    arr = _lazy(plan.job, sc, bb.stride, len(plan.names), tile, halo, blocksize, geom)
    attrs = {**plan.tags, "long_name": tuple(plan.names)}
    return _on_scene_grid(arr, scene, np.arange(1, len(plan.names) + 1), attrs, np.nan)


@takes_option_groups(TilingOptions, RenderOptions)
def segment(scene: xr.DataArray, labels: Any = None, class_field: str | None = None,
            backbone: Backbone | str = "spectral", *, probe: Any = None,
            probabilities: bool = False, bands: Sequence[int | str] | None = None,
            model_bands: Sequence[int | str] | None = None,
            labels_crs: Any = None, labels_layer: str | None = None, method: str = "gsjbu",
            iters: int = 50, radius: int = 3, tile: int = 512, halo: int = 64,
            weight_decay: float | None = None, class_weight: str | None = "balanced",
            path: str | None = None,
            device: str | None = None, seed: int = 0, consistency: float | None = None,
            self_guidance: float | None = None, min_sigma_r: float | None = None,
            aoi: Any = None, aoi_crs: Any = None, blocksize: int = 256,
            tiling_options: TilingOptions | None = None,
            render_options: RenderOptions | None = None,
            **backbone_options: Any) -> xr.DataArray:
    """Segment ``scene`` from labelled polygons; a lazy dask-backed DataArray on its grid.

    The probe is fitted eagerly (as in :func:`geoupsample.segmentation.segment_raster`, on all
    the polygons); the probabilities' tiles run when the result is computed. The arguments
    mean what the CLI's options of the same names do (``geoupsample segment``).

    Args:
        scene: ``[band, y, x]`` rioxarray DataArray with a CRS.
        labels, class_field: a vector file (GeoJSON, GeoPackage, Shapefile...) or a
            GeoDataFrame, and the attribute holding the class (or
            :class:`~geoupsample.labels.LabelPolygons`).
        labels_crs, labels_layer: the polygons' CRS if the file does not say, and the layer
            holding them in a file with several (CLI: ``--labels-crs``, ``--labels-layer``).
        backbone, bands, model_bands, backbone_options: as in :func:`features`; ``layer=`` is
            the backbone's layer (CLI: ``--layer``), not the labels file's.
        probe: a fitted :class:`~geoupsample.heads.LinearProbe`, or the file ``--save-probe``
            wrote, applied instead of fitting one (``labels`` None).
        probabilities: return the class probabilities instead of the class raster.
        path: ``"features"`` or ``"probabilities"`` (CLI: ``--path``); None: the backbone's
            default, or a saved probe's.
        weight_decay: None (default): chosen by cross-validation over the polygons (CLI: no
            ``--weight-decay``); the held-out accuracy is in the attributes (``probe_cv``,
            ``probe_accuracy``) and a poor one is warned about.
        tiling_options, render_options: options as groups (:mod:`geoupsample.options`; of the tiling
            ``tile``, ``halo``, ``blocksize``, ``aoi``, ``aoi_crs``; of the render ``consistency``,
            ``self_guidance``, ``min_sigma_r``): a field given (not None) counts as the keyword of
            its name; the keyword given too with another value, or a field not taken, is an
            :class:`~geoupsample.inputs.InputError`.
        Other arguments: as in :func:`~geoupsample.segmentation.segment_raster`.

    Returns:
        by default uint8 ``[band, y, x]`` with bands ``class`` (index into
        ``attrs["class_names"]``) and ``confidence`` (winning probability x 254), nodata 255:
        the pixels of ``geoupsample segment``'s OUT (without ``--probs``). With
        ``probabilities=True``: float32 ``[band, y, x]``, one band per class (``long_name``),
        NaN as nodata: the pixels of ``--probs-dtype float32``. Attributes:
        ``geoupsample_backbone``, ``geoupsample_bands`` (the chosen bands), ``class_names``...
    """

    import dask.array as da

    from geoupsample.probe_selection import PoorProbeWarning
    from geoupsample.segmentation import (
        UINT8_NODATA,
        class_bands,
        class_values,
        labels_or_probe,
        plan_segment,
    )

    if isinstance(backbone_options.get("layer"), str):
        raise InputError(f"layer={backbone_options['layer']!r} is the backbone's layer (a "
                         "block or stage number, CLI: --layer); name the labels file's layer "
                         "with labels_layer= (CLI: --labels-layer)")
    scene = _as_bands(scene, "scene")  # north-up (band, y, x): the output's grid
    scene, idx, band_names = _chosen_bands(scene, bands)
    sc = _scene(scene, band_names)
    bb = _backbone(backbone, sc, backbone_options, model_bands)
    polys, fitted = labels_or_probe(labels, class_field, probe, sc, bb, labels_crs=labels_crs,
                                    layer=labels_layer)
    geom = scene_aoi(aoi, aoi_crs, sc)
    plan = plan_segment(sc, polys, bb, probe=fitted, path=path, scale=1.0, method=method,
                        iters=iters, radius=radius, tile=tile, weight_decay=weight_decay,
                        class_weight=class_weight, device=device, seed=seed,
                        consistency=consistency, self_guidance=self_guidance,
                        min_sigma_r=min_sigma_r)
    if plan.cv is not None and polys is not None and plan.cv.warning():
        warn_caller(plan.cv.warning() or "", PoorProbeWarning)  # at the caller's line
    names = plan.probe.classes
    k = len(names)
    probs = _lazy(plan.job, sc, bb.stride, k, tile, halo, blocksize, geom)
    from geoupsample import __version__

    attrs = {"geoupsample_version": __version__, "geoupsample_method": method,
             "geoupsample_backbone": bb.extra_repr(),
             "geoupsample_bands": bands_tag(idx, band_names),
             "class_names": json.dumps(list(names)), "geoupsample_path": plan.path,
             **(plan.cv.tags() if plan.cv is not None else {})}
    if probabilities:
        return _on_scene_grid(probs, scene, np.arange(1, k + 1),
                              {**attrs, "long_name": tuple(names)}, np.nan)
    classes = da.map_blocks(class_bands, probs, dtype=np.uint8, values=class_values(names),
                            chunks=((2,), *probs.chunks[1:]))
    return _on_scene_grid(classes, scene, np.array([1, 2]),
                          {**attrs, "long_name": ("class", "confidence")}, UINT8_NODATA)


@takes_option_groups(TilingOptions, RenderOptions)
def predict(scene: xr.DataArray, model: Any, *, bands: Sequence[int | str] | None = None,
            scale_factor: Sequence[float] | float | None = None,
            offset: Sequence[float] | float | None = None, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, input_size: int | None = None,
            overlap: float = 0.2, batch: int = 8, output: str = "auto",
            class_names: Sequence[str] | None = None, model_scale: int = 1,
            method: str = "gsjbu", iters: int = 50, radius: int = 3, seed: int = 0,
            consistency: float | None = None, self_guidance: float | None = None,
            min_sigma_r: float | None = None, classes: bool = False, tile: int = 512,
            halo: int = 64, device: str | None = None, aoi: Any = None, aoi_crs: Any = None,
            blocksize: int = 256, tiling_options: TilingOptions | None = None,
            render_options: RenderOptions | None = None) -> xr.DataArray:
    """Class probabilities of the user's own model (ONNX, TorchScript) over ``scene``; a lazy
    dask-backed DataArray on its grid: the pixels of ``geoupsample predict --dtype float32``.

    The model runs once when called (its classes, output stride and kind are read from a sample
    window); the tiles run when the result is computed. The arguments mean what the CLI's
    options of the same names do (:func:`geoupsample.prediction.predict_raster`); without
    ``scale_factor``/``offset`` the scene's own ``scale_factor``/``add_offset`` attributes
    apply (rioxarray keeps them when opened with ``mask_and_scale=False``).

    Args:
        tiling_options, render_options: options as groups (:mod:`geoupsample.options`; of the tiling
            ``tile``, ``halo``, ``blocksize``, ``aoi``, ``aoi_crs``; of the render ``consistency``,
            ``self_guidance``, ``min_sigma_r``): a field given (not None) counts as the keyword of
            its name; the keyword given too with another value, or a field not taken, is an
            :class:`~geoupsample.inputs.InputError`.

    Returns:
        float32 ``[band, y, x]``, one band per class (``long_name``), NaN as nodata; with
        ``classes=True`` the uint8 class raster (bands ``class`` and ``confidence``, nodata
        255), as ``--classes`` writes it. Attributes: ``class_names``, ``geoupsample_model``...
    """
    import dask.array as da

    from geoupsample.prediction import Preprocessing, plan_predict
    from geoupsample.segmentation import UINT8_NODATA, class_bands, class_values
    from geoupsample.user_model import load_model

    scene = _as_bands(scene, "scene")  # north-up (band, y, x): the output's grid
    attrs_in = dict(scene.attrs)
    scene, idx, names = _chosen_bands(scene, bands)
    sc = _scene(scene, names)
    net = load_model(model, device)
    packing = _packing(attrs_in, idx)
    pre = Preprocessing.of(len(idx), scale_factor, offset, mean, std, packing)
    geom = scene_aoi(aoi, aoi_crs, sc)
    plan = plan_predict(sc, net, pre, output=output, class_names=class_names,
                        model_scale=model_scale, input_size=input_size, overlap=overlap,
                        batch=batch, method=method, iters=iters, radius=radius, device=device,
                        seed=seed, consistency=consistency, self_guidance=self_guidance,
                        min_sigma_r=min_sigma_r)  # fmt: skip
    k = len(plan.classes)
    probs = _lazy(plan.job, sc, plan.job.align, k, tile, halo, blocksize, geom)
    attrs = {**plan.tags, "geoupsample_bands": bands_tag(idx, names)}
    if not classes:
        return _on_scene_grid(probs, scene, np.arange(1, k + 1),
                              {**attrs, "long_name": tuple(plan.classes)}, np.nan)
    cls = da.map_blocks(class_bands, probs, dtype=np.uint8, values=class_values(plan.classes),
                        chunks=((2,), *probs.chunks[1:]))
    return _on_scene_grid(cls, scene, np.array([1, 2]),
                          {**attrs, "long_name": ("class", "confidence")}, UINT8_NODATA)


def _packing(attrs: dict[str, Any], idx: Sequence[int]
             ) -> tuple[list[float], list[float]] | None:  # fmt: skip
    """The bands' ``scale_factor`` and ``add_offset`` attributes (one value, or one per band
    of the array), or None when neither is set."""
    def per_band(value: Any, default: float) -> list[float]:
        if value is None:
            return [default] * len(idx)
        vals = [float(v) for v in np.atleast_1d(value)]
        return vals * len(idx) if len(vals) == 1 else [vals[i - 1] for i in idx]

    if attrs.get("scale_factor") is None and attrs.get("add_offset") is None:
        return None
    return per_band(attrs.get("scale_factor"), 1.0), per_band(attrs.get("add_offset"), 0.0)


def _lazy(job: Any, scene: ArrayScene, stride: int, count: int, tile: int, halo: int,
          blocksize: int, geom: Any) -> Any:
    """The tiles of ``job`` over ``scene`` as a lazy dask array (the grid of tiling.run)."""
    height, width = scene.shape
    grid = tiling.TileGrid(height, width, tile=tile, halo=halo, align=stride, block=blocksize)
    return to_dask(job, {"guide": scene.reader()}, grid, count, scene.transform, geom)
