"""The input rasters: opening them, choosing and checking their bands, and the scene-wide
guide statistics (from a regular subsample read window by window, so tiles agree and memory stays
bounded). Every problem is an :class:`InputError` whose message says what to fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

import geoupsample as gu
from tiling.execute import gdal_env
from tiling.reader import is_local_path, read_valid, to_float, with_remote_hint

#: Largest side of the regular subsample used for the scene-wide guide statistics (1024^2 =
#: about the 1M samples per band that ``gu.guide_stats`` uses at most).
STATS_SIDE = 1024
SUPPORTED_INPUT_KINDS = "biuf"


class InputError(ValueError):
    """A problem with the inputs or parameters; the message says what and how to fix it."""


def open_raster(path: str | os.PathLike, what: str) -> rasterio.io.DatasetReader:
    """Open ``path`` with rasterio; :class:`InputError` naming ``what`` if missing or unreadable.

    ``path`` is a local file, a URL (``https://``, ``s3://``, ``gs://``...: a cloud-optimised
    GeoTIFF is then read window by window with HTTP range requests) or a GDAL virtual path
    (``/vsicurl/``, ``/vsizip/``...)."""
    path = os.fspath(path)
    local = is_local_path(path)
    if local and not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        if local:
            raise InputError(f"cannot read the {what} {path}: not a raster GDAL can open ({err})"
                             ) from err
        raise InputError(with_remote_hint(f"cannot open the {what} {path} ({err})", path)
                         ) from err


def model_band_choice(model_bands: Sequence[int | str]) -> list[int | str]:
    """``--model-bands`` / ``model_bands=`` (band names, or 1-based indexes among the chosen
    bands; a string of digits is an index) as a timm backbone's ``bands`` (names, or 0-based
    indexes); :class:`InputError` for an index below 1 or an empty choice."""
    if isinstance(model_bands, (str, int)):
        model_bands = [model_bands]
    out: list[int | str] = []
    for b in model_bands:
        if isinstance(b, str) and not b.strip().isdigit():
            out.append(b.strip())
            continue
        i = int(b)
        if isinstance(b, bool) or i < 1:
            raise InputError(f"model_bands are band names or 1-based indexes among the chosen "
                             f"bands (as the CLI's --model-bands), got {b!r}")
        out.append(i - 1)
    if not out:
        raise InputError("model_bands=[] chooses no band; leave it out to feed all the bands")
    return out


def select_bands(ds: rasterio.io.DatasetReader, bands: Sequence[int | str] | None,
                 what: str) -> tuple[int, ...]:
    """1-based band indexes from indexes (1-based ints or digit strings) or band descriptions
    (matched exactly, else ignoring case when that names one band)."""
    if ds.count == 0:
        raise InputError(f"the {what} has no bands")
    if bands is None:
        return tuple(range(1, ds.count + 1))
    if len(bands) == 0:
        raise InputError(f"no bands selected from the {what}; pass band indexes (1-based) or "
                         "descriptions")
    out = []
    descs = [d or "" for d in ds.descriptions]
    folded = [d.strip().casefold() for d in descs]
    for b in bands:
        if isinstance(b, str) and not b.strip().isdigit():
            key = b.strip().casefold()  # "RED" and "Red" name the band described "red"
            if b in descs:
                out.append(descs.index(b) + 1)
            elif key and folded.count(key) == 1:
                out.append(folded.index(key) + 1)
            else:
                named = ", ".join(repr(d) for d in descs if d)
                hint = (f"its bands are described {named}" if named else
                        "its bands have no descriptions: use 1-based indexes")
                raise InputError(f"the {what} has no band described {b!r}; {hint}")
        else:
            i = int(b)
            if not 1 <= i <= ds.count:
                raise InputError(f"band {i} does not exist in the {what} (it has {ds.count} "
                                 "bands, numbered from 1)")
            out.append(i)
    return tuple(out)


def check_dtype(ds: rasterio.io.DatasetReader, indexes: Sequence[int], what: str) -> None:
    """Refuse bands that are not integers or floats (complex, boolean)."""
    for i in indexes:
        dt = np.dtype(ds.dtypes[i - 1])
        if dt.kind not in SUPPORTED_INPUT_KINDS or dt.kind == "b":
            raise InputError(f"band {i} of the {what} has unsupported dtype {dt.name}; use "
                             "integer or floating-point bands (e.g. split complex data)")


def colour_table(ds: rasterio.io.DatasetReader, band: int) -> dict | None:
    """Band ``band``'s colour table ``{value: (r, g, b, a)}``, or None when it has none."""
    try:
        return ds.colormap(band)
    except ValueError:  # rasterio's way of saying there is none
        return None


