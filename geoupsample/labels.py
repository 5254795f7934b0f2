"""Labelled polygons -> soft labels (per-class coverage fractions) on a low-resolution grid.

Polygons come from any vector file GDAL reads (GeoJSON, GeoPackage, Shapefile, FlatGeobuf, KML,
GML...; read with :mod:`pyogrio`) or from shapely geometries, each feature carrying a class in an
attribute ("class field"). They may be in any CRS and are reprojected to the raster's with
:func:`rasterio.warp.transform_geom`.

On a grid with affine ``transform`` and ``shape (h, w)``, :func:`rasterize_fractions` returns
``[K, h, w]`` float32 coverage fractions, one band per class in :attr:`LabelPolygons.classes`
order: the share of each cell covered by polygons of that class, measured by rasterising at
``supersample x supersample`` points per cell (pixel centres of a finer grid) and averaging. Where
polygons of different classes overlap, the later feature in the file wins. Fractions sum to the
labelled share of the cell (0 = unlabelled, 1 = fully labelled).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from geoupsample.caller_warnings import warn_caller
from tiling.reader import is_local_path, with_remote_hint


class LabelError(ValueError):
    """Labels that cannot be used: missing class field, no overlap with the scene, one class..."""


@dataclass(frozen=True)
class LabelPolygons:
    """Polygons with one class each, in one CRS.

    Attributes:
        geometries: Polygon or MultiPolygon per feature, in file order.
        labels: class name per geometry (strings; numbers are written as in the file).
        classes: distinct class names, in the order of the output bands.
        crs: CRS of the coordinates (None if unknown).
        source: where they were read from, for messages.
    """

    geometries: tuple[BaseGeometry, ...]
    labels: tuple[str, ...]
    classes: tuple[str, ...]
    crs: CRS | None
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.geometries)

    def class_index(self) -> np.ndarray:
        """0-based index into :attr:`classes` for every geometry, ``int64 [N]``."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[v] for v in self.labels], dtype=np.int64)

    def to_crs(self, crs: CRS | str | None) -> LabelPolygons:
        """The same polygons reprojected to ``crs`` (a no-op when equal or when ``crs`` is None)."""
        if crs is None:
            return self
        dst = CRS.from_user_input(crs)
        if self.crs is None:
            raise LabelError(
                f"the CRS of {self.source} is unknown: give it (crs=... or --labels-crs, e.g. "
                "'EPSG:32631')"
            )
        if dst == self.crs or not self.geometries:
            return replace(self, crs=dst)
        try:
            moved = transform_geom(self.crs, dst, [mapping(g) for g in self.geometries])
        except Exception as err:  # GDAL/PROJ errors come as several rasterio types
            raise LabelError(
                f"cannot reproject the polygons of {self.source} from {self.crs} to {dst} ({err}): "
                f"are their coordinates really in {self.crs}? (GeoJSON without a 'crs' member "
                "is read as lon/lat WGS 84; pass crs=... or --labels-crs to say otherwise)"
            ) from err
        geoms = tuple(_polygonal(shape(g)) for g in moved)
        keep = [i for i, g in enumerate(geoms) if g is not None and not g.is_empty]
        return replace(
            self,
            geometries=tuple(geoms[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            crs=dst,
        )

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of all polygons in :attr:`crs`."""
        b = shapely.bounds(np.asarray(self.geometries, dtype=object))
        return (
            float(b[:, 0].min()),
            float(b[:, 1].min()),
            float(b[:, 2].max()),
            float(b[:, 3].max()),
        )


# ----------------------------------------------------------------------------------- reading


def read_polygons(
    path: str | os.PathLike[str],
    class_field: str,
    *,
    crs: CRS | str | None = None,
    layer: str | None = None,
    classes: Sequence[str] | None = None,
) -> LabelPolygons:
    """Read labelled polygons from a vector file: GeoJSON, GeoPackage, Shapefile, FlatGeobuf...
    (anything GDAL's vector drivers read).

    Args:
        path: the file: a local path, a URL (``https://``, ``s3://``...) or a GDAL virtual path
            (``/vsizip/...``).
        class_field: attribute holding each polygon's class (name or number).
        crs: CRS of the coordinates, overriding the file's (GeoJSON default: lon/lat WGS 84).
        layer: the layer to read (needed only when the file has several, e.g. a GeoPackage).
        classes: the class order of the output bands; default: sorted distinct values
            (numerically when all are numbers). Values not listed are an error.

    Raises:
        LabelError: unreadable file, class field missing, no polygons, fewer than two classes.
    """
    source = os.fspath(path)
    if is_local_path(source):
        source = os.fspath(Path(source).expanduser())
        if not os.path.isfile(source):
            raise LabelError(f"label file not found: {source}")
    geoms, values, file_crs, fields = _read_vector(source, class_field, layer)
    if class_field not in fields:
        raise LabelError(
            f"class field {class_field!r} not found in {_name(source)}; its fields are "
            f"{sorted(fields) or 'none'}: pass one of them as the class field (--class-field)"
        )
    return _assemble(geoms, values, crs or file_crs, classes, source)


def from_geometries(
    geometries: Iterable[BaseGeometry],
    labels: Iterable[Any],
    crs: CRS | str | None,
    classes: Sequence[str] | None = None,
) -> LabelPolygons:
    """Build :class:`LabelPolygons` from shapely geometries and their classes."""
    return _assemble(list(geometries), list(labels), crs, classes, "<memory>")


def from_frame(
    frame: Any,
    class_field: str,
    *,
    crs: CRS | str | None = None,
    classes: Sequence[str] | None = None,
) -> LabelPolygons:
    """Build :class:`LabelPolygons` from a GeoDataFrame (geopandas, or anything with a
    ``geometry`` column of shapely geometries, a ``crs`` and columns by name).

    ``crs`` overrides the frame's; the other arguments are those of :func:`read_polygons`.
    """
    columns = [str(c) for c in getattr(frame, "columns", [])]
    if class_field not in columns:
        fields = sorted(c for c in columns if c != "geometry")
        raise LabelError(
            f"class field {class_field!r} not found in the GeoDataFrame; its columns are "
            f"{fields or 'none'}: pass one of them as the class field"
        )
    values = [_plain(v) for v in frame[class_field]]
    return _assemble(list(frame.geometry), values, crs or frame.crs, classes, "<GeoDataFrame>")


def is_frame(obj: Any) -> bool:
    """Whether ``obj`` looks like a GeoDataFrame (a ``geometry`` column and a ``crs``)."""
    return hasattr(obj, "geometry") and hasattr(obj, "crs") and hasattr(obj, "columns")


def _assemble(
    geoms: list[BaseGeometry | None],
    values: list[Any],
    crs: CRS | str | None,
    classes: Sequence[str] | None,
    source: str,
) -> LabelPolygons:
    kept_g: list[BaseGeometry] = []
    kept_v: list[str] = []
    skipped_kind = skipped_null = 0
    for g, v in zip(geoms, values, strict=True):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (
                isinstance(v, str) and not v.strip()):  # an empty class is no class
            skipped_null += 1
            continue
        poly = _polygonal(g) if g is not None else None
        if poly is None or poly.is_empty:
            skipped_kind += 1
            continue
        kept_g.append(poly)
        kept_v.append(_class_name(v))
    if skipped_null:
        warn_caller(f"{source}: {skipped_null} feature(s) without a class skipped")
    if skipped_kind:
        warn_caller(f"{source}: {skipped_kind} feature(s) without polygon area skipped")
    if not kept_g:
        raise LabelError(f"{source} holds no labelled polygons")
    present = set(kept_v)
    if classes is None:
        order = _sorted_classes(present)
    else:
        order = tuple(str(c) for c in classes)
        unknown = sorted(present - set(order))
        if unknown:
            raise LabelError(f"{source}: classes {unknown} are not in the given class list {order}")
        if len(set(order)) != len(order):
            raise LabelError(f"the class list {order} repeats a class")
    if len(present) < 2:
        raise LabelError(
            f"{source} has only {len(present)} class ({sorted(present)}): a classifier needs "
            "polygons of at least two classes"
        )
    return LabelPolygons(
        geometries=tuple(kept_g),
        labels=tuple(kept_v),
        classes=order,
        crs=CRS.from_user_input(crs) if crs is not None else None,
        source=source,
    )


def _class_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _sorted_classes(names: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(names, key=float))
    except ValueError:
        return tuple(sorted(names))


def _polygonal(g: BaseGeometry) -> BaseGeometry | None:
    """The polygonal part of ``g`` (made valid), or None when it has no area."""
    if not g.is_valid:
        g = shapely.make_valid(g)
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    if g.geom_type == "GeometryCollection":
        parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
        return shapely.union_all(parts) if parts else None
    return None


def _name(source: str) -> str:
    """The last part of a file name or address, for messages."""
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _read_vector(
    source: str, class_field: str, layer: str | None
) -> tuple[list[BaseGeometry | None], list[Any], CRS | None, set[str]]:
    """Geometries, class values, CRS and field names of one layer of the vector file (local
    path, URL or GDAL virtual path) ``source``."""
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(source)]
        if layer is None:
            if len(layers) != 1:
                raise LabelError(f"{_name(source)} has layers {layers}: choose one (layer=..., "
                                 "--labels-layer)")  # fmt: skip
            layer = layers[0]
        elif layer not in layers:
            raise LabelError(f"{_name(source)} has no layer {layer!r}; it has {layers}")
        info = pyogrio.read_info(source, layer=layer)
        fields = {str(f) for f in info["fields"]}
        crs = CRS.from_user_input(info["crs"]) if info["crs"] else None
        if class_field not in fields:
            return [], [], crs, fields
        _, _, wkb, columns = pyogrio.raw.read(source, layer=layer, columns=[class_field])
    except (DataSourceError, DataLayerError) as err:
        raise LabelError(with_remote_hint(
            f"cannot read {source} as a vector file (GeoJSON, GeoPackage, Shapefile, "
            f"FlatGeobuf...): {err}", source)) from err
    geoms = [None if g is None else shapely.from_wkb(g) for g in wkb]
    return geoms, [_plain(v) for v in columns[0]], crs, fields


def _plain(v: Any) -> Any:
    """A numpy scalar from a vector file's column as a Python value (None stays None)."""
    return v.item() if isinstance(v, np.generic) else v


# -------------------------------------------------------------------------------- rasterising


def lr_grid(
    transform: Affine, shape: tuple[int, int], stride: int
) -> tuple[Affine, tuple[int, int]]:
    """The LR grid of an HR grid at ``stride`` HR pixels per LR cell: ``(transform, (h, w))``."""
    h, w = shape
    return transform @ Affine.scale(stride), (h // stride, w // stride)


def _grid_bounds(transform: Affine, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = shape
    xs, ys = zip(*(transform @ c for c in ((0, 0), (w, 0), (0, h), (w, h))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _in_grid(labels: LabelPolygons, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Indices of the polygons that intersect the grid's footprint."""
    if not labels.geometries:
        return np.zeros(0, dtype=np.int64)
    footprint = shapely.box(*_grid_bounds(transform, shape))
    geoms = np.asarray(labels.geometries, dtype=object)
    return np.flatnonzero(shapely.intersects(geoms, footprint))


def check_scene(
    labels: LabelPolygons, transform: Affine, shape: tuple[int, int], crs: CRS | str | None
) -> LabelPolygons:
    """Validate labels against a scene and return them in its CRS, only those that overlap it.

    Raises:
        LabelError: no polygon overlaps the scene, or those that do carry fewer than 2 classes.
    """
    moved = labels.to_crs(crs)
    inside = _in_grid(moved, transform, shape)
    if inside.size == 0:
        scene = tuple(round(v, 3) for v in _grid_bounds(transform, shape))
        pb = tuple(round(v, 3) for v in moved.bounds) if len(moved) else "none"
        raise LabelError(
            f"none of the {len(labels)} polygons of {labels.source} overlaps the scene: scene "
            f"bounds {scene} and polygon bounds {pb} in {moved.crs}; check the file's CRS "
            "(GeoJSON without a 'crs' member is read as lon/lat WGS 84)"
        )
    present = {moved.labels[i] for i in inside}
    if len(present) < 2:
        raise LabelError(
            f"the polygons that overlap the scene carry only {len(present)} class "
            f"({sorted(present)}): a classifier needs at least two"
        )
    return replace(
        moved,
        geometries=tuple(moved.geometries[i] for i in inside),
        labels=tuple(moved.labels[i] for i in inside),
    )


def rasterize_classes(
    labels: LabelPolygons,
    transform: Affine,
    shape: tuple[int, int],
    *,
    crs: CRS | str | None = None,
) -> np.ndarray:
    """Class of each grid pixel (by pixel centre): ``int16 [h, w]``, -1 = unlabelled.

    Values index :attr:`LabelPolygons.classes`. Later features win where polygons overlap.
    """
    labels = labels.to_crs(crs)
    h, w = shape
    if len(labels.classes) > 32000:
        raise LabelError("more than 32000 classes")
    inside = _in_grid(labels, transform, shape)
    if inside.size == 0:
        return np.full((h, w), -1, dtype=np.int16)
    idx = labels.class_index()
    shapes = [(labels.geometries[i], int(idx[i]) + 1) for i in inside]
    out = rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype="int16")
    return out - 1


def rasterize_fractions(
    labels: LabelPolygons,
    transform: Affine,
    shape: tuple[int, int],
    *,
    crs: CRS | str | None = None,
    supersample: int = 8,
    max_pixels: int = 1 << 24,
) -> np.ndarray:
    """Per-class coverage fractions on a grid: ``float32 [K, h, w]`` in ``labels.classes`` order.

    Args:
        labels: the polygons (reprojected to ``crs`` if given and different).
        transform, shape: the (low-resolution) grid: affine transform and ``(h, w)``.
        crs: the grid's CRS.
        supersample: sample points per cell side; pass the stride to count the HR pixels.
        max_pixels: bound on the supersampled pixels rasterised at once (rows are chunked).

    Returns:
        Fractions in [0, 1] that sum, per cell, to the labelled share of the cell.
    """
    if supersample < 1:
        raise LabelError(f"supersample must be >= 1, got {supersample}")
    labels = labels.to_crs(crs)
    h, w = shape
    s = int(supersample)
    k = len(labels.classes)
    out = np.zeros((k, h, w), dtype=np.float32)
    if h == 0 or w == 0 or _in_grid(labels, transform, shape).size == 0:
        return out
    rows = max(1, max_pixels // max(1, w * s * s))
    fine = transform @ Affine.scale(1.0 / s)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        chunk_t = fine @ Affine.translation(0, r0 * s)
        ids = rasterize_classes(labels, chunk_t, ((r1 - r0) * s, w * s))
        cells = ids.reshape(r1 - r0, s, w, s).transpose(0, 2, 1, 3).reshape(r1 - r0, w, s * s)
        for c in range(k):
            out[c, r0:r1] = (cells == c).mean(axis=-1)
    return out
