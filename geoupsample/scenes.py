"""Scenes: a raster file (:class:`Scene`) or an in-memory/dask array (:class:`ArrayScene`) with
its bands, grid and nodata, read window by window; their scene-wide guide statistics; an AOI in
their CRS.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

import geoupsample as gu
import tiling
from geoupsample.grids import is_rectilinear, not_north_up_message
from geoupsample.inputs import (
    InputError,
    array_guide_stats,
    check_dtype,
    open_raster,
    scene_guide_stats,
    select_bands,
)
from tiling.aoi import load_aoi, window_intersects


@dataclass(frozen=True)
class Scene:
    """A scene raster: path, the bands used (1-based), their names, grid and nodata."""

    path: str
    bands: tuple[int, ...]
    band_names: tuple[str, ...]
    crs: Any
    transform: Affine
    shape: tuple[int, int]
    nodata: float | None

    @classmethod
    def open(cls, path: str | os.PathLike[str], bands: Sequence[int | str] | None = None,
             band_names: Sequence[str] | None = None) -> Scene:
        """Open ``path`` and choose ``bands`` (1-based indexes or names; default all).

        A band's name is its description in the file, or ``band_names[i - 1]`` when given
        (one name per band of the file, in order: for files without descriptions, so that
        ``spectral`` finds its red and near-infrared bands)."""
        p = os.fspath(path)
        with open_raster(p, "scene") as ds:
            if band_names is not None:
                band_names = tuple(band_names)
                if len(band_names) != ds.count:
                    raise InputError(
                        f"--band-names gives {len(band_names)} name(s) but the scene {p} has "
                        f"{ds.count} band(s): name every band of the file, in order (e.g. "
                        f"{','.join(['red', 'green', 'blue', 'nir'][:ds.count] or ['red'])})")
                if bands is not None:
                    bands = [band_names.index(b) + 1 if isinstance(b, str) and b in band_names
                             else b for b in bands]
            idx = select_bands(ds, bands, "scene")
            check_dtype(ds, idx, "scene")
            names = tuple(band_names[i - 1] if band_names is not None else
                          ds.descriptions[i - 1] or f"band{i}" for i in idx)
            if ds.crs is None:
                raise InputError(f"the scene {p} has no CRS; assign one (gdal_edit.py -a_srs)")
            check_not_rotated(ds.transform, f"scene {p}")
            return cls(p, idx, names, ds.crs, ds.transform, (ds.height, ds.width), ds.nodata)

    def reader(self) -> tiling.RasterInput:
        return tiling.RasterInput(self.path, self.bands)

    def read(self, window: Window) -> np.ndarray:
        """float32 ``[d, rows, cols]`` of ``window`` (NaN for nodata and outside the raster)."""
        return self.reader().read(window, self.transform)

    def guide_stats(self) -> gu.GuideStats:
        """Scene-wide guide statistics (see :func:`geoupsample.inputs.scene_guide_stats`)."""
        return scene_guide_stats(self.path, self.bands)


@dataclass(frozen=True)
class ArrayScene:
    """A scene held in an array ``[d, H, W]`` (numpy or dask): the interface of :class:`Scene`.

    Reading a window computes only that slice of a dask array.
    """

    array: Any
    band_names: tuple[str, ...]
    crs: Any
    transform: Affine
    nodata: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[2])

    @property
    def bands(self) -> tuple[int, ...]:
        return tuple(range(1, int(self.array.shape[0]) + 1))

    def reader(self) -> tiling.ArrayInput:
        return tiling.ArrayInput(self.array, self.transform, self.nodata)

    def read(self, window: Window) -> np.ndarray:
        """float32 ``[d, rows, cols]`` of ``window`` (NaN for nodata and outside the array)."""
        return self.reader().read(window, self.transform)

    def guide_stats(self) -> gu.GuideStats:
        """The statistics :meth:`Scene.guide_stats` computes, from the same regular subsample."""
        return array_guide_stats(self.array, self.nodata, "scene array")


AnyScene = Scene | ArrayScene


def check_not_rotated(transform: Affine, name: str) -> None:
    """Refuse a rotated scene before any work (tiles need whole pixels along rows and columns;
    a flipped, south-up scene is fine)."""
    if not is_rectilinear(transform):
        raise InputError(not_north_up_message(name, transform))


def scene_aoi(aoi: Any, aoi_crs: Any, scene: AnyScene) -> BaseGeometry | None:
    """The AOI (shapely geometry, GeoJSON dict/string or file) in the scene's CRS, or None.

    Raises :class:`InputError` when it does not overlap the scene.
    """
    if aoi is None:
        return None
    geom = load_aoi(aoi, scene.crs, aoi_crs)
    h, w = scene.shape
    if not window_intersects(geom, Window(0, 0, w, h), scene.transform):
        raise InputError(
            "the AOI does not overlap the scene (a GeoJSON without a 'crs' member is read as "
            "lon/lat WGS 84; give aoi_crs otherwise)"
        )
    return geom


def windows(scene: AnyScene, size: int, stride: int) -> Iterator[Window]:
    """Non-overlapping windows of ``size`` px (rounded up to ``stride``) covering the scene."""
    size = max(stride, math.ceil(size / stride) * stride)
    h, w = scene.shape
    for r in range(0, h, size):
        for c in range(0, w, size):
            yield Window(c, r, size, size)