def check_not_class_map(ds: rasterio.io.DatasetReader, indexes: Sequence[int], method: str,
                        kind: str) -> None:
    """Refuse to interpolate class numbers: an integer band with a colour table, or the one
    integer band of a raster tagged ``class_names``, holds classes, which any method but
    ``nearest`` would average into classes that do not exist (1 and 3 into 2). ``kind`` set
    to ``"continuous"`` says the numbers are quantities after all."""
    if method == "nearest" or kind == "continuous":
        return
    for i in indexes:
        if np.dtype(ds.dtypes[i - 1]).kind not in "iu":
            continue
        if colour_table(ds, i) is not None:
            why = "has a colour table"
        elif ds.count == 1 and "class_names" in ds.tags():
            why = "is tagged with class_names"
        else:
            continue
        raise InputError(
            f"band {i} of the low-res raster {why}: it holds class numbers, which {method} "
            "would average into classes that do not exist (1 and 3 into 2). Upsample the class "
            "probabilities instead (one band per class, e.g. from geoupsample segment --probs) "
            "and take the most likely class, or use --method nearest; if the numbers are "
            "quantities, pass --kind continuous"
        )


def decimated_stats_sample(read: Callable[[Window], np.ndarray], height: int, width: int,
                           side: int = STATS_SIDE) -> np.ndarray:
    """A regular subsample ``[:, ::k, ::k]`` (``k = ceil(max(H, W) / side)``) of a raster read
    window by window by ``read(window) -> float32 [bands, rows, cols]`` (NaN = nodata).

    Windows are at most about 256 x 2048 pixels, so memory does not grow with the raster.
    An empty raster (no row or no column) is an :class:`InputError`."""
    if height <= 0 or width <= 0:
        raise InputError(f"nothing to sample in a {height} x {width} pixel window: the rasters "
                         "overlap by less than one pixel; give rasters that cover a common area")
    k = max(1, math.ceil(max(height, width) / side))
    stripe, chunk = k * max(1, 256 // k), k * max(1, 2048 // k)  # multiples of k: one lattice
    rows = []
    for r0 in range(0, height, stripe):
        h = min(height, r0 + stripe) - r0
        # copies, not strided views that would keep whole windows alive
        cols = [np.ascontiguousarray(read(Window(c0, r0, min(width, c0 + chunk) - c0, h))
                                     [:, ::k, ::k]) for c0 in range(0, width, chunk)]
        rows.append(np.concatenate(cols, axis=2))
    return np.concatenate(rows, axis=1)


def scene_guide_stats(path: str | os.PathLike, bands: Sequence[int] | None = None,
                      nodata: float | None = None) -> gu.GuideStats:
    """Scene-wide guide statistics from a regular subsample of the whole guide file.

    Reads the file stripe by stripe (bounded memory). Raises :class:`InputError` if the guide
    has no valid pixel.
    """
    with gdal_env(), open_raster(path, "guide") as ds:  # bounded GDAL cache while scanning
        idx = list(bands) if bands else list(range(1, ds.count + 1))
        read = file_reader(ds, idx, nodata if nodata is not None else ds.nodata)
        sample = decimated_stats_sample(read, ds.height, ds.width)
    return _stats(sample, str(path))


def file_reader(ds: rasterio.io.DatasetReader, indexes: Sequence[int],
                nodata: float | None) -> Callable[[Window], np.ndarray]:
    """``read(window) -> float32 [bands, rows, cols]`` (NaN = nodata) of bands ``indexes``
    (1-based) of an open file; the counterpart of :func:`array_reader`."""

    def read(window: Window) -> np.ndarray:
        return read_valid(ds, list(indexes), window, nodata)

    return read


def array_reader(array: Any, nodata: float | None) -> Callable[[Window], np.ndarray]:
    """``read(window) -> float32 [bands, rows, cols]`` (NaN = nodata) of an array
    ``[bands, H, W]`` (numpy, dask or anything that slices like one); a dask array computes
    only that slice."""

    def read(window: Window) -> np.ndarray:
        return to_float(np.asarray(array[(slice(None), *window.toslices())]), nodata)

    return read


def array_guide_stats(array: Any, nodata: float | None, name: str) -> gu.GuideStats:
    """:func:`scene_guide_stats` of an array ``[bands, H, W]`` (numpy, dask or anything that
    slices like one), from the same regular subsample, read window by window."""
    read = array_reader(array, nodata)
    return _stats(decimated_stats_sample(read, int(array.shape[1]), int(array.shape[2])), name)


def _stats(sample: np.ndarray, name: str) -> gu.GuideStats:
    if not np.isfinite(sample).all(0).any():
        raise InputError(f"the guide {name} has no valid pixel (all nodata): nothing to "
                         "upsample; check its nodata value")
    return gu.guide_stats(sample)


def any_valid(ds: rasterio.io.DatasetReader, indexes: Sequence[int], window: Window,
               every_band: bool) -> bool:
    """Whether ``window`` of ``ds`` holds a valid pixel; reads block by block, stops early."""
    win = window.round_offsets().round_lengths()
    read = file_reader(ds, indexes, ds.nodata)
    for _, bw in ds.block_windows(1):
        try:
            part = bw.intersection(win)
        except rasterio.errors.WindowError:
            continue
        v = np.isfinite(read(part))
        if (v.all(0) if every_band else v.any(0)).any():
            return True
    return False


def check_method_options(method: str, iters: object, radius: object = 3, seed: object = 0) -> None:
    """Refuse, before any work, an unknown ``method`` or bad fit options (:class:`InputError`
    naming what to pass): whole-scene runs would otherwise fail in their first tile, or, lazily,
    only when computed."""
    from geoupsample.core.kernels import check_fit_options

    if method not in gu.METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(gu.METHODS)}")
    try:
        check_fit_options(iters, radius, seed)
    except ValueError as err:
        raise InputError(str(err)) from err


