"""``geoupsample demo``: the bundled Rotterdam sample end to end, offline, in seconds.

1. Guided upsampling under Wald's protocol: the near-infrared band is averaged down x8 and
   brought back to 1 m by every method, guided by the red, green and blue bands; each result is
   compared with the real NIR band.
2. Segmentation from polygons: the bundled polygons (three classes drawn by thresholds on this
   image) train a linear probe on weight-free ``spectral`` features of 8 x 8 m cells, through
   the tiling engine, into georeferenced class rasters, by both paths: the default feature path
   (every pixel's features, the probe per pixel) and the probability path (the probe on the
   cells, its probabilities upsampled with bilinear and with GSJBU). Each map is scored against
   the rules the polygons were drawn from (NDVI and brightness thresholds, pixel by pixel:
   ``geoupsample/data/ATTRIBUTION.md``), so the summary says which wins on this scene.

Writes GeoTIFFs and a PNG quicklook (top: image | low-res | bilinear | gsjbu | real NIR; bottom:
the polygons on the image | the class maps | the rules' classes, with a legend) and prints a
summary.
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
from geoupsample.commands.options import ThreadsOption

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
    legend: list[tuple[str, tuple[int, int, int, int]]] | None = None,
    outlines: list[tuple[np.ndarray, int]] | None = None,
) -> None:
    """Top row: image | low-res | bilinear | gsjbu | truth; bottom row: the image with the
    labelled polygons (``outlines``: ``[n, 2]`` pixel x, y rings and their class index), then
    the class maps coloured by ``legend`` (class name, RGBA 0-255, in class-index order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cols = max(len(panels), len(classes)) + 1
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 7.4))
    for row in (0, 1):
        axes[row, 0].imshow(np.clip(rgb.transpose(1, 2, 0), 0, 1))
    axes[0, 0].set_title("image (RGB guide)")
    for ax, (title, img) in zip(axes[0, 1:], panels, strict=False):
        ax.imshow(np.clip(img, 0, 1), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
    colours = [np.array(c[:3]) / 255 for _, c in legend or []]
    cmap = ListedColormap(colours) if colours else "tab10"
    top = max(len(colours) - 1, 1) if colours else 9
    axes[1, 0].set_title("labelled polygons")
    for ring, k in outlines or []:
        axes[1, 0].plot(ring[:, 0], ring[:, 1], color="k", lw=2.4)
        axes[1, 0].plot(ring[:, 0], ring[:, 1], color=colours[k] if colours else "w", lw=1.4)
    axes[1, 0].set_xlim(-0.5, rgb.shape[2] - 0.5)
    axes[1, 0].set_ylim(rgb.shape[1] - 0.5, -0.5)
    for ax, (title, img) in zip(axes[1, 1:], classes, strict=False):
        ax.imshow(np.ma.masked_equal(img, 255), cmap=cmap, vmin=0, vmax=top,
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    if legend:
        handles = [Patch(facecolor=c, edgecolor="k", label=name)
                   for c, (name, _) in zip(colours, legend, strict=True)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05 if legend else 0, 1, 1))
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
    classes, legend, outlines = _segmentation(out_dir, iters)
    _quicklook(
        out_dir / "quicklook.png",
        rgb,
        [("low-res NIR (x8)", lowres_view[0]), ("bilinear", results["bilinear"][0]),
         ("gsjbu", results["gsjbu"][0]), ("real NIR", nir[0])],
        classes,
        legend,
        outlines,
    )
    typer.echo(f"wrote GeoTIFFs and quicklook.png to {out_dir}")
    return scores


def rule_classes(ms: np.ndarray) -> np.ndarray:
    """The classes the bundled polygons were drawn from, pixel by pixel (``ATTRIBUTION.md``):
    0 bright_impervious, 1 dark_impervious, 2 vegetation, from raw ``[red, green, blue, nir]``."""
    red, nir = ms[0].astype(np.float64), ms[3].astype(np.float64)
    ndvi = (nir - red) / np.maximum(nir + red, 1e-9)
    bright = np.log10(ms[:3].astype(np.float64).mean(0) + 1) >= 2.35
    return np.where(ndvi >= 0.45, 2, np.where(bright, 0, 1)).astype(np.uint8)


def _outlines(labels_path: Path, transform: Affine, crs: object) -> list[tuple[np.ndarray, int]]:
    """The polygons' exterior rings in pixel coordinates, with their class index."""
    from geoupsample import labels as gl

    polys = gl.read_polygons(labels_path, "class").to_crs(crs)
    inverse = ~transform
    out = []
    for geom, k in zip(polys.geometries, polys.class_index(), strict=True):
        for part in getattr(geom, "geoms", [geom]):
            xy = np.array([inverse * c for c in part.exterior.coords]) - 0.5
            out.append((xy, int(k)))
    return out


#: The demo's segmentations: (file stem, title, path, method).
SEGMENTATIONS = (
    ("classes_probabilities_bilinear", "probabilities, bilinear", "probabilities", "bilinear"),
    ("classes_probabilities_gsjbu", "probabilities, gsjbu", "probabilities", "gsjbu"),
    ("classes_gsjbu", "features, gsjbu (default)", "features", "gsjbu"),
)


def _segmentation(out_dir: Path, iters: int = 50
                  ) -> tuple[list[tuple[str, np.ndarray]], list, list]:
    """Segment the bundled scene from the bundled polygons by both paths; return the class maps
    (each titled with its agreement with the rules) and the rules' classes for the quicklook,
    the legend and the polygons' outlines."""
    import geoupsample.backbones as gb
    from geoupsample.segmentation import class_colours, segment_raster

    with rasterio.open(bundled("rotterdam_ms.tif")) as src:
        ms, transform, crs = src.read(), src.transform, src.crs
    truth = rule_classes(ms)
    backbone = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=SCALE)
    maps, scores = [], {}
    typer.echo("Segmentation from the bundled polygons (spectral features, linear probe), scored "
               "against the per-pixel rules they were drawn from:")
    for stem, title, path, method in SEGMENTATIONS:
        t0 = time.perf_counter()
        report = segment_raster(
            bundled("rotterdam_ms.tif"), bundled("rotterdam_labels.geojson"), "class",
            out_dir / f"{stem}.tif", backbone, method=method, iters=iters, tile=512,
            halo=64, path=path,
        )  # fmt: skip
        took = time.perf_counter() - t0
        with rasterio.open(report.path) as src:
            cls = src.read(1)
        scores[title] = 100.0 * float((cls == truth).mean())
        maps.append((f"{title}\n{scores[title]:.1f}% agree with the rules", cls))
        cv = report.cv
        held = f"held-out {100 * cv.balanced_accuracy:.0f}%" if cv and cv.balanced_accuracy else ""
        typer.echo(f"  {title:26s} {scores[title]:5.1f}% of pixels agree   {held}   "
                   f"{took:6.2f} s")
    best = max(scores, key=lambda k: scores[k])
    typer.echo(f"  best on this scene: {best}; classes: {', '.join(report.classes)}")
    maps.append(("the rules (truth)", truth))
    colours = class_colours(report.classes)
    legend = [(name, colours[i]) for i, name in enumerate(report.classes)]
    return maps, legend, _outlines(bundled("rotterdam_labels.geojson"), transform, crs)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("geoupsample-demo"), "-o", "--out", help="Output folder."),
        iters: int = typer.Option(50, help="Adam steps of the GSJBU fit."),
        threads: ThreadsOption = None,
    ) -> None:
        """Guided upsampling on the bundled sample (offline): writes GeoTIFFs and a quicklook."""
        from geoupsample.commands.options import run_command

        run_command("demo", True, lambda _: run_demo(out, iters=iters), threads)
