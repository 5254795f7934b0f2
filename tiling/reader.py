"""Readers: windows of an input raster (a file through rasterio, or an in-memory/dask array).

Every reader returns float32 ``[bands, rows, cols]`` with ``NaN`` where the input is nodata or
where the requested window lies outside the input (boundless reads are padded, never clamped).
Input windows are derived from an output window through georeferenced bounds
(:func:`rasterio.windows.bounds` then :func:`rasterio.windows.from_bounds`), so an input on a
coarser grid (e.g. a low-res raster at scale 8) gets the matching sub-grid. A file on another
grid (another CRS, a misaligned origin) can be read through a :class:`Warp`: GDAL reprojects it
onto the given grid as it is read (:class:`rasterio.vrt.WarpedVRT`), window by window.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window, bounds, from_bounds

_local = threading.local()

#: GDAL warp resampling methods that a :class:`Warp` accepts, by the names of rasterio's
#: :class:`~rasterio.enums.Resampling`.
WARP_RESAMPLINGS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average",
                    "mode", "max", "min", "med", "q1", "q3", "sum", "rms")

#: ``gdalwarp -r`` spellings that differ from rasterio's names, accepted as aliases.
GDAL_RESAMPLING_ALIASES = {"near": "nearest", "cubicspline": "cubic_spline"}


def resampling_name(name: str) -> str:
    """The :data:`WARP_RESAMPLINGS` name of a warp resampling given by it or by its
    ``gdalwarp -r`` spelling (``cubicspline``, ``near``), in any case; ``ValueError`` for
    another name."""
    key = str(name).strip().lower()
    key = GDAL_RESAMPLING_ALIASES.get(key, key)
    if key not in WARP_RESAMPLINGS:
        aliases = ", ".join(f"{a} for {n}" for a, n in GDAL_RESAMPLING_ALIASES.items())
        raise ValueError(f"unknown warp resampling {name!r}; choose one of "
                         f"{', '.join(WARP_RESAMPLINGS)} (gdalwarp's spellings are accepted "
                         f"too: {aliases})")
    return key


def check_resampling(name: str) -> None:
    """Refuse (``ValueError``) a warp resampling that :func:`resampling_name` does not know."""
    resampling_name(name)


@dataclass(frozen=True)
class Warp:
    """A target grid onto which a file is reprojected as it is read (a GDAL warped VRT).

    Args:
        crs: the target CRS (WKT or any string :class:`rasterio.crs.CRS` reads).
        transform: the target grid's affine transform, as its six coefficients
            ``(a, b, c, d, e, f)``.
        width, height: the target grid's size in pixels.
        resampling: one of :data:`WARP_RESAMPLINGS` (``nearest`` or ``mode`` for class numbers,
            ``bilinear`` or ``average`` for probabilities and other continuous values), or its
            ``gdalwarp -r`` spelling (``cubicspline``), kept under the former name.

    Warped values are float32 with NaN where the source is nodata or absent.
    """

    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    resampling: str = "bilinear"

    def __post_init__(self) -> None:  # one name per method: tags and resume journals agree
        object.__setattr__(self, "resampling", resampling_name(self.resampling))

    def open(self, src: rasterio.io.DatasetReader, src_nodata: float | None = None) -> WarpedVRT:
        """``src`` seen on this grid (float32, NaN nodata); ``src_nodata`` overrides the
        source's nodata value. Close the VRT before ``src``."""
        extra = {} if src_nodata is None else {"src_nodata": src_nodata}
        # coordinates to 1e-6 px rather than GDAL's default 1/8 px (its approximation depends on
        # the window read): every window of the grid then reads what a whole-grid read gives,
        # so tiles agree (0 would be exact, but rasterio builds no transformer for it)
        return WarpedVRT(src, crs=self.crs, transform=Affine(*self.transform[:6]),
                         width=self.width, height=self.height,
                         resampling=Resampling[self.resampling], nodata=float("nan"),
                         dtype="float32", tolerance=1e-6, **extra)


def is_local_path(path: str) -> bool:
    """Whether ``path`` names a file of the local file system, rather than a dataset GDAL reads
    some other way: a URL (``https://``, ``s3://``, ``gs://``...) or a GDAL virtual file system
    path (``/vsicurl/...``, ``/vsizip/...``)."""
    return "://" not in path and not path.startswith("/vsi")


def with_remote_hint(message: str, path: str) -> str:
    """``message`` about a dataset that could not be opened, followed, for a remote or virtual
    ``path``, by what to check (unchanged for a local file)."""
    if is_local_path(path):
        return message
    return (f"{message}; check the address, that the server is reachable, and for cloud storage "
            "your credentials (GDAL's AWS_*, GS_*, AZURE_* settings)")


