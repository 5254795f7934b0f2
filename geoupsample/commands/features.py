"""``geoupsample features``: backbone features of a scene, upsampled to full resolution."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from geoupsample.commands import options as opt

HELP = (
    "Compute features of SCENE with a backbone and write them upsampled to SCENE's full "
    "resolution (one float32 band per feature, or per PCA component with --pca) into OUT.\n\n"
    "Backbones: 'spectral' (built in, no weights: per-cell band means, standard deviations and "
    "mean gradient magnitudes, plus NDVI/NDWI where bands named red/green/nir exist, and their "
    "means over the cells "
    "around (--context rings); --cell-size sets the cell) or "
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


class FeatureDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


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
    context: int = 1,
) -> Any:
    """A backbone for a scene with ``band_names`` from the CLI options."""
    from geoupsample.backbones import BackboneError, create

    if name.strip().lower() == "spectral":
        if weights is not None or pretrained or random_init or model_bands:
            raise BackboneError(
                "the spectral backbone takes no weights or model bands; drop --weights, "
                "--pretrained, --random-init and --model-bands (use --bands to choose bands)"
            )
        return create("spectral", band_names=band_names, cell_size=cell_size, context=context)
    from geoupsample.inputs import model_band_choice

    chosen = model_band_choice(opt.split(model_bands) or []) if model_bands else None
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


def features_command(
    scene: Annotated[str, typer.Argument(help="Image to compute features of (GeoTIFF; a path, "
                                             "URL or GDAL /vsi path).")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output GeoTIFF (or Zarr store: .zarr).")
    ],
    backbone: opt.BackboneOption = "spectral",
    weights: opt.WeightsOption = None,
    pretrained: opt.PretrainedOption = False,
    random_init: opt.RandomInitOption = False,
    layer: opt.LayerOption = -1,
    bands: opt.BandsOption = None,
    band_names: opt.BandNamesOption = None,
    model_bands: opt.ModelBandsOption = None,
    adapt_stem: opt.AdaptStemOption = False,
    cell_size: opt.CellSizeOption = 8,
    context: opt.ContextOption = 1,
    pca: Annotated[str | None, typer.Option(
        metavar="K|FILE",
        help="Reduce to K principal components, fitted on a sample of the whole scene (also "
             "with --aoi, so that adjacent runs agree); or project with a PCA saved by "
             "--save-pca (the same components for several runs and scenes).")] = None,
    save_pca: Annotated[str | None, typer.Option(
        metavar="FILE", help="Save the run's PCA (JSON) for --pca FILE.")] = None,
    method: opt.MethodOption = opt.Method.gsjbu,
    iters: opt.ItersOption = 50,
    radius: opt.RadiusOption = 3,
    consistency: opt.FeatureConsistencyOption = None,
    tile: opt.TileOption = 512,
    halo: opt.FeatureHaloOption = 64,
    dtype: Annotated[FeatureDtype, opt.cli_option(
        opt.OutputOptions, "dtype", help=opt.FEATURES_DTYPE_HELP)] = FeatureDtype.float32,
    compress: opt.FeatureCompressOption = "deflate",
    cog: opt.CogOption = False,
    blocksize: opt.BlocksizeOption = 256,
    aoi: opt.AoiOption = None,
    aoi_crs: opt.AoiCrsOption = None,
    resume: opt.ResumeOption = False,
    scheduler: opt.SchedulerOption = None,
    workers: opt.WorkersOption = None,
    threads: opt.ThreadsOption = None,
    device: opt.DeviceOption = None,
    quiet: opt.QuietOption = False,
) -> None:
    from geoupsample.featuremaps import features_raster
    from geoupsample.scenes import Scene

    def work(progress: Any) -> tuple[Any, Any]:
        sc = Scene.open(scene, opt.split(bands), band_names=opt.split(band_names))
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
            context=context,
        )
        report = features_raster(
            scene,
            out,
            bb,
            bands=list(sc.bands),  # indexes: --band-names are not in the file
            band_names=opt.split(band_names),
            pca=pca_option(pca),
            save_pca=save_pca,
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
            aoi_crs=aoi_crs,
            resume=resume,
            scheduler=scheduler,
            workers=workers,
            device=device,
            progress=progress,
        )
        return bb, report

    bb, report = opt.run_command("features", quiet, work, threads)
    if not quiet:
        typer.echo(
            f"wrote {os.fspath(out)}: {report.megapixels:.1f} MP in {report.seconds:.1f} s, "
            f"stride {bb.stride} px, {report.computed} tiles computed, {report.skipped} skipped",
            err=True,
        )


features_command.__doc__ = HELP


def pca_option(value: str | None) -> int | str | None:
    """``--pca``: a whole number of components, or a saved PCA's file."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def register(app: typer.Typer) -> None:
    """Add ``features`` to the CLI."""
    app.command("features", help=HELP)(features_command)
