"""How a low-res raster's grid sits on a guide's grid, and the rules it must follow.

* Both rasters must be in the same CRS. Rasters in different CRSs are **refused** (not silently
  reprojected): resampling the low-res raster is a modelling choice (nearest for classes, average
  for probabilities...) that the user should make; the error message gives a ``gdalwarp`` command
  that puts the low-res raster on a grid nesting with the guide's, and the whole-scene pipeline
  warps it itself when told which resampling to use (``warp=``).
* The grids must nest: north-up, the low-res pixel a whole number or a simple fraction ``p / q``
  (``q <=`` :data:`MAX_SCALE_DENOMINATOR`) of guide pixels per axis, e.g. 4 for 10 m on 2.5 m or
  10/3 for 10 m on 3 m. The tolerance, :data:`GRID_TOLERANCE` (0.05 guide pixels of the scale's
  misfit accumulated across the raster), only absorbs round-off (10/3 m written as 3.333333)
  and the drift of co-registered products whose pixel sizes differ by 1e-4. With ``p / q``,
  every ``p`` guide pixels (``q`` low-res pixels) the two lattices meet again: tiles are aligned
  to that period, so each tile is an exact piece of the whole (a guide pixel belongs to the
  low-res cell holding its centre, see :mod:`geoupsample.core.layout`).
* The low-res origin may lie anywhere: on the guide's pixel lattice (within
  :data:`GRID_TOLERANCE`, which absorbs round-off), or off it by a fraction of a guide pixel, as
  a Landsat L1 product's 30 m bands lie half a 15 m pan pixel from the pan band's corner. Such a
  grid is used as it is, not resampled: its *shift* (``-0.5 < shift <= 0.5`` guide pixels per
  axis, :attr:`GridRelation.shift`) moves the cell centres in the method and in the
  interpolations, and each guide pixel goes to the cell whose footprint holds its centre.

A low-res raster that breaks these rules only by its grid (another CRS, a rotated grid, a
misaligned origin, a scale that is no simple fraction) raises :class:`GridMismatch`; the whole
scene pipeline can then warp it, with a resampling the user chooses, onto
:func:`nesting_grid`. Rasters that do not overlap at all are refused as such (a plain
:class:`~geoupsample.inputs.InputError`), whatever their CRSs: no warp would help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import array_bounds
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window, from_bounds

from geoupsample.inputs import InputError
from tiling.reader import Warp, check_resampling

#: Largest denominator of a fractional scale (10/3, 20/3, 25/3... are accepted).
MAX_SCALE_DENOMINATOR = 8

#: Misfit, in guide pixels, up to which a low-res grid still counts as nesting: of its origin,
#: and of its scale accumulated across the raster. It absorbs the round-off of transforms (a
#: 10/3 m pixel stored as 3.3333333 m on a 1 m guide drifts by 3e-8 guide pixels per cell: 3e-3
#: across 10^5 cells) and the tiny pixel-size differences of co-registered products: the
#: bundled Rotterdam pair (SpaceNet 6: 1.0000483 m multispectral, 0.4999935 m pan, 2.000123
#: guide pixels per cell) drifts by 0.037 guide pixels across its 300 cells, so a crop of it
#: 100 cells in has its origin 0.012 pixels off. A shift of a tenth of a pixel is no round-off
#: but another grid, which only a warp puts on the guide's lattice.
GRID_TOLERANCE = 0.05


class GridMismatch(InputError):
    """The low-res grid does not nest in the guide's (CRS, rotation, origin or scale), a
    problem that warping the low-res raster onto :func:`nesting_grid` solves."""


@dataclass(frozen=True)
class GridRelation:
    """How a low-res grid sits on a high-res (guide) grid.

    Attributes:
        scale: ``(sy, sx)`` guide pixels per low-res pixel (whole numbers or fractions).
        offset: ``(row, col)`` guide pixel where low-res pixel ``(0, 0)`` starts (may be < 0).
        region: the guide window covered by the low-res raster (clipped to the guide): the
            guide pixels whose centres lie in its footprint.
        footprint: the same window unclipped, in guide pixels (negative offsets and ends past
            the guide where the low-res raster reaches beyond it, as around a guide chip).
        shift: ``(dy, dx)`` guide pixels, each in ``(-0.5, 0.5]``, from guide pixel
            ``offset``'s corner to low-res pixel ``(0, 0)``'s: 0 for a grid on the guide's
            pixel lattice, 0.5 for a Landsat L1 product's 30 m bands on its pan band (see
            :mod:`geoupsample.core.layout`).
    """

    scale: tuple[Fraction, Fraction]
    offset: tuple[int, int]
    region: Window
    footprint: Window
    shift: tuple[float, float] = (0.0, 0.0)

    @property
    def is_shifted(self) -> bool:
        return self.shift != (0.0, 0.0)

    @property
    def read_misfit(self) -> float:
        """The low-res pixels by which a tile's window may fall off the low-res lattice
        (:class:`tiling.RasterInput`'s ``misfit``): the shift's, plus round-off."""
        if not self.is_shifted:
            return 0.25
        return min(0.49, max(abs(d) / float(s) for d, s in zip(self.shift, self.scale,
                                                               strict=True)) + 0.05)

    @property
    def period(self) -> tuple[int, int]:
        """``(rows, cols)`` guide pixels after which the two lattices meet again (the scale's
        numerator): tiles align to multiples of it."""
        return (self.scale[0].numerator, self.scale[1].numerator)

    @property
    def scale_text(self) -> str:
        """Guide pixels per low-res pixel as written in the output's tags, x by y (width by
        height, as GDAL writes sizes): ``"2x2"``, ``"10/3x10/3"``, or ``"3x2"`` for a 90 m x
        60 m low-res pixel on a 30 m guide."""
        return f"{self.scale[1]}x{self.scale[0]}"


def overlap_window(lr_transform: Affine, lr_shape: tuple[int, int],
                   hr_bounds: tuple[float, float, float, float], hr_crs: Any = None,
                   lr_crs: Any = None) -> Window:
    """The window of whole low-res cells (``lr_shape`` rows, cols) that the guide's
    ``hr_bounds`` (west, south, east, north) touch, clipped to the low-res raster: a cell the
    guide covers only in part counts (a guide overlapping a fraction of one cell still has that
    cell to upsample); the bounds are taken from ``hr_crs`` to ``lr_crs`` when both are given
    and differ."""
    if hr_crs is not None and lr_crs is not None and (
            CRS.from_user_input(hr_crs) != CRS.from_user_input(lr_crs)):
        hr_bounds = transform_bounds(hr_crs, lr_crs, *hr_bounds)
    whole = Window(0, 0, lr_shape[1], lr_shape[0])
    if lr_transform.e < 0:
        return _whole_cells(from_bounds(*hr_bounds, transform=lr_transform)).intersection(whole)
    # south-up rasters (read through a warp): rasterio's from_bounds refuses them; the
    # window spans the bounds' corners in the raster's own pixel coordinates
    west, south, east, north = hr_bounds
    corners = [~lr_transform * (x, y) for x in (west, east) for y in (south, north)]
    cols, rows = zip(*corners, strict=True)
    span = Window(min(cols), min(rows), max(cols) - min(cols), max(rows) - min(rows))
    return _whole_cells(span).intersection(whole)


def _whole_cells(w: Window, sliver: float = GRID_TOLERANCE) -> Window:
    """The whole cells that window ``w`` touches, leaving out slivers under ``sliver`` of a
    cell (the round-off of bounds that fall on cell edges)."""
    c0, r0 = math.floor(w.col_off + sliver), math.floor(w.row_off + sliver)
    c1 = math.ceil(w.col_off + w.width - sliver)
    r1 = math.ceil(w.row_off + w.height - sliver)
    return Window(c0, r0, max(1, c1 - c0), max(1, r1 - r0))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether bounds ``a`` and ``b`` (west, south, east, north) share some area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def relate_grids(lr_crs: CRS | None, lr_transform: Affine, lr_shape: tuple[int, int],
                 hr_crs: CRS | None, hr_transform: Affine, hr_shape: tuple[int, int],
                 tolerance: float = GRID_TOLERANCE) -> GridRelation:
    """Check that the low-res grid nests in the guide grid; raise :class:`InputError` if not
    (:class:`GridMismatch` where a warp would fix it).

    Args:
        lr_shape, hr_shape: ``(rows, cols)``.
        tolerance: allowed misfit in guide pixels (origin, and scale error accumulated across
            the low-res raster): :data:`GRID_TOLERANCE`.
    """
    if (lr_crs is None) != (hr_crs is None):
        which = "low-res raster" if lr_crs is None else "guide"
        raise InputError(f"the {which} has no CRS; both rasters need one (assign it: "
                         "`gdal_edit.py -a_srs EPSG:XXXX file.tif` for a file, "
                         "`da.rio.write_crs('EPSG:XXXX')` for a DataArray)")
    if lr_crs is not None and CRS.from_user_input(lr_crs) != CRS.from_user_input(hr_crs):
        # no warp makes rasters overlap: say so rather than suggest one onto an empty grid
        _refuse_apart(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform, hr_shape)
        raise GridMismatch(_crs_message(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform,
                                        hr_shape))
    _check_north_up(hr_transform, "guide")
    _check_north_up(lr_transform, "low-res raster", GridMismatch)  # a warp can fix this one
    lr_b = array_bounds(lr_shape[0], lr_shape[1], lr_transform)  # (west, south, east, north)
    hr_b = array_bounds(hr_shape[0], hr_shape[1], hr_transform)
    if not _overlap(lr_b, hr_b):
        raise InputError(f"the low-res raster and the guide do not overlap (low-res bounds "
                         f"{tuple(round(v, 3) for v in lr_b)}, guide bounds "
                         f"{tuple(round(v, 3) for v in hr_b)}, both in {hr_crs})")
    sy_f, sx_f = lr_transform.e / hr_transform.e, lr_transform.a / hr_transform.a
    sy, sx = (Fraction(v).limit_denominator(MAX_SCALE_DENOMINATOR) for v in (sy_f, sx_f))
    h, w = lr_shape
    if sy_f < 0.9 and sx_f < 0.9:
        raise InputError(
            f"the low-res raster's pixel ({lr_transform.a:g}) is smaller than the guide's "
            f"({hr_transform.a:g}): did you swap LOWRES and GUIDE? The guide is the "
            "high-resolution image")
    if sy < 1 or sx < 1 or abs(sy_f - sy) * h > tolerance or abs(sx_f - sx) * w > tolerance:
        raise GridMismatch(
            f"the grids do not nest: a low-res pixel is {sx_f:.4f} x {sy_f:.4f} guide pixels; it "
            "must be a whole number or a simple fraction of them (e.g. 10 m on 2.5 m = 4, 10 m "
            f"on 3 m = 10/3; denominators up to {MAX_SCALE_DENOMINATOR}). Resample the low-res "
            "raster to such a multiple of the guide's pixel size (gdalwarp -tr ... -tap)")
    col_f, row_f = ~hr_transform * (lr_transform.c, lr_transform.f)
    # the guide pixel whose corner is nearest, the rest a shift in (-0.5, 0.5]; round-off is 0
    oy, ox = math.ceil(row_f - 0.5), math.ceil(col_f - 0.5)
    shift = tuple(0.0 if abs(v - o) <= tolerance else float(v - o)
                  for v, o in ((row_f, oy), (col_f, ox)))  # fmt: skip
    for d, sc in zip(shift, (sy, sx), strict=True):
        if abs(d) / float(sc) >= 0.45:
            raise GridMismatch(
                f"the low-res raster's origin falls at guide pixel ({row_f:.3f}, {col_f:.3f}), "
                f"off the guide's pixel lattice by {d:+.3f} guide pixels, with low-res pixels of "
                f"only {float(sc):g} guide pixels: a grid shifted by about half its own pixel, "
                "whose cells' values no guide pixel centre matches; warp the low-res raster "
                "onto the guide's pixel lattice (gdalwarp -te/-tr aligned to the guide)")
    # the guide pixels whose centres lie in the low-res footprint (all of them for whole scales)
    end_r = math.ceil(oy + shift[0] + h * sy - Fraction(1, 2))
    end_c = math.ceil(ox + shift[1] + w * sx - Fraction(1, 2))
    r0, c0 = max(0, oy), max(0, ox)
    r1, c1 = min(hr_shape[0], end_r), min(hr_shape[1], end_c)
    if r1 <= r0 or c1 <= c0:
        raise InputError("the low-res raster and the guide do not overlap")
    return GridRelation((sy, sx), (oy, ox), Window(c0, r0, c1 - c0, r1 - r0),
                        Window(ox, oy, end_c - ox, end_r - oy), shift)  # type: ignore[arg-type]


#: Largest scale (guide pixels per low-res pixel, per axis) the fitted methods take: beyond it
#: a cell holds thousands of guide pixels and its kernels, fitted on a handful of cells,
#: overshoot the values they upsample (x200 on a 3 x 3-cell raster gave -3.7..9.5 from 0..8).
MAX_FITTED_SCALE = 64
#: Fewest low-res cells per axis for the fitted methods without a warning: a kernel's
#: neighbourhood (radius 3) spans 7.
MIN_FITTED_CELLS = 8


def check_fitted_scale(method: str, rel: GridRelation, lr_cells: tuple[int, int]) -> None:
    """Refuse jbu/gsjbu above :data:`MAX_FITTED_SCALE`, and warn under
    :data:`MIN_FITTED_CELLS` low-res cells on an axis (``lr_cells``: rows, cols over the
    guide), saying what to do instead."""
    if method not in ("jbu", "gsjbu"):
        return
    scale = max(float(s) for s in rel.scale)
    if scale > MAX_FITTED_SCALE:
        raise InputError(
            f"a low-res pixel of {rel.scale_text} guide pixels is beyond what {method} takes (up "
            f"to {MAX_FITTED_SCALE} per axis): its kernels would be fitted on cells of "
            f"{scale:.0f} x {scale:.0f} pixels and overshoot; use --method bilinear, or bring "
            "the guide nearer the low-res raster's resolution first (gdalwarp -tr)")
    if min(lr_cells) < MIN_FITTED_CELLS:
        from geoupsample.caller_warnings import warn_caller

        warn_caller(
            f"the low-res raster covers the guide with only {lr_cells[1]} x {lr_cells[0]} cells; "
            f"{method}'s kernels span 7 cells and are fitted on too few to be reliable: check "
            "the output's range, or use --method bilinear")


def relate_or_nest(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int], hr_crs: Any,
                   hr_transform: Affine, hr_shape: tuple[int, int], warp: str | None,
                   ) -> tuple[GridRelation, Warp | None]:
    """:func:`relate_grids`, or, when the low-res grid does not nest (:class:`GridMismatch`) and
    ``warp`` names a resampling, the warp of the low-res raster onto :func:`nesting_grid`.
    An unknown resampling name is refused first, whether or not a warp is needed.

    Returns:
        The relation of the low-res grid (or of the nesting grid) to the guide's, and the
        :class:`tiling.Warp` onto the nesting grid with ``warp``'s resampling, or None when the
        raster is used as it is.
    """
    if warp is not None:
        try:
            check_resampling(warp)
        except ValueError as err:
            raise InputError(str(err)) from None
    try:
        return relate_grids(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform, hr_shape), None
    except GridMismatch as err:
        if warp is None:
            raise GridMismatch(
                f"{err}; or let geoupsample warp it as it reads, choosing the resampling: "
                "bilinear or average for probabilities, features and other continuous values, "
                "nearest or mode for class numbers (--warp bilinear on the command line, "
                "warp='bilinear' in Python)") from None
    transform, height, width = nesting_grid(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform,
                                            hr_shape)
    rel = relate_grids(hr_crs, transform, (height, width), hr_crs, hr_transform, hr_shape)
    return rel, Warp(CRS.from_user_input(hr_crs).to_wkt(), tuple(transform)[:6], width, height,
                     warp)


def nesting_grid(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int], hr_crs: Any,
                 hr_transform: Affine, hr_shape: tuple[int, int]) -> tuple[Affine, int, int]:
    """A grid in the guide's CRS that nests in the guide's grid, onto which to warp a low-res
    raster whose own grid does not (:class:`GridMismatch`).

    Its cells are square, of about the low-res pixel's size in the guide's CRS (as ``gdalwarp``
    chooses it; for a rotated grid, the side of a square of its central pixel's area), taken as
    the simplest fraction ``p / q`` of guide pixels within 2 % (``q <=``
    :data:`MAX_SCALE_DENOMINATOR`, at least one); its origin is the guide's, and it covers the
    whole guide.

    Returns:
        ``(transform, height, width)`` of the grid.
    """
    if lr_crs is None or hr_crs is None:
        raise InputError("both rasters need a CRS to warp one onto the other")
    _check_north_up(hr_transform, "guide")
    _refuse_apart(lr_crs, lr_transform, lr_shape, hr_crs, hr_transform, hr_shape)
    size = _pixel_size(lr_crs, lr_transform, lr_shape, hr_crs)
    if size < 0.9 * math.sqrt(hr_transform.a * -hr_transform.e):
        raise InputError(
            f"the low-res raster's pixel ({size:g} in the guide's CRS) is smaller than the "
            f"guide's ({hr_transform.a:g}): did you swap LOWRES and GUIDE? The guide is the "
            "high-resolution image")
    return _cells_on_guide(size, hr_transform, hr_shape)


def _own_bounds(t: Affine, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a grid ``shape`` (rows, cols) with transform ``t``, rotated
    or not, in its own CRS."""
    h, w = shape
    corners = [t * (c, r) for c in (0, w) for r in (0, h)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    return min(xs), min(ys), max(xs), max(ys)


def _surely_apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether bounds ``a`` and ``b`` (west, south, east, north) surely share no area: not for
    bounds a reprojection left NaN or across the antimeridian (west > east)."""
    if any(math.isnan(v) for v in (*a, *b)) or a[0] > a[2] or b[0] > b[2]:
        return False
    return not _overlap(a, b)  # type: ignore[arg-type]


def _refuse_apart(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int], hr_crs: Any,
                  hr_transform: Affine, hr_shape: tuple[int, int]) -> None:
    """Raise :class:`InputError` when rasters in different CRSs do not overlap: their bounds are
    apart in the guide's CRS and in the low-res raster's (reprojected bounds can fall short near
    a projection's limits: a global lon/lat raster's in a UTM zone). Where a reprojection fails,
    nothing is said here (the warp's own checks come later)."""
    hr_b = array_bounds(hr_shape[0], hr_shape[1], hr_transform)
    lr_own = _own_bounds(lr_transform, lr_shape)
    try:
        lr_b = transform_bounds(lr_crs, hr_crs, *lr_own)
        hr_in_lr = transform_bounds(hr_crs, lr_crs, *hr_b)
    except Exception:  # noqa: BLE001 - PROJ errors come in many types; the check is optional
        return
    if _surely_apart(lr_b, hr_b) and _surely_apart(lr_own, hr_in_lr):
        raise InputError(
            f"the low-res raster and the guide do not overlap (low-res bounds in the guide's CRS "
            f"{tuple(round(v, 3) for v in lr_b)}, guide bounds {tuple(round(v, 3) for v in hr_b)}"
            f", in {CRS.from_user_input(hr_crs).to_string()}): no warp would help; check that "
            "you passed rasters of the same place")


def _cells_on_guide(size: float, hr_transform: Affine,
                    hr_shape: tuple[int, int]) -> tuple[Affine, int, int]:
    """``(transform, height, width)`` of the square cells of about ``size`` (guide CRS units;
    the simplest fraction of guide pixels, at least one) from the guide's origin, covering it."""
    s = _simple_scale(size / math.sqrt(hr_transform.a * -hr_transform.e))
    return (hr_transform * Affine.scale(float(s)), math.ceil(hr_shape[0] / s),
            math.ceil(hr_shape[1] / s))


def _pixel_size(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int],
                hr_crs: Any) -> float:
    """The low-res pixel's size in the guide's CRS units: as gdalwarp chooses it for a north-up
    grid; for a rotated one, the side of the square with its central pixel's area (the cell
    size that keeps its sampling, whatever the rotation)."""
    h, w = lr_shape
    if _north_up(lr_transform):
        native, _, _ = calculate_default_transform(lr_crs, hr_crs, w, h,
                                                   *array_bounds(h, w, lr_transform))
        return math.sqrt(native.a * -native.e)
    r, c = h // 2, w // 2
    corners = [lr_transform * (c + dc, r + dr) for dc, dr in ((0, 0), (1, 0), (0, 1))]
    (x0, x1, x2), (y0, y1, y2) = warp_transform(lr_crs, hr_crs, [p[0] for p in corners],
                                                [p[1] for p in corners])
    return math.sqrt(abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)))


