"""Time series on real multi-date imagery: quality per date, steps and time per date, flicker.

Ten NAIP acquisitions of one place, 2009-2020 (../shared/data/naip-series, brought onto the last
date's grid: ``_naip.py``), 928 x 712 px at 5 m. Each date's NIR is averaged to 40 m (x8; Wald's
protocol) and upsampled guided by that date's RGB; the truth is the date's own NIR.

Measured, on the scene path (GeoTIFFs in, GeoTIFFs out):
- every method per date (bilinear, bicubic, jbu, gsjbu fitted from scratch each date) and the
  series (``upsample_series``: the first date from scratch, later ones from the date before),
  with each date rendered alone (``stable_tolerance=0``) and carried forward where the image
  has not changed (the default);
  PSNR per date against the truth (0-1 units);
- the fits alone per date (core API): steps and seconds, from scratch and warm;
- flicker, over the pixels whose guide barely changes between two consecutive dates (every RGB
  band within ``--tau`` in 0-1 units): the RMS change of the output from date to date (as the
  truth's own), of its error (output - truth: the change a method adds or misses), and over the
  pixels where the low-res raster is stable too (nothing changed in the inputs: any change is
  the method's own, but for what its support brings from neighbouring cells); and the temporal
  standard deviation over the pixels whose guide stays within ``--tau-all`` of its mean through
  all dates (over eleven years no pixel stays within 0.04; 12 667 stay within 0.1).

Run alone (two jobs on two cores skew the timings)::

    python benchmarks/series.py            # --scale 8 --tau 0.02 --tau-all 0.1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import rasterio
from rasterio.enums import Resampling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _naip import aligned_dates  # noqa: E402

METHODS = ("bilinear", "bicubic", "jbu", "gsjbu")


def write_series(folder: str, scale: int) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """Write each date's RGB guide and its NIR averaged over ``scale`` x ``scale`` pixels;
    return (dates, [(lowres, guide)], true NIR [T, H, W] in 0-1)."""
    dates, stack, profile = aligned_dates()
    h, w = (s // scale * scale for s in stack.shape[-2:])
    stack = stack[..., :h, :w]
    profile = {**profile, "width": w, "height": h, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate"}  # fmt: skip
    pairs = []
    for date, img in zip(dates, stack, strict=True):
        guide, lowres = (os.path.join(folder, f"{k}_{date}.tif") for k in ("rgb", "nir"))
        with rasterio.open(guide, "w", **{**profile, "count": 3}) as o:
            o.write(img[:3])
        with rasterio.open(os.path.join(folder, "nir_full.tif"), "w",
                           **{**profile, "count": 1}) as o:  # fmt: skip
            o.write(img[3:4])
        with rasterio.open(os.path.join(folder, "nir_full.tif")) as ds:
            nir = ds.read(out_shape=(1, h // scale, w // scale), resampling=Resampling.average,
                          out_dtype="float32")  # fmt: skip
            transform = ds.transform * ds.transform.scale(scale, scale)
        with rasterio.open(lowres, "w", **{**profile, "count": 1, "dtype": "float32",
                                           "width": w // scale, "height": h // scale,
                                           "transform": transform, "blockxsize": 128,
                                           "blockysize": 128}) as o:  # fmt: skip
            o.write(nir)
        pairs.append((lowres, guide))
    return dates, pairs, stack[:, 3].astype(np.float32) / 255


def read(path: str) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1).astype(np.float32) / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def flicker(outs: np.ndarray, truths: np.ndarray, guides: np.ndarray, lowres_up: np.ndarray,
            tau: float, tau_all: float) -> dict[str, float]:  # fmt: skip
    """The flicker figures of ``outs [T, H, W]`` (see the module docstring)."""
    change, err_change, still, counts = [], [], [], []
    for t in range(len(outs) - 1):
        stable = (np.abs(guides[t + 1] - guides[t]).max(0) < tau)
        inputs_stable = stable & (np.abs(lowres_up[t + 1] - lowres_up[t]) < tau)
        d = outs[t + 1] - outs[t]
        e = d - (truths[t + 1] - truths[t])
        change.append(np.sqrt(np.mean(d[stable] ** 2)))
        err_change.append(np.sqrt(np.mean(e[stable] ** 2)))
        still.append(np.sqrt(np.mean(d[inputs_stable] ** 2)) if inputs_stable.any() else np.nan)
        counts.append((int(stable.sum()), int(inputs_stable.sum())))
    always = (np.abs(guides - guides.mean(0)).max((0, 1)) < tau_all)
    return {"change": float(np.mean(change)), "error_change": float(np.mean(err_change)),
            "change_inputs_stable": float(np.nanmean(still)),
            "temporal_std": float(outs[:, always].std(0).mean()) if always.any() else np.nan,
            "stable_px_per_pair": int(np.mean([c[0] for c in counts])),
            "inputs_stable_px_per_pair": int(np.mean([c[1] for c in counts])),
            "always_stable_px": int(always.sum())}  # fmt: skip


def scene_runs(pairs: list[tuple[str, str]], dates: list[str], folder: str,
               repeats: int) -> dict[str, tuple[np.ndarray, float]]:  # fmt: skip
    """Each method run date by date on the scene path, and the series in one pass:
    ``{name: (outputs [T, H, W], median seconds for all dates)}``."""
    from geoupsample.core.series import STABLE_TOLERANCE
    from geoupsample.pipeline import upsample_raster
    from geoupsample.time_series import upsample_series

    runs = {}
    for method in METHODS:
        secs = []
        for _ in range(repeats if method == "gsjbu" else 1):
            t0 = time.perf_counter()
            for i, (lowres, guide) in enumerate(pairs):
                upsample_raster(lowres, guide, os.path.join(folder, f"{method}_{i}.tif"),
                                method=method)  # fmt: skip
            secs.append(time.perf_counter() - t0)
        outs = np.stack([read(os.path.join(folder, f"{method}_{i}.tif"))
                         for i in range(len(pairs))])  # fmt: skip
        runs[method if method != "gsjbu" else "gsjbu (each date from scratch)"] = (
            outs, float(np.median(secs)))
    for name, tolerance in (("gsjbu series, each date alone", 0.0),
                            ("gsjbu series (default)", STABLE_TOLERANCE)):
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            upsample_series([(d, lr, g) for d, (lr, g) in zip(dates, pairs, strict=True)],
                            os.path.join(folder, "series_{index}.tif"),
                            stable_tolerance=tolerance)  # fmt: skip
            secs.append(time.perf_counter() - t0)
        outs = np.stack([read(os.path.join(folder, f"series_{i + 1}.tif"))
                         for i in range(len(pairs))])  # fmt: skip
        runs[name] = (outs, float(np.median(secs)))
    return runs


def fit_times(pairs: list[tuple[str, str]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each date's fit alone (median of ``repeats``), from scratch (50 steps) and in
    the series (25 warm steps after the first date)."""
    import geoupsample as gu
    from geoupsample.core.series import WARM_ITERS, warm_start
    from geoupsample.inputs import scene_guide_stats

    guides = []
    for lowres, guide in pairs:
        with rasterio.open(guide) as g, rasterio.open(lowres) as lr:
            guides.append((g.read().astype(np.float32), lr.shape, scene_guide_stats(guide)))
    gu.fit(guides[0][0], guides[0][1], normalize=guides[0][2])  # compile, warm up
    scratch, warm = [], []
    for _ in range(repeats):
        s, w, previous = [], [], None
        for g, shape, stats in guides:
            t0 = time.perf_counter()
            gu.fit(g, shape, normalize=stats)
            s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            previous = gu.fit(g, shape, normalize=stats) if previous is None else gu.fit(
                g, shape, iters=WARM_ITERS, normalize=stats, init=warm_start(previous))
            w.append(time.perf_counter() - t0)
        scratch.append(s)
        warm.append(w)
    return {"scratch_s": np.median(scratch, 0).round(3).tolist(),
            "warm_s": np.median(warm, 0).round(3).tolist(),
            "scratch_steps": [50] * len(guides),
            "warm_steps": [50] + [WARM_ITERS] * (len(guides) - 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--tau", type=float, default=0.02,
                    help="a guide pixel is stable when every band changes less than this (0-1)")
    ap.add_argument("--tau-all", type=float, default=0.1,
                    help="the temporal std's pixels: every band within this of its mean")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        dates, pairs, truths = write_series(folder, args.scale)
        guides = np.stack([rasterio.open(g).read().astype(np.float32) / 255 for _, g in pairs])
        lowres_up = np.stack([np.kron(rasterio.open(lr).read(1) / 255, np.ones(
            (args.scale, args.scale), np.float32)) for lr, _ in pairs])  # fmt: skip
        runs = scene_runs(pairs, dates, folder, args.repeats)
        fits = fit_times(pairs, args.repeats)
    print(f"NAIP series: {len(dates)} dates {dates[0]}..{dates[-1]}, {truths.shape[2]} x "
          f"{truths.shape[1]} px, NIR x{args.scale} from RGB, flicker tau {args.tau}")
    truth = flicker(truths, truths, guides, lowres_up, args.tau, args.tau_all)
    print(f"  stable guide pixels per pair {truth['stable_px_per_pair']}, inputs stable "
          f"{truth['inputs_stable_px_per_pair']}, stable through all dates "
          f"{truth['always_stable_px']}")
    header = (f"{'':32s} {'PSNR mean':>9s} {'later':>6s} {'all dates s':>11s} {'change':>7s} "
              f"{'err chg':>7s} {'in-stable':>9s} {'tstd':>6s}  PSNR per date")
    print(header)
    print(f"{'truth':32s} {'':>9s} {'':>6s} {'':>11s} {truth['change']:7.4f} {0:7.4f} "
          f"{truth['change_inputs_stable']:9.4f} {truth['temporal_std']:6.4f}")
    results = {"truth": truth}
    for name, (outs, secs) in runs.items():
        q = [psnr(o, t) for o, t in zip(outs, truths, strict=True)]
        f = flicker(outs, truths, guides, lowres_up, args.tau, args.tau_all)
        results[name] = {"psnr": q, "seconds": secs, **f}
        print(f"{name:32s} {np.mean(q):9.2f} {np.mean(q[1:]):6.2f} {secs:11.1f} "
              f"{f['change']:7.4f} {f['error_change']:7.4f} {f['change_inputs_stable']:9.4f} "
              f"{f['temporal_std']:6.4f}  {' '.join(f'{v:.2f}' for v in q)}")
    print(f"fit per date, s (median of {args.repeats}): from scratch (50 steps) "
          f"{fits['scratch_s']}; series (50, then 25 warm) {fits['warm_s']}")
    results["fits"] = fits
    print(json.dumps(results))


if __name__ == "__main__":
    main()
