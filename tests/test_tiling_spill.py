"""The scratch file behind the blend's frontier: arrays come back bit-identical, slots are
reused, and the accumulator with a zero budget completes the same cells as one without a spill."""

from __future__ import annotations

import numpy as np

from tiling.accumulate import Accumulator
from tiling.grid import TileGrid
from tiling.spill import SpillFile


def test_arrays_round_trip_and_slots_are_reused(tmp_path):
    rng = np.random.default_rng(0)
    with SpillFile(tmp_path) as spill:
        a = rng.normal(size=(3, 7, 5)).astype(np.float32)
        a[0, 0, 0] = np.nan
        b = rng.integers(0, 255, size=(11,), dtype=np.uint8)
        ha, hb = spill.put(a), spill.put(b)
        assert spill.held == a.nbytes + b.nbytes
        np.testing.assert_array_equal(spill.take(ha), a)  # NaN included
        end = spill.size
        c = rng.normal(size=(3, 5, 7)).astype(np.float32)  # same byte size as a
        hc = spill.put(c)
        assert hc.offset == ha.offset and spill.size == end  # the freed slot is reused
        np.testing.assert_array_equal(spill.take(hb), b)
        np.testing.assert_array_equal(spill.take(hc), c)
        assert spill.held == 0
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing left in the directory


def _run_accumulator(grid: TileGrid, tiles: dict, spill: SpillFile | None, budget: int):
    acc = Accumulator(grid, 2, spill=spill, frontier_budget=budget)
    cells = {}
    for t in grid.tiles():
        for cell, values in acc.add(t.id, tiles[t.id]):
            cells[(cell.row, cell.col)] = values
    assert acc.pending == 0 and acc.held_bytes == 0 and acc.frontier_bytes == 0
    return cells, acc


def test_zero_budget_spills_the_frontier_and_blends_the_same(tmp_path):
    grid = TileGrid(300, 260, tile=64, halo=16, block=32)
    rng = np.random.default_rng(1)
    tiles = {}
    for t in grid.tiles():
        r = t.read
        tiles[t.id] = rng.normal(size=(2, int(r.height), int(r.width))).astype(np.float32)
    in_memory, acc0 = _run_accumulator(grid, tiles, None, 0)
    with SpillFile(tmp_path) as spill:
        spilled, acc1 = _run_accumulator(grid, tiles, spill, 0)
        assert spill.size > 0 and spill.held == 0
    assert acc1.peak_held_bytes < acc0.peak_held_bytes  # the frontier was not held in memory
    assert in_memory.keys() == spilled.keys()
    for k, v in in_memory.items():
        np.testing.assert_array_equal(spilled[k], v)


def test_nothing_is_created_until_something_is_spilled(tmp_path):
    missing = tmp_path / "not-there"
    with SpillFile(missing) as spill:  # no file yet, so no error for the missing directory
        assert spill.size == 0
    with SpillFile(tmp_path) as spill:
        spill.put(np.zeros(3, np.float32))
        assert spill.size == 12