def _simple_scale(v: float, tolerance: float = 0.02) -> Fraction:
    """The simplest fraction ``p / q >= 1`` (smallest ``q <=`` :data:`MAX_SCALE_DENOMINATOR`)
    within ``tolerance`` (relative) of ``v``, else the closest one: 10/3 rather than 23/7 for a
    pixel of 0.985 m on 0.3 m (the shorter the period, the more regular the tiles)."""
    for q in range(1, MAX_SCALE_DENOMINATOR + 1):
        f = Fraction(round(v * q), q)
        if f >= 1 and abs(f - v) <= tolerance * v:
            return f
    return max(Fraction(1), Fraction(v).limit_denominator(MAX_SCALE_DENOMINATOR))


#: Rotation terms of a transform up to this fraction of the pixel size count as 0: the
#: rounding left by some writers (1e-12 m on 30 m pixels); over 10^6 rows it moves a pixel by
#: 1/1000 of its size.
ROTATION_TOLERANCE = 1e-9


def is_rectilinear(t: Affine) -> bool:
    """Whether ``t`` has no rotation (rotation terms within :data:`ROTATION_TOLERANCE` of the
    pixel size)."""
    size = max(abs(t.a), abs(t.e))
    return abs(t.b) <= ROTATION_TOLERANCE * size and abs(t.d) <= ROTATION_TOLERANCE * size


