"""The option groups shared by the commands and the Python and xarray APIs, each declared once.

- :class:`TilingOptions`: how a whole scene is cut into tiles and run (``tile``, ``halo``,
  ``blocksize``, ``workers``, ``threads``, ``scheduler``, ``resume``, ``aoi``, ``aoi_crs``);
- :class:`OutputOptions`: how the output raster is written (``dtype``, ``compress``, ``cog``);
- :class:`RenderOptions`: the render of the upsampled values (``kind``, ``consistency``,
  ``self_guidance``, ``min_sigma_r``).

Each field's help text is written once, in the field's metadata (:func:`field_help`): the CLI's
options of the same names (``--tile``, ``--min-sigma-r``...) take their help from it. The scene
functions (:func:`~geoupsample.pipeline.upsample_raster`,
:func:`~geoupsample.featuremaps.features_raster`,
:func:`~geoupsample.segmentation.segment_raster`,
:func:`~geoupsample.prediction.predict_raster`,
:func:`~geoupsample.time_series.upsample_series`) and the xarray functions
(:mod:`geoupsample.xarray`) take the groups as objects (``tiling_options=``,
``output_options=``, ``render_options=``) beside the flat keywords of the same fields::

    from geoupsample.options import OutputOptions, RenderOptions, TilingOptions
    from geoupsample.pipeline import upsample_raster

    tiling = TilingOptions(tile=2048, halo=64, resume=True)
    upsample_raster("probs_10m.tif", "image_2m.tif", "probs_2m.tif",
                    tiling_options=tiling, output_options=OutputOptions(cog=True),
                    render_options=RenderOptions(consistency=0, min_sigma_r=0))
    # the same as upsample_raster(..., tile=2048, halo=64, resume=True, cog=True,
    #                              consistency=0, min_sigma_r=0)

A field left None is the function's own default (as if its keyword were left out: defaults
differ by command, e.g. ``tile`` 1024 for upsample and 512 for features); a field given counts
as the keyword of its name. Giving the keyword too, with another value, is an
:class:`~geoupsample.inputs.InputError` naming both; a field the function has no use for (a
``dtype`` for segment, ``workers`` for the lazy xarray functions) is refused the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class OptionGroup:
    """What the three groups share: the name of the parameter the functions take them by,
    their fields' help, and the fields a group sets."""

    #: The keyword-only parameter through which the functions take the group.
    parameter: ClassVar[str]

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of the field ``name`` (see :func:`field_help`)."""
        return field_help(cls, name)

    def set_fields(self) -> dict[str, Any]:
        """The fields given (not None), by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) is not None}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TilingOptions(OptionGroup):
    """How a whole scene is cut into tiles, where they run, what is skipped and what is
    resumed.

    Sizes are in output pixels (the guide's or the scene's: the full-resolution grid), not in
    low-res cells; tile cores are aligned to the scale (upsample) or to the backbone's or
    model's output cells (features, segment, predict). ``aoi`` is, in Python, also a shapely
    geometry (in the output's CRS unless ``aoi_crs`` says otherwise) or a GeoJSON dict;
    ``scheduler`` also a ``dask.distributed.Client``. ``workers``, ``threads``, ``scheduler``
    and ``resume`` are the file-writing functions' (not the lazy xarray functions', whose tiles
    run where the result is computed).

    Each field's help, what the CLI's ``--help`` prints for the option of its name, is in the
    field's metadata: ``TilingOptions.help("halo")``; ``help(TilingOptions)`` lists them all.
    """

    parameter: ClassVar[str] = "tiling_options"

    tile: int | None = field(default=None, metadata={"help": "Tile core size in output pixels."})
    halo: int | None = field(default=None, metadata={"help": (
        "Context and blend width around each tile (output pixels). upsample's interpolations "
        "use only what their support needs and crop instead of blending (the same pixels as "
        "one whole-array run).")})
    blocksize: int | None = field(default=None, metadata={"help": (
        "Output block (GeoTIFF tile, Zarr chunk) size, a multiple of 16.")})
    workers: int | None = field(default=None, metadata={"help": (
        "Tiles computed at once by local threads (default: all cores for "
        "bilinear/bicubic/nearest, 1 for fits and backbones, which use every core inside a "
        "tile). With more, each tile gets cores/workers torch threads and its own memory "
        "(about 0.6 GB per 1024 px gsjbu tile): often faster where memory allows.")})
    threads: int | None = field(default=None, metadata={"help": (
        "CPU threads of the run in all (computation and compression; default: the CPUs this "
        "process may use, from its affinity and cgroup quota). On a machine shared with other "
        "jobs, give it its share.")})
    scheduler: Any = field(default=None, metadata={"help": (
        "dask.distributed scheduler address (e.g. tcp://host:8786); default: local threads.")})
    resume: bool | None = field(default=None, metadata={"help": (
        "Continue an interrupted run with the same inputs and parameters; an output the same "
        "run already finished is left as it is.")})
    aoi: Any = field(default=None, metadata={"help": (
        "Area of interest: GeoJSON (EPSG:4326 unless it names a CRS) or any one-layer vector "
        "file GDAL reads (GeoPackage, Shapefile...), by path, URL or GDAL /vsi path; pixels "
        "outside are nodata, tiles outside are skipped.")})
    aoi_crs: Any = field(default=None, metadata={"help": (
        "CRS of the AOI's coordinates (e.g. EPSG:32631), overriding what the file says (a "
        "GeoJSON without a 'crs' member is read as lon/lat WGS 84).")})

    def __post_init__(self) -> None:
        from geoupsample.inputs import InputError
        from geoupsample.workers import check_threads, check_workers

        try:  # the functions' own checks, with their messages
            check_threads(self.threads)
            check_workers(self.workers, self.scheduler)
        except ValueError as err:
            raise InputError(str(err)) from None


