"""A Zarr store as the output of :func:`tiling.run`, for rasters with many bands.

Pass a :class:`ZarrOutputSpec` instead of an :class:`~tiling.writer.OutputSpec`; the engine's
``Writer(spec)`` then builds a :class:`ZarrWriter`, which writes every finished cell straight
into its region of the array (chunks ``(band_chunk, blocksize, blocksize)``, aligned to the
write cells, so each chunk is written once and memory stays bounded as with GeoTIFFs).

Layout (Zarr format 2, consolidated metadata, readable by ``xarray.open_zarr``, GDAL's Zarr
driver and zarr-python)::

    <variable>   [band, y, x]  dtype, fill value = nodata (NaN for floats); attributes:
                 long_name (band descriptions), grid_mapping = "spatial_ref", the spec's tags
    band         [band]  1 .. count
    y, x         pixel-centre coordinates in the CRS (north-up grids)
    spatial_ref  scalar; attributes crs_wkt and spatial_ref (WKT) and GeoTransform (GDAL
                 order: "c a b f d e"), the convention rioxarray reads and writes

so ``xr.open_zarr(path)[variable].rio.crs`` and ``.rio.transform()`` give the grid back.

Atomicity: the store is written in ``.<name>.partial`` beside ``path`` and renamed onto ``path``
when complete; an existing Zarr store at ``path`` is replaced then (anything else there is
refused up front). Resume: chunks are written synchronously, so the journal's finished bands
are on disk; the partial store is reopened as it is. Requires ``zarr>=3``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from rasterio.windows import Window

from tiling.writer import OutputSpec, Writer, cast, check_output_dir

#: Chunks hold at most this many bytes (uncompressed) when the band chunk is not given.
CHUNK_BYTES = 8 * 2**20


def is_zarr_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding Zarr (v2 or v3) group or array metadata."""
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in (".zgroup", ".zarray", "zarr.json"))