def file_stamp(path: str) -> tuple[int, int] | tuple[()]:
    """``(mtime_ns, size)`` of a local file; ``()`` for a remote or virtual dataset, which is
    taken as unchanged while it is read."""
    if not is_local_path(path):
        return ()
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def open_cached(path: str, warp: Warp | None = None,
                src_nodata: float | None = None) -> rasterio.io.DatasetReader | WarpedVRT:
    """A read-only dataset for ``path`` (seen through ``warp`` if given), opened once per thread
    (datasets are not thread-safe)."""
    cache = getattr(_local, "datasets", None)
    if cache is None:
        cache = _local.datasets = {}
    key = (path, file_stamp(path), warp, src_nodata)
    ds = cache.get(key)
    if ds is None or ds.closed:
        ds = rasterio.open(path)
        if warp is not None:
            ds = warp.open(ds, src_nodata)  # the VRT keeps its source open
        cache[key] = ds
    return ds


def input_window(out_window: Window, out_transform: Affine, in_transform: Affine,
                 tolerance: float = 0.25) -> Window:
    """The window of an input grid covering the same ground as ``out_window`` of the output grid.

    Offsets and sizes are rounded to whole input pixels; a misfit larger than ``tolerance`` input
    pixels (grids that do not nest) raises ``ValueError``. ``tolerance`` must be below 0.5 (at
    half a pixel the rounding could go either way).
    """
    if not 0 <= tolerance < 0.5:
        raise ValueError(f"a window misfit tolerance of {tolerance}: give it in [0, 0.5)")
    w = from_bounds(*bounds(out_window, out_transform), transform=in_transform)
    # to the nearest whole pixels (rasterio's round_offsets floors: a window a quarter pixel
    # before an input pixel's edge would start a pixel early)
    r = Window(math.floor(w.col_off + 0.5), math.floor(w.row_off + 0.5),
               math.floor(w.width + 0.5), math.floor(w.height + 0.5))
    err = max(abs(w.col_off - r.col_off), abs(w.row_off - r.row_off),
              abs(w.width - r.width), abs(w.height - r.height))
    if err > tolerance:
        raise ValueError(
            f"tile window {out_window} does not fall on whole pixels of the input grid "
            f"(misfit {err:.2f} px); the grids do not nest - align the tile grid to the scale")
    return r


