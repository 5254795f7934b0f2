"""Low-res grids off the guide's pixel lattice by a fraction of a guide pixel (a Landsat L1
product's 30 m bands start half a 15 m pan pixel from the pan band's corner) are used as they
are: cell centres move in the method and in the interpolations, no resampling."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from typer.testing import CliRunner

import geoupsample as gu
from geoupsample.cli import app
from geoupsample.core.layout import CellLayout, area_taps, pixel_cells
from geoupsample.grids import GridMismatch, relate_grids
from geoupsample.inputs import scene_guide_stats
from geoupsample.pipeline import upsample_raster

NAIP = str(files("geoupsample") / "data" / "naip_20200831.tif")
S = 2  # Landsat's pan geometry: 30 m cells on a 15 m guide
H = 160  # guide pixels per side used (80 cells)
GUIDE_T = Affine(15.0, 0, 500000.0, 0, -15.0, 4000000.0)
CRS = "EPSG:32614"


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def write(path, data: np.ndarray, transform: Affine) -> str:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype="float32", crs=CRS,
                       transform=transform) as out:  # fmt: skip
        out.write(data.astype(np.float32))
    return str(path)


@pytest.fixture(scope="module")
def naip() -> tuple[np.ndarray, np.ndarray]:
    """Real imagery: the bundled NAIP date's RGB (guide) and NIR (the band to rebuild), as
    float32 on a 15 m 'pan' grid, ``H + 2`` pixels a side."""
    with rasterio.open(NAIP) as ds:
        a = ds.read().astype(np.float32)[:, : H + 2, : H + 2]
    return a[:3], a[3:4]


def shifted_lowres(tmp_path, band: np.ndarray,
                   shift: tuple[float, float]) -> tuple[str, np.ndarray]:  # fmt: skip
    """``band`` averaged over 2 x 2-pixel cells whose grid starts ``shift`` guide pixels from the
    guide's corner (each cell the mean over its footprint: Wald's protocol on that grid)."""
    n = H // S
    layout = CellLayout.build((H, H), (n, n), shift)
    lr = layout.area_mean(torch.from_numpy(band[:, :H, :H]))[0].numpy()
    transform = GUIDE_T * Affine.translation(shift[1], shift[0]) * Affine.scale(S)
    return write(tmp_path / f"lr_{shift[0]}_{shift[1]}.tif", lr, transform), lr


def psnr(out: np.ndarray, truth: np.ndarray, border: int = 6) -> float:
    lo, hi = np.percentile(truth, [1, 99])
    e = (out - truth)[..., border : H - border, border : H - border]
    return float(10 * np.log10((hi - lo) ** 2 / np.mean(e**2)))


# --- the grid relation ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(0.5, 0.5), (0.3, 0.3), (-0.3, 0.5), (0.0, 0.25)])
def test_a_shifted_grid_is_related_with_its_shift(shift) -> None:
    lr_t = GUIDE_T * Affine.translation(3 + shift[1], 2 + shift[0]) * Affine.scale(S)
    rel = relate_grids(CRS, lr_t, (50, 60), CRS, GUIDE_T, (200, 200))
    assert rel.offset == (2, 3) and rel.shift == pytest.approx(shift)
    assert rel.region.col_off == 3 and rel.region.width == 120  # 60 cells of 2 pixels


def test_round_off_is_no_shift_and_half_a_cell_is_refused() -> None:
    lr_t = GUIDE_T * Affine.translation(0.02, -0.03) * Affine.scale(S)
    rel = relate_grids(CRS, lr_t, (50, 50), CRS, GUIDE_T, (200, 200))
    assert rel.shift == (0.0, 0.0) and not rel.is_shifted
    same_size = GUIDE_T * Affine.translation(0.5, 0.5)  # a guide-sized grid half a pixel off
    with pytest.raises(GridMismatch, match="shifted by about half its own pixel.*gdalwarp"):
        relate_grids(CRS, same_size, (100, 100), CRS, GUIDE_T, (200, 200))


def test_layout_and_area_weights_of_a_shifted_axis() -> None:
    # half a pixel: cell i covers pixels 2i, 2i+1 (centres inside) and is centred on 2i+1
    assert pixel_cells(8, 4, 0.5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    axis = CellLayout.build((8, 8), (4, 4), (0.5, 0.0)).rows
    assert axis.local[1].tolist() == [-1.0, 0.0]
    index, weight = area_taps(8, 4, 0.5)  # the footprint [2.5, 4.5) covers half of 2 and 4
    assert index[1].tolist() == [2, 3, 4] and weight[1].tolist() == [0.5, 1.0, 0.5]
    assert weight[3].tolist() == [0.5, 1.0, 0.0]  # beyond the array: no weight
    with pytest.raises(ValueError, match=r"within \(-0.5, 0.5\]"):
        gu.fit(np.zeros((1, 8, 8)), (4, 4), shift=(0.6, 0))


# --- the interpolations: the formulas at the guide pixel centres ---------------------------


def lr_position(transform_lr: Affine, rows: np.ndarray, cols: np.ndarray):
    """Fractional low-res cell coordinates (centre convention) of guide pixel centres."""
    x, y = GUIDE_T * (cols + 0.5, rows + 0.5)
    c, r = ~transform_lr * (x, y)
    return r - 0.5, c - 0.5


@pytest.mark.parametrize("shift", [(0.5, 0.5), (0.3, 0.3)])
def test_bilinear_and_nearest_evaluate_their_formulas_at_the_pixel_centres(
        tmp_path, naip, shift) -> None:  # fmt: skip
    guide, nir = naip
    g = write(tmp_path / "g.tif", guide, GUIDE_T)
    lr_path, lr = shifted_lowres(tmp_path, nir, shift)
    with rasterio.open(lr_path) as ds:
        lr_t = ds.transform
    rows, cols = np.mgrid[4 : H - 4, 4 : H - 4]
    r, c = lr_position(lr_t, rows.astype(float), cols.astype(float))
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    tr, tc = r - r0, c - c0
    v = lr[0]
    expected = ((1 - tr) * (1 - tc) * v[r0, c0] + (1 - tr) * tc * v[r0, c0 + 1]
                + tr * (1 - tc) * v[r0 + 1, c0] + tr * tc * v[r0 + 1, c0 + 1])  # fmt: skip
    out = str(tmp_path / "bl.tif")
    report = upsample_raster(lr_path, g, out, method="bilinear", tile=64, halo=16, blocksize=16)
    assert report.computed > 1  # tiled
    np.testing.assert_allclose(read(out)[0, 4 : H - 4, 4 : H - 4], expected, rtol=1e-5)
    nearest = str(tmp_path / "nn.tif")
    upsample_raster(lr_path, g, nearest, method="nearest", tile=64, halo=16, blocksize=16)
    cell_r, cell_c = np.floor(r + 0.5).astype(int), np.floor(c + 0.5).astype(int)
    np.testing.assert_array_equal(read(nearest)[0, 4 : H - 4, 4 : H - 4], v[cell_r, cell_c])


# --- the guided methods: Wald's protocol, against the aligned grid -------------------------


def test_jbu_and_gsjbu_on_shifted_grids_reach_the_aligned_quality(tmp_path, naip) -> None:
    """NIR rebuilt from its 2 x 2 cell means guided by RGB: on grids shifted by 0.5 and 0.3
    guide pixels (each axis) within 0.5 dB of the aligned grid, and well above both bilinear and
    the same grid with its shift ignored (what snapping it onto the lattice would give)."""
    guide, nir = naip
    g = write(tmp_path / "g.tif", guide, GUIDE_T)
    run = dict(tile=96, halo=32, blocksize=16, iters=20)
    quality: dict[tuple, float] = {}
    for shift in ((0.0, 0.0), (0.5, 0.5), (0.3, 0.3)):
        lr_path, lr = shifted_lowres(tmp_path, nir, shift)
        for method in ("bilinear", "jbu", "gsjbu"):
            out = str(tmp_path / f"{method}_{shift[0]}.tif")
            upsample_raster(lr_path, g, out, method=method, **run)
            quality[method, shift[0]] = psnr(read(out)[0, :H, :H], nir[0, :H, :H])
        if shift[0]:
            ignored = np.asarray(gu.upsample(lr, guide[:, :H, :H], method="jbu"))
            quality["ignored", shift[0]] = psnr(ignored[0], nir[0, :H, :H])
    for off in (0.5, 0.3):
        for method in ("jbu", "gsjbu"):
            assert quality[method, off] > quality[method, 0.0] - 0.5, quality
            assert quality[method, off] > quality["bilinear", off] + 2.0, quality
        assert quality["jbu", off] > quality["ignored", off] + 1.0, quality


def test_tiles_of_a_shifted_grid_equal_one_whole_array_run(tmp_path, naip) -> None:
    guide, nir = naip
    g = write(tmp_path / "g.tif", guide, GUIDE_T)
    lr_path, lr = shifted_lowres(tmp_path, nir, (0.5, 0.3))
    out = str(tmp_path / "jbu.tif")
    upsample_raster(lr_path, g, out, method="jbu", tile=64, halo=32, blocksize=16)
    whole = np.asarray(gu.upsample(lr, guide[:, :H, :H], method="jbu", shift=(0.5, 0.3),
                                   normalize=scene_guide_stats(g)))  # fmt: skip
    np.testing.assert_allclose(read(out)[:, :H, :H], whole, rtol=1e-5, atol=1e-3)
    with rasterio.open(out) as ds:
        assert ds.tags()["geoupsample_grid_shift"] == "0.3x0.5"  # x by y


def test_kernels_keep_their_shift(tmp_path, naip) -> None:
    guide, nir = naip
    k = gu.fit(guide[:, :H, :H], (H // S, H // S), iters=3, shift=(0.5, 0.5))
    k.save(tmp_path / "k.pt")
    again = gu.Kernels.load(tmp_path / "k.pt")
    assert again.shift == (0.5, 0.5)
    x = np.random.default_rng(0).random((2, H // S, H // S)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again.render(x)), np.asarray(k.render(x)))


def test_the_cli_takes_landsat_pan_geometry_without_a_warp(tmp_path, naip) -> None:
    guide, nir = naip
    pan = write(tmp_path / "pan15.tif", guide.mean(0, keepdims=True), GUIDE_T)
    ms, _ = shifted_lowres(tmp_path, np.concatenate([guide, nir]), (0.5, 0.5))
    out = tmp_path / "ms15.tif"
    result = CliRunner().invoke(app, ["upsample", ms, pan, "-o", str(out), "--tile", "96",
                                      "--iters", "10", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.count == 4 and ds.transform == GUIDE_T
        assert ds.tags()["geoupsample_grid_shift"] == "0.5x0.5"
        assert "geoupsample_warp" not in ds.tags()
