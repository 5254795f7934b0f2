"""Tile-grid geometry and blending weights (pure geometry, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from tiling import TileGrid
from tiling.blend import axis_weights


@pytest.mark.parametrize("length,tile,halo,align,offset", [
    (600, 192, 32, 2, 0),     # tile does not divide the raster
    (600, 200, 32, 2, 0),     # tile divides it
    (2041, 512, 64, 8, 3),    # Landsat-like width, scale 8, low-res origin at pixel 3
    (100, 256, 16, 4, 0),     # one tile larger than the raster
])
def test_axis_cores_reads_and_cells(length, tile, halo, align, offset):
    g = TileGrid(length, length, tile=tile, halo=halo, align=align, offset=(offset, offset),
                 block=64)
    ax = g.rows
    assert ax.cores[0] == 0 and ax.cores[-1] == length
    assert all(b > a for a, b in zip(ax.cores, ax.cores[1:], strict=False))
    size = ax.cores[1] - ax.cores[0]  # the balanced core (all but the last)
    assert size <= g.tile and size % align == 0
    assert all(ax.cores[t + 1] - ax.cores[t] == size for t in range(ax.n_tiles - 1))
    assert ax.cores[-1] - ax.cores[-2] > size - align * ax.n_tiles
    nominal = size + 2 * halo
    for t, (b, e) in enumerate(ax.reads):
        c0, c1 = ax.cores[t], ax.cores[t + 1]
        # the read covers the core plus the halo (clipped to the raster)
        assert b <= max(0, c0 - halo) and e >= min(length, c1 + halo)
        # aligned to the low-res lattice, never more than one step outside the raster
        assert (b - offset) % align == 0 and (e - b) % align == 0
        assert b > -align and e < length + align
        if length >= nominal:  # full-size reads, the last one shifted back inside the raster
            assert e - b >= nominal
            assert e - b < nominal + 2 * align
    # cells: block aligned inside, cover the raster
    assert ax.cells[0] == 0 and ax.cells[-1] == length
    assert all(c % 64 == 0 for c in ax.cells[1:-1])


@pytest.mark.parametrize("length,tile,align,cores", [
    (1207, 1024, 1, (0, 604, 1207)),  # just over a tile: two near-halves, not 1024 + 183
    (1254, 1024, 8, (0, 632, 1254)),  # aligned to the scale
    (1024, 1024, 1, (0, 1024)),  # exactly one tile
    (3100, 1024, 2, (0, 776, 1552, 2328, 3100)),
])
def test_cores_balance_the_region(length, tile, align, cores):
    g = TileGrid(length, 64, tile=tile, halo=64, align=align, block=16)
    assert g.rows.cores == cores
    read = sum(e - b for b, e in g.rows.reads)
    assert read <= length + 2 * 64 * len(cores) + 2 * align * len(cores)  # no full-tile sliver


@pytest.mark.parametrize("blend", ["taper", "crop"])
def test_weights_partition_of_unity_and_no_border_frame(blend):
    g = TileGrid(1000, 1000, tile=256, halo=48, align=1, block=32, blend=blend)
    ax = g.rows
    total = np.zeros(1000)
    for t in range(ax.n_tiles):
        b, e = ax.reads[t]
        w = axis_weights(ax, t, g.taper, b, e)
        assert (w >= 0).all() and (w <= 1).all()
        total[b:e] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    # no zero-weight frame at the scene border
    assert axis_weights(ax, 0, g.taper, 0, 1)[0] == 1.0
    last = ax.n_tiles - 1
    assert axis_weights(ax, last, g.taper, 999, 1000)[0] == 1.0
    if blend == "crop":
        for t in range(ax.n_tiles):
            w = axis_weights(ax, t, 0, *ax.reads[t])
            assert set(np.unique(w)) <= {0.0, 1.0}


def test_cores_narrower_than_the_ramp_keep_partition_of_unity():
    # 100 px in tiles of at most 64: two 50 px cores, narrower than the 64 px ramp
    g = TileGrid(100, 100, tile=64, halo=64, block=16)
    ax = g.cols
    assert ax.cores == (0, 50, 100)
    total = np.zeros(100)
    for t in range(ax.n_tiles):
        b, e = ax.reads[t]
        total[b:e] += axis_weights(ax, t, g.taper, b, e)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_taper_keeps_half_halo_of_context():
    g = TileGrid(2000, 2000, tile=300, halo=40, block=16)
    ax = g.rows
    for t in range(ax.n_tiles):
        (s0, s1), _ = g.support(t, 0)
        b, e = ax.reads[t]
        if t > 0:
            assert s0 - b >= 20
        if t < ax.n_tiles - 1:
            assert e - s1 >= 20


def test_cells_list_contributing_tiles():
    g = TileGrid(600, 500, tile=128, halo=16, block=64)
    cells = g.cells()
    covered = np.zeros((600, 500), dtype=int)
    for c in cells:
        w = c.window
        covered[int(w.row_off):int(w.row_off + w.height),
                int(w.col_off):int(w.col_off + w.width)] += 1
        assert 1 <= len(c.tiles) <= 4
    assert (covered == 1).all()


def test_region_restricts_tiles():
    g = TileGrid(600, 600, tile=128, halo=16, block=64, region=Window(100, 50, 300, 200))
    assert g.rows.start == 50 and g.rows.stop == 250
    assert g.cols.start == 100 and g.cols.stop == 400
    for t in g.tiles():
        assert t.read.row_off >= 50 and t.read.row_off + t.read.height <= 250


def test_context_lets_edge_tiles_read_past_the_region():
    """Inputs with data beyond the region (a low-res raster around a guide chip): the edge
    tiles read ``halo`` pixels past it (then aligned), no further; the cores and write cells
    stay those of the region, and without a context nothing changes."""
    region = Window(100, 50, 300, 200)
    plain = TileGrid(600, 600, tile=128, halo=16, align=8, block=64, region=region)
    wide = TileGrid(600, 600, tile=128, halo=16, align=8, block=64, region=region,
                    context=Window(-40, -40, 700, 700))
    assert (wide.rows.cores, wide.cols.cores) == (plain.rows.cores, plain.cols.cores)
    assert [c.window for c in wide.cells()] == [c.window for c in plain.cells()]
    assert plain.rows.reads[0][0] == 48 and plain.cols.reads[0][0] == 96  # aligned at the edge
    assert wide.rows.reads[0][0] == 32 and wide.cols.reads[0][0] == 80  # 16 px further out
    assert wide.rows.reads[-1][1] == 272 and wide.cols.reads[-1][1] == 416
    # a context as wide as the region, taller: no reads past it across, 16 px down
    tall = TileGrid(600, 600, tile=128, halo=16, align=8, block=64, region=region,
                    context=Window(100, 0, 300, 600))
    assert tall.cols.reads[0][0] == 96 and tall.cols.reads[-1][1] == 400
    assert tall.rows.reads[0][0] == 32
    assert TileGrid(600, 600, context=Window(-64, -64, 728, 728)).rows.reads[0][0] == -64
    with pytest.raises(ValueError, match="context window"):
        TileGrid(600, 600, region=region, context=Window(120, 50, 300, 200))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tile=64, halo=100), "halo"),
    (dict(tile=0), "tile"),
    (dict(blend="feather"), "blend"),
    (dict(region=Window(700, 700, 10, 10)), "region"),
])
def test_bad_grid_parameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TileGrid(600, 600, **kwargs)