def _boundless(read: Any, window: Window, height: int, width: int, count: int) -> np.ndarray:
    """Read ``window`` (may leave ``[0, height) x [0, width)``) via ``read(inner_window)``."""
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    out = np.full((count, r1 - r0, c1 - c0), np.nan, dtype=np.float32)
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, height), min(c1, width)
    if ir1 > ir0 and ic1 > ic0:
        data = read(Window(ic0, ir0, ic1 - ic0, ir1 - ir0))
        out[:, ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = data
    return out


def to_float(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """float32 copy of ``data`` with ``nodata`` (and NaN) as NaN."""
    out = np.asarray(data, dtype=np.float32)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        out = np.where(np.asarray(data) == nodata, np.float32(np.nan), out)
    return out


def mask_band_used(ds: Any, indexes: Any) -> bool:
    """Whether bands ``indexes`` (1-based) carry a GDAL mask that their nodata value does not
    already say: an internal or sidecar per-dataset mask (common in COGs). Alpha is not taken:
    GDAL labels the 4th band of any 4-band 8-bit GeoTIFF written without PHOTOMETRIC as alpha,
    and in R, G, B, NIR imagery that "alpha" is the NIR band."""
    if not hasattr(ds, "mask_flag_enums"):
        return False
    flags = [ds.mask_flag_enums[i - 1] for i in ([indexes] if isinstance(indexes, int)
                                                  else indexes)]  # fmt: skip
    return any(MaskFlags.per_dataset in f and not {MaskFlags.nodata, MaskFlags.alpha} & set(f)
               for f in flags)  # fmt: skip


def read_valid(ds: Any, indexes: Any, window: Window, nodata: float | None,
               path: str | None = None) -> np.ndarray:
    """float32 ``[bands, rows, cols]`` of bands ``indexes`` in ``window``, NaN where the
    pixels are ``nodata``, NaN, or masked out by the file's mask band.

    A block GDAL cannot decode (a damaged or truncated file) raises
    :class:`rasterio.errors.RasterioIOError` naming ``path`` (default ``ds.name``), the window
    and GDAL's own reason, where rasterio alone says "Read failed. See previous exception".
    """
    try:
        data = to_float(ds.read(indexes, window=window), nodata)
        if mask_band_used(ds, indexes):
            data = np.where(ds.read_masks(indexes, window=window) == 0, np.float32(np.nan), data)
    except RasterioIOError as err:
        raise RasterioIOError(read_failure(path or ds.name, window, err)) from err
    return data


def read_failure(path: str, window: Window, err: BaseException) -> str:
    """What to tell a user when reading ``window`` of ``path`` failed with ``err``: where, GDAL's
    reason (rasterio keeps it as the exception's cause) and what to check."""
    reason = str(err.__cause__ or err).strip().rstrip(".")
    rows = f"{int(window.row_off)}-{int(window.row_off + window.height)}"
    cols = f"{int(window.col_off)}-{int(window.col_off + window.width)}"
    message = (f"cannot read rows {rows}, columns {cols} of {path}: {reason}. The file is "
               f"probably damaged or truncated: check it with `gdalinfo -checksum {path}` and "
               "re-create or re-download it")
    if not is_local_path(path):
        message += "; for a remote file also check the connection (a transfer may have failed)"
    return message


@dataclass(frozen=True)
class RasterInput:
    """A raster file read window by window with rasterio.

    Args:
        path: the file: a local path, a URL (``https://``, ``s3://``...) or a GDAL virtual
            path (``/vsicurl/...``); anything rasterio opens.
        bands: 1-based band indexes to read (default: all), in the order given.
        nodata: overrides the file's nodata value (pixels equal to it become NaN).
        warp: read the file reprojected onto this grid (see :class:`Warp`); None: as it is.
        misfit: input pixels by which an output window's edges may fall off the input's pixel
            edges before the grids count as not nesting (:func:`input_window`); below 0.5. An
            input grid shifted from the output's by a fraction of a pixel (a Landsat L1
            product's 30 m bands on its 15 m pan band: a quarter of a 30 m pixel) needs more
            than the default.
    """

    path: str
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    warp: Warp | None = None
    misfit: float = 0.25

    def _ds(self) -> rasterio.io.DatasetReader | WarpedVRT:
        return open_cached(self.path, self.warp, self.nodata if self.warp else None)

    @property
    def transform(self) -> Affine:
        return self._ds().transform

    @property
    def count(self) -> int:
        return len(self.bands) if self.bands else self._ds().count

    def read(self, out_window: Window, out_transform: Affine) -> np.ndarray:
        """float32 ``[bands, rows, cols]`` covering ``out_window`` of the output grid."""
        ds = self._ds()
        win = input_window(out_window, out_transform, ds.transform, self.misfit)
        indexes = list(self.bands) if self.bands else list(range(1, ds.count + 1))
        nodata = self.nodata if self.nodata is not None and self.warp is None else ds.nodata
        return _boundless(lambda w: read_valid(ds, indexes, w, nodata, self.path), win,
                          ds.height, ds.width, len(indexes))

    def identity(self) -> dict:
        """What identifies this input for a resume journal (path, size, mtime, bands; a URL or
        GDAL virtual path by its name alone)."""
        if not is_local_path(self.path):
            where = {"path": self.path}
        else:
            mtime_ns, size = file_stamp(self.path)
            where = {"path": os.path.abspath(self.path), "size": size, "mtime_ns": mtime_ns}
        return {**where, "bands": self.bands, "nodata": self.nodata,
                **({"warp": asdict(self.warp)} if self.warp else {})}


@dataclass(frozen=True)
class ArrayInput:
    """An array ``[bands, rows, cols]`` (numpy or dask) on a grid given by ``transform``.

    Reading a window computes only that slice (dask reads only the chunks it needs).
    """

    array: Any
    transform: Affine
    nodata: float | None = None
    misfit: float = 0.25  # see RasterInput

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    def window(self, out_window: Window, out_transform: Affine) -> Window:
        return input_window(out_window, out_transform, self.transform, self.misfit)

    def read(self, out_window: Window, out_transform: Affine) -> np.ndarray:
        """float32 ``[bands, rows, cols]`` covering ``out_window`` of the output grid."""
        win = self.window(out_window, out_transform)
        _, h, w = self.array.shape
        return _boundless(lambda iw: to_float(np.asarray(self.array[(slice(None),)
                                                                     + iw.toslices()]),
                                              self.nodata),
                          win, h, w, self.count)

    def identity(self) -> dict:
        return {"array": repr(type(self.array)), "shape": list(self.array.shape),
                "transform": list(self.transform)[:6], "name": getattr(self.array, "name", None)}


def block_aligned_chunks(path: str, target: int = 2048) -> dict[str, int]:
    """Dask chunk sizes for ``rioxarray.open_rasterio(path, chunks=...)``: multiples of the file's
    block shape near ``target`` pixels, all bands in one chunk."""
    with rasterio.open(path) as ds:
        by, bx = ds.block_shapes[0]
    return {"band": -1, "y": max(1, target // by) * by, "x": max(1, target // bx) * bx}


def open_dask(path: str, target: int = 2048, **kwargs: Any) -> Any:
    """Open ``path`` lazily with rioxarray, chunks aligned to its blocks (``DataArray``)."""
    import rioxarray  # noqa: F401 - registers the .rio accessor

    return rioxarray.open_rasterio(path, chunks=block_aligned_chunks(path, target), **kwargs)
