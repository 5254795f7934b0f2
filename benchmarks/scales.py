"""GSJBU at every scale (BENCHMARKS.md §1 case D and §3; issue 23).

Three parts, each run in fresh processes (one at a time: the machine must be otherwise idle):

- ``fit``: ``gu.fit`` + ``Kernels.render`` on one guide at x2, x4, x8 and x16: a 4-band
  1024 x 1024 guide (the bundled Rotterdam sample's R, G, B, NIR mirrored), 6 channels
  rendered; seconds and microseconds per output pixel, and the slowest scale over the fastest
  (target: within 1.5x).
- ``scene``: whole-scene ``geoupsample upsample`` (``upsample_raster``, default settings) at
  each scale for ``gsjbu``, ``jbu`` and ``bilinear``: a 4-band uint16 guide of N x N pixels and
  6 uint16 low-res bands of N / scale, built by mirroring a real NAIP scene (shared data,
  ``naip-series``; 4 bands at 5 m, 2018 and 2020: the 2020 R, G, B, NIR and the 2018 R and NIR
  as the six bands, each area-averaged to the low-res grid); megapixels of output per second
  and peak RSS over the imports (target: gsjbu >= 0.5 MP/s at every scale, memory flat in N).
- ``many``: 8 single-band rasters on one grid (the 6 low-res bands of ``scene`` as separate
  files, and two more made from them) onto the guide, ``gsjbu``: one ``upsample_raster`` pass
  (one fit per tile, 8 renders) against 8 separate runs; seconds, their ratio (target: <=
  0.35), and whether every output equals its separate run's.
- ``s2``: the Sentinel-2-sized case: a 10980 x 10980 4-band guide and 6 bands at 5490 x 5490
  (x2), built the same way, through ``geoupsample upsample --method gsjbu`` (the CLI); seconds
  and peak RSS of the whole command (target: <= 5 minutes and <= 1.5 GB).

    python benchmarks/scales.py fit -n 3
    python benchmarks/scales.py scene --size 4096 --scales 2 4 8 16 -n 3
    python benchmarks/scales.py scene --size 8192 --scales 2 --methods gsjbu
    python benchmarks/scales.py many --size 2048 --scale 2 -n 3
    python benchmarks/scales.py s2 -n 3

Scenes are generated once under ``benchmarks/_data/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench import peak_rss, rss, spawn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "_data"
SHARED = ROOT.parent / "shared" / "data"
NAIP = SHARED / "naip-series"
BANDS_HR = 4
BANDS_LR = 6






def mirror_index(n: int, period: int):
    """Indices ``[n]`` into an axis of ``period`` samples, mirrored at each end (0..p-1,
    p-1..0, 0..)."""
    import numpy as np

    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


# --- part 1: fit + render on one guide ------------------------------------------------------
def child_fit(scale: int) -> dict:
    import numpy as np
    import rasterio
    import torch

    import geoupsample as gu

    gu.tune_allocator()
    with rasterio.open(ROOT / "geoupsample" / "data" / "rotterdam_ms.tif") as src:
        ms = src.read().astype(np.float32)
    n = 1024
    ri, ci = mirror_index(n, ms.shape[1]), mirror_index(n, ms.shape[2])
    guide = np.ascontiguousarray(ms[:, ri][:, :, ci])
    six = np.concatenate([guide, guide[:2]])  # 6 channels
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(six)[None], scale)[0]
    lr_shape = (n // scale, n // scale)
    small = x[:, : 128 // scale, : 128 // scale]  # warm-up: Numba's compiled code loaded
    gu.fit(guide[:, :128, :128], tuple(small.shape[1:]), iters=2).render(small)
    t0 = time.perf_counter()
    kernels = gu.fit(guide, lr_shape)
    t1 = time.perf_counter()
    kernels.render(x)
    t2 = time.perf_counter()
    return {"scale": scale, "fit_s": t1 - t0, "render_s": t2 - t1, "total_s": t2 - t0,
            "us_per_px": (t2 - t0) / (n * n) * 1e6}


def run_fit(args) -> None:
    print(f"gu.fit + render: 1024^2 4-band guide (Rotterdam mirrored), 6 channels, defaults; "
          f"median of {args.repeats} runs (fresh processes, scales interleaved)")
    runs: dict[int, list[dict]] = {s: [] for s in args.scales}
    for _ in range(args.repeats):
        for s in args.scales:
            runs[s].append(spawn(__file__, ["--child", "fit", "--scale", str(s)]))
    med = {}
    for s in args.scales:
        med[s] = {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]}
        m = med[s]
        print(f"  x{s:<3} fit {m['fit_s']:6.2f} s  render {m['render_s']:5.2f} s  "
              f"total {m['total_s']:6.2f} s  {m['us_per_px']:.2f} us/px  "
              f"({1 / m['us_per_px']:.2f} MP/s)")
    totals = [med[s]["total_s"] for s in args.scales]
    print(f"  slowest / fastest: {max(totals) / min(totals):.2f}x (target <= 1.5x)")


# --- part 2 and 3: whole scenes ----------------------------------------------------------
def naip_bands():
    """The real bands mirrored into scenes: ``[4, H, W]`` (2020) and ``[2, H, W]`` (2018 R,
    NIR) uint8, cropped to the rows and columns both dates cover."""
    import rasterio

    with rasterio.open(NAIP / "m_4709963_se_14_1_20200831.tif") as a:
        now = a.read()
    with rasterio.open(NAIP / "m_4709963_se_14_1_20180716.tif") as b:
        then = b.read([1, 4])
    h = min(now.shape[1], then.shape[1])
    w = min(now.shape[2], then.shape[2])
    return now[:, :h, :w], then[:, :h, :w]


def make_scene(n: int, scale: int) -> tuple[Path, Path]:
    """Write (once) the N x N guide and the (N / scale)^2 6-band low-res raster; returns their
    paths. uint16 values (the uint8 NAIP values x 100), deflate, tiled 256."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    DATA.mkdir(exist_ok=True)
    guide, lowres = DATA / f"naip_guide_{n}.tif", DATA / f"naip_lowres_{n}_x{scale}.tif"
    if guide.exists() and lowres.exists():
        return guide, lowres
    now, then = naip_bands()
    src = np.concatenate([now, then]).astype(np.uint16) * 100  # [6, h, w]
    crs = "EPSG:32614"
    res = 10.0
    x0, y0 = 500000.0, 5300000.0
    profile = dict(driver="GTiff", dtype="uint16", crs=crs, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", predictor=2, num_threads="ALL_CPUS",
                   bigtiff="IF_SAFER")
    ci = mirror_index(n, src.shape[2])
    step = 512 * scale  # rows per write, a multiple of the scale
    if not guide.exists():
        tmp = guide.with_suffix(".tmp.tif")
        with rasterio.open(tmp, "w", width=n, height=n, count=BANDS_HR,
                           transform=Affine(res, 0, x0, 0, -res, y0), **profile) as ds:
            for r0 in range(0, n, 1024):
                rows = mirror_index(n, src.shape[1])[r0 : r0 + 1024]
                block = src[:BANDS_HR][:, rows][:, :, ci]
                ds.write(block, window=Window(0, r0, n, len(rows)))
        os.replace(tmp, guide)
    if not lowres.exists():
        m = n // scale
        tmp = lowres.with_suffix(".tmp.tif")
        with rasterio.open(tmp, "w", width=m, height=m, count=BANDS_LR,
                           transform=Affine(res * scale, 0, x0, 0, -res * scale, y0),
                           **profile) as ds:
            for r0 in range(0, m * scale, step):
                rows = mirror_index(m * scale, src.shape[1])[r0 : r0 + step]
                block = src[:, rows][:, :, ci[: m * scale]].astype(np.float32)
                c, hh, ww = block.shape
                cells = block.reshape(c, hh // scale, scale, ww // scale, scale).mean((2, 4))
                ds.write(np.rint(cells).astype(np.uint16),
                         window=Window(0, r0 // scale, m, hh // scale))
        os.replace(tmp, lowres)
    return guide, lowres


def child_scene(size: int, scale: int, method: str) -> dict:
    import geoupsample.pipeline as pipeline

    guide, lowres = make_scene(size, scale)
    out = DATA / f"out_scales_{size}_x{scale}_{method}.tif"
    rss0 = rss()
    t0 = time.perf_counter()
    rep = pipeline.upsample_raster(lowres, guide, out, method=method)
    sec = time.perf_counter() - t0
    os.remove(out)
    return {"seconds": sec, "mp_per_s": size * size / 1e6 / sec,
            "peak_rss_over_imports_mb": (peak_rss() - rss0) / 2**20, "tiles": rep.tiles}


def run_scene(args) -> None:
    for s in args.scales:
        make_scene(args.size, s)
    print(f"whole scene, upsample_raster defaults: {args.size}^2 4-band uint16 guide, 6 uint16 "
          f"bands (NAIP mirrored); median of {args.repeats} runs, fresh processes")
    print(f"{'scale':>6} {'method':<9} {'seconds':>9} {'MP/s':>7} {'peak RSS - imports (MB)':>24}")
    for s in args.scales:
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for m in args.methods:
                runs[m].append(spawn(__file__, ["--child", "scene", "--size", str(args.size),
                                      "--scale", str(s), "--method", m]))
        for m in args.methods:
            med = {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0]}
            print(f"{'x' + str(s):>6} {m:<9} {med['seconds']:>9.1f} {med['mp_per_s']:>7.3f} "
                  f"{med['peak_rss_over_imports_mb']:>24.0f}", flush=True)


def make_many(size: int, scale: int) -> list[Path]:
    """8 single-band uint16 rasters on the low-res grid of ``make_scene(size, scale)``."""
    import numpy as np
    import rasterio

    _, lowres = make_scene(size, scale)
    out = [DATA / f"many_{size}_x{scale}_{i}.tif" for i in range(8)]
    if all(p.exists() for p in out):
        return out
    with rasterio.open(lowres) as src:
        prof, data = src.profile, src.read()
    bands = [*data, np.clip(data[0] * 0.9, 0, 65535), np.clip(data[3] * 1.1, 0, 65535)]
    for path, band in zip(out, bands, strict=True):
        with rasterio.open(path, "w", **{**prof, "count": 1}) as dst:
            dst.write(band.astype(np.uint16)[None])
    return out


def child_many(size: int, scale: int, together: bool) -> dict:
    import geoupsample.pipeline as pipeline

    guide, _ = make_scene(size, scale)
    rasters = make_many(size, scale)
    t0 = time.perf_counter()
    if together:
        pipeline.upsample_raster([str(p) for p in rasters], guide,
                                 str(DATA / "many_one_pass_{index}.tif"), method="gsjbu")
    else:
        for i, p in enumerate(rasters, 1):
            pipeline.upsample_raster(p, guide, DATA / f"many_alone_{i}.tif", method="gsjbu")
    return {"seconds": time.perf_counter() - t0}


def run_many(args) -> None:
    import numpy as np
    import rasterio

    make_many(args.size, args.scale)
    one, alone = [], []
    for _ in range(args.repeats):
        one.append(spawn(__file__, ["--child", "many", "--size", str(args.size), "--scale",
                                    str(args.scale), "--together"])["seconds"])
        alone.append(spawn(__file__, ["--child", "many", "--size", str(args.size), "--scale",
                                      str(args.scale)])["seconds"])
    same = True
    for i in range(1, 9):
        a, b = DATA / f"many_one_pass_{i}.tif", DATA / f"many_alone_{i}.tif"
        with rasterio.open(a) as da, rasterio.open(b) as db:
            same &= bool(np.array_equal(da.read(), db.read()))
        a.unlink()
        b.unlink()
    m1, m8 = statistics.median(one), statistics.median(alone)
    runs1, runs8 = ", ".join(f"{v:.1f}" for v in one), ", ".join(f"{v:.1f}" for v in alone)
    print(f"8 single-band uint16 rasters, x{args.scale}, onto a {args.size}^2 4-band guide, "
          f"gsjbu, median of {args.repeats}: one pass {m1:.1f} s ({runs1}), 8 runs {m8:.1f} s "
          f"({runs8}): {m1 / m8:.2f}x (target <= 0.35); outputs identical to the separate runs: "
          f"{same}")


def run_s2(args) -> None:
    n = 10980
    t0 = time.perf_counter()
    guide, lowres = make_scene(n, 2)
    if time.perf_counter() - t0 > 1:
        print(f"(generated the scene in {time.perf_counter() - t0:.0f} s)")
    out = DATA / "s2_x2_gsjbu.tif"
    cmd = [str(Path(sys.executable).with_name("geoupsample")), "upsample", str(lowres),
           str(guide), "-o", str(out), "--method", "gsjbu"]
    print("Sentinel-2-sized x2: " + " ".join(Path(c).name if i < 1 else c
                                             for i, c in enumerate(cmd)))
    secs, peaks = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True,
                             text=True, check=False)
        sec = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        peak_mb = int(res.stderr.strip().splitlines()[-1]) / 1024
        secs.append(sec)
        peaks.append(peak_mb)
        print(f"  run: {sec:.0f} s, peak RSS {peak_mb:.0f} MB (whole process, imports included)",
              flush=True)
        os.remove(out)
    print(f"  median of {len(secs)}: {statistics.median(secs):.0f} s "
          f"({n * n / 1e6 / statistics.median(secs):.2f} MP/s), peak RSS "
          f"{statistics.median(peaks):.0f} MB (targets: <= 300 s, <= 1.5 GB)")




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=["fit", "scene", "many", "s2"], default="fit")
    ap.add_argument("-n", "--repeats", type=int, default=3)
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--methods", nargs="+", default=["gsjbu", "jbu", "bilinear"])
    ap.add_argument("--child", choices=["fit", "scene", "many"], help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=2, help="many: the scale")
    ap.add_argument("--together", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "fit":
        print(json.dumps(child_fit(args.scale)))
    elif args.child == "scene":
        print(json.dumps(child_scene(args.size, args.scale, args.method)))
    elif args.child == "many":
        print(json.dumps(child_many(args.size, args.scale, args.together)))
    elif args.part == "fit":
        run_fit(args)
    elif args.part == "scene":
        run_scene(args)
    elif args.part == "many":
        run_many(args)
    else:
        run_s2(args)


if __name__ == "__main__":
    main()
