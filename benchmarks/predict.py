"""``geoupsample predict``: scene throughput and memory, and the probability path with a model.

- ``throughput``: ``predict_raster`` of an ONNX model (a 4-layer 3 x 3 convolutional net, 16
  channels, fixed 256 x 256 input, any batch; random weights: only its cost matters) over an N x
  N 4-band uint16 scene (NAIP mirrored, as ``scales.py`` builds it), against a bare loop of the
  same model calls over the same windows (no reading, blending or writing); MP/s of output and
  peak RSS over the imports. ``--rows R`` runs only the top R rows at full width (an AOI): peak
  memory depends on the width, not the rows, so ``--size 16384 --rows 1024`` measures it.
- ``path``: the probability path on a real scene with a realistic model: a small fully
  convolutional net (4 layers, 24 channels) trained here, for about a minute, on the ISPRS
  Vaihingen development crop (../shared/data/vaihingen-dev: NIR, R, G at 9 cm; labels 1..5) to
  predict each cell's class fractions at cells of 1, 2, 4 or 8 pixels (soft cross-entropy on
  area-averaged one-hot labels: a model trained across resolutions) on the crop's left
  columns, exported to ONNX. The crop is then predicted at full resolution (``--model-scale
  1``) and at 2, 4, 8 with every method; reported: agreement of each run's class map with the
  full-resolution one, mIoU against the labels of the held-out columns (border pixels, 0,
  ignored), and seconds.

    python benchmarks/predict.py throughput --size 4096 -n 3
    python benchmarks/predict.py throughput --size 16384 --rows 1024 -n 1
    python benchmarks/predict.py path

Scenes and models are made under ``benchmarks/_data/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _bench import peak_rss, rss, spawn

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
VAIHINGEN = HERE.parent.parent / "shared" / "data" / "vaihingen-dev"
STEM = "area1_0_0_512_512"
#: The path's model learns from the crop's columns left of this; the mIoU is scored right of it.
TRAIN_COLS = 352


# --- throughput -----------------------------------------------------------------------------
def throughput_model() -> Path:
    """The timing model: 4 x (3 x 3 conv, 16 channels), 3 classes, fixed 256 px input."""
    import warnings

    import torch

    path = DATA / "predict_net256.onnx"
    if path.exists():
        return path
    DATA.mkdir(exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 3, 3, padding=1),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.rand(1, 4, 256, 256), str(path), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}})  # fmt: skip
    return path


def child_throughput(size: int, rows: int) -> dict:
    import numpy as np
    from scales import make_scene

    import geoupsample.prediction as pred

    guide, _ = make_scene(size, 8)
    model = throughput_model()
    out = DATA / f"predict_{size}.tif"
    aoi = None
    if rows:
        import rasterio
        from shapely.geometry import box

        with rasterio.open(guide) as ds:
            b = ds.bounds
            aoi = box(b.left, b.top - rows * ds.res[1], b.right, b.top)
    n_rows = rows or size
    rss0 = rss()
    t0 = time.perf_counter()
    rep = pred.predict_raster(guide, model, out, aoi=aoi, mean=[12000.0] * 4,
                              std=[5000.0] * 4)  # fmt: skip
    sec = time.perf_counter() - t0
    peak = (peak_rss() - rss0) / 2**20
    out.unlink()
    # the bare loop: the same model calls on the same windows (random data), nothing else
    net = pred.load_model(model)
    windows = bare_windows(size, n_rows)
    batch = np.random.default_rng(0).normal(size=(8, 4, 256, 256)).astype(np.float32)
    t0 = time.perf_counter()
    for b0 in range(0, windows, 8):
        net(batch[: min(8, windows - b0)])
    bare = time.perf_counter() - t0
    assert rep.run.tiles > 0
    return {"seconds": sec, "mp_per_s": size * n_rows / 1e6 / sec, "peak_mb": peak,
            "bare_seconds": bare, "windows": windows}


def bare_windows(size: int, rows: int, tile: int = 512, halo: int = 64, window: int = 256,
                 overlap: int = 51) -> int:
    """Windows the pipeline runs: per tile (read window up to ``tile + 2 halo``), windows of
    ``window`` every ``window - overlap`` (the last flush with the edge)."""
    from geoupsample.prediction import window_starts
    from tiling import TileGrid

    grid = TileGrid(rows, size, tile=tile, halo=halo)
    n = 0
    for t in grid.tiles():
        h, w = int(t.read.height), int(t.read.width)
        n += len(window_starts(h, window, window - overlap)) * len(
            window_starts(w, window, window - overlap))
    return n


def run_throughput(args) -> None:
    from scales import make_scene

    make_scene(args.size, 8)  # here, not in the children: its memory is not theirs
    throughput_model()
    runs = [spawn(__file__, ["--child", "throughput", "--size", str(args.size), "--rows",
                             str(args.rows)]) for _ in range(args.repeats)]  # fmt: skip
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = args.rows or args.size
    print(f"predict_raster, {args.size} x {rows} px of a 4-band uint16 scene, ONNX 4 x conv3x3 "
          f"16 ch, 256 px windows (overlap 0.2), uint8 output; median of {len(runs)}:")
    print(f"  {med['seconds']:.1f} s, {med['mp_per_s']:.2f} MP/s, peak RSS over imports "
          f"{med['peak_mb']:.0f} MB; the bare loop of its {int(med['windows'])} model calls "
          f"{med['bare_seconds']:.1f} s: pipeline / bare "
          f"{med['seconds'] / med['bare_seconds']:.2f}x")


# --- the probability path -----------------------------------------------------------------
def vaihingen() -> tuple:
    """Image ``[3, 512, 512]`` float32 in [0, 1] and labels ``[512, 512]`` (0 = border)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(VAIHINGEN / f"{STEM}_irrg.png"), np.float32)
    lab = np.asarray(Image.open(VAIHINGEN / f"{STEM}_labels.png"))
    return np.moveaxis(img, -1, 0) / 255.0, lab.astype(np.int64)


