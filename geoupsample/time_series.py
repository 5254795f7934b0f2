"""Time series of scenes: dates each with a guide and a low-res raster, upsampled in one pass.

Each tile fits the first date's kernels as :func:`~geoupsample.pipeline.upsample_raster` does,
then each later date's with :data:`~geoupsample.core.series.WARM_ITERS` steps (half the
default) from halfway between the initial kernels and the same tile's kernels of the date
before (:mod:`geoupsample.core.series` says why halfway). Where a pixel of the guide has not
changed since the date before, a continuous raster's output keeps the previous date's detail and
takes only the smooth change of the low-res raster (:func:`~geoupsample.core.series.carry_forward`):
outputs then change from date to date no more than bilinear's where the image does not. Every
date is written to its own output (``-o out/{date}.tif``) or all to one stacked output.

The guides must share one grid (the same tile of each date is the same ground); so must the
low-res rasters. Real acquisitions rarely do: warp them onto one grid first. Each date's guide
is normalised by its own scene-wide statistics (acquisitions differ in brightness).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import tiling
from geoupsample.core.series import STABLE_TOLERANCE, WARM_ITERS
from geoupsample.inputs import InputError
from geoupsample.options import OutputOptions, RenderOptions, TilingOptions
from geoupsample.pipeline import SeriesOptions, upsample_raster


@dataclass(frozen=True)
class SeriesDate:
    """One date of a time series.

    Attributes:
        lowres: the date's low-res raster (path or URL).
        guide: the date's high-resolution guide (path or URL); all dates' on one grid.
        date: the date as text (``2020-08-31``; any text that sorts in time order), or None.
    """

    lowres: str
    guide: str
    date: str | None = None


def as_dates(dates: Iterable[SeriesDate | Sequence[str]]) -> list[SeriesDate]:
    """``dates`` as :class:`SeriesDate` (tuples ``(lowres, guide)`` or ``(date, lowres,
    guide)`` accepted), in time order when every date is given (else as given); clear errors for
    an empty series, a date given twice or dates on some rasters only."""
    out = []
    for item in dates:
        if isinstance(item, SeriesDate):
            out.append(item)
        elif len(item) == 2:
            out.append(SeriesDate(os.fspath(item[0]), os.fspath(item[1])))
        elif len(item) == 3:
            out.append(SeriesDate(os.fspath(item[1]), os.fspath(item[2]), str(item[0])))
        else:
            raise InputError(f"a time series date is (lowres, guide) or (date, lowres, guide), "
                             f"not {item!r}")
    if not out:
        raise InputError("the time series has no date")
    named = [d.date for d in out if d.date]
    if named and len(named) != len(out):
        raise InputError("some dates of the series have a date and some not: give every one a "
                         "date, or none (they are then taken in the order given)")
    if len(set(named)) != len(named):
        twice = sorted({d for d in named if named.count(d) > 1})
        raise InputError(f"the date {twice[0]} is given twice in the series")
    return sorted(out, key=lambda d: d.date) if named else out


def read_pairs(path: str | os.PathLike) -> list[SeriesDate]:
    """The dates of a pairs file: one date per line, ``date,lowres,guide`` or ``lowres,guide``
    (CSV; a header line naming ``lowres`` and ``guide`` is skipped; ``#`` comments and blank
    lines ignored). Relative paths are relative to the file's folder."""
    path = os.fspath(path)
    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f)
                    if row and any(c.strip() for c in row)
                    and not row[0].strip().startswith("#")]  # fmt: skip
    except OSError as err:
        raise InputError(f"cannot read the pairs file {path}: {err.strerror or err}") from None
    if rows and "lowres" in [c.lower() for c in rows[0]]:
        rows = rows[1:]
    here = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        if "://" in p or p.startswith("/vsi") or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(here, p))

    dates = []
    for n, row in enumerate(rows, 1):
        if len(row) not in (2, 3) or not all(row):
            raise InputError(f"{path}: line {n} ({','.join(row)}) is not date,lowres,guide or "
                             "lowres,guide")
        *date, lowres, guide = row
        dates.append(SeriesDate(resolve(lowres), resolve(guide), date[0] if date else None))
    return as_dates(dates)


def upsample_series(
    dates: Iterable[SeriesDate | Sequence[str]],
    out_path: str | os.PathLike,
    warm_iters: int = WARM_ITERS,
    stable_tolerance: float = STABLE_TOLERANCE,
    *,
    tiling_options: TilingOptions | None = None,
    output_options: OutputOptions | None = None,
    render_options: RenderOptions | None = None,
    **kwargs: Any,
) -> tiling.RunReport:
    """Upsample each date's low-res raster onto its own guide, the dates' kernels fitted in
    order, each from the date before (see the module docstring).

    Args:
        dates: :class:`SeriesDate` or ``(lowres, guide)`` / ``(date, lowres, guide)`` tuples
            (:func:`read_pairs` reads them from a file); sorted by date when dated.
        out_path: a pattern with ``{date}``, ``{stem}`` (the low-res file's name without its
            extension) or ``{index}`` (from 1): one output per date; or one path: every date's
            bands in one output, in date order.
        warm_iters: gsjbu fit steps of each date after the first (``iters`` for the first).
        stable_tolerance: guide change (largest band's, in units of the previous date's robust
            range) at which a pixel's output keeps ``exp(-1)`` of the previous date's detail
            (:func:`~geoupsample.core.series.stable_weight`); 0: each date rendered alone.
        tiling_options, output_options, render_options: the options of
            :mod:`geoupsample.options` as groups, as in
            :func:`~geoupsample.pipeline.upsample_raster`.
        **kwargs: as :func:`geoupsample.pipeline.upsample_raster` (``method``, ``iters``,
            ``tile``, ``aoi``, ``resume``, ``scheduler``...).

    Returns:
        :class:`tiling.RunReport` (``extra["paths"]``: the outputs). Each output's tags hold
        its guide and date (``geoupsample_guide``, ``geoupsample_date``) and the series'
        settings (``geoupsample_series``).
    """
    series = as_dates(dates)
    if int(warm_iters) < 0:
        raise InputError(f"warm_iters is {warm_iters}: give 0 or more fit steps per later date")
    if not float(stable_tolerance) >= 0:
        raise InputError(f"stable_tolerance is {stable_tolerance}: give 0 (off) or more")
    options = SeriesOptions(tuple(d.date for d in series) if series[0].date else None,
                            int(warm_iters), float(stable_tolerance))  # fmt: skip
    return upsample_raster([d.lowres for d in series], [d.guide for d in series],  # type: ignore[arg-type]
                           out_path, _series=options, tiling_options=tiling_options,
                           output_options=output_options, render_options=render_options,
                           **kwargs)  # fmt: skip
