"""``geoupsample upsample``: upsample a georeferenced low-res raster onto a guide's grid."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rasterio.errors import RasterioError

HELP = (
    "Upsample LOWRES (probabilities, features, a coarse band, elevation...) onto the grid of "
    "GUIDE (a high-resolution, e.g. multispectral, image), guided by GUIDE, into the GeoTIFF "
    "OUT.\n\n"
    "The output has the guide's CRS, transform and size, the low-res band descriptions and "
    "nodata, and tags recording the method and its parameters. It is written tile by tile with "
    "bounded memory and appears at OUT only when complete (--resume continues an interrupted "
    "run).\n\n"
    "Grids: LOWRES and GUIDE must be in the same CRS. Rasters in different CRSs are refused, "
    "not reprojected (the error shows a gdalwarp command that aligns LOWRES to GUIDE). The "
    "low-res pixel must be a whole multiple of the guide pixel, with the origins on the "
    "guide's pixel lattice."
)


class Method(str, Enum):
    gsjbu = "gsjbu"
    jbu = "jbu"
    bilinear = "bilinear"
    bicubic = "bicubic"
    nearest = "nearest"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items


class Kind(str, Enum):
    auto = "auto"
    continuous = "continuous"
    probabilities = "probabilities"


def upsample_command(
    lowres: Annotated[Path, typer.Argument(help="Low-res raster to upsample (any bands).")],
    guide: Annotated[Path, typer.Argument(help="High-res guide raster (same CRS, nesting "
                                               "grid).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output GeoTIFF path.")],
    method: Annotated[Method, typer.Option("--method", "-m", help="Upsampling method.")
                      ] = Method.gsjbu,
    iters: Annotated[int, typer.Option(help="GSJBU fit steps per tile (gsjbu only).")] = 50,
    radius: Annotated[int, typer.Option(help="Kernel radius in low-res pixels (jbu/gsjbu).")
                      ] = 3,
    tile: Annotated[int, typer.Option(help="Tile core size in guide pixels.")] = 1024,
    halo: Annotated[int, typer.Option(help="Context and blend width around each tile (guide "
                                           "pixels).")] = 64,
    bands: Annotated[str | None, typer.Option(help="Low-res bands to upsample: comma-separated "
                                                   "1-based indexes or band descriptions "
                                                   "(default: all).")] = None,
    guide_bands: Annotated[str | None, typer.Option(help="Guide bands to use, same syntax "
                                                         "(default: all).")] = None,
    aoi: Annotated[Path | None, typer.Option(help="GeoJSON area of interest (EPSG:4326 unless "
                                                  "it names a CRS); pixels outside are nodata, "
                                                  "tiles outside are skipped.")] = None,
    cog: Annotated[bool, typer.Option(help="Write a Cloud-Optimized GeoTIFF.")] = False,
    dtype: Annotated[str | None, typer.Option(help="Output dtype: uint8, uint16, int16, uint32, "
                                                   "int32, float16, float32, float64 (default: the "
                                                   "low-res dtype; float64 -> float32).")] = None,
    compress: Annotated[str, typer.Option(help="deflate, zstd, lzw or none.")] = "deflate",
    blocksize: Annotated[int, typer.Option(help="Output block (internal tile) size, a "
                                                "multiple of 16.")] = 256,
    device: Annotated[Device | None, typer.Option(help="Torch device for the fits (default: "
                                                       "cuda when available).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same inputs "
                                              "and parameters.")] = False,
    scheduler: Annotated[str | None, typer.Option(help="dask.distributed scheduler address "
                                                       "(e.g. tcp://host:8786); default: local "
                                                       "threads.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Tiles computed at once by local threads (default: all cores for "
                    "bilinear/bicubic/nearest, 1 for jbu/gsjbu, whose fits use every core "
                    "inside a tile). More fits at once get cores/workers torch threads each "
                    "and hold one tile's memory each (about 0.6 GB per 1024 px tile): "
                    "often faster where memory allows.")] = None,
    kind: Annotated[Kind | None, typer.Option(
        help="What the low-res raster holds, for the jbu/gsjbu render defaults: probabilities "
             "get label-safe ones (auto: float probabilities summing to 1 are detected).")
    ] = None,
    consistency: Annotated[float | None, typer.Option(help="Back-projection rounds (the output "
                                                           "averages back to the input over "
                                                           "each low-res cell; default 2 for "
                                                           "continuous, 1 for "
                                                           "probabilities, 0 for "
                                                           "interpolations).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    from geoupsample.pipeline import InputError, upsample_raster
    from tiling import JournalMismatch

    bar = None
    progress = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="tile", desc="upsample", dynamic_ncols=True, file=sys.stderr)

        def progress(p):  # noqa: ANN001 - tiling.Progress
            bar.total = p.total
            bar.n = p.done
            rate = p.megapixels / p.seconds if p.seconds > 0 else 0.0
            bar.set_postfix_str(f"{p.megapixels:.1f} MP, {rate:.2f} MP/s", refresh=False)
            bar.refresh()

    try:
        report = upsample_raster(
            lowres, guide, out, method=method.value, iters=iters, radius=radius, tile=tile,
            halo=halo, bands=_split(bands), guide_bands=_split(guide_bands), aoi=aoi, cog=cog,
            dtype=dtype, compress=compress, blocksize=blocksize,
            device=device.value if device else None, resume=resume, scheduler=scheduler,
            workers=workers, kind=(kind or Kind.auto).value, consistency=consistency,
            progress=progress)
    except (InputError, JournalMismatch, OSError, RasterioError,
            ValueError, TypeError) as err:
        if bar is not None:
            bar.close()
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if bar is not None:
        bar.close()
    if not quiet:
        typer.echo(f"wrote {os.fspath(out)}: {report.megapixels:.1f} MP in {report.seconds:.1f} s "
                   f"({report.mp_per_s:.2f} MP/s), {report.computed} tiles computed, "
                   f"{report.skipped} skipped", err=True)


upsample_command.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add ``upsample`` to the CLI."""
    app.command("upsample", help=HELP)(upsample_command)