def train_multiscale(img, lab, seconds: float = 60.0, seed: int = 0):
    """A small FCN trained to give each cell's class fractions, at cells of 1, 2, 4, 8 px."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = 5
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=2, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=4, dilation=4), torch.nn.ReLU(),
        torch.nn.Conv2d(24, k, 1),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x_all = torch.from_numpy(img)
    onehot = F.one_hot(torch.from_numpy(lab), k + 1)[..., 1:].permute(2, 0, 1).float()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        s = int(rng.choice([1, 2, 4, 8]))
        crop = 128
        y = int(rng.integers(0, 512 - crop))
        x = int(rng.integers(0, TRAIN_COLS - crop))  # the columns right of it are held out
        xi = F.avg_pool2d(x_all[None, :, y : y + crop, x : x + crop], s)
        ti = F.avg_pool2d(onehot[None, :, y : y + crop, x : x + crop], s)
        labelled = ti.sum(1, keepdim=True)
        target = ti / labelled.clamp_min(1e-6)
        logp = F.log_softmax(net(xi), 1)
        loss = -(target * logp * (labelled > 0.5)).sum() / (labelled > 0.5).sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return net.eval(), steps


def miou(pred, lab) -> float:
    import numpy as np

    ious = []
    for c in range(1, 6):
        t, p = lab == c, pred == c - 1
        keep = lab > 0
        if t.any():
            ious.append(np.sum(t & p & keep) / max(1, np.sum((t | p) & keep)))
    return 100.0 * float(np.mean(ious))


def run_path(args) -> None:
    import warnings

    import numpy as np
    import rasterio
    import torch
    from affine import Affine

    from geoupsample.prediction import predict_raster

    DATA.mkdir(exist_ok=True)
    img, lab = vaihingen()
    scene = DATA / "vaihingen_irrg.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="float32", crs="EPSG:32632",
                       transform=Affine(0.09, 0, 497000.0, 0, -0.09, 5420000.0)) as ds:
        ds.write(img)
        ds.descriptions = ("nir", "red", "green")
    t0 = time.perf_counter()
    net, steps = train_multiscale(img, lab, args.train_seconds)
    model = DATA / "vaihingen_fcn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.rand(1, 3, 64, 64), str(model), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b", 2: "h", 3: "w"},
                                        "logits": {0: "b", 2: "h", 3: "w"}})  # fmt: skip
    print(f"model: 4-layer FCN trained {time.perf_counter() - t0:.0f} s ({steps} steps) on the "
          f"Vaihingen crop's {TRAIN_COLS} left columns at cells of 1, 2, 4, 8 px; class maps "
          "compared with its own at full resolution (agreement, whole crop) and with the "
          f"labels right of column {TRAIN_COLS} (mIoU, borders ignored)")
    names = ["impervious", "building", "low_veg", "tree", "car"]
    runs = [(1, "none")] + [(s, m) for s in args.scales for m in args.methods]
    full = None
    for s, method in runs:
        out = DATA / f"vaihingen_probs_s{s}_{method}.tif"
        t0 = time.perf_counter()
        predict_raster(scene, model, out, model_scale=s, class_names=names, dtype="float32",
                       method="bilinear" if method == "none" else method,
                       tile=256, halo=32)  # fmt: skip
        sec = time.perf_counter() - t0
        with rasterio.open(out) as ds:
            cls = np.nan_to_num(ds.read(), nan=-1).argmax(0)
        out.unlink()
        if full is None:
            full = cls
        agree = 100.0 * float(np.mean(cls == full))
        score = miou(cls[:, TRAIN_COLS:], lab[:, TRAIN_COLS:])
        print(f"  model scale {s} {method:9s} agreement {agree:5.1f}%  held-out mIoU "
              f"{score:5.1f}  {sec:5.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=["throughput", "path"], default="throughput")
    ap.add_argument("-n", "--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--methods", nargs="+",
                    default=["nearest", "bilinear", "bicubic", "jbu", "gsjbu"])
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--child", choices=["throughput"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "throughput":
        import json

        print(json.dumps(child_throughput(args.size, args.rows)))
    elif args.part == "throughput":
        run_throughput(args)
    else:
        run_path(args)


if __name__ == "__main__":
    main()
