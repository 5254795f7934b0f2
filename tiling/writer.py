"""The single writer: block-aligned windowed writes to a tiled, compressed GeoTIFF, optional COG
conversion at the end, and atomic placement at the output path.

The file is written under a temporary name in the output's directory
(``.<name>.partial.tif``) and renamed onto ``path`` only when complete, so a reader never sees a
partial file at ``path``. Compression is deflate or zstd with a predictor (2 for integers, 3 for
floats), ``NUM_THREADS=ALL_CPUS``, ``BIGTIFF=IF_SAFER``. ``cog=True`` converts the finished file
with GDAL's COG driver (:func:`rasterio.shutil.copy`), which builds the overviews from the
complete file (never from partial data).

``float16`` is written as IEEE half floats (TIFF ``BitsPerSample=16``, ``SampleFormat=IEEEFP``;
GDAL creation option ``NBITS=16`` on a Float32 band, since GDAL < 3.11 has no Float16 type):
GDAL and rasterio read it back as float32 holding half-precision values. Values are rounded to
the nearest float16 by numpy (round half to even) and clipped to its finite range (+-65504).

Nodata is a value by default (:func:`default_nodata`: NaN for floats, the dtype's max or min for
integers, which valid values are clipped away from). ``nodata_mask=True`` marks it instead in an
internal per-dataset mask band (GDAL ``GDAL_TIFF_INTERNAL_MASK``; kept by the COG conversion),
so that every value of an integer dtype stays valid (a uint8 raster using 0..255); the file then
has no nodata value, masked pixels hold 0, and blocks never written (outside an AOI) read as
masked.

Other stores: an :class:`OutputSpec` subclass may name its own writer in ``writer_class`` (a
:class:`Writer` subclass); ``Writer(spec)`` then builds that one (see
:mod:`tiling.zarr_writer`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

SUPPORTED_DTYPES = (
    "uint8", "uint16", "int16", "uint32", "int32", "float16", "float32", "float64")
#: Largest finite float16.
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class OutputSpec:
    """What to write.

    Attributes:
        path: final output path (``.tif``).
        crs, transform, width, height: the output grid.
        count: number of bands.
        dtype: one of :data:`SUPPORTED_DTYPES`; float results are rounded and clipped for ints.
        nodata: nodata value; default NaN for floats, the dtype's max for unsigned and min for
            signed ints (valid values are clipped away from it). None with ``nodata_mask``.
        nodata_mask: integer dtypes only: no nodata value; nodata pixels (NaN in the data, and
            blocks never written) are marked in an internal mask band instead, and every value
            of the dtype is valid.
        descriptions: band descriptions (``count`` strings) or None.
        tags: dataset tags (e.g. method and parameters), values stringified.
        compress: ``"deflate"``, ``"zstd"``, ``"lzw"`` or ``"none"``.
        blocksize: tile block size in pixels (multiple of 16).
        cog: convert to a Cloud-Optimized GeoTIFF at the end.
        colormaps: colour tables ``{band: {value: (r, g, b, a)}}`` (1-based bands of a uint8 or
            uint16 output), e.g. those of a class raster carried over.
        scales, offsets: per band, GDAL's scale and offset (physical value = stored value x
            scale + offset), e.g. those of packed reflectances carried over; None: 1 and 0.
        units: per band, the unit of the physical values (``"m"``, ``"K"``) or None.
    """

    #: the :class:`Writer` subclass that writes this kind of output (None: the GeoTIFF writer)
    writer_class: ClassVar[type[Writer] | None] = None

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
    nodata_mask: bool = False
    colormaps: dict = field(default_factory=dict)
    scales: Sequence[float] | None = None
    offsets: Sequence[float] | None = None
    units: Sequence[str | None] | None = None

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
        if self.nodata_mask:
            if np.dtype(self.dtype).kind not in "iu":
                raise ValueError(f"nodata_mask is for integer outputs; a {self.dtype} output "
                                 "marks nodata with NaN")
            if self.nodata is not None:
                raise ValueError("give nodata or nodata_mask, not both")
        elif self.nodata is None:
            self.nodata = default_nodata(self.dtype)
        for name in ("descriptions", "scales", "offsets", "units"):
            values = getattr(self, name)
            if values is not None and len(values) != self.count:
                raise ValueError(f"{len(values)} band {name} for {self.count} bands")

    @property
    def partial_path(self) -> str:
        p = Path(self.path)
        return str(p.with_name(f".{p.name}.partial.tif"))

    @property
    def compress_threads(self) -> str:
        """GDAL compression threads (``NUM_THREADS``): :func:`compression_threads`' setting (all
        cores by default), but one with ``nodata_mask`` (GDAL 3.10's threaded compression of a
        reopened file's mask blocks fails with "Bad value 1 for ExtraSamples tag")."""
        return "1" if self.nodata_mask else _COMPRESS_THREADS[-1]

    def profile(self) -> dict:
        """Creation options of the working (tiled GeoTIFF) file."""
        kind = np.dtype(self.dtype).kind
        half = self.dtype == "float16"  # IEEE half floats on a Float32 band (module docstring)
        prof = dict(driver="GTiff", width=self.width, height=self.height, count=self.count,
                    dtype="float32" if half else self.dtype, crs=self.crs, transform=self.transform,
                    nodata=self.nodata, tiled=True, blockxsize=self.blocksize,
                    blockysize=self.blocksize, bigtiff="IF_SAFER",
                    num_threads=self.compress_threads,
                    interleave="pixel" if self.count <= 4 else "band",
                    # bands are quantities, never colours: GDAL would take 3 or 4 byte bands for
                    # RGB(A), and a 4th band (a class's probability) for alpha, i.e. a mask
                    photometric="MINISBLACK")
        if self.compress.lower() != "none":
            prof["compress"] = self.compress.lower()
            prof["predictor"] = 3 if kind == "f" else 2
        if half:
            prof["nbits"] = 16
        return prof


def default_nodata(dtype: str) -> float:
    """NaN for floats, max for unsigned ints, min for signed ints."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return float("nan")
    info = np.iinfo(dt)
    return float(info.max if dt.kind == "u" else info.min)


def cast(data: np.ndarray, dtype: str, nodata: float | None) -> np.ndarray:
    """float ``data`` (NaN = nodata) -> ``dtype``; ints are rounded and clipped so that no valid
    pixel collides with ``nodata``. ``nodata=None`` (integers, see ``nodata_mask``): clipped to
    the dtype's whole range, NaN written as 0."""
    dt = np.dtype(dtype)
    bounds = integer_range(dtype, nodata)
    if nodata is None:
        if bounds is None:
            raise ValueError(f"a {dtype} output needs a nodata value")
        return _to_int(data, dt, *bounds, 0)
    if dt == np.float16:  # rounded to half here; stored as float32 values (see the docstring)
        half = np.clip(data, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16).astype(np.float32)
        if not math.isnan(nodata):
            half[~np.isfinite(data)] = nodata
        return half
    if dt.kind == "f":
        if math.isnan(nodata):
            return data.astype(dt, copy=False)
        out = data.astype(dt, copy=True)
        out[~np.isfinite(data)] = nodata
        return out
    assert bounds is not None  # an integer dtype
    return _to_int(data, dt, *bounds, nodata)


def cast_counted(data: np.ndarray, dtype: str, nodata: float | None) -> tuple[np.ndarray, int]:
    """:func:`cast` and :func:`out_of_range` together: ``(cast data, clipped values)``.

    For an integer ``dtype`` the range of ``data`` is looked at first (two reductions, NaN
    propagating through them): when every value is finite and rounds into the dtype's range,
    the values are rounded straight into the integer array (one pass), with nothing to clip or
    fill; otherwise the general path. Same values as :func:`cast` either way (3x faster on an 8
    x 256 x 4096 block of uint8 probabilities: 6.6 against 18 ms).
    """
    bounds = integer_range(dtype, nodata)
    if bounds is None or data.size == 0:
        return cast(data, dtype, nodata), out_of_range(data, dtype, nodata)
    lo, hi = bounds
    mn, mx = float(data.min()), float(data.max())
    if lo - 0.5 < mn and mx < hi + 0.5:  # False for NaN: nodata to fill
        out = np.empty(data.shape, np.dtype(dtype))
        np.rint(data, out=out, casting="unsafe")  # rint stays in [lo, hi]: an exact cast
        return out, 0
    return cast(data, dtype, nodata), out_of_range(data, dtype, nodata)


def integer_range(dtype: str, nodata: float | None) -> tuple[float, float] | None:
    """``(lo, hi)``, the values an integer ``dtype`` output holds besides ``nodata`` (the
    dtype's whole range for ``nodata=None``; valid values are clipped away from a nodata at
    either end); None for floats."""
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        return None
    info = np.iinfo(dt)
    lo, hi = float(info.min), float(info.max)
    if nodata == hi:
        hi -= 1
    elif nodata == lo:
        lo += 1
    return lo, hi


def out_of_range(data: np.ndarray, dtype: str, nodata: float | None) -> int:
    """How many finite values of ``data`` an integer ``dtype`` output clips (beyond its range
    by more than rounding); 0 for float outputs."""
    bounds = integer_range(dtype, nodata)
    if bounds is None:
        return 0
    lo, hi = bounds
    return int(np.count_nonzero(data < lo - 0.5)) + int(np.count_nonzero(data > hi + 0.5))


def _to_int(data: np.ndarray, dt: np.dtype, lo: float, hi: float, fill: float) -> np.ndarray:
    """``data`` rounded, clipped to ``[lo, hi]`` and cast to the integer ``dt``; non-finite
    values become ``fill``. One float temporary, worked in place (half the time of a chain of
    copies on a row band of 8 x 1024 x 4096); float64 for 32-bit integers, whose bounds float32
    cannot hold (4294967294 would round to 2^32 and wrap)."""
    bad = ~np.isfinite(data)
    work = np.rint(data, dtype=np.float64 if dt.itemsize >= 4 else None)
    np.clip(work, lo, hi, out=work)
    work[bad] = fill
    return work.astype(dt)


class Writer:
    """Writes windows into the partial file; ``finish`` converts/renames; ``abort`` cleans up.

    Reopening an existing partial file (``resume=True``) keeps what earlier runs wrote.
    Use :meth:`flush` to make everything written so far durable (closes and reopens the file, so
    the TIFF directory on disk lists every block written).

    ``Writer(spec)`` builds ``spec.writer_class`` instead when the spec names one (another store,
    e.g. :class:`tiling.zarr_writer.ZarrWriter`), with the same four methods.
    """

    #: values written this session that an integer dtype clipped (see :meth:`write`)
    clipped: int = 0

    def __new__(cls, spec: OutputSpec, resume: bool = False) -> Writer:
        other = getattr(spec, "writer_class", None)
        if cls is Writer and other is not None:
            if not issubclass(other, Writer):
                raise TypeError(f"{type(spec).__name__}.writer_class must subclass Writer")
            return super().__new__(other)
        return super().__new__(cls)

    def __init__(self, spec: OutputSpec, resume: bool = False) -> None:
        self.spec = spec
        check_output_dir(spec.path)
        if os.path.isdir(spec.path):
            raise IsADirectoryError(f"the output path {spec.path} is a directory; give a file "
                                    "name such as out.tif")
        self.tmp = spec.partial_path
        if resume and os.path.exists(self.tmp):
            self.ds = rasterio.open(self.tmp, "r+", num_threads=self.spec.compress_threads)
        else:
            self.ds = rasterio.open(self.tmp, "w", **spec.profile())
            if spec.descriptions:
                for i, d in enumerate(spec.descriptions, 1):
                    if d is not None:
                        self.ds.set_band_description(i, str(d))
            if spec.tags:
                self.ds.update_tags(**{k: str(v) for k, v in spec.tags.items()})
            for band, cmap in spec.colormaps.items():
                self.ds.write_colormap(band, cmap)
            if spec.scales is not None:
                self.ds.scales = tuple(float(v) for v in spec.scales)
            if spec.offsets is not None:
                self.ds.offsets = tuple(float(v) for v in spec.offsets)
            if spec.units is not None:
                self.ds.units = tuple(u or "" for u in spec.units)

    def write(self, data: np.ndarray, window: Window) -> None:
        """Write float ``data`` ``[count, rows, cols]`` (NaN = nodata) at ``window``; with
        ``nodata_mask`` a pixel is valid where all its bands are finite. Values an integer
        dtype cannot hold are clipped, and counted in :attr:`clipped`."""
        values, clipped = cast_counted(data, self.spec.dtype, self.spec.nodata)
        self.clipped += clipped
        self.ds.write(values, window=window)
        if self.spec.nodata_mask:
            valid = np.isfinite(data).all(axis=0)
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):  # in the file, not a .msk sidecar
                self.ds.write_mask(np.where(valid, np.uint8(255), np.uint8(0)), window=window)

    def flush(self) -> None:
        self.ds.close()
        # creation options do not persist: multi-threaded compression must be asked again
        self.ds = rasterio.open(self.tmp, "r+", num_threads=self.spec.compress_threads)

    def finish(self) -> str:
        """Close, convert to COG if asked, and atomically move onto the output path."""
        self.ds.close()
        final = self.tmp
        if self.spec.cog:
            final = self.tmp[:-len(".tif")] + ".cog.tif"
            to_cog(self.tmp, final, self.spec.blocksize, self.spec.compress, self.spec.dtype)
            os.remove(self.tmp)
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