@dataclass(frozen=True, kw_only=True)
class OutputOptions(OptionGroup):
    """How the output raster is written: its data type, compression and layout.

    ``dtype`` is a numpy dtype name; which ones a command takes and its default differ: any for
    upsample (default the low-res raster's; integer outputs are rounded and clipped),
    ``float32`` or ``float16`` for features, ``uint8`` (probabilities x 254, nodata 255) or
    ``float32`` for predict; segment's class raster is always uint8 (its kept probabilities'
    type is ``probs_dtype``). ``compress`` and ``cog`` apply to GeoTIFF outputs.

    Each field's help (the CLI's) is in the field's metadata: ``OutputOptions.help("cog")``;
    ``help(OutputOptions)`` lists them all.
    """

    parameter: ClassVar[str] = "output_options"

    dtype: str | None = field(default=None, metadata={"help": (
        "Output dtype: uint8, uint16, int16, uint32, int32, float16, float32, float64 "
        "(default: the low-res dtype; float64 -> float32).")})
    compress: str | None = field(default=None, metadata={"help": "deflate, zstd, lzw or none."})
    cog: bool | None = field(default=None, metadata={"help": "Write Cloud-Optimized GeoTIFFs."})


@dataclass(frozen=True, kw_only=True)
class RenderOptions(OptionGroup):
    """The render of the upsampled values: overrides of the defaults that the kind of raster
    sets (:meth:`geoupsample.Kernels.render`, :mod:`geoupsample.core.presets`).

    ``consistency`` is a number of back-projection rounds (a fraction is one damped round);
    ``self_guidance`` a weight (0 = off), ``min_sigma_r`` a floor on the range sigmas in
    normalised guide units; both apply to the kernels of ``jbu``/``gsjbu`` only. ``kind`` is
    upsample's (features are continuous; segment and predict upsample probabilities).

    Each field's help (the CLI's) is in the field's metadata: ``RenderOptions.help("consistency")``;
    ``help(RenderOptions)`` lists them all.
    """

    parameter: ClassVar[str] = "render_options"

    kind: str | None = field(default=None, metadata={"help": (
        "What the low-res raster holds, for the jbu/gsjbu render defaults: probabilities get "
        "label-safe ones (auto: bands summing to one value, e.g. 1, 100 or 255, are "
        "probabilities, rendered as fractions and written back in that unit).")})
    consistency: float | None = field(default=None, metadata={"help": (
        "Back-projection rounds: the output averages back to the low-res values over each cell "
        "(default 2 for continuous rasters, 1 for probabilities, 0 for the interpolations; 0 "
        "renders the pure kernels).")})
    self_guidance: float | None = field(default=None, metadata={"help": (
        "jbu/gsjbu: weight of the low-res values themselves in the range term (default 1 for "
        "probabilities, 0 otherwise; 0 = colour only, which lets labels follow colour edges "
        "they do not share).")})
    min_sigma_r: float | None = field(default=None, metadata={"help": (
        "jbu/gsjbu: floor on the kernels' range sigmas, in normalised guide units (default 0.3 "
        "for probabilities, 0 otherwise). --min-sigma-r 0 --consistency 0 is the sharp "
        "render.")})

    def __post_init__(self) -> None:
        from geoupsample.core.kernels import render_overrides
        from geoupsample.core.presets import check_kind
        from geoupsample.inputs import InputError

        try:  # the functions' own checks, with their messages
            if self.kind is not None:
                check_kind(self.kind)
            render_overrides(self.consistency, self.self_guidance, self.min_sigma_r)
        except (TypeError, ValueError) as err:
            raise InputError(str(err)) from None


