"""Blending accumulator that keeps only the tiles still needed by unfinished write cells.

Each tile's output is cut into the parts that fall on the write cells its weighted support touches
(at most 2 x 2 cells when ``tile >= halo + block``); a cell is finalised as soon as every tile
contributing to it has arrived, then dropped. With tiles submitted in row-major order this holds
about one row of cell *edges* (the overlap strip with the next tile row) plus the tiles in flight,
so memory does not grow with the number of tile rows. That row of edges (the *frontier*: parts
waiting for a later tile row) grows with the scene's width; past ``frontier_budget`` bytes its
parts go to a scratch file (:mod:`tiling.spill`) and come back when their cell completes, so
memory does not grow with the width either.

The blend is deterministic: parts are summed in tile order whatever order they arrived in, so a
run on a thread pool, on a dask cluster or resumed after a crash gives identical pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from rasterio.windows import Window

from tiling.blend import axis_weights
from tiling.grid import Cell, TileGrid
from tiling.spill import Spilled, SpillFile

FRONTIER_BUDGET = 16 * 2 ** 20
"""Default bytes of frontier parts held in memory before the rest go to the scratch file."""


@dataclass
class _Part:
    tile: tuple[int, int]
    data: np.ndarray | Spilled  # float32 [count, rows, cols], NaN = missing; or its spill handle
    wy: np.ndarray  # float32 [rows]
    wx: np.ndarray  # float32 [cols]
    r0: int  # offsets inside the cell
    c0: int
    held: bool = False  # counted in the accumulator's bytes (a copy kept for a later blend)


@dataclass
class _CellState:
    cell: Cell
    remaining: int
    parts: list[_Part] = field(default_factory=list)


def tile_parts(grid: TileGrid, tile_id: tuple[int, int], data: np.ndarray,
               cell: Cell, copy: bool = True) -> _Part | None:
    """The part of tile ``tile_id``'s output ``data`` (on its read window) that falls on ``cell``,
    with its blending weights; None when it has no weight there. ``copy=False``: the part is a
    view of ``data`` (for a cell blended at once, while ``data`` is alive)."""
    tile = grid.get(*tile_id)
    (sy0, sy1), (sx0, sx1) = grid.support(*tile_id)
    w = cell.window
    ry0, rx0 = int(tile.read.row_off), int(tile.read.col_off)
    ry1, rx1 = ry0 + int(tile.read.height), rx0 + int(tile.read.width)
    y0 = max(sy0, ry0, int(w.row_off))
    y1 = min(sy1, ry1, int(w.row_off + w.height))
    x0 = max(sx0, rx0, int(w.col_off))
    x1 = min(sx1, rx1, int(w.col_off + w.width))
    if y1 <= y0 or x1 <= x0:
        return None
    crop = data[:, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
    crop = np.array(crop, dtype=np.float32) if copy else crop.astype(np.float32, copy=False)
    wy = axis_weights(grid.rows, tile_id[0], grid.taper, y0, y1)
    wx = axis_weights(grid.cols, tile_id[1], grid.taper, x0, x1)
    return _Part(tile_id, crop, wy, wx, y0 - int(w.row_off), x0 - int(w.col_off))


def blend_parts(parts: list[_Part], count: int, window: Window) -> np.ndarray:
    """Weighted mean of ``parts`` over ``window``: float32 ``[count, rows, cols]``, NaN where no
    finite value has weight. Parts are summed in tile order (deterministic).

    Only where parts overlap (the taper strips) or a weight is 0 is there anything to average;
    elsewhere a single part with positive weight covers the pixel, and its value (the weighted
    mean of one value) is copied as it is. A single part covering the whole window with positive
    weight (each cell of a ``crop`` grid) is returned as it is: the result may be a part's own
    array (a copy, or a view of the tile's output: see :func:`tile_parts`).
    """
    h, w = int(window.height), int(window.width)
    if len(parts) == 1 and _covers(parts[0], h, w):
        return parts[0].data
    parts = sorted(parts, key=lambda p: p.tile)
    out = np.empty((count, h, w), dtype=np.float32)
    covered = np.zeros((h, w), dtype=bool)
    rects = [(p.r0, p.r0 + p.data.shape[1], p.c0, p.c0 + p.data.shape[2]) for p in parts]
    for p, (y0, y1, x0, x1) in zip(parts, rects, strict=True):
        out[:, y0:y1, x0:x1] = p.data
        covered[y0:y1, x0:x1] = True
    if not covered.all():  # no part there (outside the region, or tiles skipped as empty)
        out[:, ~covered] = np.nan
    for y0, y1, x0, x1 in _mixed_rects(parts, rects):
        out[:, y0:y1, x0:x1] = _weighted_mean(parts, rects, count, (y0, y1, x0, x1))
    return out


def _covers(part: _Part, h: int, w: int) -> bool:
    """Whether ``part`` is an in-memory array covering an ``h x w`` window with positive
    weight everywhere."""
    return (isinstance(part.data, np.ndarray) and (part.r0, part.c0) == (0, 0)
            and part.data.shape[1:] == (h, w) and bool((part.wy > 0).all())
            and bool((part.wx > 0).all()))


def _mixed_rects(parts: list[_Part], rects: list[tuple[int, int, int, int]]
                 ) -> list[tuple[int, int, int, int]]:
    """Rectangles (cell coordinates) holding every pixel covered by two or more parts or by a
    part with zero weight there; they may overlap each other."""
    mixed = []
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            y0, y1 = max(a[0], b[0]), min(a[1], b[1])
            x0, x1 = max(a[2], b[2]), min(a[3], b[3])
            if y1 > y0 and x1 > x0:
                mixed.append((y0, y1, x0, x1))
    for p, (y0, y1, x0, x1) in zip(parts, rects, strict=True):
        for r in np.flatnonzero(p.wy <= 0):
            mixed.append((y0 + int(r), y0 + int(r) + 1, x0, x1))
        for c in np.flatnonzero(p.wx <= 0):
            mixed.append((y0, y1, x0 + int(c), x0 + int(c) + 1))
    return mixed


def _weighted_mean(parts: list[_Part], rects: list[tuple[int, int, int, int]], count: int,
                   box: tuple[int, int, int, int]) -> np.ndarray:
    """The NaN-aware weighted mean of the parts over ``box`` (float64 sums, float32 result)."""
    by0, by1, bx0, bx1 = box
    h, w = by1 - by0, bx1 - bx0
    pieces = []  # (part, source slices, target slices) of the parts meeting the box
    for p, (y0, y1, x0, x1) in zip(parts, rects, strict=True):
        iy0, iy1, ix0, ix1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
        if iy1 <= iy0 or ix1 <= ix0:
            continue
        src = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
        dst = (slice(iy0 - by0, iy1 - by0), slice(ix0 - bx0, ix1 - bx0))
        wgt = np.outer(p.wy[src[0]].astype(np.float64), p.wx[src[1]])
        pieces.append((p.data[:, src[0], src[1]], dst, wgt))
    out = np.empty((count, h, w), dtype=np.float32)
    for b in range(count):  # one band at a time keeps the float64 buffers small
        num = np.zeros((h, w), dtype=np.float64)
        den = np.zeros((h, w), dtype=np.float64)
        for data, dst, wgt in pieces:
            ok = np.isfinite(data[b])
            num[dst] += np.where(ok, data[b], 0.0) * wgt
            den[dst] += ok * wgt
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


class Accumulator:
    """Tracks every write cell; ``add`` a tile's result, get back the cells now complete.

    Args:
        grid: the tile grid.
        count: bands per tile output.
        skip_cells: indices (into ``grid.cells()``) that will not be written (outside the AOI or
            already finished in a resumed run); contributions to them are dropped at once.
        spill: scratch file for frontier parts beyond ``frontier_budget`` (None: keep all in
            memory).
        frontier_budget: bytes of frontier parts (parts whose cell still waits for a later tile
            row) kept in memory before further ones are spilled.
    """

    def __init__(self, grid: TileGrid, count: int, skip_cells: set[int] | None = None,
                 spill: SpillFile | None = None,
                 frontier_budget: int = FRONTIER_BUDGET) -> None:
        self.grid = grid
        self.count = count
        self.spill = spill
        self.frontier_budget = frontier_budget
        self.frontier_bytes = 0  # frontier parts held in memory
        self.held_bytes = 0  # all parts held in memory
        self.peak_held_bytes = 0
        self.cells = grid.cells()
        skip = skip_cells or set()
        self.state: dict[int, _CellState] = {
            i: _CellState(c, len(c.tiles)) for i, c in enumerate(self.cells) if i not in skip}
        self.parts = 0  # tile parts held right now
        self.peak_parts = 0  # the most ever held (a measure of the memory bound)
        self.by_tile: dict[tuple[int, int], list[int]] = {}
        for i, st in self.state.items():
            for t in st.cell.tiles:
                self.by_tile.setdefault(t, []).append(i)

    def needed(self, tile_id: tuple[int, int]) -> bool:
        """Whether any pending cell needs this tile."""
        return bool(self.by_tile.get(tile_id))

    def add(self, tile_id: tuple[int, int],
            data: np.ndarray | None) -> Iterator[tuple[Cell, np.ndarray]]:
        """Add tile ``tile_id``'s output (None = no data / skipped); return the cells it
        completes as ``(cell, float32 [count, rows, cols])`` in row-major order, blended lazily
        as they are iterated (iterate it to the end before the next ``add``)."""
        done = []
        for i in self.by_tile.pop(tile_id, []):
            st = self.state[i]
            st.remaining -= 1
            if data is not None:
                # a part blended by this very call stays a view of data; a held one is copied
                held = st.remaining > 0
                part = tile_parts(self.grid, tile_id, data, st.cell, copy=held)
                if part is not None:
                    if held:
                        self._hold(part, st)
                    st.parts.append(part)
                    self.parts += 1
                    self.peak_parts = max(self.peak_parts, self.parts)
            if st.remaining == 0:
                done.append(i)
        return self._blend_each([self.state.pop(i) for i in sorted(done)])

    def _blend_each(self, states: list[_CellState]) -> Iterator[tuple[Cell, np.ndarray]]:
        """Blend completed cells one at a time, as the caller takes them (one cell's pixels in
        hand at a time, however many cells a tile completes)."""
        for st in states:
            self.parts -= len(st.parts)
            for p in st.parts:
                self._release(p, st)
            values = blend_parts(st.parts, self.count, st.cell.window)
            st.parts.clear()
            yield st.cell, values

    @staticmethod
    def _frontier(part: _Part, st: _CellState) -> bool:
        """Whether the part's cell also waits for a tile of a later tile row."""
        return max(r for r, _ in st.cell.tiles) > part.tile[0]

    def _hold(self, part: _Part, st: _CellState) -> None:
        """Account for a new part; spill it if it is frontier beyond the budget."""
        assert isinstance(part.data, np.ndarray)
        size = part.data.nbytes
        part.held = True
        if self._frontier(part, st):
            if self.spill is not None and self.frontier_bytes + size > self.frontier_budget:
                part.data = self.spill.put(part.data)
                return
            self.frontier_bytes += size
        self.held_bytes += size
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def _release(self, part: _Part, st: _CellState) -> None:
        """Bring a spilled part back (it is blended at once) or drop a held one's bytes."""
        if isinstance(part.data, Spilled):
            assert self.spill is not None
            part.data = self.spill.take(part.data)
            return
        if not part.held:  # a view blended in the call that made it: never counted
            return
        size = part.data.nbytes
        self.held_bytes -= size
        if self._frontier(part, st):
            self.frontier_bytes -= size

    @property
    def pending(self) -> int:
        return len(self.state)
