"""Quality of every method side by side on real imagery (BENCHMARKS.md §2).

Guided super-resolution under Wald's protocol on the Rotterdam samples (ms1..ms3, pan1..pan3 in
../shared/data/rotterdam-spacenet): degrade x8 by area averaging, upsample, compare with the
original (PSNR in dB, bands scaled to [0, 1] by their 0th and 99th percentiles, 296 x 296 crop).

- ``nir``: NIR from RGB — the NIR band at 1/8 resolution, guided by the full-resolution R, G, B.
- ``pan``: MS from pan — all 4 MS bands at 1/8 resolution, guided by the pan band averaged to 1 m.
- ``self``: the paper's self-check — how well the fitted kernels rebuild the guide from its own
  cell means (PSNR of the fit's reconstruction of the RGB guide), jbu (no fit) against gsjbu.

    python benchmarks/quality.py                       # all tasks, default gsjbu settings
    python benchmarks/quality.py --task nir --radius 4 --iters 100
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

import geoupsample as gu

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rotterdam-spacenet"
CROP = 296
SCALE = 8
TASKS: dict[str, Callable[..., dict[str, float]]] = {}


def task(name: str):
    def wrap(fn):
        TASKS[name] = fn
        return fn

    return wrap


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read().astype(np.float64)


def unit_scale(bands: np.ndarray) -> np.ndarray:
    """Each band to [0, 1] by its 0th and 99th percentiles (not clipped)."""
    lo = np.percentile(bands, 0, axis=(1, 2), keepdims=True)
    hi = np.percentile(bands, 99, axis=(1, 2), keepdims=True)
    return (bands - lo) / (hi - lo)


def area_down(x: np.ndarray, factor: int) -> np.ndarray:
    return F.avg_pool2d(torch.from_numpy(x)[None], factor)[0].numpy()


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((pred - truth) ** 2)))


#: (label, method, extra keyword arguments): every method with its defaults, then variants that
#: show what back-projection ("consistency", on by default for jbu and gsjbu) brings on its own.
VARIANTS = [(m, m, {}) for m in gu.METHODS] + [
    ("bicubic+c2", "bicubic", {"consistency": 2}),
    ("jbu-pure", "jbu", {"consistency": 0}),
    ("gsjbu-pure", "gsjbu", {"consistency": 0}),
    ("gsjbu+sg.25", "gsjbu", {"self_guidance": 0.25}),
    ("gsjbu+sg.5", "gsjbu", {"self_guidance": 0.5}),
]


def run_methods(x_lr, guide, truth, fit_kwargs) -> dict[str, float]:
    scores = {}
    for label, method, extra in VARIANTS:
        kwargs = {**fit_kwargs, **extra} if method in ("jbu", "gsjbu") else extra
        out = gu.upsample(x_lr, guide, method=method, **kwargs)
        scores[label] = psnr(out, truth)
    return scores


@task("nir")
def nir_from_rgb(index: int, fit_kwargs: dict) -> dict[str, float]:
    ms = unit_scale(read(DATA / f"ms{index}.tif"))[:, :CROP, :CROP]
    nir = ms[3:4]
    return run_methods(area_down(nir, SCALE), ms[:3], nir, fit_kwargs)


@task("pan")
def ms_from_pan(index: int, fit_kwargs: dict) -> dict[str, float]:
    ms = unit_scale(read(DATA / f"ms{index}.tif"))[:, :CROP, :CROP]
    pan = area_down(read(DATA / f"pan{index}.tif"), 2)[:, :CROP, :CROP]
    return run_methods(area_down(ms, SCALE), pan, ms, fit_kwargs)


@task("self")
def self_reconstruction(index: int, fit_kwargs: dict) -> dict[str, float]:
    rgb = read(DATA / f"ms{index}.tif")[:3, :CROP, :CROP]
    scores = {}
    for method in ("jbu", "gsjbu"):
        kw = {**fit_kwargs, "iters": 0} if method == "jbu" else fit_kwargs
        k = gu.fit(rgb, (CROP // SCALE, CROP // SCALE), **kw)
        rebuilt = k.render(k._prepared.gbar, consistency=0)
        scores[method] = psnr(np.asarray(rebuilt), k.guide.numpy())
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), action="append")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--sample", type=float, default=0.1875)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()
    fit_kwargs = {"iters": args.iters, "radius": args.radius, "sample": args.sample, "lr": args.lr}
    print(f"gsjbu settings: {fit_kwargs}")
    for name in args.task or list(TASKS):
        t0 = time.perf_counter()
        per_image = [TASKS[name](i, fit_kwargs) for i in args.images]
        methods = list(per_image[0])
        mean = {m: float(np.mean([s[m] for s in per_image])) for m in methods}
        cells = "  ".join(f"{m} {mean[m]:.2f}" for m in methods)
        took = time.perf_counter() - t0
        print(f"{name:5s} PSNR dB, mean of ms{args.images}: {cells}   ({took:.0f} s)")
        for i, s in zip(args.images, per_image, strict=True):
            print(f"      ms{i}: " + "  ".join(f"{m} {s[m]:.2f}" for m in methods))
        if "gsjbu" in mean and "bicubic" in mean:
            print(f"      gsjbu - bicubic = {mean['gsjbu'] - mean['bicubic']:+.2f} dB; "
                  f"gsjbu - jbu = {mean['gsjbu'] - mean['jbu']:+.2f} dB")


if __name__ == "__main__":
    main()
