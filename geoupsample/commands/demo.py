"""``geoupsample demo``: the bundled Rotterdam sample end to end, offline, in seconds.

1. Guided upsampling under Wald's protocol: the near-infrared band is averaged down x8 and
   brought back to 1 m by every method, guided by the red, green and blue bands; each result is
   compared with the real NIR band.
2. Segmentation from polygons: the bundled polygons (three classes drawn by thresholds on this
   image) train a linear probe on weight-free ``spectral`` features of 8 x 8 m cells; its
   low-res class probabilities are upsampled with bilinear and with GSJBU, through the tiling
   engine, into georeferenced class rasters.

Writes GeoTIFFs and a PNG quicklook (image | low-res | bilinear | gsjbu) and prints a summary.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import rasterio
import torch
import typer
from rasterio.transform import Affine

import geoupsample as gu

SCALE = 8


def bundled(name: str) -> Path:
    """Path of a file shipped in ``geoupsample/data``."""
    return Path(str(files("geoupsample") / "data" / name))


def _unit_scale(bands: np.ndarray) -> np.ndarray:
    lo = np.percentile(bands, 1, axis=(1, 2), keepdims=True)
    hi = np.percentile(bands, 99, axis=(1, 2), keepdims=True)
    return ((bands - lo) / (hi - lo)).astype(np.float32)


def _write(
    path: Path, data: np.ndarray, profile: dict, transform: Affine, names: list[str]
) -> None:
    prof = {**profile, "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "transform": transform, "dtype": "float32", "nodata": np.nan}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data.astype(np.float32))
        dst.descriptions = tuple(names)
        dst.update_tags(software=f"geoupsample {gu.__version__}")


def _quicklook(
    path: Path,
    rgb: np.ndarray,
    panels: list[tuple[str, np.ndarray]],
    classes: list[tuple[str, np.ndarray]],
) -> None:
    """Top row: image | low-res | bilinear | gsjbu | truth; bottom row: the class maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(panels) + 1
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.8))
    for row in (0, 1):
        axes[row, 0].imshow(np.clip(rgb.transpose(1, 2, 0), 0, 1))
        axes[row, 0].set_title("image (RGB guide)")
    for ax, (title, img) in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(np.clip(img, 0, 1), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
    for ax, (title, img) in zip(axes[1, 1:], classes, strict=False):
        shown = np.ma.masked_equal(img, 255)
        ax.imshow(shown, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        ax.set_title(title)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: Path, iters: int = 50) -> dict[str, float]:
    """Run the demo, write its files into ``out_dir``; return PSNR (dB) per method."""
    from geoupsample.inputs import InputError, check_method_options

    check_method_options("gsjbu", iters)  # before any file is written
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; -o names the folder the demo writes into")
    out_dir.mkdir(parents=True, exist_ok=True)
    with rasterio.open(bundled("rotterdam_ms.tif")) as src:
        ms = src.read()
        profile = {"driver": "GTiff", "crs": src.crs, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate", "predictor": 3}
        transform = src.transform
    size = (ms.shape[1] // SCALE) * SCALE
    ms = _unit_scale(ms[:, :size, :size])
    rgb, nir = ms[:3], ms[3:4]
    nir_lr = torch.nn.functional.avg_pool2d(torch.from_numpy(nir)[None], SCALE)[0].numpy()
    _write(out_dir / "nir_lowres.tif", nir_lr, profile, transform @ Affine.scale(SCALE), ["nir"])
    scores, timings, results = {}, {}, {}
    for method in gu.METHODS:
        t0 = time.perf_counter()
        out = gu.upsample(nir_lr, rgb, method=method, iters=iters, device="cpu")
        timings[method] = time.perf_counter() - t0
        scores[method] = float(10 * np.log10(1.0 / np.mean((out - nir) ** 2)))
        results[method] = out
        _write(out_dir / f"nir_{method}.tif", out, profile, transform, ["nir"])
    lowres_view = np.kron(nir_lr, np.ones((1, SCALE, SCALE), np.float32))
    typer.echo(f"NIR from RGB on the bundled Rotterdam sample ({size} x {size} px, 1 m, x{SCALE}):")
    for method in gu.METHODS:
        typer.echo(f"  {method:9s} PSNR {scores[method]:6.2f} dB   {timings[method]:6.2f} s")
    classes = _segmentation(out_dir, iters)
    _quicklook(
        out_dir / "quicklook.png",
        rgb,
        [("low-res NIR (x8)", lowres_view[0]), ("bilinear", results["bilinear"][0]),
         ("gsjbu", results["gsjbu"][0]), ("real NIR", nir[0])],
        classes,
    )
    typer.echo(f"wrote GeoTIFFs and quicklook.png to {out_dir}")
    return scores


def _segmentation(out_dir: Path, iters: int = 50) -> list[tuple[str, np.ndarray]]:
    """Segment the bundled scene from the bundled polygons; return class maps for the quicklook."""
    import geoupsample.backbones as gb
    from geoupsample.segmentation import segment_raster

    backbone = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=SCALE)
    maps = []
    typer.echo("Segmentation from the bundled polygons (spectral features, linear probe):")
    for method in ("nearest", "bilinear", "gsjbu"):
        t0 = time.perf_counter()
        report = segment_raster(
            bundled("rotterdam_ms.tif"), bundled("rotterdam_labels.geojson"), "class",
            out_dir / f"classes_{method}.tif", backbone, method=method, iters=iters, tile=512,
            halo=64,
        )  # fmt: skip
        took = time.perf_counter() - t0
        with rasterio.open(report.path) as src:
            maps.append((f"classes, {method}", src.read(1)))
        shares = ", ".join(f"{k} {v:.0%}" for k, v in report.class_fractions.items())
        typer.echo(f"  {method:9s} {shares}   {took:6.2f} s")
    typer.echo(f"  classes: {', '.join(report.classes)} (from {report.train_cells} labelled cells)")
    return maps


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("geoupsample-demo"), "-o", "--out", help="Output folder."),
        iters: int = typer.Option(50, help="Adam steps of the GSJBU fit."),
    ) -> None:
        """Guided upsampling on the bundled sample (offline): writes GeoTIFFs and a quicklook."""
        from geoupsample.commands.options import run_command

        run_command("demo", True, lambda _: run_demo(out, iters=iters))
