"""Area of interest: a shapely geometry or GeoJSON (file, dict or string) in any CRS.

The AOI is reprojected to the output raster's CRS (:func:`rasterio.warp.transform_geom`). Tiles
whose weighted support misses it are skipped; output pixels whose centres lie outside it are
nodata (:func:`rasterio.features.geometry_mask`).

CRS conventions: a GeoJSON file or dict is in EPSG:4326 (RFC 7946) unless it carries a legacy
``"crs": {"properties": {"name": ...}}`` member; a shapely geometry is in the raster's CRS unless
``crs`` is given.
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


def _geojson_geometry(obj: dict) -> tuple[BaseGeometry, CRS | None]:
    crs = None
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


def load_aoi(aoi: Any, dst_crs: CRS | None, crs: Any = None) -> BaseGeometry:
    """The AOI as a shapely geometry in ``dst_crs``.

    Args:
        aoi: a shapely geometry, a GeoJSON dict/string, or a path to a GeoJSON file.
        dst_crs: the raster's CRS.
        crs: the AOI's CRS (overrides the conventions in the module docstring).
    """
    src_crs = CRS.from_user_input(crs) if crs is not None else None
    if isinstance(aoi, BaseGeometry):
        geom = aoi
        if src_crs is None:
            src_crs = dst_crs
    else:
        if isinstance(aoi, (str, os.PathLike)) and os.path.exists(aoi):
            try:
                with open(aoi) as f:
                    obj = json.load(f)
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read the AOI file {aoi}: {err}") from err
        elif isinstance(aoi, str) and aoi.lstrip().startswith("{"):
            obj = json.loads(aoi)
        elif isinstance(aoi, dict):
            obj = aoi
        else:
            raise FileNotFoundError(f"AOI file {aoi} not found")
        geom, file_crs = _geojson_geometry(obj)
        if src_crs is None:
            src_crs = file_crs or CRS.from_epsg(4326)
    if geom.is_empty:
        raise ValueError("the AOI geometry is empty")
    if dst_crs is not None and src_crs is not None and CRS.from_user_input(src_crs) != dst_crs:
        geom = shape(transform_geom(src_crs, dst_crs, mapping(geom)))
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom


def window_intersects(geom: BaseGeometry, window: Window, transform: Affine) -> bool:
    """Whether the ground footprint of ``window`` touches ``geom``."""
    return geom.intersects(box(*bounds(window, transform)))


def window_mask(geom: BaseGeometry, window: Window, transform: Affine) -> np.ndarray:
    """bool ``[rows, cols]``: True where the pixel centre of ``window`` is inside ``geom``."""
    shape_ = (int(window.height), int(window.width))
    return geometry_mask([mapping(geom)], out_shape=shape_,
                         transform=window_transform(window, transform), invert=True)
