"""Label upsampling quality (BENCHMARKS.md §2, the probability path), every method side by side.

Data: the 512 x 512 ISPRS Vaihingen crop in ../shared/data/vaihingen-dev (development only, never
copied into the project): false-colour image (NIR, R, G) and labels 1..5 (0 = class borders).
Scores are mIoU (%) over the classes present, at full resolution. ``--borders ignore`` (default,
the ISPRS protocol) leaves the border lines out everywhere; since they run along every class
boundary they also hide most of an upsampler's boundary errors at x8. ``--borders nearest``
gives each border pixel the class of its nearest labelled pixel (a boundary within a pixel or
two of the true one, far finer than a cell), so that boundary placement counts.

- ``oracle``: the one-hot labels (over labelled pixels) area-averaged by x8 and x16, upsampled
  by each method with its default arguments (``gu.upsample(probs, guide, method=...)``), argmax.
- ``predicted``: a linear probe on ``spectral`` features (per-cell band means/stds and NDVI,
  cell = the scale) trained under the soft labels of half the crop predicts LR probabilities of
  the whole crop; these are upsampled by each method; mIoU on the other half (held out). Mean
  over six splits (the white or the black squares of a checkerboard of 128 px blocks, or the
  left, right, top or bottom half held out); the per-split gsjbu - bilinear gaps are printed too.
- ``segment``: the same, end to end through ``segment_raster`` (the ``geoupsample segment``
  command: polygons, tiles, GeoTIFFs); not run by default.

    python benchmarks/quality_labels.py                 # both regimes, x8 and x16
    python benchmarks/quality_labels.py --regime oracle --scales 16
    python benchmarks/quality_labels.py --regime segment   # the predicted regime end to end
    python benchmarks/quality_labels.py --render kind=continuous     # colour-fitted defaults
    python benchmarks/quality_labels.py --render consistency=0 min_sigma_r=0   # sharp
    python benchmarks/quality_labels.py --borders nearest   # boundary pixels scored too
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

import geoupsample as gu
import geoupsample.backbones as gb
from geoupsample.heads import LinearProbe

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vaihingen-dev"
STEM = "area1_0_0_512_512"
BLOCK = 128
CLASSES = ("impervious", "building", "low_vegetation", "tree", "car")


def load() -> tuple[np.ndarray, np.ndarray]:
    """Image ``float32 [3, 512, 512]`` (NIR, R, G; raw 0..255) and labels ``int [512, 512]``."""
    img = np.asarray(Image.open(DATA / f"{STEM}_irrg.png"), dtype=np.float32).transpose(2, 0, 1)
    lab = np.asarray(Image.open(DATA / f"{STEM}_labels.png")).astype(np.int64)
    return img, lab


def fill_borders(lab: np.ndarray) -> np.ndarray:
    """``lab`` with every border pixel (0) given the class of its nearest labelled pixel."""
    nearest = ndimage.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
    return lab[nearest[0], nearest[1]]


def soft_labels(lab: np.ndarray, scale: int) -> np.ndarray:
    """Per-class share of the labelled pixels of each cell ``[K, h, w]`` (summing to 1: class
    probabilities); NaN (missing) in cells without a labelled pixel."""
    onehot = np.stack([(lab == k + 1) for k in range(len(CLASSES))]).astype(np.float64)
    frac = F.avg_pool2d(torch.from_numpy(onehot)[None], scale)[0].numpy()
    total = frac.sum(0, keepdims=True)
    frac = np.where(total > 0, frac / np.where(total > 0, total, 1.0), np.nan)
    return frac.astype(np.float32)


def miou(pred: np.ndarray, lab: np.ndarray, mask: np.ndarray) -> float:
    """mIoU (%) of ``pred`` (0-based classes) against ``lab`` (1-based, 0 ignored) in ``mask``."""
    valid = mask & (lab > 0)
    p, t = pred[valid], lab[valid] - 1
    ious = []
    for k in range(len(CLASSES)):
        inter = np.sum((p == k) & (t == k))
        union = np.sum((p == k) | (t == k))
        if np.any(t == k):
            ious.append(inter / union)
    return 100.0 * float(np.mean(ious))


#: extra arguments of every gu.upsample call (``--consistency``); empty = the defaults
RENDER: dict = {}


def upsample_all(probs: np.ndarray, guide: np.ndarray) -> dict[str, np.ndarray]:
    """Argmax class maps of every method's upsampling of ``probs`` with default arguments."""
    out = {}
    for method in gu.METHODS:
        t0 = time.perf_counter()
        hr = np.asarray(gu.upsample(probs, guide, method=method, **RENDER))
        out[method] = np.nan_to_num(hr, nan=-1.0).argmax(0)
        out[f"_{method}_s"] = time.perf_counter() - t0  # type: ignore[assignment]
    return out


