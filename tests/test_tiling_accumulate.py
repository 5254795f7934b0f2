"""The blend of tile parts over a write cell against a plain reference: every pixel the weighted
mean of the finite values of the parts covering it, NaN where no finite value has weight."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from tiling.accumulate import _Part, blend_parts


def reference_blend(parts: list[_Part], count: int, h: int, w: int) -> np.ndarray:
    num = np.zeros((count, h, w))
    den = np.zeros((count, h, w))
    for p in sorted(parts, key=lambda q: q.tile):
        rows, cols = p.data.shape[1:]
        wgt = np.outer(p.wy.astype(np.float64), p.wx)
        for b in range(count):
            ok = np.isfinite(p.data[b])
            num[b, p.r0:p.r0 + rows, p.c0:p.c0 + cols] += np.where(ok, p.data[b], 0) * wgt
            den[b, p.r0:p.r0 + rows, p.c0:p.c0 + cols] += ok * wgt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@pytest.mark.parametrize("seed", range(6))
def test_blend_matches_the_plain_weighted_mean(seed):
    rng = np.random.default_rng(seed)
    h, w, count = 40, 50, 3
    parts = []
    for k in range(int(rng.integers(1, 5))):
        r0, c0 = int(rng.integers(0, 20)), int(rng.integers(0, 25))
        rows, cols = int(rng.integers(5, h - r0 + 1)), int(rng.integers(5, w - c0 + 1))
        data = (rng.normal(size=(count, rows, cols)) * 1000).astype(np.float32)
        data[rng.random(data.shape) < 0.05] = np.nan  # missing values
        wy = rng.random(rows).astype(np.float32)
        wx = rng.random(cols).astype(np.float32)
        wy[rng.random(rows) < 0.3] = 1.0
        wx[rng.random(cols) < 0.3] = 1.0
        wy[rng.random(rows) < 0.05] = 0.0  # zero weight: NaN unless another part covers it
        parts.append(_Part((k // 2, k % 2), data, wy, wx, r0, c0))
    ours = blend_parts(parts, count, Window(0, 0, w, h))
    ref = reference_blend(parts, count, h, w)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_a_pixel_covered_once_keeps_its_value_exactly():
    data = np.array([[[1234.567, 2046.0], [1.0, np.nan]]], dtype=np.float32)
    part = _Part((0, 0), data, np.array([0.3, 1.0], np.float32), np.array([1.0, 0.7], np.float32),
                 0, 0)
    out = blend_parts([part], 1, Window(0, 0, 2, 2))
    np.testing.assert_array_equal(out, data)  # w * v / w is v, not v within rounding


def test_a_single_covering_part_is_returned_as_its_blend():
    data = np.array([[[1.5, np.nan], [3.0, 4.0]]], dtype=np.float32)
    part = _Part((0, 0), data, np.ones(2, np.float32), np.ones(2, np.float32), 0, 0)
    out = blend_parts([part], 1, Window(0, 0, 2, 2))
    assert np.shares_memory(out, data)  # no copy, no arithmetic
    np.testing.assert_array_equal(out, data)


def test_a_crop_grid_blends_without_holding_or_copying_parts():
    """Each cell of a crop grid comes from one tile: it is returned as a view of that tile's
    output, and the accumulator never holds a part."""
    from tiling.accumulate import Accumulator
    from tiling.grid import TileGrid

    grid = TileGrid(96, 128, tile=32, halo=8, block=16, blend="crop")  # cores on blocks
    rng = np.random.default_rng(0)
    scene = rng.normal(size=(2, 96, 128)).astype(np.float32)
    acc = Accumulator(grid, 2)
    out = np.full_like(scene, np.nan)
    for tile in grid.tiles():
        r, c = int(tile.read.row_off), int(tile.read.col_off)
        data = scene[:, r:r + int(tile.read.height), c:c + int(tile.read.width)].copy()
        for cell, values in acc.add(tile.id, data):
            assert np.shares_memory(values, data)
            w = cell.window
            out[:, int(w.row_off):int(w.row_off + w.height),
                int(w.col_off):int(w.col_off + w.width)] = values
    assert acc.pending == 0 and acc.peak_held_bytes == 0
    np.testing.assert_array_equal(out, scene)
