"""The whole pipeline on a scene (BENCHMARKS.md §3, issue 3 acceptance 1).

Synthetic scenes (generated once under ``benchmarks/_data/``, git-ignored): an N x N 4-band
uint16 guide (tiled 256, deflate) and an (N/8) x (N/8) 8-band float32 low-res raster (smooth
class probabilities) on a nesting grid, scale 8; with ``--lowres uint8`` the same probabilities
stored as ``geoupsample segment --probs`` writes them (uint8 x 254, nodata 255, a
``probability_scale`` tag), which the output keeps (uint8). For each size and method,
``geoupsample.pipeline.upsample_raster`` runs in a fresh process that reports output megapixels
per second and peak RSS minus the RSS after imports; a bare rasterio block-by-block write of the
same output (same pixels, dtype, compression, blocks, NUM_THREADS) runs beside it.

    python benchmarks/pipeline.py                                   # 4096, 8192, 16384; both
    python benchmarks/pipeline.py --sizes 2048 --methods bilinear   # a quick small run
    python benchmarks/pipeline.py --sizes 4096 8192 --methods bilinear --lowres uint8
    python benchmarks/pipeline.py --sizes 4096 --methods gsjbu --iters 10 --no-bare
    python benchmarks/pipeline.py --sizes 16384 --methods gsjbu --rows 2048 --no-bare

Measured 2026-11-23 on the 2-core CPU machine, quiet (tile 1024, default halo 64: bilinear now
crops its tiles with the halo cut to its 8 px support, ``blend="auto"``; float32 deflate output,
NUM_THREADS=ALL_CPUS for the pipeline's writer and the bare write alike). Three runs of
``--sizes 4096 8192 --methods bilinear``, median (runs); 16384 one run:

    size    MP/s               peak RSS - imports (MB)   bare write MP/s   pipeline / bare
    4096    3.67 (3.57-3.87)   348 (347, 348, 349)       4.45              1.16x (1.16, 1.21, 1.07)
    8192    3.61 (3.52-3.79)   405 (404, 405, 405)       4.24              1.17x (1.16, 1.17, 1.19)
    16384   3.66               401                       4.16              1.14x

    Before (2026-11-22, taper over the full 64 px halo): 1.25x / 1.19x / 1.13x, 445 / 521 /
    525 MB.

    --lowres uint8 (probabilities as uint8 x 254, written as uint8 deflate), three runs each,
    median (runs):

    size    MP/s               peak RSS (MB)   bare write MP/s   pipeline / bare
    4096    8.68 (8.40-9.29)   334             16.1              1.85x (1.92, 1.85, 1.71)
    8192    9.90 (9.59-10.10)  344             16.7              1.73x (1.73, 1.65, 1.74)

    Before the crop: 2.24x (4096) and 1.94x (8192), 7.53 / 8.42 MP/s.
    NOT within 1.25x. Deflate of uint8 costs about 2 core-seconds per 16.8 MP; with the write
    replaced by nothing the pipeline's own work is 0.85 core-s at 4096^2 (reads, the 8-band
    interpolation, about 0.03 s per 1040^2 tile, scaling to the unit), and the float -> uint8
    cast 0.33 core-s more; on 2 cores that cannot hide behind a write that already keeps both
    busy. Into float32 the write is 4.7x dearer and the same work hides behind it.

    2026-12-06 (this machine writes slower that day: bare uint8 12.2-12.8 MP/s), 4096,
    --lowres uint8, five runs: 1.56x (1.82, 1.56, 1.50, 1.56, 1.58), 8.0 MP/s, peak RSS 304 MB;
    the same day before that session's changes (43fef50), six runs: 1.95x (2.20, 2.21, 1.93,
    1.98, 1.75, 1.80). The changes: the writer rounds integer blocks in one pass when nothing
    needs clipping (tiling.writer.cast_counted), each of the two tiles at once gets one torch
    thread, and resizes write into numpy-allocated outputs (torch faults a fresh 34.6 MB tile
    output in page by page: 40 ms against 22 ms per 8-band 1040^2 tile). float32, three runs:
    1.07x (1.18, 1.07, 1.01), 2.7 MP/s. Per 4096^2 uint8 run: the pipeline uses ~3.8 core-s
    against the bare write's ~2.9 (deflate), so the target needs the rest under ~0.8 core-s.
    gsjbu 4096, iters 50, three runs each, alternating: 118 s (123, 114, 118) against 115 s
    (110, 115, 128) before; 0.14 MP/s, peak RSS about 1.0 GB either way.

    --methods gsjbu --no-bare (8-class probabilities: the probability render preset applies)
      4096, iters 50: 0.104 MP/s, 1072 MB
      memory with --iters 2 (a tile's memory does not depend on the steps):
      4096 1004 MB, 8192 1035 MB, 16384 1065 MB (GDAL cache 16 MB); 8192 1074 MB (32 MB)
      before the spill: 1126 / 1277 / 1299 MB
    With gu.tune_allocator() (upsample_raster calls it; GEOUPSAMPLE_TUNE_MALLOC=0 turns it off),
    three alternating runs each at 4096, iters 50: 0.150 MP/s (0.142, 0.154, 0.150) against
    0.132 (0.132, 0.147, 0.131) untuned; peak RSS 1091 against 1095 MB. Memory with --iters 2:
    8192 1064 MB, 16384 1082 MB.
    Tiles computed in the calling thread (one worker; torch's OpenMP pool used by one thread
    only), two alternating runs each at 4096, iters 50: 0.216 and 0.203 MP/s against 0.183 and
    0.186 in a worker thread (32bde20); peak RSS 1013 / 994 against 1022 / 1022 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _bench import peak_rss, rss, spawn

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
ROOT = HERE.parent
SCALE = 8
CLASSES = 8


def make_scene(n: int, lowres_dtype: str = "float32") -> tuple[Path, Path]:
    """Write (once) the guide and low-res rasters for size ``n``; returns their paths."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    DATA.mkdir(exist_ok=True)
    suffix = "" if lowres_dtype == "float32" else "_u8"
    guide, lowres = DATA / f"guide_{n}.tif", DATA / f"lowres_{n}{suffix}.tif"
    crs = "EPSG:32631"
    res = 0.5
    t_hr = Affine(res, 0, 500000.0, 0, -res, 5800000.0)
    t_lr = Affine(res * SCALE, 0, 500000.0, 0, -res * SCALE, 5800000.0)
    if not lowres.exists():
        m = n // SCALE
        yy, xx = np.mgrid[0:m, 0:m].astype(np.float32) / 37.0
        logits = np.stack([np.sin(xx * (1 + k % 3) + k) * np.cos(yy * (1 + k // 3) - k)
                           for k in range(CLASSES)]) * 3
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        tmp = lowres.with_suffix(".tmp.tif")
        u8 = lowres_dtype == "uint8"
        with rasterio.open(tmp, "w", driver="GTiff", width=m, height=m, count=CLASSES,
                           dtype=lowres_dtype, crs=crs, transform=t_lr, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate",
                           nodata=255 if u8 else None) as ds:
            ds.write(np.rint(p * 254).astype(np.uint8) if u8 else p.astype(np.float32))
            if u8:
                ds.update_tags(probability_scale=str(1 / 254))
        os.replace(tmp, lowres)
    if not guide.exists():
        rng = np.random.default_rng(n)
        tmp = guide.with_suffix(".tmp.tif")
        with rasterio.open(tmp, "w", driver="GTiff", width=n, height=n, count=4,
                           dtype="uint16", crs=crs, transform=t_hr, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate", predictor=2,
                           num_threads="ALL_CPUS", bigtiff="IF_SAFER") as ds:
            step = 1024
            xx = np.arange(n, dtype=np.float32)[None, :]
            for r0 in range(0, n, step):
                yy = np.arange(r0, min(n, r0 + step), dtype=np.float32)[:, None]
                # blocky "fields" (sharp edges every ~40 px) plus texture and noise
                fields = (np.floor(xx / 41) * 7 + np.floor(yy / 37) * 13) % 17
                band = []
                for k in range(4):
                    v = 800 + 150 * fields + 60 * k + 40 * np.sin(xx / 9 + k) * np.cos(yy / 11)
                    v = v + rng.normal(0, 20, v.shape)
                    band.append(np.clip(v, 0, 65535).astype(np.uint16))
                ds.write(np.stack(band), window=Window(0, r0, n, yy.shape[0]))
        os.replace(tmp, guide)
    return guide, lowres






def child_pipeline(args: argparse.Namespace) -> dict:
    """One upsample_raster run in this (fresh) process."""
    import geoupsample.pipeline as pipeline

    guide, lowres = make_scene(args.size, args.lowres)
    out = DATA / f"out_{args.size}_{args.method}.tif"
    aoi, rows = None, args.size
    if args.rows:  # only the top rows, full width (memory depends on the width, not rows)
        import rasterio
        from shapely.geometry import box

        with rasterio.open(guide) as ds:
            b, rows = ds.bounds, min(args.rows, ds.height)
            aoi = box(b.left, b.top - rows * ds.res[1], b.right, b.top)
    rss0 = rss()
    t0 = time.perf_counter()
    rep = pipeline.upsample_raster(lowres, guide, out, method=args.method, iters=args.iters,
                                   tile=args.tile, halo=args.halo, dtype=args.dtype,
                                   compress=args.compress, aoi=aoi, device=args.device)
    sec = time.perf_counter() - t0
    kind = args.method + (f" ({rows} rows)" if args.rows else "")
    return {"kind": kind, "size": args.size, "seconds": round(sec, 2),
            "mp_per_s": round(args.size * rows / 1e6 / sec, 3),
            "peak_rss_over_imports_mb": round((peak_rss() - rss0) / 2 ** 20, 1),
            "tiles": rep.tiles, "output": str(out)}


def child_bare(args: argparse.Namespace) -> dict:
    """A bare rasterio block-row by block-row write of the pipeline's output (same pixels,
    dtype, compression, blocks); only the writes are timed."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    import tiling
    from tiling.execute import gdal_env

    src_path = DATA / f"out_{args.size}_{args.method}.tif"
    out = DATA / f"bare_{args.size}.tif"
    rss0 = rss()
    with gdal_env(), rasterio.open(src_path) as src:  # the same GDAL cache cap as the pipeline
        spec = tiling.OutputSpec(str(out), crs=src.crs, transform=src.transform,
                                 width=src.width, height=src.height, count=src.count,
                                 dtype=src.dtypes[0], nodata=src.nodata,
                                 compress=args.compress)
        spent = 0.0
        with rasterio.open(out, "w", **spec.profile()) as dst:
            for r0 in range(0, src.height, spec.blocksize):
                w = Window(0, r0, src.width, min(spec.blocksize, src.height - r0))
                data = np.ascontiguousarray(src.read(window=w))
                t0 = time.perf_counter()
                dst.write(data, window=w)
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
        spent += time.perf_counter() - t0  # closing flushes the last blocks
    os.remove(out)
    return {"kind": "bare rasterio write", "size": args.size, "seconds": round(spent, 2),
            "mp_per_s": round(args.size ** 2 / 1e6 / spent, 3),
            "peak_rss_over_imports_mb": round((peak_rss() - rss0) / 2 ** 20, 1)}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--methods", nargs="+", default=["bilinear", "gsjbu"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--dtype", default=None,
                    help="output dtype (default: the low-res raster's; float32 or uint8)")
    ap.add_argument("--lowres", choices=["float32", "uint8"], default="float32",
                    help="the low-res probabilities as float32 fractions or uint8 x 254")
    ap.add_argument("--compress", default="deflate")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare rasterio write")
    ap.add_argument("--rows", type=int, default=0,
                    help="process only the top ROWS rows, full width (an AOI): peak memory "
                         "depends on the width, so this measures it without the whole area")
    ap.add_argument("--keep", action="store_true", help="keep the outputs in _data/")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N for the tiles' work (default: CUDA if available)")
    ap.add_argument("--child", choices=["pipeline", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "pipeline":
        print(json.dumps(child_pipeline(args)))
        return
    if args.child == "bare":
        print(json.dumps(child_bare(args)))
        return
    args.dtype = args.dtype or args.lowres
    common = ["--iters", str(args.iters), "--tile", str(args.tile), "--halo", str(args.halo),
              "--dtype", args.dtype, "--compress", args.compress, "--rows", str(args.rows),
              "--lowres", args.lowres]
    if args.device:
        common += ["--device", args.device]
    print(f"scale {SCALE}, {CLASSES}-band {args.lowres} low-res, 4-band uint16 guide; tile "
          f"{args.tile}, halo {args.halo}, iters {args.iters}, output {args.dtype} "
          f"{args.compress}; {os.cpu_count()} CPUs, device {args.device or 'auto'}")
    print(f"{'size':>6} {'kind':<22} {'seconds':>9} {'MP/s':>8} {'peak RSS - imports (MB)':>24}")
    for n in args.sizes:
        t0 = time.perf_counter()
        make_scene(n, args.lowres)
        if time.perf_counter() - t0 > 1:
            print(f"  (generated the {n} scene in {time.perf_counter() - t0:.0f} s)")
        for method in args.methods:
            child = ["--size", str(n), "--method", method, *common]
            r = spawn(__file__, ["--child", "pipeline", *child])
            print(f"{n:>6} {r['kind']:<22} {r['seconds']:>9} {r['mp_per_s']:>8} "
                  f"{r['peak_rss_over_imports_mb']:>24}", flush=True)
            if method == "bilinear" and not args.no_bare and not args.rows:
                b = spawn(__file__, ["--child", "bare", *child])
                print(f"{n:>6} {b['kind']:<22} {b['seconds']:>9} {b['mp_per_s']:>8} "
                      f"{b['peak_rss_over_imports_mb']:>24}   pipeline/bare time: "
                      f"{r['seconds'] / b['seconds']:.2f}x", flush=True)
            if not args.keep:
                os.remove(r["output"])


if __name__ == "__main__":
    main()
