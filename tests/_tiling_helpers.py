"""Helpers shared by the tests: write and read small real GeoTIFFs, simple per-tile functions."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

CRS_UTM = CRS.from_epsg(32631)


def read_tif(path) -> np.ndarray:
    """All bands of a raster file, ``[bands, rows, cols]``."""
    with rasterio.open(path) as ds:
        return ds.read()


def write_tif(path, data: np.ndarray, transform: Affine, crs=CRS_UTM, nodata=None,
              block: int = 64, descriptions=None) -> str:
    """Write ``data`` [bands, rows, cols] as a tiled GeoTIFF; returns the path as str."""
    count, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count,
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata,
                       tiled=True, blockxsize=block, blockysize=block) as ds:
        ds.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                ds.set_band_description(i, d)
    return str(path)


def damage_block(path, band: int = 1, block: tuple[int, int] = (1, 1)) -> str:
    """Overwrite the compressed bytes of one block (``(col, row)`` in blocks) of a tiled,
    compressed GeoTIFF ``path`` in place, as a truncated download or a bad disk would; GDAL then
    fails to decode that block (and only that one). Returns the path."""
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{block[0]}_{block[1]}", "TIFF", bidx=band))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{block[0]}_{block[1]}", "TIFF", bidx=band))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)
    return str(path)


def identity(ctx):
    """Per-tile function: the input ``img`` as is."""
    return ctx.data["img"]


def box3(ctx):
    """Per-tile function: 3x3 mean of ``img`` with edge replication (support 1 px)."""
    x = ctx.data["img"]
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[1:]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def box3_whole(x):
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[1:]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


#: times a :class:`CountsLoads` was unpickled in this process (dask workers report theirs)
LOADS = [0]
#: times a :class:`CountsLoads` was pickled in this process (dask tokenises by pickling)
DUMPS = [0]


class CountsLoads:
    """:func:`box3` as an object with a 1 MB payload (a stand-in for a backbone's weights) that
    counts how often it is pickled and unpickled in each process: once per dask graph and once
    per dask worker, not once per tile."""

    def __init__(self) -> None:
        self.payload = np.zeros(1 << 18, np.float32)

    def __getstate__(self) -> dict:
        DUMPS[0] += 1
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        LOADS[0] += 1

    def __call__(self, ctx):
        return box3(ctx)


def loads() -> int:
    """:data:`LOADS` of this process."""
    return LOADS[0]


class Repeat:
    """Per-tile function: nearest upsampling of ``lr`` by ``scale`` (picklable)."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, ctx):
        x = ctx.data["lr"]
        return np.repeat(np.repeat(x, self.scale, axis=1), self.scale, axis=2)


class SlowBox3:
    """``box3`` that sleeps ``delay`` seconds per tile (to interrupt a run mid-way)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, ctx):
        import time

        time.sleep(self.delay)
        return box3(ctx)


class Failing:
    """Per-tile function that raises on tile ``bad`` (to test cleanup on error)."""

    def __init__(self, bad=(1, 1)) -> None:
        self.bad = tuple(bad)

    def __call__(self, ctx):
        if ctx.tile.id == self.bad:
            raise RuntimeError("boom in tile")
        return ctx.data["img"]


def kill_9_after_bands(proc: subprocess.Popen, out: str, bands: int, timeout: float) -> None:
    """SIGKILL ``proc`` once the resume journal of ``out`` records ``bands`` finished row bands."""
    from tiling.journal import journal_path

    jpath = journal_path(out)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if os.path.exists(jpath):
                with open(jpath) as f:
                    if sum(1 for _ in f) >= 1 + bands:  # a header line, then one per band
                        break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


class KillsItsWorkerOnce:
    """:func:`box3` that ends the (dask worker) process running it the first time it is called
    anywhere but in the process that made it; ``marker`` records that it did."""

    def __init__(self, marker: str) -> None:
        self.marker, self.parent = marker, os.getpid()

    def __call__(self, ctx):
        if os.getpid() != self.parent:
            try:  # atomic: one worker dies, once
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        return box3(ctx)
