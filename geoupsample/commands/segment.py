"""``geoupsample segment``: a class raster of a scene from a few labelled polygons."""

from __future__ import annotations

import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from geoupsample.commands import options as opt
from geoupsample.commands.features import build_backbone
from geoupsample.probe_selection import PoorProbeWarning

HELP = (
    "Segment SCENE into the classes of the polygons in --labels (GeoJSON, GeoPackage, Shapefile, "
    "FlatGeobuf or any vector file GDAL reads, in any CRS; the class is the attribute "
    "--class-field) and write OUT: band 1 the class (uint8 with a colour table; class names in "
    "the tags), band 2 the confidence (winning probability x "
    "254); 255 is nodata.\n\n"
    "A linear probe learns the classes from the polygons, by one of two paths (--path). "
    "'features' (the default for the 'spectral' backbone): the backbone's low-res features are "
    "brought to every pixel by the kernels fitted on each tile (--method gsjbu), beside the "
    "pixel's own band values and indices (spectral), and the probe classifies every pixel. "
    "'probabilities' (the default for timm backbones): the probe classifies the low-res cells "
    "and their probabilities are upsampled. The probe's regularisation (and on the feature "
    "path whether it uses the cells' features) is chosen by cross-validation over the "
    "polygons, whole polygons held out; the held-out accuracy is printed and kept in the tags "
    "(probe_accuracy, probe_cv) and a poor one is warned about. Classes are balanced unless "
    "--no-balanced. --probs keeps the probabilities. The default backbone, 'spectral', needs "
    "no weights and works offline; see `geoupsample features --help` for timm backbones.\n\n"
    "Outputs appear only when complete; --resume continues an interrupted run with the same "
    "inputs and parameters, --aoi limits the prediction to an area (the probe still learns "
    "from every polygon), --scheduler runs the tiles on a dask cluster, --cog writes "
    "Cloud-Optimized GeoTIFFs.\n\n"
    "--save-probe keeps the fitted probe; --probe applies it to another scene (no --labels), "
    "with the backbone options it was trained with."
)


class Path_(str, Enum):
    features = "features"
    probabilities = "probabilities"


class ProbsDtype(str, Enum):
    uint8 = "uint8"
    float32 = "float32"


def segment_command(
    scene: Annotated[str, typer.Argument(help="Image to segment (GeoTIFF; a path, URL or GDAL "
                                             "/vsi path).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output class raster (GeoTIFF).")],
    labels: Annotated[str | None, typer.Option(
        help="Labelled polygons to train the probe on: GeoJSON, GeoPackage, Shapefile, "
             "FlatGeobuf... (a path, URL or GDAL /vsi path).")] = None,
    class_field: Annotated[str | None, typer.Option(
        help="Attribute holding each polygon's class.")] = None,
    probe: Annotated[Path | None, typer.Option(
        help="Apply a probe saved by --save-probe (on another scene, say) instead of training "
             "one: give the backbone options it was trained with.")] = None,
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
    labels_crs: Annotated[
        str | None,
        typer.Option(help="CRS of the polygons' coordinates, overriding what the file says (a "
                     "GeoJSON without a 'crs' member is read as lon/lat WGS 84)."),
    ] = None,
    layer_name: Annotated[
        str | None,
        typer.Option("--labels-layer", help="Layer with the polygons (files with several layers)."),
    ] = None,
    probs: Annotated[Path | None, typer.Option(help="Also write the probabilities here.")] = None,
    probs_dtype: Annotated[
        ProbsDtype, typer.Option(help="uint8 (p x 254, 255 nodata) or float32.")
    ] = ProbsDtype.uint8,
    save_probe: Annotated[
        Path | None, typer.Option(help="Save the fitted probe (safetensors).")
    ] = None,
    balanced: Annotated[bool, typer.Option(
        help="Weight the classes equally in the probe (--no-balanced: by their labelled "
             "area).")] = True,
    path: Annotated[Path_ | None, typer.Option(
        "--path", help="features: the probe classifies every pixel's features (default for "
        "spectral); probabilities: it classifies the low-res cells and their probabilities "
        "are upsampled (default for timm backbones).", show_default=False)] = None,
    weight_decay: Annotated[float | None, typer.Option(
        min=0.0, help="The probe's L2 penalty (on standardised features); default: chosen by "
        "cross-validation over the polygons.", show_default=False)] = None,
    method: opt.MethodOption = opt.Method.gsjbu,
    iters: opt.ItersOption = 50,
    radius: opt.RadiusOption = 3,
    consistency: opt.ConsistencyOption = None,
    self_guidance: opt.SelfGuidanceOption = None,
    min_sigma_r: opt.MinSigmaROption = None,
    tile: opt.TileOption = 512,
    halo: opt.FeatureHaloOption = 64,
    compress: opt.CompressOption = "deflate",
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
    from geoupsample.scenes import Scene
    from geoupsample.segmentation import segment_raster

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
        report = segment_raster(
            scene,
            labels,
            class_field,
            out,
            bb,
            bands=list(sc.bands),  # indexes: --band-names are not in the file
            band_names=opt.split(band_names),
            labels_crs=labels_crs,
            layer=layer_name,
            probs_path=probs,
            probs_dtype=probs_dtype.value,
            method=method.value,
            iters=iters,
            radius=radius,
            consistency=consistency,
            self_guidance=self_guidance,
            min_sigma_r=min_sigma_r,
            tile=tile,
            halo=halo,
            class_weight="balanced" if balanced else None,
            weight_decay=weight_decay,
            path=path.value if path is not None else None,
            probe_path=save_probe,
            probe=probe,
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

    with warnings.catch_warnings():  # printed below, once, without a source line
        warnings.simplefilter("ignore", PoorProbeWarning)
        bb, report = opt.run_command("segment", quiet, work, threads)
    warning = report.cv.warning() if report.cv is not None and probe is None else None
    if not quiet and report.cv is not None and probe is None:
        typer.echo(f"{report.prediction_path} path; {report.cv.summary()}", err=True)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    hint = index_hint(bb)
    if hint and not quiet:
        typer.echo(f"note: {hint}", err=True)
    if not quiet:
        shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in report.class_fractions.items())
        unit = ("pixels" if report.prediction_path == "features"
                else f"cells ({bb.stride} px)")
        learnt = (f"probe fitted on {report.train_cells} labelled {unit}"
                  if probe is None else f"probe from {os.fspath(probe)}")
        typer.echo(f"{learnt}; wrote {os.fspath(out)} in {report.run.seconds:.1f} s: {shares}",
                   err=True)
        if report.probs_path:
            typer.echo(f"probabilities: {report.probs_path}", err=True)


def index_hint(backbone: Any) -> str | None:
    """What to do when the spectral backbone found no band to compute an index from (a file
    without band descriptions and no --band-names): the indices are its best features for
    vegetation, water and built-up classes."""
    from geoupsample.backbones.spectral import SpectralBackbone

    if not isinstance(backbone, SpectralBackbone) or backbone.index_pairs:
        return None
    names = ", ".join(backbone.band_names or ()) or "unnamed"
    return (f"the spectral backbone computed no NDVI, NDWI or NDBI: no red, green, nir or "
            f"swir1 band among the band names ({names}); the map used the normalised "
            "differences of every band pair instead. If the scene has those bands, name them "
            "(--band-names red,green,blue,nir): vegetation, water and built-up classes are "
            "learnt better from the indices themselves")


segment_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``segment`` to the CLI."""
    app.command("segment", help=HELP)(segment_command)
