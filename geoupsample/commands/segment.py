"""``geoupsample segment``: a class raster of a scene from a few labelled polygons."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from geoupsample.commands.features import (
    AOI_HELP,
    RESUME_HELP,
    SCHEDULER_HELP,
    WORKERS_HELP,
    Method,
    build_backbone,
    split,
    user_errors,
)

HELP = (
    "Segment SCENE into the classes of the polygons in --labels (GeoJSON or GeoPackage, any "
    "CRS; the class is the attribute --class-field) and write OUT: band 1 the class (uint8 with "
    "a colour table; class names in the tags), band 2 the confidence (winning probability x "
    "254); 255 is nodata.\n\n"
    "A linear probe is fitted on the backbone's low-res features under the polygons (their "
    "per-cell coverage), predicts low-res class probabilities tile by tile, and these are "
    "upsampled to full resolution (--method gsjbu: kernels fitted on each tile) and "
    "renormalised. --probs keeps the probabilities. The default backbone, 'spectral', needs no "
    "weights and works offline; see `geoupsample features --help` for timm backbones.\n\n"
    "Outputs appear only when complete; --resume continues an interrupted run with the same "
    "inputs and parameters, --aoi limits the prediction to an area (the probe still learns "
    "from every polygon), --scheduler runs the tiles on a dask cluster, --cog writes "
    "Cloud-Optimized GeoTIFFs."
)


class ProbsDtype(str, Enum):
    uint8 = "uint8"
    float32 = "float32"


def segment_command(
    scene: Annotated[Path, typer.Argument(help="Image to segment (GeoTIFF).")],
    labels: Annotated[Path, typer.Option(help="Labelled polygons: GeoJSON or GeoPackage.")],
    class_field: Annotated[str, typer.Option(help="Attribute holding each polygon's class.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output class raster (GeoTIFF).")],
    backbone: Annotated[str, typer.Option(help="'spectral' or 'timm:<model>'.")] = "spectral",
    weights: Annotated[Path | None, typer.Option(help="Weight file for a timm model.")] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Use the model's weights from your Hugging Face cache (offline).")
    ] = False,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Random weights (smoke tests only).")
    ] = False,
    layer: Annotated[int, typer.Option(help="Transformer block or CNN stage (-1 = last).")] = -1,
    bands: Annotated[
        str | None, typer.Option(help="Scene bands: 1-based indexes or descriptions (default all).")
    ] = None,
    model_bands: Annotated[
        str | None, typer.Option(help="Which of those a timm model sees (e.g. red,green,blue).")
    ] = None,
    adapt_stem: Annotated[bool, typer.Option(help="Adapt a 3-band stem to the bands fed.")] = False,
    cell_size: Annotated[int, typer.Option(help="Cell size in pixels (spectral).")] = 8,
    labels_crs: Annotated[
        str | None, typer.Option(help="CRS of the polygons if the file does not say.")
    ] = None,
    layer_name: Annotated[
        str | None, typer.Option("--labels-layer", help="GeoPackage layer with the polygons.")
    ] = None,
    probs: Annotated[Path | None, typer.Option(help="Also write the probabilities here.")] = None,
    probs_dtype: Annotated[
        ProbsDtype, typer.Option(help="uint8 (p x 254, 255 nodata) or float32.")
    ] = ProbsDtype.uint8,
    save_probe: Annotated[
        Path | None, typer.Option(help="Save the fitted probe (safetensors).")
    ] = None,
    balanced: Annotated[bool, typer.Option(help="Weight the classes equally in the probe.")] = (
        False
    ),
    method: Annotated[Method, typer.Option("--method", "-m", help="Upsampling method.")] = (
        Method.gsjbu
    ),
    iters: Annotated[int, typer.Option(help="GSJBU fit steps per tile.")] = 50,
    radius: Annotated[int, typer.Option(help="Kernel radius in low-res pixels.")] = 3,
    consistency: Annotated[
        float | None,
        typer.Option(
            help="Back-projection rounds making the output average back to the low-res "
            "probabilities (default 1; 0: the pure kernels, sharper)."
        ),
    ] = None,
    self_guidance: Annotated[
        float | None,
        typer.Option(
            help="Weight of the probabilities themselves in the range term (default 1; 0: "
            "colour only, which lets labels follow colour edges they do not share)."
        ),
    ] = None,
    tile: Annotated[int, typer.Option(help="Tile core size in pixels.")] = 512,
    halo: Annotated[int, typer.Option(help="Tile overlap (context, blending) in pixels.")] = 64,
    compress: Annotated[str, typer.Option(help="deflate, zstd, lzw or none.")] = "deflate",
    cog: Annotated[bool, typer.Option(help="Write Cloud-Optimized GeoTIFFs.")] = False,
    blocksize: Annotated[
        int, typer.Option(help="Output block (GeoTIFF tile) size, a multiple of 16.")
    ] = 256,
    aoi: Annotated[Path | None, typer.Option(help=AOI_HELP)] = None,
    resume: Annotated[bool, typer.Option(help=RESUME_HELP)] = False,
    scheduler: Annotated[str | None, typer.Option(help=SCHEDULER_HELP)] = None,
    workers: Annotated[int | None, typer.Option(min=1, help=WORKERS_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="Torch device: cpu or cuda.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    from geoupsample.featuremaps import Scene, progress_printer
    from geoupsample.segmentation import segment_raster

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
        bar, progress = progress_printer("segment", quiet)
        report = segment_raster(
            scene,
            labels,
            class_field,
            out,
            bb,
            bands=split(bands),
            labels_crs=labels_crs,
            layer=layer_name,
            probs_path=probs,
            probs_dtype=probs_dtype.value,
            method=method.value,
            iters=iters,
            radius=radius,
            consistency=consistency,
            self_guidance=self_guidance,
            tile=tile,
            halo=halo,
            class_weight="balanced" if balanced else None,
            probe_path=save_probe,
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
        shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in report.class_fractions.items())
        typer.echo(
            f"probe fitted on {report.train_cells} labelled cells ({bb.stride} px); "
            f"wrote {os.fspath(out)} in {report.run.seconds:.1f} s: {shares}",
            err=True,
        )
        if report.probs_path:
            typer.echo(f"probabilities: {report.probs_path}", err=True)


segment_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``segment`` to the CLI."""
    app.command("segment", help=HELP)(segment_command)
