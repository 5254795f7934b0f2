"""The NAIP time series of ../shared/data/naip-series brought onto one grid (shared by
``benchmarks/series.py`` and ``benchmarks/make_naip_sample.py``).

Ten acquisitions of one quarter quad, 2009-2020, 4 bands (R, G, B, NIR) uint8 at 5 m, whose grids
differ by 0.6 to 3 m from date to date: each is reprojected (bilinear) onto the last date's grid,
cropped to the rows and columns every date covers.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window

SERIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "naip-series")  # fmt: skip
#: Rows and columns of the last date's grid that every date covers (the 723-row dates end a
#: row short, and the shifted origins cost a pixel or two at the edges), 712 rows: 89 cells of 8.
COMMON = Window(2, 2, 928, 712)


def series_files(folder: str = SERIES) -> list[tuple[str, str]]:
    """``[(date "YYYY-MM-DD", path)]`` of the acquisitions, in date order."""
    files = sorted(glob.glob(os.path.join(folder, "m_*_????????.tif")))
    if not files:
        raise SystemExit(f"no NAIP acquisitions in {folder}")
    out = []
    for f in files:
        d = re.search(r"_(\d{8})\.tif$", f).group(1)
        out.append((f"{d[:4]}-{d[4:6]}-{d[6:]}", f))
    return out


def aligned_dates(folder: str = SERIES, window: Window = COMMON
                  ) -> tuple[list[str], np.ndarray, dict]:  # fmt: skip
    """``(dates, stack [T, 4, H, W] uint8, profile)``: every acquisition on the last one's grid
    (bilinear, rounded), cropped to ``window`` of it; ``profile`` describes one date's crop."""
    files = series_files(folder)
    with rasterio.open(files[-1][1]) as ref:
        crs, transform = ref.crs, ref.window_transform(window)
        profile = {**ref.profile, "width": int(window.width), "height": int(window.height),
                   "transform": transform}
    stack = []
    for _, path in files:
        with rasterio.open(path) as ds:
            dst = np.zeros((ds.count, int(window.height), int(window.width)), np.float32)
            reproject(ds.read().astype(np.float32), dst, src_transform=ds.transform,
                      src_crs=ds.crs, dst_transform=transform, dst_crs=crs,
                      resampling=Resampling.bilinear)  # fmt: skip
            stack.append(np.clip(np.rint(dst), 0, 255).astype(np.uint8))
    return [d for d, _ in files], np.stack(stack), profile