#: The groups, in the order the functions take them.
GROUPS: tuple[type[OptionGroup], ...] = (TilingOptions, OutputOptions, RenderOptions)


def _document_fields(group: type[OptionGroup]) -> None:
    """Append the fields' help to ``group``'s docstring at run time (an ``Attributes:``
    section: what ``help()`` and IDEs show), so that it is still written once."""
    lines = ["", "", "    Attributes:"]
    for f in dataclasses.fields(group):  # type: ignore[arg-type]
        lines += textwrap.wrap(f"{f.name}: {f.metadata['help']}", width=96,
                               initial_indent=" " * 8, subsequent_indent=" " * 12)  # fmt: skip
    group.__doc__ = (group.__doc__ or "").rstrip() + "\n".join(lines) + "\n"


for _group in GROUPS:
    _document_fields(_group)


def field_help(group: type[OptionGroup], name: str) -> str:
    """The help text of ``group``'s field ``name``, from its metadata: what the CLI's option
    of that name (underscores as dashes) prints."""
    for f in dataclasses.fields(group):  # type: ignore[arg-type]
        if f.name == name:
            return str(f.metadata["help"])
    raise KeyError(f"{group.__name__} has no field {name!r}")


def _same(a: Any, b: Any) -> bool:
    """Whether a keyword's value and a group's field's are the same value."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # arrays, geometries without a truth value: not the same object
        return False


def takes_option_groups(*groups: type[OptionGroup]) -> Callable[[F], F]:
    """Decorate a function that takes the flat keywords of ``groups``' fields and, keyword-only
    and None by default, each group's :attr:`~OptionGroup.parameter` (``tiling_options=``...):
    a group object given is expanded into the keywords of its fields that are set before the
    call, so that the function itself reads only the flat keywords.

    The function's signature (``inspect.signature``, ``help()``, the API reference) is its own:
    the group parameters are declared in it. A field the function has no parameter for, given
    in a group, is refused, and so is a field given both in a group and as a keyword (or
    positionally) with another value; both with :class:`~geoupsample.inputs.InputError`. The
    fields a function takes, by group, are its ``option_groups`` attribute.

    Put it outermost (above :func:`geoupsample.workers.within_threads`): the decorators below
    see the expanded keywords.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        params = signature.parameters
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        taken: dict[type[OptionGroup], tuple[str, ...]] = {}
        for group in groups:
            p = params.get(group.parameter)
            if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is not None:
                raise TypeError(f"{fn.__qualname__} must declare the keyword-only parameter "
                                f"{group.parameter}=None to take {group.__name__}")
            taken[group] = tuple(f.name for f in dataclasses.fields(group)  # type: ignore[arg-type]
                                 if f.name in params and params[f.name].kind in named)  # fmt: skip

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            objects = [(g, kwargs.pop(g.parameter, None)) for g in groups]
            if all(obj is None for _, obj in objects):
                return fn(*args, **kwargs)
            given = signature.bind_partial(*args, **kwargs).arguments
            for group, obj in objects:
                if obj is not None:
                    kwargs.update(_expanded(fn.__name__, group, obj, taken[group], given))
            return fn(*args, **kwargs)

        call.option_groups = taken  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate


def _expanded(function: str, group: type[OptionGroup], obj: Any, taken: tuple[str, ...],
              given: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The keywords that ``obj`` (a ``group``) adds to a call of ``function`` whose arguments
    are ``given``; :class:`~geoupsample.inputs.InputError` for another type, a field the
    function does not take, or a field given as a keyword too with another value."""
    from geoupsample.inputs import InputError

    if not isinstance(obj, group):
        raise InputError(f"{group.parameter} takes a geoupsample.options.{group.__name__}, got "
                         f"{type(obj).__name__}: give {group.parameter}={group.__name__}(...)")
    out = {}
    for name, value in obj.set_fields().items():
        if name not in taken:
            takes = ", ".join(taken) or "none of its fields"
            raise InputError(f"{function} takes no {name} ({group.parameter}="
                             f"{group.__name__}({name}={value!r})); of {group.__name__} it "
                             f"takes {takes}: leave {name} out")
        if name in given:
            if not _same(given[name], value):
                raise InputError(f"{name}={given[name]!r} and {group.parameter}="
                                 f"{group.__name__}({name}={value!r}) disagree: give {name} "
                                 f"once, as a keyword or in {group.parameter}")
            continue
        out[name] = value
    return out