def oracle(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    maps = upsample_all(soft_labels(lab, scale), img)
    full = np.ones(lab.shape, dtype=bool)
    return {m: miou(v, lab, full) for m, v in maps.items() if not m.startswith("_")}


def held_out_masks(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The six train/test splits of the ``predicted`` regime: the held-out pixels of each (the
    probe is trained under the soft labels of the rest)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    white = ((yy // BLOCK + xx // BLOCK) % 2).astype(bool)  # checkerboard of 128 px squares
    return {"white": white, "black": ~white, "left": xx < shape[1] // 2,
            "right": xx >= shape[1] // 2, "top": yy < shape[0] // 2,
            "bottom": yy >= shape[0] // 2}  # fmt: skip


#: per-split gsjbu - bilinear gaps of the last ``predicted`` call (printed by main)
SPLIT_GAPS: dict[str, float] = {}


def predicted(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    """Mean mIoU over the six splits of :func:`held_out_masks` (one split alone swings the
    gsjbu - bilinear gap by several points on this small crop)."""
    bb = gb.create("spectral", band_names=("nir", "red", "green"), cell_size=scale)
    feats = bb.extract(img)
    frac = np.nan_to_num(soft_labels(lab, scale))
    runs = {}
    for name, held_out in held_out_masks(lab.shape).items():
        train = frac * ~held_out[::scale, ::scale]
        with warnings.catch_warnings():  # a split may hold no labelled cell of a rare class
            warnings.simplefilter("ignore", UserWarning)
            probe = LinearProbe(class_weight="balanced").fit(feats, train, classes=CLASSES)
        maps = upsample_all(probe.predict_proba(feats), img)
        runs[name] = {m: miou(v, lab, held_out) for m, v in maps.items() if not m.startswith("_")}
    SPLIT_GAPS.clear()
    SPLIT_GAPS.update({k: r["gsjbu"] - r["bilinear"] for k, r in runs.items()})
    return {m: float(np.mean([r[m] for r in runs.values()])) for m in runs["white"]}


def segment(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    """The ``predicted`` regime end to end through :func:`segment_raster` (tiles, GeoTIFFs).

    The crop is written as a GeoTIFF on a made-up 1 m UTM grid (temporary, never kept), the
    training squares' labels are polygonised into a GeoJSON, and ``segment`` runs with tiles of
    256 px and a 32 px halo for each method.
    """
    import json
    import tempfile

    import rasterio
    from rasterio.features import shapes
    from rasterio.transform import from_origin

    from geoupsample.segmentation import segment_raster

    yy, xx = np.mgrid[: lab.shape[0], : lab.shape[1]]
    held_out = ((yy // BLOCK + xx // BLOCK) % 2).astype(bool)
    transform = from_origin(500000.0, 5400000.0, 1.0, 1.0)
    bb = gb.create("spectral", band_names=("nir", "red", "green"), cell_size=scale)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(tmp) / "scene.tif"
        profile = dict(driver="GTiff", width=lab.shape[1], height=lab.shape[0], count=3,
                       dtype="float32", crs="EPSG:32632", transform=transform)  # fmt: skip
        with rasterio.open(scene, "w", **profile) as dst:
            dst.write(img)
            dst.descriptions = ("nir", "red", "green")
        train = np.where(~held_out, lab, 0).astype(np.int32)
        feats = [
            {"type": "Feature", "properties": {"class": CLASSES[int(v) - 1]}, "geometry": g}
            for g, v in shapes(train, mask=train > 0, transform=transform)
        ]
        polys = Path(tmp) / "labels.geojson"
        polys.write_text(json.dumps({"type": "FeatureCollection", "features": feats,
                                     "crs": {"type": "name",
                                             "properties": {"name": "EPSG:32632"}}}))  # fmt: skip
        for method in gu.METHODS:
            out = Path(tmp) / f"{method}.tif"
            segment_raster(
                scene, polys, "class", out, bb, method=method, tile=256, halo=32,
                class_weight="balanced", **RENDER,
            )  # fmt: skip
            with rasterio.open(out) as ds:
                cls = ds.read(1).astype(np.int64)
                names = json.loads(ds.tags()["class_names"])
            # map the raster's class order (sorted names) back to CLASSES' order
            lut = np.array([CLASSES.index(n) for n in names] + [0] * (256 - len(names)))
            scores[method] = miou(lut[cls], lab, held_out)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--regime", choices=("oracle", "predicted", "segment"), action="append")
    ap.add_argument("--scales", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--consistency", type=float, help="back-projection rounds for every method")
    ap.add_argument("--render", nargs="+", default=[], metavar="KEY=VALUE",
                    help="render arguments for jbu/gsjbu, e.g. kind=continuous min_sigma_r=0")
    ap.add_argument("--borders", choices=("ignore", "nearest"), default="ignore",
                    help="class-border pixels: left out (ISPRS) or given their nearest class")
    args = ap.parse_args()
    if args.consistency is not None:
        RENDER["consistency"] = args.consistency
    for item in args.render:
        key, value = item.split("=", 1)
        RENDER[key] = value if key == "kind" else float(value)
    img, lab = load()
    if args.borders == "nearest":
        lab = fill_borders(lab)
    for regime in args.regime or ["oracle", "predicted"]:
        fn = {"oracle": oracle, "predicted": predicted, "segment": segment}[regime]
        for s in args.scales:
            t0 = time.perf_counter()
            scores = fn(img, lab, s)
            cells = "  ".join(f"{m} {v:.1f}" for m, v in scores.items())
            gap = scores["gsjbu"] - scores["bilinear"]
            splits = ""
            if regime == "predicted":
                splits = " (splits: " + ", ".join(f"{k} {v:+.1f}" for k, v in SPLIT_GAPS.items())
                splits += ")"
            print(
                f"{regime:9s} x{s:<2d} mIoU %: {cells}   gsjbu - bilinear = {gap:+.1f}{splits}"
                f"   ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