@dataclass
class ZarrOutputSpec(OutputSpec):
    """An :class:`~tiling.writer.OutputSpec` for a Zarr store (``path`` ends with ``.zarr``).

    Attributes (beyond the GeoTIFF ones; ``cog`` must stay False, ``compress`` is ``deflate``
    (zlib), ``zstd`` or ``none``):
        variable: name of the data array in the store.
        band_chunk: bands per chunk (default: as many as fit :data:`CHUNK_BYTES` per chunk).
    """

    writer_class: ClassVar[type[Writer] | None] = None  # set below to ZarrWriter
    variable: str = "data"
    band_chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cog:
            raise ValueError("cog applies to GeoTIFF outputs; a Zarr store cannot be a COG")
        if self.nodata_mask:
            raise ValueError("nodata_mask applies to GeoTIFF outputs; a Zarr store marks "
                             "nodata with its fill value")
        if self.compress.lower() not in ("deflate", "zstd", "none"):
            raise ValueError(
                f"compression {self.compress!r} is not available for Zarr; "
                "use deflate, zstd or none"
            )
        if not self.variable or "/" in self.variable or self.variable in ("band", "x", "y"):
            raise ValueError(f"invalid Zarr variable name {self.variable!r}")
        if self.band_chunk is None:
            per_band = self.blocksize**2 * np.dtype(self.dtype).itemsize
            self.band_chunk = max(1, min(self.count, CHUNK_BYTES // per_band))
        if not 1 <= self.band_chunk:
            raise ValueError(f"band_chunk must be >= 1, got {self.band_chunk}")

    @property
    def partial_path(self) -> str:
        p = Path(self.path)
        return str(p.with_name(f".{p.name}.partial"))

    @property
    def chunks(self) -> tuple[int, int, int]:
        assert self.band_chunk is not None
        return (min(self.band_chunk, self.count), self.blocksize, self.blocksize)


def _compressor(name: str) -> Any:
    import numcodecs

    name = name.lower()
    if name == "none":
        return None
    return numcodecs.Zstd(level=3) if name == "zstd" else numcodecs.Zlib(level=6)


def _require_zarr() -> Any:
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is a dependency
        raise ImportError("Zarr output needs the zarr package (pip install 'zarr>=3')") from err
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"Zarr output needs zarr>=3, found {zarr.__version__}")
    return zarr


def _create(spec: ZarrOutputSpec, path: str) -> Any:
    """Create the store at ``path``: the data array (empty), coordinates and georeferencing."""
    zarr = _require_zarr()
    t = spec.transform
    root = zarr.open_group(path, mode="w", zarr_format=2)

    def coord(name: str, values: np.ndarray, attrs: dict[str, Any]) -> None:
        arr = root.create_array(
            name, shape=values.shape, dtype=values.dtype, fill_value=None, compressors=None
        )
        arr[...] = values
        arr.attrs.update({"_ARRAY_DIMENSIONS": [name], **attrs})

    coord("band", np.arange(1, spec.count + 1, dtype=np.int64), {})
    coord("x", t.c + t.a * (np.arange(spec.width) + 0.5), {"axis": "X", "long_name": "x"})
    coord("y", t.f + t.e * (np.arange(spec.height) + 0.5), {"axis": "Y", "long_name": "y"})
    ref = root.create_array("spatial_ref", shape=(), dtype=np.int64, fill_value=None)
    ref[...] = 0
    wkt = spec.crs.to_wkt() if spec.crs is not None else ""
    ref.attrs.update(
        {
            "_ARRAY_DIMENSIONS": [],
            "crs_wkt": wkt,
            "spatial_ref": wkt,
            "GeoTransform": " ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e)),
        }
    )
    comp = _compressor(spec.compress)
    data = root.create_array(
        spec.variable,
        shape=(spec.count, spec.height, spec.width),
        chunks=spec.chunks,
        dtype=spec.dtype,
        fill_value=spec.nodata if np.dtype(spec.dtype).kind == "f" else int(spec.nodata),
        compressors=None if comp is None else [comp],
    )
    attrs: dict[str, Any] = {
        "_ARRAY_DIMENSIONS": ["band", "y", "x"],
        "grid_mapping": "spatial_ref",
        "coordinates": "spatial_ref",
        **{str(k): str(v) for k, v in spec.tags.items()},
    }
    if spec.descriptions is not None:
        attrs["long_name"] = [str(d) if d is not None else "" for d in spec.descriptions]
    data.attrs.update(attrs)
    return data


class ZarrWriter(Writer):
    """Writes cells into the partial store; ``finish`` consolidates and renames it."""

    def __init__(self, spec: OutputSpec, resume: bool = False) -> None:
        if not isinstance(spec, ZarrOutputSpec):
            raise TypeError("ZarrWriter needs a ZarrOutputSpec")
        self.spec = spec
        check_output_dir(spec.path)
        if os.path.lexists(spec.path) and not is_zarr_store(spec.path):
            raise FileExistsError(
                f"the output path {spec.path} exists and is not a Zarr store; remove it or "
                "choose another name (an existing Zarr store there would be replaced)"
            )
        self.tmp = spec.partial_path
        if resume and is_zarr_store(self.tmp):
            zarr = _require_zarr()
            self.array = zarr.open_array(os.path.join(self.tmp, spec.variable), mode="r+")
        else:
            _remove_tree(self.tmp)
            self.array = _create(spec, self.tmp)

    def write(self, data: np.ndarray, window: Window) -> None:
        """Write float ``data`` ``[count, rows, cols]`` (NaN = nodata) at ``window``."""
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        values = cast(data, self.spec.dtype, self.spec.nodata)
        self.array[:, r0:r1, c0:c1] = values.astype(self.spec.dtype, copy=False)

    def flush(self) -> None:
        """Nothing to do: every chunk is on disk when :meth:`write` returns."""

    def finish(self) -> str:
        """Consolidate the metadata and move the store onto the output path."""
        zarr = _require_zarr()
        zarr.consolidate_metadata(self.tmp, zarr_format=2)
        old = None
        if os.path.lexists(self.spec.path):  # a Zarr store (checked in __init__): replace it
            old = self.tmp + ".old"
            _remove_tree(old)
            os.replace(self.spec.path, old)
        os.replace(self.tmp, self.spec.path)
        if old is not None:
            _remove_tree(old)
        return self.spec.path

    def abort(self, keep: bool = False) -> None:
        """Remove the partial store unless ``keep`` (for a later resume)."""
        if not keep:
            _remove_tree(self.tmp)


ZarrOutputSpec.writer_class = ZarrWriter


def _remove_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
