"""What the tiled commands (``upsample``, ``features``, ``segment``) share: each option defined
once (typer ``Annotated`` aliases; a command sets its own default), the progress bar, and which
errors are the user's to fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")


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


# --- upsampling ---------------------------------------------------------------------------
MethodOption = Annotated[Method, typer.Option("--method", "-m", help="Upsampling method.")]
ItersOption = Annotated[int, typer.Option(help="GSJBU fit steps per tile (gsjbu only).")]
RadiusOption = Annotated[int, typer.Option(help="Kernel radius in low-res pixels (jbu/gsjbu).")]
ConsistencyOption = Annotated[float | None, typer.Option(
    help="Back-projection rounds: the output averages back to the low-res values over each "
         "cell (default 2 for continuous rasters, 1 for probabilities, 0 for the "
         "interpolations; 0 renders the pure kernels).")]
FeatureConsistencyOption = Annotated[float | None, typer.Option(
    help="Back-projection rounds: the upsampled features average back to the low-res features "
         "over each cell (default 2 for gsjbu and jbu, 0 for the interpolations; 0 renders the "
         "pure kernels).")]
SelfGuidanceOption = Annotated[float | None, typer.Option(
    help="jbu/gsjbu: weight of the low-res values themselves in the range term (default 1 for "
         "probabilities, 0 otherwise; 0 = colour only, which lets labels follow colour edges "
         "they do not share).")]
MinSigmaROption = Annotated[float | None, typer.Option(
    help="jbu/gsjbu: floor on the kernels' range sigmas, in normalised guide units (default "
         "0.3 for probabilities, 0 otherwise). --min-sigma-r 0 --consistency 0 is the sharp "
         "render.")]
DeviceOption = Annotated[str | None, typer.Option(
    help="Torch device of the fits and backbones: cpu, cuda or cuda:N (default: cuda when "
         "available).")]

# --- tiling and output --------------------------------------------------------------------
TileOption = Annotated[int, typer.Option(help="Tile core size in output pixels.")]
HaloOption = Annotated[int, typer.Option(
    help="Context and blend width around each tile (output pixels). upsample's "
         "interpolations use only what their support needs and crop instead of blending "
         "(the same pixels as one whole-array run).")]
FeatureHaloOption = Annotated[int, typer.Option(
    "--halo", help="Context and blend width around each tile (output pixels): the backbone and "
                   "the fit see this much beyond the tile, and neighbouring tiles' overlaps are "
                   "blended (raised cosine), so that no seam shows.")]
CompressOption = Annotated[str, typer.Option(help="deflate, zstd, lzw or none.")]
CogOption = Annotated[bool, typer.Option(help="Write Cloud-Optimized GeoTIFFs.")]
BlocksizeOption = Annotated[int, typer.Option(
    help="Output block (GeoTIFF tile, Zarr chunk) size, a multiple of 16.")]
AoiOption = Annotated[str | None, typer.Option(
    help="Area of interest: GeoJSON (EPSG:4326 unless it names a CRS) or any one-layer vector "
         "file GDAL reads (GeoPackage, Shapefile...), by path, URL or GDAL /vsi path; pixels "
         "outside are nodata, tiles outside are skipped.")]
AoiCrsOption = Annotated[str | None, typer.Option(
    help="CRS of the AOI's coordinates (e.g. EPSG:32631), overriding what the file says (a "
         "GeoJSON without a 'crs' member is read as lon/lat WGS 84).")]
ResumeOption = Annotated[bool, typer.Option(
    help="Continue an interrupted run with the same inputs and parameters; an output the "
         "same run already finished is left as it is.")]
SchedulerOption = Annotated[str | None, typer.Option(
    help="dask.distributed scheduler address (e.g. tcp://host:8786); default: local threads.")]
WorkersOption = Annotated[int | None, typer.Option(
    min=1, help="Tiles computed at once by local threads (default: all cores for "
                "bilinear/bicubic/nearest, 1 for fits and backbones, which use every core "
                "inside a tile). With more, each tile gets cores/workers torch threads and its "
                "own memory (about 0.6 GB per 1024 px gsjbu tile): often faster where memory "
                "allows.")]
ThreadsOption = Annotated[int | None, typer.Option(
    min=1, help="CPU threads of the run in all (computation and compression; default: the CPUs "
                "this process may use, from its affinity and cgroup quota). On a machine shared "
                "with other jobs, give it its share.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]

# --- backbones (features, segment) --------------------------------------------------------
BackboneOption = Annotated[str, typer.Option(
    help="'spectral' or 'timm:<model>' (e.g. timm:vit_small_patch14_dinov2).")]
WeightsOption = Annotated[Path | None, typer.Option(
    help="Weight file for a timm model (safetensors or state dict).")]
PretrainedOption = Annotated[bool, typer.Option(
    help="Use the model's weights from your Hugging Face cache (offline).")]
RandomInitOption = Annotated[bool, typer.Option(
    "--random-init", help="Random weights (smoke tests only).")]
LayerOption = Annotated[int, typer.Option(
    help="Transformer block or CNN stage (timm out_indices; -1 = last).")]
BandsOption = Annotated[str | None, typer.Option(
    help="Scene bands to use: 1-based indexes or descriptions (default: all).")]
BandNamesOption = Annotated[str | None, typer.Option(
    help="Names of the scene's bands, one per band of the file in order (e.g. "
         "red,green,blue,nir), for files without band descriptions: spectral's indices (NDVI, "
         "NDWI) need the red, nir and green bands by name; --bands may then use them.")]
ModelBandsOption = Annotated[str | None, typer.Option(
    help="Which of those a timm model sees (e.g. red,green,blue); default all.")]
AdaptStemOption = Annotated[bool, typer.Option(
    help="Adapt a 3-band stem to the bands fed (timm in_chans).")]
CellSizeOption = Annotated[int, typer.Option(help="Cell size in pixels (spectral).")]
ContextOption = Annotated[int, typer.Option(
    help="Rings of neighbouring cells over which the cell statistics are also averaged, as "
         "extra features (spectral; 0: each cell's own statistics only).")]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: printed as ``error: ...``, exit status 2."""
    from rasterio.errors import RasterioError

    from geoupsample.backbones import WeightsNotFoundError
    from geoupsample.inputs import InputError
    from tiling import JournalMismatch

    return (InputError, JournalMismatch, WeightsNotFoundError, OSError, RasterioError,
            ValueError, TypeError)  # fmt: skip


