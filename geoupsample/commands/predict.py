"""``geoupsample predict``: the user's own segmentation model (ONNX, TorchScript) over a scene."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from geoupsample.commands import options as opt

HELP = (
    "Run your trained segmentation model (--model: an ONNX file or a TorchScript archive) over "
    "SCENE and write its class probabilities to OUT: one band per class, uint8 (p x 254, 255 "
    "nodata) by default, the class names in the tags; --classes also writes the class raster "
    "with a colour table, as `geoupsample segment` does.\n\n"
    "The bands the model takes are --bands (in its order), turned into what it was trained on "
    "by --scale-factor and --offset (default: the file's own scale and offset) and --mean / "
    "--std (the model card's normalisation). A model of fixed input size runs in overlapping "
    "windows (--overlap) in batches, blended; a model of any size on the tiles (or in windows "
    "of --input-size). Logits become probabilities (softmax; one channel: sigmoid).\n\n"
    "--model-scale S runs the model on the scene averaged to S x S cells (S^2 times less work) "
    "and upsamples its probabilities to the scene's pixels with --method (gsjbu: kernels "
    "fitted on each tile's full-resolution pixels), as it does for a model whose output is "
    "coarser than its input.\n\n"
    "Outputs appear only when complete; --resume continues an interrupted run, --aoi limits "
    "it to an area, --scheduler runs the tiles on a dask cluster, --cog writes Cloud-Optimized "
    "GeoTIFFs. Nothing is unpickled: a torch.save file is refused with the way to export it."
)


class Output(str, Enum):
    auto = "auto"
    logits = "logits"
    probabilities = "probabilities"


class ProbsDtype(str, Enum):
    uint8 = "uint8"
    float32 = "float32"


def numbers(text: str | None, name: str) -> list[float] | None:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]``; an error naming ``--name`` for anything else."""
    if text is None:
        return None
    from geoupsample.inputs import InputError

    try:
        return [float(v) for v in opt.split(text) or []]
    except ValueError:
        raise InputError(f"--{name} takes numbers separated by commas (one for all bands or "
                         f"one per band); got {text!r}") from None


def predict_command(
    scene: Annotated[str, typer.Argument(help="Image to run the model on (GeoTIFF; a path, URL "
                                             "or GDAL /vsi path).")],
    model: Annotated[Path, typer.Option(help="The model: ONNX (.onnx) or TorchScript (.pt).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output probabilities (GeoTIFF).")],
    bands: Annotated[str | None, typer.Option(
        help="Scene bands the model takes, in its order: 1-based indexes or descriptions "
             "(default: all, in the file's order).")] = None,
    scale_factor: Annotated[str | None, typer.Option(
        help="Stored value x scale + offset = what the model was trained on (one for all "
             "bands or one per band; default: the file's own scale).")] = None,
    offset: Annotated[str | None, typer.Option(
        help="See --scale-factor (default: the file's own offset).")] = None,
    mean: Annotated[str | None, typer.Option(
        help="Per-band means subtracted after the scaling (the model card's).")] = None,
    std: Annotated[str | None, typer.Option(
        help="Per-band standard deviations divided by after the means.")] = None,
    input_size: Annotated[int | None, typer.Option(
        help="Windows of this size for a model of any input size (default: one call per "
             "tile); a model of fixed input size says its own.")] = None,
    overlap: Annotated[float, typer.Option(
        help="Overlap of the windows, a fraction of the input size (blended).")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Windows per model call.")] = 8,
    output: Annotated[Output, typer.Option(
        help="What the model outputs; auto decides from a sample of the scene.")] = Output.auto,
    class_names: Annotated[str | None, typer.Option(
        help="The classes, in the model's channel order (e.g. clear,cloud,shadow).")] = None,
    model_scale: Annotated[int, typer.Option(
        help="Run the model on cells of this many pixels and upsample its probabilities "
             "(--method).")] = 1,
    classes: Annotated[Path | None, typer.Option(
        "--classes", help="Also write the class raster (class, confidence) here.")] = None,
    dtype: Annotated[ProbsDtype, opt.cli_option(
        opt.OutputOptions, "dtype", help=opt.PREDICT_DTYPE_HELP)] = ProbsDtype.uint8,
    method: opt.MethodOption = opt.Method.gsjbu,
    iters: opt.ItersOption = 50,
    radius: opt.RadiusOption = 3,
    consistency: opt.ConsistencyOption = None,
    self_guidance: opt.SelfGuidanceOption = None,
    min_sigma_r: opt.MinSigmaROption = None,
    tile: opt.TileOption = 512,
    halo: opt.HaloOption = 64,
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
    from geoupsample.prediction import predict_raster

    def work(progress: Any) -> Any:
        return predict_raster(
            scene, model, out, bands=opt.split(bands),
            scale_factor=numbers(scale_factor, "scale-factor"), offset=numbers(offset, "offset"),
            mean=numbers(mean, "mean"), std=numbers(std, "std"), input_size=input_size,
            overlap=overlap, batch=batch_size, output=output.value,
            class_names=opt.split(class_names), model_scale=model_scale, method=method.value,
            iters=iters, radius=radius, consistency=consistency, self_guidance=self_guidance,
            min_sigma_r=min_sigma_r, dtype=dtype.value, classes_path=classes, tile=tile,
            halo=halo, compress=compress, cog=cog, blocksize=blocksize, aoi=aoi,
            aoi_crs=aoi_crs, resume=resume, scheduler=scheduler, workers=workers,
            device=device, progress=progress,
        )  # fmt: skip

    report = opt.run_command("predict", quiet, work, threads)
    if not quiet:
        typer.echo(f"{report.output} of {len(report.classes)} classes ({', '.join(report.classes)})"
                   f"; wrote {os.fspath(out)} in {report.run.seconds:.1f} s", err=True)
        if report.class_fractions:
            shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in report.class_fractions.items())
            typer.echo(f"classes: {report.classes_path}: {shares}", err=True)


predict_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``predict`` to the CLI."""
    app.command("predict", help=HELP)(predict_command)
