"""The same tiled computation as :func:`tiling.run`, as a lazy dask array.

Each tile is one task (reading only the dask chunks under its window); each output chunk is one
write cell, blended from its contributing tiles with exactly the code :func:`tiling.run` uses, so
computing the array gives the same pixels as the GeoTIFF that :func:`tiling.run` writes (before the
cast to the output dtype). Tiles are computed once even though up to four cells use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
from affine import Affine
from rasterio.windows import Window

from tiling.accumulate import blend_parts, tile_parts
from tiling.aoi import window_intersects, window_mask
from tiling.execute import TileFunction, call_tile, share_malloc_arena
from tiling.grid import Cell, Tile, TileGrid
from tiling.reader import ArrayInput, to_float


def _piece(src: ArrayInput, tile: Tile, out_transform: Affine) -> tuple[Any, Window, Window]:
    """The slice of ``src`` under ``tile`` (lazy), its full window and the part inside the array."""
    win = src.window(tile.read, out_transform)
    _, h, w = src.array.shape
    r0, c0 = int(win.row_off), int(win.col_off)
    r1, c1 = r0 + int(win.height), c0 + int(win.width)
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    ir1, ic1 = max(ir1, ir0), max(ic1, ic0)
    inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
    return src.array[:, ir0:ir1, ic0:ic1], win, inner


def _run_tile(fn: TileFunction, tile: Tile, out_transform: Affine, count: int,
              pieces: dict[str, tuple[Any, Window, Window, float | None, int]]
              ) -> np.ndarray | None:
    data = {}
    for name, (arr, win, inner, nodata, bands) in pieces.items():
        out = np.full((bands, int(win.height), int(win.width)), np.nan, dtype=np.float32)
        r, c = int(inner.row_off - win.row_off), int(inner.col_off - win.col_off)
        out[:, r:r + int(inner.height), c:c + int(inner.width)] = to_float(np.asarray(arr),
                                                                             nodata)
        data[name] = out
    return call_tile(fn, tile, data, out_transform, count)[1]


def _run_cell(grid: TileGrid, count: int, cell: Cell, tile_ids: list[tuple[int, int]],
              results: list[np.ndarray | None], geom: Any, out_transform: Affine) -> np.ndarray:
    parts = []
    for tid, data in zip(tile_ids, results, strict=True):
        if data is not None:
            p = tile_parts(grid, tid, data, cell)
            if p is not None:
                parts.append(p)
    out = blend_parts(parts, count, cell.window)
    if geom is not None:
        out[:, ~window_mask(geom, cell.window, out_transform)] = np.nan
    return out


def to_dask(fn: TileFunction, inputs: Mapping[str, ArrayInput], grid: TileGrid, count: int,
            out_transform: Affine, geom: Any = None) -> da.Array:
    """Lazy float32 ``[count, grid.height, grid.width]`` (NaN = nodata) computing ``fn`` tiled on
    ``grid`` and blended exactly like :func:`tiling.run`. ``geom`` is an AOI already in the output
    CRS (see :func:`tiling.aoi.load_aoi`)."""
    share_malloc_arena()  # dask runs the tiles in worker threads
    cells = grid.cells()
    live = [c for c in cells
            if geom is None or window_intersects(geom, c.window, out_transform)]
    needed = sorted({t for c in live for t in c.tiles})
    # one graph key for fn, tokenised once (a backbone's job pickles to tens of MB: as an
    # argument of every tile's task it was tokenised per tile, ~20 ms per MB each time)
    shared_fn = dask.delayed(fn, pure=True)
    tasks = {}
    for tid in needed:
        tile = grid.get(*tid)
        pieces = {}
        for name, src in inputs.items():
            arr, win, inner = _piece(src, tile, out_transform)
            pieces[name] = (arr, win, inner, src.nodata, src.count)
        tasks[tid] = dask.delayed(_run_tile, pure=True)(shared_fn, tile, out_transform, count,
                                                            pieces)
    live_ids = {(c.row, c.col) for c in live}
    blocks: list[list[da.Array]] = []
    for i in range(grid.rows.n_cells):
        row = []
        for j in range(grid.cols.n_cells):
            cell = cells[i * grid.cols.n_cells + j]
            shape = (count, int(cell.window.height), int(cell.window.width))
            if (i, j) in live_ids:
                ids = list(cell.tiles)
                d = dask.delayed(_run_cell, pure=True)(grid, count, cell, ids,
                                                       [tasks[t] for t in ids], geom,
                                                       out_transform)
                row.append(da.from_delayed(d, shape=shape, dtype=np.float32))
            else:
                row.append(da.full(shape, np.nan, dtype=np.float32))
        blocks.append(row)
    arr = da.block([[b for b in row] for row in blocks]) if blocks else None
    return _pad_region(arr, grid, count)


def _pad_region(arr: da.Array, grid: TileGrid, count: int) -> da.Array:
    """Pad the region's array with NaN to the full ``[count, height, width]``."""
    r0, r1, c0, c1 = grid.rows.start, grid.rows.stop, grid.cols.start, grid.cols.stop
    if (r0, c0, r1, c1) == (0, 0, grid.height, grid.width):
        return arr

    def nan(h: int, w: int) -> da.Array:
        return da.full((count, h, w), np.nan, dtype=np.float32)

    mid = [x for x in (nan(r1 - r0, c0) if c0 else None, arr,
                       nan(r1 - r0, grid.width - c1) if c1 < grid.width else None)
           if x is not None]
    rows = [x for x in (nan(r0, grid.width) if r0 else None, da.concatenate(mid, axis=2),
                        nan(grid.height - r1, grid.width) if r1 < grid.height else None)
            if x is not None]
    return da.concatenate(rows, axis=1)
