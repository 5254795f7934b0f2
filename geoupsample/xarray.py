"""Guided upsampling of rioxarray DataArrays, lazily with dask.

>>> import rioxarray
>>> from geoupsample.xarray import upsample
>>> lr = rioxarray.open_rasterio("probs_10m.tif", chunks=True)
>>> guide = rioxarray.open_rasterio("image_2m.tif", chunks=True)
>>> hr = upsample(lr, guide, method="gsjbu", tile=1024, halo=64)   # lazy, on the guide's grid
>>> hr.rio.to_raster("probs_2m.tif")     # same pixels as `geoupsample upsample ... --dtype float32`

The grids follow the rules of :mod:`geoupsample.pipeline` (same CRS - no reprojection, integer
scale, origins on the guide's pixel lattice), and the computation is the same tiles blended the
same way as the CLI, so the values agree exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

import tiling
from geoupsample.pipeline import (
    INTERPOLATIONS,
    InputError,
    UpsampleTile,
    _stats,
    decimated_stats_sample,
    relate_grids,
)
from tiling.aoi import load_aoi
from tiling.execute import gdal_env
from tiling.lazy import to_dask
from tiling.reader import to_float


def _as_bands(a: xr.DataArray, what: str) -> xr.DataArray:
    if not isinstance(a, xr.DataArray):
        raise InputError(f"{what} must be an xarray.DataArray (e.g. rioxarray.open_rasterio), "
                         f"got {type(a).__name__}")
    if a.ndim == 2:
        a = a.expand_dims("band")
    if a.ndim != 3:
        raise InputError(f"{what} must be [band, y, x]; got dims {a.dims}")
    if a.shape[0] == 0:
        raise InputError(f"{what} has no bands")
    if np.dtype(a.dtype).kind not in "uif":
        raise InputError(f"{what} has unsupported dtype {a.dtype}; use integer or float data")
    return a


def upsample(lowres: xr.DataArray, guide: xr.DataArray, method: str = "gsjbu",
             tile: int = 1024, halo: int = 64, iters: int = 50, radius: int = 3,
             device: str | None = None, seed: int = 0, blend: str = "taper",
             aoi: Any = None, aoi_crs: Any = None, blocksize: int = 256) -> xr.DataArray:
    """Upsample ``lowres`` onto ``guide``'s grid; returns a lazy dask-backed DataArray.

    Args:
        lowres: ``[band, y, x]`` (or ``[y, x]``) rioxarray DataArray, numpy- or dask-backed.
        guide: ``[band, y, x]`` rioxarray DataArray in the same CRS, on a grid whose pixel
            divides ``lowres``'s pixel (different CRSs are refused, not reprojected).
        method, tile, halo, iters, radius, device, seed, blend, aoi, aoi_crs: as in
            :func:`geoupsample.pipeline.upsample_raster`.
        blocksize: output chunk alignment (use the block size you will write with).

    Returns:
        float32 ``[band, y, x]`` on the guide's coordinates with its CRS and transform, NaN as
        nodata, band ``long_name`` from ``lowres`` and attributes recording the method. The
        scene-wide guide statistics (for ``jbu``/``gsjbu``) are computed eagerly from a regular
        subsample; everything else runs when the result is computed.
    """
    from geoupsample import METHODS, __version__

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    lowres, guide = _as_bands(lowres, "lowres"), _as_bands(guide, "guide")
    lr_t, hr_t = lowres.rio.transform(), guide.rio.transform()
    rel = relate_grids(lowres.rio.crs, lr_t, lowres.shape[1:], guide.rio.crs, hr_t,
                       guide.shape[1:])
    lr_nodata, hr_nodata = lowres.rio.nodata, guide.rio.nodata
    stats = None
    if method not in INTERPOLATIONS:
        def read_rows(r0: int, r1: int) -> np.ndarray:
            return to_float(np.asarray(guide.data[:, r0:r1, :]), hr_nodata)

        with gdal_env():  # a file-backed guide is scanned once: keep GDAL's cache bounded
            stats = _stats(decimated_stats_sample(read_rows, *guide.shape[1:]), "DataArray")
    height, width = guide.shape[1:]
    grid = tiling.TileGrid(height, width, tile=tile, halo=halo, align=rel.scale,
                           offset=rel.offset, block=blocksize, region=rel.region, blend=blend)
    geom = load_aoi(aoi, guide.rio.crs, aoi_crs) if aoi is not None else None
    job = UpsampleTile(method, stats, iters=int(iters), radius=radius, device=device, seed=seed)
    inputs = {"lowres": tiling.ArrayInput(lowres.data, lr_t, lr_nodata),
              "guide": tiling.ArrayInput(guide.data, hr_t, hr_nodata)}
    arr = to_dask(job, inputs, grid, lowres.shape[0], hr_t, geom)
    out = xr.DataArray(arr, dims=("band", guide.dims[1], guide.dims[2]),
                       coords={"band": lowres["band"].values if "band" in lowres.coords
                               else np.arange(1, lowres.shape[0] + 1),
                               guide.dims[1]: guide[guide.dims[1]].values,
                               guide.dims[2]: guide[guide.dims[2]].values},
                       )
    out.name = lowres.name  # not the dask graph's name
    long_name = lowres.attrs.get("long_name")
    # rioxarray keeps a multi-band file's long_name on a band selection: keep it only when it
    # names the bands we have (otherwise .rio.to_raster refuses to write).
    n_names = 1 if isinstance(long_name, str) else len(long_name or ())
    if long_name is not None and n_names == lowres.shape[0]:
        out.attrs["long_name"] = long_name
    out.attrs.update(geoupsample_version=__version__, geoupsample_method=method)
    out = out.rio.write_crs(guide.rio.crs).rio.write_transform(hr_t)
    return out.rio.write_nodata(np.nan, encoded=False)