def is_zarr_path(path: str | os.PathLike[str]) -> bool:
    """Whether an output path names a Zarr store (ends with ``.zarr``)."""
    return os.fspath(path).rstrip("/").lower().endswith(".zarr")


def check_output_paths(
    outputs: dict[str, str | os.PathLike | None], inputs: dict[str, Any],
    rasters: tuple[str, ...] = ("-o", "--probs"),
) -> None:
    """Refuse, before any work, an output that would overwrite an input or another output (also
    through a symbolic link), whose folder does not exist, or whose extension names another
    format than GeoTIFF (or Zarr) (:class:`InputError`).

    Args:
        outputs: option name (``-o``, ``--probs``...) -> output path, or None when not asked for.
        inputs: what the input is ("the scene", ...) -> its path; remote URLs and non-path
            inputs (a GeoDataFrame) are skipped.
        rasters: the options whose outputs are rasters (their extension is checked).
    """
    seen: dict[str, str] = {}
    for what, path in inputs.items():
        if isinstance(path, (str, os.PathLike)) and is_local_path(os.fspath(path)):
            seen[os.path.realpath(path)] = what
    for option, path in outputs.items():
        if path is None:
            continue
        ext = os.path.splitext(os.fspath(path).rstrip("/"))[1].lower()
        if option in rasters and ext and ext not in (".tif", ".tiff", ".zarr"):
            raise InputError(f"{option} {os.fspath(path)}: outputs are GeoTIFFs (features may "
                             f"also write .zarr), not {ext} files; give a .tif path")
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(f"{option} {os.fspath(path)} would overwrite {seen[real]}; "
                             "give another path")
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            raise InputError(f"{option} {os.fspath(path)}: the folder {folder} does not exist; "
                             "create it first")
        seen[real] = f"the {option} output"
