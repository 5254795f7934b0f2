"""``geoupsample upsample``: upsample a georeferenced low-res raster onto a guide's grid."""

from __future__ import annotations

import glob
import os
from enum import Enum
from typing import Annotated

import typer

from geoupsample.commands import options as opt

HELP = (
    "Upsample LOWRES (probabilities, features, a coarse band, elevation...) onto the grid of "
    "GUIDE (a high-resolution, e.g. multispectral, image), guided by GUIDE, into the GeoTIFF "
    "OUT.\n\n"
    "Several LOWRES rasters (files, or glob patterns such as 'B*_20m.tif') on one grid go in one "
    "pass: each tile is fitted once and every raster rendered with the same kernels (the pixels "
    "of one run per raster). -o with {stem} (each raster's file name without extension) or "
    "{index} writes one output per raster (-o out/{stem}_10m.tif); a plain -o path gets one "
    "output with every raster's bands in order.\n\n"
    "The output has the guide's CRS, transform and size, the low-res band descriptions and "
    "nodata, and tags recording the method and its parameters. It is written tile by tile with "
    "bounded memory and appears at OUT only when complete (--resume continues an interrupted "
    "run).\n\n"
    "Grids: the low-res pixel must be a whole number or a simple fraction of guide pixels (4 "
    "for 10 m on 2.5 m, 10/3 for 10 m on 3 m) in the same CRS. Its origin may lie anywhere: "
    "off the guide's pixel lattice by a fraction of a pixel (Landsat's 30 m bands on its 15 m "
    "pan band: half a pan pixel), the grid is used as it is, cell centres where they are (the "
    "geoupsample_grid_shift tag). A LOWRES on another grid (another CRS, a rotation, a scale "
    "that is no simple fraction) is refused, or, with --warp RESAMPLING, reprojected as it is "
    "read onto a grid of about its own pixel size that nests in the guide's (a LOWRES whose "
    "grid nests is never warped).\n\n"
    "Time series: --series PAIRS (a CSV file, one date per line: date,lowres,guide or "
    "lowres,guide) instead of LOWRES... GUIDE upsamples each date's LOWRES onto its own GUIDE, "
    "the dates in order, each tile's kernels of a date starting from the same tile's of the "
    "date before (--warm-iters steps instead of --iters), and where the guide has not changed "
    "the output keeps the date before's detail (--stable-tolerance); the guides must share one "
    "grid. -o with {date}, {stem} or {index} writes one output per date."
)


class Kind(str, Enum):
    auto = "auto"
    continuous = "continuous"
    probabilities = "probabilities"


