"""Area of interest: a shapely geometry, GeoJSON (file, dict or string) or any vector file GDAL
reads (GeoPackage, Shapefile, FlatGeobuf..., through pyogrio), in any CRS.

The AOI is reprojected to the output raster's CRS (:func:`rasterio.warp.transform_geom`). Tiles
whose weighted support misses it are skipped; output pixels whose centres lie outside it are
nodata (:func:`rasterio.features.geometry_mask`).

CRS conventions: a GeoJSON file or dict is in EPSG:4326 (RFC 7946) unless it carries a legacy
``"crs": {"properties": {"name": ...}}`` member; another vector file is in the CRS it declares;
a shapely geometry is in the raster's CRS unless ``crs`` is given. An AOI of several features is
their union.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window, bounds
from rasterio.windows import transform as window_transform
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from tiling.reader import is_local_path, with_remote_hint


def _geojson_geometry(obj: dict) -> tuple[BaseGeometry, CRS]:
    crs = CRS.from_epsg(4326)  # RFC 7946, unless a legacy 'crs' member says otherwise
    name = (obj.get("crs") or {}).get("properties", {}).get("name")
    if name:
        crs = CRS.from_user_input(name)
    kind = obj.get("type")
    if kind == "FeatureCollection":
        geoms = [shape(f["geometry"]) for f in obj.get("features", []) if f.get("geometry")]
    elif kind == "Feature":
        geoms = [shape(obj["geometry"])] if obj.get("geometry") else []
    elif kind is not None:
        geoms = [shape(obj)]
    else:
        raise ValueError("the AOI is not GeoJSON (no 'type' member)")
    if not geoms:
        raise ValueError("the AOI GeoJSON contains no geometry")
    return shapely.union_all(geoms), crs


def _vector_file_geometry(path: str) -> tuple[BaseGeometry, CRS | None]:
    """Union of the geometries of the only layer of a vector file, and its CRS."""
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
        if len(layers) != 1:
            raise ValueError(f"the AOI file {path} has layers {layers}; write the AOI to a file "
                             "with one layer")  # fmt: skip
        meta, _, wkb, _ = pyogrio.raw.read(path, read_geometry=True, columns=[])
    except (DataSourceError, DataLayerError) as err:
        raise ValueError(with_remote_hint(f"cannot read the AOI file {path}: {err}", path)
                         ) from err
    geoms = [shapely.from_wkb(g) for g in wkb if g is not None]
    if not geoms:
        raise ValueError(f"the AOI file {path} contains no geometry")
    crs = CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    return shapely.union_all(geoms), crs


def _read_aoi(aoi: Any) -> tuple[BaseGeometry, CRS | None]:
    """The geometry and CRS of a vector file (local path, URL or GDAL virtual path), or a GeoJSON
    string or dict: the declared CRS, else EPSG:4326 for GeoJSON (RFC 7946), else None."""
    if isinstance(aoi, (str, os.PathLike)) and os.path.exists(aoi):
        if os.path.splitext(os.fspath(aoi))[1].lower() not in (".json", ".geojson"):
            return _vector_file_geometry(os.fspath(aoi))
        try:
            with open(aoi) as f:
                return _geojson_geometry(json.load(f))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the AOI file {aoi}: {err}") from err
    if isinstance(aoi, str) and aoi.lstrip().startswith("{"):
        return _geojson_geometry(json.loads(aoi))
    if isinstance(aoi, dict):
        return _geojson_geometry(aoi)
    if isinstance(aoi, str) and not is_local_path(aoi):  # a URL or GDAL virtual path
        return _vector_file_geometry(aoi)
    raise FileNotFoundError(f"AOI file {aoi} not found")


def load_aoi(aoi: Any, dst_crs: CRS | None, crs: Any = None) -> BaseGeometry:
    """The AOI as a shapely geometry in ``dst_crs``.

    Args:
        aoi: a shapely geometry, a GeoJSON dict/string, or a vector file (GeoJSON, or any
            format GDAL reads with a single layer) by local path, URL (``https://``,
            ``s3://``...) or GDAL virtual path (``/vsizip/...``).
        dst_crs: the raster's CRS.
        crs: the AOI's CRS (overrides the conventions in the module docstring).
    """
    src_crs = CRS.from_user_input(crs) if crs is not None else None
    if isinstance(aoi, BaseGeometry):
        geom = aoi
        if src_crs is None:
            src_crs = dst_crs
    else:
        geom, file_crs = _read_aoi(aoi)
        src_crs = src_crs or file_crs
        if src_crs is None:
            raise ValueError(f"the AOI file {aoi} declares no CRS; pass its CRS (aoi_crs)")
    if geom.is_empty:
        raise ValueError("the AOI geometry is empty")
    if dst_crs is not None and src_crs is not None and CRS.from_user_input(src_crs) != dst_crs:
        geom = _reprojected(geom, CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs))
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom


def _reprojected(geom: BaseGeometry, src: CRS, dst: CRS) -> BaseGeometry:
    """``geom`` from ``src`` to ``dst``; a clear error when its coordinates cannot be in ``src``
    (projected metres in a GeoJSON without a 'crs' member, read as lon/lat)."""
    fix = ("pass the AOI's CRS (aoi_crs=..., or --aoi-crs on the command line, e.g. "
           "'EPSG:32631'); a GeoJSON without a 'crs' member is read as lon/lat WGS 84")
    west, south, east, north = geom.bounds
    if src.is_geographic and not (-360 <= west <= east <= 360 and -90 <= south <= north <= 90):
        raise ValueError(f"the AOI's coordinates ({west:g}, {south:g}, {east:g}, {north:g}) "
                         f"are not longitudes and latitudes, but it is read in {src}: {fix}")
    try:
        return shape(transform_geom(src, dst, mapping(geom)))
    except Exception as err:  # GDAL/PROJ errors come as several rasterio types
        raise ValueError(f"cannot reproject the AOI from {src} to {dst} ({err}): are its "
                         f"coordinates in {src}? If not, {fix}") from err


def window_intersects(geom: BaseGeometry, window: Window, transform: Affine) -> bool:
    """Whether the ground footprint of ``window`` touches ``geom``."""
    return geom.intersects(box(*bounds(window, transform)))


def window_mask(geom: BaseGeometry, window: Window, transform: Affine) -> np.ndarray:
    """bool ``[rows, cols]``: True where the pixel centre of ``window`` is inside ``geom``."""
    shape_ = (int(window.height), int(window.width))
    return geometry_mask([mapping(geom)], out_shape=shape_,
                         transform=window_transform(window, transform), invert=True)
