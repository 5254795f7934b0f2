"""``geoupsample features``: backbone features of a scene, upsampled to full resolution."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

HELP = (
    "Compute features of SCENE with a backbone and write them upsampled to SCENE's full "
    "resolution (one float32 band per feature, or per PCA component with --pca) into OUT.\n\n"
    "Backbones: 'spectral' (built in, no weights: per-cell band means and standard deviations "
    "plus NDVI/NDWI where bands named red/green/nir exist; --cell-size sets the cell) or "
    "'timm:<model>' (any timm model: ViT/DINOv2-style patch tokens or CNN stages). timm models "
    "need weights: --weights FILE (safetensors or a PyTorch state dict), --pretrained (only if "
    "already in your Hugging Face cache; nothing is downloaded) or --random-init (smoke "
    "tests). A model trained on 3 bands is fed 3 of the scene's bands with --model-bands, or "
    "adapted to all of them with --adapt-stem.\n\n"
    "Tiles are aligned to the backbone's patch size; each tile's features are upsampled with "
    "kernels fitted on the tile (--method gsjbu) or a baseline.\n\n"
    "OUT is a GeoTIFF (--dtype float32 or float16, --cog for a Cloud-Optimized GeoTIFF) or, "
    "when it ends with .zarr, a Zarr store (variable 'features', georeferenced the rioxarray "
    "way: xr.open_zarr(OUT).features.rio.crs) for many channels. It appears only when "
    "complete; --resume continues an interrupted run with the same inputs and parameters, "
    "--aoi limits the work to an area, --scheduler runs the tiles on a dask cluster."
)

#: Shared help of the tiling options (features and segment).
AOI_HELP = (
    "GeoJSON area of interest (EPSG:4326 unless it names a CRS); pixels outside are nodata, "
    "tiles outside are skipped."
)
RESUME_HELP = "Continue an interrupted run with the same inputs and parameters."
SCHEDULER_HELP = (
    "dask.distributed scheduler address (e.g. tcp://host:8786); default: local threads."
)
WORKERS_HELP = (
    "Tiles computed at once by local threads (default 1: torch uses every core inside a tile). "
    "With more, each tile gets cores/workers torch threads and its own memory (about 0.6 GB "
    "per 1024 px gsjbu tile); often faster where memory allows."
)


class FeatureDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Method(str, Enum):
    gsjbu = "gsjbu"
    jbu = "jbu"
    bilinear = "bilinear"
    bicubic = "bicubic"
    nearest = "nearest"


def split(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None stays None."""
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def build_backbone(
    name: str,
    band_names: tuple[str, ...],
    *,
    weights: Path | None = None,
    pretrained: bool = False,
    random_init: bool = False,
    layer: int = -1,
    model_bands: str | None = None,
    adapt_stem: bool = False,
    cell_size: int = 8,
) -> Any:
    """A backbone for a scene with ``band_names`` from the CLI options."""
    from geoupsample.backbones import BackboneError, create

    if name.strip().lower() == "spectral":
        if weights is not None or pretrained or random_init or model_bands:
            raise BackboneError(
                "the spectral backbone takes no weights or model bands; drop --weights, "
                "--pretrained, --random-init and --model-bands (use --bands to choose bands)"
            )
        return create("spectral", band_names=band_names, cell_size=cell_size)
    chosen: list[int | str] | None = None
    if model_bands:
        chosen = [int(b) - 1 if b.isdigit() else b for b in split(model_bands) or []]
    return create(
        name,
        in_chans=len(band_names),
        band_names=band_names,
        bands=chosen,
        layer=layer,
        weights=weights,
        pretrained=pretrained,
        random_init=random_init,
        adapt_stem=adapt_stem,
    )


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: printed as ``error: ...``, exit status 2."""
    from rasterio.errors import RasterioError

    from geoupsample.backbones import WeightsNotFoundError
    from geoupsample.pipeline import InputError
    from tiling import JournalMismatch

    return (
        InputError,
        JournalMismatch,
        WeightsNotFoundError,
        FileNotFoundError,
        PermissionError,
        RasterioError,
        ValueError,
        TypeError,
    )


def features_command(
    scene: Annotated[Path, typer.Argument(help="Image to compute features of (GeoTIFF).")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output GeoTIFF (or Zarr store: .zarr).")
    ],
    backbone: Annotated[
        str, typer.Option(help="'spectral' or 'timm:<model>' (e.g. timm:vit_small_patch14_dinov2).")
    ] = "spectral",
    weights: Annotated[
        Path | None, typer.Option(help="Weight file for a timm model (safetensors or state dict).")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Use the model's weights from your Hugging Face cache (offline).")
    ] = False,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Random weights (smoke tests only).")
    ] = False,
    layer: Annotated[
        int, typer.Option(help="Transformer block or CNN stage (timm out_indices; -1 = last).")
    ] = -1,
    bands: Annotated[
        str | None,
        typer.Option(help="Scene bands to use: 1-based indexes or descriptions (default: all)."),
    ] = None,
    model_bands: Annotated[
        str | None,
        typer.Option(help="Which of those the model sees (e.g. red,green,blue); default all."),
    ] = None,
    adapt_stem: Annotated[
        bool, typer.Option(help="Adapt a 3-band stem to the bands fed (timm in_chans).")
    ] = False,
    cell_size: Annotated[int, typer.Option(help="Cell size in pixels (spectral).")] = 8,
    pca: Annotated[
        int | None, typer.Option(help="Reduce to K principal components (fitted on the scene).")
    ] = None,
    method: Annotated[Method, typer.Option("--method", "-m", help="Upsampling method.")] = (
        Method.gsjbu
    ),
    iters: Annotated[int, typer.Option(help="GSJBU fit steps per tile.")] = 50,
    radius: Annotated[int, typer.Option(help="Kernel radius in low-res pixels.")] = 3,
    consistency: Annotated[
        int | None,
        typer.Option(
            help="Back-projection rounds making the output average back to the low-res values "
            "(default: the library's; 0 keeps the pure kernels)."
        ),
    ] = None,
    tile: Annotated[int, typer.Option(help="Tile core size in pixels.")] = 512,
    halo: Annotated[int, typer.Option(help="Tile overlap (context, blending) in pixels.")] = 64,
    dtype: Annotated[
        FeatureDtype, typer.Option(help="Output dtype (float16: half the size, ~3 digits).")
    ] = FeatureDtype.float32,
    compress: Annotated[
        str, typer.Option(help="deflate, zstd, lzw (GeoTIFF only) or none.")
    ] = "deflate",
    cog: Annotated[bool, typer.Option(help="Write a Cloud-Optimized GeoTIFF.")] = False,
    blocksize: Annotated[
        int, typer.Option(help="Output block (GeoTIFF tile, Zarr chunk) size, a multiple of 16.")
    ] = 256,
    aoi: Annotated[Path | None, typer.Option(help=AOI_HELP)] = None,
    resume: Annotated[bool, typer.Option(help=RESUME_HELP)] = False,
    scheduler: Annotated[str | None, typer.Option(help=SCHEDULER_HELP)] = None,
    workers: Annotated[int | None, typer.Option(min=1, help=WORKERS_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="Torch device: cpu or cuda.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    from geoupsample.featuremaps import Scene, features_raster, progress_printer

    bar = None
    try:
        sc = Scene.open(scene, split(bands))
        bb = build_backbone(
            backbone,
            sc.band_names,
            weights=weights,
            pretrained=pretrained,
            random_init=random_init,
            layer=layer,
            model_bands=model_bands,
            adapt_stem=adapt_stem,
            cell_size=cell_size,
        )
        bar, progress = progress_printer("features", quiet)
        report = features_raster(
            scene,
            out,
            bb,
            bands=split(bands),
            pca=pca,
            method=method.value,
            iters=iters,
            radius=radius,
            consistency=consistency,
            tile=tile,
            halo=halo,
            dtype=dtype.value,
            compress=compress,
            cog=cog,
            blocksize=blocksize,
            aoi=aoi,
            resume=resume,
            scheduler=scheduler,
            workers=workers,
            device=device,
            progress=progress,
        )
    except user_errors() as err:
        if bar is not None:
            bar.close()
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if bar is not None:
        bar.close()
    if not quiet:
        typer.echo(
            f"wrote {os.fspath(out)}: {report.megapixels:.1f} MP in {report.seconds:.1f} s, "
            f"stride {bb.stride} px, {report.computed} tiles computed, {report.skipped} skipped",
            err=True,
        )


features_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``features`` to the CLI."""
    app.command("features", help=HELP)(features_command)
