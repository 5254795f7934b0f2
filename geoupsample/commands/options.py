"""What the tiled commands (``upsample``, ``features``, ``segment``, ``predict``) share: each
option defined once (typer ``Annotated`` aliases; a command sets its own default), the progress
bar, and which errors are the user's to fix.

The options of the groups shared with the Python and xarray APIs (tiling, output, render:
:mod:`geoupsample.options`) take their help from the group's field (:func:`cli_option`); where a
command's option means something else, its own text is declared here (:data:`HELP_OVERRIDES`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from geoupsample.options import OptionGroup, OutputOptions, RenderOptions, TilingOptions

T = TypeVar("T")


def cli_option(group: type[OptionGroup], name: str, *param_decls: str, help: str | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
    """The ``typer.Option`` of ``group``'s field ``name`` (the option ``--name``, underscores
    as dashes), its help the field's (:func:`geoupsample.options.field_help`) unless a
    command's own ``help`` (one of :data:`HELP_OVERRIDES`) is given."""
    text = help if help is not None else group.help(name)
    return typer.Option(*param_decls, help=text, **kwargs)


# --- where a command's option of a shared group means more than the group's field says -------
FEATURES_HALO_HELP = (
    "Context and blend width around each tile (output pixels): the backbone and the fit see "
    "this much beyond the tile, and neighbouring tiles' overlaps are blended (raised cosine), "
    "so that no seam shows.")
FEATURES_CONSISTENCY_HELP = (
    "Back-projection rounds: the upsampled features average back to the low-res features "
    "over each cell (default 2 for gsjbu and jbu, 0 for the interpolations; 0 renders the "
    "pure kernels).")
FEATURES_DTYPE_HELP = "Output dtype (float16: half the size, ~3 digits)."
FEATURES_COMPRESS_HELP = "deflate, zstd, lzw (GeoTIFF only) or none."
PREDICT_DTYPE_HELP = "uint8 (p x 254, 255 nodata) or float32."

#: The commands' own help for an option of a shared group, by ``(command, field)``; every
#: other command's option of that field has the group's help (tests/test_option_groups.py).
HELP_OVERRIDES: dict[tuple[str, str], str] = {
    ("features", "halo"): FEATURES_HALO_HELP,
    ("segment", "halo"): FEATURES_HALO_HELP,
    ("features", "consistency"): FEATURES_CONSISTENCY_HELP,
    ("features", "dtype"): FEATURES_DTYPE_HELP,
    ("features", "compress"): FEATURES_COMPRESS_HELP,
    ("predict", "dtype"): PREDICT_DTYPE_HELP,
}


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
ConsistencyOption = Annotated[float | None, cli_option(RenderOptions, "consistency")]
FeatureConsistencyOption = Annotated[float | None, cli_option(
    RenderOptions, "consistency", help=FEATURES_CONSISTENCY_HELP)]
SelfGuidanceOption = Annotated[float | None, cli_option(RenderOptions, "self_guidance")]
MinSigmaROption = Annotated[float | None, cli_option(RenderOptions, "min_sigma_r")]
DeviceOption = Annotated[str | None, typer.Option(
    help="Torch device of the fits and backbones: cpu, cuda or cuda:N (default: cuda when "
         "available).")]

# --- tiling and output (geoupsample.options) ----------------------------------------------
TileOption = Annotated[int, cli_option(TilingOptions, "tile")]
HaloOption = Annotated[int, cli_option(TilingOptions, "halo")]
FeatureHaloOption = Annotated[int, cli_option(TilingOptions, "halo", "--halo",
                                              help=FEATURES_HALO_HELP)]
CompressOption = Annotated[str, cli_option(OutputOptions, "compress")]
FeatureCompressOption = Annotated[str, cli_option(OutputOptions, "compress",
                                                  help=FEATURES_COMPRESS_HELP)]
CogOption = Annotated[bool, cli_option(OutputOptions, "cog")]
BlocksizeOption = Annotated[int, cli_option(TilingOptions, "blocksize")]
AoiOption = Annotated[str | None, cli_option(TilingOptions, "aoi")]
AoiCrsOption = Annotated[str | None, cli_option(TilingOptions, "aoi_crs")]
ResumeOption = Annotated[bool, cli_option(TilingOptions, "resume")]
SchedulerOption = Annotated[str | None, cli_option(TilingOptions, "scheduler")]
WorkersOption = Annotated[int | None, cli_option(TilingOptions, "workers", min=1)]
ThreadsOption = Annotated[int | None, cli_option(TilingOptions, "threads", min=1)]
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
