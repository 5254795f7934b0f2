"""The single writer: block-aligned windowed writes to a tiled, compressed GeoTIFF, optional COG
conversion at the end, and atomic placement at the output path.

The file is written under a temporary name in the output's directory
(``.<name>.partial.tif``) and renamed onto ``path`` only when complete, so a reader never sees a
partial file at ``path``. Compression is deflate or zstd with a predictor (2 for integers, 3 for
floats), ``NUM_THREADS=ALL_CPUS``, ``BIGTIFF=IF_SAFER``. ``cog=True`` converts the finished file
with GDAL's COG driver (:func:`rasterio.shutil.copy`), which builds the overviews from the
complete file (never from partial data).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass
class OutputSpec:
    """What to write.

    Attributes:
        path: final output path (``.tif``).
        crs, transform, width, height: the output grid.
        count: number of bands.
        dtype: one of :data:`SUPPORTED_DTYPES`; float results are rounded and clipped for ints.
        nodata: nodata value; default NaN for floats, the dtype's max for unsigned and min for
            signed ints (valid values are clipped away from it).
        descriptions: band descriptions (``count`` strings) or None.
        tags: dataset tags (e.g. method and parameters), values stringified.
        compress: ``"deflate"``, ``"zstd"``, ``"lzw"`` or ``"none"``.
        blocksize: tile block size in pixels (multiple of 16).
        cog: convert to a Cloud-Optimized GeoTIFF at the end.
    """

    path: str
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str = "float32"
    nodata: float | None = None
    descriptions: Sequence[str | None] | None = None
    tags: dict = field(default_factory=dict)
    compress: str = "deflate"
    blocksize: int = 256
    cog: bool = False

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.dtype).name
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported output dtype {self.dtype!r}; "
                             f"use one of {', '.join(SUPPORTED_DTYPES)}")
        if self.count <= 0:
            raise ValueError("the output needs at least one band")
        if self.blocksize % 16:
            raise ValueError(f"blocksize must be a multiple of 16, got {self.blocksize}")
        if self.compress.lower() not in ("deflate", "zstd", "lzw", "none"):
            raise ValueError(f"unsupported compression {self.compress!r}; "
                             "use deflate, zstd, lzw or none")
        if self.nodata is None:
            self.nodata = default_nodata(self.dtype)
        if self.descriptions is not None and len(self.descriptions) != self.count:
            raise ValueError(f"{len(self.descriptions)} band descriptions for {self.count} bands")

    @property
    def partial_path(self) -> str:
        p = Path(self.path)
        return str(p.with_name(f".{p.name}.partial.tif"))

    def profile(self) -> dict:
        """Creation options of the working (tiled GeoTIFF) file."""
        kind = np.dtype(self.dtype).kind
        prof = dict(driver="GTiff", width=self.width, height=self.height, count=self.count,
                    dtype=self.dtype, crs=self.crs, transform=self.transform,
                    nodata=self.nodata, tiled=True, blockxsize=self.blocksize,
                    blockysize=self.blocksize, bigtiff="IF_SAFER", num_threads="ALL_CPUS",
                    interleave="pixel" if self.count <= 4 else "band")
        if self.compress.lower() != "none":
            prof["compress"] = self.compress.lower()
            prof["predictor"] = 3 if kind == "f" else 2
        return prof


def default_nodata(dtype: str) -> float:
    """NaN for floats, max for unsigned ints, min for signed ints."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return float("nan")
    info = np.iinfo(dt)
    return float(info.max if dt.kind == "u" else info.min)


def cast(data: np.ndarray, dtype: str, nodata: float) -> np.ndarray:
    """float ``data`` (NaN = nodata) -> ``dtype``; ints are rounded and clipped so that no valid
    pixel collides with ``nodata``."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        if math.isnan(nodata):
            return data.astype(dt, copy=False)
        out = data.astype(dt, copy=True)
        out[~np.isfinite(data)] = nodata
        return out
    bad = ~np.isfinite(data)
    info = np.iinfo(dt)
    lo, hi = float(info.min), float(info.max)
    if nodata == hi:
        hi -= 1
    elif nodata == lo:
        lo += 1
    out = np.clip(np.rint(np.where(bad, 0, data)), lo, hi).astype(dt)
    out[bad] = nodata
    return out


class Writer:
    """Writes windows into the partial file; ``finish`` converts/renames; ``abort`` cleans up.

    Reopening an existing partial file (``resume=True``) keeps what earlier runs wrote.
    Use :meth:`flush` to make everything written so far durable (closes and reopens the file, so
    the TIFF directory on disk lists every block written).
    """

    def __init__(self, spec: OutputSpec, resume: bool = False) -> None:
        self.spec = spec
        out_dir = Path(spec.path).resolve().parent
        if not out_dir.is_dir():
            raise FileNotFoundError(f"output directory {out_dir} does not exist; create it first")
        if os.path.isdir(spec.path):
            raise IsADirectoryError(f"the output path {spec.path} is a directory; give a file "
                                    "name such as out.tif")
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"cannot write to the output directory {out_dir}")
        self.tmp = spec.partial_path
        if resume and os.path.exists(self.tmp):
            self.ds = rasterio.open(self.tmp, "r+", num_threads="ALL_CPUS")
        else:
            self.ds = rasterio.open(self.tmp, "w", **spec.profile())
            if spec.descriptions:
                for i, d in enumerate(spec.descriptions, 1):
                    if d is not None:
                        self.ds.set_band_description(i, str(d))
            if spec.tags:
                self.ds.update_tags(**{k: str(v) for k, v in spec.tags.items()})

    def write(self, data: np.ndarray, window: Window) -> None:
        """Write float ``data`` ``[count, rows, cols]`` (NaN = nodata) at ``window``."""
        self.ds.write(cast(data, self.spec.dtype, self.spec.nodata), window=window)

    def flush(self) -> None:
        self.ds.close()
        # creation options do not persist: multi-threaded compression must be asked again
        self.ds = rasterio.open(self.tmp, "r+", num_threads="ALL_CPUS")

    def finish(self) -> str:
        """Close, convert to COG if asked, and atomically move onto the output path."""
        self.ds.close()
        final = self.tmp
        if self.spec.cog:
            cog_tmp = self.tmp[:-len(".tif")] + ".cog.tif"
            opts = dict(driver="COG", blocksize=self.spec.blocksize, bigtiff="IF_SAFER",
                        num_threads="ALL_CPUS", overview_resampling="average"
                        if np.dtype(self.spec.dtype).kind == "f" else "nearest")
            if self.spec.compress.lower() != "none":
                opts["compress"] = self.spec.compress.lower()
                opts["predictor"] = "YES"
            try:
                rasterio.shutil.copy(self.tmp, cog_tmp, **opts)
            except BaseException:
                _remove(cog_tmp)
                raise
            os.remove(self.tmp)
            final = cog_tmp
        os.replace(final, self.spec.path)
        return self.spec.path

    def abort(self, keep: bool = False) -> None:
        """Close; remove the partial file unless ``keep`` (for a later resume)."""
        try:
            if not self.ds.closed:
                self.ds.close()
        finally:
            if not keep:
                _remove(self.tmp)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