def upsample_command(
    rasters: Annotated[list[str] | None, typer.Argument(
        metavar="LOWRES... GUIDE",
        help="Low-res raster(s) to upsample (any bands; paths, glob patterns, URLs or GDAL /vsi "
             "paths), then the high-res guide raster (its grid is the output's).")] = None,
    out: Annotated[str, typer.Option("-o", "--out", help="Output GeoTIFF path, or a pattern "
                                                          "with {stem}, {index} or {date}.")] = "",
    series: Annotated[str | None, typer.Option(
        metavar="PAIRS",
        help="A time series instead of LOWRES... GUIDE: a CSV file of dates, one per line, "
             "date,lowres,guide or lowres,guide (paths relative to the file).")] = None,
    warm_iters: Annotated[int | None, typer.Option(
        min=0, help="Time series: gsjbu fit steps of each date after the first, from the date "
                    "before's kernels (default 25).")] = None,
    stable_tolerance: Annotated[float | None, typer.Option(
        min=0, help="Time series: where the guide changed less than this since the date before "
                    "(largest band's change, in units of its robust range), the output keeps "
                    "the date before's detail and takes the low-res change smoothly (default "
                    "0.25; 0: each date alone).")] = None,
    method: opt.MethodOption = opt.Method.gsjbu,
    iters: opt.ItersOption = 50,
    radius: opt.RadiusOption = 3,
    tile: opt.TileOption = 1024,
    halo: opt.HaloOption = 64,
    bands: Annotated[str | None, typer.Option(help="Low-res bands to upsample: comma-separated "
                                                   "1-based indexes or band descriptions "
                                                   "(default: all).")] = None,
    guide_bands: Annotated[str | None, typer.Option(help="Guide bands to use, same syntax "
                                                         "(default: all).")] = None,
    aoi: opt.AoiOption = None,
    aoi_crs: opt.AoiCrsOption = None,
    cog: opt.CogOption = False,
    dtype: Annotated[str | None, opt.cli_option(opt.OutputOptions, "dtype")] = None,
    compress: opt.CompressOption = "deflate",
    blocksize: opt.BlocksizeOption = 256,
    device: opt.DeviceOption = None,
    resume: opt.ResumeOption = False,
    scheduler: opt.SchedulerOption = None,
    workers: opt.WorkersOption = None,
    threads: opt.ThreadsOption = None,
    kind: Annotated[Kind | None, opt.cli_option(opt.RenderOptions, "kind")] = None,
    consistency: opt.ConsistencyOption = None,
    self_guidance: opt.SelfGuidanceOption = None,
    min_sigma_r: opt.MinSigmaROption = None,
    warp: Annotated[str | None, typer.Option(
        help="Reproject a LOWRES whose grid does not nest in the guide's, with this GDAL "
             "resampling: bilinear or average for probabilities, features and other continuous "
             "values; nearest or mode for class numbers (default: refuse it). gdalwarp's -r "
             "names (near, cubicspline) work too.")] = None,
    keep_missing: Annotated[bool, typer.Option(
        help="Nodata on the whole footprint of every low-res nodata cell (a cloud mask's), "
             "instead of values wherever the method reaches a valid cell (bilinear: about half "
             "a cell into the hole; jbu/gsjbu: up to --radius cells).")] = False,
    quiet: opt.QuietOption = False,
) -> None:
    from geoupsample.pipeline import upsample_raster
    from geoupsample.time_series import read_pairs, upsample_series

    if not out:
        raise typer.BadParameter("give the output: -o OUT.tif (or a pattern such as "
                                 "out/{stem}_10m.tif)", param_hint="-o")
    if series is not None and rasters:
        raise typer.BadParameter("give either LOWRES... GUIDE or --series PAIRS, not both",
                                 param_hint="--series")
    options = dict(method=method.value, iters=iters, radius=radius, tile=tile, halo=halo,
                   bands=opt.split(bands), guide_bands=opt.split(guide_bands), aoi=aoi,
                   aoi_crs=aoi_crs, cog=cog, dtype=dtype, compress=compress, blocksize=blocksize,
                   device=device, resume=resume, scheduler=scheduler, workers=workers,
                   kind=(kind or Kind.auto).value, consistency=consistency,
                   self_guidance=self_guidance, min_sigma_r=min_sigma_r, warp=warp,
                   keep_missing=keep_missing)
    if series is not None:
        report = opt.run_command("upsample", quiet, lambda progress: upsample_series(
            read_pairs(series), out, progress=progress, **options,
            **({} if warm_iters is None else {"warm_iters": warm_iters}),
            **({} if stable_tolerance is None else {"stable_tolerance": stable_tolerance})),
            threads)
    else:
        lowres, guide = split_rasters(rasters or [])
        report = opt.run_command("upsample", quiet, lambda progress: upsample_raster(
            lowres if len(lowres) > 1 else lowres[0], guide, out, progress=progress,
            **options), threads)
    if not quiet:
        paths = report.extra.get("paths") or [os.fspath(out)]
        written = paths[0] if len(paths) == 1 else f"{len(paths)} outputs ({', '.join(paths)})"
        typer.echo(f"wrote {written}: {report.seconds:.1f} s "
                   f"({opt.rate_text(report.megapixels, report.seconds)}), "
                   f"{report.computed} tiles computed, "
                   f"{report.skipped} skipped", err=True)


def split_rasters(rasters: list[str]) -> tuple[list[str], str]:
    """``(low-res rasters, guide)`` from the positional arguments ``LOWRES... GUIDE``, glob
    patterns among the low-res ones expanded (sorted); a pattern matching nothing, or fewer
    than two arguments, is an error saying what to pass."""
    if len(rasters) < 2:
        raise typer.BadParameter("give the low-res raster(s), then the guide: geoupsample "
                                 "upsample LOWRES [LOWRES...] GUIDE -o OUT (or a time series: "
                                 "--series PAIRS)",
                                 param_hint="LOWRES... GUIDE")
    lowres: list[str] = []
    for item in rasters[:-1]:
        if any(c in item for c in "*?[") and not os.path.exists(item):
            matched = sorted(glob.glob(item))
            if not matched:
                raise typer.BadParameter(f"the pattern {item!r} matches no file",
                                         param_hint="LOWRES... GUIDE")
            lowres.extend(matched)
        else:
            lowres.append(item)
    return lowres, rasters[-1]


upsample_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``upsample`` to the CLI."""
    app.command("upsample", help=HELP)(upsample_command)
