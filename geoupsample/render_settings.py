"""The render settings of a whole-scene run, decided once for the scene so that tiles agree:
the user's overrides (validated), the kind of raster (``auto`` resolved from a sample), and the
unit of self-guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from geoupsample.core import presets
from geoupsample.core.kernels import render_overrides
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.core.self_guidance import robust_span
from geoupsample.inputs import InputError, decimated_stats_sample


def checked_overrides(method: str, **overrides: float | None) -> dict[str, float]:
    """:func:`~geoupsample.core.kernels.render_overrides` of ``method``'s run, validated;
    ``InputError`` for a bad value, or for kernel settings (``self_guidance``, ``min_sigma_r``)
    given to an interpolation, which has no kernels to apply them to."""
    try:
        render = render_overrides(**overrides)
    except (TypeError, ValueError) as err:
        raise InputError(str(err)) from err
    kernel_only = sorted(set(render) - {"consistency"})
    if method in INTERPOLATIONS and kernel_only:
        raise InputError(f"only jbu and gsjbu use {' and '.join(kernel_only)}; {method} has no "
                         "kernels: leave it out or use method gsjbu")
    return render


#: Longest side, in cells, of the decimated sample of a low-res raster that decides its kind.
SAMPLE_SIDE = 1024


def lowres_sample(read: Callable[[Window], np.ndarray], window: Window) -> torch.Tensor:
    """A regular subsample (at most :data:`SAMPLE_SIDE` cells a side) of ``window`` of a
    low-res raster read by ``read(window) -> float32 [bands, rows, cols]`` (NaN = nodata), window
    by window (:func:`~geoupsample.inputs.decimated_stats_sample`): the same cells whether the
    raster is a file or an array, so the CLI and the xarray API decide alike."""
    win = window.round_offsets().round_lengths()

    def read_within(w: Window) -> np.ndarray:
        return read(Window(win.col_off + w.col_off, win.row_off + w.row_off, w.width, w.height))

    sample = decimated_stats_sample(read_within, int(win.height), int(win.width), SAMPLE_SIDE)
    return torch.from_numpy(sample)


@dataclass(frozen=True)
class SceneRender:
    """How every tile of a scene renders.

    Attributes:
        arguments: ``gu.upsample`` keyword arguments: the overrides, ``kind`` and, where
            self-guidance applies, ``self_guidance_scale`` (1 for probabilities).
        unit: for probabilities stored as fractions of ``unit`` (e.g. 255 for uint8): tiles
            divide the low-res values by it before rendering and multiply the output back;
            None otherwise (or 1).
    """

    arguments: dict[str, Any]
    unit: float | None = None
    #: For probabilities with a nodata value: the tiles read the values as stored and take as
    #: missing only the cells whose channels all hold it (:func:`missing_cells`); None: nodata
    #: is applied band by band as it is read.
    cell_nodata: float | None = None


def missing_values(x: torch.Tensor, nodata: float | None) -> torch.Tensor:
    """A sample ``x [C, h, w]`` with NaN wherever a value equals ``nodata`` (band by band, as
    :func:`tiling.reader.to_float` reads arrays)."""
    if nodata is None or math.isnan(nodata):
        return x
    return x.masked_fill(x == nodata, float("nan"))


def missing_cells(x: np.ndarray | torch.Tensor, nodata: float | None) -> Any:
    """``x [C, h, w]`` (class probabilities as stored) with NaN in every channel of the cells
    whose channels all equal ``nodata``. A probability raster's nodata marks cells, not single
    values: with uint8 probabilities x 255 and nodata 255 (or 0) a class that is certain (or
    impossible) holds the nodata value in its own band, and masking band by band would drop it
    (the other classes' zeros would then win the cell)."""
    if nodata is None or math.isnan(nodata):
        return x
    if isinstance(x, torch.Tensor):
        return x.masked_fill((x == nodata).all(-3, keepdim=True), float("nan"))
    return np.where((x == nodata).all(-3, keepdims=True), np.float32(np.nan), x)


def declared_unit(tags: Mapping[str, Any]) -> float | None:
    """The probability unit a raster's tags declare: ``probability_scale`` (the factor from
    stored values to probabilities, as ``geoupsample segment --probs`` writes it) inverted."""
    value = tags.get("probability_scale")
    try:
        scale = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return 1.0 / scale if scale and math.isfinite(scale) and scale > 0 else None


def scene_render(method: str, kind: str, sample: Callable[[], torch.Tensor],
                 unit: float | None = None, nodata: float | None = None,
                 **overrides: float | None) -> SceneRender:
    """The tiles' rendering, decided once for the scene so that tiles agree.

    Args:
        method: the upsampling method (the interpolations take ``consistency`` and ``kind``).
        kind: ``auto`` (resolved here from the sample), ``continuous`` or ``probabilities``.
        sample: returns a decimated sample of the low-res raster ``[C, h', w']`` float, NaN as
            nodata; called only when needed (``auto``, probabilities, or self-guidance on a
            continuous raster, whose unit is then the sample's robust span).
        unit: the probability unit the raster declares (:func:`declared_unit`), if any.
            Otherwise probabilities are recognised by their channels summing to one value: 1
            for fractions, 255 for 8-bit storage... (:func:`presets.probability_unit`).
        nodata: the raster's nodata value when ``sample`` returns the values as stored (NaN
            only where they are NaN or masked): probabilities take as missing the cells whose
            channels all hold it (:attr:`SceneRender.cell_nodata`), other rasters every value
            that equals it. None: ``sample`` has applied the nodata value already.
        overrides: ``consistency``, ``self_guidance``, ``min_sigma_r`` (None = the default).

    Raises:
        InputError: bad overrides, or ``kind="probabilities"`` for a raster whose channels do
            not sum to one value.
    """
    render: dict[str, Any] = checked_overrides(method, **overrides)
    try:
        presets.check_kind(kind)
    except ValueError as err:
        raise InputError(str(err)) from err
    x = stored = None
    if kind in ("auto", "probabilities") or render.get("self_guidance"):
        stored = sample()
        x = missing_cells(stored, nodata)
    if kind != "continuous":
        if unit is not None:  # a stale tag (values rescaled since) would scale the output wrongly
            try:
                presets.check_probabilities(x / unit)
            except ValueError as err:
                raise InputError(
                    f"the raster's probability_scale tag declares probabilities in units of "
                    f"{unit:g}, but its values do not fit that: {err}. Fix or remove the tag "
                    "(gdal_edit.py -mo probability_scale=)"
                ) from err
        unit = unit or presets.probability_unit(x)
        if kind == "probabilities" and unit is None:
            try:
                presets.check_probabilities(x)  # names what is wrong
            except ValueError as err:
                raise InputError(str(err)) from err
            unit = 1.0
        kind = "probabilities" if unit is not None else "continuous"
    render["kind"] = kind
    if kind == "probabilities":  # (interpolations: the kind only keeps them on [0, 1])
        if method not in INTERPOLATIONS:
            render["self_guidance_scale"] = 1.0  # the same unit in every tile
        cell_nodata = None if nodata is None or math.isnan(nodata) else float(nodata)
        return SceneRender(render, None if unit == 1.0 else unit, cell_nodata)
    if render.get("self_guidance"):  # the scene's span, not each tile's: tiles agree
        render["self_guidance_scale"] = robust_span(missing_values(stored, nodata))
    return SceneRender(render)