def check_output_dir(path: str) -> None:
    """Raise unless the directory that will hold ``path`` exists and is writable."""
    out_dir = Path(path).resolve().parent
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output directory {out_dir} does not exist; create it first")
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"cannot write to the output directory {out_dir}")


#: GDAL's compression threads for the outputs written now (``NUM_THREADS``), innermost last.
_COMPRESS_THREADS = ["ALL_CPUS"]


@contextmanager
def compression_threads(threads: int | None) -> Iterator[None]:
    """Compress the outputs written in the block with ``threads`` GDAL threads (None: all
    cores, GDAL's ``ALL_CPUS``), e.g. the CPUs a run was given on a shared machine."""
    _COMPRESS_THREADS.append("ALL_CPUS" if threads is None else str(max(1, int(threads))))
    try:
        yield
    finally:
        _COMPRESS_THREADS.pop()


def to_cog(src: str, dst: str, blocksize: int = 256, compress: str = "deflate",
           dtype: str = "float32") -> None:
    """Copy the finished GeoTIFF ``src`` to a Cloud-Optimized GeoTIFF ``dst`` (overviews:
    average for floats, nearest for integers; colour tables, tags and half floats are kept).
    ``dst`` is removed if the copy fails."""
    opts = dict(driver="COG", blocksize=blocksize, bigtiff="IF_SAFER",
                num_threads=_COMPRESS_THREADS[-1],
                overview_resampling="average" if np.dtype(dtype).kind == "f" else "nearest")
    if compress.lower() != "none":
        opts["compress"] = compress.lower()
        opts["predictor"] = "YES"
    try:
        rasterio.shutil.copy(src, dst, **opts)
    except BaseException:
        _remove(dst)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