def _north_up(t: Affine) -> bool:
    return is_rectilinear(t) and t.a > 0 and t.e < 0


def not_north_up_message(name: str, t: Affine) -> str:
    """What to do with a rotated or flipped raster: warp it with gdalwarp, which writes
    north-up grids."""
    return (f"the {name} is not north-up (transform {tuple(t)[:6]}: "
            f"{'rotated' if not is_rectilinear(t) else 'flipped'}); warp it to a north-up grid "
            "first: gdalwarp IN.tif OUT.tif (gdalwarp writes north-up grids)")


def _check_north_up(t: Affine, name: str, error: type[InputError] = InputError) -> None:
    if not _north_up(t):
        raise error(not_north_up_message(name, t))


def _crs_message(lr_crs: Any, lr_transform: Affine, lr_shape: tuple[int, int], hr_crs: Any,
                 hr_transform: Affine, hr_shape: tuple[int, int]) -> str:
    msg = (f"the low-res raster is in {lr_crs} but the guide is in {hr_crs}; geoupsample does "
           "not reproject unasked (the right resampling depends on what the raster holds). Warp "
           "the low-res raster onto a grid nesting with the guide's first")
    try:  # the grid --warp would use (its checks come when warping: no overlap, swapped)
        transform, height, width = _cells_on_guide(
            _pixel_size(lr_crs, lr_transform, lr_shape, hr_crs), hr_transform, hr_shape)
    except Exception:  # noqa: BLE001 - the hint is optional
        return msg
    x0, y0, x1, y1 = array_bounds(height, width, transform)
    return msg + (f", e.g.: gdalwarp -t_srs {CRS.from_user_input(hr_crs).to_string()} "
                  f"-tr {transform.a:g} {-transform.e:g} -te {x0:.6f} {y0:.6f} {x1:.6f} "
                  f"{y1:.6f} -r average LOWRES.tif lowres_on_guide.tif")