def rate_text(megapixels: float, seconds: float) -> str:
    """``"12.4 MP, 0.85 MP/s"``; a slow run in kilopixels (``"0.3 MP, 41 kpx/s"``), not
    ``0.00 MP/s``."""
    rate = megapixels / seconds if seconds > 0 else 0.0
    speed = f"{rate:.2f} MP/s" if rate >= 0.1 or rate == 0 else f"{rate * 1e3:.3g} kpx/s"
    return f"{megapixels:.3g} MP, {speed}"


class ProgressBar:
    """A tqdm bar on stderr fed by :class:`tiling.Progress` callbacks; it appears with the first
    tile (not before: an input error leaves no empty bar) and never when ``quiet``."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc, self.quiet, self.bar = desc, quiet, None

    @property
    def callback(self) -> Callable[[Any], None] | None:
        return None if self.quiet else self._update

    def _update(self, p: Any) -> None:  # p: tiling.Progress
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="tile", desc=self.desc, dynamic_ncols=True,
                            file=sys.stderr)  # fmt: skip
        self.bar.total = p.total
        self.bar.n = p.done
        self.bar.set_postfix_str(rate_text(p.megapixels, p.seconds), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED_STATUS = 130

#: What a run stopped by Ctrl-C says: its finished part is kept beside the output.
INTERRUPTED_MESSAGE = ("interrupted: the finished part of the output is kept; rerun the same "
                       "command with --resume to continue")


def run_command(desc: str, quiet: bool, work: Callable[[Callable[[Any], None] | None], T],
                threads: int | None = None) -> T:  # fmt: skip
    """Run ``work(progress)`` under a progress bar, on ``threads`` CPU threads (``--threads``;
    None: the CPUs this process may use); a user error (:func:`user_errors`) is printed as
    ``error: ...`` and exits with status 2, Ctrl-C says how to continue (``--resume``) and
    exits with status 130, with the bar closed first."""
    from geoupsample.workers import cpu_threads

    bar = ProgressBar(desc, quiet)
    try:
        with cpu_threads(threads):
            return work(bar.callback)
    except user_errors() as err:
        bar.close()
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        bar.close()
        typer.echo(INTERRUPTED_MESSAGE, err=True)
        raise typer.Exit(INTERRUPTED_STATUS) from None
    finally:
        bar.close()
