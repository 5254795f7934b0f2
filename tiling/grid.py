"""Tile grids in the output raster's pixel space.

Conventions
-----------
All windows here are :class:`rasterio.windows.Window` objects in **output pixel** coordinates
(row/col offsets from the output raster's top-left pixel, integer valued). Along each axis the
processing *region* ``[start, stop)`` is cut into *cores*: as few as hold it in intervals of at
most ``tile`` pixels, of equal size (a multiple of the alignment; the last one a little
shorter): a region slightly larger than ``tile`` gets two near-halves, not a full tile and a
sliver that would read, and compute, a whole tile for a few pixels. Each core is owned by one
tile. A tile *reads* its core grown by ``halo`` pixels on every side (context for the per-tile
function), shifted back inside the *context* window when it would stick out (so the last
row/column of tiles keeps the full size and is stitched by its real offset), then grown outward
to the alignment lattice ``offset + k * align`` (so every tile's low-resolution grid is an exact
sub-grid of the scene's). The context is the region unless the inputs hold data beyond it (a
low-res raster that reaches past the edge of a guide chip): then the tiles at the region's edge
read past it, and an interpolation there sees the cells beyond as a whole-scene run would. Reads
may extend past the context by less than ``align`` pixels; readers pad whatever lies outside an
input with nodata.

Writes happen in *cells*: a second partition of the region whose boundaries are the core
boundaries moved back by the halo and rounded down to the output's block size, so every write is
block-aligned and a cell only needs the few tiles whose weighted support touches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from rasterio.windows import Window


@dataclass(frozen=True)
class Axis:
    """One axis of a tile grid.

    Attributes:
        start, stop: the processing region ``[start, stop)`` in output pixels.
        cores: core boundaries ``[start, c1, ..., stop]``; tile ``i`` owns
            ``[cores[i], cores[i+1])``.
        reads: per tile, the ``(begin, end)`` pixel range it reads (aligned, may leave the region
            by less than ``align`` pixels at either end).
        cells: write-cell boundaries ``[start', ..., stop]``; interior ones are block multiples.
    """

    start: int
    stop: int
    cores: tuple[int, ...]
    reads: tuple[tuple[int, int], ...]
    cells: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.cores) - 1

    @property
    def n_cells(self) -> int:
        return len(self.cells) - 1


def _build_axis(start: int, stop: int, tile: int, halo: int, align: int, offset: int,
                block: int, taper: int, context: tuple[int, int] | None = None) -> Axis:
    """Cut ``[start, stop)`` into cores, read ranges and write cells (see module docstring);
    reads are shifted inside ``context`` (``(lo, hi)`` containing ``[start, stop)``; default:
    the region itself), and leave the region by at most ``halo`` pixels before alignment."""
    lo, hi = context if context is not None else (start, stop)
    lo, hi = max(lo, start - halo), min(hi, stop + halo)
    length = stop - start
    n = max(1, math.ceil(length / tile))
    # balanced: n cores of about length / n (a multiple of align, at most tile), not n - 1
    # full ones and a sliver that reads (and fits) a whole tile for a few pixels of output
    size = min(tile, math.ceil(math.ceil(length / n) / align) * align)
    cores = tuple([start + i * size for i in range(n)] + [stop])
    reads = []
    nominal = size + 2 * halo
    for i in range(n):
        b, e = cores[i] - halo, cores[i + 1] + halo
        if e - b < nominal:  # the short last tile: shift its start back to keep the full size
            b = e - nominal
        if b < lo:  # shift inside the context (or clip when it is smaller)
            e = min(hi, e + (lo - b))
            b = lo
        if e > hi:
            b = max(lo, b - (e - hi))
            e = hi
        # grow outward to the alignment lattice offset + k * align
        b = offset + math.floor((b - offset) / align) * align
        e = offset + math.ceil((e - offset) / align) * align
        reads.append((b, e))
    cells = [start]
    for c in cores[1:-1]:
        edge = (c - taper // 2) // block * block
        if edge > cells[-1]:
            cells.append(edge)
    cells.append(stop)
    return Axis(start, stop, cores, tuple(reads), tuple(cells))


@dataclass(frozen=True)
class Tile:
    """One tile: its index, the core it owns and the (aligned) window it reads.

    Attributes:
        row, col: tile indices in the grid.
        core: the window this tile owns (output pixels).
        read: the window the per-tile function gets and must return output for; aligned to the
            grid's ``align``/``offset`` and possibly extending past the region by < ``align`` px.
    """

    row: int
    col: int
    core: Window
    read: Window

    @property
    def id(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Cell:
    """A block-aligned write window and the tiles whose blended support overlaps it."""

    row: int
    col: int
    window: Window
    tiles: tuple[tuple[int, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TileGrid:
    """A grid of overlapping tiles over (a region of) an output raster.

    Args:
        height, width: output raster size in pixels.
        tile: the largest core size in pixels, rounded up to a multiple of ``align``; the cores
            are as few as that allows and of equal size (module docstring).
        halo: context pixels read on each side of a core (>= 0).
        align: read windows start on ``offset + k * align`` and have lengths that are multiples of
            ``align`` (use the low-res scale, or a backbone patch size). An int or ``(y, x)``.
        offset: ``(row, col)`` of one lattice point, e.g. where a low-res pixel starts.
        block: output block size ``(rows, cols)`` or an int; cell boundaries are multiples of it.
            Keep ``tile >= block + halo`` so that each cell needs at most 2 x 2 tiles and
            memory stays at about one row of cell edges; smaller tiles still give correct
            results, with more tiles per cell.
        region: optional window restricting processing; pixels outside it are left as nodata.
        context: optional window (containing the region; it may reach past the raster) within
            which tiles may read: where the inputs hold data beyond the region, the edge tiles
            read it instead of being shifted inside the region. Default: the region.
        blend: ``"taper"`` (raised-cosine ramp of width ``halo`` centred on each interior core
            boundary; every weighted pixel keeps >= ``halo / 2`` px of context, so the blend is
            exact for per-tile functions whose support is <= ``halo / 2``) or ``"crop"`` (each
            pixel from the tile owning it; exact for support <= ``halo``).

    Example:
        >>> g = TileGrid(600, 600, tile=256, halo=32, align=2, block=128)
        >>> g.shape
        (3, 3)
    """

    height: int
    width: int
    tile: int = 1024
    halo: int = 64
    align: int | tuple[int, int] = 1
    offset: tuple[int, int] = (0, 0)
    block: int | tuple[int, int] = 256
    region: Window | None = None
    blend: str = "taper"
    context: Window | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"raster size must be positive, got {self.height} x {self.width}")
        if self.tile <= 0:
            raise ValueError(f"tile must be a positive number of pixels, got {self.tile}")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        ay, ax = _pair(self.align)
        by, bx = _pair(self.block)
        if min(ay, ax, by, bx) <= 0:
            raise ValueError(f"align and block must be positive, got {self.align}, {self.block}")
        if self.blend not in ("taper", "crop"):
            raise ValueError(f"blend must be 'taper' or 'crop', got {self.blend!r}")
        if self.halo > self.tile:
            raise ValueError(f"halo ({self.halo}) must not exceed tile ({self.tile}); "
                             "use a larger --tile or a smaller --halo")
        region = self.region or Window(0, 0, self.width, self.height)
        region = region.round_offsets().round_lengths()
        r0, c0 = int(region.row_off), int(region.col_off)
        r1, c1 = r0 + int(region.height), c0 + int(region.width)
        r0, c0, r1, c1 = max(0, r0), max(0, c0), min(self.height, r1), min(self.width, c1)
        if r1 <= r0 or c1 <= c0:
            raise ValueError("the processing region does not overlap the raster")
        ty = math.ceil(self.tile / ay) * ay
        tx = math.ceil(self.tile / ax) * ax
        ctx_rows, ctx_cols = (r0, r1), (c0, c1)
        if self.context is not None:
            ctx = self.context.round_offsets().round_lengths()
            k0, j0 = int(ctx.row_off), int(ctx.col_off)
            k1, j1 = k0 + int(ctx.height), j0 + int(ctx.width)
            if k0 > r0 or j0 > c0 or k1 < r1 or j1 < c1:
                raise ValueError(f"the context window {self.context} must contain the "
                                 f"processing region (rows {r0}-{r1}, cols {c0}-{c1})")
            ctx_rows, ctx_cols = (k0, k1), (j0, j1)
        object.__setattr__(self, "_rows", _build_axis(r0, r1, ty, self.halo, ay, self.offset[0],
                                                      by, self.taper, ctx_rows))
        object.__setattr__(self, "_cols", _build_axis(c0, c1, tx, self.halo, ax, self.offset[1],
                                                      bx, self.taper, ctx_cols))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def taper(self) -> int:
        """Width in pixels of the blending ramp across each interior core boundary."""
        return self.halo if self.blend == "taper" else 0

    @property
    def rows(self) -> Axis:
        return self._rows  # type: ignore[attr-defined]

    @property
    def cols(self) -> Axis:
        return self._cols  # type: ignore[attr-defined]

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles ``(rows, cols)``."""
        return (self.rows.n_tiles, self.cols.n_tiles)

    @property
    def region_window(self) -> Window:
        return Window(self.cols.start, self.rows.start, self.cols.stop - self.cols.start,
                      self.rows.stop - self.rows.start)

    def get(self, row: int, col: int) -> Tile:
        """The tile at ``(row, col)``."""
        ra, ca = self.rows, self.cols
        core = Window(ca.cores[col], ra.cores[row], ca.cores[col + 1] - ca.cores[col],
                      ra.cores[row + 1] - ra.cores[row])
        (rb, re), (cb, ce) = ra.reads[row], ca.reads[col]
        return Tile(row, col, core, Window(cb, rb, ce - cb, re - rb))

    def tiles(self) -> Iterator[Tile]:
        """All tiles in row-major order (the order that keeps memory bounded)."""
        for r in range(self.rows.n_tiles):
            for c in range(self.cols.n_tiles):
                yield self.get(r, c)

    def __len__(self) -> int:
        return self.rows.n_tiles * self.cols.n_tiles

    def support(self, row: int, col: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Pixel ranges ``((r0, r1), (c0, c1))`` where tile ``(row, col)`` has non-zero weight."""
        return (_support(self.rows, row, self.taper), _support(self.cols, col, self.taper))

    def cells(self) -> list[Cell]:
        """Write cells in row-major order, each with the tiles contributing to it."""
        ys = self._contributors(self.rows, self.taper)
        xs = self._contributors(self.cols, self.taper)
        out = []
        for i in range(self.rows.n_cells):
            for j in range(self.cols.n_cells):
                y0, y1 = self.rows.cells[i], self.rows.cells[i + 1]
                x0, x1 = self.cols.cells[j], self.cols.cells[j + 1]
                tiles = tuple((a, b) for a in ys[i] for b in xs[j])
                out.append(Cell(i, j, Window(x0, y0, x1 - x0, y1 - y0), tiles))
        return out

    @staticmethod
    def _contributors(axis: Axis, taper: int) -> list[tuple[int, ...]]:
        res = []
        for k in range(axis.n_cells):
            a, b = axis.cells[k], axis.cells[k + 1]
            res.append(tuple(t for t in range(axis.n_tiles)
                             if _overlaps(_support(axis, t, taper), (a, b))))
        return res


def _support(axis: Axis, t: int, taper: int) -> tuple[int, int]:
    lo = axis.cores[t] - (taper // 2 if t > 0 else 0)
    hi = axis.cores[t + 1] + ((taper - taper // 2) if t < axis.n_tiles - 1 else 0)
    return (lo, hi)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    y, x = v
    return (int(y), int(x))
